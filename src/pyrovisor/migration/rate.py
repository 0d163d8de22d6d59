"""A token bucket that holds a sender to a byte rate (an artificially slow link for experiments)."""

from __future__ import annotations

import time


class RateLimiter:
    """`wait(n)` blocks until `n` more bytes fit within `bytes_per_second` (None: unlimited)."""

    def __init__(self, bytes_per_second: float | None, burst_seconds: float = 0.05) -> None:
        self.rate = bytes_per_second
        self._capacity = (bytes_per_second or 0) * burst_seconds
        self._tokens = self._capacity
        self._last = time.monotonic()

    def wait(self, count: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= count
        if self._tokens < 0:
            time.sleep(-self._tokens / self.rate)
            self._last = time.monotonic()
            self._tokens = 0
