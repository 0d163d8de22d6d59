"""WorkingSetEstimator: one VM's active working set, estimated every interval from the host by page sampling,
with a confidence interval, fast and slow moving averages (ESX uses the largest of them and the current
estimate) and its own cost."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.confine.policy import enter_thread, start_thread
from pyrovisor.errors import ConfigError, PyrovisorError
from pyrovisor.memory.userfault import PAGE_SIZE
from pyrovisor.vmm import Vmm
from pyrovisor.wss.sampler import PageSampler
from pyrovisor.wss.statistics import MovingAverage, wilson_interval

log = logging.getLogger(__name__)

HISTORY = 600


@dataclass(frozen=True)
class WssSettings:
    sample_pages: int = 1000
    interval_s: float = 1.0
    fast_weight: float = 0.5  # each new interval moves the fast average half way
    slow_weight: float = 0.1
    seed: int | None = None

    def validate(self) -> None:
        if not 16 <= self.sample_pages <= 65536:
            raise ConfigError("sample pages", self.sample_pages, "between 16 and 65536")
        if not 0.05 <= self.interval_s <= 3600:
            raise ConfigError("sampling interval", self.interval_s, "between 0.05 and 3600 seconds")
        for name, weight in (("fast weight", self.fast_weight), ("slow weight", self.slow_weight)):
            if not 0 < weight <= 1:
                raise ConfigError(name, weight, "between 0 (exclusive) and 1")


@dataclass(frozen=True)
class WorkingSetEstimate:
    """One interval's estimate, in bytes of guest RAM, with what it cost."""

    at: float  # time.time() at the end of the interval
    interval_s: float
    sampled: int
    touched: int
    estimate_bytes: int
    low_bytes: int  # 95 % confidence interval
    high_bytes: int
    fast_bytes: int
    slow_bytes: int
    faults_per_s: float  # sampled pages touched per second (each one fault)
    handler_cpu_s: float  # the fault server's CPU time in the interval
    held_s: float  # how long the guest was paused to arm and disarm the sample
    sampler_cpu_s: float  # this process's CPU time to arm and disarm

    @property
    def working_set_bytes(self) -> int:
        """What ESX uses (Waldspurger, OSDI 2002): the largest of the slow average, the fast average and this
        interval's estimate — it follows growth at once and forgets slowly."""
        return max(self.fast_bytes, self.slow_bytes, self.estimate_bytes)


class WorkingSetEstimator:
    """Runs intervals on its own thread until stopped; the latest estimate and a history are kept."""

    def __init__(self, vmm: Vmm, settings: WssSettings | None = None,
                 on_estimate: Callable[[WorkingSetEstimate], None] | None = None) -> None:
        self.settings = settings or WssSettings()
        self.settings.validate()
        self.vmm = vmm
        self.sampler = PageSampler(vmm.memory, self.settings.sample_pages, self.settings.seed)
        self.total_bytes = self.sampler.total_pages * PAGE_SIZE
        self._fast = MovingAverage(self.settings.fast_weight)
        self._slow = MovingAverage(self.settings.slow_weight)
        self.history: deque[WorkingSetEstimate] = deque(maxlen=HISTORY)
        self._on_estimate = on_estimate
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    @property
    def latest(self) -> WorkingSetEstimate | None:
        return self.history[-1] if self.history else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wss", daemon=True)
        start_thread(self._thread)  # from an unconfined thread, so it can confine itself as "wss"

    def _run(self) -> None:
        enter_thread("wss", self.vmm.stop_for_violation)
        while not self._stop.is_set():
            try:
                estimate = self.measure_once()
            except (PyrovisorError, OSError) as exc:
                if self.vmm.state.terminal:
                    return
                self.error = str(exc)
                log.warning("working-set estimator: %s", exc)
                self._stop.wait(self.settings.interval_s)
                continue
            if estimate is not None and self._on_estimate is not None:
                self._on_estimate(estimate)

    def measure_once(self) -> WorkingSetEstimate | None:
        """Arm a sample (guest held briefly), wait one interval, disarm (held again), estimate."""
        settings = self.settings
        cpu_before, server_before = time.process_time(), self.sampler.server_cpu_seconds()
        with self.vmm.paused("working-set sampling"):
            arm_s = self.sampler.arm(settings.sample_pages)
        cpu_armed = time.process_time()
        started = time.monotonic()
        if self._stop.wait(settings.interval_s):
            with self.vmm.paused("working-set sampling"):
                self.sampler.disarm()
            return None
        cpu_disarm = time.process_time()
        with self.vmm.paused("working-set sampling"):
            result, disarm_s = self.sampler.disarm()
        elapsed = time.monotonic() - started
        sampler_cpu = (cpu_armed - cpu_before) + (time.process_time() - cpu_disarm)
        fraction = result.touched / result.sampled
        low, high = wilson_interval(result.touched, result.sampled)
        total = self.total_bytes
        estimate = WorkingSetEstimate(
            at=time.time(), interval_s=elapsed, sampled=result.sampled, touched=result.touched,
            estimate_bytes=round(fraction * total), low_bytes=round(low * total),
            high_bytes=round(high * total), fast_bytes=round(self._fast.update(fraction * total)),
            slow_bytes=round(self._slow.update(fraction * total)),
            faults_per_s=result.touched / elapsed if elapsed else 0.0,
            handler_cpu_s=self.sampler.server_cpu_seconds() - server_before, held_s=arm_s + disarm_s,
            sampler_cpu_s=sampler_cpu)
        self.history.append(estimate)
        return estimate

    def close(self) -> None:
        """Stop, and leave the guest's memory whole (sampled pages put back) before returning."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(max(5.0, 2 * self.settings.interval_s))
        try:
            if self.sampler.armed and not self.vmm.closed:
                try:
                    with self.vmm.paused("working-set sampling"):
                        self.sampler.disarm()
                except PyrovisorError:  # the VM stopped: nothing runs, the pages can go back as they are
                    self.sampler.disarm()
        finally:
            self.sampler.close()
