"""Auto-converge: hold a VM's vCPUs paused for a fraction of every period, so it dirties memory slower."""

from __future__ import annotations

import threading
import time

from pyrovisor.confine.policy import enter_thread, start_thread
from pyrovisor.errors import PyrovisorError
from pyrovisor.vmm import Vmm

PERIOD_S = 0.02


class Throttler:
    """Duty-cycle pauses of every vCPU: held `fraction` of each 20 ms period while active.

    Each pause is a hold of its own, so releasing it never resumes a guest that someone else holds.
    """

    def __init__(self, vmm: Vmm) -> None:
        self._vmm = vmm
        self._fraction = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.paused_seconds = 0.0

    @property
    def fraction(self) -> float:
        return self._fraction

    def set(self, fraction: float) -> None:
        self._fraction = max(0.0, min(fraction, 0.999))
        if self._fraction > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._cycle, name="throttle", daemon=True)
            start_thread(self._thread)  # from an unconfined thread, so it can confine itself as "throttle"

    def _cycle(self) -> None:
        enter_thread("throttle", self._vmm.stop_for_violation)
        while not self._stop.is_set():
            fraction = self._fraction
            if fraction <= 0:
                self._stop.wait(PERIOD_S)
                continue
            self._stop.wait(PERIOD_S * (1 - fraction))
            if self._stop.is_set():
                break
            started = time.monotonic()
            try:
                hold = self._vmm.hold("throttle")
            except PyrovisorError:  # the VM stopped: nothing left to throttle
                break
            try:
                self._stop.wait(PERIOD_S * fraction)
            finally:
                hold.release()  # only this hold: a snapshot's or stop-and-copy's stays
            self.paused_seconds += time.monotonic() - started

    def stop(self) -> None:
        """End throttling; the VM is left running (not paused)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
