"""The VM lifecycle without KVM: pause holds, operations, conflicts and timeouts, over simulated vCPU threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pyrovisor.errors import LifecycleError, PyrovisorError
from pyrovisor.vstate.lifecycle import Lifecycle, Operation, VmState
from pyrovisor.vstate.run_control import RunControl, RunOutcome, StopReason


class FakeVcpus:
    """Threads that behave like vCPU run loops: count while allowed to run, park while any hold exists."""

    def __init__(self, control: RunControl, count: int = 2) -> None:
        self.control = control
        self.progress = [0] * count
        self.block = threading.Event()  # set: vCPU 0 is stuck in a "device handler" and cannot park
        self.block.set()
        self.threads = [threading.Thread(target=self._loop, args=(index,), daemon=True) for index in range(count)]

    def start(self) -> None:
        for thread in self.threads:
            self.control.vcpu_started()
            thread.start()

    def _loop(self, index: int) -> None:
        control = self.control
        try:
            while not control.stop_requested:
                if control.pause_requested:
                    if index == 0:
                        self.block.wait()
                    control.park()
                    continue
                self.progress[index] += 1
                time.sleep(0.0005)
        finally:
            control.vcpu_finished()

    def frozen_for(self, seconds: float) -> bool:
        before = list(self.progress)
        time.sleep(seconds)
        return self.progress == before

    def running(self, timeout: float = 2.0) -> bool:
        before = list(self.progress)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(after > start + 5 for after, start in zip(self.progress, before, strict=True)):
                return True
            time.sleep(0.005)
        return False


@pytest.fixture
def machine() -> Iterator[tuple[Lifecycle, FakeVcpus]]:
    control = RunControl()
    vcpus = FakeVcpus(control)
    lifecycle = Lifecycle(control, vcpus.start)
    yield lifecycle, vcpus
    control.finish(RunOutcome(StopReason.HOST_STOP))
    for thread in vcpus.threads:
        thread.join(2)


def test_states_from_creation_to_stop(machine: tuple[Lifecycle, FakeVcpus]) -> None:
    lifecycle, vcpus = machine
    assert lifecycle.state is VmState.CREATED
    lifecycle.start()
    assert lifecycle.state is VmState.RUNNING and vcpus.running()
    with pytest.raises(LifecycleError, match="already started"):
        lifecycle.start()
    assert lifecycle.pause() is VmState.PAUSED and vcpus.frozen_for(0.05)
    assert lifecycle.resume() is VmState.RUNNING and vcpus.running()
    lifecycle.stop()
    assert lifecycle.state is VmState.STOPPED


def test_user_resume_releases_only_the_users_hold(machine: tuple[Lifecycle, FakeVcpus]) -> None:
    """The stop-and-copy race: a resume from the API must not let the guest run under migration's pause."""
    lifecycle, vcpus = machine
    lifecycle.start()
    with lifecycle.operation_scope(Operation.MIGRATION), lifecycle.paused("migration"):
        lifecycle.pause()
        assert lifecycle.resume() is VmState.MIGRATING
        assert lifecycle.held_by == ["migration"]
        assert vcpus.frozen_for(0.1), "the guest ran while migration held it"
    assert lifecycle.state is VmState.RUNNING and vcpus.running()


def test_a_throttler_cycle_never_resumes_a_guest_someone_else_holds(machine: tuple[Lifecycle, FakeVcpus]) -> None:
    lifecycle, vcpus = machine
    lifecycle.start()
    stop = threading.Event()

    def throttle() -> None:  # what the migration throttler does every period
        while not stop.is_set():
            with lifecycle.paused("throttle"):
                time.sleep(0.002)
            time.sleep(0.002)

    throttler = threading.Thread(target=throttle)
    throttler.start()
    try:
        with lifecycle.paused("snapshot"):
            assert vcpus.frozen_for(0.2), "the throttler's resume let the guest run during a capture"
    finally:
        stop.set()
        throttler.join(2)
    assert vcpus.running()


def test_nested_holds_and_the_user_pause_is_one_hold(machine: tuple[Lifecycle, FakeVcpus]) -> None:
    lifecycle, vcpus = machine
    lifecycle.start()
    outer = lifecycle.hold("introspection")
    lifecycle.pause()
    lifecycle.pause()  # asking twice is still one hold
    assert sorted(lifecycle.held_by) == ["introspection", "user"]
    outer.release()
    outer.release()  # releasing twice changes nothing
    assert lifecycle.state is VmState.PAUSED and vcpus.frozen_for(0.05)
    lifecycle.resume()
    assert lifecycle.held_by == [] and vcpus.running()


def test_a_pause_that_times_out_rolls_back(machine: tuple[Lifecycle, FakeVcpus]) -> None:
    lifecycle, vcpus = machine
    lifecycle.start()
    vcpus.block.clear()  # vCPU 0 cannot park
    with pytest.raises(LifecycleError, match=r"did not park within 0\.1 s") as info:
        lifecycle.pause(timeout=0.1)
    assert isinstance(info.value, PyrovisorError) and info.value.state == "running"
    vcpus.block.set()
    assert lifecycle.held_by == [] and lifecycle.state is VmState.RUNNING
    assert vcpus.running(), "the guest runs again after the failed pause"
    assert lifecycle.pause(timeout=2) is VmState.PAUSED, "a later pause works"


def test_conflicting_requests_name_the_state(machine: tuple[Lifecycle, FakeVcpus]) -> None:
    lifecycle, _ = machine
    with pytest.raises(LifecycleError, match="has not been started"), lifecycle.operation_scope(Operation.MIGRATION):
        pass
    lifecycle.start()
    with lifecycle.operation_scope(Operation.SNAPSHOT):
        assert lifecycle.state is VmState.SNAPSHOTTING
        with pytest.raises(LifecycleError, match=r"a snapshot is in progress \(the VM is snapshotting\)"), \
                lifecycle.operation_scope(Operation.MIGRATION):
            pass
    with lifecycle.operation_scope(Operation.MIGRATION):
        with pytest.raises(LifecycleError, match=r"a migration is in progress \(the VM is migrating\)"), \
                lifecycle.operation_scope(Operation.SNAPSHOT):
            pass
        lifecycle.migrated_away()
    assert lifecycle.state is VmState.MIGRATED_AWAY
    for request in (lifecycle.resume, lifecycle.pause, lambda: lifecycle.hold("introspection")):
        with pytest.raises(LifecycleError, match="the VM is migrated-away"):
            request()


def test_paused_vm_cannot_start_a_migration_but_can_be_snapshotted(machine: tuple[Lifecycle, FakeVcpus]) -> None:
    lifecycle, _ = machine
    lifecycle.start()
    lifecycle.pause()
    with pytest.raises(LifecycleError, match="paused; resume it first"), \
            lifecycle.operation_scope(Operation.MIGRATION):
        pass
    with lifecycle.operation_scope(Operation.SNAPSHOT), lifecycle.paused("snapshot"):
        assert sorted(lifecycle.held_by) == ["snapshot", "user"]
    assert lifecycle.state is VmState.PAUSED


def test_a_failed_guest_is_failed_and_holds_on_a_stopped_vm_are_refused(machine: tuple[Lifecycle, FakeVcpus]) -> None:
    lifecycle, _ = machine
    lifecycle.start()
    lifecycle.stop(RunOutcome(StopReason.SHUTDOWN))
    assert lifecycle.state is VmState.FAILED
    with pytest.raises(LifecycleError, match="no longer runs here"):
        lifecycle.hold("snapshot")
