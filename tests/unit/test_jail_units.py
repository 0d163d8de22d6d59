"""The jail's pure parts: cgroup hierarchies and plans (v2, hybrid, none), cgroup files on a fake tree, bind
merging, the access rule, the capability reader and the --jail options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyrovisor.api.cli import main
from pyrovisor.confine.capabilities import CapSet, capability_names, privileges
from pyrovisor.confine.cgroup import Cgroup, CgroupLimits, CgroupPlan, hierarchies, plan_cgroup, remove_stale
from pyrovisor.confine.jail import Bind, _package_root, inside, may_access, merge_binds
from pyrovisor.errors import JailError

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"
V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V2_CGROUP = "0::/user.slice/session-1.scope\n"


def test_hybrid_host_uses_v1_memory_and_cpu_and_says_why() -> None:
    found = hierarchies(HYBRID_MOUNTINFO, HYBRID_CGROUP, read_controllers=lambda path: "hugetlb\n")
    plan = plan_cgroup(found)
    assert plan.version == 1
    assert plan.parents == {"memory": Path("/sys/fs/cgroup/memory/process_api/abc"), "cpu": Path("/sys/fs/cgroup/cpu")}
    assert plan.note == "cgroup v1 memory and cpu controllers (cgroup v2 at /sys/fs/cgroup/unified offers only hugetlb)"


def test_v2_host_with_memory_and_cpu_uses_v2_under_our_own_cgroup() -> None:
    seen: list[Path] = []

    def controllers(path: Path) -> str:
        seen.append(path)
        return "cpuset cpu io memory pids\n"

    plan = plan_cgroup(hierarchies(V2_MOUNTINFO, V2_CGROUP, read_controllers=controllers))
    own = Path("/sys/fs/cgroup/user.slice/session-1.scope")
    assert plan == CgroupPlan(2, {"memory": own, "cpu": own}, "cgroup v2")
    assert seen == [own / "cgroup.controllers"]


def test_no_memory_controller_is_one_clear_line() -> None:
    mountinfo = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n" + HYBRID_MOUNTINFO.splitlines()[-1]
    found = hierarchies(mountinfo, "1:cpu:/\n0::/\n", read_controllers=lambda path: "hugetlb")
    with pytest.raises(JailError) as caught:
        plan_cgroup(found)
    assert str(caught.value) == ("--jail: cannot limit memory and CPU: this host has no cgroup controller for memory "
                                 "(cgroup v2 at /sys/fs/cgroup/unified offers hugetlb; no cgroup v1 hierarchy with it "
                                 "either): mount cgroup2 with the memory and cpu controllers enabled (or cgroup v1 "
                                 "memory and cpu)")


def _fake_v1(tmp_path: Path) -> CgroupPlan:
    for controller in ("memory", "cpu"):
        (tmp_path / controller).mkdir()
    return CgroupPlan(1, {"memory": tmp_path / "memory", "cpu": tmp_path / "cpu"}, "cgroup v1")


def test_v1_cgroup_files_limits_and_accounting(tmp_path: Path) -> None:
    plan = _fake_v1(tmp_path)
    (tmp_path / "memory" / "pyrovisor-jail-1").mkdir()  # a stale one whose launcher (PID 1 here) is alive: kept
    cgroup = Cgroup(plan, "pyrovisor-jail-x", CgroupLimits(memory_bytes=192 << 20, cpus=1.5))
    memory, cpu = tmp_path / "memory" / "pyrovisor-jail-x", tmp_path / "cpu" / "pyrovisor-jail-x"
    assert (memory / "memory.limit_in_bytes").read_text() == str(192 << 20)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000" and (cpu / "cpu.cfs_period_us").read_text() == "100000"
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (memory / "memory.max_usage_in_bytes").write_text(str(100 << 20))
    assert cgroup.oom_kills() == 1 and cgroup.peak_memory() == 100 << 20
    assert "memory 192 MiB, 1.5 CPUs" in cgroup.describe()
    for file in [*memory.iterdir(), *cpu.iterdir()]:  # a real cgroup's files go with it; here, by hand
        file.unlink()
    cgroup.remove()
    assert not memory.exists() and not cpu.exists() and (tmp_path / "memory" / "pyrovisor-jail-1").exists()


def test_v2_cgroup_files(tmp_path: Path) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("memory cpu\n")
    plan = CgroupPlan(2, {"memory": tmp_path, "cpu": tmp_path}, "cgroup v2")
    cgroup = Cgroup(plan, "jail", CgroupLimits(memory_bytes=1 << 30, cpus=2))
    assert (tmp_path / "jail" / "memory.max").read_text() == str(1 << 30)
    assert (tmp_path / "jail" / "cpu.max").read_text() == "200000 100000"
    (tmp_path / "jail" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cgroup.oom_kills() == 1 and cgroup.peak_memory() is None


def test_stale_jail_cgroups_of_dead_launchers_go(tmp_path: Path) -> None:
    dead = tmp_path / "pyrovisor-jail-999999999"
    dead.mkdir()
    (dead / "cgroup.procs").write_text("")
    busy = tmp_path / "pyrovisor-jail-999999998"
    busy.mkdir()
    (busy / "cgroup.procs").write_text("1234\n")
    remove_stale(tmp_path)
    assert busy.exists()  # a launcher's PID gone but processes left: kept


def test_binds_merge_under_the_paths_that_cover_them() -> None:
    merged = merge_binds([Bind(Path("/work/src")), Bind(Path("/work/src/pkg/guest.elf")), Bind(Path("/jail"), True),
                          Bind(Path("/jail/snap")), Bind(Path("/work/src/disk.img"), True), Bind(Path("/work/src"))])
    assert merged == [Bind(Path("/jail"), True), Bind(Path("/work/src")), Bind(Path("/work/src/disk.img"), True)]
    assert inside(Path("/jail/api.sock"), Path("/jail")) and not inside(Path("/jailbreak/x"), Path("/jail"))


def test_access_is_judged_by_the_jail_users_bits(tmp_path: Path) -> None:
    file = tmp_path / "disk.img"
    file.touch()
    os.chown(file, 65534, 65534) if os.geteuid() == 0 else None
    owner = file.stat().st_uid
    file.chmod(0o600)
    assert may_access(file, owner, -1, write=True) and not may_access(file, owner + 1, -1)
    file.chmod(0o604)
    assert may_access(file, owner + 1, -1) and not may_access(file, owner + 1, -1, write=True)
    tmp_path.chmod(0o755)
    assert may_access(tmp_path, tmp_path.stat().st_uid + 1, -1) and not may_access(tmp_path, 4242, -1, write=True)


def test_package_root_is_the_sys_path_entry() -> None:
    assert _package_root(Path("/src/pyrovisor/confine/jail.py"), "pyrovisor.confine.jail") == Path("/src")
    assert _package_root(Path("/src/pyrovisor/__init__.py"), "pyrovisor") == Path("/src")
    assert _package_root(Path("/lib/python3.11/json/__init__.py"), "json") == Path("/lib/python3.11")


def test_privileges_of_this_process() -> None:
    mine = privileges()
    assert mine.uids[0] == os.getuid() and set(mine.capabilities) == set(CapSet)
    assert capability_names(1 << 21 | 1 << 7) == ["CAP_SETUID", "CAP_SYS_ADMIN"]


@pytest.mark.parametrize("args, message", [
    (["run", "hello", "--jail-memory", "1G"], "pyrovisor: error: --jail: cannot use --jail-memory: it only applies "
                                              "with --jail DIR"),
    (["restore", "snap", "--jail-uid", "7"], "pyrovisor: error: --jail: cannot use --jail-uid: it only applies with "
                                             "--jail DIR"),
])
def test_jail_companions_need_jail(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 1
    assert capsys.readouterr().err.strip() == message


@pytest.mark.parametrize("args, message", [
    (["run", "--jail", "j", "--jail-uid", "-1"], "argument --jail-uid: invalid value '-1': must be 0 to 4294967294"),
    (["receive", "--listen", "127.0.0.1:1", "--jail", "j", "--jail-cpus", "x"],
     "argument --jail-cpus: invalid value 'x': expected a number"),
    (["restore", "s", "--jail", "j", "--jail-memory", "1X"], "argument --jail-memory: invalid value '1X'"),
])
def test_jail_option_values_are_checked_first(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
