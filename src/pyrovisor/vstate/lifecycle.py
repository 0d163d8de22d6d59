"""Lifecycle: the one owner of a VM's run state; pause holds, operations and their allowed transitions."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Protocol

from pyrovisor.errors import LifecycleError, PyrovisorError
from pyrovisor.vstate.run_control import HoldTimeout, PauseHold, RunControl, RunOutcome, StopReason

PAUSE_TIMEOUT_S = 10.0
USER = "user"


class VmState(Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    SNAPSHOTTING = "snapshotting"
    MIGRATING = "migrating"
    MIGRATED_AWAY = "migrated-away"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (VmState.MIGRATED_AWAY, VmState.STOPPED, VmState.FAILED)


class Quiescible(Protocol):
    """Something that must stand still while the vCPUs are held (the VM's I/O thread)."""

    def pause(self, timeout: float) -> None: ...

    def resume(self) -> None: ...


class Operation(Enum):
    """Long actions on a VM; at most one at a time."""

    SNAPSHOT = "snapshot"
    MIGRATION = "migration"

    @property
    def state(self) -> VmState:
        return VmState.SNAPSHOTTING if self is Operation.SNAPSHOT else VmState.MIGRATING


# The states from which each operation may begin.
OPERATION_ALLOWED = {
    Operation.SNAPSHOT: (VmState.CREATED, VmState.RUNNING, VmState.PAUSED),
    Operation.MIGRATION: (VmState.RUNNING,),
}
_FAILED_REASONS = (StopReason.ERROR, StopReason.SHUTDOWN)


class Lifecycle:
    """Every request that changes whether the guest runs goes through here.

    The guest runs only while no pause hold exists. Holds are taken by the user (`pause`/`resume`,
    at most one), by operations (a snapshot, migration's stop-and-copy) and by helpers such as the
    migration throttler; each releases only its own. An operation (snapshot or migration) is exclusive
    and shows as the VM's state while it lasts. Once the VM has stopped, migrated away or failed,
    nothing changes any more.
    """

    def __init__(self, control: RunControl, start_vcpus: Callable[[], None], io: Quiescible | None = None) -> None:
        self._control = control
        self._start_vcpus = start_vcpus
        self._io = io  # the I/O thread: held still with the vCPUs, so devices and memory do not change
        self._lock = threading.Lock()  # operations begin and end under it
        self._user_lock = threading.Lock()  # the user's pause and resume, one at a time
        self._started = False
        self._operation: Operation | None = None
        self._user_hold: PauseHold | None = None

    # --- state ------------------------------------------------------------------------------------
    @property
    def state(self) -> VmState:
        outcome = self._control.outcome
        if outcome is not None:
            if outcome.reason is StopReason.MIGRATED:
                return VmState.MIGRATED_AWAY
            return VmState.FAILED if outcome.reason in _FAILED_REASONS else VmState.STOPPED
        operation = self._operation
        if operation is not None:
            return operation.state
        if not self._started:
            return VmState.CREATED
        return VmState.PAUSED if self._control.pause_requested else VmState.RUNNING

    @property
    def started(self) -> bool:
        return self._started

    @property
    def operation(self) -> Operation | None:
        return self._operation

    @property
    def held_by(self) -> list[str]:
        """The reasons of the pause holds that exist now."""
        return self._control.hold_reasons()

    @property
    def user_paused(self) -> bool:
        return self._user_hold is not None

    # --- transitions --------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            state = self.state
            if state is not VmState.CREATED:
                raise LifecycleError("start", state.value, "the VM was already started")
            self._started = True
            self._start_vcpus()

    def hold(self, reason: str, timeout: float = PAUSE_TIMEOUT_S) -> PauseHold:
        """Park the vCPUs until the returned hold is released (every hold must be).

        Refused once the VM has stopped; if the vCPUs do not park within `timeout` the hold is
        withdrawn and LifecycleError raised, leaving the VM as it was.
        """
        self._require_live(f"pause for {reason}")
        try:
            hold = self._control.hold(reason, timeout)
        except HoldTimeout as exc:
            raise LifecycleError(f"pause for {reason}", self.state.value, str(exc)) from None
        if self._control.stop_requested:
            hold.release()
            raise LifecycleError(f"pause for {reason}", self.state.value, "the VM stopped while pausing")
        if self._io is not None:
            try:
                self._io.pause(timeout)
            except PyrovisorError as exc:
                hold.release()
                raise LifecycleError(f"pause for {reason}", self.state.value, str(exc)) from None
            hold.on_release.append(self._io.resume)
        return hold

    @contextlib.contextmanager
    def paused(self, reason: str, timeout: float = PAUSE_TIMEOUT_S) -> Iterator[PauseHold]:
        """`with lifecycle.paused("snapshot"):` the guest stays parked inside the block."""
        hold = self.hold(reason, timeout)
        try:
            yield hold
        finally:
            hold.release()

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> VmState:
        """The user's pause: one hold, however often it is asked for."""
        with self._user_lock:
            self._require_live("pause")
            if self._user_hold is None:
                self._user_hold = self.hold(USER, timeout)
            return self.state

    def resume(self) -> VmState:
        """Release the user's hold only; holds of snapshots, migration or the throttler stay."""
        with self._user_lock:
            self._require_live("resume")
            if self._user_hold is not None:
                self._user_hold.release()
                self._user_hold = None
            return self.state

    @contextlib.contextmanager
    def operation_scope(self, operation: Operation) -> Iterator[None]:
        """Run an exclusive operation; refused with the current state when it conflicts."""
        with self._lock:
            state = self.state
            if state not in OPERATION_ALLOWED[operation]:
                raise LifecycleError(f"start a {operation.value}", state.value,
                                     _conflict(operation, state, self._operation))
            self._operation = operation
        try:
            yield
        finally:
            with self._lock:
                self._operation = None

    def stop(self, outcome: RunOutcome | None = None) -> None:
        """Ask every vCPU to stop (any state; the first outcome counts). Does not wait."""
        self._control.finish(outcome or RunOutcome(StopReason.HOST_STOP))

    def migrated_away(self) -> None:
        """Commit a migration: this copy stops for good, in whatever hold it is."""
        with self._lock:
            if self._operation is not Operation.MIGRATION:
                raise LifecycleError("commit a migration", self.state.value, "no migration is running")
            self._control.finish(RunOutcome(StopReason.MIGRATED))

    def _require_live(self, request: str) -> None:
        state = self.state
        if state.terminal:
            raise LifecycleError(request, state.value, "the VM no longer runs here")


def _conflict(operation: Operation, state: VmState, running: Operation | None) -> str:
    if state.terminal:
        return "the VM no longer runs here"
    if running is not None:
        return f"a {running.value} is in progress"
    if state is VmState.PAUSED:
        return "the VM is paused; resume it first"
    if state is VmState.CREATED:
        return "the VM has not been started"
    return f"a {operation.value} is not allowed now"
