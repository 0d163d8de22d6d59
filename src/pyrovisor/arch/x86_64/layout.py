"""The guest physical and boot virtual layout pyrovisor gives every x86-64 guest (boot protocol v1)."""

from __future__ import annotations

from dataclasses import dataclass

from pyrovisor.errors import ConfigError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# Boot data, all below 1 MiB (see docs/boot-protocol.md).
BOOT_INFO_GPA = 0x1000
CMDLINE_GPA = 0x2000
CMDLINE_MAX = PAGE_SIZE - 1
GDT_GPA = 0x3000
TSS_ARRAY_GPA = 0x4000
TSS_STRIDE = 128
MAX_VCPUS = PAGE_SIZE // TSS_STRIDE  # one TSS per vCPU in one page: 32
PAGE_TABLES_GPA = 0x10000
PAGE_TABLES_END = 0x80000
BOOT_STACKS_GPA = 0x80000
BOOT_STACK_SIZE = 16 * KiB
BOOT_STACKS_END = BOOT_STACKS_GPA + MAX_VCPUS * BOOT_STACK_SIZE  # 0x100000
KERNEL_MIN_GPA = 0x100000

# RAM is split around the 32-bit MMIO hole, like on a PC.
MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB
VIRTIO_MMIO_BASE = 0xC0000000  # virtio-mmio device n at VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_WINDOW
VIRTIO_MMIO_WINDOW = 0x1000
VIRTIO_FIRST_GSI = 5  # device n interrupts on IOAPIC pin 5 + n (COM1 has 4)
IOAPIC_GPA = 0xFEC00000
LAPIC_GPA = 0xFEE00000

# Virtual aliases of physical memory in the boot page tables.
DIRECT_MAP_BASE = 0xFFFF888000000000  # all RAM, like Linux's page_offset_base without KASLR
KERNEL_MAP_BASE = 0xFFFFFFFF80000000  # first GiB, like Linux's __START_KERNEL_map
KERNEL_MAP_SIZE = 1 * GiB

MIN_MEMORY = 2 * MiB
MAX_MEMORY = 64 * GiB  # bounded by the boot page-table area (2 MiB pages)


@dataclass(frozen=True)
class RamRange:
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_ranges(memory_size: int) -> tuple[RamRange, ...]:
    """Split `memory_size` bytes of RAM around the MMIO hole: below 3 GiB, the rest from 4 GiB."""
    shown = f"{memory_size / MiB:g} MiB"
    if not MIN_MEMORY <= memory_size <= MAX_MEMORY:
        raise ConfigError("memory size", shown, f"must be between {MIN_MEMORY >> 20} MiB and {MAX_MEMORY >> 30} GiB")
    if memory_size % (2 * MiB):
        raise ConfigError("memory size", shown, "must be a multiple of 2 MiB")
    low = min(memory_size, MMIO_HOLE_START)
    ranges = [RamRange(0, low)]
    if memory_size > low:
        ranges.append(RamRange(MMIO_HOLE_END, memory_size - low))
    return tuple(ranges)


def boot_stack_top(vcpu_index: int) -> int:
    return BOOT_STACKS_GPA + (vcpu_index + 1) * BOOT_STACK_SIZE


def tss_gpa(vcpu_index: int) -> int:
    return TSS_ARRAY_GPA + vcpu_index * TSS_STRIDE


def parse_size(text: str) -> int:
    """Parse '64M', '1G', '512K', '1048576' into bytes."""
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    factor = 1
    if cleaned and cleaned[-1] in units:
        factor = units[cleaned[-1]]
        cleaned = cleaned[:-1]
    if not cleaned.isdigit():
        raise ConfigError("size", text, "expected a number with an optional K, M, G or T suffix (e.g. 64M)")
    return int(cleaned) * factor
