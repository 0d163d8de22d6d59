"""Vmm: a built VM while it runs — start, wait, pause, resume, stop, close."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

from pyrovisor.config import MachineConfig
from pyrovisor.devices.bus import Bus, PortBus
from pyrovisor.devices.console import SerialConsole
from pyrovisor.devices.debug_exit import DebugExit
from pyrovisor.errors import PyrovisorError
from pyrovisor.kvm import Kvm
from pyrovisor.kvm.coalesced import CoalescedRing
from pyrovisor.loader import LoadResult
from pyrovisor.memory import GuestMemory
from pyrovisor.vstate.dirty import DirtyLog, DirtyTracker, RingSource
from pyrovisor.vstate.run_control import RunControl, RunOutcome, StopReason
from pyrovisor.vstate.vcpu import Vcpu
from pyrovisor.vstate.vm import Vm

JOIN_TIMEOUT = 10.0


@dataclass
class Vmm:
    """The running machine. Build it with `pyrovisor.builder.build_vm`; use it as a context manager."""

    config: MachineConfig
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    vcpus: list[Vcpu]
    port_bus: PortBus
    mmio_bus: Bus
    control: RunControl
    console: SerialConsole
    debug_exit: DebugExit
    kernel: LoadResult
    owns_kvm: bool = True
    started: bool = False
    closed: bool = False
    last_snapshot: tuple[Path, str] | None = None  # directory and id of the snapshot diffs apply to
    snapshot_log: DirtyLog | None = None  # pages written since the last snapshot (for diffs)
    dirty_rings: list[mmap.mmap] = field(default_factory=list)  # per vCPU, when dirty rings are configured
    coalesced: CoalescedRing | None = None
    dirty: DirtyTracker = field(init=False)

    def __post_init__(self) -> None:
        source = RingSource(self.vm, self.dirty_rings) if self.dirty_rings else None
        self.dirty = DirtyTracker(self.vm, self.memory, source)
        for vcpu in self.vcpus:
            vcpu.dirty_ring_full_handler = lambda _vcpu: self.dirty.harvest()

    def register_coalesced(self, address: int, length: int, pio: bool = False) -> None:
        """Let KVM buffer guest writes to [address, address+length) instead of exiting for each one.

        The device there must not need to answer immediately: reads still exit, and buffered writes
        reach it at the next exit (in order, before that exit is handled) or when the VM pauses.
        """
        self.vm.fd.register_coalesced_mmio(address, length, pio)
        if self.coalesced is None:
            self.coalesced = CoalescedRing(self.vcpus[0].fd.coalesced_mmio_ring())
            for vcpu in self.vcpus:
                vcpu.coalesced = self.coalesced

    def start(self) -> None:
        if self.started:
            raise PyrovisorError("the VM was already started")
        self.started = True
        for vcpu in self.vcpus:
            vcpu.start()

    def wait(self, timeout: float | None = None) -> RunOutcome | None:
        """The outcome once the VM stops, or None if `timeout` passes first."""
        return self.control.wait(timeout)

    def run(self, timeout: float | None = None) -> RunOutcome:
        """Start (unless already started), wait for the guest to stop or the timeout, stop every vCPU."""
        if not self.started:
            self.start()
        outcome = self.wait(timeout)
        if outcome is None:
            self.control.finish(RunOutcome(StopReason.TIMEOUT))
        self.join()
        result = self.control.outcome
        assert result is not None
        return result

    def pause(self, timeout: float = JOIN_TIMEOUT) -> bool:
        """Park every vCPU outside KVM_RUN; False if the VM had already stopped."""
        return self.control.pause(timeout)

    def resume(self) -> None:
        self.control.resume()

    @property
    def paused(self) -> bool:
        return self.control.paused

    @property
    def state(self) -> str:
        """created, running, paused or stopped."""
        if self.outcome is not None or self.closed:
            return "stopped"
        if not self.started:
            return "created"
        return "paused" if self.control.pause_requested else "running"

    @property
    def outcome(self) -> RunOutcome | None:
        return self.control.outcome

    def stop(self) -> RunOutcome:
        self.control.finish(RunOutcome(StopReason.HOST_STOP))
        self.join()
        result = self.control.outcome
        assert result is not None
        return result

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        for vcpu in self.vcpus:
            if not vcpu.join(timeout):
                raise PyrovisorError(f"vCPU {vcpu.index} did not stop within {timeout} s")

    def close(self) -> None:
        """Stop the guest and release vCPUs, the VM, guest memory and (if owned) /dev/kvm."""
        if self.closed:
            return
        if self.started:
            self.control.finish(RunOutcome(StopReason.HOST_STOP))
            self.join()
        self.dirty.source.release()
        if self.coalesced is not None:
            self.coalesced.close()
        for ring in self.dirty_rings:
            ring.close()
        for vcpu in self.vcpus:
            vcpu.fd.close()
        self.vm.close()
        self.memory.close()
        if self.owns_kvm:
            self.kvm.close()
        self.closed = True

    def __enter__(self) -> Vmm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
