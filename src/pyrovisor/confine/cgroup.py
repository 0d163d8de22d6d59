"""A cgroup with memory and CPU limits for a jailed VMM: cgroup v2 where the host delegates both, else v1."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.errors import JailError

CPU_PERIOD_US = 100_000
NEEDED = ("memory", "cpu")
PREFIX = "pyrovisor-jail-"  # then the launcher's PID
REMOVE_TIMEOUT_S = 2.0  # a killed process leaves its cgroup a moment after waitpid() returns


@dataclass(frozen=True)
class CgroupLimits:
    """The most memory (bytes; swap not allowed on top) and CPU time (in CPUs) the jailed VMM may use."""

    memory_bytes: int
    cpus: float


@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy: v1 with its controllers, or v2 with those available in our cgroup."""

    version: int
    mountpoint: Path
    controllers: frozenset[str]
    own: Path  # this process's cgroup in it, as a directory under the mountpoint


def hierarchies(mountinfo: str, proc_cgroup: str,
                read_controllers: Callable[[Path], str] = lambda path: path.read_text()) -> list[Hierarchy]:
    """The cgroup hierarchies in /proc/self/mountinfo, each with this process's cgroup from /proc/self/cgroup."""
    v1_paths: dict[str, str] = {}
    v2_path = None
    for line in proc_cgroup.splitlines():
        number, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if number == "0" and names == "":
            v2_path = path
        else:
            for name in names.split(","):
                v1_paths[name] = path
    found: list[Hierarchy] = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        root, mountpoint = fields[3], Path(fields[4].replace("\\040", " "))
        fstype, super_options = fields[dash + 1], fields[dash + 3].split(",")
        if fstype == "cgroup":
            controllers = frozenset(option for option in super_options if option in v1_paths)
            if not controllers:
                continue
            path = v1_paths[next(iter(sorted(controllers)))]
            found.append(Hierarchy(1, mountpoint, controllers, _inside(mountpoint, root, path)))
        elif fstype == "cgroup2" and v2_path is not None:
            own = _inside(mountpoint, root, v2_path)
            try:
                available = frozenset(read_controllers(own / "cgroup.controllers").split())
            except OSError:
                available = frozenset()
            found.append(Hierarchy(2, mountpoint, available, own))
    return found


def _inside(mountpoint: Path, root: str, path: str) -> Path:
    relative = path[len(root):] if path.startswith(root) and root != "/" else path
    return mountpoint / relative.lstrip("/")


@dataclass(frozen=True)
class CgroupPlan:
    """Where the jail's cgroup goes: one v2 directory, or one per v1 controller."""

    version: int
    parents: dict[str, Path]  # controller -> the cgroup to create the jail's under
    note: str  # why this version, for the jail's one line on stderr


def plan_cgroup(found: list[Hierarchy]) -> CgroupPlan:
    """cgroup v2 if it offers memory and cpu here, else the v1 memory and cpu controllers, else JailError
    naming what is missing."""
    for hierarchy in found:
        if hierarchy.version == 2 and set(NEEDED) <= hierarchy.controllers:
            return CgroupPlan(2, {name: hierarchy.own for name in NEEDED}, "cgroup v2")
    v1 = {name: h.own for h in found if h.version == 1 for name in h.controllers if name in NEEDED}
    if set(NEEDED) <= set(v1):
        v2 = next((h for h in found if h.version == 2), None)
        why = (f"cgroup v2 at {v2.mountpoint} offers only {', '.join(sorted(v2.controllers)) or 'no controllers'}"
               if v2 is not None else "no cgroup v2 is mounted")
        return CgroupPlan(1, {name: v1[name] for name in NEEDED}, f"cgroup v1 memory and cpu controllers ({why})")
    missing = [name for name in NEEDED if name not in v1]
    v2_text = "; ".join(f"cgroup v2 at {h.mountpoint} offers {', '.join(sorted(h.controllers)) or 'nothing'}"
                        for h in found if h.version == 2) or "no cgroup v2 is mounted"
    raise JailError("limit memory and CPU", f"this host has no cgroup controller for {' and '.join(missing)} "
                    f"({v2_text}; no cgroup v1 hierarchy with it either): mount cgroup2 with the memory and cpu "
                    "controllers enabled (or cgroup v1 memory and cpu)")


