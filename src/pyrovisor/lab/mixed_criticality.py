"""Mixed criticality on one CPU: priority inversion, priority inheritance and priority ceiling, simulated and analysed.

A fixed-priority preemptive scheduler runs periodic tasks; jobs may lock shared resources inside
critical sections. Three locking protocols:

- none: a job waiting for a lock waits at its own priority; the holder keeps its low priority, so any
  medium-priority job preempts the holder and prolongs the wait without bound (uncontrolled inversion,
  the Mars Pathfinder failure: a low-priority meteorological task held the information-bus mutex, medium
  tasks ran, the high-priority bus task missed its deadline and a watchdog reset the computer).
- priority inheritance (PIP): the holder runs at the highest priority of the jobs it blocks.
- priority ceiling (PCP, Sha et al.'s original protocol): each resource has a ceiling, the priority of
  its most urgent user; a job may lock only if its priority is above the ceilings of all resources
  locked by other jobs, else it blocks and the job holding the highest-ceiling lock inherits.

Response-time analysis (Joseph and Pandya 1986; with blocking, Audsley et al. 1993): the worst-case
response time of task i is the smallest fixed point of

    R = C_i + B_i + sum over higher-priority tasks j of ceil(R / T_j) * C_j

iterated from R = C_i + B_i. Blocking bounds (Sha, Rajkumar, Lehoczky 1990):
    PCP: B_i = the longest critical section of a lower-priority task on a resource whose ceiling >= P_i
         (a job is blocked for at most one critical section)
    PIP: B_i = min(sum over lower tasks of their longest such section, sum over such resources of their
         longest section by a lower task)       (at most min(n, m) critical sections)
    none: unbounded as soon as a task of intermediate priority exists.
The analysis holds for deadlines <= periods and non-nested critical sections, which the simulator uses.

Sources
- L. Sha, R. Rajkumar, J. P. Lehoczky, "Priority Inheritance Protocols: An Approach to Real-Time
  Synchronization", IEEE Transactions on Computers 39(9):1175-1185, 1990 (the protocols and their
  blocking theorems).
- M. Joseph, P. Pandya, "Finding Response Times in a Real-Time System", The Computer Journal
  29(5):390-395, 1986 (exact worst-case response times under fixed priorities).
- N. Audsley, A. Burns, M. Richardson, K. Tindell, A. Wellings, "Applying new scheduling theory to static
  priority pre-emptive scheduling", Software Engineering Journal 8(5):284-292, 1993 (blocking term B).
- G. E. Reeves, "What really happened on Mars Rover Pathfinder", account of the 1997 resets (bc_dist,
  ASI/MET, VxWorks mutex, fixed by enabling priority inheritance).
The brake/infotainment task set is invented for illustration; its numbers are not from a vehicle.
"""

from __future__ import annotations

import argparse
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class Protocol(enum.Enum):
    NONE = "none"
    INHERITANCE = "inheritance"
    CEILING = "ceiling"


@dataclass(frozen=True)
class Segment:
    """A stretch of a job's execution, inside a critical section on `resource` or outside (None)."""

    duration: int
    resource: str | None = None


@dataclass(frozen=True)
class Task:
    """A periodic task. Higher `priority` numbers are more urgent; times are integer ticks."""

    name: str
    priority: int
    period: int
    segments: tuple[Segment, ...]
    deadline: int = 0  # 0: equal to the period
    offset: int = 0
    criticality: str = ""

    def __post_init__(self) -> None:
        if self.period <= 0 or not self.segments or any(s.duration <= 0 for s in self.segments):
            raise ConfigError("task", self.name, "needs a positive period and positive segment durations")
        if self.deadline > self.period:
            raise ConfigError("task", self.name, "the analysis needs deadline <= period")

    @property
    def wcet(self) -> int:
        return sum(s.duration for s in self.segments)

    @property
    def relative_deadline(self) -> int:
        return self.deadline or self.period

    @property
    def resources(self) -> set[str]:
        return {s.resource for s in self.segments if s.resource is not None}


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


# --- Analysis --------------------------------------------------------------------------------------------

