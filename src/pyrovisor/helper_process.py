"""Helper processes of the VMM (fault servers, the seccomp supervisor): a Python module started with fds, and reaped."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence


def start_helper(module: str, args: Sequence[str], pass_fds: Sequence[int]) -> subprocess.Popen[bytes]:
    """`python -m module args` with `pass_fds` inherited, in a session of its own (a terminal's Ctrl-C is the
    VMM's to handle: a helper ends when the VMM closes its end of their channel)."""
    return subprocess.Popen([sys.executable, "-m", module, *args], pass_fds=tuple(pass_fds),
                            stdin=subprocess.DEVNULL, start_new_session=True)


def reap(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a helper told to end (its channel closed); kill it if it has not ended within `timeout` seconds."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
