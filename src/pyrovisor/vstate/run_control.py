"""Coordination between vCPU threads and their controller: stop, pause holds, parking and the outcome."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pyrovisor.errors import PyrovisorError


class StopReason(Enum):
    GUEST_EXIT = "guest exit"  # the guest wrote its exit code to the debug-exit port
    HALTED = "halted"  # HLT with no interrupt controller to wake it
    SHUTDOWN = "shutdown"  # triple fault or shutdown request
    HOST_STOP = "stopped by host"
    TIMEOUT = "timeout"
    MIGRATED = "migrated"  # the guest now runs on another host; this copy has stopped
    ERROR = "error"  # the guest did something the VMM cannot continue from


@dataclass(frozen=True)
class RunOutcome:
    reason: StopReason
    exit_code: int | None = None
    error: PyrovisorError | None = None
    vcpu: int | None = None

    def describe(self) -> str:
        if self.reason is StopReason.GUEST_EXIT:
            return f"guest exited with code {self.exit_code}"
        if self.error is not None:
            return str(self.error)
        return str(self.reason.value)


class HoldTimeout(Exception):
    """The vCPUs did not park in time; the hold that asked for it has already been withdrawn."""


class PauseHold:
    """One reason the vCPUs must stay parked. Release it once; the guest runs when no hold is left."""

    def __init__(self, control: RunControl, token: int, reason: str) -> None:
        self._control = control
        self.token = token
        self.reason = reason
        self.released = False
        self.on_release: list[Callable[[], None]] = []  # run once, after the hold is gone

    def release(self) -> None:
        self._control.release(self)

    def __repr__(self) -> str:
        return f"PauseHold({self.reason!r}{', released' if self.released else ''})"


class RunControl:
    """Shared by the vCPU threads of one VM.

    The vCPUs read `stop_requested` and `pause_requested` without the lock in their hot loop (a stale
    read only delays the reaction until the kick arrives); every change takes the lock, then kicks
    the vCPUs out of KVM_RUN. `pause_requested` is true exactly while at least one hold exists.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.stop_requested = False
        self.pause_requested = False
        self._holds: dict[int, PauseHold] = {}
        self._tokens = itertools.count(1)
        self._parked = 0
        self._running = 0
        self._outcome: RunOutcome | None = None
        self._kickers: list[Callable[[], None]] = []

    def register(self, kick: Callable[[], None]) -> None:
        self._kickers.append(kick)

    # --- called by vCPU threads -----------------------------------------------------------------
    def vcpu_started(self) -> None:
        with self._cond:
            self._running += 1

    def vcpu_finished(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def park(self) -> None:
        """Wait here while any hold exists."""
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while self.pause_requested and not self.stop_requested:
                self._cond.wait()
            self._parked -= 1

    def finish(self, outcome: RunOutcome, overrides_error: bool = False) -> None:
        """Stop every vCPU; the first outcome reported is the one that counts, except that an outcome found
        after the fact (`overrides_error`: a refused system call) replaces an error it may have caused."""
        with self._cond:
            if self._outcome is None or (overrides_error and self._outcome.reason is StopReason.ERROR):
                self._outcome = outcome
            self.stop_requested = True
            self._cond.notify_all()
        self._kick_all()

    # --- called by the lifecycle owner -----------------------------------------------------------
    @property
    def outcome(self) -> RunOutcome | None:
        return self._outcome

    @property
    def parked(self) -> bool:
        """True when holds exist and every running vCPU has parked (or none runs)."""
        with self._cond:
            return self.pause_requested and self._parked == self._running

    def hold_reasons(self) -> list[str]:
        with self._cond:
            return [hold.reason for hold in self._holds.values()]

    def hold(self, reason: str, timeout: float) -> PauseHold:
        """Add a hold and wait until every vCPU has parked or the VM has stopped.

        On timeout the hold is withdrawn again (the guest goes on running if no other hold exists) and
        HoldTimeout is raised.
        """
        with self._cond:
            hold = PauseHold(self, next(self._tokens), reason)
            self._holds[hold.token] = hold
            self.pause_requested = True
        self._kick_all()
        with self._cond:
            done = self._cond.wait_for(lambda: self.stop_requested or self._parked == self._running, timeout)
            if not done:
                self._drop(hold)
                raise HoldTimeout(f"vCPUs did not park within {timeout} s")
            return hold

    def release(self, hold: PauseHold) -> None:
        """Withdraw one hold (again: no effect). The vCPUs resume when it was the last."""
        with self._cond:
            dropped = self._drop(hold)
        if dropped:
            for callback in hold.on_release:
                callback()

    def _drop(self, hold: PauseHold) -> bool:
        if hold.released:
            return False
        hold.released = True
        del self._holds[hold.token]
        if not self._holds:
            self.pause_requested = False
            self._cond.notify_all()
        return True

    def wait(self, timeout: float | None = None) -> RunOutcome | None:
        with self._cond:
            self._cond.wait_for(lambda: self._outcome is not None, timeout)
            return self._outcome

    def wait_all_stopped(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0, timeout)

    def _kick_all(self) -> None:
        for kick in self._kickers:
            kick()
