"""Keyboard to the guest's UART: raw terminal mode with a Ctrl-A x escape, or a pipe read to its end."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Callable
from types import TracebackType
from typing import Any

from pyrovisor.confine.policy import enter_command_thread
from pyrovisor.errors import SeccompViolation

ESCAPE = 0x01  # Ctrl-A, then 'x' quits (as in QEMU)
QUIT = ord("x")
POLL_SECONDS = 0.1


class TerminalInput:
    """Feeds stdin to `feed` on a background thread while the context is active."""

    def __init__(self, feed: Callable[[bytes], None], on_quit: Callable[[], None],
                 on_denied: Callable[[SeccompViolation], None] | None = None) -> None:
        self._feed = feed
        self._on_quit = on_quit
        self._on_denied = on_denied  # the keyboard thread made a system call its seccomp filter refuses
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._saved_mode: list[Any] | None = None
        self._fd = _stdin_fd()
        self._escape_pending = False

    def __enter__(self) -> TerminalInput:
        if self._fd is None:
            return self
        if os.isatty(self._fd):
            self._saved_mode = termios.tcgetattr(self._fd)
            tty.setraw(self._fd)
        self._thread = threading.Thread(target=self._pump, name="stdin", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        if self._fd is not None and self._saved_mode is not None:
            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved_mode)

    def _pump(self) -> None:
        assert self._fd is not None
        enter_command_thread("console", self._on_denied)
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], POLL_SECONDS)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 256)
            except OSError:
                return
            if not data:
                return
            self._feed(self._filter(data))

    def _filter(self, data: bytes) -> bytes:
        """Pass keys through, except the Ctrl-A x escape sequence (Ctrl-A Ctrl-A sends one Ctrl-A)."""
        if self._saved_mode is None:
            return data
        out = bytearray()
        for byte in data:
            if self._escape_pending:
                self._escape_pending = False
                if byte == QUIT:
                    self._on_quit()
                    continue
                out.append(ESCAPE)
                if byte == ESCAPE:
                    continue
            elif byte == ESCAPE:
                self._escape_pending = True
                continue
            out.append(byte)
        return bytes(out)


def _stdin_fd() -> int | None:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    try:
        os.fstat(fd)
    except OSError:
        return None
    return fd


class StdoutConsole:
    """Console output to stdout, unbuffered. If the reader goes away (a closed pipe), output is dropped
    from then on and `on_closed` is called once, so the VMM can stop instead of failing in a vCPU thread.

    It remembers whether the guest left stdout in the middle of a line, so that `host_message` can start
    the host's own lines on a fresh one."""

    def __init__(self) -> None:
        self.on_closed: Callable[[], None] | None = None
        self._closed = False

    @property
    def mid_line(self) -> bool:
        """True when the last byte written to stdout was not a newline."""
        return _stdout.mid_line

    def __call__(self, data: bytes) -> None:
        if self._closed or not data:
            return
        stream = sys.stdout
        try:
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                buffer.write(data)
            else:
                stream.write(data.decode("latin-1"))
            stream.flush()
            _stdout.mid_line = data[-1:] != b"\n"
        except BrokenPipeError:
            self._closed = True
            _silence_stdout()
            if self.on_closed is not None:
                self.on_closed()


class _StdoutState:
    """What guest consoles last left on this process's stdout (shared by every StdoutConsole)."""

    mid_line = False


_stdout = _StdoutState()


def host_message(line: str) -> None:
    """Write one line of the host's own (a notice or an error) to stderr.

    When a guest console left stdout mid-line and stdout and stderr reach the same terminal or file, a
    newline comes first, so the message does not continue the guest's half-printed line."""
    shared = _same_destination()
    prefix = "\n" if _stdout.mid_line and shared else ""
    if shared:
        _stdout.mid_line = False
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"{prefix}{line}\n")
        sys.stderr.flush()


def _same_destination() -> bool:
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so flushing at interpreter exit does not fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
