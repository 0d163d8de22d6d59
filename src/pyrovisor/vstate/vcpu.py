"""Vcpu: one vCPU thread running KVM_RUN in a loop and routing its exits to the buses."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from pyrovisor.confine.policy import enter_thread
from pyrovisor.devices.bus import Bus
from pyrovisor.errors import GuestError, PyrovisorError, SeccompViolation
from pyrovisor.kvm import Kvm, VcpuFd
from pyrovisor.kvm.coalesced import CoalescedRing
from pyrovisor.kvm.exits import (
    Debug,
    DirtyRingFull,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    VcpuExit,
)
from pyrovisor.kvm.vcpu import CR3_WORD
from pyrovisor.vstate.run_control import RunControl, RunOutcome, StopReason
from pyrovisor.vstate.vcpu_state import VcpuState, complete_pending_io, restore_vcpu, save_vcpu

if TYPE_CHECKING:
    from pyrovisor.introspect.accounting import VcpuAccount

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN

_this_thread = threading.local()  # .vcpu: the Vcpu whose thread this is (exit handlers read its registers)


def current_vcpu() -> Vcpu | None:
    """The vCPU whose thread is running this code (an MMIO handler asking who trapped), or None."""
    vcpu: Vcpu | None = getattr(_this_thread, "vcpu", None)
    return vcpu


def _ignore_kick(signum: int, frame: object) -> None:
    return None


def install_kick_handler() -> None:
    """A handler for the kick signal, so that it interrupts KVM_RUN instead of killing the process.

    Python only installs handlers from the main thread; the first VM must be built there.
    """
    if signal.getsignal(KICK_SIGNAL) is _ignore_kick:
        return
    if threading.current_thread() is not threading.main_thread():
        raise PyrovisorError("the first VM must be created from the main thread (it installs the vCPU kick signal handler)")
    signal.signal(KICK_SIGNAL, _ignore_kick)


@dataclass
class ExitCounters:
    """Exits this vCPU handled in userspace, by kind."""

    io: int = 0
    mmio: int = 0
    interrupted: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.io + self.mmio + self.interrupted + self.other


DebugHandler = Callable[["Vcpu", Debug], bool]  # returns True to keep running


@dataclass(frozen=True)
class VcpuArgs:
    """What a Vcpu is built from besides its saved state: its fd, the buses, the run control."""

    index: int
    fd: VcpuFd
    port_bus: Bus
    mmio_bus: Bus
    control: RunControl
    kvm: Kvm
    msr_indices: tuple[int, ...]  # the MSRs saved with the vCPU (KVM_GET_MSR_INDEX_LIST)


class Vcpu:
    """A vCPU and its thread. Exits go to the port and MMIO buses; the run control stops and pauses it."""

    def __init__(self, args: VcpuArgs) -> None:
        self.index = args.index
        self.fd = args.fd
        self.port_bus = args.port_bus
        self.mmio_bus = args.mmio_bus
        self.control = control = args.control
        self._args = args
        self.counters = ExitCounters()
        self.debug_handler: DebugHandler | None = None
        self.dirty_ring_full_handler: Callable[[Vcpu], None] | None = None
        self.coalesced: CoalescedRing | None = None  # set when a coalesced MMIO/PIO zone is registered
        self._thread: threading.Thread | None = None
        self.entered_run_loop_at: float | None = None  # perf_counter() when the thread began running the guest
        self.host_cpus: frozenset[int] = frozenset()  # --stealth: the host CPUs this vCPU's thread is pinned to
        self.account: VcpuAccount | None = None  # per-process exit accounting (set while parked or not started)
        control.register(self.kick)

    # --- persistence (only while parked or never started) ----------------------------------------
    def save(self) -> VcpuState:
        return save_vcpu(self.fd, self._args.msr_indices)

    @classmethod
    def restore(cls, args: VcpuArgs, state: VcpuState) -> Self:
        restore_vcpu(args.fd, state, args.kvm)
        return cls(args)

    # --- thread management ----------------------------------------------------------------------
    def start(self) -> None:
        install_kick_handler()
        self._thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self.control.vcpu_started()
        self._thread.start()

    def kick(self) -> None:
        """Make KVM_RUN return now (or immediately at its next entry)."""
        if self.fd.fd < 0:
            return
        self.fd.set_immediate_exit(True)
        thread = self._thread
        if thread is not None and thread.is_alive() and thread.ident is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _thread_main(self) -> None:
        self.entered_run_loop_at = time.perf_counter()
        _this_thread.vcpu = self
        try:
            if self.host_cpus:  # before the filter loads: sched_setaffinity is not on the vcpu allow list
                os.sched_setaffinity(0, self.host_cpus)
            enter_thread("vcpu", self._denied)
            self.run_loop()
        except PyrovisorError as exc:
            self.control.finish(RunOutcome(StopReason.ERROR, error=exc, vcpu=self.index))
        except Exception as exc:  # a VMM bug: report it as an error outcome, never crash the host
            log.error("vCPU %d crashed:\n%s", self.index, traceback.format_exc())
            self.control.finish(RunOutcome(StopReason.ERROR, vcpu=self.index,
                                           error=GuestError(self.index, "VMM internal error", repr(exc))))
        finally:
            self.control.vcpu_finished()

    def _denied(self, violation: SeccompViolation) -> None:
        self.control.finish(RunOutcome(StopReason.ERROR, error=violation, vcpu=self.index), overrides_error=True)

    # --- the run loop -------------------------------------------------------------------------
    def run_loop(self) -> None:
        """Run until the control says stop; also callable directly on the current thread.

        Two variants of the loop: the plain one, and one that charges every exit to the guest process (see
        introspect/accounting.py). A switch between them happens while parked: each variant returns here when
        it leaves its park in the other mode, so the plain loop pays nothing for accounting."""
        while not self.control.stop_requested:
            account = self.account
            if account is None:
                self.fd.share_sregs(False)
                self._run_plain()
            else:
                self.fd.share_sregs(True)
                self._run_accounted(account)

    def _run_plain(self) -> None:
        control = self.control
        run = self.fd.run
        port_read = self.port_bus.read
        port_write = self.port_bus.write
        mmio_read = self.mmio_bus.read
        mmio_write = self.mmio_bus.write
        counters = self.counters
        while not control.stop_requested:
            if control.pause_requested:
                complete_pending_io(self.fd)  # so state read while parked is consistent
                self.apply_coalesced()  # devices must have seen every buffered write before a snapshot
                control.park()
                if self.account is not None:
                    return
                continue
            vm_exit = run()
            if self.coalesced is not None and self.coalesced.pending():
                self.apply_coalesced()  # buffered writes happened before this exit
            if isinstance(vm_exit, IoOut):
                counters.io += 1
                size, data = vm_exit.size, vm_exit.data
                if len(data) == size:
                    port_write(vm_exit.port, size, int.from_bytes(data, "little"))
                else:
                    for start in range(0, len(data), size):
                        port_write(vm_exit.port, size, int.from_bytes(data[start:start + size], "little"))
            elif isinstance(vm_exit, IoIn):
                counters.io += 1
                for index in range(vm_exit.count):
                    vm_exit.respond(port_read(vm_exit.port, vm_exit.size), index)
            elif isinstance(vm_exit, MmioWrite):
                counters.mmio += 1
                mmio_write(vm_exit.address, len(vm_exit.data), int.from_bytes(vm_exit.data, "little"))
            elif isinstance(vm_exit, MmioRead):
                counters.mmio += 1
                vm_exit.respond(mmio_read(vm_exit.address, vm_exit.size))
            elif isinstance(vm_exit, Interrupted):
                counters.interrupted += 1
                self.fd.set_immediate_exit(False)
            else:
                counters.other += 1
                self._handle_rare_exit(vm_exit)

    def _run_accounted(self, account: VcpuAccount) -> None:
        """The plain loop plus, per exit: CR3 from kvm_run (KVM_SYNC_REGS, no ioctl), the owner's tally when CR3
        or the kernel's pid counter changed, and the thread CPU time spent handling the exit."""
        control = self.control
        run = self.fd.run
        port_read = self.port_bus.read
        port_write = self.port_bus.write
        mmio_read = self.mmio_bus.read
        mmio_write = self.mmio_bus.write
        counters = self.counters
        thread_time = time.thread_time_ns
        generation_gpa = account.accountant.generation_gpa
        with contextlib.ExitStack() as views:
            words = views.enter_context(self.fd.sregs_words())
            generation = None
            if generation_gpa is not None:
                raw = views.enter_context(account.accountant.memory_view(generation_gpa, 4))
                generation = views.enter_context(raw.cast("I"))
            last_cr3 = last_generation = -1
            exits: dict[tuple[str, int], list[int]] = {}
            while not control.stop_requested:
                if control.pause_requested:
                    complete_pending_io(self.fd)
                    self.apply_coalesced()
                    control.park()
                    if self.account is not account:
                        return
                    continue
                vm_exit = run()
                started = thread_time()
                cr3 = words[CR3_WORD]
                current_generation = generation[0] if generation is not None else 0
                if cr3 != last_cr3 or current_generation != last_generation:
                    exits = account.tally_for(cr3, current_generation)
                    last_cr3, last_generation = cr3, current_generation
                if self.coalesced is not None and self.coalesced.pending():
                    self.apply_coalesced()
                if isinstance(vm_exit, IoOut):
                    counters.io += 1
                    key = ("pio", vm_exit.port)
                    size, data = vm_exit.size, vm_exit.data
                    if len(data) == size:
                        port_write(vm_exit.port, size, int.from_bytes(data, "little"))
                    else:
                        for start in range(0, len(data), size):
                            port_write(vm_exit.port, size, int.from_bytes(data[start:start + size], "little"))
                elif isinstance(vm_exit, IoIn):
                    counters.io += 1
                    key = ("pio", vm_exit.port)
                    for index in range(vm_exit.count):
                        vm_exit.respond(port_read(vm_exit.port, vm_exit.size), index)
                elif isinstance(vm_exit, MmioWrite):
                    counters.mmio += 1
                    key = ("mmio", vm_exit.address)
                    mmio_write(vm_exit.address, len(vm_exit.data), int.from_bytes(vm_exit.data, "little"))
                elif isinstance(vm_exit, MmioRead):
                    counters.mmio += 1
                    key = ("mmio", vm_exit.address)
                    vm_exit.respond(mmio_read(vm_exit.address, vm_exit.size))
                elif isinstance(vm_exit, Interrupted):
                    counters.interrupted += 1
                    key = ("interrupted", 0)
                    self.fd.set_immediate_exit(False)
                else:
                    counters.other += 1
                    key = ("hlt", 0) if isinstance(vm_exit, Hlt) else ("other", self.fd.exit_reason)
                    self._handle_rare_exit(vm_exit)
                tally = exits.get(key)
                if tally is None:
                    tally = exits[key] = [0, 0]
                tally[0] += 1
                tally[1] += thread_time() - started

    def apply_coalesced(self) -> None:
        """Deliver the writes KVM buffered in the coalesced ring to the buses, oldest first."""
        if self.coalesced is None:
            return
        for write in self.coalesced.drain():
            bus = self.port_bus if write.pio else self.mmio_bus
            bus.write(write.address, len(write.data), int.from_bytes(write.data, "little"))

    def _handle_rare_exit(self, vm_exit: VcpuExit) -> None:
        finish = self.control.finish
        index = self.index
        if isinstance(vm_exit, Debug):
            if self.debug_handler is None or not self.debug_handler(self, vm_exit):
                finish(RunOutcome(StopReason.HOST_STOP, vcpu=index))
        elif isinstance(vm_exit, DirtyRingFull):
            if self.dirty_ring_full_handler is None:
                raise GuestError(index, "dirty ring full", "no handler harvests the dirty ring")
            self.dirty_ring_full_handler(self)
        elif isinstance(vm_exit, Hlt):
            finish(RunOutcome(StopReason.HALTED, vcpu=index))
        elif isinstance(vm_exit, Shutdown):
            finish(RunOutcome(StopReason.SHUTDOWN, vcpu=index,
                              error=GuestError(index, "shutdown", "triple fault or shutdown request")))
        elif isinstance(vm_exit, SystemEvent):
            finish(RunOutcome(StopReason.SHUTDOWN, vcpu=index,
                              error=GuestError(index, "system event", f"type {vm_exit.type}")))
        elif isinstance(vm_exit, InternalError):
            raise GuestError(index, "KVM internal error", vm_exit.describe() + self._where())
        elif isinstance(vm_exit, FailEntry):
            raise GuestError(index, "VM entry failed", f"hardware reason {vm_exit.hardware_reason:#x}")
        else:
            raise GuestError(index, "unexpected exit", repr(vm_exit) + self._where())

    def _where(self) -> str:
        try:
            regs = self.fd.get_regs()
        except PyrovisorError:
            return ""
        return f" at rip={regs.rip:#x}"
