"""`pyrovisor host` under load: density of idle VMs, an overcommitted run driven by host-measured working sets, and the
same run trusting what the guests report.

density     N idle OS guests (`counter` beating every 10 s) of M MiB in one host: the host's memory per VM beyond the
            guest pages resident (VmRSS of the process - the guest pages present and exclusively mapped, from
            /proc/self/pagemap - the process's RSS before the first VM, divided by N), the working-set fault servers'
            private memory per VM, the kernel's memory per VM (MemAvailable's drop - the RSS growth: KVM, page
            tables), time to build and start each VM, and the host's CPU while all are idle.
overcommit  N VMs of M MiB, each running `wset` whose working set moves between LOW and HIGH MiB on a staggered
            schedule, under a budget, with the `share` policy, and the same run without a budget (nothing
            ballooned) for the work rate: side by side in two processes (the same machine load for both), or one
            after the other with --sequential (less contention, but each sees whatever load other jobs make). Host RSS over time (the process plus its fault servers' private memory)
            against the budget, each VM's work rate (wset's ops lines) as a fraction of the unbudgeted run, the
            working-set estimate against wset's true ws_mib, time from a growth phase to a target that covers it,
            and a PNG (budget, RSS, each VM's true working set, estimate and target over time).
trust       The overcommit run with two different guests: one whose memory is mostly a cold page cache (`cache`), one
            that reports 4x its free memory (kernel balloon_report=lie); once with the `share` policy, once with
            `guest-stats` (targets from the guests' own statistics, as QEMU/libvirt/MOM do).

Run: python benchmarks/overcommit.py density [--vms 100] [--memory 64] [--sampling on|off] [--hz 100]
     python benchmarks/overcommit.py overcommit [--vms 8] [--memory 1024] [--budget 3072] [--high 300]
         [--sequential] [--png FILE] [--logs DIR]
     python benchmarks/overcommit.py trust [--vms 8] ... [--no-reference]
     (--guests DIR before the command: an OS guest built elsewhere; docs/overcommit.md has the figures)
Each prints a table and, with --json FILE, writes its figures. CPU model and load averages are printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from pyrovisor.host.config import HostSettings, SamplingSettings, VmSpec, parse_vm_spec
from pyrovisor.host.host import Host
from pyrovisor.host.policy import PolicySettings
from pyrovisor.host.residency import children_private_rss_bytes, process_rss_bytes

MiB = 1 << 20
WSET = re.compile(rb"wset \d+: t=(\d+) phase=(\d+) ws_mib=(\d+) touched=(\d+) ops=(\d+)")
PHASE = re.compile(rb"wset \d+: phase (\d+): ws_mib=(\d+) from t=(\d+)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return "unknown CPU"


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def meminfo(name: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


KERNEL_FIELDS = ("SecPageTables", "PageTables", "KernelStack", "Slab")  # KVM's page tables, vCPU stacks, its objects


def cpu_seconds(pids: Sequence[int] = ()) -> float:
    """CPU time (user + system) of this process and of the given helpers so far."""
    total = sum(os.times()[:2])
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except OSError:
            pass
    return total


GUESTS: Path | None = None  # --guests DIR: an OS guest built elsewhere (os.elf and os-programs.img)


def spec(vm_id: str, memory_mib: int, args: str, log_dir: Path, minimum_mib: int = 32) -> VmSpec:
    table: dict[str, Any] = {"id": vm_id, "guest": "os", "memory": memory_mib, "vcpus": 1, "args": args,
                             "min": minimum_mib}
    if GUESTS is not None:
        table.update(guest=str(GUESTS / "os.elf"), initrd=str(GUESTS / "os-programs.img"))
    return parse_vm_spec(table, vm_id, minimum_mib * MiB, log_dir)


class Console:
    """Every VM's console lines with the host time they arrived."""

    def __init__(self) -> None:
        self.lines: dict[str, list[tuple[float, bytes]]] = defaultdict(list)
        self._partial: dict[str, bytes] = defaultdict(bytes)
        self._lock = threading.Lock()

    def __call__(self, vm_id: str, data: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            text = self._partial[vm_id] + data
            *complete, self._partial[vm_id] = text.split(b"\n")
            self.lines[vm_id].extend((now, line) for line in complete)

    def seen(self, vm_id: str, needle: bytes) -> bool:
        with self._lock:
            return any(needle in line for _, line in self.lines[vm_id])

    def matches(self, vm_id: str, pattern: re.Pattern[bytes]) -> list[tuple[float, re.Match[bytes]]]:
        with self._lock:
            lines = list(self.lines[vm_id])
        return [(at, match) for at, line in lines if (match := pattern.search(line))]


# --- density ------------------------------------------------------------------------------------------------------
def density(args: argparse.Namespace) -> dict[str, Any]:
    with TemporaryDirectory(prefix="pyrovisor-density-") as directory:
        logs = Path(directory)
        console = Console()
        settings = HostSettings(budget=1 << 40, log_dir=logs, overhead=0,
                                policy=PolicySettings(interval_s=1.0),
                                sampling=SamplingSettings(enabled=args.sampling == "on", sample_pages=256,
                                                          interval_s=args.sampling_interval))
        with Host(settings, on_event=lambda _: None, on_console=console) as host:
            time.sleep(0.5)
            rss_before = process_rss_bytes()
            kernel_before = {name: meminfo(name) for name in KERNEL_FIELDS}
            starts = []
            for index in range(args.vms):
                began = time.perf_counter()
                host.create(spec(f"vm{index}", args.memory, f"counter count=0 period_ms=10000; kernel hz={args.hz}", logs))
                starts.append(time.perf_counter() - began)
            deadline = time.monotonic() + 120
            while not all(console.seen(f"vm{i}", b"counter started") for i in range(args.vms)):
                if time.monotonic() > deadline:
                    raise SystemExit("not every VM started its program within 120 s")
                time.sleep(0.2)
            time.sleep(args.settle)
            samples = host.samples()
            guest = sum(sample.resident for sample in samples)
            rss = process_rss_bytes()
            helpers = children_private_rss_bytes(sorted({pid for vm in host.vms.values() for pid in vm.helper_pids()}))
            kernel = {name: (meminfo(name) - kernel_before[name]) / args.vms / MiB for name in KERNEL_FIELDS}
            fds = len(os.listdir("/proc/self/fd"))
            pids = sorted({pid for vm in host.vms.values() for pid in vm.helper_pids()})
            cpu_before, wall_before, load_before = cpu_seconds(pids), time.monotonic(), load()
            time.sleep(args.idle_seconds)
            cpu = (cpu_seconds(pids) - cpu_before) / (time.monotonic() - wall_before)
            running = sum(1 for sample in host.samples() if sample.state == "running")
    per_vm = (rss - rss_before - guest) / args.vms
    result = {
        "vms": args.vms, "memory_mib": args.memory, "sampling": args.sampling, "hz": args.hz, "running_at_end": running,
        "rss_before_mib": rss_before / MiB, "rss_mib": rss / MiB, "guest_resident_mib": guest / MiB,
        "host_per_vm_mib": per_vm / MiB, "host_per_vm_with_base_mib": (rss - guest) / args.vms / MiB,
        "guest_resident_per_vm_mib": guest / args.vms / MiB, "helpers_per_vm_mib": helpers / args.vms / MiB,
        "kernel_per_vm_mib": kernel, "fds": fds,
        "start_ms_median": statistics.median(starts) * 1000, "start_ms_p90": sorted(starts)[int(0.9 * len(starts))]
        * 1000, "start_ms_max": max(starts) * 1000, "start_ms_first": starts[0] * 1000, "start_ms_last": starts[-1]
        * 1000, "idle_cpu_cores": cpu, "cpu": cpu_model(), "load_during_idle": load_before, "load_end": load(),
    }
    _print("density", result)
    return result


# --- overcommit ---------------------------------------------------------------------------------------------------
@dataclass
class Timeline:
    """What the benchmark sampled every half second (host clock, MiB)."""

    at: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)  # host process + fault servers' private memory
    allocation: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    estimate: dict[str, list[float | None]] = field(default_factory=lambda: defaultdict(list))
    latest: dict[str, list[tuple[float, float, float] | None]] = field(default_factory=lambda: defaultdict(list))
    resident: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    actual: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def schedule(index: int, count: int, low: int, high: int, period: int, busy: int) -> str:
    """VM `index` of `count`: LOW MiB, HIGH for `busy` seconds at its own offset in each period, LOW again."""
    offset = index * (period // count)
    phases = [(low, offset), (high, busy), (low, period - offset - busy)]
    if offset + busy > period:
        phases = [(high, offset + busy - period), (low, period - busy), (high, period - offset)]
    return ",".join(f"{mib}:{seconds}" for mib, seconds in phases if seconds > 0)


def workloads(args: argparse.Namespace, trust: bool) -> dict[str, str]:
    """The command line of each VM."""
    lines = {}
    period, busy = args.period, args.busy
    for index in range(args.vms):
        plan = schedule(index, args.vms, args.low, args.high, period, busy)
        lines[f"vm{index}"] = (f"wset schedule={plan} seconds={int(args.duration) + 60} mode=mixed pattern=uniform; "
                               "kernel quiet=1")
    if trust:
        # a guest whose memory is mostly a cold page cache; one whose statistics lie (4x its free memory)
        lines[f"vm{args.vms - 2}"] = (f"cache mib={args.cache}; wset mib={args.low} seconds={int(args.duration) + 60} "
                                      "mode=mixed start_ms=3000; kernel quiet=1")
        # the liar's workload starts after 20 s: by then a policy that believes it has taken its free memory
        lines[f"vm{args.vms - 1}"] = (f"counter count=0 period_ms=1000; wset schedule="
                                      f"{schedule(args.vms - 1, args.vms, args.low, args.high, period, busy)}"
                                      f" seconds={int(args.duration) + 60} mode=mixed start_ms=20000; kernel quiet=1 "
                                      "balloon_report=lie")
    return lines


def run_host(args: argparse.Namespace, budget_mib: int, policy: str, trust: bool, label: str) -> dict[str, Any]:
    """One run; returns its figures and timeline."""
    with TemporaryDirectory(prefix="pyrovisor-overcommit-") as directory:
        logs = Path(args.logs) / label if args.logs else Path(directory)
        console = Console()
        settings = HostSettings(budget=budget_mib * MiB, log_dir=logs, overhead=args.overhead * MiB,
                                overhead_per_vm=args.overhead_per_vm * MiB,
                                policy=PolicySettings(kind=policy, interval_s=1.0, balloon_timeout_s=10.0),
                                sampling=SamplingSettings(sample_pages=args.sample_pages, interval_s=args.interval))
        timeline = Timeline()
        events: list[tuple[float, str]] = []
        with Host(settings, on_event=lambda m: events.append((time.monotonic(), m)), on_console=console) as host:
            began = time.monotonic()
            for vm_id, line in workloads(args, trust).items():
                host.create(spec(vm_id, args.memory, line, logs))
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.5):
                    samples = host.samples()
                    helpers = children_private_rss_bytes(sorted({p for vm in list(host.vms.values()) for p in vm.helper_pids()}))
                    timeline.at.append(time.monotonic() - began)
                    timeline.rss.append((process_rss_bytes() + helpers) / MiB)
                    for s in samples:
                        timeline.allocation[s.vm_id].append(s.allocation / MiB)
                        timeline.estimate[s.vm_id].append(None if s.working_set is None else s.working_set / MiB)
                        timeline.latest[s.vm_id].append(
                            None if s.working_set_latest is None or s.working_set_low is None
                            or s.working_set_high is None else
                            (s.working_set_latest / MiB, s.working_set_low / MiB, s.working_set_high / MiB))
                        timeline.resident[s.vm_id].append(s.resident / MiB)
                        timeline.actual[s.vm_id].append(s.balloon_actual / MiB)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            load_start = load()
            time.sleep(args.duration)
            stop.set()
            sampler.join()
            final = {s.vm_id: s for s in host.samples()}
            load_end = load()
        lines = {vm_id: [(at - began, line) for at, line in entries] for vm_id, entries in console.lines.items()}
    return analyse(args, label, budget_mib, timeline, lines, final, events, began, load_start, load_end)


