"""Fixed-priority scheduling on one CPU: priority inversion with shared locks, and mixed criticality with AMC.

Two analyses, each checked against a tick-by-tick simulator of the same task set.

Part 1 is priority-inversion analysis in the sense of Sha, Rajkumar and Lehoczky (1990); it is not
mixed-criticality scheduling. Periodic tasks run under fixed priorities; a job is a sequence of segments,
some inside a critical section on a shared resource. Four locking protocols:

- none: a job waiting for a lock waits at its own priority; the holder keeps its low priority, so any
  medium-priority job preempts the holder and prolongs the wait (uncontrolled inversion, the Mars
  Pathfinder failure: a low-priority meteorological task held the information-bus mutex, medium tasks
  ran, the high-priority bus task missed its deadline and a watchdog reset the computer).
- inheritance (PIP): the holder runs at the highest priority of the jobs it blocks.
- ceiling (PCP, Sha et al.'s original protocol): each resource has a ceiling, the priority of its most
  urgent user; a job may lock only if its priority is above the ceilings of all resources locked by
  other jobs, else it blocks and the holder of the highest-ceiling lock inherits its priority.
- immediate (the immediate ceiling protocol, also called priority ceiling emulation; OSEK's "priority
  ceiling protocol" and POSIX PTHREAD_PRIO_PROTECT): a job's priority is raised to the lock's ceiling
  as soon as it locks, and drops back when it unlocks. A job is then blocked at most once, before it
  starts, and never waits on a lock.

Response times come from the level-i busy period (Joseph and Pandya 1986; blocking term from Audsley et
al. 1993; several jobs of the task in one busy period after Lehoczky 1990):

    w_q = (q+1) C_i + B_i + sum over j in hp(i) of ceil(w_q / T_j) C_j,   q = 0, 1, ...
    R_i = max over q of (w_q - q T_i), up to the first q with w_q <= (q+1) T_i.

Blocking bounds (Sha, Rajkumar, Lehoczky 1990), once per busy period:
    ceiling, immediate: B_i = the longest critical section of a lower-priority task on a resource whose
                        ceiling is >= P_i (one critical section at most)
    inheritance:        B_i = min(sum over lower tasks of their longest such section, sum over such
                        resources of their longest section by a lower task)   (min(n, m) sections)
    none:               direct blocking only: each of the job's own critical sections can find its lock
                        held by a lower task, so B_i = sum over the job's sections of the longest section
                        of a lower task on the same resource, once per job.
Without a protocol the wait is not bounded by B_i alone: while the job waits, every task above the
lowest lock holder ("medium" tasks) can run. The bound here charges them as interference, together with
the higher-priority tasks, and counts the jobs of each such task k that have work in a window of length
w as ceil((w + R_k) / T_k) (a job released up to R_k before the window can still run in it), so the
response times of all tasks are solved together as a least fixed point. Where nothing at or above task
i's priority can wait for a lower task's lock, the plain recurrence above holds for i. The response time
is printed whenever the busy period closes; "unbounded" means it grew past a stated limit.

Part 2 is mixed criticality in Vestal's sense (RTSS 2007): each task has a criticality level, LO or HI,
and a WCET per level, C(LO) <= C(HI) (LO tasks have only C(LO)). Adaptive Mixed Criticality (AMC;
Baruah, Burns and Davis, RTSS 2011): every job's execution time is monitored; when a HI job runs past
its C(LO) budget the system switches to HI mode, LO jobs are dropped and no LO job is released. Here the
system returns to LO mode at the next idle instant. The AMC-rtb analysis:

    R_i(LO) = C_i(LO) + B_i + sum over j in hp(i) of ceil(R_i(LO) / T_j) C_j(LO)            (every task)
    R_i*    = C_i(HI) + B_i + sum over j in hpH(i) of ceil(R_i* / T_j) C_j(HI)
                            + sum over k in hpL(i) of ceil(R_i(LO) / T_k) C_k(LO)            (HI tasks)

with hpH, hpL the higher-priority HI and LO tasks: LO tasks can run only before the switch, which
happens within R_i(LO) of the busy period's start. Both are single-job recurrences, valid while the
result does not exceed the period. For comparison, without the mode switch (LO tasks keep running):
R_i = C_i(HI) + B_i + sum hpH ceil(R_i/T_j) C_j(HI) + sum hpL ceil(R_i/T_k) C_k(LO). Critical sections
are the same in both modes (the extra HI execution is outside them), and a LO job that holds a lock at
the switch finishes its critical section before it is dropped, so B_i is the same in both modes.

Sources
- L. Sha, R. Rajkumar, J. P. Lehoczky, "Priority Inheritance Protocols: An Approach to Real-Time
  Synchronization", IEEE Transactions on Computers 39(9):1175-1185, 1990 (the protocols and their
  blocking theorems).
- M. Joseph, P. Pandya, "Finding Response Times in a Real-Time System", The Computer Journal
  29(5):390-395, 1986 (exact worst-case response times under fixed priorities).
- N. Audsley, A. Burns, M. Richardson, K. Tindell, A. Wellings, "Applying new scheduling theory to static
  priority pre-emptive scheduling", Software Engineering Journal 8(5):284-292, 1993 (blocking term B).
- J. P. Lehoczky, "Fixed Priority Scheduling of Periodic Task Sets with Arbitrary Deadlines", RTSS 1990
  (several jobs of a task in one busy period).
- S. Vestal, "Preemptive Scheduling of Multi-criticality Systems with Varying Degrees of Execution Time
  Assurance", RTSS 2007 (per-criticality WCETs).
- S. K. Baruah, A. Burns, R. I. Davis, "Response-Time Analysis for Mixed Criticality Systems", RTSS 2011,
  pp. 34-43 (AMC and AMC-rtb).
- IEEE Std 1003.1 (POSIX), pthread_mutexattr_setprotocol: PTHREAD_PRIO_PROTECT; OSEK/VDX Operating
  System specification: the OSEK priority ceiling protocol (both the immediate ceiling protocol).
- G. E. Reeves, "What really happened on Mars Rover Pathfinder", account of the 1997 resets.
The brake / navigation / stability / infotainment task set is invented for illustration; its numbers are
not from a vehicle.
"""

from __future__ import annotations

import argparse
import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import Assumption, LabResult, Table
from pyrovisor.lab.stats import Estimate, add_seed_arguments, estimate, seeds_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class Protocol(enum.Enum):
    NONE = "none"
    INHERITANCE = "inheritance"
    CEILING = "ceiling"
    IMMEDIATE = "immediate"