def blocking_bound(task: Task, tasks: Sequence[Task], protocol: Protocol) -> int | None:
    """B_i for `task` under `protocol`; None when the blocking is unbounded (no protocol)."""
    ceiling = ceilings(tasks)
    lower = [t for t in tasks if t.priority < task.priority]
    if protocol is Protocol.NONE:  # only direct blocking, on resources the task itself uses
        sections = [(t, s) for t in lower for s in t.segments if s.resource in task.resources]
    else:  # also push-through (inheritance) and ceiling blocking
        sections = [(t, s) for t in lower for s in t.segments
                    if s.resource is not None and ceiling[s.resource] >= task.priority]
    if not sections:
        return 0
    longest = max(s.duration for _, s in sections)
    if protocol is Protocol.CEILING:
        return longest
    per_task: dict[str, int] = {}
    per_resource: dict[str, int] = {}
    for t, s in sections:
        per_task[t.name] = max(per_task.get(t.name, 0), s.duration)
        assert s.resource is not None
        per_resource[s.resource] = max(per_resource.get(s.resource, 0), s.duration)
    inheritance = min(sum(per_task.values()), sum(per_resource.values()))
    if protocol is Protocol.INHERITANCE:
        return inheritance
    holders = {t.priority for t, _ in sections}
    intermediate = any(min(holders) < t.priority < task.priority for t in tasks)
    return None if intermediate else inheritance


def response_time(task: Task, tasks: Sequence[Task], blocking: int, limit: int | None = None) -> int:
    """The fixed point of R = C + B + sum ceil(R/T_j) C_j over higher-priority tasks.

    Iteration stops early, returning a value above `limit` (default: the deadline), when R grows past it.
    """
    higher = [t for t in tasks if t.priority > task.priority]
    limit = task.relative_deadline if limit is None else limit
    response = task.wcet + blocking
    while True:
        updated = task.wcet + blocking + sum(math.ceil(response / t.period) * t.wcet for t in higher)
        if updated == response or updated > limit:
            return updated
        response = updated


@dataclass(frozen=True)
class Analysis:
    task: str
    blocking: int | None
    response: int | None  # None: unbounded

    def schedulable(self, deadline: int) -> bool:
        return self.response is not None and self.response <= deadline


def analyse(tasks: Sequence[Task], protocol: Protocol) -> list[Analysis]:
    _check_priorities(tasks)
    results = []
    for task in tasks:
        blocking = blocking_bound(task, tasks, protocol)
        response = None if blocking is None else response_time(task, tasks, blocking)
        results.append(Analysis(task.name, blocking, response))
    return results


# --- Simulation ------------------------------------------------------------------------------------------

@dataclass
class _Job:
    task: Task
    release: int
    segment: int = 0
    remaining: int = 0
    holding: str | None = None
    blocked_on: _Job | None = None
    inversion: int = 0
    finish: int | None = None

    def __post_init__(self) -> None:
        self.remaining = self.task.segments[0].duration

    @property
    def wants(self) -> str | None:
        resource = self.task.segments[self.segment].resource
        return resource if resource is not None and self.holding != resource else None


@dataclass(frozen=True)
class TaskStats:
    task: str
    jobs: int
    worst_response: int
    worst_blocking: int
    misses: int


@dataclass(frozen=True)
class Trace:
    """Who ran in each tick (task name or None), and which resource the runner held."""

    running: tuple[str | None, ...]
    holding: tuple[str | None, ...]
    releases: tuple[tuple[str, int], ...]
    responses: tuple[tuple[str, int, int], ...]  # task, release, response time


@dataclass(frozen=True)
class SimulationResult:
    protocol: Protocol
    horizon: int
    stats: dict[str, TaskStats]
    trace: Trace = field(repr=False)


def simulate(tasks: Sequence[Task], protocol: Protocol, horizon: int) -> SimulationResult:
    """Run the task set tick by tick from time 0 to `horizon`; jobs released before the horizon run to completion
    or are judged at the horizon."""
    _check_priorities(tasks)
    ceiling = ceilings(tasks)
    pending: list[_Job] = []
    done: list[_Job] = []
    running_trace: list[str | None] = []
    holding_trace: list[str | None] = []
    releases: list[tuple[str, int]] = []
    time = 0
    end = horizon
    while time < end or pending:
        if time < horizon:
            for task in tasks:
                if time >= task.offset and (time - task.offset) % task.period == 0:
                    pending.append(_Job(task, time))
                    releases.append((task.name, time))
        if time >= horizon + 20 * max(t.period for t in tasks):
            break  # an overloaded set: stop judging
        job = _dispatch(pending, protocol, ceiling)
        running_trace.append(job.task.name if job else None)
        holding_trace.append(job.holding if job else None)
        if job is not None:
            for other in pending:
                if other is not job and other.task.priority > job.task.priority:
                    other.inversion += 1
            job.remaining -= 1
            if job.remaining == 0:
                if job.holding is not None:
                    job.holding = None
                job.segment += 1
                if job.segment == len(job.task.segments):
                    job.finish = time + 1
                    pending.remove(job)
                    done.append(job)
                else:
                    job.remaining = job.task.segments[job.segment].duration
        time += 1
    stats = {}
    for task in tasks:
        jobs = [j for j in done + pending if j.task is task]
        responses = [(j.finish if j.finish is not None else time) - j.release for j in jobs]
        stats[task.name] = TaskStats(
            task=task.name, jobs=len(jobs), worst_response=max(responses, default=0),
            worst_blocking=max((j.inversion for j in jobs), default=0),
            misses=sum(1 for r in responses if r > task.relative_deadline))
    finished = tuple(sorted((j.task.name, j.release, j.finish - j.release) for j in done if j.finish is not None))
    return SimulationResult(protocol, horizon, stats,
                            Trace(tuple(running_trace), tuple(holding_trace), tuple(releases), finished))


