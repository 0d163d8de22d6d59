"""Rich consoles for command output: the terminal's width, or a wide page when output is piped."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

PIPED_WIDTH = 160  # rich would wrap tables at 80 columns when stdout is not a terminal


def console(stderr: bool = False) -> Console:
    from rich.console import Console  # here, not at the top: commands that print no table never load rich

    stream = sys.stderr if stderr else sys.stdout
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, width=None if interactive else PIPED_WIDTH)
