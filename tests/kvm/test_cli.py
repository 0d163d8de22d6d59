"""The pyrovisor command as users run it: a new process, real guests, clear one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

OTHER_GUEST = """
    .code64
    .globl _start
_start:
    mov $0x3f8, %dx
    lea message(%rip), %rsi
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $7, %al
    out %al, $0xf4
    hlt
message:
    .asciz "a separately built guest\\n"
"""


def pyrovisor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_run_default_guest() -> None:
    result = pyrovisor("run")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pyrovisor hello guest" in result.stdout
    assert "hello from user mode (CPL3)" in result.stdout


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None, reason="binutils not installed")
def test_run_separately_built_elf(tmp_path: Path) -> None:
    source, obj, elf = tmp_path / "other.s", tmp_path / "other.o", tmp_path / "other.elf"
    source.write_text(OTHER_GUEST)
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    subprocess.run(["ld", "-static", "-N", "-Ttext=0x100000", "-e", "_start", "-o", str(elf), str(obj)], check=True)
    result = pyrovisor("run", str(elf), "--memory", "16M")
    assert result.stdout == "a separately built guest\n"
    assert result.returncode == 7


@pytest.mark.parametrize("args, message", [
    (["run", "/nonexistent/guest.elf"], "cannot load /nonexistent/guest.elf: no such file"),
    (["run", "/etc/hostname"], "not an ELF file"),
    (["run", sys.executable], "only statically linked executables"),
    (["run", "no-such-guest"], "not a file and not a built-in guest"),
    (["run", "--memory", "100G"], "must be between 2 MiB and 64 GiB"),
    (["run", "--memory", "30G"], "larger than this host's RAM"),
    (["run", "--vcpus", "2"], "cannot start 2 vCPUs"),
])
def test_bad_input_gets_one_clear_line(args: list[str], message: str) -> None:
    result = pyrovisor(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.startswith("pyrovisor: error:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["run", "--memory", "lots"], ["run", "--vcpus", "0"], ["run", "--bogus"]])
def test_malformed_flags_are_usage_errors(args: list[str]) -> None:
    result = pyrovisor(*args)
    assert result.returncode == 2
    assert "usage: pyrovisor" in result.stderr and "Traceback" not in result.stderr


def test_run_with_timeout_stops_the_guest(tmp_path: Path) -> None:
    if shutil.which("as") is None:
        pytest.skip("binutils not installed")
    source, obj, elf = tmp_path / "spin.s", tmp_path / "spin.o", tmp_path / "spin.elf"
    source.write_text(".code64\n.globl _start\n_start: jmp _start\n")
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    subprocess.run(["ld", "-static", "-N", "-Ttext=0x100000", "-e", "_start", "-o", str(elf), str(obj)], check=True)
    result = pyrovisor("run", str(elf), "--timeout", "0.5")
    assert result.returncode == 124 and "still running after 0.5 s" in result.stderr


def test_guests_and_info() -> None:
    guests = pyrovisor("guests")
    assert guests.returncode == 0 and "hello" in guests.stdout
    info = pyrovisor("info")
    assert info.returncode == 0
    for fact in ("API version", "KVM_CAP_USER_MEMORY", "KVM_CAP_IRQCHIP", "KVM modules", "CPUID leaves"):
        assert fact in info.stdout


def test_keyboard_input_reaches_the_guest_uart() -> None:
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "run", "echo"], input="typed by a user\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "echo: typed by a user" in result.stdout


def test_triple_fault_is_reported_not_crashed_on(tmp_path: Path) -> None:
    """ud2 with the boot IDT (limit 0): #UD cannot be delivered, #DF neither: the CPU shuts down."""
    source, obj, elf = tmp_path / "fault.s", tmp_path / "fault.o", tmp_path / "fault.elf"
    source.write_text(".code64\n.globl _start\n_start: ud2\n")
    subprocess.run(["as", "--64", "-o", str(obj), str(source)], check=True)
    subprocess.run(["ld", "-static", "-N", "-Ttext=0x100000", "-e", "_start", "-o", str(elf), str(obj)], check=True)
    result = pyrovisor("run", str(elf), "--timeout", "30")
    assert result.returncode == 1
    assert result.stderr.startswith("pyrovisor: error: vCPU 0: shutdown") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
