"""A deadline for calls that must not block: SIGALRM interrupts the main thread even inside open() of a FIFO."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class Hung(AssertionError):
    """A call that should have returned at once was still blocked when the deadline passed."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Hung in the calling (main) thread after `seconds`."""
    def expire(_signal: int, _frame: FrameType | None) -> None:
        raise Hung(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
