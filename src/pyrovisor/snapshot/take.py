"""take_snapshot: pause a VM, write its state and memory (full or diff) to a directory, resume it."""

from __future__ import annotations

import datetime
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from pyrovisor import __version__
from pyrovisor.errors import StateError
from pyrovisor.snapshot.capture import capture_machine
from pyrovisor.snapshot.file_format import write_state_file
from pyrovisor.snapshot.memory_file import file_sha256, write_diff_image, write_full_image
from pyrovisor.snapshot.state import DIFF, FULL, BaseReference, SnapshotState
from pyrovisor.vmm import Vmm

STATE_FILE = "state"
MEMORY_FILE = {FULL: "memory.img", DIFF: "memory.diff"}


@dataclass(frozen=True)
class SnapshotReport:
    directory: Path
    snapshot_id: str
    kind: str
    pages: int  # pages in the memory image
    memory_bytes: int
    paused_seconds: float  # how long the guest was stopped
    total_seconds: float  # including the checksum and state file written after resuming


def take_snapshot(vmm: Vmm, directory: Path, kind: str = FULL) -> SnapshotReport:
    """Snapshot `vmm` into a new directory. A diff holds only the pages written since its base.

    The first snapshot turns on dirty tracking so that later diffs are possible.
    """
    if kind not in (FULL, DIFF):
        raise StateError(str(directory), f"unknown snapshot kind {kind!r} (full or diff)")
    if vmm.closed or vmm.outcome is not None:
        raise StateError(str(directory), "the VM has stopped; only a running or paused VM can be snapshotted")
    if kind == DIFF and (vmm.last_snapshot is None or vmm.snapshot_log is None):
        raise StateError(str(directory), "a diff snapshot needs an earlier snapshot of this running VM as its base")
    directory = directory.resolve()
    if directory.exists() and any(directory.iterdir()):
        raise StateError(str(directory), "already exists and is not empty; snapshots are never overwritten")
    directory.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    was_running = vmm.started and not vmm.paused
    if was_running and not vmm.pause():
        raise StateError(str(directory), "the VM stopped while it was being paused")
    try:
        machine = capture_machine(vmm)
        memory_path = directory / MEMORY_FILE[kind]
        if kind == FULL:
            image = write_full_image(vmm.memory, memory_path)
            pages = sum(-(-r.size // 4096) for r in image.ranges)
        else:
            assert vmm.snapshot_log is not None
            dirty = vmm.snapshot_log.collect_array()
            image = write_diff_image(vmm.memory, (int(page) for page in dirty), memory_path)
            pages = len(dirty)
        if vmm.snapshot_log is None:
            vmm.snapshot_log = vmm.dirty.subscribe()
        else:
            vmm.snapshot_log.restart()
    finally:
        paused_seconds = time.perf_counter() - started
        if was_running:
            vmm.resume()

    base = None
    if kind == DIFF:
        assert vmm.last_snapshot is not None
        base_directory, base_id = vmm.last_snapshot
        base = BaseReference(directory=_relative(base_directory, directory), snapshot_id=base_id)
    state = SnapshotState(
        snapshot_id=uuid.uuid4().hex,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        pyrovisor_version=__version__,
        machine=machine,
        memory=replace(image, sha256=file_sha256(memory_path)),
        base=base,
    )
    write_state_file(directory / STATE_FILE, state)
    vmm.last_snapshot = (directory, state.snapshot_id)
    return SnapshotReport(directory=directory, snapshot_id=state.snapshot_id, kind=kind, pages=pages,
                          memory_bytes=image.file_size, paused_seconds=paused_seconds,
                          total_seconds=time.perf_counter() - started)


def _relative(target: Path, start: Path) -> str:
    """`target` as a path relative to directory `start` (so snapshot trees can be moved together)."""
    return os.path.relpath(target, start)
