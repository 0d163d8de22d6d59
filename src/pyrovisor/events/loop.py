"""EventLoop: the VM's I/O thread. It waits on file descriptors (doorbells, backends) with epoll and runs
each one's handler, so device work never runs on a vCPU thread."""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyrovisor.confine.policy import enter_thread
from pyrovisor.errors import PyrovisorError, SeccompViolation
from pyrovisor.events.eventfd import EventFd

log = logging.getLogger(__name__)

Handler = Callable[[], None]
CHANGE_TIMEOUT_S = 10.0
ErrorHandler = Callable[[str, BaseException], None]


class _Pollable(Protocol):
    """Anything with a file descriptor: an EventFd, a socket, a file."""

    def fileno(self) -> int: ...


@dataclass
class _Source:
    name: str
    fd: int
    handler: Handler
    on_error: ErrorHandler | None


@dataclass
class LoopStats:
    wakeups: int = 0
    dispatches: int = 0
    handler_errors: int = 0
    per_source: dict[str, int] = field(default_factory=dict)


class EventLoop:
    """Runs handlers for readable file descriptors on one thread (Firecracker's event-manager shape).

    Sources may be added and removed from any thread; the change reaches the loop through its wake-up
    eventfd. A handler that raises is counted and reported to its source's `on_error` (a device then
    marks itself broken); the loop itself never stops because of a handler. `paused()` holds the loop
    between dispatches, so that device state and guest memory do not change while a VM is saved.
    """

    def __init__(self, name: str = "io") -> None:
        self.name = name
        self.stats = LoopStats()
        self._epoll = select.epoll(8, select.EPOLL_CLOEXEC)
        self._wake = EventFd()
        self._epoll.register(self._wake.fd, select.EPOLLIN)
        self._lock = threading.Lock()
        self._changes: list[tuple[tuple[str, _Source | int | Handler], threading.Event]] = []
        self._sources: dict[int, _Source] = {}
        self._cond = threading.Condition()
        self._pause_requests = 0
        self._parked = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self.on_denied: Callable[[SeccompViolation], None] | None = None  # this thread made a refused call

    def _denied(self, violation: SeccompViolation) -> None:
        if self.on_denied is not None:
            self.on_denied(violation)

    # --- sources --------------------------------------------------------------------------------------
    def add(self, source: int | _Pollable, handler: Handler, name: str, on_error: ErrorHandler | None = None) -> None:
        """Call `handler` on the loop thread whenever `source` is readable (level-triggered: drain it)."""
        fd = source if isinstance(source, int) else source.fileno()
        self._change(("add", _Source(name, fd, handler, on_error)))

    def remove(self, source: int | _Pollable) -> None:
        """Stop watching `source`. Returns once the loop no longer uses it, so the caller may close it."""
        fd = source if isinstance(source, int) else source.fileno()
        self._change(("remove", fd), wait=True)

    def call_soon(self, function: Handler) -> None:
        """Run `function` once on the loop thread (or at once, if the loop is not running)."""
        self._change(("call", function))

    def _change(self, change: tuple[str, _Source | int | Handler], wait: bool = False) -> None:
        done = threading.Event()
        with self._lock:
            self._changes.append((change, done))
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            self._apply_changes(calls=thread is None or not thread.is_alive())
            return
        with self._cond:
            self._cond.notify_all()  # a parked loop applies added and removed sources too
        self._wake.signal()
        if wait and not done.wait(CHANGE_TIMEOUT_S):
            raise PyrovisorError(f"event loop {self.name}: a source change was not applied within "
                                 f"{CHANGE_TIMEOUT_S} s")

    def _apply_changes(self, calls: bool = True) -> None:
        """Apply queued source changes in order; with `calls`, also run queued functions (not while parked)."""
        with self._lock:
            pending, self._changes = self._changes, []
            if not calls:
                self._changes = [item for item in pending if item[0][0] == "call"]
                pending = [item for item in pending if item[0][0] != "call"]
        for (kind, value), done in pending:
            try:
                if kind == "add":
                    assert isinstance(value, _Source)
                    self._epoll.register(value.fd, select.EPOLLIN)
                    self._sources[value.fd] = value
                elif kind == "remove":
                    assert isinstance(value, int)
                    if self._sources.pop(value, None) is not None:
                        self._epoll.unregister(value)
                else:
                    assert callable(value)
                    self._run(_Source("call", -1, value, None))
            except (OSError, KeyError, ValueError) as exc:  # e.g. an fd closed before it was added
                log.error("%s: cannot %s a source: %r", self.name, kind, exc)
            finally:
                done.set()

    # --- the thread ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise PyrovisorError(f"event loop {self.name} already started")
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        enter_thread("io", self._denied)
        while True:
            self._wait_while_paused()
            if self._stop:
                return
            events = self._epoll.poll(-1, len(self._sources) + 1)  # +1: the wake fd (not a source)
            self.stats.wakeups += 1
            sources, wake = self._sources, self._wake.fd
            for fd, _ in events:
                if fd == wake:
                    self._wake.drain()
                    continue
                if self._pause_requests or self._stop:
                    break  # the rest stays readable: handled after the pause
                source = sources.get(fd)
                if source is not None:  # removed by an earlier handler of this round: skipped
                    self._run(source)
            self._apply_changes()

    def _run(self, source: _Source) -> None:
        self.stats.dispatches += 1
        self.stats.per_source[source.name] = self.stats.per_source.get(source.name, 0) + 1
        try:
            source.handler()
        except Exception as exc:  # a device bug or a hostile guest: the loop goes on
            self.stats.handler_errors += 1
            log.error("%s: handler %s failed: %r", self.name, source.name, exc)
            if source.on_error is not None:
                try:
                    source.on_error(source.name, exc)
                except Exception:
                    log.exception("%s: error handler of %s failed", self.name, source.name)

    def _wait_while_paused(self) -> None:
        with self._cond:
            if not self._pause_requests:
                return
            self._parked = True
            self._cond.notify_all()
            while self._pause_requests and not self._stop:
                self._cond.wait()
                self._apply_changes(calls=False)
            self._parked = False

    # --- pausing ------------------------------------------------------------------------------------------
    def pause(self, timeout: float) -> None:
        """Hold the loop between dispatches (nested: each pause needs a resume). Raises PyrovisorError and
        withdraws the request if the current handler does not finish within `timeout`."""
        if threading.current_thread() is self._thread:
            raise PyrovisorError(f"event loop {self.name}: a handler cannot pause its own loop")
        with self._cond:
            self._pause_requests += 1
        if self._thread is None or not self._thread.is_alive():
            return
        self._wake.signal()
        with self._cond:
            if not self._cond.wait_for(lambda: self._parked or self._stop, timeout):
                self._pause_requests -= 1
                self._cond.notify_all()
                raise PyrovisorError(f"event loop {self.name}: a device handler did not finish within {timeout} s")

    def resume(self) -> None:
        with self._cond:
            if self._pause_requests:
                self._pause_requests -= 1
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (after its current handler) and release the selector and the wake-up fd."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._wake.signal()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise PyrovisorError(f"event loop {self.name} did not stop within {timeout} s")
        self._epoll.close()
        self._wake.close()
