"""The sandbox loop: make a base with the OS's runner waiting, then restore, run, compare and revert."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from pyrovisor.builder import build_vm, open_chain_memory, restore_vm
from pyrovisor.catalog import check_vcpu_limit, guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.errors import ConfigError, StateError
from pyrovisor.introspect import GuestKernel, ProcessInfo, guest_profile
from pyrovisor.introspect.profile import Profile
from pyrovisor.memory import GuestMemory
from pyrovisor.sandbox.changes import PAGE, changed_pages, merge_ranges, user_owners, user_pages_by_pid
from pyrovisor.sandbox.report import SandboxReport
from pyrovisor.snapshot.chain import load_chain
from pyrovisor.snapshot.take import take_snapshot
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.run_control import StopReason

RUNNER_MAGIC = 0x524E5552  # "RUNR": guests/programs/runner.c
MAILBOX_LENGTH_OFFSET = 4
MAILBOX_LINE_OFFSET = 8
MAILBOX_LINE_MAX = 1024
RUNNER_ARGS = "runner; kernel keepmm=1"  # keepmm: exited processes keep their page tables for the report
_WAITING = re.compile(rb"^runner \d+: waiting for a command[^\n]*\n", re.MULTILINE)
_RUNNER_LINE = re.compile(r"^runner \d+: (.*)$", re.MULTILINE)
_RUNNER_DONE = re.compile(r"^pid \d+ exited with")
MiB = 1 << 20


def make_base(directory: Path, memory_size: int = 256 * MiB, vcpus: int = 1, timeout: float = 30) -> Path:
    """Boot the OS with only the runner, wait until it waits for a command, and snapshot it there."""
    _check_new_directory(directory)
    kernel = guests_dir() / "os.elf"
    check_vcpu_limit(kernel, vcpus)
    console = bytearray()
    arrived = threading.Event()

    def output(chunk: bytes) -> None:
        console.extend(chunk)
        if _WAITING.search(console):
            arrived.set()

    config = MachineConfig(kernel=kernel, initrd=guests_dir() / "os-programs.img",
                           memory_size=memory_size, vcpus=vcpus, cmdline=RUNNER_ARGS)
    with build_vm(config, output) as vmm:
        vmm.start()
        if not arrived.wait(timeout):
            raise StateError("sandbox base", f"the runner did not start within {timeout} s: "
                             f"{console.decode(errors='replace')[-300:]}")
        take_snapshot(vmm, directory)
        vmm.stop()
    return directory


def _check_new_directory(directory: Path) -> None:
    """Before booting anything: the base can be written there (take_snapshot would refuse only at the end)."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise StateError(str(directory), "exists and is not an empty directory; a base is never overwritten")
    if not directory.parent.is_dir():
        raise StateError(str(directory), f"the folder {directory.parent} does not exist; create it first")


def why_not_started(console: str) -> str:
    """Why the runner started nothing, from the console of that run: its last line that is not the
    child's exit, else the guest's last line."""
    reasons = [m[1] for m in _RUNNER_LINE.finditer(console) if not _RUNNER_DONE.match(m[1])]
    if reasons:
        return reasons[-1].strip()
    lines = [line.strip() for line in console.splitlines() if line.strip()]
    return f"the runner said nothing; the guest's last line: {lines[-1]}" if lines else "the guest printed nothing"


