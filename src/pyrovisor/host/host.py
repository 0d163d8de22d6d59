"""Host: many Vmms in one process under one memory budget, admitted by their minima and ballooned by a policy thread."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from pyrovisor.config import BalloonConfig, MachineConfig
from pyrovisor.errors import ConfigError, DeviceError, PyrovisorError
from pyrovisor.host.config import OVERHEAD_HEADROOM, HostSettings, VmSpec
from pyrovisor.host.policy import (
    PAGE_SIZE,
    BalloonWatch,
    Decision,
    GuestStats,
    VmInput,
    change_order,
    decide,
)
from pyrovisor.host.residency import children_private_rss_bytes, process_rss_bytes, resident_bytes
from pyrovisor.kvm import Kvm
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.run_control import RunOutcome, StopReason

if TYPE_CHECKING:
    from pyrovisor.wss.estimator import WorkingSetEstimator

log = logging.getLogger(__name__)

MiB = 1 << 20
HISTORY = 3600  # policy rounds kept for the API and benchmarks


class AdmissionError(PyrovisorError):
    """A VM cannot be admitted: its minimum does not fit beside the others' within the budget (nothing changed)."""


class UnknownVmError(PyrovisorError):
    """No VM has this id."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        super().__init__(f"no VM with id {vm_id!r}")


@dataclass(frozen=True)
class VmSample:
    """One VM as the API, the metrics and the live view show it (bytes)."""

    vm_id: str
    guest: str
    state: str
    detail: str
    configured: int
    minimum: int
    shares: float
    allocation: int  # what the policy (or the operator) lets it hold
    pinned: bool  # the operator set its target by hand
    floor: int
    balloon_target: int
    balloon_actual: int
    driver_ready: bool
    resident: int
    working_set: int | None
    working_set_low: int | None
    working_set_high: int | None
    working_set_latest: int | None
    wss_faults_per_s: float | None
    guest_free: int | None
    guest_available: int | None
    guest_caches: int | None
    guest_total: int | None
    ignored: int  # balloon requests this guest ignored
    reclaims: int  # times the guest took pages back from its balloon (out of memory)
    unresponsive: bool
    start_s: float  # building and starting it took this long
    uptime_s: float
    log: str


@dataclass(frozen=True)
class HostSample:
    budget: int
    available: int  # for guests: budget minus the host's own overhead
    overhead: int
    committed: int  # the minima (or pinned / frozen amounts) of the running VMs
    rss: int  # this process's resident memory
    helpers_rss: int  # the fault servers' private memory
    guest_resident: int
    allocated: int
    pressure: bool
    policy: str
    running: int
    vms: int
    rounds: int
    notes: tuple[str, ...]


class HostedVm:
    """One VM of the host: its Vmm, console log, working-set estimator, balloon and policy state."""

    def __init__(self, spec: VmSpec, vmm: Vmm, console_log: IO[bytes], start_s: float) -> None:
        from pyrovisor.devices.virtio.balloon import find_balloon

        self.spec = spec
        self.vmm = vmm
        self.console_log = console_log
        self.start_s = start_s
        self.started_at = time.monotonic()
        balloon = find_balloon(vmm.devices)
        if balloon is None:
            raise DeviceError(spec.vm_id, "the VM was built without its balloon")
        self.balloon = balloon
        self.estimator: WorkingSetEstimator | None = None
        self.allocation = spec.memory_size
        self.floor = spec.minimum
        self.pinned: int | None = None
        self.watch = BalloonWatch(0.0)
        self.state = "running"
        self.detail = ""
        self.closed = False
        self._close_lock = threading.Lock()  # the policy thread (a guest that stopped) and a stop request may race

    @property
    def vm_id(self) -> str:
        return self.spec.vm_id

    @property
    def running(self) -> bool:
        return not self.closed

    def working_set(self) -> tuple[int | None, int | None, int | None, int | None, float | None]:
        """(working set, CI low, CI high, latest interval, faults/s) from the estimator, all None before it has
        one. The working set is the larger of the fast and slow averages, or the latest interval when growth puts it
        higher still (so growth is answered within the interval that saw it)."""
        estimate = self.estimator.latest if self.estimator is not None else None
        if estimate is None:
            return None, None, None, None, None
        return (max(estimate.working_set_bytes, estimate.estimate_bytes), estimate.low_bytes, estimate.high_bytes,
                estimate.estimate_bytes, estimate.faults_per_s)

    def guest_stats(self) -> GuestStats | None:
        stats = self.balloon.stats
        if stats is None:
            return None
        return GuestStats(total=stats.total, free=stats.free, available=stats.available, caches=stats.caches,
                          age_s=max(0.0, time.time() - stats.arrived))

    def held(self) -> int:
        return self.spec.memory_size - self.balloon.actual_pages * PAGE_SIZE

    def policy_input(self, backoff_s: float) -> VmInput:
        """What the policy sees: a pinned VM holds exactly its pinned amount; one that ignores its balloon, or just
        took pages back from it (out of memory), is not shrunk below what it holds."""
        working_set = self.working_set()[0]
        spec = self.spec
        if self.pinned is not None:
            return VmInput(self.vm_id, spec.shares, spec.memory_size, spec.minimum, self.pinned, working_set,
                           fixed=True)
        held = self.held()
        minimum = spec.minimum
        if self.watch.backing_off(time.monotonic(), backoff_s):
            minimum = max(minimum, min(held, spec.memory_size))
        return VmInput(self.vm_id, spec.shares, spec.memory_size, minimum, held, working_set,
                       responsive=not self.watch.unresponsive, stats=self.guest_stats())

    def commitment(self) -> int:
        """What admission counts for this VM: its minimum, or what it is fixed at (pinned, or ignoring its balloon)."""
        if self.pinned is not None:
            return self.pinned
        if self.watch.unresponsive:
            return max(self.spec.minimum, self.held())
        return self.spec.minimum

    def set_allocation(self, allocation: int, now: float) -> None:
        self.allocation = allocation
        target = max(0, self.spec.memory_size - allocation) // PAGE_SIZE
        self.balloon.set_target(target)
        self.watch.requested(target, self.balloon.actual_pages, now)

    def sample(self) -> VmSample:
        spec = self.spec
        ws, low, high, latest, faults = self.working_set() if not self.closed else (None,) * 5
        stats = self.guest_stats() if not self.closed else None
        status = self.balloon.status() if not self.closed else None
        resident = 0
        if not self.closed:
            try:
                resident = resident_bytes(self.vmm.memory.regions)
            except OSError:
                resident = 0
        return VmSample(
            vm_id=self.vm_id, guest=spec.guest, state=self.state, detail=self.detail, configured=spec.memory_size,
            minimum=spec.minimum, shares=spec.shares, allocation=self.allocation, pinned=self.pinned is not None,
            floor=self.floor, balloon_target=status.target_pages * PAGE_SIZE if status else 0,
            balloon_actual=status.actual_pages * PAGE_SIZE if status else 0,
            driver_ready=status.driver_ready if status else False, resident=resident, working_set=ws,
            working_set_low=low, working_set_high=high, working_set_latest=latest, wss_faults_per_s=faults,
            guest_free=stats.free if stats else None, guest_available=stats.available if stats else None,
            guest_caches=stats.caches if stats else None, guest_total=stats.total if stats else None,
            ignored=self.watch.ignored, reclaims=self.watch.reclaims, unresponsive=self.watch.unresponsive, start_s=self.start_s,
            uptime_s=time.monotonic() - self.started_at, log=str(spec.log))

    def helper_pids(self) -> list[int]:
        pid = self.estimator.sampler.server_pid if self.estimator is not None else None
        return [pid] if pid is not None else []

    def close(self) -> str:
        """Stop the guest and release everything; the problems met, if any, as one line."""
        with self._close_lock:
            if self.closed:
                return ""
            self.closed = True
        problems = []
        if self.estimator is not None:
            try:
                self.estimator.close()
            except Exception as exc:
                problems.append(f"working-set estimator: {exc}")
        try:
            self.vmm.close()
        except Exception as exc:
            problems.append(str(exc))
        try:
            self.console_log.close()
        except OSError as exc:
            problems.append(f"console log: {exc.strerror}")
        return "; ".join(problems)


@dataclass(frozen=True)
class PolicyRound:
    """One policy decision, kept for the API and the benchmarks."""

    at: float
    decision: Decision
    rss: int


class Host:
    """Runs VMs under `settings.budget`. Thread-safe: API threads create and stop VMs while the policy thread runs.

    Build it on the main thread (it installs the vCPU kick handler there); afterwards VMs can be created from any
    thread. `close()` stops every VM."""

    def __init__(self, settings: HostSettings, on_event: Callable[[str], None] | None = None,
                 on_console: Callable[[str, bytes], None] | None = None) -> None:
        from pyrovisor.vstate.vcpu import install_kick_handler

        install_kick_handler()
        settings.policy.validate()
        self.settings = settings
        self.kvm = Kvm()
        self.vms: dict[str, HostedVm] = {}
        self._lock = threading.RLock()  # the VM table, allocations, watches
        self._create_lock = threading.Lock()  # admission and building, one VM at a time
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._on_event = on_event or (lambda message: log.info("%s", message))
        self._on_console = on_console  # (vm id, bytes): a copy of every console write (benchmarks timestamp lines)
        base = settings.overhead
        self.base_overhead = base if base is not None else process_rss_bytes() + OVERHEAD_HEADROOM
        self.history: deque[PolicyRound] = deque(maxlen=HISTORY)
        self.rounds = 0
        self.last: Decision | None = None
        settings.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._policy_loop, name="host-policy", daemon=True)
        self._thread.start()

    # --- budget ------------------------------------------------------------------------------------------------------
    def overhead(self, vm_count: int | None = None) -> int:
        count = len(self._running()) if vm_count is None else vm_count
        return self.base_overhead + count * self.settings.overhead_per_vm

    def available(self, vm_count: int | None = None) -> int:
        """Memory for guests: the budget less the host's own overhead."""
        return max(0, self.settings.budget - self.overhead(vm_count))

    def _running(self) -> list[HostedVm]:
        return [vm for vm in self.vms.values() if vm.running]

    def check_admission(self, spec: VmSpec) -> None:
        """Refuse `spec` if its minimum does not fit beside the others' within the budget."""
        with self._lock:
            running = self._running()
            available = self.available(len(running) + 1)
            committed = sum(vm.commitment() for vm in running)
        if committed + spec.minimum > available:
            raise AdmissionError(
                f"cannot admit VM {spec.vm_id!r}: its minimum of {spec.minimum >> 20} MiB does not fit: the budget of "
                f"{self.settings.budget >> 20} MiB less the host's overhead ({self.overhead(len(running) + 1) >> 20} "
                f"MiB) leaves {available >> 20} MiB, and the {len(running)} running VM(s) are committed "
                f"{committed >> 20} MiB")

    # --- VMs ---------------------------------------------------------------------------------------------------------
    def create(self, spec: VmSpec) -> HostedVm:
        """Admit, build and start a VM (its balloon target set before its first instruction)."""
        if self._stopping.is_set():
            raise PyrovisorError("the host is shutting down")
        with self._create_lock:
            with self._lock:
                if spec.vm_id in self.vms:
                    raise ConfigError("vm id", spec.vm_id, "already in use (stop it first)")
            self.check_admission(spec)
            hosted = self._build(spec)
            with self._lock:
                self.vms[spec.vm_id] = hosted
                now = time.monotonic()
                hosted.watch = BalloonWatch(self.settings.policy.balloon_timeout_s,
                                            self.settings.policy.reclaim_backoff_s)
                decision = self._decide()
                hosted.floor = decision.floors[spec.vm_id]
                hosted.set_allocation(decision.allocations[spec.vm_id], now)
            try:
                self._start(hosted)
            except BaseException:
                with self._lock:
                    self.vms.pop(spec.vm_id, None)
                hosted.close()
                raise
        self._wake.set()  # the others make room now
        self._on_event(f"{spec.vm_id}: started ({spec.guest}, {spec.memory_size >> 20} MiB, allowed "
                       f"{hosted.allocation >> 20} MiB) in {hosted.start_s * 1000:.0f} ms")
        return hosted

    def _build(self, spec: VmSpec) -> HostedVm:
        from pyrovisor.builder import build_vm

        started = time.perf_counter()
        config = MachineConfig(kernel=spec.kernel, memory_size=spec.memory_size, vcpus=spec.vcpus, cmdline=spec.args,
                               initrd=spec.initrd, huge_pages=spec.huge_pages, disks=spec.disks,
                               balloon=BalloonConfig(stats_interval_s=spec.stats_interval_s))
        assert spec.log is not None
        spec.log.parent.mkdir(parents=True, exist_ok=True)
        console_log = open(spec.log, "ab", buffering=0)  # noqa: SIM115 (owned by the HostedVm)

        tap = self._on_console

        def console(data: bytes) -> None:
            console_log.write(data)
            if tap is not None:
                tap(spec.vm_id, data)

        try:
            vmm = build_vm(config, console, kvm=self.kvm)
        except BaseException:
            console_log.close()
            raise
        try:
            return HostedVm(spec, vmm, console_log, time.perf_counter() - started)
        except BaseException:
            vmm.close()
            console_log.close()
            raise

    def _start(self, hosted: HostedVm) -> None:
        started = time.perf_counter()
        hosted.vmm.start()
        sampling = self.settings.sampling
        if sampling.enabled:
            from pyrovisor.wss.estimator import WorkingSetEstimator, WssSettings

            def grown(_estimate: object) -> None:
                if self._needs_more(hosted):
                    self._wake.set()

            estimator = WorkingSetEstimator(hosted.vmm, WssSettings(sample_pages=sampling.sample_pages,
                                                                    interval_s=sampling.interval_s), on_estimate=grown)
            hosted.estimator = estimator
            estimator.start()
        hosted.start_s += time.perf_counter() - started

    def _needs_more(self, hosted: HostedVm) -> bool:
        """The VM's working set (plus margin) is above what it may hold: answer at once, not at the next round."""
        ws = hosted.working_set()[0]
        if ws is None or hosted.pinned is not None:
            return False
        policy = self.settings.policy
        wanted = min(hosted.spec.memory_size, ws * (1 + policy.margin_fraction) + policy.margin_bytes)
        return wanted > hosted.allocation + policy.min_move_bytes / 2

    def get(self, vm_id: str) -> HostedVm:
        with self._lock:
            hosted = self.vms.get(vm_id)
        if hosted is None:
            raise UnknownVmError(vm_id)
        return hosted

    def stop(self, vm_id: str) -> str:
        """Stop a VM and forget it; the others keep running. Returns how it ended."""
        with self._lock:
            hosted = self.vms.pop(vm_id, None)
        if hosted is None:
            raise UnknownVmError(vm_id)
        if hosted.running:
            problems = hosted.close()
            hosted.state = "stopped"
            hosted.detail = problems or "stopped by the host"
            self._on_event(f"{vm_id}: stopped" + (f" ({problems})" if problems else ""))
        self._wake.set()
        return hosted.state

    def pin(self, vm_id: str, memory: int | None) -> HostedVm:
        """Set by hand how much a VM may hold (None: the policy decides again). Refused (AdmissionError) when the
        others' minima would no longer fit beside it."""
        hosted = self.get(vm_id)
        if not hosted.running:
            raise PyrovisorError(f"VM {vm_id!r} is {hosted.state}")
        with self._lock:
            if memory is not None:
                spec = hosted.spec
                if not spec.minimum <= memory <= spec.memory_size:
                    raise ConfigError("memory target", f"{memory >> 20} MiB", f"between the VM's minimum "
                                      f"({spec.minimum >> 20} MiB) and its memory ({spec.memory_size >> 20} MiB)")
                others = sum(vm.commitment() for vm in self._running() if vm is not hosted)
                available = self.available()
                if others + memory > available:
                    raise AdmissionError(f"cannot pin VM {vm_id!r} at {memory >> 20} MiB: the other VMs are committed "
                                         f"{others >> 20} MiB of the {available >> 20} MiB for guests")
                hosted.pinned = memory
                hosted.set_allocation(memory, time.monotonic())
            else:
                hosted.pinned = None
        self._wake.set()
        return hosted

    # --- the policy --------------------------------------------------------------------------------------------------
    def _decide(self) -> Decision:
        running = self._running()
        current = {vm.vm_id: vm.allocation for vm in running}
        policy = self.settings.policy
        return decide([vm.policy_input(policy.reclaim_backoff_s) for vm in running], self.available(len(running)),
                      policy, current)

    def run_policy(self) -> Decision:
        """One round: reap VMs that stopped by themselves, watch balloons, decide, apply (raises before cuts)."""
        self._reap()
        now = time.monotonic()
        with self._lock:
            for vm in self._running():
                reclaims = vm.watch.reclaims
                vm.watch.observe(vm.balloon.actual_pages, now)
                if vm.watch.reclaims > reclaims:
                    vm.detail = (f"took pages back from its balloon (out of memory, {vm.watch.reclaims} times): not "
                                 f"shrunk for {self.settings.policy.reclaim_backoff_s:g} s")
                if vm.watch.unresponsive and vm.watch.ignored and not vm.detail.startswith("ignores"):
                    vm.detail = (f"ignores its balloon: target {vm.watch.target} pages, still at "
                                 f"{vm.balloon.actual_pages} after {self.settings.policy.balloon_timeout_s:g} s")
                    self._on_event(f"{vm.vm_id}: {vm.detail}")
                elif not vm.watch.unresponsive and vm.detail.startswith("ignores"):
                    vm.detail = ""
            decision = self._decide()
            current = {vm.vm_id: vm.allocation for vm in self._running()}
            for vm_id in change_order(current, decision.allocations):
                vm = self.vms[vm_id]
                if vm.pinned is not None:
                    continue  # the operator's amount
                if vm.watch.unresponsive and decision.allocations[vm_id] < vm.held():
                    continue  # a guest that does not inflate: its request stays; only a raise (a deflate) goes out
                try:
                    vm.set_allocation(decision.allocations[vm_id], now)
                except PyrovisorError as exc:
                    vm.detail = f"balloon: {exc}"
            for vm in self._running():
                vm.floor = decision.floors.get(vm.vm_id, vm.floor)
            self.last = decision
            self.rounds += 1
        self.history.append(PolicyRound(time.time(), decision, process_rss_bytes()))
        return decision

    def _reap(self) -> None:
        """VMs that stopped on their own (guest exit, crash): release them, keep their record."""
        with self._lock:
            ended = [vm for vm in self._running() if vm.vmm.outcome is not None]
        for vm in ended:
            outcome = vm.vmm.outcome
            assert outcome is not None
            problems = vm.close()
            vm.state = "failed" if _failed(outcome) else "exited"
            vm.detail = outcome.describe() + (f"; {problems}" if problems else "")
            self._on_event(f"{vm.vm_id}: {vm.state}: {vm.detail}")

    def _policy_loop(self) -> None:
        interval = self.settings.policy.interval_s
        while not self._stopping.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.run_policy()
            except Exception as exc:  # the policy must never take the host down
                log.exception("host policy round failed")
                self._on_event(f"host: policy round failed: {exc!r}")

    # --- views ---------------------------------------------------------------------------------------------------------
    def samples(self) -> list[VmSample]:
        with self._lock:
            vms = list(self.vms.values())
        return [vm.sample() for vm in vms]

    def host_sample(self, samples: list[VmSample] | None = None) -> HostSample:
        samples = self.samples() if samples is None else samples
        with self._lock:
            running = self._running()
            pids = sorted({pid for vm in running for pid in vm.helper_pids()})  # one fault server for all VMs
            committed = sum(vm.commitment() for vm in running)
            last = self.last
        return HostSample(
            budget=self.settings.budget, available=self.available(len(running)), overhead=self.overhead(len(running)),
            committed=committed, rss=process_rss_bytes(), helpers_rss=children_private_rss_bytes(pids),
            guest_resident=sum(s.resident for s in samples), allocated=sum(s.allocation for s in samples
                                                                             if s.state == "running"),
            pressure=bool(last and last.pressure), policy=self.settings.policy.kind, running=len(running),
            vms=len(samples), rounds=self.rounds, notes=last.notes if last else ())

    # --- the end -----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the policy and every VM (in parallel: each waits for its vCPUs), then release /dev/kvm."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(10.0)
        with self._lock:
            vms = list(self.vms.values())
        threads = [threading.Thread(target=vm.close, name=f"close-{vm.vm_id}") for vm in vms if vm.running]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30.0)
        self.kvm.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _failed(outcome: RunOutcome) -> bool:
    if outcome.reason is StopReason.GUEST_EXIT:
        return outcome.exit_code != 0
    return outcome.error is not None or outcome.reason in (StopReason.SHUTDOWN, StopReason.ERROR)

