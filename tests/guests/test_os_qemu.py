"""The same OS guest under QEMU's TCG, where SYSCALL really enters CPL0 as on VMX/SVM hosts: the kernel's
other system-call path (SWAPGS, the per-vCPU area, its own stack switch) must work too, unchanged."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from pyrovisor.catalog import guests_dir

QEMU = "qemu-system-x86_64"

pytestmark = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed (apt-get install "
                                "qemu-system-x86)")


def run_in_qemu(programs: str) -> tuple[int, str]:
    """(exit code the guest wrote to the debug-exit port, console)."""
    directory = guests_dir()
    result = subprocess.run(
        [QEMU, "-accel", "tcg", "-cpu", "max", "-m", "64M", "-nographic", "-no-reboot", "-nodefaults", "-net", "none",
         "-serial", "stdio", "-kernel", str(directory / "os.elf"), "-initrd", str(directory / "os-programs.img"),
         "-append", programs, "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode & 1, f"QEMU did not stop through the debug-exit port: {result.stderr}"
    return result.returncode >> 1, result.stdout  # QEMU exits with (code << 1) | 1


def test_programs_run_with_system_calls_entering_cpl0_directly() -> None:
    code, console = run_in_qemu("counter count=3 period_ms=20; kwriter count=2; memcheck mib=4 passes=2")
    for line in (r"^PASS: counter 1: 3 beats", r"^PASS: kwriter 2: getpid was hooked through the patched table 2 times$",
                 r"^PASS: kwriter 2: the table entry was restored each time$",
                 r"^PASS: memcheck 3: 4 MiB intact after 2 passes$", r"^os: all 3 processes exited, 0 failed"):
        assert re.search(line, console, re.MULTILINE), f"no {line!r} in:\n{console}"
    summary = re.search(r"^os: vCPU 0 ran 3 processes: \d+ switches, (\d+) system calls \((\d+) through #GP, (\d+) "
                        r"direct\)", console, re.MULTILINE)
    assert summary, console
    calls, trapped, direct = map(int, summary.groups())
    assert trapped == 0 and direct == calls > 0, "under TCG every SYSCALL enters CPL0 itself"
    assert not re.search(r"^FAIL:", console, re.MULTILINE), console
    assert code == 0


def test_a_bad_system_call_argument_is_reported_on_this_path_too() -> None:
    code, console = run_in_qemu("fault addr=0x10 mode=syscall")
    assert re.search(r"^USER FAULT: pid 1 \(fault\) vector 14 \(#PF page fault\) error 0x0 rip 0x\w+ cr2 0x10 rsp 0x\w+: "
                     r"bad address passed to a system call$", console, re.MULTILINE), console
    assert code == 2
