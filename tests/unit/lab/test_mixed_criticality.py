"""Fixed-priority scheduling with shared resources and mixed criticality: the analyses against the simulator."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from json_check import lab_json
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.mixed_criticality import (
    BOUNDED_PROTOCOLS,
    TICKS_PER_MS,
    Criticality,
    Protocol,
    Segment,
    Task,
    analyse,
    analyse_amc,
    blocking_bound,
    brake_scenario,
    hyperperiod,
    least_fixed_point,
    response_time,
    simulate,
    synchronous,
    worst_over_phasings,
)

HI, LO = Criticality.HI, Criticality.LO

# Each "agrees"/"never exceeds" claim of docs/lab/mixed-criticality.md, with its tolerance in ticks (0.1 ms).
BOUND_SLACK_TICKS = 0  # docs/lab/mixed-criticality.md: "the simulated worst response never exceeds the analytic bound"
CRITICAL_INSTANT_TOLERANCE_TICKS = 0  # docs/lab/mixed-criticality.md: "equals the analytic R exactly"
BRAKE_BOUND_GAP_TICKS = 1  # docs/lab/mixed-criticality.md: "within 0.1 ms (one tick) below the bound"


def periodic(name: str, priority: int, c: int, t: int, criticality: Criticality = LO, c_hi: int = 0) -> Task:
    return Task(name, priority, t, (Segment(c),), criticality=criticality, c_hi=c_hi)


def horizon_of(tasks: list[Task]) -> int:
    return hyperperiod(tasks) + max(t.offset for t in tasks)


# --- Part 1: priority inversion ---------------------------------------------------------------------------

def test_response_times_worked_by_hand() -> None:
    # (C, T) = (1, 4), (2, 6), (3, 10), rate-monotonic priorities:
    #   R1 = 1; R2 = 2 + ceil(3/4)*1 = 3; R3: 6 -> 3+2*1+1*2 = 7 -> 3+2+4 = 9 -> 3+3+4 = 10 -> 10.
    tasks = [periodic("a", 3, 1, 4), periodic("b", 2, 2, 6), periodic("c", 1, 3, 10)]
    for protocol in Protocol:
        assert [a.response for a in analyse(tasks, protocol)] == [1, 3, 10]
    # (C, T) = (3, 7), (3, 12), (5, 20): R3 iterates 11, 14, 17, 20, 20 and meets its deadline exactly.
    tasks = [periodic("a", 3, 3, 7), periodic("b", 2, 3, 12), periodic("c", 1, 5, 20)]
    assert [a.response for a in analyse(tasks, Protocol.CEILING)] == [3, 6, 20]


def test_busy_period_with_several_jobs_worked_by_hand() -> None:
    # (C, T) = (2, 4) and (3, 6): U = 1 exactly. Task b, first job: w = 3 + ceil(w/4)*2: 3 -> 5 -> 7 -> 7; 7 > 6,
    # so the next job is in the same busy period: w = 6 + ceil(w/4)*2: 7 -> 10 -> 12 -> 12; 12 <= 2*6, it closes.
    # R = max(7 - 0, 12 - 6) = 7, past b's deadline of 6: printed, and a miss.
    exact = [periodic("a", 2, 2, 4), periodic("b", 1, 3, 6)]
    result = analyse(exact, Protocol.NONE)[1]
    assert result.response == 7 and not result.schedulable(6)
    stats = simulate(exact, Protocol.NONE, hyperperiod(exact)).stats["b"]
    assert stats.worst_response == 7 and stats.misses >= 1
    # (2, 4) and (4, 6): U = 7/6, the busy period never closes: unbounded once it passes the limit.
    assert analyse([periodic("a", 2, 2, 4), periodic("b", 1, 4, 6)], Protocol.NONE, limit=10_000)[1].response is None


def test_response_time_stops_past_the_deadline() -> None:
    tasks = [periodic("a", 2, 3, 4), periodic("b", 1, 3, 8)]
    assert response_time(tasks[1], tasks, 0) > 8


def test_blocking_bounds_follow_sha_rajkumar_lehoczky() -> None:
    high = Task("high", 3, 100, (Segment(1, "r1"), Segment(1, "r2")))
    mid = Task("mid", 2, 100, (Segment(4, "r2"),))
    low = Task("low", 1, 100, (Segment(5, "r1"), Segment(2, "r2")))
    tasks = [high, mid, low]
    assert blocking_bound(high, tasks, Protocol.CEILING) == 5           # one critical section at most
    assert blocking_bound(high, tasks, Protocol.IMMEDIATE) == 5         # the same bound for the immediate ceiling
    assert blocking_bound(high, tasks, Protocol.INHERITANCE) == 9       # min(4+5, 4+5): one per resource/task
    assert blocking_bound(mid, tasks, Protocol.INHERITANCE) == 5        # low's sections on r1 (push-through)
    assert blocking_bound(low, tasks, Protocol.INHERITANCE) == 0
    assert blocking_bound(mid, tasks, Protocol.IMMEDIATE) == 5          # ceiling blocking by low's r1 section
    # No protocol: each of the job's own sections can wait for the longest lower section on its resource.
    assert blocking_bound(high, tasks, Protocol.NONE) == 5 + 4          # r1: low's 5; r2: mid's 4
    assert blocking_bound(mid, tasks, Protocol.NONE) == 2               # direct blocking on r2 only


def rate_monotonic(specs: list[tuple[int, int]]) -> list[Task]:
    ordered = sorted(enumerate(specs), key=lambda item: (item[1][1], item[0]))
    n = len(specs)
    return [periodic(f"t{index}", n - rank, c, t) for rank, (index, (c, t)) in enumerate(ordered)]


PERIODS = st.sampled_from([4, 5, 8, 10, 20, 25, 40])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), PERIODS), min_size=1, max_size=4), st.sampled_from(list(Protocol)))
def test_critical_instant_response_equals_the_analysis(specs: list[tuple[int, int]], protocol: Protocol) -> None:
    """Liu and Layland's critical instant: released together, each task's first job takes exactly R."""
    specs = [(min(c, t), t) for c, t in specs]
    tasks = rate_monotonic(specs)
    analysis = analyse(tasks, protocol)
    assume(all(a.schedulable(t.relative_deadline) for a, t in zip(analysis, tasks, strict=True)))
    result = simulate(tasks, protocol, hyperperiod(tasks))
    for task, a in zip(tasks, analysis, strict=True):
        assert a.response is not None
        first = next(r for name, release, r in result.trace.responses if name == task.name and release == 0)
        assert abs(first - a.response) <= CRITICAL_INSTANT_TOLERANCE_TICKS
        assert abs(result.stats[task.name].worst_response - a.response) <= CRITICAL_INSTANT_TOLERANCE_TICKS


@st.composite
def task_sets_with_resources(draw: st.DrawFn, mixed: bool = False) -> list[Task]:
    n = draw(st.integers(2, 4))
    tasks = []
    for index in range(n):
        period = draw(PERIODS.filter(lambda p: p >= 8))
        segments = [Segment(draw(st.integers(1, 2)))]
        for _ in range(draw(st.integers(0, 2))):
            segments.append(Segment(draw(st.integers(1, 3)), draw(st.sampled_from(["a", "b"]))))
            segments.append(Segment(1))
        criticality = HI if mixed and draw(st.booleans()) else LO
        wcet = sum(s.duration for s in segments)
        c_hi = wcet + draw(st.integers(0, 4)) if criticality is HI else 0
        tasks.append(Task(f"t{index}", 0, period, tuple(segments), offset=draw(st.integers(0, period - 1)),
                          criticality=criticality, c_hi=c_hi))
    ordered = sorted(range(n), key=lambda i: (tasks[i].period, i))
    return [Task(t.name, n - ordered.index(i), t.period, t.segments, offset=t.offset, criticality=t.criticality,
                 c_hi=t.c_hi) for i, t in enumerate(tasks)]


@settings(max_examples=80, deadline=None)
@given(task_sets_with_resources(), st.sampled_from(list(Protocol)))
def test_simulated_worst_case_never_exceeds_the_analytic_bound(tasks: list[Task], protocol: Protocol) -> None:
    """Every protocol, no protocol included: where the busy period closes, no simulated job takes longer."""
    analysis = {a.task: a for a in analyse(tasks, protocol)}
    stats = simulate(tasks, protocol, 2 * horizon_of(tasks)).stats
    for task in tasks:
        a = analysis[task.name]
        if protocol is not Protocol.NONE:
            assert stats[task.name].worst_blocking <= a.blocking
        if a.response is not None:
            assert stats[task.name].worst_response <= a.response + BOUND_SLACK_TICKS
            if a.response <= task.relative_deadline:
                assert stats[task.name].misses == 0


def test_no_protocol_gives_a_finite_bound_where_the_busy_period_closes() -> None:
    """Issue 16: the response time where it can be computed, not "unbounded"; and a bound the simulation respects."""
    tasks = brake_scenario()
    analysis = {a.task: a for a in analyse(tasks, Protocol.NONE)}
    brake = analysis["brake"]
    assert brake.blocking == 20 and brake.method == "carry-in"
    assert brake.response is not None and not brake.schedulable(50)
    observed = worst_over_phasings(tasks, Protocol.NONE, 10, seed=4, extra=[tasks])
    for task in tasks:
        bound = analysis[task.name].response
        assert bound is not None and observed[task.name].worst_response <= bound + BOUND_SLACK_TICKS
    # Infotainment has nothing below it: its bound is the plain busy period, 18.2 ms, the same with a protocol.
    assert analysis["infotainment"].method == "busy period"
    assert analysis["infotainment"].response == analyse(tasks, Protocol.IMMEDIATE)[3].response == 182
    # Past the limit it is called unbounded: with navigation at 14 ms per 20 ms the brake's level never idles.
    overloaded = brake_scenario(medium_ms=14.0)
    assert analyse(overloaded, Protocol.NONE, limit=10_000)[0].response is None


def test_a_single_job_recurrence_without_carry_in_is_not_a_bound() -> None:
    """Why the no-protocol bound counts carry-in: C + B + sum ceil(R/T) C over every task above the lock holder
    (a single job, medium tasks charged like higher ones) is 13.8 ms for the brake, and the simulation beats it."""
    tasks = brake_scenario()
    brake = tasks[0]
    medium_and_higher = [t for t in tasks if 1 < t.priority < brake.priority]
    naive = least_fixed_point(brake.wcet + blocking_bound(brake, tasks, Protocol.NONE),
                              lambda r: sum(math.ceil(r / t.period) * t.wcet for t in medium_and_higher), 10_000)
    assert naive == 138
    observed = worst_over_phasings(tasks, Protocol.NONE, 40, seed=2, extra=[tasks])["brake"].worst_response
    assert observed > naive
    bound = analyse(tasks, Protocol.NONE)[0].response
    assert bound is not None and observed <= bound


def test_ceiling_prevents_chained_blocking_that_inheritance_allows() -> None:
    # high needs r1 then r2; low1 holds r1, low2 (released later) would lock r2 before high arrives.
    high = Task("high", 3, 100, (Segment(1, "r1"), Segment(1, "r2")), offset=2)
    low2 = Task("low2", 2, 100, (Segment(4, "r2"),), offset=1)
    low1 = Task("low1", 1, 100, (Segment(4, "r1"),), offset=0)
    tasks = [high, low2, low1]
    inherit = simulate(tasks, Protocol.INHERITANCE, 100).stats["high"]
    assert inherit.worst_blocking > 4  # blocked by low1's section, then by low2's: chained
    assert inherit.worst_blocking <= blocking_bound(high, tasks, Protocol.INHERITANCE)
    for protocol in (Protocol.CEILING, Protocol.IMMEDIATE):
        assert simulate(tasks, protocol, 100).stats["high"].worst_blocking <= 4  # at most one critical section


def test_immediate_ceiling_raises_the_priority_when_the_lock_is_taken() -> None:
    """OSEK / PTHREAD_PRIO_PROTECT: the holder runs at the ceiling at once, so a medium task that uses no lock
    waits for the critical section (it preempts the holder under the original ceiling protocol)."""
    high = Task("high", 3, 100, (Segment(2, "r"),), offset=20)
    medium = Task("medium", 2, 100, (Segment(3),), offset=2)
    low = Task("low", 1, 100, (Segment(1), Segment(6, "r")), offset=0)
    tasks = [high, medium, low]
    immediate = simulate(tasks, Protocol.IMMEDIATE, 100)
    ceiling = simulate(tasks, Protocol.CEILING, 100)
    assert immediate.trace.running[:10] == ("low",) * 7 + ("medium",) * 3
    assert ceiling.trace.running[:10] == ("low", "low", "medium", "medium", "medium") + ("low",) * 5
    assert immediate.stats["medium"].worst_response == 8 and ceiling.stats["medium"].worst_response == 3
    assert immediate.stats["medium"].worst_response - 3 <= blocking_bound(medium, tasks, Protocol.IMMEDIATE)


@settings(max_examples=60, deadline=None)
@given(task_sets_with_resources())
def test_immediate_ceiling_blocks_only_before_a_job_starts(tasks: list[Task]) -> None:
    stats = simulate(tasks, Protocol.IMMEDIATE, 2 * horizon_of(tasks)).stats
    assert all(s.worst_blocking_after_start == 0 for s in stats.values())


def test_brake_scenario_misses_without_a_protocol_and_not_with_one() -> None:
    tasks = brake_scenario()
    brake = tasks[0]
    none = simulate(tasks, Protocol.NONE, 100 * TICKS_PER_MS).stats["brake"]
    assert none.misses >= 1 and none.worst_response > brake.relative_deadline
    for protocol in BOUNDED_PROTOCOLS:
        stats = simulate(tasks, protocol, 100 * TICKS_PER_MS).stats
        analysis = analyse(tasks, protocol)
        assert all(stats[t.name].misses == 0 for t in tasks)
        assert analysis[0].blocking == 20 and analysis[0].response == 28  # 0.8 ms + 2 ms lock, in ticks
        gap = analysis[0].response - stats["brake"].worst_response
        assert 0 <= gap <= BRAKE_BOUND_GAP_TICKS
        for task, a in zip(tasks, analysis, strict=True):
            assert a.schedulable(task.relative_deadline) and a.response is not None
            assert stats[task.name].worst_response <= a.response + BOUND_SLACK_TICKS
    # The inversion is the medium tasks' execution plus the lock: it grows with navigation's time.
    longer = simulate(brake_scenario(medium_ms=9.0), Protocol.NONE, 100 * TICKS_PER_MS).stats["brake"]
    assert longer.worst_response >= none.worst_response + 30


def test_hyperperiod() -> None:
    assert hyperperiod([periodic("a", 2, 1, 4), periodic("b", 1, 1, 6)]) == math.lcm(4, 6)


# --- Part 2: mixed criticality, AMC ------------------------------------------------------------------------

def test_amc_rtb_worked_by_hand() -> None:
    # a: HI, T=10, C(LO)=2, C(HI)=3; b: LO, T=15, C=4; c: HI, T=40, C(LO)=6, C(HI)=12; no resources.
    # R_c(LO): 6 -> 6 + ceil(6/10)*2 + ceil(6/15)*4 = 12 -> 6 + 2*2 + 1*4 = 14 -> 14.
    # R_c*:    12 + ceil(R_c(LO)/15)*4 = 16 fixed, + ceil(R*/10)*3: 16 -> 16 + 2*3 = 22 -> 16 + 3*3 = 25 -> 25.
    # no switch: 12 + ceil(R/10)*3 + ceil(R/15)*4: 12 -> 12 + 6 + 4 = 22 -> 12 + 9 + 8 = 29 -> 12 + 9 + 8 = 29.
    # R_a(LO) = 2, R_a* = 3; R_b(LO) = 4 + ceil(R/10)*2: 6 -> 6.
    tasks = [periodic("a", 3, 2, 10, HI, 3), periodic("b", 2, 4, 15), periodic("c", 1, 6, 40, HI, 12)]
    result = {a.task: a for a in analyse_amc(tasks, Protocol.IMMEDIATE)}
    assert (result["c"].response_lo, result["c"].response_amc, result["c"].response_no_switch) == (14, 25, 29)
    assert (result["a"].response_lo, result["a"].response_amc) == (2, 3)
    assert result["b"].response_lo == 6 and result["b"].response_amc is None
    # Simulated with every HI job overrunning, over every phasing of a and b against c: nothing exceeds them.
    for offset_a in range(10):
        for offset_b in range(0, 15, 3):
            phased = [Task(t.name, t.priority, t.period, t.segments, offset=o, criticality=t.criticality,
                           c_hi=t.c_hi) for t, o in zip(tasks, (offset_a, offset_b, 0), strict=True)]
            run = simulate(phased, Protocol.IMMEDIATE, 120, lambda task, release: True)
            for job in run.trace.jobs:
                r = result[job.task]
                if job.response is None:
                    assert job.task == "b"  # only LO jobs are dropped
                elif not job.hi_mode:
                    assert r.response_lo is not None and job.response <= r.response_lo + BOUND_SLACK_TICKS
                else:
                    assert r.response_amc is not None and job.response <= r.response_amc + BOUND_SLACK_TICKS


def test_amc_rtb_in_the_vehicle_worked_by_hand() -> None:
    # stability (HI, T=D=250 ticks, C(LO)=50, C(HI)=100) under brake (HI, 50, 8/12), navigation (LO, 200, 60), with
    # B = 20 (infotainment's bus section; the bus's ceiling is the brake's priority):
    # R(LO): 70 -> 70 + 2*8 + 60 = 146 -> 70 + 3*8 + 60 = 154 -> 70 + 4*8 + 60 = 162 -> 162.
    # R*: 100 + 20 + ceil(162/200)*60 = 180, + ceil(R*/50)*12: 180 -> 180 + 4*12 = 228 -> 180 + 5*12 = 240 -> 240.
    # no switch: 120 + ceil(R/50)*12 + ceil(R/200)*60: ... 312 -> 324 > 250: past the period, a miss.
    amc = {a.task: a for a in analyse_amc(brake_scenario(), Protocol.IMMEDIATE)}
    stability = amc["stability"]
    assert (stability.blocking, stability.response_lo, stability.response_amc) == (20, 162, 240)
    assert stability.response_no_switch is None and stability.schedulable(250)
    assert (amc["brake"].response_lo, amc["brake"].response_amc) == (28, 32)


def test_mode_switch_drops_lo_jobs_until_an_idle_instant() -> None:
    fast = periodic("fast", 3, 2, 5)  # LO, above the HI task (rate-monotonic)
    hi = periodic("hi", 2, 3, 20, HI, 6)
    slow = periodic("slow", 1, 2, 20)
    tasks = [fast, hi, slow]
    run = simulate(tasks, Protocol.IMMEDIATE, 20, lambda task, release: True)
    # fast runs 0-2, hi 2-5 and has used its C(LO) = 3 without finishing: the switch is at 5, before fast's release
    # at 5, which is skipped; slow's pending job is dropped. hi finishes at 8; nothing is pending, an idle instant,
    # so LO mode is back, and fast's jobs at 10 and 15 run.
    assert run.trace.switches == (5,)
    assert run.trace.running[:8] == ("fast", "fast", "hi", "hi", "hi", "hi", "hi", "hi")
    assert [(j.task, j.release, j.response) for j in run.trace.jobs if j.task != "hi"] == [
        ("fast", 0, 2), ("slow", 0, None), ("fast", 10, 2), ("fast", 15, 2)]
    assert run.stats["slow"].dropped == 1 and not any(run.trace.hi_mode[8:])
    # AMC-rtb for hi: R(LO) = 3 + ceil(5/5)*2 = 5; R* = 6 + ceil(5/5)*2 = 8, which the run reaches.
    amc = analyse_amc(tasks, Protocol.IMMEDIATE)[1]
    assert (amc.response_lo, amc.response_amc) == (5, 8) and run.stats["hi"].worst_response == 8
    # Without the switch fast keeps preempting: R = 6 + ceil(R/5)*2: 8 -> 10 -> 10, reached too.
    kept = simulate(tasks, Protocol.IMMEDIATE, 20, lambda task, release: True, mode_switch=False)
    assert amc.response_no_switch == 10 and kept.stats["hi"].worst_response == 10
    assert kept.stats["slow"].dropped == 0 and kept.stats["slow"].worst_response == 14


def test_a_lo_job_holding_a_lock_finishes_its_section_before_it_is_dropped() -> None:
    hi = Task("hi", 2, 30, (Segment(2), Segment(1, "r")), offset=1, criticality=HI, c_hi=5)
    lo = Task("lo", 1, 30, (Segment(4, "r"), Segment(4)))
    run = simulate([hi, lo], Protocol.IMMEDIATE, 30, lambda task, release: True)
    # lo locks r at 0 and runs at the ceiling until 4; hi runs 4-7 (C(LO) = 3) and overruns: the switch at 7
    # finds lo already out of its section, so it is dropped then.
    assert run.trace.running[:4] == ("lo",) * 4 and run.trace.switches == (7,)
    assert run.stats["lo"].dropped == 1
    hold = Task("lo", 1, 30, (Segment(1), Segment(8, "r"), Segment(4)))
    early = Task("hi", 2, 30, (Segment(2),), offset=0, criticality=HI, c_hi=4)
    run = simulate([early, hold], Protocol.IMMEDIATE, 30, lambda task, release: True)
    # hi switches at 2 while lo has not started; lo is dropped at once, without ever taking r.
    assert run.trace.switches == (2,) and "r" not in run.trace.holding


@settings(max_examples=80, deadline=None)
@given(task_sets_with_resources(mixed=True), st.sampled_from(BOUNDED_PROTOCOLS), st.floats(0.2, 1.0),
       st.integers(0, 2**16))
def test_amc_simulation_never_exceeds_the_amc_rtb_bounds(tasks: list[Task], protocol: Protocol,
                                                         probability: float, seed: int) -> None:
    analysis = {a.task: a for a in analyse_amc(tasks, protocol)}
    rng = np.random.default_rng(seed)
    run = simulate(tasks, protocol, 2 * horizon_of(tasks), lambda task, release: bool(rng.random() < probability))
    criticality = {t.name: t.criticality for t in tasks}
    for job in run.trace.jobs:
        a = analysis[job.task]
        if job.response is None:
            assert criticality[job.task] is LO
        elif not job.hi_mode and a.response_lo is not None:
            assert job.response <= a.response_lo + BOUND_SLACK_TICKS
        elif job.hi_mode and criticality[job.task] is HI and a.response_lo is not None and a.response_amc is not None:
            assert job.response <= a.response_amc + BOUND_SLACK_TICKS


def test_amc_needs_a_protocol_that_bounds_blocking() -> None:
    with pytest.raises(ConfigError):
        analyse_amc(brake_scenario(), Protocol.NONE)
    with pytest.raises(ConfigError):
        Task("x", 1, 10, (Segment(3),), criticality=HI, c_hi=2)  # C(HI) below C(LO)
    with pytest.raises(ConfigError):
        Task("x", 1, 10, (Segment(3),), criticality=LO, c_hi=5)  # a LO task has one WCET


def test_the_vehicle_needs_the_mode_switch() -> None:
    tasks = synchronous(brake_scenario())
    every = simulate(tasks, Protocol.IMMEDIATE, hyperperiod(tasks), lambda task, release: True)
    kept = simulate(tasks, Protocol.IMMEDIATE, hyperperiod(tasks), lambda task, release: True, mode_switch=False)
    assert every.stats["stability"].misses == 0 and every.stats["stability"].worst_response <= 240
    assert kept.stats["stability"].misses >= 1


# --- Command line --------------------------------------------------------------------------------------------

QUICK = ("--phasings", "2", "--seeds", "2")


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "mc.png"
    assert main(["lab", "mixed-criticality", *QUICK, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Task set" in out and "AMC-rtb" in out
    assert "none: brake worst response 14.1 ms (bound 35.8 ms) against a 5 ms deadline" in out
    assert "inheritance: brake worst response 2.7 ms (bound 2.8 ms)" in out and "0 missed" in out
    assert "immediate: brake worst response 2.7 ms" in out
    assert "AMC (immediate): stability R* = 24.0 ms against 25.0 ms; HI deadline misses 0 with the mode switch" in out
    assert_real_png(png)


def test_json_has_headline_and_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "mixed-criticality", *QUICK)
    headline = document["headline"]
    assert headline["brake R none ms"] == pytest.approx(35.8)
    assert headline["brake R immediate ms"] == pytest.approx(2.8)
    assert headline["stability R* AMC ms"] == pytest.approx(24.0)
    simulated = headline["brake sim none ms"]
    assert simulated["n"] == 2 and simulated["low"] <= simulated["mean"] <= simulated["high"]
    assert 5.0 < simulated["mean"] <= 35.8  # past the deadline, within the bound
    assumptions = {a["name"]: a for a in document["assumptions"]}
    assert assumptions["infotainment lock hold ms"]["value"] == 2.0
    assert assumptions["stability C(HI) ms"]["value"] == 10.0
    assert assumptions["tick ms"]["value"] == pytest.approx(0.1)
    assert all(a["basis"] for a in document["assumptions"])
    assert document["inputs"]["seeds"] == 2 and document["inputs"]["seed"] == 2


def test_sweep_of_navigation_time_moves_the_no_protocol_bound_only(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/lab/mixed-criticality.md: navigation's time lengthens the wait without a protocol, and does not touch
    the brake's bound with the immediate ceiling protocol (it has higher priority than navigation)."""
    import json

    from pyrovisor.api.cli import main

    capsys.readouterr()
    assert main(["lab", "mixed-criticality", *QUICK, "--json", "--sweep", "medium-ms=2:8:3"]) == 0
    points = json.loads(capsys.readouterr().out)["sweep"]["points"]
    none = [p["headline"]["brake R none ms"] for p in points]
    immediate = [p["headline"]["brake R immediate ms"] for p in points]
    assert none == sorted(none) and none[0] < none[-1]
    assert immediate == [2.8, 2.8, 2.8]
