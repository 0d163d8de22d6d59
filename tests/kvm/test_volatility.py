"""volatility3 reads a saved OS guest with pyrovisor's plugin and symbol table, and lists the processes the VMM's
own reading of the same snapshot finds; a corrupt or foreign image gives one clear error line."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.forensics.run_vol import PLUGIN_DIR, write_symbols
from pyrovisor.introspect import GuestKernel, guest_profile
from pyrovisor.introspect.kernel import ProcessInfo
from pyrovisor.snapshot.chain import load_chain
from pyrovisor.snapshot.memory_file import open_full_image
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm

MiB = 1 << 20
# Three live programs (one pinned to vCPU 1) and one that has exited by the time of the snapshot.
PROGRAMS = "counter count=0 period_ms=20; memcheck mib=2 passes=0 interval_ms=20; kwriter; counter count=0 period_ms=30 cpu=1"
ERROR_PREFIX = "pyrovisor.pslist: error:"


@dataclass(frozen=True)
class Saved:
    snapshot: Path
    diff: Path
    symbols: Path


def wait_for(output: bytearray, pattern: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, output.decode(errors="replace"), re.MULTILINE):
        assert time.monotonic() < deadline, f"no {pattern!r} in:\n{output.decode(errors='replace')}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    root = tmp_path_factory.mktemp("volatility")
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", memory_size=128 * MiB, vcpus=2, cmdline=PROGRAMS,
                           initrd=directory / "os-programs.img")
    output = bytearray()
    with build_vm(config, output.extend) as vmm:
        vmm.start()
        wait_for(output, r"^os: pid 3 \(kwriter\) exited")
        wait_for(output, r"^counter 4: beat 2 ")
        take_snapshot(vmm, root / "snap")
        take_snapshot(vmm, root / "diff", "diff")
    write_symbols(directory / "os.elf", root / "symbols")
    yield Saved(root / "snap", root / "diff", root / "symbols")


def vmm_reading(snapshot: Path) -> list[ProcessInfo]:
    """What the VMM's own introspection reads from the snapshot's memory file."""
    state = load_chain(snapshot)[0].state
    memory = open_full_image(snapshot, state.memory, state.machine.ram, lazy=True, verify=True)
    try:
        return GuestKernel(memory, guest_profile()).processes()
    finally:
        memory.close()


def vol(*args: str) -> subprocess.CompletedProcess[str]:
    """The real `vol` entry point of the installed volatility3, in a child process."""
    executable = shutil.which("vol")
    command = [executable] if executable else [sys.executable, "-c", "import sys; from volatility3.cli import main; "
                                                                     "sys.exit(main())"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, check=False)


def plugin_rows(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def as_rows(processes: list[ProcessInfo]) -> list[tuple[int, int, str, str, int, int, int, int]]:
    return [(p.slot, p.pid, p.name, p.state, p.parent, p.cpu, p.cr3, p.address) for p in processes]


def test_vol_lists_the_processes_the_vmm_reads_from_the_same_snapshot(saved: Saved) -> None:
    expected = vmm_reading(saved.snapshot)
    assert {p.pid: p.name for p in expected} == {1: "counter", 2: "memcheck", 3: "kwriter", 4: "counter"}
    assert {p.pid: p.state for p in expected}[3] == "exited"

    result = vol("-q", "-p", str(PLUGIN_DIR), "-s", str(saved.symbols), "--stackers", "none",
                 "-f", str(saved.snapshot / "memory.img"), "-r", "json", "pyrovisor.pslist")
    rows = plugin_rows(result)
    assert [(r["Slot"], r["PID"], r["Name"], r["State"], r["PPID"], r["CPU"], r["CR3"], r["Offset(V)"])
            for r in rows] == as_rows(expected)


def test_plain_vol_with_every_automagic_gives_the_same_list(saved: Saved) -> None:
    """Without --stackers volatility first tries its own OS stackers (slower); the answer is the same."""
    result = vol("-q", "-p", str(PLUGIN_DIR), "-s", str(saved.symbols), "-f", str(saved.snapshot / "memory.img"),
                 "pyrovisor.pslist")
    assert result.returncode == 0, result.stderr
    listed = [line.split("\t") for line in result.stdout.splitlines() if re.match(r"^\d+\t\d+\t", line)]
    assert [(int(fields[1]), fields[3]) for fields in listed] == [(p.pid, p.name) for p in vmm_reading(saved.snapshot)]


def test_the_helper_command_runs_vol_on_a_snapshot_and_speaks_json(saved: Saved) -> None:
    helper = [sys.executable, "-m", "pyrovisor", "forensics", "vol"]
    result = subprocess.run([*helper, str(saved.snapshot), "--json"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert [(r["PID"], r["Name"]) for r in plugin_rows(result)] == \
        [(p.pid, p.name) for p in vmm_reading(saved.snapshot)]

    # A page-table root given by hand: a live process's CR3 maps the kernel half too.
    live = next(p for p in vmm_reading(saved.snapshot) if p.state != "exited")
    result = subprocess.run([*helper, str(saved.snapshot), "--json", "--", "pyrovisor.pslist", "--dtb", str(live.cr3)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert [r["PID"] for r in plugin_rows(result)] == [p.pid for p in vmm_reading(saved.snapshot)]

    result = subprocess.run([*helper, str(saved.diff)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [line for line in result.stderr.strip().splitlines()
                                                  if line.startswith("pyrovisor: error:") and "diff snapshot" in line]
    assert len(result.stderr.strip().splitlines()) == 1

    result = subprocess.run([*helper, str(saved.snapshot), "--dtb", "5"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "go after --" in result.stderr


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(ERROR_PREFIX)
    assert not re.search(r"^\d+\t\d+\t", result.stdout, re.MULTILINE), "no rows for a bad image"
    return lines[0]


def test_a_corrupt_or_foreign_image_gives_one_clear_error_line(saved: Saved, tmp_path: Path) -> None:
    common = ("-q", "-p", str(PLUGIN_DIR), "-s", str(saved.symbols), "--stackers", "none")
    truncated = tmp_path / "truncated.img"
    with (saved.snapshot / "memory.img").open("rb") as source:
        truncated.write_bytes(source.read(1 * MiB))  # the kernel's page tables lie past 1 MiB
    line = one_error_line(vol(*common, "-f", str(truncated), "pyrovisor.pslist"))
    assert "not a pyrovisor OS guest image" in line

    foreign = tmp_path / "foreign.img"
    foreign.write_bytes(random.Random(13).randbytes(8 * MiB))
    line = one_error_line(vol(*common, "-f", str(foreign), "pyrovisor.pslist"))
    assert "not a pyrovisor OS guest" in line

    line = one_error_line(vol(*common, "-f", str(saved.snapshot / "memory.img"), "pyrovisor.pslist", "--dtb", "4096"))
    assert "wrong --dtb" in line or "os_info.magic" in line

    line = one_error_line(vol("-q", "-p", str(PLUGIN_DIR), "-s", str(tmp_path), "--stackers", "none",
                              "-f", str(saved.snapshot / "memory.img"), "pyrovisor.pslist"))
    assert "cannot load the symbol table" in line
