"""seccomp confinement of a real VMM: a refused call stops the VM with one error line; audit mode lets it run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm


def pyrovisor(tmp_path: Path, *args: str, mode: str | None = None, deny: str | None = None,
              timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], list[dict[str, object]]]:
    """Run the command with a seccomp log of its own (the session's audit log stays clean)."""
    log = tmp_path / "seccomp.jsonl"
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYROVISOR_SECCOMP")}
    env["PYROVISOR_SECCOMP_LOG"] = str(log)
    if deny is not None:
        env["PYROVISOR_SECCOMP_TEST_DENY"] = deny
    command = [sys.executable, "-m", "pyrovisor", *args] + (["--seccomp", mode] if mode else [])
    done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL,
                          timeout=timeout, env=env)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done, records


@pytest.mark.parametrize(("kind", "thread"), [("vcpu", "vcpu0"), ("io", "io"), ("vmm", "MainThread"),
                                             ("console", "stdin")])
def test_a_refused_call_stops_the_vm_with_one_error_line(tmp_path: Path, kind: str, thread: str) -> None:
    done, records = pyrovisor(tmp_path, "run", "hello", deny=kind)  # enforce is the default
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        f"pyrovisor: error: seccomp: the {kind} thread {thread} (tid {records[0]['tid']}) made the forbidden system "
        "call getppid (110); it was refused and the VM stopped"]
    assert [(r["mode"], r["kind"], r["thread"], r["syscall"], r["nr"]) for r in records] == [
        ("enforce", kind, thread, "getppid", 110)]


def test_audit_mode_lets_the_call_run_and_logs_it(tmp_path: Path) -> None:
    done, records = pyrovisor(tmp_path, "run", "hello", mode="audit", deny="vcpu")
    assert done.returncode == 0, done.stderr
    assert "SUMMARY: 5 tests, 0 failures" in done.stdout
    assert "seccomp audit: the vcpu thread vcpu0 made getppid (110)" in done.stderr
    assert [(r["mode"], r["kind"], r["syscall"]) for r in records] == [("audit", "vcpu", "getppid")]


def test_off_loads_no_filter(tmp_path: Path) -> None:
    done, records = pyrovisor(tmp_path, "run", "hello", mode="off", deny="vcpu")
    assert done.returncode == 0, done.stderr
    assert records == [] and done.stderr == ""


def test_the_hostile_guest_runs_confined_without_a_refused_call(tmp_path: Path) -> None:
    """The chaos guest's random port and MMIO accesses reach every device model on the vCPU thread
    (benchmarks/confinement_cost.py runs it for 10^6 operations)."""
    done, records = pyrovisor(tmp_path, "run", "chaos", "--args", "operations=100000 seed=1", mode="enforce",
                              timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PASS: 100000 random device accesses from user mode" in done.stdout
    assert records == []
