"""A guest console captured in memory, for programs that drive VMs from Python: the text, and a wait for a line."""

from __future__ import annotations

import re
import threading
import time


class Console:
    """Pass `console.write` as a VM's console output (build_vm, restore_vm)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = threading.Condition()

    def write(self, chunk: bytes) -> None:
        with self.changed:
            self.data.extend(chunk)
            self.changed.notify_all()

    def text(self) -> str:
        with self.changed:
            return self.data.decode(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first match of `pattern` (multi-line) once printed; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not (found := re.search(pattern, self.data.decode(errors="replace"), re.MULTILINE)):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {pattern!r} in:\n{self.data.decode(errors='replace')}"
                self.changed.wait(remaining)
            return found