def analyse(args: argparse.Namespace, label: str, budget_mib: int, timeline: Timeline,
            lines: dict[str, list[tuple[float, bytes]]], final: dict[str, Any], events: list[tuple[float, str]],
            began: float, load_start: str, load_end: str) -> dict[str, Any]:
    warm = args.warmup
    per_vm: dict[str, Any] = {}
    errors: list[float] = []
    coverage: list[bool] = []  # wset seconds (after warm-up, outside reactions) whose target held the working set
    latest_errors: list[float] = []
    inside: list[bool] = []
    reactions: list[float] = []
    for vm_id, entries in sorted(lines.items()):
        ops = [(at, int(m[5]), int(m[3])) for at, line in entries if (m := WSET.search(line))]
        window = [(at, count) for at, count, _ in ops if warm <= at <= args.duration]
        rate = sum(count for _, count in window) / max(1e-9, (window[-1][0] - window[0][0]) if len(window) > 1 else 1)
        truth = [(at, ws) for at, _, ws in ops]
        # estimate error: each wset second after warm-up and 2 intervals past a phase change, against the estimate
        changes = [at for at, line in entries if PHASE.search(line)]
        vm_errors = []
        for at, ws in truth:
            if at < warm or any(0 <= at - change < 2 * args.interval + 1.0 for change in changes):
                continue
            target = _at(timeline.at, timeline.allocation.get(vm_id, []), at)
            if target is not None:
                coverage.append(target >= ws)
            estimate = _at(timeline.at, timeline.estimate.get(vm_id, []), at)
            if estimate is not None and ws > 0:
                vm_errors.append((estimate - ws) / ws)
            interval = _at(timeline.at, timeline.latest.get(vm_id, []), at)
            if interval is not None and ws > 0:
                latest_errors.append((interval[0] - ws) / ws)
                inside.append(interval[1] <= ws <= interval[2])
        errors.extend(vm_errors)
        # reaction: from a phase change to a larger set until the target covers it
        vm_reactions = []
        previous = None
        for at, line in entries:
            match = PHASE.search(line)
            if not match:
                continue
            ws = int(match[2])
            if previous is not None and ws > previous and at >= warm:
                covered = next((t for t, alloc in zip(timeline.at, timeline.allocation.get(vm_id, []), strict=False)
                                if t >= at and alloc >= ws), None)
                if covered is not None:
                    vm_reactions.append(covered - at)
            previous = ws
        reactions.extend(vm_reactions)
        sample = final.get(vm_id)
        per_vm[vm_id] = {
            "ops_per_s": rate, "estimate_error_median_pct": 100 * statistics.median(vm_errors) if vm_errors else None,
            "reaction_s": vm_reactions, "final_allocation_mib": sample.allocation / MiB if sample else None,
            "final_resident_mib": sample.resident / MiB if sample else None,
            "ignored": sample.ignored if sample else None,
            "guest_free_mib": None if sample is None or sample.guest_free is None else sample.guest_free / MiB,
            "balloon_lines": sum(1 for _, line in entries if b"os: balloon:" in line),
        }
    measured = [rss for at, rss in zip(timeline.at, timeline.rss, strict=True) if at >= 0]
    result = {
        "label": label, "budget_mib": budget_mib, "vms": args.vms, "memory_mib": args.memory,
        "rss_max_mib": max(measured) if measured else None,
        "rss_over_budget_samples": sum(1 for rss in measured if rss > budget_mib),
        "samples": len(measured),
        "estimate_abs_error_median_pct": 100 * statistics.median(abs(e) for e in errors) if errors else None,
        "estimate_within_10pct": sum(1 for e in errors if abs(e) <= 0.10) / len(errors) if errors else None,
        "latest_abs_error_median_pct": 100 * statistics.median(abs(e) for e in latest_errors) if latest_errors
        else None,
        "latest_within_10pct_or_ci": sum(1 for e, i in zip(latest_errors, inside, strict=True) if abs(e) <= 0.10 or i)
        / len(inside) if inside else None,
        "truth_inside_ci": sum(inside) / len(inside) if inside else None,
        "target_covers_working_set": sum(coverage) / len(coverage) if coverage else None,
        "reaction_median_s": statistics.median(reactions) if reactions else None,
        "reaction_max_s": max(reactions) if reactions else None,
        "per_vm": per_vm, "events": [(round(at - began, 1), text) for at, text in events],
        "cpu": cpu_model(), "load_start": load_start, "load_end": load_end,
        "timeline": {"at": timeline.at, "rss": timeline.rss, "allocation": dict(timeline.allocation),
                     "estimate": dict(timeline.estimate), "resident": dict(timeline.resident),
                     "actual": dict(timeline.actual),
                     "truth": {vm_id: [(at, int(m[3])) for at, line in entries if (m := WSET.search(line))]
                               for vm_id, entries in lines.items()}},
    }
    return result