def _dispatch(pending: list[_Job], protocol: Protocol, ceiling: dict[str, int]) -> _Job | None:
    """Pick the job that runs this tick, granting or refusing the lock it asks for."""
    for job in pending:
        job.blocked_on = None
    while True:
        candidates = [j for j in pending if j.blocked_on is None]
        if not candidates:
            return None
        effective = _effective_priorities(pending, protocol)
        job = max(candidates, key=lambda j: (effective[id(j)], -j.release))
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


def _effective_priorities(pending: list[_Job], protocol: Protocol) -> dict[int, int]:
    effective = {id(j): j.task.priority for j in pending}
    if protocol is Protocol.NONE:
        return effective
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


def worst_over_phasings(tasks: Sequence[Task], protocol: Protocol, phasings: int, seed: int,
                        extra: Sequence[Sequence[Task]] = ()) -> dict[str, TaskStats]:
    """Worst response and blocking per task over random release offsets (plus any given task sets)."""
    rng = np.random.default_rng(seed)
    sets = [list(extra_set) for extra_set in extra]
    for _ in range(phasings):
        sets.append([_with_offset(t, int(rng.integers(0, t.period))) for t in tasks])
    worst: dict[str, TaskStats] = {}
    for task_set in sets:
        horizon = hyperperiod(task_set) + max(t.offset for t in task_set)
        for name, s in simulate(task_set, protocol, horizon).stats.items():
            old = worst.get(name)
            worst[name] = s if old is None else TaskStats(
                name, old.jobs + s.jobs, max(old.worst_response, s.worst_response),
                max(old.worst_blocking, s.worst_blocking), old.misses + s.misses)
    return worst


def _with_offset(task: Task, offset: int) -> Task:
    return Task(task.name, task.priority, task.period, task.segments, task.deadline, offset, task.criticality)


# --- The brake / infotainment scenario ------------------------------------------------------------------

TICKS_PER_MS = 10  # one tick = 100 microseconds


def brake_scenario(cs_ms: float = 2.0, medium_ms: float = 6.0) -> list[Task]:
    """A brake controller (high criticality) and infotainment (low) share the vehicle-bus driver lock;
    a navigation task of medium priority shares nothing. Released in the worst phasing for the brake task."""
    ms = TICKS_PER_MS
    cs = round(cs_ms * ms)
    medium = round(medium_ms * ms)
    return [
        Task("brake", 3, 5 * ms, (Segment(2), Segment(3, "bus"), Segment(3)), offset=11, criticality="HI"),
        Task("navigation", 2, 20 * ms, (Segment(medium),), offset=12, criticality="LO"),
        Task("infotainment", 1, 50 * ms, (Segment(10), Segment(cs, "bus"), Segment(10)), offset=0,
             criticality="LO"),
    ]


