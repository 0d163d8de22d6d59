"""RunControl without vCPUs: the first outcome wins, pausing a stopped VM says so."""

from __future__ import annotations

from pyrovisor.vstate.run_control import RunControl, RunOutcome, StopReason


def test_first_outcome_wins_and_pause_after_stop_reports_stopped() -> None:
    control = RunControl()
    kicks: list[int] = []
    control.register(lambda: kicks.append(1))
    control.finish(RunOutcome(StopReason.GUEST_EXIT, exit_code=3))
    control.finish(RunOutcome(StopReason.HOST_STOP))
    assert control.outcome == RunOutcome(StopReason.GUEST_EXIT, exit_code=3)
    assert control.outcome.describe() == "guest exited with code 3"
    assert len(kicks) == 2
    hold = control.hold("test", timeout=1.0)  # a stopped VM has nothing to park: the hold is granted at once
    hold.release()
    assert not control.pause_requested


def test_wait_times_out_without_an_outcome() -> None:
    assert RunControl().wait(timeout=0.05) is None
