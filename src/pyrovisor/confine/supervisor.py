"""The seccomp supervisor process: answers every call a filter refers to it, logs it and reports it to the VMM.

It runs as a separate process (`python -m pyrovisor.confine.supervisor CHANNEL_FD MODE`) for the reason the
working-set fault server does: a confined thread that makes a refused call while holding the interpreter
lock (an allocator mmap, an import) waits inside the kernel for the answer, and a supervisor thread in the
same process would need that lock to give it.

Protocol on the channel (a SOCK_SEQPACKET pair, one JSON object per message):
- VMM → supervisor: {"op": "listen", "id", "kind", "thread", "tid"} with the listener fd attached (SCM_RIGHTS).
- supervisor → VMM: {"op": "denied", "id", "kind", "tid", "syscall", "nr", "args", "allowed"} before the call is
  answered (so the VMM sees the report before any effect of the refusal); {"op": "gone", "id"} once no thread
  uses a filter any more.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from pyrovisor.confine.seccomp import Notifications, syscall_name

MAX_MESSAGE = 4096
MMAP_NR = 9  # x86-64
PR_SET_NAME = 15
LOG_VARIABLE = "PYROVISOR_SECCOMP_LOG"  # JSON lines, one per refused (or, in audit mode, reported) call


@dataclass
class _Listener:
    fd: int
    ident: int
    kind: str
    thread: str
    tid: int


class Supervisor:
    """Waits on the channel and on every listener; one thread, no interpreter lock shared with the VMM."""

    def __init__(self, channel: socket.socket, mode: str, log: TextIO | None, vmm_pid: int) -> None:
        self.channel = channel
        self.audit = mode == "audit"
        self.mode = mode
        self.log = log
        self.vmm_pid = vmm_pid
        self.epoll = select.epoll()
        self.epoll.register(channel.fileno(), select.EPOLLIN)
        self.listeners: dict[int, _Listener] = {}
        self.threads: dict[int, str] = {}  # tid → name of the thread that registered a listener
        self.notifications = Notifications()

    def serve(self) -> None:
        while True:
            try:
                events = self.epoll.poll()
            except InterruptedError:
                continue
            for fd, mask in events:
                if fd == self.channel.fileno():
                    if not self._read_channel():
                        return
                elif mask & select.EPOLLIN:
                    self._answer(self.listeners[fd])
                elif mask & (select.EPOLLHUP | select.EPOLLERR):
                    self._forget(self.listeners[fd])

    def _read_channel(self) -> bool:
        fds = array.array("i")
        try:
            data, ancillary, _flags, _address = self.channel.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(fds.itemsize))
        except InterruptedError:
            return True
        except OSError:  # the VMM exited (with reports unread: a reset, not an end of file)
            return False
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            return False
        listener = _parse_listen(data, fds)
        if listener is None:
            for fd in fds:
                os.close(fd)
            return True
        self.listeners[listener.fd] = listener
        self.threads[listener.tid] = listener.thread
        self.epoll.register(listener.fd, select.EPOLLIN)
        return True

    def _answer(self, listener: _Listener) -> None:
        request = self.notifications.receive(listener.fd)
        if request is None:
            return
        nr = request.data.nr
        record = {
            "time": round(time.time(), 6), "pid": self.vmm_pid, "mode": self.mode, "kind": listener.kind,
            "thread": self.threads.get(request.pid, f"{listener.thread} or a thread it started"),
            "tid": request.pid, "syscall": syscall_name(nr), "nr": nr,
            "args": [f"{value:#x}" for value in request.data.args], "ip": f"{request.data.instruction_pointer:#x}",
        }
        if nr == MMAP_NR and request.data.args[4] < 1 << 31:  # which file is being mapped (a library, usually)
            with contextlib.suppress(OSError):
                record["file"] = os.readlink(f"/proc/{request.pid}/fd/{request.data.args[4]}")
        if self.log is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
        report = {"op": "denied", "id": listener.ident, "allowed": self.audit, **record}
        with contextlib.suppress(OSError):  # the VMM went away: still answer, so the thread is not left waiting
            self.channel.send(json.dumps(report).encode())
        self.notifications.respond(listener.fd, request.id, error=errno.EPERM, allow=self.audit)

    def _forget(self, listener: _Listener) -> None:
        self.epoll.unregister(listener.fd)
        os.close(listener.fd)
        del self.listeners[listener.fd]
        with contextlib.suppress(OSError):
            self.channel.send(json.dumps({"op": "gone", "id": listener.ident}).encode())


def _parse_listen(data: bytes, fds: array.array[int]) -> _Listener | None:
    try:
        message = json.loads(data)
        if message.get("op") != "listen" or len(fds) != 1:
            return None
        return _Listener(fds[0], int(message["id"]), str(message["kind"]), str(message["thread"]),
                         int(message["tid"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


PROCESS_NAME = b"pyro-seccomp"  # its /proc/PID/comm, so that a listing of processes says what it is


def main(argv: list[str]) -> int:
    channel_fd, mode, vmm_pid = int(argv[1]), argv[2], int(argv[3])
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(PROCESS_NAME), 0, 0, 0)
    channel = socket.socket(fileno=channel_fd)
    path = os.environ.get(LOG_VARIABLE)
    try:
        log = open(path, "a", encoding="utf-8") if path else None  # noqa: SIM115 (open for the process's life)
    except OSError:  # e.g. a path outside a jail: the VMM still gets every report (audit mode warns on stderr)
        log = None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the VMM's Ctrl-C is not ours: the channel's end is
    Supervisor(channel, mode, log, vmm_pid).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