class MixedCriticalityModel:
    name = "mixed-criticality"
    summary = "Priority inversion with a shared lock: none vs inheritance vs ceiling, simulated and analysed"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--critical-section-ms", type=float, default=2.0,
                            help="infotainment's time holding the bus lock (default: %(default)s)")
        parser.add_argument("--medium-ms", type=float, default=6.0,
                            help="navigation's execution time per 20 ms (default: %(default)s)")
        parser.add_argument("--phasings", type=int, default=40,
                            help="random release phasings simulated per protocol (default: %(default)s)")
        parser.add_argument("--seed", type=int, default=2)

    def run(self, args: argparse.Namespace) -> LabResult:
        tasks = brake_scenario(args.critical_section_ms, args.medium_ms)
        rows = []
        traces = {}
        for protocol in Protocol:
            analysis = {a.task: a for a in analyse(tasks, protocol)}
            observed = worst_over_phasings(tasks, protocol, args.phasings, args.seed, extra=[tasks])
            traces[protocol] = simulate(tasks, protocol, 100 * TICKS_PER_MS).trace
            for task in tasks:
                a, o = analysis[task.name], observed[task.name]
                rows.append((protocol.value, task.name, _ms(a.blocking), _ms(a.response),
                             _ms(o.worst_response), _ms(o.worst_blocking), _ms(task.relative_deadline),
                             o.misses))
        return LabResult(
            tables=(task_table(tasks), Table(
                title="Brake controller vs infotainment: analysis and simulation (times in ms)",
                columns=("protocol", "task", "B", "R", "R sim", "blocked", "D", "misses"),
                rows=tuple(rows),
                notes=("B, R: analytic blocking and response-time bounds; R sim, blocked: simulated worst "
                       "response and worst time a lower-priority task ran while the job waited; D: deadline.",
                       f"simulated: worst over the critical phasing and {args.phasings} random phasings, "
                       "one hyperperiod each.",
                       "'unbounded': without a protocol the navigation task can run inside the brake task's wait."),
            )),
            plot=lambda figure: plot(figure, tasks, traces),
            summary=_summary(rows),
        )


def _ms(ticks: int | None) -> object:
    return "unbounded" if ticks is None else ticks / TICKS_PER_MS


def task_table(tasks: Sequence[Task]) -> Table:
    rows = []
    for task in tasks:
        sections = ", ".join(f"{s.resource} {s.duration / TICKS_PER_MS:g}" for s in task.segments if s.resource)
        rows.append((task.name, task.criticality, task.priority, task.wcet / TICKS_PER_MS,
                     task.period / TICKS_PER_MS, task.relative_deadline / TICKS_PER_MS, sections or "-"))
    return Table(title="Task set (times in ms; higher priority number runs first)",
                 columns=("task", "criticality", "priority", "C", "T", "D", "critical sections"),
                 rows=tuple(rows))


def _summary(rows: Sequence[tuple[object, ...]]) -> tuple[str, ...]:
    lines = []
    for protocol in Protocol:
        brake = next(r for r in rows if r[0] == protocol.value and r[1] == "brake")
        lines.append(f"{protocol.value:>11}: brake worst response {brake[4]} ms against a {brake[6]} ms deadline, "
                     f"{brake[7]} missed deadlines")
    return tuple(lines)


def plot(figure: Figure, tasks: Sequence[Task], traces: dict[Protocol, Trace]) -> None:
    axes_list = figure.subplots(len(traces), 1, sharex=True)
    names = [t.name for t in sorted(tasks, key=lambda t: -t.priority)]
    colours = {"brake": "#d62728", "navigation": "#1f77b4", "infotainment": "#2ca02c"}
    window = 20 * TICKS_PER_MS
    brake = next(t for t in tasks if t.name == "brake")
    for axes, (protocol, trace) in zip(axes_list, traces.items(), strict=True):
        for tick, (name, held) in enumerate(zip(trace.running[:window], trace.holding[:window], strict=True)):
            if name is None:
                continue
            row = names.index(name)
            axes.broken_barh([(tick / TICKS_PER_MS, 1 / TICKS_PER_MS)], (row - 0.35, 0.7),
                             facecolors=colours.get(name, "grey"), hatch="///" if held else None,
                             edgecolor="black" if held else None, linewidth=0)
        for name, release in trace.releases:
            if name == "brake" and release < window:
                axes.axvline(release / TICKS_PER_MS, color="#d62728", linestyle=":", linewidth=0.8)
                axes.axvline((release + brake.relative_deadline) / TICKS_PER_MS, color="black",
                             linestyle="--", linewidth=0.6)
        axes.set_yticks(range(len(names)), names)
        axes.set_ylim(len(names) - 0.5, -0.5)
        first = next((r for n, _, r in trace.responses if n == "brake"), None)
        verdict = "" if first is None else (f": first brake job responds in {first / TICKS_PER_MS:g} ms"
                                            + (" (deadline missed)" if first > brake.relative_deadline else ""))
        axes.set_title(f"protocol {protocol.value}{verdict}", fontsize="medium", loc="left")
    axes_list[-1].set_xlabel("time (ms); hatched: holding the bus lock; dotted: brake release, dashed: its deadline")
    figure.suptitle("Critical phasing: the brake job waits for infotainment's lock")


MODEL = MixedCriticalityModel()
