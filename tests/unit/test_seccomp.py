"""The seccomp allow lists and the libseccomp binding: names resolve, filters compile and load, refusals report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyrovisor.confine.filters import (
    POLICIES,
    THREAD_KINDS,
    allowed_syscalls,
    argument_filtered,
    filter_size,
    policy,
)
from pyrovisor.errors import ConfigError, MissingToolError

try:
    from pyrovisor.confine.seccomp import library, syscall_name, syscall_number

    library()
except MissingToolError as exc:  # pragma: no cover - libseccomp2 is in .ci/run
    pytest.skip(str(exc), allow_module_level=True)

NEVER_AFTER_SETUP = {"execve", "execveat", "fork", "vfork", "ptrace", "process_vm_writev", "mount",
                     "pivot_root", "init_module", "bpf", "perf_event_open", "open_by_handle_at", "kexec_load"}


def test_thread_kinds_are_the_policies() -> None:
    assert tuple(POLICIES) == THREAD_KINDS
    assert {"vcpu", "io", "api", "migration"} <= set(THREAD_KINDS)
    with pytest.raises(ConfigError):
        policy("gpu")


@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_every_allowed_name_resolves_on_x86_64(kind: str) -> None:
    names = allowed_syscalls(kind)
    assert isinstance(names, frozenset) and names
    for name in names:
        assert syscall_name(syscall_number(name)) == name


@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_no_kind_may_start_programs_or_trace(kind: str) -> None:
    assert not allowed_syscalls(kind) & NEVER_AFTER_SETUP


def test_ioctl_is_argument_filtered_where_allowed() -> None:
    for kind in THREAD_KINDS:
        for rule in policy(kind).rules:
            if rule.syscall in ("ioctl", "socket", "clone", "mmap", "mprotect", "tgkill", "kill"):
                assert rule.args, f"{kind}: {rule.syscall} without an argument filter"
        if "kill" in allowed_syscalls(kind):  # only the vmm kind, only of its children (child_rules)
            assert kind == "vmm" and "kill" in argument_filtered(kind)


@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_filter_sizes(kind: str) -> None:
    size = filter_size(kind)
    assert size.syscalls == len(allowed_syscalls(kind))
    assert 0 < size.bpf_instructions < 4096  # BPF_MAXINSNS


LOAD_IN_THREADS = textwrap.dedent("""
    import errno, json, os, threading
    from pyrovisor.confine.filters import THREAD_KINDS, build_filter
    from pyrovisor.confine.seccomp import act_errno
    results = {}
    def confined(kind):
        with build_filter(kind, default_action=act_errno(errno.EPERM)) as compiled:
            compiled.load(listener=False)
        results[kind] = os.getppid()  # allowed to no kind: refused with EPERM (glibc returns -1)
    for kind in THREAD_KINDS:
        thread = threading.Thread(target=confined, args=(kind,))
        thread.start()
        thread.join()
    results["main"] = os.getppid()
    print(json.dumps(results))
""")


def test_filters_load_in_a_throwaway_thread_of_a_subprocess() -> None:
    done = subprocess.run([sys.executable, "-c", LOAD_IN_THREADS], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYROVISOR_SECCOMP": "off"})
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert all(results[kind] == -1 for kind in THREAD_KINDS), results
    assert results["main"] == os.getpid()  # the subprocess's main thread was never filtered


SUPERVISED = textwrap.dedent("""
    import json, os, sys, threading
    from pyrovisor.confine import policy
    policy.configure(sys.argv[1])
    denied = []
    def confined():
        policy.enter_thread("vcpu", denied.append)
        print(json.dumps({"getppid": os.getppid()}), flush=True)
    thread = threading.Thread(target=confined, name="vcpu7")
    thread.start()
    thread.join()
    violations = policy.settle()
    print(json.dumps({"violations": [str(v) for v in violations], "callbacks": len(denied)}))
""")


@pytest.mark.parametrize("mode", ["enforce", "audit"])
def test_the_supervisor_refuses_or_lets_run_and_logs(mode: str, tmp_path: Path) -> None:
    log = tmp_path / "seccomp.jsonl"
    done = subprocess.run([sys.executable, "-c", SUPERVISED, mode], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYROVISOR_SECCOMP_LOG": str(log)})
    assert done.returncode == 0, done.stderr
    first, last = (json.loads(line) for line in done.stdout.splitlines())
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["kind"], r["thread"], r["syscall"], r["nr"], r["mode"]) for r in records] == [
        ("vcpu", "vcpu7", "getppid", 110, mode)]
    if mode == "enforce":
        assert first["getppid"] == -1
        assert last["callbacks"] == 1
        assert last["violations"] == [f"seccomp: the vcpu thread vcpu7 (tid {records[0]['tid']}) made the forbidden "
                                      "system call getppid (110); it was refused and the VM stopped"]
    else:
        assert first["getppid"] > 1
        assert last == {"violations": [], "callbacks": 0}
        assert "seccomp audit: the vcpu thread vcpu7 made getppid (110)" in done.stderr


KILL_ONLY_CHILDREN = textwrap.dedent("""
    import errno, json, os, subprocess, threading
    from pyrovisor.confine.filters import build_filter
    from pyrovisor.confine.seccomp import act_errno
    child = subprocess.Popen(["sleep", "30"])
    results = {}
    def confined():
        with build_filter("vmm", default_action=act_errno(errno.EPERM)) as compiled:
            compiled.load(listener=False)
        for name, pid in (("child", child.pid), ("init", 1)):
            try:
                os.kill(pid, 0)
                results[name] = "allowed"
            except PermissionError:
                results[name] = "refused"
    thread = threading.Thread(target=confined)
    thread.start()
    thread.join()
    child.kill()
    child.wait()
    print(json.dumps(results))
""")


def test_the_main_thread_may_kill_its_children_only() -> None:
    """The vmm filter allows kill of the children that exist when it loads (swtpm, the fault server), and of no
    other process: signal 0 to PID 1 is refused (as root it would otherwise succeed)."""
    done = subprocess.run([sys.executable, "-c", KILL_ONLY_CHILDREN], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYROVISOR_SECCOMP": "off"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"child": "allowed", "init": "refused"}
