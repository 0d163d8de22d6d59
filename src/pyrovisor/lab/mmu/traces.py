"""Address traces: synthetic patterns, and traces loaded from a file.

Synthetic patterns (all addresses 8-byte aligned, inside `footprint` bytes from `base`):

- sequential: a stream with a fixed stride (default 64 bytes, one cache line), wrapping around.
- random: uniformly random addresses.
- pointer-chase: a linked list of `nodes` 64-byte nodes at random places, followed node by node and
  round again; the order of the nodes is unrelated to their addresses.
- hot-cold: with probability `hot_fraction` an access goes to a hot region (the first `hot_bytes`),
  otherwise anywhere in the footprint.

Trace files: `.npy` holds a numpy integer array; `.bin` holds little-endian unsigned 64-bit addresses;
anything else is text with one address per line in Python's integer syntax (`0x7f3a12c0` or decimal),
where `#` starts a comment and blank lines are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyrovisor.errors import ConfigError

PATTERNS = ("sequential", "random", "pointer-chase", "hot-cold")
LINE = 64
WORD = 8


@dataclass(frozen=True)
class TraceSpec:
    pattern: str
    accesses: int = 200_000
    footprint: int = 1 << 30
    base: int = 0x7F00_0000_0000
    stride: int = LINE
    nodes: int = 1 << 16
    hot_fraction: float = 0.9
    hot_bytes: int = 4 << 20
    seed: int = 1

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise ConfigError("--pattern", self.pattern, f"choose one of {', '.join(PATTERNS)}")
        if self.accesses < 1 or self.footprint < LINE or self.stride < 1:
            raise ConfigError("trace", self, "accesses, footprint and stride must be positive")
        if not 0.0 <= self.hot_fraction <= 1.0 or not 0 < self.hot_bytes <= self.footprint:
            raise ConfigError("--hot-fraction/--hot-mib", (self.hot_fraction, self.hot_bytes),
                              "the hot fraction is in [0, 1] and the hot region lies inside the footprint")

    def describe(self) -> str:
        size = _size(self.footprint)
        if self.pattern == "sequential":
            return f"sequential, stride {self.stride} B over {size}"
        if self.pattern == "random":
            return f"random over {size}"
        if self.pattern == "pointer-chase":
            return f"pointer chase, {min(self.nodes, self.footprint // LINE):,} nodes over {size}"
        return f"hot-cold, {self.hot_fraction:.0%} in {_size(self.hot_bytes)} of {size}"


def synthetic(spec: TraceSpec) -> np.ndarray:
    """The trace a spec describes, as int64 virtual addresses."""
    rng = np.random.default_rng(spec.seed)
    n = spec.accesses
    if spec.pattern == "sequential":
        offsets = (np.arange(n, dtype=np.int64) * spec.stride) % spec.footprint
        offsets -= offsets % WORD
    elif spec.pattern == "random":
        offsets = rng.integers(0, spec.footprint // WORD, n, dtype=np.int64) * WORD
    elif spec.pattern == "pointer-chase":
        slots = spec.footprint // LINE
        nodes = rng.choice(slots, size=min(spec.nodes, slots), replace=False).astype(np.int64) * LINE
        offsets = nodes[np.arange(n, dtype=np.int64) % len(nodes)]
    else:
        hot = rng.random(n) < spec.hot_fraction
        offsets = np.where(hot, rng.integers(0, spec.hot_bytes // WORD, n, dtype=np.int64),
                           rng.integers(0, spec.footprint // WORD, n, dtype=np.int64)) * WORD
    trace: np.ndarray = spec.base + offsets
    return trace


def footprint_pages(spec: TraceSpec, page_size: int) -> np.ndarray:
    """The virtual address of every page of `page_size` bytes that the spec's footprint overlaps: what a
    program that allocated the footprint has mapped, whichever of its pages a trace happens to touch."""
    first = spec.base // page_size
    last = (spec.base + spec.footprint - 1) // page_size
    pages: np.ndarray = np.arange(first, last + 1, dtype=np.int64) * page_size
    return pages


def load_trace(path: Path) -> np.ndarray:
    """Virtual addresses from a trace file (see the module docstring for the formats)."""
    if not path.is_file():
        raise ConfigError("--trace", str(path), "no such file")
    trace: np.ndarray
    if path.suffix == ".npy":
        values = np.load(path)
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise ConfigError("--trace", str(path), "a .npy trace is a one-dimensional integer array")
        trace = values.astype(np.uint64).astype(np.int64)
    elif path.suffix == ".bin":
        data = path.read_bytes()
        if len(data) % 8:
            raise ConfigError("--trace", str(path), "a .bin trace is a whole number of 8-byte addresses")
        trace = np.frombuffer(data, dtype="<u8").astype(np.int64)
    else:
        trace = _parse_text(path)
    if len(trace) == 0:
        raise ConfigError("--trace", str(path), "the trace holds no addresses")
    return trace


def _parse_text(path: Path) -> np.ndarray:
    addresses = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = int(text, 0)
        except ValueError as exc:
            raise ConfigError("--trace", f"{path}:{number}", f"not an address: {text!r}") from exc
        if not 0 <= value < 1 << 64:
            raise ConfigError("--trace", f"{path}:{number}", "addresses are unsigned 64-bit numbers")
        addresses.append(value & ((1 << 63) - 1))
    return np.asarray(addresses, dtype=np.int64)


def _size(size: int) -> str:
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"
