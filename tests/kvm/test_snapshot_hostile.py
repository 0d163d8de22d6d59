"""Restoring real snapshots whose files were replaced by hostile ones: refused at once, nothing created."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deadlines import deadline
from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import load_catalog
from pyrovisor.config import MachineConfig
from pyrovisor.errors import StateError
from pyrovisor.snapshot.chain import load_chain
from pyrovisor.snapshot.file_format import write_state_file
from pyrovisor.snapshot.state import MemoryRange
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def snapshot_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full snapshot of the ticker guest and a diff on top of it, taken with a permissive umask."""
    root = tmp_path_factory.mktemp("hostile")
    config = MachineConfig(kernel=load_catalog()["ticker"].elf, memory_size=64 << 20,
                           cmdline="ticks=0 period_ms=5 buffer_mib=1")
    previous = os.umask(0)
    try:
        with build_vm(config, lambda data: None) as vmm:
            vmm.start()
            time.sleep(0.3)
            take_snapshot(vmm, root / "full")
            time.sleep(0.1)
            take_snapshot(vmm, root / "diff", "diff")
    finally:
        os.umask(previous)
    return root


def _copy(root: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(root, target, symlinks=True)
    return target


def _kvm_fds() -> list[str]:
    targets = []
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{name}")
            if "kvm" in target:
                targets.append(target)
    return sorted(targets)


def _refused(directory: Path, message: str, **options: bool) -> None:
    """restore_vm fails at once with a StateError, and creates (and leaves open) nothing."""
    before = _kvm_fds()
    with deadline(10), pytest.raises(StateError, match=message):
        restore_vm(directory, lambda data: None, **options)
    assert _kvm_fds() == before


def _loop(path: Path) -> None:
    os.symlink(path.name + ".b", path)
    os.symlink(path.name, path.with_name(path.name + ".b"))


HOSTILE: dict[str, tuple[Callable[[Path], None], str]] = {
    "symlink loop": (_loop, "symlink loop"),
    "directory": (lambda path: path.mkdir(), "is a directory, not a regular file"),
    "fifo": (os.mkfifo, "is a FIFO, not a regular file"),
    "/dev/zero": (lambda path: os.symlink("/dev/zero", path), "is a character device, not a regular file"),
}


def test_snapshot_files_are_private(snapshot_pair: Path) -> None:
    for name in ("full/state", "full/memory.img", "diff/state", "diff/memory.diff"):
        assert stat.S_IMODE(os.stat(snapshot_pair / name).st_mode) == 0o600, name


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("target", ["full/state", "diff/state", "full/memory.img", "diff/memory.diff"])
def test_special_file_in_place_of_a_snapshot_file_is_refused(snapshot_pair: Path, tmp_path: Path,
                                                             target: str, hostile: str) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    path = copy / target
    path.unlink()
    make, message = HOSTILE[hostile]
    make(path)
    for options in ({}, {"lazy": False}, {"verify": True}):
        _refused(copy / target.split("/")[0], message, **options)
        if target.startswith("full/"):
            _refused(copy / "diff", message, **options)  # reached through the chain


def test_bad_memory_range_in_the_state_is_refused_before_any_vm(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    state = load_chain(copy / "diff")[-1].state
    first = state.memory.ranges[0]
    bad = dataclasses.replace(state.memory, ranges=(MemoryRange(first.gpa, first.size, first.file_offset + 8),
                                                    *state.memory.ranges[1:]))
    (copy / "diff" / "state").unlink()
    write_state_file(copy / "diff" / "state", dataclasses.replace(state, memory=bad))
    _refused(copy / "diff", "file_offset .* is not a page-aligned address")


def test_cli_refuses_a_fifo_state_file_in_one_line(snapshot_pair: Path, tmp_path: Path) -> None:
    copy = _copy(snapshot_pair, tmp_path)
    (copy / "full" / "state").unlink()
    os.mkfifo(copy / "full" / "state")
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "restore", str(copy / "full")],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr.startswith("pyrovisor: error:") and "is a FIFO, not a regular file" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