BOUNDED_PROTOCOLS = (Protocol.INHERITANCE, Protocol.CEILING, Protocol.IMMEDIATE)


class Criticality(enum.StrEnum):
    LO = "LO"
    HI = "HI"


@dataclass(frozen=True)
class Segment:
    """A stretch of a job's execution, inside a critical section on `resource` or outside (None)."""

    duration: int
    resource: str | None = None


@dataclass(frozen=True)
class Task:
    """A periodic task. Higher `priority` numbers are more urgent; times are integer ticks.

    The segments add up to C(LO). A HI task may need up to `c_hi` >= C(LO) (0: the same), the extra time
    outside any critical section; a LO task has one WCET."""

    name: str
    priority: int
    period: int
    segments: tuple[Segment, ...]
    deadline: int = 0  # 0: equal to the period
    offset: int = 0
    criticality: Criticality = Criticality.LO
    c_hi: int = 0

    def __post_init__(self) -> None:
        if self.period <= 0 or not self.segments or any(s.duration <= 0 for s in self.segments):
            raise ConfigError("task", self.name, "needs a positive period and positive segment durations")
        if self.deadline > self.period:
            raise ConfigError("task", self.name, "the analysis needs deadline <= period")
        if self.c_hi and self.c_hi < self.wcet:
            raise ConfigError("task", self.name, f"C(HI) = {self.c_hi} is below C(LO) = {self.wcet}")
        if self.criticality is Criticality.LO and self.c_hi > self.wcet:
            raise ConfigError("task", self.name, "a LO-criticality task has a single WCET, C(LO)")

    @property
    def wcet(self) -> int:
        """C(LO): the sum of the segments."""
        return sum(s.duration for s in self.segments)

    @property
    def overrun(self) -> int:
        """C(HI) - C(LO): how far past its LO budget a HI job may run."""
        return max(0, self.c_hi - self.wcet)

    def budget(self, level: Criticality) -> int:
        return self.wcet + (self.overrun if level is Criticality.HI else 0)

    @property
    def relative_deadline(self) -> int:
        return self.deadline or self.period

    @property
    def resources(self) -> set[str]:
        return {s.resource for s in self.segments if s.resource is not None}

    def section_time(self, resources: set[str]) -> int:
        """Time per job spent inside critical sections on any of `resources`."""
        return sum(s.duration for s in self.segments if s.resource in resources)


def ceilings(tasks: Sequence[Task]) -> dict[str, int]:
    """Each resource's priority ceiling: the highest priority of a task that uses it."""
    result: dict[str, int] = {}
    for task in tasks:
        for resource in task.resources:
            result[resource] = max(result.get(resource, task.priority), task.priority)
    return result


def _check_priorities(tasks: Sequence[Task]) -> None:
    if len({t.priority for t in tasks}) != len(tasks):
        raise ConfigError("task priorities", [t.priority for t in tasks], "must be distinct")


# --- Priority-inversion analysis -------------------------------------------------------------------------

def blocking_bound(task: Task, tasks: Sequence[Task], protocol: Protocol) -> int:
    """B_i for `task` under `protocol`: per busy period for the protocols, per job without one."""
    lower = [t for t in tasks if t.priority < task.priority]
    if protocol is Protocol.NONE:  # each of the job's own sections can find its lock held, once
        return sum(max((s.duration for t in lower for s in t.segments if s.resource == own.resource), default=0)
                   for own in task.segments if own.resource is not None)
    ceiling = ceilings(tasks)
    sections = [(t, s) for t in lower for s in t.segments
                if s.resource is not None and ceiling[s.resource] >= task.priority]
    if not sections:
        return 0
    if protocol in (Protocol.CEILING, Protocol.IMMEDIATE):
        return max(s.duration for _, s in sections)
    per_task: dict[str, int] = {}
    per_resource: dict[str, int] = {}
    for t, s in sections:
        per_task[t.name] = max(per_task.get(t.name, 0), s.duration)
        assert s.resource is not None
        per_resource[s.resource] = max(per_resource.get(s.resource, 0), s.duration)
    return min(sum(per_task.values()), sum(per_resource.values()))


def least_fixed_point(base: int, interference: Callable[[int], int], limit: int) -> int:
    """The smallest R >= base with R = base + interference(R), iterated from base; a value above `limit`
    as soon as the iteration passes it."""
    response = base
    while True:
        updated = base + interference(response)
        if updated == response or updated > limit:
            return updated
        response = updated


def response_time(task: Task, tasks: Sequence[Task], blocking: int, limit: int | None = None) -> int:
    """The single-job fixed point R = C + B + sum ceil(R/T_j) C_j over higher-priority tasks (valid while R <= T).

    Iteration stops early, returning a value above `limit` (default: the deadline), when R grows past it.
    """
    higher = [t for t in tasks if t.priority > task.priority]
    return least_fixed_point(task.wcet + blocking, lambda r: sum(math.ceil(r / t.period) * t.wcet for t in higher),
                             task.relative_deadline if limit is None else limit)


def busy_period_response(period: int, demand: Callable[[int, int], int], limit: int) -> int | None:
    """Worst response over the jobs of a level-i busy period; None once the busy period passes `limit`.

    `demand(w, q)` is the work that can be due in a window of length w holding q+1 jobs of the task; w_q is
    its least fixed point, the (q+1)-th job's completion, and R = max_q (w_q - q T) until w_q <= (q+1) T."""
    worst = 0
    window = 0
    jobs = 0
    while True:
        window = max(window, demand(0, jobs))
        while True:
            if window > limit:
                return None
            updated = demand(window, jobs)
            if updated <= window:
                break
            window = updated
        worst = max(worst, window - jobs * period)
        if window <= (jobs + 1) * period:
            return worst
        jobs += 1


@dataclass(frozen=True)
class Analysis:
    task: str
    blocking: int
    response: int | None  # None: the busy period grew past the limit
    method: str = "busy period"  # or "carry-in" (no protocol, a task at or above can wait on a lower one)

    def schedulable(self, deadline: int) -> bool:
        return self.response is not None and self.response <= deadline


DEFAULT_LIMIT_PERIODS = 100  # the busy period is followed up to this many times the longest period


def default_limit(tasks: Sequence[Task]) -> int:
    return DEFAULT_LIMIT_PERIODS * max(t.period for t in tasks)


