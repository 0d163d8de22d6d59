"""What one sandbox run did: its outcome, the guest-physical pages it changed and whose they are."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChangedRange:
    """Consecutive changed guest-physical pages with one owner: `kernel`, or a process's user memory."""

    gpa: int
    pages: int
    kind: str  # "kernel" or "user"
    pid: int | None = None
    process: str | None = None
    virtual_address: int | None = None  # of the first page, in that process


@dataclass(frozen=True)
class SandboxReport:
    """One run: restore, deliver the command, run to exit or timeout, compare with the base."""

    run: int
    command: str
    outcome: str  # "exited", "timeout" or "error: ..."
    vm_exit_code: int | None
    program_pid: int | None  # None: the program did not start (`start_error` says why)
    program_exit_code: int | None
    pages_written: int  # reported by KVM's dirty log and the VMM's own writes
    pages_changed: int  # of those, the ones whose content differs from the base
    ranges: tuple[ChangedRange, ...]
    clean_start_pages: int  # pages the previous run changed, checked to read as the base before this one
    restore_ms: float
    run_ms: float
    analyse_ms: float
    cycle_ms: float  # restore + run + analysis + teardown: one revert cycle
    log: str
    user_pages: dict[int, tuple[int, ...]] = field(default_factory=dict)  # pid -> changed user VAs
    start_error: str | None = None  # why the program did not start, as the guest printed it

    def describe_program(self) -> str:
        """'program pid P exit C', or why it did not start."""
        if self.program_pid is None:
            return f"program did not start: {self.start_error or 'no reason on the console'}"
        return f"program pid {self.program_pid} exit {self.program_exit_code}"

    def pages_of(self, kind: str) -> int:
        return sum(r.pages for r in self.ranges if r.kind == kind)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["user_pages"] = {str(pid): [hex(va) for va in vas] for pid, vas in self.user_pages.items()}
        data["ranges"] = [{**asdict(r), "gpa": hex(r.gpa),
                           "virtual_address": None if r.virtual_address is None else hex(r.virtual_address)}
                          for r in self.ranges]
        return data