def _at(times: list[float], values: Sequence[Any], at: float) -> Any:
    """The last sampled value at or before `at`."""
    best = None
    for t, value in zip(times, values, strict=False):
        if t > at:
            break
        best = value
    return best


def overcommit(args: argparse.Namespace, trust: bool = False) -> dict[str, Any]:
    """The budgeted run(s) and the unbudgeted reference, at the same time in separate processes: on a shared 2-core
    machine the guests' work rate follows the CPU they get, so runs one after another compare the load of other
    people's jobs more than the policies; side by side, every run sees the same load."""
    import subprocess
    import sys

    plan: list[tuple[str, int, str]] = [("unbudgeted", 1 << 20, "share")] if not args.no_reference else []
    plan.append(("share", args.budget, "share"))
    if trust:
        plan.append(("guest-stats", args.budget, "guest-stats"))
    runs: dict[str, dict[str, Any]] = {}
    with TemporaryDirectory(prefix="pyrovisor-overcommit-runs-") as directory:
        children: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        for label, budget, policy in plan:
            if args.sequential and children:
                children[-1][2].wait()
            out = Path(directory) / f"{label}.json"
            command = [sys.executable, __file__] + (["--guests", str(GUESTS)] if GUESTS else []) + [
                "one", "--label", label, "--budget-one", str(budget), "--policy", policy, "--out", str(out),
                *(["--trust"] if trust else []), *_passed(args)]
            children.append((label, out, subprocess.Popen(command)))
        for label, out, child in children:
            if child.wait() != 0:
                raise SystemExit(f"the {label} run failed ({child.returncode})")
            runs[label] = json.loads(out.read_text())
    base = runs["unbudgeted"]["per_vm"] if "unbudgeted" in runs else {}
    base_total = sum(figures["ops_per_s"] for figures in base.values())
    for run in runs.values():
        total = sum(figures["ops_per_s"] for figures in run["per_vm"].values())
        run["work_rate_total_vs_unbudgeted"] = total / base_total if base_total else None
        for vm_id, figures in run["per_vm"].items():
            reference = base.get(vm_id, {}).get("ops_per_s") or 0
            figures["work_rate_vs_unbudgeted"] = figures["ops_per_s"] / reference if reference else None
    summary = {label: {key: value for key, value in run.items() if key not in ("timeline", "events")}
               for label, run in runs.items()}
    _print("trust" if trust else "overcommit", summary)
    if args.png:
        plot(runs, args, Path(args.png))
    return {"runs": runs}