class Sandbox:
    """Runs commands in a guest restored from `base`, one clean restore per run."""

    def __init__(self, base: Path, log: Path, profile: Profile | None = None) -> None:
        self.base = base
        self.chain = load_chain(base)  # refuses a missing, corrupt or wrong-version snapshot up front
        self.profile = profile or guest_profile("os")
        self.log = log
        self._base_memory = open_chain_memory(self.chain, lazy=True)
        self._previous_changes: list[int] = []
        self._runs = 0

    def close(self) -> None:
        self._base_memory.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, command: str, timeout: float = 30) -> SandboxReport:
        """Restore the base, start `command` ("program k=v ..."), run to its end or `timeout`, report, revert."""
        line = command.strip().encode()
        if not line or b";" in line or b"\0" in line or len(line) > MAILBOX_LINE_MAX:
            raise ConfigError("command", command, f"one program and its arguments, at most {MAILBOX_LINE_MAX} bytes")
        self._runs += 1
        started = time.perf_counter()
        console = bytearray()  # this run's console, also kept in memory for the report
        with self.log.open("ab") as log:
            log.write(f"=== sandbox run {self._runs}: {command}\n".encode())

            def to_log(chunk: bytes) -> None:
                log.write(chunk)
                console.extend(chunk)

            vmm = restore_vm(self.base, to_log, lazy=True, track_dirty=True)
            try:
                restored = time.perf_counter()
                kernel = GuestKernel(vmm.memory, self.profile)
                runner = self._waiting_runner(kernel)
                clean = self._check_clean_start(vmm)
                self._deliver(vmm.memory, kernel, runner, line)
                outcome = vmm.run(timeout)
                ran = time.perf_counter()
                report = self._analyse(vmm, kernel, runner, command, outcome.reason, outcome.exit_code,
                                       outcome.describe(), clean, log, console.decode(errors="replace"))
                analysed = time.perf_counter()
            finally:
                vmm.close()
        finished = time.perf_counter()
        return replace(report, restore_ms=(restored - started) * 1e3, run_ms=(ran - restored) * 1e3,
                       analyse_ms=(analysed - ran) * 1e3, cycle_ms=(finished - started) * 1e3)

    def _waiting_runner(self, kernel: GuestKernel) -> ProcessInfo:
        runners = [p for p in kernel.processes() if p.name == "runner" and p.state != "exited"]
        if len(runners) != 1:
            raise StateError(str(self.base), "is not a sandbox base: no runner waiting for a command "
                             "(make one with `pyrovisor sandbox --make-base DIR`)")
        return runners[0]

    def _check_clean_start(self, vmm: Vmm) -> int:
        """The pages the previous run changed must read as the base again: the revert really happened."""
        for page in self._previous_changes:
            if vmm.memory.read(page * PAGE, PAGE) != self._base_memory.read(page * PAGE, PAGE):
                raise StateError(str(self.base), f"page {page * PAGE:#x} kept a change from the previous run")
        return len(self._previous_changes)

    def _deliver(self, memory: GuestMemory, kernel: GuestKernel, runner: ProcessInfo, line: bytes) -> None:
        mailbox = kernel.translate(self.profile.constant("USER_MMAP_BASE"), runner.cr3)
        if memory.read_u32(mailbox) != RUNNER_MAGIC:
            raise StateError(str(self.base), "the runner's mailbox has no magic word")
        memory.write(mailbox + MAILBOX_LINE_OFFSET, line)
        memory.write(mailbox + MAILBOX_LENGTH_OFFSET, len(line).to_bytes(4, "little"))  # last: the runner starts

    def _analyse(self, vmm: Vmm, kernel: GuestKernel, runner: ProcessInfo, command: str, reason: StopReason,
                 vm_exit_code: int | None, description: str, clean: int, log: BinaryIO,
                 console: str) -> SandboxReport:
        assert vmm.snapshot_log is not None
        written = vmm.snapshot_log.collect_pages()
        changed = changed_pages(written, vmm.memory, self._base_memory)
        self._previous_changes = changed
        owners = user_owners(kernel, changed)
        children = [p for p in kernel.processes() if p.parent == runner.pid]
        program = children[0] if children else None
        if reason is StopReason.GUEST_EXIT:
            outcome = "exited"
        elif reason is StopReason.TIMEOUT:
            outcome = "timeout"
        else:
            outcome = f"error: {description}"
        why = None if program is not None else why_not_started(console)
        suffix = "" if why is None else f"; the program did not start: {why}"
        log.write(f"=== {outcome}; {len(changed)} pages changed{suffix}\n".encode())
        return SandboxReport(
            run=self._runs, command=command, outcome=outcome, vm_exit_code=vm_exit_code,
            program_pid=program.pid if program else None, program_exit_code=program.exit_code if program else None,
            pages_written=len(written), pages_changed=len(changed), ranges=merge_ranges(changed, owners),
            clean_start_pages=clean, restore_ms=0.0, run_ms=0.0, analyse_ms=0.0, cycle_ms=0.0, log=str(self.log),
            user_pages=user_pages_by_pid(owners), start_error=why)
