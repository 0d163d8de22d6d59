"""Run a VMM (pyrovisor or QEMU) and see its console line by line while it runs, for tests that act on the guest."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Sequence


def run_watching(command: Sequence[str], on_line: Callable[[str], None], timeout: float) -> tuple[int, str]:
    """Run `command`, calling on_line for each line of its output as it comes; (exit status, the whole output)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               text=True)
    output: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            on_line(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(10)
    return code, "".join(output)
