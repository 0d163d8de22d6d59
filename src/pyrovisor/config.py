"""MachineConfig: what a VM is made of, validated before anything touches KVM."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.arch.x86_64.layout import CMDLINE_MAX, MAX_VCPUS, MiB, ram_ranges
from pyrovisor.errors import ConfigError

DEFAULT_MEMORY = 64 * MiB
MIN_DIRTY_RING_ENTRIES = 256  # KVM needs at least one page of 16-byte entries


@dataclass(frozen=True)
class MachineConfig:
    kernel: Path
    memory_size: int = DEFAULT_MEMORY
    vcpus: int = 1
    cmdline: str = ""
    initrd: Path | None = None
    huge_pages: bool = True
    shared_memory: bool = False  # memfd backing (needed to share guest RAM with another process)
    dirty_ring_entries: int = 0  # per-vCPU dirty ring for dirty tracking; 0: KVM's dirty bitmap

    def validate(self) -> None:
        ram_ranges(self.memory_size)
        available = host_memory_limit()
        if available is not None and self.memory_size > available:
            raise ConfigError("memory size", f"{self.memory_size >> 20} MiB",
                              f"larger than this host's RAM and swap ({available >> 20} MiB)")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise ConfigError("vcpus", self.vcpus, f"must be between 1 and {MAX_VCPUS}")
        if len(self.cmdline.encode()) > CMDLINE_MAX:
            raise ConfigError("command line", self.cmdline[:40] + "...", f"longer than {CMDLINE_MAX} bytes")
        if "\0" in self.cmdline:
            raise ConfigError("command line", self.cmdline, "contains a NUL character")
        entries = self.dirty_ring_entries
        if entries and (entries < MIN_DIRTY_RING_ENTRIES or entries & (entries - 1)):
            raise ConfigError("dirty ring entries", entries,
                              f"must be 0 (bitmap) or a power of two of at least {MIN_DIRTY_RING_ENTRIES}")


def host_memory_limit() -> int | None:
    """RAM plus swap of this host in bytes (from /proc/meminfo), or None where unknown."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    if "MemTotal" not in values:
        return None
    return values["MemTotal"] + values.get("SwapTotal", 0)


def cpu_count() -> int:
    return os.cpu_count() or 1
