"""take_snapshot: pause a VM, write its state and memory (full or diff) to a directory, resume it."""

from __future__ import annotations

import contextlib
import datetime
import os
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from pyrovisor import __version__
from pyrovisor.errors import ConfigError, StateError
from pyrovisor.introspect.write_monitor import saved_watches
from pyrovisor.memory import PageSet
from pyrovisor.snapshot.file_format import write_state_file
from pyrovisor.snapshot.memory_file import file_sha256, write_diff_image, write_full_image
from pyrovisor.snapshot.state import DIFF, FULL, BaseReference, SnapshotState
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.dirty import DirtyLog
from pyrovisor.vstate.lifecycle import Operation

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

    Everything that can be checked is checked before anything is written: the kind, the VM's state
    (no snapshot while migrating or after the VM stopped), the directory (new or empty, in a folder
    that exists; missing parents are not created). A snapshot that fails half-way removes what it
    wrote, and a diff's pages stay owed to the next diff. The first snapshot turns on dirty tracking
    so that later diffs are possible.
    """
    if kind not in (FULL, DIFF):
        raise StateError(str(directory), f"unknown snapshot kind {kind!r} (full or diff)")
    if kind == DIFF and (vmm.last_snapshot is None or vmm.snapshot_log is None):
        raise StateError(str(directory), "a diff snapshot needs an earlier snapshot of this running VM as its base")
    directory = Path(os.path.abspath(directory))
    with vmm.operation(Operation.SNAPSHOT):
        created = _claim_directory(directory)
        try:
            return _write_snapshot(vmm, directory, kind)
        except OSError as exc:  # a full disk, a vanished directory: the caller's problem, said in one line
            _remove_partial(directory, created)
            raise StateError(str(directory), f"cannot write the snapshot: {exc.strerror or exc}") from None
        except BaseException:
            _remove_partial(directory, created)
            raise


def _claim_directory(directory: Path) -> bool:
    """Make `directory` (mode 0700) or accept it empty; True if it was created here."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise ConfigError("snapshot directory", str(directory), "exists and is not a directory")
    if directory.is_dir():
        if any(directory.iterdir()):
            raise StateError(str(directory), "already exists and is not empty; snapshots are never overwritten")
        return False
    if not directory.parent.is_dir():
        raise ConfigError("snapshot directory", str(directory),
                          f"the folder {directory.parent} does not exist; create it first")
    try:
        directory.mkdir(mode=0o700)
    except OSError as exc:
        raise StateError(str(directory), f"cannot create it: {exc.strerror or exc}") from None
    return True


def _remove_partial(directory: Path, created: bool) -> None:
    """Delete what a failed snapshot wrote, so no half snapshot is left that looks like one."""
    for name in (STATE_FILE, STATE_FILE + ".partial", *MEMORY_FILE.values()):
        with contextlib.suppress(OSError):
            (directory / name).unlink()
    if created:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _write_snapshot(vmm: Vmm, directory: Path, kind: str) -> SnapshotReport:
    started = time.perf_counter()
    log = vmm.snapshot_log
    new_log: DirtyLog | None = None
    owed: PageSet | None = None  # pages the previous snapshot's log held: given back if this one fails
    try:
        with vmm.paused("snapshot"):
            machine = vmm.save_state()
            memory_path = directory / MEMORY_FILE[kind]
            # From this moment the next diff counts pages written after this snapshot.
            if log is None:
                new_log = vmm.dirty.subscribe()
            else:
                owed = log.collect_pages()
            if kind == FULL:
                image = write_full_image(vmm.memory, memory_path)
                pages = sum(-(-r.size // 4096) for r in image.ranges)
            else:
                assert owed is not None
                image = write_diff_image(vmm.memory, owed, memory_path)
                pages = len(owed)
            paused_seconds = time.perf_counter() - started
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
            watches=saved_watches(vmm),
        )
        write_state_file(directory / STATE_FILE, state)
    except BaseException:
        if new_log is not None:
            new_log.close()
        if log is not None and owed is not None:
            log.give_back(owed)  # the next diff of the previous snapshot must still carry them
        raise
    if new_log is not None:
        vmm.snapshot_log = new_log
    vmm.last_snapshot = (directory, state.snapshot_id)
    return SnapshotReport(directory=directory, snapshot_id=state.snapshot_id, kind=kind, pages=pages,
                          memory_bytes=image.file_size, paused_seconds=paused_seconds,
                          total_seconds=time.perf_counter() - started)


def _relative(target: Path, start: Path) -> str:
    """`target` as a path relative to directory `start` (so snapshot trees can be moved together)."""
    return os.path.relpath(target, start)
