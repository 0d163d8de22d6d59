"""Loading a snapshot and the bases it builds on, checking that every link matches."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.errors import StateError
from pyrovisor.persist.machine import check_machine_state
from pyrovisor.snapshot.file_format import read_state_file, special_file_kind
from pyrovisor.snapshot.memory_file import check_memory_image
from pyrovisor.snapshot.state import DIFF, FULL, SnapshotState

STATE_FILE = "state"
MAX_CHAIN = 64


@dataclass(frozen=True)
class SnapshotLink:
    directory: Path
    state: SnapshotState


def load_chain(directory: Path) -> list[SnapshotLink]:
    """The full snapshot first, then each diff up to `directory`; refuses broken or mismatched links."""
    links: list[SnapshotLink] = []
    current = _snapshot_directory(directory)
    expected_id: str | None = None
    while True:
        if len(links) >= MAX_CHAIN:
            raise StateError(str(directory), f"more than {MAX_CHAIN} snapshots in the chain (a cycle?)")
        source = str(current / STATE_FILE)
        state = read_state_file(current / STATE_FILE)
        if expected_id is not None and state.snapshot_id != expected_id:
            raise StateError(str(current), f"is snapshot {state.snapshot_id}, but its diff was taken from {expected_id}")
        if state.memory.kind not in (FULL, DIFF) or (state.memory.kind == DIFF) != (state.base is not None):
            raise StateError(source, "memory image kind and base reference disagree")
        check_machine_state(state.machine, source)
        check_memory_image(state.memory, state.memory.kind, state.machine.ram, source)
        links.append(SnapshotLink(current, state))
        if state.base is None:
            break
        expected_id = state.base.snapshot_id
        if not state.base.directory or "\0" in state.base.directory:
            raise StateError(source, f"base directory {state.base.directory!r} is not a path")
        current = _snapshot_directory(current / state.base.directory)
    links.reverse()
    if links[0].state.memory.kind != FULL:
        raise StateError(str(links[0].directory), "the chain does not start with a full snapshot")
    newest = links[-1].state.machine
    for link in links:
        if link.state.machine.ram != newest.ram:
            raise StateError(str(link.directory), "RAM layout differs from the rest of the chain")
    return links


def _snapshot_directory(path: Path) -> Path:
    """`path` resolved, once it is known to be a directory; a loop or anything else is a StateError."""
    try:
        resolved = path.resolve(strict=True)
        mode = os.stat(resolved).st_mode
    except FileNotFoundError:
        raise StateError(str(path), "snapshot directory not found") from None
    except RuntimeError:  # how Python 3.11 reports a symlink loop
        raise StateError(str(path), "snapshot directory is a symlink loop") from None
    except OSError as exc:
        raise StateError(str(path), f"cannot open the snapshot directory: {os.strerror(exc.errno or 0)}") from None
    except ValueError:  # a NUL, or a string the file system encoding cannot hold
        raise StateError(repr(str(path)), "is not a valid path") from None
    if not stat.S_ISDIR(mode):
        raise StateError(str(path), f"is {special_file_kind(mode) or 'a regular file'}, not a snapshot directory")
    return resolved