def analyse(tasks: Sequence[Task], protocol: Protocol, limit: int | None = None) -> list[Analysis]:
    """Blocking and worst-case response time of every task (in the order given), all at C(LO)."""
    _check_priorities(tasks)
    limit = default_limit(tasks) if limit is None else limit
    if protocol is Protocol.NONE:
        return _analyse_without_protocol(tasks, limit)
    results = []
    for task in tasks:
        blocking = blocking_bound(task, tasks, protocol)
        results.append(Analysis(task.name, blocking, _classic_response(task, tasks, blocking, limit)))
    return results


def _classic_response(task: Task, tasks: Sequence[Task], blocking: int, limit: int) -> int | None:
    higher = [t for t in tasks if t.priority > task.priority]

    def demand(window: int, jobs: int) -> int:
        return (jobs + 1) * task.wcet + blocking + sum(math.ceil(window / t.period) * t.wcet for t in higher)
    return busy_period_response(task.period, demand, limit)


def waits_on_lower(task: Task, tasks: Sequence[Task]) -> bool:
    """Whether, without a protocol, some task at or above `task`'s priority can wait for a lower task's lock."""
    below: set[str] = set()
    for t in tasks:
        if t.priority < task.priority:
            below |= t.resources
    return any(t.resources & below for t in tasks if t.priority >= task.priority)


def _analyse_without_protocol(tasks: Sequence[Task], limit: int) -> list[Analysis]:
    blocking = {t.name: blocking_bound(t, tasks, Protocol.NONE) for t in tasks}
    bounds: dict[str, int | None] = {}
    coupled = [t for t in tasks if waits_on_lower(t, tasks)]
    for task in tasks:
        if task not in coupled:  # nothing at or above it waits on a lower task: the plain busy period holds
            bounds[task.name] = _classic_response(task, tasks, 0, limit)
    estimates: dict[str, int | None] = {**bounds, **{t.name: t.wcet for t in coupled}}
    while True:  # from below to the least fixed point; every estimate only grows (None: past the limit)
        updated = {t.name: _carry_in_response(t, tasks, blocking[t.name], estimates, limit) for t in coupled}
        if all(updated[name] == estimates[name] for name in updated):
            break
        estimates.update(updated)
    return [Analysis(t.name, blocking[t.name], estimates[t.name], "carry-in" if t in coupled else "busy period")
            for t in tasks]


def _carry_in_response(task: Task, tasks: Sequence[Task], blocking: int, estimates: dict[str, int | None],
                       limit: int) -> int | None:
    """Without a protocol: while the job waits, everything above the lowest possible lock holder can run."""
    holders = [t for t in tasks if t.priority < task.priority and t.resources & task.resources]
    floor = min((t.priority for t in holders), default=task.priority)
    interfering = [t for t in tasks if t.priority > floor and t is not task]
    carry: dict[str, int] = {}
    for t in interfering + holders:
        value = estimates[t.name]
        if value is None:
            return None
        carry[t.name] = value
    own = task.resources

    def demand(window: int, jobs: int) -> int:
        sections = sum(math.ceil((window + carry[t.name]) / t.period) * t.section_time(own) for t in holders)
        return ((jobs + 1) * task.wcet + min((jobs + 1) * blocking, sections)
                + sum(math.ceil((window + carry[t.name]) / t.period) * t.wcet for t in interfering))
    previous = estimates[task.name]
    response = busy_period_response(task.period, demand, limit)
    if response is None or previous is None:
        return None
    return max(response, previous)


# --- Mixed criticality: AMC-rtb ----------------------------------------------------------------------------

@dataclass(frozen=True)
class AmcAnalysis:
    """R(LO) for every task, and for HI tasks R* (AMC-rtb) and R without a mode switch. None: above the period,
    where the single-job recurrence no longer holds."""

    task: str
    criticality: Criticality
    blocking: int
    response_lo: int | None
    response_amc: int | None = None
    response_no_switch: int | None = None

    def schedulable(self, deadline: int) -> bool:
        ok_lo = self.response_lo is not None and self.response_lo <= deadline
        if self.criticality is Criticality.LO:
            return ok_lo
        return ok_lo and self.response_amc is not None and self.response_amc <= deadline


def analyse_amc(tasks: Sequence[Task], protocol: Protocol) -> list[AmcAnalysis]:
    """AMC-rtb (Baruah, Burns, Davis 2011) with the protocol's blocking term, which must be bounded."""
    _check_priorities(tasks)
    if protocol not in BOUNDED_PROTOCOLS:
        raise ConfigError("protocol", protocol.value, "AMC analysis needs a protocol that bounds blocking "
                                                      "(inheritance, ceiling, immediate)")
    results = []
    for task in tasks:
        blocking = blocking_bound(task, tasks, protocol)
        higher = [t for t in tasks if t.priority > task.priority]
        higher_hi = [t for t in higher if t.criticality is Criticality.HI]
        higher_lo = [t for t in higher if t.criticality is Criticality.LO]
        r_lo = _within_period(task, least_fixed_point(
            task.wcet + blocking, _interference([(t.period, t.wcet) for t in higher]), task.period))
        if task.criticality is Criticality.LO:
            results.append(AmcAnalysis(task.name, task.criticality, blocking, r_lo))
            continue
        c_hi = task.budget(Criticality.HI)
        r_amc = None
        if r_lo is not None:
            lo_part = sum(math.ceil(r_lo / t.period) * t.wcet for t in higher_lo)
            r_amc = _within_period(task, least_fixed_point(
                c_hi + blocking + lo_part, _interference([(t.period, t.budget(Criticality.HI)) for t in higher_hi]),
                task.period))
        r_static = _within_period(task, least_fixed_point(
            c_hi + blocking, _interference([(t.period, t.budget(t.criticality)) for t in higher]), task.period))
        results.append(AmcAnalysis(task.name, task.criticality, blocking, r_lo, r_amc, r_static))
    return results


def _interference(higher: Sequence[tuple[int, int]]) -> Callable[[int], int]:
    """sum of ceil(R / T) C over (T, C) pairs."""
    return lambda response: sum(math.ceil(response / period) * wcet for period, wcet in higher)


def _within_period(task: Task, response: int) -> int | None:
    return response if response <= task.period else None


# --- Simulation ------------------------------------------------------------------------------------------

