"""QEMU as a baseline in the same run: boots the same guest ELF (through its PVH entry) and drives QEMU's
own save/restore and live migration over QMP. Used by benchmarks/snapshot.py and benchmarks/migration.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"


def qemu_available() -> str | None:
    """None if QEMU can be used, else why not (it is not a dependency: `apt-get install qemu-system-x86`)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    return None


class Qemu:
    """One QEMU process with a QMP socket; the guest's console goes to a file."""

    def __init__(self, kernel: Path, memory_mib: int, cmdline: str, incoming: str | None = None,
                 initrd: Path | None = None, vcpus: int = 1) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="pyrovisor-qemu-"))
        self.qmp_path = self.scratch / "qmp.sock"
        self.console_path = self.scratch / "console.log"
        command = [QEMU, "-accel", "kvm", "-m", f"{memory_mib}M", "-smp", str(vcpus), "-nographic", "-no-reboot",
                   "-net", "none", "-nodefaults", "-serial", f"file:{self.console_path}", "-kernel", str(kernel),
                   "-append", cmdline, "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                   "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if initrd is not None:  # the OS guest's programs (PVH passes it as a module)
            command += ["-initrd", str(initrd)]
        if incoming is not None:
            command += ["-incoming", incoming]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        self.sock = self._connect()
        self.reader = self.sock.makefile("r")
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"QEMU exited: {self.process.stderr.read().decode() if self.process.stderr else ''}")
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(self.qmp_path))
                return sock
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("QEMU's QMP socket never appeared")

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise RuntimeError("QEMU closed its QMP socket")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                raise RuntimeError(f"QMP {command}: {message['error']}")
            return message.get("return")

    def console(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def wait_console(self, text: str | re.Pattern[str], timeout: float = 120) -> None:
        """Until the console shows `text` (a string, or a compiled pattern searched for)."""
        deadline = time.monotonic() + timeout
        while not (text.search(self.console()) if isinstance(text, re.Pattern) else text in self.console()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"QEMU guest never printed {text!r}: {self.console()[-500:]}")
            time.sleep(0.02)

    def wait_status(self, wanted: str, timeout: float = 300) -> float:
        """Poll query-status until it reports `wanted`; returns when (perf_counter)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.execute("query-status")["status"] == wanted:
                return time.perf_counter()
            time.sleep(0.0005)
        raise RuntimeError(f"QEMU never reached status {wanted}")

    def wait_migration(self, timeout: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            time.sleep(0.01)
        raise RuntimeError("QEMU migration did not finish")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self.execute("quit")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.sock.close()
        shutil.rmtree(self.scratch, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
