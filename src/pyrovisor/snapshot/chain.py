"""Loading a snapshot and the bases it builds on, checking that every link matches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pyrovisor.arch.x86_64.layout import ram_ranges
from pyrovisor.errors import PyrovisorError, StateError
from pyrovisor.snapshot.file_format import read_state_file
from pyrovisor.snapshot.state import DIFF, FULL, MachineState, SnapshotState
from pyrovisor.vstate.vcpu_state import check_vcpu_state
from pyrovisor.vstate.vm_state import check_vm_state

STATE_FILE = "state"
MAX_CHAIN = 64


@dataclass(frozen=True)
class SnapshotLink:
    directory: Path
    state: SnapshotState


def load_chain(directory: Path) -> list[SnapshotLink]:
    """The full snapshot first, then each diff up to `directory`; refuses broken or mismatched links."""
    links: list[SnapshotLink] = []
    current = directory.resolve()
    expected_id: str | None = None
    while True:
        if len(links) >= MAX_CHAIN:
            raise StateError(str(directory), f"more than {MAX_CHAIN} snapshots in the chain (a cycle?)")
        if not current.is_dir():
            raise StateError(str(current), "snapshot directory not found")
        state = read_state_file(current / STATE_FILE)
        if expected_id is not None and state.snapshot_id != expected_id:
            raise StateError(str(current), f"is snapshot {state.snapshot_id}, but its diff was taken from {expected_id}")
        if state.memory.kind not in (FULL, DIFF) or (state.memory.kind == DIFF) != (state.base is not None):
            raise StateError(str(current / STATE_FILE), "memory image kind and base reference disagree")
        check_machine_state(state.machine, str(current / STATE_FILE))
        links.append(SnapshotLink(current, state))
        if state.base is None:
            break
        expected_id = state.base.snapshot_id
        current = (current / state.base.directory).resolve()
    links.reverse()
    if links[0].state.memory.kind != FULL:
        raise StateError(str(links[0].directory), "the chain does not start with a full snapshot")
    newest = links[-1].state.machine
    for link in links:
        if link.state.machine.ram != newest.ram:
            raise StateError(str(link.directory), "RAM layout differs from the rest of the chain")
    return links


def check_machine_state(state: MachineState, source: str) -> None:
    """Consistency checks that need no KVM: done before anything is created."""
    try:
        state.config.validate()
    except PyrovisorError as exc:
        raise StateError(source, f"configuration: {exc}") from None
    if tuple((r.gpa, r.size) for r in state.ram) != tuple((r.gpa, r.size) for r in ram_ranges(state.config.memory_size)):
        raise StateError(source, "RAM layout does not match the configured memory size")
    if len(state.vcpus) != state.config.vcpus or [v.index for v in state.vcpus] != list(range(state.config.vcpus)):
        raise StateError(source, f"{len(state.vcpus)} vCPU states for {state.config.vcpus} vCPUs")
    for vcpu in state.vcpus:
        check_vcpu_state(vcpu, source)
    check_vm_state(state.vm, source)