@dataclass
class _Job:
    task: Task
    release: int
    overruns: bool = False
    segment: int = 0
    remaining: int = 0
    holding: str | None = None
    blocked_on: _Job | None = None
    inversion: int = 0
    inversion_after_start: int = 0
    started: bool = False
    hi_mode: bool = False  # the job saw the system in HI mode
    abandon: bool = False  # a LO job caught holding a lock at the switch: dropped when it unlocks
    finish: int | None = None
    segments: tuple[Segment, ...] = ()

    def __post_init__(self) -> None:
        extra = (Segment(self.task.overrun),) if self.overruns and self.task.overrun else ()
        self.segments = self.task.segments + extra
        self.remaining = self.segments[0].duration

    @property
    def wants(self) -> str | None:
        resource = self.segments[self.segment].resource
        return resource if resource is not None and self.holding != resource else None

    @property
    def past_lo_budget(self) -> bool:
        return self.segment >= len(self.task.segments)


@dataclass(frozen=True)
class TaskStats:
    task: str
    jobs: int
    worst_response: int
    worst_blocking: int
    misses: int
    dropped: int = 0
    worst_response_lo_mode: int = 0  # jobs that lived entirely in LO mode
    worst_response_hi_mode: int = 0  # jobs that saw HI mode
    worst_blocking_after_start: int = 0


@dataclass(frozen=True)
class JobRecord:
    task: str
    release: int
    response: int | None  # None: dropped at a mode switch
    hi_mode: bool


@dataclass(frozen=True)
class Trace:
    """Who ran in each tick (task name or None), which resource the runner held, and the mode switches."""

    running: tuple[str | None, ...]
    holding: tuple[str | None, ...]
    releases: tuple[tuple[str, int], ...]
    responses: tuple[tuple[str, int, int], ...]  # task, release, response time
    hi_mode: tuple[bool, ...] = ()
    switches: tuple[int, ...] = ()
    jobs: tuple[JobRecord, ...] = ()


@dataclass(frozen=True)
class SimulationResult:
    protocol: Protocol
    horizon: int
    stats: dict[str, TaskStats]
    trace: Trace = field(repr=False)


Overruns = Callable[[Task, int], bool]  # (task, release) -> does this HI job run to C(HI)?


def simulate(tasks: Sequence[Task], protocol: Protocol, horizon: int, overruns: Overruns | None = None,
             mode_switch: bool = True) -> SimulationResult:
    """Run the task set tick by tick from time 0 to `horizon`; jobs released before the horizon run to completion
    or are judged at the horizon.

    `overruns` says which HI jobs run past C(LO) (default: none). The instant a HI job has used its C(LO)
    budget without finishing, the system switches to HI mode (before that instant's releases); with `mode_switch` (AMC) pending LO jobs are then dropped (one that
    holds a lock after its critical section) and LO releases are skipped until the next idle instant, when the
    system returns to LO mode. Without `mode_switch` the mode is only recorded."""
    _check_priorities(tasks)
    ceiling = ceilings(tasks)
    pending: list[_Job] = []
    done: list[_Job] = []
    dropped: list[_Job] = []
    running_trace: list[str | None] = []
    holding_trace: list[str | None] = []
    mode_trace: list[bool] = []
    releases: list[tuple[str, int]] = []
    switches: list[int] = []
    hi_mode = False
    time = 0
    give_up = horizon + 20 * max(t.period for t in tasks)
    while time < horizon or pending:
        if hi_mode and not pending:
            hi_mode = False  # an idle instant: back to LO mode
        if time < horizon:
            for task in tasks:
                if time >= task.offset and (time - task.offset) % task.period == 0:
                    if hi_mode and mode_switch and task.criticality is Criticality.LO:
                        continue
                    overrun = overruns is not None and task.overrun > 0 and overruns(task, time)
                    pending.append(_Job(task, time, overrun, hi_mode=hi_mode))
                    releases.append((task.name, time))
        if time >= give_up:
            break  # an overloaded set: stop judging
        job = _dispatch(pending, protocol, ceiling)
        running_trace.append(job.task.name if job else None)
        holding_trace.append(job.holding if job else None)
        mode_trace.append(hi_mode)
        time += 1
        if job is None:
            continue
        _run_one_tick(job, pending, done, dropped, time - 1)
        if job.past_lo_budget and job.finish is None and not hi_mode:
            # The budget is spent and the job is not done: the switch happens now, before this instant's releases.
            hi_mode = True
            switches.append(time)
            for other in list(pending):
                other.hi_mode = True
                if mode_switch and other.task.criticality is Criticality.LO:
                    if other.holding is None:
                        pending.remove(other)
                        dropped.append(other)
                    else:
                        other.abandon = True
    stats = {task.name: _task_stats(task, done, pending, dropped, time) for task in tasks}
    finished = tuple(sorted((j.task.name, j.release, j.finish - j.release) for j in done if j.finish is not None))
    records = [JobRecord(j.task.name, j.release, (j.finish if j.finish is not None else time) - j.release,
                         j.hi_mode) for j in done + pending]
    records += [JobRecord(j.task.name, j.release, None, True) for j in dropped]
    return SimulationResult(protocol, horizon, stats,
                            Trace(tuple(running_trace), tuple(holding_trace), tuple(releases), finished,
                                  tuple(mode_trace), tuple(switches),
                                  tuple(sorted(records, key=lambda r: (r.release, r.task)))))


def _run_one_tick(job: _Job, pending: list[_Job], done: list[_Job], dropped: list[_Job], time: int) -> None:
    job.started = True
    for other in pending:
        if other is not job and other.task.priority > job.task.priority:
            other.inversion += 1
            if other.started:
                other.inversion_after_start += 1
    job.remaining -= 1
    if job.remaining:
        return
    job.holding = None
    job.segment += 1
    if job.segment == len(job.segments):
        job.finish = time + 1
        pending.remove(job)
        done.append(job)
    elif job.abandon:
        pending.remove(job)
        dropped.append(job)
    else:
        job.remaining = job.segments[job.segment].duration


