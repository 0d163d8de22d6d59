"""EventFd: a Linux eventfd owned by one object; KVM signals it (ioeventfd) or waits on it (irqfd)."""

from __future__ import annotations

import contextlib
import os
import weakref


class EventFd:
    """A non-blocking eventfd. `signal()` adds one; `drain()` reads and resets the count (0 if none)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._close = weakref.finalize(self, os.close, self.fd)  # released even if never closed explicitly

    def signal(self) -> None:
        with contextlib.suppress(BlockingIOError):  # the counter is at its maximum: plenty to wake for
            os.eventfd_write(self.fd, 1)

    def drain(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return not self._close.alive

    def close(self) -> None:
        self._close()
