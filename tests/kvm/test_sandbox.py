"""The sandbox: restore a base, run a program in the guest, report exactly what it changed, revert."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.errors import ConfigError, StateError
from pyrovisor.introspect import guest_profile
from pyrovisor.sandbox import Sandbox, make_base
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm

MiB = 1 << 20
PAGE = 4096


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base(tmp_path_factory.mktemp("sandbox") / "base", memory_size=128 * MiB)


def run_log(log: Path, run: int) -> str:
    """The console of one run, from the log all runs append to."""
    return log.read_text().split("=== sandbox run ")[run]


def touched(console: str) -> list[int]:
    m = re.search(r"^pagetouch \d+: wrote((?: 0x[0-9a-f]+)+)$", console, re.MULTILINE)
    assert m, console
    return [int(word, 16) for word in m[1].split()]


def test_the_report_names_exactly_the_pages_the_program_wrote(base: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    profile = guest_profile()
    mmap_base, stack_top = profile.constant("USER_MMAP_BASE"), profile.constant("USER_STACK_TOP")
    with Sandbox(base, log) as sandbox:
        first = sandbox.run("pagetouch pages=6 stride=3 value=0x77", timeout=20)
        second = sandbox.run("pagetouch pages=6 stride=3 value=0x77", timeout=20)

    for number, report in ((1, first), (2, second)):
        assert report.outcome == "exited" and report.vm_exit_code == 0 and report.program_exit_code == 0
        assert report.program_pid is not None
        written = touched(run_log(log, number))
        assert len(written) == 6
        pages = report.user_pages[report.program_pid]
        # Its fresh region holds exactly the pages it says it wrote: none missing, none extra.
        assert [va for va in pages if va >= mmap_base and va < stack_top - 8 * MiB] == written
        # Its other changed user pages are its stack and its data, nothing else.
        for va in pages:
            assert va in written or stack_top - 64 * 1024 <= va < stack_top or va < mmap_base, hex(va)
        user = sum(len(vas) for vas in report.user_pages.values())
        assert report.pages_of("user") == user
        assert report.pages_of("user") + report.pages_of("kernel") == report.pages_changed <= report.pages_written
        assert report.pages_of("kernel") > 0  # the process table, its page tables, the scheduler's state
        assert report.cycle_ms >= report.restore_ms + report.run_ms

    # The second run started from the base again: what the first changed read as the base before it began,
    # and it changed the same pages in the same way.
    assert first.clean_start_pages == 0 and second.clean_start_pages == first.pages_changed
    assert {(r.gpa, r.pages, r.kind, r.pid, r.virtual_address) for r in second.ranges} == \
           {(r.gpa, r.pages, r.kind, r.pid, r.virtual_address) for r in first.ranges}


def test_timeout_failure_and_unknown_program_are_reported(base: Path, tmp_path: Path) -> None:
    with Sandbox(base, tmp_path / "console.log") as sandbox:
        hung = sandbox.run("counter count=0 period_ms=10", timeout=1.0)
        failed = sandbox.run("pagetouch pages=0", timeout=20)
        unknown = sandbox.run("nosuchprogram x=1", timeout=20)
        options = sandbox.run("kernel keepmm=0", timeout=20)
        after = sandbox.run("pagetouch pages=1", timeout=20)
    assert hung.outcome == "timeout" and hung.program_pid is not None and hung.program_exit_code is None
    assert 1000 <= hung.run_ms < 5000
    assert failed.outcome == "exited" and failed.program_exit_code == 1 and failed.vm_exit_code != 0
    assert hung.start_error is None and failed.start_error is None
    assert unknown.outcome == "exited" and unknown.program_pid is None and unknown.vm_exit_code != 0
    # Why it did not start is in the report, as the guest's runner said it on the console of that run.
    assert unknown.start_error == ("cannot start 'nosuchprogram x=1': no program 'nosuchprogram' in the archive, "
                                   "or no room left for its arguments (E_INVAL)")
    assert options.program_pid is None and options.start_error is not None
    assert "kernel options cannot be given to one program" in options.start_error
    log = (tmp_path / "console.log").read_text()
    assert f"runner 1: {unknown.start_error}" in log and f"the program did not start: {unknown.start_error}" in log
    assert after.program_exit_code == 0 and after.clean_start_pages == options.pages_changed


def test_bad_bases_and_commands_are_refused(base: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(base, corrupt)
    state = corrupt / "state"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(StateError):
        Sandbox(corrupt, tmp_path / "log")

    # A snapshot of the OS without the runner is not a sandbox base.
    other = tmp_path / "other"
    config = MachineConfig(kernel=guests_dir() / "os.elf", initrd=guests_dir() / "os-programs.img", memory_size=64 * MiB,
                           cmdline="counter count=0 period_ms=50")
    with build_vm(config, lambda chunk: None) as vmm:
        vmm.start()
        assert vmm.wait(0.5) is None
        take_snapshot(vmm, other)
        vmm.stop()
    with Sandbox(other, tmp_path / "log") as sandbox, pytest.raises(StateError, match="not a sandbox base"):
        sandbox.run("pagetouch", timeout=5)

    with Sandbox(base, tmp_path / "log") as sandbox:
        for command in ("", "counter; memcheck", "x" * 2000, "pagetouch\0pages=1"):
            with pytest.raises(ConfigError):
                sandbox.run(command, timeout=5)


def test_cli_runs_and_reports_json(base: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "sandbox", "--base", str(base), "--run",
                             "pagetouch pages=2 stride=5", "--runs", "2", "--timeout", "20", "--log", str(log), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    reports = json.loads(result.stdout)
    assert [r["run"] for r in reports] == [1, 2]
    for number, report in enumerate(reports, start=1):
        pid = str(report["program_pid"])
        written = {hex(va) for va in touched(run_log(log, number))}
        assert written <= set(report["user_pages"][pid])
    assert reports[1]["clean_start_pages"] == reports[0]["pages_changed"]
    assert "guest-physical" not in result.stdout  # JSON only on stdout
    bad = subprocess.run([sys.executable, "-m", "pyrovisor", "sandbox", "--base", str(base)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--base needs --run" in bad.stderr


def test_cli_says_why_a_program_did_not_start(base: Path, tmp_path: Path) -> None:
    """`pid None exit None` is not a report: the JSON and the table carry the guest's reason."""
    command = [sys.executable, "-m", "pyrovisor", "sandbox", "--base", str(base), "--run", "nosuchprogram x=1",
               "--timeout", "20", "--log", str(tmp_path / "console.log")]
    reason = "no program 'nosuchprogram' in the archive"
    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=120)
    assert as_json.returncode == 1, as_json.stderr
    [report] = json.loads(as_json.stdout)
    assert report["program_pid"] is None and reason in report["start_error"]
    as_table = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert as_table.returncode == 1, as_table.stderr
    title = " ".join(as_table.stdout.split())  # rich wraps the long title
    assert "program did not start: cannot start 'nosuchprogram x=1': " + reason in title
    assert "pid None" not in title