def _task_stats(task: Task, done: list[_Job], pending: list[_Job], dropped: list[_Job], time: int) -> TaskStats:
    jobs = [j for j in done + pending if j.task is task]
    responses = [((j.finish if j.finish is not None else time) - j.release, j) for j in jobs]
    return TaskStats(
        task=task.name, jobs=len(jobs) + sum(1 for j in dropped if j.task is task),
        worst_response=max((r for r, _ in responses), default=0),
        worst_blocking=max((j.inversion for j in jobs), default=0),
        misses=sum(1 for r, _ in responses if r > task.relative_deadline),
        dropped=sum(1 for j in dropped if j.task is task),
        worst_response_lo_mode=max((r for r, j in responses if not j.hi_mode), default=0),
        worst_response_hi_mode=max((r for r, j in responses if j.hi_mode), default=0),
        worst_blocking_after_start=max((j.inversion_after_start for j in jobs), default=0))


def _dispatch(pending: list[_Job], protocol: Protocol, ceiling: dict[str, int]) -> _Job | None:
    """Pick the job that runs this tick, granting or refusing the lock it asks for."""
    for job in pending:
        job.blocked_on = None
    while True:
        candidates = [j for j in pending if j.blocked_on is None]
        if not candidates:
            return None
        effective = _effective_priorities(pending, protocol, ceiling)
        immediate = protocol is Protocol.IMMEDIATE  # ties go to the lock holder: a job preempts only if higher
        job = max(candidates, key=lambda j: (effective[id(j)], immediate and j.holding is not None, -j.release))
        resource = job.wants
        if resource is None:
            return job
        holder = _lock_holder(pending, job, resource, protocol, ceiling)
        if holder is None:
            job.holding = resource
            return job
        job.blocked_on = holder


def _lock_holder(pending: list[_Job], job: _Job, resource: str, protocol: Protocol,
                 ceiling: dict[str, int]) -> _Job | None:
    """The job that prevents `job` from locking `resource` now, or None if the lock is granted."""
    owner = next((j for j in pending if j.holding == resource), None)
    if owner is not None:
        return owner
    if protocol is not Protocol.CEILING:
        return None
    others = [j for j in pending if j is not job and j.holding is not None]
    if not others:
        return None
    highest = max(others, key=lambda j: ceiling[j.holding or ""])
    return highest if ceiling[highest.holding or ""] >= job.task.priority else None


def _effective_priorities(pending: list[_Job], protocol: Protocol, ceiling: dict[str, int]) -> dict[int, int]:
    effective = {id(j): j.task.priority for j in pending}
    if protocol is Protocol.NONE:
        return effective
    if protocol is Protocol.IMMEDIATE:
        for job in pending:
            if job.holding is not None:
                effective[id(job)] = max(effective[id(job)], ceiling[job.holding])
    changed = True
    while changed:
        changed = False
        for job in pending:
            holder = job.blocked_on
            if holder is not None and effective[id(holder)] < effective[id(job)]:
                effective[id(holder)] = effective[id(job)]
                changed = True
    return effective


def hyperperiod(tasks: Sequence[Task]) -> int:
    return math.lcm(*(t.period for t in tasks))


def merge_stats(old: TaskStats | None, new: TaskStats) -> TaskStats:
    """The worst of two runs (counts added)."""
    if old is None:
        return new
    return TaskStats(new.task, old.jobs + new.jobs, max(old.worst_response, new.worst_response),
                     max(old.worst_blocking, new.worst_blocking), old.misses + new.misses,
                     old.dropped + new.dropped, max(old.worst_response_lo_mode, new.worst_response_lo_mode),
                     max(old.worst_response_hi_mode, new.worst_response_hi_mode),
                     max(old.worst_blocking_after_start, new.worst_blocking_after_start))


def random_phasing(tasks: Sequence[Task], rng: np.random.Generator) -> list[Task]:
    return [with_offset(t, int(rng.integers(0, t.period))) for t in tasks]


def worst_over_phasings(tasks: Sequence[Task], protocol: Protocol, phasings: int, seed: int,
                        extra: Sequence[Sequence[Task]] = (), overrun_probability: float = 0.0,
                        mode_switch: bool = True) -> dict[str, TaskStats]:
    """Worst response and blocking per task over random release offsets (plus any given task sets), one
    hyperperiod each; each HI job runs to C(HI) with `overrun_probability`."""
    rng = np.random.default_rng(seed)
    sets = [list(extra_set) for extra_set in extra]
    sets += [random_phasing(tasks, rng) for _ in range(phasings)]
    return worst_over_sets(sets, protocol, _random_overruns(rng, overrun_probability), mode_switch)


def worst_over_sets(sets: Iterable[Sequence[Task]], protocol: Protocol, overruns: Overruns | None = None,
                    mode_switch: bool = True) -> dict[str, TaskStats]:
    worst: dict[str, TaskStats] = {}
    for task_set in sets:
        horizon = hyperperiod(task_set) + max(t.offset for t in task_set)
        for name, s in simulate(task_set, protocol, horizon, overruns, mode_switch).stats.items():
            worst[name] = merge_stats(worst.get(name), s)
    return worst


def _random_overruns(rng: np.random.Generator, probability: float) -> Overruns | None:
    if probability <= 0:
        return None
    if probability >= 1:
        return lambda task, release: True
    return lambda task, release: bool(rng.random() < probability)


def with_offset(task: Task, offset: int) -> Task:
    return Task(task.name, task.priority, task.period, task.segments, task.deadline, offset, task.criticality,
                task.c_hi)


# --- The vehicle scenario ------------------------------------------------------------------------------------

TICKS_PER_MS = 10  # one tick = 100 microseconds


@dataclass(frozen=True)
class Scenario:
    """The assumed constants of the vehicle task set (ms); all invented for illustration."""

    critical_section_ms: float = 2.0  # infotainment's time holding the bus lock
    medium_ms: float = 6.0  # navigation's execution time
    brake_lo_ms: float = 0.8
    brake_hi_ms: float = 1.2
    stability_lo_ms: float = 5.0
    stability_hi_ms: float = 10.0
    brake_period_ms: float = 5.0
    navigation_period_ms: float = 20.0
    stability_period_ms: float = 25.0
    infotainment_period_ms: float = 50.0


def _ticks(ms: float) -> int:
    return round(ms * TICKS_PER_MS)