class Cgroup:
    """The jail's cgroup, created with its limits; `join()` moves the calling process in, `remove()` deletes it."""

    def __init__(self, plan: CgroupPlan, name: str, limits: CgroupLimits) -> None:
        self.plan = plan
        self.limits = limits
        self.directories: dict[str, Path] = {}
        for parent in set(plan.parents.values()):
            remove_stale(parent)
        try:
            for controller, parent in plan.parents.items():
                directory = parent / name
                if directory not in self.directories.values():
                    if plan.version == 2:
                        _enable_controllers(parent)
                    directory.mkdir()
                self.directories[controller] = directory
            self._set_limits()
        except OSError as exc:
            self.remove()
            raise JailError("create the jail's cgroup", f"{exc.filename or ''}: {exc.strerror or exc}") from None
        except BaseException:
            self.remove()
            raise

    def _set_limits(self) -> None:
        memory, cpu = self.directories["memory"], self.directories["cpu"]
        quota = max(1000, round(self.limits.cpus * CPU_PERIOD_US))
        if self.plan.version == 2:
            (memory / "memory.max").write_text(str(self.limits.memory_bytes))
            _write_if_present(memory / "memory.swap.max", "0")
            (cpu / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
        else:
            (memory / "memory.limit_in_bytes").write_text(str(self.limits.memory_bytes))
            _write_if_present(memory / "memory.memsw.limit_in_bytes", str(self.limits.memory_bytes))
            (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(quota))

    def join(self) -> None:
        """Move the calling process (all its threads) into the cgroup: "0" names the writer (cgroups(7))."""
        for directory in dict.fromkeys(self.directories.values()):
            (directory / "cgroup.procs").write_text("0")

    def describe(self) -> str:
        return (f"{self.plan.note}: memory {self.limits.memory_bytes / 2**20:g} MiB, {self.limits.cpus:g} CPUs, "
                f"{self.directories['memory']}")

    def peak_memory(self) -> int | None:
        """The most memory the cgroup was charged at once, where the kernel keeps it."""
        name = "memory.peak" if self.plan.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.directories["memory"] / name).read_text())
        except (OSError, ValueError, KeyError):
            return None

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in this cgroup because it reached its memory limit."""
        name = "memory.events" if self.plan.version == 2 else "memory.oom_control"
        try:
            text = (self.directories["memory"] / name).read_text()
        except (OSError, KeyError):
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Delete the cgroup's directories (empty once its processes are gone; waits briefly for that)."""
        for directory in reversed(list(dict.fromkeys(self.directories.values()))):
            deadline = time.monotonic() + REMOVE_TIMEOUT_S
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
        self.directories = {}


def remove_stale(parent: Path) -> None:
    """Delete the empty jail cgroups under `parent` whose launcher is gone (a launcher killed with SIGKILL cannot
    remove its own)."""
    for directory in parent.glob(f"{PREFIX}*"):
        pid = directory.name.removeprefix(PREFIX)
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                if not (directory / "cgroup.procs").read_text().strip():
                    directory.rmdir()


def _enable_controllers(parent: Path) -> None:
    enabled = set((parent / "cgroup.subtree_control").read_text().split())
    wanted = [name for name in NEEDED if name not in enabled]
    if wanted:
        try:
            (parent / "cgroup.subtree_control").write_text(" ".join(f"+{name}" for name in wanted))
        except OSError as exc:
            raise JailError("limit memory and CPU", f"cannot enable {', '.join(wanted)} for the children of "
                            f"{parent} ({exc.strerror}): a cgroup v2 group with processes of its own cannot "
                            "delegate controllers; start pyrovisor from a leaf of a delegated subtree") from None


def _write_if_present(path: Path, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.exists():
            path.write_text(value)


def host_cgroup_plan() -> CgroupPlan:
    """The plan for this host, from this process's /proc/self/mountinfo and /proc/self/cgroup."""
    found = hierarchies(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    return plan_cgroup(found)


def jail_cgroup_name() -> str:
    return f"{PREFIX}{os.getpid()}"
