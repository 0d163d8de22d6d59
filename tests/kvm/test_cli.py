"""The pyrovisor command as users run it: a new process, real guests, clear one-line errors."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm

PRINTING_GUEST = """
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
2:  {end}
message:
    .asciz "{message}"
"""


def printing_guest(message: str, end: str) -> str:
    """A bare guest that prints `message` on COM1, then runs the instructions `end`."""
    return PRINTING_GUEST.format(message=message, end=end)


OTHER_GUEST = printing_guest("a separately built guest\\n", "mov $7, %al; out %al, $0xf4; hlt")


def pyrovisor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def build_guest(tmp_path: Path, name: str, source: str) -> Path:
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("binutils not installed")
    assembly, obj, elf = tmp_path / f"{name}.s", tmp_path / f"{name}.o", tmp_path / f"{name}.elf"
    assembly.write_text(source)
    subprocess.run(["as", "--64", "-o", str(obj), str(assembly)], check=True)
    subprocess.run(["ld", "-static", "-N", "-Ttext=0x100000", "-e", "_start", "-o", str(elf), str(obj)], check=True)
    return elf


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
    (["run", "--vcpus", "2"], "cannot start 2 vCPUs"),
    (["run", "os", "--vcpus", "20", "--args", "nosuch"], "os.elf brings up at most 16 vCPUs"),
])
def test_bad_input_gets_one_clear_line(args: list[str], message: str) -> None:
    result = pyrovisor(*args)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.startswith("pyrovisor: error:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--memory", "lots"], "invalid value 'lots'"),
    (["run", "--vcpus", "0"], "invalid value '0'"),
    (["run", "--bogus"], "unrecognized arguments: --bogus"),
    (["run", "--memory", "0"], "invalid value '0': must be between 2 MiB and 64 GiB"),  # was: ran with 64 MiB
    (["run", "--memory", "100G"], "invalid value '100G': must be between 2 MiB and 64 GiB"),
    (["run", "--memory", "1T"], "invalid value '1T': must be between 2 MiB and 64 GiB"),
    (["run", "--memory", f"{(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30) + 40}G"],
     "larger than this host's RAM"),
    (["run", "--timeout", "-1"], "invalid value '-1': must be a positive number of seconds"),
])
def test_malformed_flags_are_usage_errors(args: list[str], message: str) -> None:
    """Refused before any VM exists: exit code 2 and one line (no usage block, no traceback)."""
    result = pyrovisor(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("pyrovisor: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "(see 'pyrovisor" in result.stderr


def test_sandbox_base_refuses_more_vcpus_than_the_os_brings_up(tmp_path: Path) -> None:
    result = pyrovisor("sandbox", "--make-base", str(tmp_path / "base"), "--vcpus", "20")
    assert result.returncode == 1
    assert result.stderr.startswith("pyrovisor: error: invalid vcpus 20: os.elf brings up at most 16 vCPUs")
    assert not (tmp_path / "base").exists()


def test_run_with_timeout_stops_the_guest(tmp_path: Path) -> None:
    elf = build_guest(tmp_path, "spin", ".code64\n.globl _start\n_start: jmp _start\n")
    result = pyrovisor("run", str(elf), "--timeout", "0.5")
    assert result.returncode == 124 and "still running after 0.5 s" in result.stderr


@pytest.mark.parametrize("end, code, message", [
    ("jmp 2b", 124, "pyrovisor: guest still running after 1 s: stopped"),
    ("ud2", 1, "pyrovisor: error: vCPU 0: shutdown"),
])
def test_host_messages_start_on_a_new_line(tmp_path: Path, end: str, code: int, message: str) -> None:
    """The guest's last output has no newline; stdout and stderr are one terminal, as for a user."""
    elf = build_guest(tmp_path, "half", printing_guest("half a line", end))
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "run", str(elf), "--timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            timeout=60)
    assert result.returncode == code
    assert result.stdout.startswith(f"half a line\n{message}"), result.stdout
    assert result.stdout.count("\n") == 2
    # With stdout and stderr apart, the guest's bytes and the message are left as they are.
    apart = pyrovisor("run", str(elf), "--timeout", "1")
    assert apart.stdout == "half a line" and apart.stderr.startswith(message)


def read_until(stream: int, pattern: str, timeout: float) -> str:
    """Read from a pipe until `pattern` appears in what was read, or fail after `timeout` seconds."""
    text, deadline = "", time.monotonic() + timeout
    while not re.search(pattern, text):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in {text!r}"
        ready, _, _ = select.select([stream], [], [], left)
        if ready:
            chunk = os.read(stream, 4096)
            assert chunk, f"the output ended without {pattern!r}: {text!r}"
            text += chunk.decode(errors="replace")
    return text


def test_sigterm_stops_the_vm_cleanly(tmp_path: Path) -> None:
    """SIGTERM: the guest stops, the terminal leaves raw mode, the API socket goes away, exit code 143."""
    socket_path = tmp_path / "api.sock"
    controller, terminal = pty.openpty()
    try:
        cooked = termios.tcgetattr(terminal)
        process = subprocess.Popen([sys.executable, "-m", "pyrovisor", "run", "os", "--memory", "64M", "--vcpus", "1",
                                    "--args", "counter count=0 period_ms=20", "--api", str(socket_path)],
                                   stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert process.stdout is not None and process.stderr is not None
            read_until(process.stdout.fileno(), r"beat 3 ", 30)
            assert socket_path.is_socket()
            assert termios.tcgetattr(terminal) != cooked  # the keyboard is in raw mode while the guest runs
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=15)
            stopped_in = time.monotonic() - signalled
            err = process.stderr.read().decode()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert code == 128 + signal.SIGTERM, err
        assert stopped_in < 5
        assert err == "pyrovisor: SIGTERM received: the guest was stopped\n"
        assert termios.tcgetattr(terminal) == cooked
        assert not socket_path.exists()
    finally:
        os.close(controller)
        os.close(terminal)


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