RUN_OPTIONS = ("vms", "memory", "low", "high", "period", "busy", "cache", "duration", "warmup", "interval",
               "sample_pages", "overhead", "overhead_per_vm", "logs")


def _passed(args: argparse.Namespace) -> list[str]:
    return [part for name in RUN_OPTIONS if getattr(args, name) is not None
            for part in (f"--{name.replace('_', '-')}", str(getattr(args, name)))]


def one(args: argparse.Namespace) -> None:
    result = run_host(args, args.budget_one, args.policy, args.trust, args.label)
    Path(args.out).write_text(json.dumps(result, default=str))


def plot(runs: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """One column per budgeted run: the host (budget, RSS, the sum of targets) on top, then one small panel per VM
    (its target, the host's estimate and wset's true working set)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [label for label in runs if label != "unbudgeted"]
    vms = sorted(runs[shown[0]]["timeline"]["allocation"])
    rows = 1 + len(vms)
    figure, axes = plt.subplots(rows, len(shown), figsize=(7 * len(shown), 2.2 * rows + 2), squeeze=False,
                                sharex=True)
    for column, label in enumerate(shown):
        run, timeline = runs[label], runs[label]["timeline"]
        top = axes[0][column]
        top.axhline(run["budget_mib"], color="black", linestyle="-.", label="budget")
        top.plot(timeline["at"], timeline["rss"], color="black", linewidth=2, label="host RSS (+ fault servers)")
        count = len(timeline["at"])
        total = [sum(timeline["allocation"][vm][i] for vm in vms if i < len(timeline["allocation"][vm]))
                 for i in range(count)]
        top.plot(timeline["at"], total, color="tab:blue", label="sum of targets")
        resident = [sum(timeline["resident"][vm][i] for vm in vms if i < len(timeline["resident"][vm]))
                    for i in range(count)]
        top.plot(timeline["at"], resident, color="tab:green", linestyle=":", label="guest pages resident")
        top.set_title(f"{label}: {args.vms} VMs of {args.memory} MiB under {run['budget_mib']} MiB")
        top.set_ylabel("MiB")
        top.legend(fontsize="x-small", loc="lower right")
        for row, vm_id in enumerate(vms, 1):
            axis = axes[row][column]
            axis.plot(timeline["at"], timeline["allocation"][vm_id], color="tab:blue", label="target")
            estimate = [value if value is not None else float("nan") for value in timeline["estimate"][vm_id]]
            axis.plot(timeline["at"], estimate, color="tab:orange", linestyle=":", label="host estimate")
            truth = timeline["truth"].get(vm_id, [])
            axis.plot([t for t, _ in truth], [w for _, w in truth], color="tab:red", linestyle="--", linewidth=0.8,
                      label="wset's working set")
            axis.set_ylabel(f"{vm_id} MiB", fontsize="small")
            if row == 1:
                axis.legend(fontsize="x-small", ncol=3, loc="upper right")
        axes[-1][column].set_xlabel("seconds")
        axes[-1][column].set_xlim(0, args.duration)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def _print(name: str, result: dict[str, Any]) -> None:
    print(f"== {name}  [{cpu_model()}; load {load()}]")
    print(json.dumps(result, indent=1, default=str))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    dense = commands.add_parser("density")
    dense.add_argument("--vms", type=int, default=100)
    dense.add_argument("--memory", type=int, default=64, help="MiB per VM")
    dense.add_argument("--sampling", choices=("on", "off"), default="on")
    dense.add_argument("--sampling-interval", type=float, default=1.0)
    dense.add_argument("--settle", type=float, default=5.0)
    dense.add_argument("--idle-seconds", type=float, default=10.0)
    dense.add_argument("--hz", type=int, default=100, help="the guests' timer frequency (kernel hz=)")
    for name in ("overcommit", "trust", "one"):
        run = commands.add_parser(name)
        run.add_argument("--vms", type=int, default=8)
        run.add_argument("--memory", type=int, default=1024, help="MiB per VM")
        run.add_argument("--budget", type=int, default=3072, help="MiB")
        run.add_argument("--low", type=int, default=100, help="MiB")
        run.add_argument("--high", type=int, default=400, help="MiB")
        run.add_argument("--period", type=int, default=80, help="seconds of one schedule cycle")
        run.add_argument("--busy", type=int, default=30, help="seconds at HIGH in each cycle")
        run.add_argument("--cache", type=int, default=600, help="MiB of cold cache (trust)")
        run.add_argument("--duration", type=float, default=120.0)
        run.add_argument("--warmup", type=float, default=20.0)
        run.add_argument("--interval", type=float, default=1.0, help="sampling interval")
        run.add_argument("--sample-pages", type=int, default=1000)
        run.add_argument("--overhead", type=int, default=160, help="MiB: the host's own, before VMs")
        run.add_argument("--overhead-per-vm", type=int, default=8, help="MiB")
        run.add_argument("--png")
        run.add_argument("--logs", help="keep the console logs in LOGS/RUN/VM.log")
        run.add_argument("--sequential", action="store_true", help="one run after the other (default: side by side)")
        run.add_argument("--no-reference", action="store_true", help="skip the unbudgeted run")
        if name == "one":  # one run, started by overcommit/trust beside the others
            run.add_argument("--label", required=True)
            run.add_argument("--budget-one", type=int, required=True)
            run.add_argument("--policy", required=True)
            run.add_argument("--out", required=True)
            run.add_argument("--trust", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--guests", type=Path, help="a folder with os.elf and os-programs.img (default: the built-in)")
    args = parser.parse_args(argv)
    global GUESTS
    GUESTS = args.guests
    if args.command == "one":
        one(args)
        return
    result = density(args) if args.command == "density" else overcommit(args, trust=args.command == "trust")
    if args.json:
        args.json.write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()


