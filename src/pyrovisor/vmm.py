"""Vmm: a built VM while it runs — its lifecycle, devices, state capture and the release of everything it holds."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.config import BOOT_PYROVISOR, MachineConfig
from pyrovisor.confine.policy import current as current_confinement
from pyrovisor.devices.bus import Bus, PortBus
from pyrovisor.devices.console import SerialConsole
from pyrovisor.devices.debug_exit import DebugExit
from pyrovisor.devices.manager import DeviceManager
from pyrovisor.devices.platform import DEBUG_EXIT, SERIAL
from pyrovisor.errors import PyrovisorError, SeccompViolation
from pyrovisor.events.loop import EventLoop
from pyrovisor.kvm import Kvm
from pyrovisor.kvm.coalesced import CoalescedRing
from pyrovisor.loader import LoadResult
from pyrovisor.memory import GuestMemory
from pyrovisor.persist.machine import MachineState
from pyrovisor.vstate.dirty import DirtyLog, DirtyTracker
from pyrovisor.vstate.lifecycle import PAUSE_TIMEOUT_S, Lifecycle, Operation, VmState
from pyrovisor.vstate.run_control import PauseHold, RunControl, RunOutcome, StopReason
from pyrovisor.vstate.vcpu import Vcpu
from pyrovisor.vstate.vm import Vm
from pyrovisor.vstate.vm_state import KernelDevices

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 10.0


class Vmm:
    """The running machine. Build it with `pyrovisor.builder.build_vm` or `restore_vm`; use it as a
    context manager so `close()` releases everything.

    Whether the guest runs is decided by `lifecycle` alone: pause with `with vmm.paused(reason):` or
    a hold, the user's pause with `pause()`/`resume()`, snapshots and migration as operations.
    """

    def __init__(self, config: MachineConfig, kvm: Kvm, vm: Vm, memory: GuestMemory, vcpus: list[Vcpu],
                 devices: DeviceManager, control: RunControl, kernel: LoadResult, dirty: DirtyTracker,
                 loop: EventLoop) -> None:
        self.config = config
        self.kvm = kvm
        self.vm = vm
        self.memory = memory
        self.vcpus = vcpus
        self.devices = devices
        self.control = control
        self.kernel = kernel
        self.dirty = dirty
        self.loop = loop  # the I/O thread: device work; paused with the vCPUs by every hold
        self.lifecycle = Lifecycle(control, self._start_vcpus, loop)
        self.kernel_devices = KernelDevices(vm.fd)
        self.coalesced: CoalescedRing | None = None
        self.last_snapshot: tuple[Path, str] | None = None  # directory and id of the snapshot diffs apply to
        self.snapshot_log: DirtyLog | None = None  # pages written since the last snapshot (for diffs)
        self.closed = False
        self._resources = ExitStack()  # released in reverse order of acquisition by close()
        for vcpu in vcpus:
            vcpu.dirty_ring_full_handler = lambda _vcpu: dirty.harvest()
        loop.on_denied = self.stop_for_violation

    def stop_for_violation(self, violation: SeccompViolation) -> None:
        """A thread of this VM made a system call its seccomp filter refuses: stop with that as the outcome."""
        self.control.finish(RunOutcome(StopReason.ERROR, error=violation), overrides_error=True)

    def adopt(self, resources: ExitStack) -> None:
        """Take over what the builder acquired; `close()` releases it after everything added later."""
        self._resources.push(resources)

    def on_close(self, release: Callable[[], None]) -> None:
        """Release something attached to this VM (an estimator, a server) when it closes, before the VM's own
        resources (guest memory among them) are released."""
        self._resources.callback(release)

    # --- parts --------------------------------------------------------------------------------------
    @property
    def port_bus(self) -> PortBus:
        bus = self.devices.port_bus
        assert isinstance(bus, PortBus)
        return bus

    @property
    def mmio_bus(self) -> Bus:
        return self.devices.mmio_bus

    @property
    def console(self) -> SerialConsole:
        device = self.devices[SERIAL]
        assert isinstance(device, SerialConsole)
        return device

    @property
    def debug_exit(self) -> DebugExit:
        device = self.devices[DEBUG_EXIT]
        assert isinstance(device, DebugExit)
        return device

    def register_coalesced(self, address: int, length: int, pio: bool = False) -> None:
        """Let KVM buffer guest writes to [address, address+length) instead of exiting for each one.

        The device there must not need to answer immediately: reads still exit, and buffered writes
        reach it at the next exit (in order, before that exit is handled) or when the VM pauses.
        """
        self.vm.fd.register_coalesced_mmio(address, length, pio)
        if self.coalesced is None:
            self.coalesced = CoalescedRing(self.vcpus[0].fd.coalesced_mmio_ring())
            self._resources.callback(self.coalesced.close)  # before vCPU 0's kvm_run page is unmapped
            for vcpu in self.vcpus:
                vcpu.coalesced = self.coalesced

    # --- lifecycle ---------------------------------------------------------------------------------------
    @property
    def state(self) -> VmState:
        if self.closed and not self.lifecycle.state.terminal:
            return VmState.STOPPED
        return self.lifecycle.state

    @property
    def started(self) -> bool:
        return self.lifecycle.started

    @property
    def outcome(self) -> RunOutcome | None:
        return self.control.outcome

    def start(self) -> None:
        self.lifecycle.start()

    def _start_vcpus(self) -> None:
        current_confinement()  # the seccomp supervisor starts here (when confined), before the threads need it
        self.loop.start()
        for vcpu in self.vcpus:
            vcpu.start()

    def hold(self, reason: str, timeout: float = PAUSE_TIMEOUT_S) -> PauseHold:
        """Park the guest until the returned hold is released (other holds are not affected)."""
        return self.lifecycle.hold(reason, timeout)

    def paused(self, reason: str, timeout: float = PAUSE_TIMEOUT_S) -> contextlib.AbstractContextManager[PauseHold]:
        """`with vmm.paused("introspection"):` the guest stays parked inside the block."""
        return self.lifecycle.paused(reason, timeout)

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> VmState:
        """The user's pause (one hold however often asked); returns the resulting state."""
        return self.lifecycle.pause(timeout)

    def resume(self) -> VmState:
        """Release the user's pause; other holds (snapshot, migration) stay."""
        return self.lifecycle.resume()

    @property
    def is_parked(self) -> bool:
        """Every vCPU is parked outside KVM_RUN (or none was started) and some hold keeps it so."""
        return self.control.parked

    def operation(self, operation: Operation) -> contextlib.AbstractContextManager[None]:
        return self.lifecycle.operation_scope(operation)

    def wait(self, timeout: float | None = None) -> RunOutcome | None:
        """The outcome once the VM stops, or None if `timeout` passes first."""
        return self.control.wait(timeout)

    def run(self, timeout: float | None = None) -> RunOutcome:
        """Start (unless already started), wait for the guest to stop or the timeout, stop every vCPU."""
        if not self.started:
            self.start()
        if self.wait(timeout) is None:
            self.lifecycle.stop(RunOutcome(StopReason.TIMEOUT))
        self.join()
        result = self.control.outcome
        assert result is not None
        return result

    def request_stop(self, outcome: RunOutcome | None = None) -> None:
        """Ask the VM to stop without waiting (from any thread, signal handlers included)."""
        self.lifecycle.stop(outcome)

    def stop(self) -> RunOutcome:
        self.lifecycle.stop()
        self.join()
        result = self.control.outcome
        assert result is not None
        return result

    def join(self, timeout: float = JOIN_TIMEOUT) -> None:
        stuck = [vcpu.index for vcpu in self.vcpus if not vcpu.join(timeout)]
        if stuck:
            raise PyrovisorError(f"vCPU(s) {stuck} did not stop within {timeout} s")

    # --- state ----------------------------------------------------------------------------------------
    def save_state(self) -> MachineState:
        """The machine as snapshots and migration store it. The vCPUs must be parked or never started."""
        if self.started and not self.is_parked:
            raise PyrovisorError("the VM must be paused while its state is read")
        if self.config.boot_protocol != BOOT_PYROVISOR:
            raise PyrovisorError(f"a {self.config.boot_protocol} machine cannot be snapshotted or migrated yet "
                                 "(the state of its PIT is not saved)")
        return MachineState(
            config=self.config,
            kernel=self.kernel,
            ram=tuple(RamRange(region.gpa, region.size) for region in self.memory.regions),
            vm=self.kernel_devices.save(),
            vcpus=tuple(vcpu.save() for vcpu in self.vcpus),
            devices=self.devices.save(),
        )

    # --- release -----------------------------------------------------------------------------------------
    def close(self, join_timeout: float = JOIN_TIMEOUT) -> None:
        """Stop the guest and release every fd, mapping and thread it holds, even if a vCPU does not stop in
        time or a release step fails; then raise a PyrovisorError naming what went wrong, if anything did."""
        if self.closed:
            return
        self.closed = True
        problems: list[str] = []
        if self.started:
            self.lifecycle.stop()
            stuck = [vcpu.index for vcpu in self.vcpus if not vcpu.join(join_timeout)]
            if stuck:
                problems.append(f"vCPU(s) {stuck} did not stop within {join_timeout} s; their resources were "
                                "released anyway")
        try:
            if self.snapshot_log is not None:
                self.snapshot_log.close()
        except Exception as exc:
            problems.append(f"stopping dirty tracking: {exc}")
        try:
            self._resources.close()
        except Exception as exc:
            problems.append(f"releasing the VM: {exc}")
        if problems:
            raise PyrovisorError("; ".join(problems))

    def __enter__(self) -> Vmm:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        if value is None:
            self.close()
            return
        try:  # do not hide the exception that is already leaving the block
            self.close()
        except PyrovisorError as exc:
            log.error("while handling %s: %s", kind.__name__ if kind else "an error", exc)
            print(f"pyrovisor: {exc}", file=sys.stderr)

