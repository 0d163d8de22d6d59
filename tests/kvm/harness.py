"""Test harness: a pyrovisor process with a control socket, its console read line by line, and readers
for the witnesses the guests print: the OS's `counter` beats and `memcheck` passes, the `ticker`'s ticks."""

from __future__ import annotations

import codecs
import io
import locale
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from pyrovisor.api.client import ApiClient

TICK = re.compile(r"^tick (\d+) (ok|MISMATCH.*)$")
BEAT = re.compile(r"^counter (?P<pid>\d+): beat (?P<beat>\d+) at (?P<ms>\d+) ms on vCPU \d+$")
MEMCHECK_PASS = re.compile(r"^memcheck (?P<pid>\d+): pass (?P<number>\d+) (?P<result>ok|FAILED)")
MEMDIRTY_STARTED = re.compile(r"^memdirty \d+: \d+ pages at 0x\w+", re.MULTILINE)

# The OS guest's liveness and integrity witnesses with a dirtier (docs/guest-os.md): a heartbeat every
# 20 ms, an 8 MiB pattern re-verified every 20 ms, and 32 MiB rewritten at 10000 pages/s (~40 MB/s),
# all running until stopped.
OS_WORKLOAD = ("counter count=0 period_ms=20; memcheck mib=8 passes=0 interval_ms=20; "
               "memdirty pages=8192 rate=10000 seconds=0")


def os_run_args(programs: str = OS_WORKLOAD, memory: str = "128M", vcpus: int = 2) -> list[str]:
    """`pyrovisor run` arguments for the OS guest running `programs`."""
    return ["run", "os", "--memory", memory, "--vcpus", str(vcpus), "--args", programs]


class VmmProcess:
    """`pyrovisor ARGS --api SOCKET` in a child process (`program`: how pyrovisor is started); console lines
    collect in `lines`."""

    def __init__(self, args: Sequence[str], socket_path: Path, stdin: str | None = None,
                 prefix: Sequence[str] = (), program: Sequence[str] = (sys.executable, "-m", "pyrovisor")) -> None:
        self.socket_path = socket_path
        self.process = subprocess.Popen([*prefix, *program, *args, "--api", str(socket_path)],
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
        """Console output as it arrives, a line cut short by a pause included (the text of `text()`); whole lines
        in `lines`. Decoded as the text-mode pipe would, universal newlines too."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder(locale.getpreferredencoding(False))(),
                                               translate=True)
        partial = ""
        while True:
            chunk = os.read(fd, 65536)
            text = decoder.decode(chunk, final=not chunk)
            *whole, partial = (partial + text).split("\n")
            with self._lock:
                self._raw.append(text)
                self.lines.extend(whole)
                if not chunk and partial:
                    self.lines.append(partial)
            if not chunk:
                return

    def text(self) -> str:
        """Everything the console printed, exactly (the last line may be cut short by a pause)."""
        with self._lock:
            return "".join(self._raw)

    def settled_text(self, quiet_s: float = 0.3, timeout: float = 10) -> str:
        """The console once nothing new has arrived for `quiet_s`: after a pause, all the guest printed before it
        (the reader thread may not have read it yet when the pause returns)."""
        text = self.text()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            newer = self.text()
            if newer == text:
                break
            text = newer
        return text

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

    def beats(self) -> list[int]:
        return [beat for beat, _ in beats_in(self.snapshot_lines())]

    def wait_for_beat(self, number: int, timeout: float = 30) -> None:
        self.wait_for(lambda: any(beat >= number for beat in self.beats()), f"counter beat {number}", timeout)

    def wait_for_os_workload(self, beats: int = 5, timeout: float = 30) -> None:
        """Until memdirty has filled its working set (it dirties at its rate from then on) and the counter
        has beaten `beats` times."""
        self.wait_for(lambda: MEMDIRTY_STARTED.search(self.text()) is not None, "memdirty to start", timeout)
        self.wait_for_beat(max(self.beats(), default=0) + beats, timeout)

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


def restore_and_read(snapshot: Path, beats_wanted: int, *extra: str,
                     program: Sequence[str] = (sys.executable, "-m", "pyrovisor")) -> str:
    """Run `pyrovisor restore` until the OS's counter has beaten `beats_wanted` times; return the console."""
    process = subprocess.Popen([*program, "restore", str(snapshot), *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    lines: list[str] = []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            lines.append(line)
            if len(beats_in([text.rstrip("\n") for text in lines])) >= beats_wanted:
                break
    finally:
        process.kill()
        process.wait()
    output = "".join(lines)
    assert len(beats_in(output.splitlines())) >= beats_wanted, output + (process.stderr.read() if process.stderr else "")
    return output


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


def beats_in(lines: Sequence[str]) -> list[tuple[int, int]]:
    """The counter's (beat, guest milliseconds) in console lines; one counter process expected."""
    found = [match for match in map(BEAT.match, lines) if match]
    assert len({match["pid"] for match in found}) <= 1, "one counter process"
    return [(int(match["beat"]), int(match["ms"])) for match in found]


def continuous_beats(*outputs: str) -> list[tuple[int, int]]:
    """The counter's beats in console outputs that continue one another (a pause may cut a line in two):
    numbered without a gap or a restart, at guest times that never go back."""
    beats = beats_in("".join(outputs).splitlines())
    numbers, times = [beat for beat, _ in beats], [ms for _, ms in beats]
    assert numbers and numbers == list(range(numbers[0], numbers[0] + len(numbers))), f"beats not consecutive: {numbers}"
    assert times == sorted(times), f"guest time went back: {times}"
    return beats


def assert_guest_continued(before: str, after: str, beats_after: int = 10) -> None:
    """The OS guest went on from console `before` (a source, or a VM up to its snapshot) in `after` (the
    destination, or the restored VM): the counter without a reset or a gap, memcheck passing again."""
    last_beat, last_pass = beats_in(before.splitlines())[-1][0], max(memcheck_passes(before))
    beats = continuous_beats(before, after)
    assert beats[-1][0] >= last_beat + beats_after, f"the counter went on: {beats[-1]} after beat {last_beat}"
    passes = memcheck_passes(before + after)
    assert passes == list(range(1, len(passes) + 1)) and passes[-1] > last_pass, "memcheck verified again"


def memcheck_passes(text: str) -> list[int]:
    """The numbers of memcheck's verification passes in `text`; fails on any mismatch it reported."""
    assert "MISMATCH" not in text and "FAIL" not in text, f"memcheck found damage:\n{text[-2000:]}"
    found = [match for match in map(MEMCHECK_PASS.match, text.splitlines()) if match]
    assert all(match["result"] == "ok" for match in found)
    return [int(match["number"]) for match in found]
