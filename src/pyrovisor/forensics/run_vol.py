"""Runs volatility3's `vol` on a saved guest, with pyrovisor's plugin and a symbol table written for its kernel."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.errors import MissingExtraError, StateError
from pyrovisor.introspect.isf import build_isf
from pyrovisor.introspect.profile import Profile

PLUGIN_DIR = Path(__file__).resolve().parent / "volatility"
SYMBOLS_NAME = "pyrovisor/os"  # the plugin's default: <symbol dir>/pyrovisor/os.json
DEFAULT_PLUGIN = "pyrovisor.pslist"
# The stackers volatility would run find nothing in this guest (it is not Windows, Linux or macOS) and the
# Windows one scans the whole image for page tables (seconds): naming none that exists keeps the file as the
# physical layer, on which the plugin builds its own 4-level paging layer.
PHYSICAL_LAYER_ONLY = ("--stackers", "none")
VOL_ENTRY = "import sys; sys.argv[0] = 'vol'; from volatility3.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class SavedGuest:
    """What vol needs from a snapshot directory: its raw memory file and the kernel the guest booted."""

    memory_file: Path
    kernel: Path


def saved_guest(directory: Path) -> SavedGuest:
    """The snapshot's memory file, once it is known to be raw guest-physical memory (a full snapshot)."""
    from pyrovisor.snapshot.chain import load_chain

    links = load_chain(directory)
    if len(links) != 1:
        raise StateError(str(directory), "is a diff snapshot; vol reads one full memory.img (take a full snapshot)")
    link = links[0]
    for memory_range in link.state.memory.ranges:
        if memory_range.file_offset != memory_range.gpa:
            raise StateError(str(directory), f"guest RAM at {memory_range.gpa:#x} lies at file offset "
                             f"{memory_range.file_offset:#x}: memory.img is not raw physical memory there")
    return SavedGuest(link.directory / link.state.memory.file, Path(link.state.machine.config.kernel))


def kernel_profile(kernel: Path) -> Profile | None:
    """The profile the build wrote next to a kernel (`os.elf` -> `os.profile.json`), if there is one."""
    path = kernel.with_name(f"{kernel.stem}.profile.json")
    return Profile.load(path) if path.is_file() else None


def write_symbols(kernel: Path, directory: Path) -> Path:
    """The kernel's ISF at `directory`/pyrovisor/os.json, where `-s directory` lets the plugin find it."""
    path = directory / f"{SYMBOLS_NAME}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_isf(kernel, kernel_profile(kernel))))
    return path


def require_volatility(command: str) -> None:
    if importlib.util.find_spec("volatility3") is None:
        raise MissingExtraError(command, "forensics", ("volatility3",))


def vol_command(memory_file: Path, symbols_dir: Path, vol_args: Sequence[str]) -> list[str]:
    """The `vol` command line (run by this interpreter) for a memory file, this plugin and these symbols."""
    return [sys.executable, "-c", VOL_ENTRY, "-q", "-p", str(PLUGIN_DIR), "-s", str(symbols_dir),
            *PHYSICAL_LAYER_ONLY, "-f", str(memory_file), *(vol_args or [DEFAULT_PLUGIN])]
