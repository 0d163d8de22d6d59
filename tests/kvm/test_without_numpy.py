"""Issue 16: pyrovisor runs guests, takes diff snapshots (dirty bitmap and dirty rings) and migrates in a Python
where numpy and matplotlib cannot be imported (tests/import_blocker.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from harness import OS_WORKLOAD, VmmProcess, assert_guest_continued, os_run_args, restore_and_read

from import_blocker import ATTEMPT, PYROVISOR
from pyrovisor.api.client import ApiClient

pytestmark = pytest.mark.kvm

# A heartbeat every 20 ms and an 8 MiB pattern verified every 20 ms (docs/guest-os.md), until stopped.
OS_PROGRAMS = "counter count=0 period_ms=20; memcheck mib=8 passes=0 interval_ms=20"


def assert_no_attempt(stderr: str) -> None:
    assert ATTEMPT not in stderr, stderr


def test_hello_guest_runs_without_numpy() -> None:
    result = subprocess.run([*PYROVISOR, "run"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pyrovisor hello guest" in result.stdout
    assert "hello from user mode (CPL3)" in result.stdout
    assert_no_attempt(result.stderr)


# 64 MiB are 16384 pages: the OS's rings get more entries than that (tests/kvm/test_migration.py says why).
@pytest.mark.parametrize("tracking", [[], ["--dirty-ring", "32768"]], ids=["bitmap", "ring"])
def test_diff_snapshot_without_numpy(tmp_path: Path, tracking: list[str]) -> None:
    vmm = VmmProcess([*os_run_args(OS_PROGRAMS, memory="64M"), *tracking], tmp_path / "api.sock",
                     program=PYROVISOR)
    try:
        vmm.wait_for_beat(5)
        vmm.api.post("/pause")
        full = vmm.api.post("/snapshot", {"path": str(tmp_path / "base")})
        vmm.api.post("/resume")
        vmm.wait_for_beat(max(vmm.beats()) + 10)
        vmm.api.post("/pause")
        diff = vmm.api.post("/snapshot", {"path": str(tmp_path / "diff"), "kind": "diff"})
        assert (full["kind"], diff["kind"]) == ("full", "diff")
        assert 0 < diff["pages"] < full["pages"] / 4, "the diff holds the pages written since the base"
        vmm.api.post("/stop")  # still paused: the console ends where the diff was taken
        code, stderr = vmm.finish()
        assert code == 0, stderr
        assert_no_attempt(stderr)
        before = vmm.text()
    finally:
        vmm.kill()
    assert_guest_continued(before, restore_and_read(tmp_path / "diff", 10, program=PYROVISOR), beats_after=10)


def test_migration_without_numpy(tmp_path: Path) -> None:
    listen = tmp_path / "migrate.sock"
    receiver = subprocess.Popen([*PYROVISOR, "receive", "--listen", f"unix:{listen}", "--api",
                                 str(tmp_path / "dest.sock")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL)
    source = VmmProcess(os_run_args(OS_WORKLOAD), tmp_path / "source.sock", program=PYROVISOR)
    try:
        source.wait_for_os_workload()
        deadline = time.monotonic() + 20
        while not listen.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = source.api.post("/migrate", {"to": f"unix:{listen}", "verify": True, "wait": True})
        assert status["state"] == "completed", status
        result = status["result"]
        assert result["memory_digest_source"] == result["memory_digest_destination"] is not None
        assert result["rounds"][0]["zero_pages"] > 0 and result["rounds"][0]["dirty_pages"] > 0
        code, stderr = source.finish()
        assert code == 0, stderr
        assert_no_attempt(stderr)
        time.sleep(1.0)
        ApiClient(tmp_path / "dest.sock").post("/stop")
        out, err = receiver.communicate(timeout=30)
        assert receiver.returncode == 0, err
        assert_no_attempt(err)
        assert_guest_continued(source.text(), out, beats_after=10)
    finally:
        source.kill()
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate()