def brake_scenario(cs_ms: float = 2.0, medium_ms: float = 6.0, scenario: Scenario | None = None) -> list[Task]:
    """A brake controller (HI) and infotainment (LO) share the vehicle-bus driver lock; navigation (LO) and a
    stability controller (HI) share nothing. Released in the worst phasing for the brake task: infotainment takes
    the lock, then the others arrive. Priorities are rate-monotonic, not by criticality."""
    s = scenario or Scenario(critical_section_ms=cs_ms, medium_ms=medium_ms)
    brake_rest = _ticks(s.brake_lo_ms) - 5
    if brake_rest <= 0:
        raise ConfigError("--brake-lo-ms", s.brake_lo_ms, "must exceed the brake task's 0.5 ms in the lock and before it")
    hi = Criticality.HI
    return [
        Task("brake", 4, _ticks(s.brake_period_ms), (Segment(2), Segment(3, "bus"), Segment(brake_rest)), offset=11,
             criticality=hi, c_hi=_ticks(s.brake_hi_ms)),
        Task("navigation", 3, _ticks(s.navigation_period_ms), (Segment(_ticks(s.medium_ms)),), offset=12),
        Task("stability", 2, _ticks(s.stability_period_ms), (Segment(_ticks(s.stability_lo_ms)),), offset=13,
             criticality=hi, c_hi=_ticks(s.stability_hi_ms)),
        Task("infotainment", 1, _ticks(s.infotainment_period_ms),
             (Segment(10), Segment(_ticks(s.critical_section_ms), "bus"), Segment(10)), offset=0),
    ]


def synchronous(tasks: Sequence[Task]) -> list[Task]:
    return [with_offset(t, 0) for t in tasks]


@dataclass(frozen=True)
class SeedRun:
    """One seed: per protocol, the worst over random phasings; and the AMC runs with random overruns."""

    inversion: dict[Protocol, dict[str, TaskStats]]
    amc: dict[str, TaskStats]
    no_switch: dict[str, TaskStats]


def run_seed(tasks: Sequence[Task], phasings: int, overrun_probability: float, amc_protocol: Protocol,
             seed: int) -> SeedRun:
    rng = np.random.default_rng(seed)
    inversion = {p: worst_over_sets([random_phasing(tasks, rng) for _ in range(phasings)], p) for p in Protocol}
    amc_sets = [random_phasing(tasks, rng) for _ in range(phasings)]
    draws = _random_overruns(np.random.default_rng([seed, 1]), overrun_probability)
    amc = worst_over_sets(amc_sets, amc_protocol, draws, mode_switch=True)
    draws = _random_overruns(np.random.default_rng([seed, 1]), overrun_probability)
    no_switch = worst_over_sets(amc_sets, amc_protocol, draws, mode_switch=False)
    return SeedRun(inversion, amc, no_switch)


class MixedCriticalityModel:
    name = "mixed-criticality"
    summary = "Priority inversion (none, inheritance, ceiling, immediate ceiling) and AMC mixed criticality, simulated and analysed"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = Scenario()
        parser.add_argument("--critical-section-ms", type=float, default=d.critical_section_ms,
                            help="infotainment's time holding the bus lock (default: %(default)s)")
        parser.add_argument("--medium-ms", type=float, default=d.medium_ms,
                            help="navigation's execution time per 20 ms (default: %(default)s)")
        parser.add_argument("--brake-hi-ms", type=float, default=d.brake_hi_ms,
                            help="the brake task's C(HI); its C(LO) is 0.8 ms (default: %(default)s)")
        parser.add_argument("--stability-lo-ms", type=float, default=d.stability_lo_ms,
                            help="the stability task's C(LO) per 25 ms (default: %(default)s)")
        parser.add_argument("--stability-hi-ms", type=float, default=d.stability_hi_ms,
                            help="the stability task's C(HI) (default: %(default)s)")
        parser.add_argument("--overrun-probability", type=float, default=0.2,
                            help="chance that a HI job runs to its C(HI) in the AMC simulation (default: %(default)s)")
        parser.add_argument("--amc-protocol", choices=[p.value for p in BOUNDED_PROTOCOLS],
                            default=Protocol.IMMEDIATE.value,
                            help="locking protocol in the mixed-criticality part (default: %(default)s)")
        parser.add_argument("--limit-ms", type=float, default=1000.0,
                            help="the analysis gives up when a busy period grows past this (default: %(default)s)")
        parser.add_argument("--phasings", type=int, default=8,
                            help="random release phasings simulated per protocol and seed (default: %(default)s)")
        add_seed_arguments(parser, first=2)

    def run(self, args: argparse.Namespace) -> LabResult:
        scenario = Scenario(critical_section_ms=args.critical_section_ms, medium_ms=args.medium_ms,
                            brake_hi_ms=args.brake_hi_ms, stability_lo_ms=args.stability_lo_ms,
                            stability_hi_ms=args.stability_hi_ms)
        if not 0 <= args.overrun_probability <= 1:
            raise ConfigError("--overrun-probability", args.overrun_probability, "is a probability, 0 to 1")
        if args.phasings < 1:
            raise ConfigError("--phasings", args.phasings, "simulate at least one phasing")
        tasks = brake_scenario(scenario=scenario)
        amc_protocol = Protocol(args.amc_protocol)
        limit = _ticks(args.limit_ms)
        seeds = list(seeds_of(args))
        runs = [run_seed(tasks, args.phasings, args.overrun_probability, amc_protocol, seed) for seed in seeds]
        critical = {p: simulate(tasks, p, hyperperiod(tasks) + max(t.offset for t in tasks)) for p in Protocol}
        analyses = {p: {a.task: a for a in analyse(tasks, p, limit)} for p in Protocol}
        amc = {a.task: a for a in analyse_amc(tasks, amc_protocol)}
        every_hi = synchronous(tasks)
        amc_critical = worst_over_sets([every_hi], amc_protocol, lambda task, release: True, mode_switch=True)
        no_switch_critical = worst_over_sets([every_hi], amc_protocol, lambda task, release: True, mode_switch=False)
        inversion_rows = _inversion_rows(tasks, analyses, critical, runs)
        amc_rows = _amc_rows(tasks, amc, amc_critical, no_switch_critical, runs)
        brake_none = estimate([float(r.inversion[Protocol.NONE]["brake"].worst_response) for r in runs])
        headline: tuple[tuple[str, float | Estimate], ...] = (
            ("brake R none ms", _ms_or_nan(analyses[Protocol.NONE]["brake"].response)),
            ("brake R immediate ms", _ms_or_nan(analyses[Protocol.IMMEDIATE]["brake"].response)),
            ("brake sim none ms", brake_none.divided_by(TICKS_PER_MS)),
            ("stability R* AMC ms", _ms_or_nan(amc["stability"].response_amc)),
        )
        trace_amc = simulate(every_hi, amc_protocol, hyperperiod(tasks), lambda task, release: task.name == "stability"
                             and release == 0).trace
        return LabResult(
            tables=(task_table(tasks), Table(
                title="Priority inversion: brake controller vs infotainment's lock (times in ms, all at C(LO))",
                columns=("protocol", "task", "B", "R bound", "R sim worst", "R sim per seed", "blocked", "D",
                         "misses per seed"),
                rows=tuple(inversion_rows),
                notes=("B: analytic blocking (per busy period; without a protocol, per job); R bound: worst-case "
                       "response time from the busy period, 'unbounded' past --limit-ms; R sim worst: the worst "
                       "simulated response over the critical phasing and every seed's random phasings; R sim per "
                       "seed: each seed's worst over its random phasings, mean [95% CI] over seeds; blocked: the "
                       "worst time a lower-priority task ran while a job waited; D: deadline.",
                       "The CI is over seeds of a per-seed maximum: it says how reliably a search of this size finds "
                       "long responses, not where the true worst case lies; the analytic bound is what limits it.",
                       f"{args.phasings} random phasings per protocol and seed, {len(seeds)} seeds, one hyperperiod "
                       "each.",
                       "Without a protocol, B is the lock time only: navigation and stability run while the brake "
                       "job waits, and the bound charges them (method 'carry-in').")),
                Table(
                title=f"Mixed criticality, AMC with the {amc_protocol.value} protocol (times in ms)",
                columns=("task", "crit", "D", "R(LO)", "R* AMC-rtb", "R no switch", "sim LO mode",
                         "sim HI mode", "sim HI per seed", "misses AMC", "misses no switch", "dropped per seed"),
                rows=tuple(amc_rows),
                notes=("R(LO): every task at C(LO); R*: AMC-rtb after a switch to HI mode (HI tasks); R no switch: "
                       "HI tasks at C(HI) while LO tasks keep running; '> T': the single-job recurrence passes the "
                       "period.",
                       f"sim: every HI job runs to C(HI) with probability {args.overrun_probability:g}, over "
                       f"{args.phasings} random phasings per seed, plus a synchronous release in which every HI job "
                       "overruns; sim LO/HI mode: worst response of jobs that lived only in LO mode / saw HI mode; sim HI "
                       "per seed: mean [95% CI] over seeds of each seed's worst; misses: totals "
                       "over all runs, with and without the mode switch; dropped: LO jobs abandoned at switches.",
                       "The system returns to LO mode at the first idle instant."))),
            plot=lambda figure: plot(figure, tasks, {p: r.trace for p, r in critical.items()}, trace_amc),
            summary=_summary(tasks, analyses, critical, runs, amc, amc_protocol, amc_critical, no_switch_critical),
            headline=headline,
            assumptions=_assumptions(scenario, args),
        )


