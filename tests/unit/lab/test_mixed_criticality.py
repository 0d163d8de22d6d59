"""Fixed-priority scheduling with shared resources: response-time analysis against the simulator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.lab.mixed_criticality import (
    TICKS_PER_MS,
    Protocol,
    Segment,
    Task,
    analyse,
    blocking_bound,
    brake_scenario,
    hyperperiod,
    response_time,
    simulate,
)


def periodic(name: str, priority: int, c: int, t: int) -> Task:
    return Task(name, priority, t, (Segment(c),))


def test_response_times_worked_by_hand() -> None:
    # (C, T) = (1, 4), (2, 6), (3, 10), rate-monotonic priorities:
    #   R1 = 1; R2 = 2 + ceil(3/4)*1 = 3; R3: 6 -> 3+2*1+1*2 = 7 -> 3+2+4 = 9 -> 3+3+4 = 10 -> 10.
    tasks = [periodic("a", 3, 1, 4), periodic("b", 2, 2, 6), periodic("c", 1, 3, 10)]
    assert [a.response for a in analyse(tasks, Protocol.CEILING)] == [1, 3, 10]
    # (C, T) = (3, 7), (3, 12), (5, 20): R3 iterates 11, 14, 17, 20, 20 and meets its deadline exactly.
    tasks = [periodic("a", 3, 3, 7), periodic("b", 2, 3, 12), periodic("c", 1, 5, 20)]
    assert [a.response for a in analyse(tasks, Protocol.CEILING)] == [3, 6, 20]


def test_response_time_stops_past_the_deadline() -> None:
    tasks = [periodic("a", 2, 3, 4), periodic("b", 1, 3, 8)]
    assert response_time(tasks[1], tasks, 0) > 8


def test_blocking_bounds_follow_sha_rajkumar_lehoczky() -> None:
    high = Task("high", 3, 100, (Segment(1, "r1"), Segment(1, "r2")))
    mid = Task("mid", 2, 100, (Segment(4, "r2"),))
    low = Task("low", 1, 100, (Segment(5, "r1"), Segment(2, "r2")))
    tasks = [high, mid, low]
    assert blocking_bound(high, tasks, Protocol.CEILING) == 5           # one critical section at most
    assert blocking_bound(high, tasks, Protocol.INHERITANCE) == 9       # min(4+5, 4+5): one per resource/task
    assert blocking_bound(mid, tasks, Protocol.INHERITANCE) == 5        # low's sections on r1 (push-through)
    assert blocking_bound(low, tasks, Protocol.INHERITANCE) == 0
    assert blocking_bound(high, tasks, Protocol.NONE) is None           # mid can run while low holds r1
    assert blocking_bound(mid, tasks, Protocol.NONE) == 2               # direct blocking on r2 only


def rate_monotonic(specs: list[tuple[int, int]]) -> list[Task]:
    ordered = sorted(enumerate(specs), key=lambda item: (item[1][1], item[0]))
    n = len(specs)
    return [periodic(f"t{index}", n - rank, c, t) for rank, (index, (c, t)) in enumerate(ordered)]


PERIODS = st.sampled_from([4, 5, 8, 10, 20, 25, 40])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), PERIODS), min_size=1, max_size=4))
def test_critical_instant_response_equals_the_analysis(specs: list[tuple[int, int]]) -> None:
    """Liu and Layland's critical instant: released together, each task's first job takes exactly R."""
    specs = [(min(c, t), t) for c, t in specs]
    tasks = rate_monotonic(specs)
    analysis = analyse(tasks, Protocol.NONE)
    assume(all(a.schedulable(t.relative_deadline) for a, t in zip(analysis, tasks, strict=True)))
    result = simulate(tasks, Protocol.NONE, hyperperiod(tasks))
    for task, a in zip(tasks, analysis, strict=True):
        first = next(r for name, release, r in result.trace.responses if name == task.name and release == 0)
        assert first == a.response
        assert result.stats[task.name].worst_response == a.response


@st.composite
def task_sets_with_resources(draw: st.DrawFn) -> list[Task]:
    n = draw(st.integers(2, 4))
    tasks = []
    for index in range(n):
        period = draw(PERIODS.filter(lambda p: p >= 8))
        segments = [Segment(draw(st.integers(1, 2)))]
        for _ in range(draw(st.integers(0, 2))):
            segments.append(Segment(draw(st.integers(1, 3)), draw(st.sampled_from(["a", "b"]))))
            segments.append(Segment(1))
        tasks.append(Task(f"t{index}", 0, period, tuple(segments), offset=draw(st.integers(0, period - 1))))
    ordered = sorted(range(n), key=lambda i: (tasks[i].period, i))
    return [Task(t.name, n - ordered.index(i), t.period, t.segments, offset=t.offset) for i, t in enumerate(tasks)]


@settings(max_examples=60, deadline=None)
@given(task_sets_with_resources(), st.sampled_from([Protocol.INHERITANCE, Protocol.CEILING]))
def test_simulated_worst_case_never_exceeds_the_analytic_bound(tasks: list[Task], protocol: Protocol) -> None:
    analysis = {a.task: a for a in analyse(tasks, protocol)}
    horizon = hyperperiod(tasks) + max(t.offset for t in tasks)
    stats = simulate(tasks, protocol, horizon).stats
    for task in tasks:
        a = analysis[task.name]
        assert a.blocking is not None
        assert stats[task.name].worst_blocking <= a.blocking
        if a.schedulable(task.relative_deadline):
            assert stats[task.name].worst_response <= a.response  # type: ignore[operator]
            assert stats[task.name].misses == 0


def test_ceiling_prevents_chained_blocking_that_inheritance_allows() -> None:
    # high needs r1 then r2; low1 holds r1, low2 (released later) would lock r2 before high arrives.
    high = Task("high", 3, 100, (Segment(1, "r1"), Segment(1, "r2")), offset=2)
    low2 = Task("low2", 2, 100, (Segment(4, "r2"),), offset=1)
    low1 = Task("low1", 1, 100, (Segment(4, "r1"),), offset=0)
    tasks = [high, low2, low1]
    inherit = simulate(tasks, Protocol.INHERITANCE, 100).stats["high"]
    ceiling = simulate(tasks, Protocol.CEILING, 100).stats["high"]
    assert inherit.worst_blocking > 4  # blocked by low1's section, then by low2's: chained
    assert ceiling.worst_blocking <= 4  # at most one critical section
    assert inherit.worst_blocking <= blocking_bound(high, tasks, Protocol.INHERITANCE)  # type: ignore[operator]


def test_brake_scenario_misses_without_a_protocol_and_not_with_one() -> None:
    tasks = brake_scenario()
    brake = tasks[0]
    none = simulate(tasks, Protocol.NONE, 100 * TICKS_PER_MS).stats["brake"]
    assert none.misses >= 1 and none.worst_response > brake.relative_deadline
    assert analyse(tasks, Protocol.NONE)[0].response is None
    for protocol in (Protocol.INHERITANCE, Protocol.CEILING):
        stats = simulate(tasks, protocol, 100 * TICKS_PER_MS).stats
        analysis = analyse(tasks, protocol)
        assert all(stats[t.name].misses == 0 for t in tasks)
        assert analysis[0].blocking == 20 and analysis[0].response == 28  # 0.8 ms + 2 ms lock, in ticks
        for task, a in zip(tasks, analysis, strict=True):
            assert a.schedulable(task.relative_deadline)
            assert stats[task.name].worst_response <= a.response  # type: ignore[operator]
    # The inversion is the navigation task's whole execution plus the lock: it grows with it, unbounded.
    longer = simulate(brake_scenario(medium_ms=9.0), Protocol.NONE, 100 * TICKS_PER_MS).stats["brake"]
    assert longer.worst_response >= none.worst_response + 30


def test_hyperperiod() -> None:
    assert hyperperiod([periodic("a", 2, 1, 4), periodic("b", 1, 1, 6)]) == math.lcm(4, 6)


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "mc.png"
    assert main(["lab", "mixed-criticality", "--phasings", "5", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Task set" in out and "unbounded" in out
    assert "none: brake worst response 8.9 ms against a 5.0 ms deadline" in out
    assert "inheritance: brake worst response 2.7 ms" in out and "0 missed" in out
    assert_real_png(png)
