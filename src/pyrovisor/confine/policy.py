"""Confinement of a VMM process's threads: the mode, the supervisor process and what a refused call does."""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.errors import ConfigError, PyrovisorError, SeccompViolation
from pyrovisor.helper_process import reap, start_helper

log = logging.getLogger(__name__)

MODES = ("enforce", "audit", "off")
MODE_VARIABLE = "PYROVISOR_SECCOMP"  # enforce | audit | off: the mode of every VMM started with it set
TEST_DENY_VARIABLE = "PYROVISOR_SECCOMP_TEST_DENY"  # tests only: a thread of this kind makes a refused call
TEST_SYSCALL = "getppid"  # harmless, and allowed to no kind of thread
DEFAULT_LIBRARY_MODE = "off"  # a VM built from Python is confined only when asked (the CLI's default is enforce)

OnDenied = Callable[[SeccompViolation], None]


def mode_from_environment(default: str = DEFAULT_LIBRARY_MODE) -> str:
    value = os.environ.get(MODE_VARIABLE, "").strip() or default
    if value not in MODES:
        raise ConfigError(MODE_VARIABLE, value, f"expected one of {', '.join(MODES)}")
    return value


@dataclass
class _Entry:
    kind: str
    thread: str
    on_denied: OnDenied | None


class Confinement:
    """One per process: the supervisor child, the channel to it, and the filters loaded by this process's threads.

    Threads call `enter(kind, on_denied)` at the start of their function; the filter then covers them and the
    threads they start. A refused call reaches `on_denied` (enforce mode) on the `seccomp-reports` thread.
    """

    def __init__(self, mode: str) -> None:
        from pyrovisor.confine.seccomp import library

        library()  # a clear error now if libseccomp is missing, not in a vCPU thread later
        self.mode = mode
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._channel = ours
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        try:
            if threading.active_count() == 1:  # the command line, before anything started: a fork is safe
                self._pid = _fork_supervisor(ours, theirs, mode)
            else:  # threads exist (a library or test process): a fresh interpreter
                self._process = start_helper("pyrovisor.confine.supervisor",
                                             [str(theirs.fileno()), mode, str(os.getpid())], [theirs.fileno()])
        finally:
            theirs.close()
        self._ids = itertools.count(1)
        self._entries: dict[int, _Entry] = {}
        self._programs: dict[str, bytes] = {}  # kind -> its compiled filter: every vCPU thread loads the same one
        self._lock = threading.Lock()  # held while reading and handling reports (see settle)
        self.violations: list[SeccompViolation] = []
        self.reported: set[tuple[str, str]] = set()  # (kind, syscall) already logged in audit mode
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._spawn_requests: list[tuple[threading.Thread, threading.Event]] = []
        self._reader = threading.Thread(target=self._read_reports, name="seccomp-reports", daemon=True)
        self._reader.start()

    def start_thread(self, thread: threading.Thread) -> None:
        """Start `thread` from this process's unconfined reports thread, so that it can load a filter with a
        listener of its own: the kernel refuses a second listener in a thread's filter chain (EBUSY), so a thread
        started by a confined thread could only run under its parent's filter."""
        if threading.current_thread() is self._reader:
            thread.start()
            return
        started = threading.Event()
        with self._lock:
            self._spawn_requests.append((thread, started))
        os.write(self._wake_w, b"s")
        if not started.wait(10.0):
            raise PyrovisorError(f"seccomp: thread {thread.name} was not started within 10 s")

    @property
    def channel_fd(self) -> int:
        return self._channel.fileno()

    def enter(self, kind: str, on_denied: OnDenied | None) -> None:
        """Load the filter of `kind` into the calling thread and hand its listener to the supervisor."""
        from pyrovisor.confine.filters import build_filter, channel_rules, policy
        from pyrovisor.confine.seccomp import load_program

        _preload(policy(kind).preload)
        ident = next(self._ids)
        thread = threading.current_thread()
        with self._lock:
            self._entries[ident] = _Entry(kind, thread.name, on_denied)
        program = self._programs.get(kind)
        if program is None:
            with build_filter(kind, extra=channel_rules(self.channel_fd)) as compiled:
                program = compiled.bpf()
            if not policy(kind).kills_children:  # its rules depend on the children of the moment: not kept
                self._programs[kind] = program
        listener = load_program(program, listener=True)
        assert listener is not None
        try:
            message = json.dumps({"op": "listen", "id": ident, "kind": kind, "thread": thread.name,
                                  "tid": threading.get_native_id()}).encode()
            self._channel.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, listener.to_bytes(4, "little"))])
        finally:
            os.close(listener)
        if os.environ.get(TEST_DENY_VARIABLE) == kind:
            os.getppid()  # the test hook: a call no filter allows

    # --- reports ------------------------------------------------------------------------------------------------
    def _read_reports(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._channel.fileno(), self._wake_r], [], [])
            except (OSError, ValueError):
                return
            if self._wake_r in ready:
                self._start_requested()
            if not self.settle():
                return

    def _start_requested(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        with self._lock:
            requests, self._spawn_requests = self._spawn_requests, []
        for thread, started in requests:
            try:
                thread.start()
            except RuntimeError:
                log.exception("seccomp: cannot start thread %s", thread.name)
            started.set()

    def settle(self) -> bool:
        """Handle every report already sent (the supervisor reports a call before answering it, so any effect of
        a refusal comes after its report is readable here). False once the supervisor has gone."""
        with self._lock:
            while True:
                try:
                    data = self._channel.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return True
                except OSError:
                    return False
                if not data:
                    return False
                self._handle(json.loads(data))

    def _handle(self, report: dict[str, object]) -> None:
        ident = int(str(report.get("id")))
        if report.get("op") == "gone":
            self._entries.pop(ident, None)
            return
        entry = self._entries.get(ident)
        kind = str(report.get("kind"))
        tid = int(str(report.get("tid")))
        thread = _thread_name(tid) or (entry.thread if entry else "?")
        violation = SeccompViolation(str(report.get("syscall")), int(str(report.get("nr"))), kind, thread, tid)
        if report.get("allowed"):
            if (kind, violation.syscall) not in self.reported:
                self.reported.add((kind, violation.syscall))
                log.warning("seccomp audit: the %s thread %s made %s (%d), which its filter does not allow",
                            kind, thread, violation.syscall, violation.number)
            return
        self.violations.append(violation)
        log.info("%s", violation)
        if entry is not None and entry.on_denied is not None:
            try:
                entry.on_denied(violation)
            except Exception:
                log.exception("seccomp: stopping the VM after a refused call failed")

    def close(self) -> None:
        self._channel.close()
        if self._process is not None:
            reap(self._process, 2.0)
        elif self._pid is not None:
            os.waitpid(self._pid, 0)


def _fork_supervisor(ours: socket.socket, theirs: socket.socket, mode: str) -> int:
    """Fork the supervisor from a process with one thread: no interpreter to start and no program to execute
    (inside a jail there may be no dynamic loader to execute one with)."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        from pyrovisor.confine import supervisor

        os.setsid()  # the terminal's Ctrl-C and hang-up are the VMM's; the supervisor ends with the channel
        ours.close()
        keep = theirs.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        code = supervisor.main(["supervisor", str(keep), mode, str(parent)])
    finally:
        os._exit(code)


def _preload(modules: tuple[str, ...]) -> None:
    """Import what a thread's code imports lazily, and have glibc load its name-service modules (dlopen, on the
    first getaddrinfo of a name), before the filter forbids mapping executable pages."""
    global _resolver_loaded
    for entry in modules:
        name, _, only_with = entry.removeprefix("?").partition("@")
        if only_with and only_with not in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            if not entry.startswith("?"):
                raise
    if not _resolver_loaded:
        with contextlib.suppress(OSError):
            socket.getaddrinfo("localhost", 0)
        _resolver_loaded = True


_resolver_loaded = False


def _thread_name(tid: int) -> str | None:
    for thread in threading.enumerate():
        if thread.native_id == tid:
            return thread.name
    return None


_lock = threading.Lock()
_mode: str | None = None  # set by the command line; else read from the environment
_confinement: Confinement | None = None
_by_command_line = False  # configure() was called: this process is a pyrovisor command, not a library user


def configure(mode: str) -> None:
    """The mode of the VM threads this process starts from now on (the command line's --seccomp); starts the
    supervisor now when confined, so that its start overlaps the VM's set-up. Threads already confined stay so;
    a process confines in one of enforce or audit (the supervisor's), and may switch between it and off."""
    global _mode, _by_command_line
    if mode not in MODES:
        raise ConfigError("--seccomp", mode, f"expected one of {', '.join(MODES)}")
    with _lock:
        if _confinement is not None and mode != "off" and _confinement.mode != mode:
            raise PyrovisorError(f"seccomp is already in {_confinement.mode} mode in this process")
        _mode = mode
        _by_command_line = True
    current()


def current() -> Confinement | None:
    """This process's confinement (started on first use), or None when the mode is off."""
    global _confinement
    with _lock:
        mode = _mode if _mode is not None else mode_from_environment()
        if mode == "off":
            return None
        if _confinement is None:
            _confinement = Confinement(mode)
        return _confinement


def enter_thread(kind: str, on_denied: OnDenied | None = None) -> None:
    """Confine the calling thread as a `kind` thread (nothing when the mode is off). Call it first thing in the
    thread's function, once set-up is done; never on a thread that outlives its VM."""
    confinement = current()
    if confinement is not None:
        confinement.enter(kind, on_denied)


def enter_command_thread(kind: str, on_denied: OnDenied | None = None) -> None:
    """Confine the calling thread, which belongs to the command (its main thread, its keyboard), not to a VM: only
    in a process the command line configured (configure()), never in a program that builds VMs as a library."""
    if _by_command_line:
        enter_thread(kind, on_denied)


def start_thread(thread: threading.Thread) -> None:
    """Start `thread` so that it may confine itself as a kind of its own (see Confinement.start_thread)."""
    confinement = current()
    if confinement is None:
        thread.start()
    else:
        confinement.start_thread(thread)


def settle() -> list[SeccompViolation]:
    """Every refused call reported so far (after handling reports still in flight)."""
    confinement = _confinement
    if confinement is None:
        return []
    confinement.settle()
    return list(confinement.violations)