def _ms(ticks: int | None, unbounded: str = "unbounded") -> object:
    return unbounded if ticks is None else ticks / TICKS_PER_MS


def _ms_or_nan(ticks: int | None) -> float:
    return math.nan if ticks is None else ticks / TICKS_PER_MS


def _inversion_rows(tasks: Sequence[Task], analyses: dict[Protocol, dict[str, Analysis]],
                    critical: dict[Protocol, SimulationResult], runs: Sequence[SeedRun]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for protocol in Protocol:
        for task in tasks:
            a = analyses[protocol][task.name]
            worst = max([critical[protocol].stats[task.name].worst_response]
                        + [r.inversion[protocol][task.name].worst_response for r in runs])
            blocked = max([critical[protocol].stats[task.name].worst_blocking]
                          + [r.inversion[protocol][task.name].worst_blocking for r in runs])
            per_seed = estimate([float(r.inversion[protocol][task.name].worst_response) for r in runs])
            misses = estimate([float(r.inversion[protocol][task.name].misses) for r in runs])
            rows.append((protocol.value, task.name, _ms(a.blocking), _ms(a.response), worst / TICKS_PER_MS,
                         per_seed.divided_by(TICKS_PER_MS), blocked / TICKS_PER_MS, _ms(task.relative_deadline), misses))
    return rows


def _amc_rows(tasks: Sequence[Task], amc: dict[str, AmcAnalysis], amc_critical: dict[str, TaskStats],
              no_switch_critical: dict[str, TaskStats], runs: Sequence[SeedRun]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for task in tasks:
        a = amc[task.name]
        hi = task.criticality is Criticality.HI
        worst_lo = max([amc_critical[task.name].worst_response_lo_mode]
                       + [r.amc[task.name].worst_response_lo_mode for r in runs])
        worst_hi = max([amc_critical[task.name].worst_response_hi_mode]
                       + [r.amc[task.name].worst_response_hi_mode for r in runs])
        per_seed = estimate([float(r.amc[task.name].worst_response_hi_mode) for r in runs]).divided_by(TICKS_PER_MS)
        misses = amc_critical[task.name].misses + sum(r.amc[task.name].misses for r in runs)
        misses_static = no_switch_critical[task.name].misses + sum(r.no_switch[task.name].misses for r in runs)
        dropped = estimate([float(r.amc[task.name].dropped) for r in runs])
        rows.append((task.name, task.criticality.value, _ms(task.relative_deadline), _ms(a.response_lo, "> T"),
                     _ms(a.response_amc, "> T") if hi else "dropped", _ms(a.response_no_switch, "> T") if hi else "-",
                     worst_lo / TICKS_PER_MS, worst_hi / TICKS_PER_MS if hi else "-", per_seed if hi else "-",
                     misses, misses_static, "-" if hi else dropped))
    return rows


def task_table(tasks: Sequence[Task]) -> Table:
    rows = []
    for task in tasks:
        sections = ", ".join(f"{s.resource} {s.duration / TICKS_PER_MS:g}" for s in task.segments if s.resource)
        rows.append((task.name, task.criticality.value, task.priority, task.wcet / TICKS_PER_MS,
                     task.budget(Criticality.HI) / TICKS_PER_MS, task.period / TICKS_PER_MS,
                     task.relative_deadline / TICKS_PER_MS, sections or "-"))
    return Table(title="Task set (times in ms; higher priority number runs first)",
                 columns=("task", "criticality", "priority", "C(LO)", "C(HI)", "T", "D", "critical sections"),
                 rows=tuple(rows))


def _summary(tasks: Sequence[Task], analyses: dict[Protocol, dict[str, Analysis]],
             critical: dict[Protocol, SimulationResult], runs: Sequence[SeedRun], amc: dict[str, AmcAnalysis],
             amc_protocol: Protocol, amc_critical: dict[str, TaskStats],
             no_switch_critical: dict[str, TaskStats]) -> tuple[str, ...]:
    brake = tasks[0]
    lines = []
    for protocol in Protocol:
        worst = max([critical[protocol].stats["brake"].worst_response]
                    + [r.inversion[protocol]["brake"].worst_response for r in runs])
        misses = critical[protocol].stats["brake"].misses + sum(r.inversion[protocol]["brake"].misses for r in runs)
        bound = analyses[protocol]["brake"].response
        lines.append(f"{protocol.value:>11}: brake worst response {worst / TICKS_PER_MS:g} ms (bound "
                     f"{_ms(bound)} ms) against a {brake.relative_deadline / TICKS_PER_MS:g} ms deadline, "
                     f"{misses} missed deadlines")
    hi_tasks = [t for t in tasks if t.criticality is Criticality.HI]
    amc_misses = sum(amc_critical[t.name].misses + sum(r.amc[t.name].misses for r in runs) for t in hi_tasks)
    static_misses = sum(no_switch_critical[t.name].misses + sum(r.no_switch[t.name].misses for r in runs)
                        for t in hi_tasks)
    stability = amc["stability"]
    lines.append(f"AMC ({amc_protocol.value}): stability R* = {_ms(stability.response_amc, '> T')} ms against "
                 f"{_ms(next(t for t in tasks if t.name == 'stability').relative_deadline)} ms; HI deadline misses "
                 f"{amc_misses} with the mode switch, {static_misses} without it")
    return tuple(lines)


def _assumptions(s: Scenario, args: argparse.Namespace) -> tuple[Assumption, ...]:
    invented = "assumed (invented task set, not from a vehicle)"
    return (
        Assumption("tick ms", 1 / TICKS_PER_MS, "assumed (simulation and analysis resolution)"),
        Assumption("brake C(LO) ms", s.brake_lo_ms, invented),
        Assumption("brake C(HI) ms", s.brake_hi_ms, invented),
        Assumption("brake lock hold ms", 0.3, invented),
        Assumption("brake T = D ms", s.brake_period_ms, invented),
        Assumption("navigation C ms", s.medium_ms, invented),
        Assumption("navigation T = D ms", s.navigation_period_ms, invented),
        Assumption("stability C(LO) ms", s.stability_lo_ms, invented),
        Assumption("stability C(HI) ms", s.stability_hi_ms, invented),
        Assumption("stability T = D ms", s.stability_period_ms, invented),
        Assumption("infotainment C ms", 2.0 + s.critical_section_ms, invented),
        Assumption("infotainment lock hold ms", s.critical_section_ms, invented),
        Assumption("infotainment T = D ms", s.infotainment_period_ms, invented),
        Assumption("priorities", "rate-monotonic", "assumed (Liu & Layland's order; not by criticality)"),
        Assumption("HI job overrun probability", args.overrun_probability, "assumed (simulation only)"),
        Assumption("return to LO mode", "at the first idle instant", "assumed (AMC-rtb covers the switch only)"),
        Assumption("analysis limit ms", args.limit_ms, "assumed (where a growing busy period is called unbounded)"),
    )


def _draw_schedule(axes: Axes, trace: Trace, names: list[str], window: int) -> None:
    colours = {"brake": "#d62728", "navigation": "#1f77b4", "stability": "#9467bd", "infotainment": "#2ca02c"}
    for tick, (name, held) in enumerate(zip(trace.running[:window], trace.holding[:window], strict=True)):
        if name is None:
            continue
        axes.broken_barh([(tick / TICKS_PER_MS, 1 / TICKS_PER_MS)], (names.index(name) - 0.35, 0.7),
                         facecolors=colours.get(name, "grey"), hatch="///" if held else None,
                         edgecolor="black" if held else None, linewidth=0)
    axes.set_yticks(range(len(names)), names)
    axes.set_ylim(len(names) - 0.5, -0.5)
    axes.set_xlim(0, window / TICKS_PER_MS)


def plot(figure: Figure, tasks: Sequence[Task], traces: dict[Protocol, Trace], amc_trace: Trace) -> None:
    axes_list = figure.subplots(len(traces) + 1, 1)
    figure.set_figheight(max(figure.get_figheight(), 2.2 * (len(traces) + 1)))
    names = [t.name for t in sorted(tasks, key=lambda t: -t.priority)]
    window = 20 * TICKS_PER_MS
    brake = next(t for t in tasks if t.name == "brake")
    for axes, (protocol, trace) in zip(axes_list, traces.items(), strict=False):
        _draw_schedule(axes, trace, names, window)
        for name, release in trace.releases:
            if name == "brake" and release < window:
                axes.axvline(release / TICKS_PER_MS, color="#d62728", linestyle=":", linewidth=0.8)
                axes.axvline((release + brake.relative_deadline) / TICKS_PER_MS, color="black",
                             linestyle="--", linewidth=0.6)
        first = next((r for n, _, r in trace.responses if n == "brake"), None)
        verdict = "" if first is None else (f": first brake job responds in {first / TICKS_PER_MS:g} ms"
                                            + (" (deadline missed)" if first > brake.relative_deadline else ""))
        axes.set_title(f"protocol {protocol.value}{verdict}", fontsize="medium", loc="left")
    axes = axes_list[-1]
    amc_window = 30 * TICKS_PER_MS
    _draw_schedule(axes, amc_trace, names, amc_window)
    for switch in amc_trace.switches:
        if switch < amc_window:
            axes.axvline(switch / TICKS_PER_MS, color="black", linewidth=1.2)
    hi_ticks = [tick for tick, hi in enumerate(amc_trace.hi_mode[:amc_window]) if hi]
    if hi_ticks:
        axes.axvspan(hi_ticks[0] / TICKS_PER_MS, (hi_ticks[-1] + 1) / TICKS_PER_MS, color="#ffdd99", alpha=0.5,
                     zorder=0)
    axes.set_title("AMC: the stability job overruns C(LO); shaded: HI mode, LO jobs dropped", fontsize="medium",
                   loc="left")
    axes.set_xlabel("time (ms); hatched: holding the bus lock; dotted: brake release, dashed: its deadline")
    figure.suptitle("Critical phasing: the brake job waits for infotainment's lock; then a mode switch")


MODEL = MixedCriticalityModel()
