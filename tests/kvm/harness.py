"""Test harness: a pyrovisor process with a control socket, its console read line by line."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pyrovisor.api.client import ApiClient

TICK = re.compile(r"^tick (\d+) (ok|MISMATCH.*)$")


class VmmProcess:
    """`pyrovisor ARGS --api SOCKET` in a child process; console lines collect in `lines`."""

    def __init__(self, args: Sequence[str], socket_path: Path, stdin: str | None = None,
                 prefix: Sequence[str] = ()) -> None:
        self.socket_path = socket_path
        self.process = subprocess.Popen([*prefix, sys.executable, "-m", "pyrovisor", *args, "--api", str(socket_path)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
        if stdin is not None:
            assert self.process.stdin is not None
            self.process.stdin.write(stdin)
            self.process.stdin.flush()
        self.lines: list[str] = []
        self._raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.api = ApiClient(socket_path, timeout=60)
        self.wait_for(lambda: socket_path.exists(), "the API socket", timeout=30)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._raw.append(line)
                self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        """Everything the console printed, exactly (the last line may be cut short by a pause)."""
        with self._lock:
            return "".join(self._raw)

    def snapshot_lines(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def ticks(self) -> list[int]:
        return ticks_in(self.snapshot_lines())

    def wait_for(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"pyrovisor exited ({self.process.returncode}) while waiting for {what}:\n"
                                     + "\n".join(self.snapshot_lines()) + (self.process.stderr.read() if self.process.stderr else ""))
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; console so far:\n" + "\n".join(self.snapshot_lines()[-20:]))

    def wait_for_tick(self, number: int, timeout: float = 30) -> None:
        self.wait_for(lambda: any(tick >= number for tick in self.ticks()), f"tick {number}", timeout)

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        """Wait for the process to end; returns its exit code and stderr."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        self._reader.join(5)
        stderr = self.process.stderr.read() if self.process.stderr else ""
        return self.process.returncode, stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def continuous_ticks(*outputs: str) -> list[int]:
    """Ticks in console outputs that continue one another (a pause may cut a line in two)."""
    ticks = ticks_in("".join(outputs).splitlines())
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), f"ticks are not consecutive: {ticks}"
    return ticks


def ticks_in(lines: Sequence[str]) -> list[int]:
    numbers = []
    for line in lines:
        match = TICK.match(line)
        if match:
            assert match.group(2) == "ok", f"memory check failed: {line}"
            numbers.append(int(match.group(1)))
    return numbers
