"""Where a Multiboot machine's boot data lives, and the information structure the kernel finds through EBX."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyrovisor.arch.x86_64.layout import KiB, MiB, RamRange

BOOTLOADER_MAGIC = 0x2BADB002  # in EAX at entry
BOOT_LOADER_NAME = b"pyrovisor"

# One page of boot data (GDT, information structure, memory map, loader name, module list), below the BIOS area.
BOOT_DATA_GPA = 0x9000
BOOT_DATA_SIZE = 4 * KiB
GDT_OFFSET = 0x000
INFO_OFFSET = 0x100
MMAP_OFFSET = 0x200
NAME_OFFSET = 0x300
MODULES_OFFSET = 0x400
MODULE_ENTRY_SIZE = 16
MAX_MODULES = (BOOT_DATA_SIZE - MODULES_OFFSET) // MODULE_ENTRY_SIZE
ENTRY_STACK_TOP = BOOT_DATA_GPA  # ESP at entry (the kernel sets up its own; this one grows below the page)

# The PC's reserved low memory: extended BIOS data area, VGA window, option and BIOS ROMs (ACPI tables there).
LOW_MEMORY_END = 0x9FC00  # 639 KiB of conventional memory, as QEMU reports
BIOS_AREA_START = 0xE0000
HIGH_MEMORY_START = 1 * MiB

INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODULES = 1 << 3
INFO_MEMORY_MAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9
INFO_SIZE = 116  # up to and including the framebuffer fields of the 0.6.96 specification

MEMORY_AVAILABLE = 1
MEMORY_RESERVED = 2
MMAP_ENTRY_SIZE = 20  # without the size field that precedes each entry


@dataclass(frozen=True)
class BootModule:
    start: int
    end: int  # one past the last byte
    string_gpa: int  # its NUL-terminated string (path and arguments)


@dataclass(frozen=True)
class MemoryMapEntry:
    base: int
    length: int
    type: int


def memory_map(ram: tuple[RamRange, ...]) -> tuple[MemoryMapEntry, ...]:
    """RAM as a PC BIOS reports it: conventional memory, the reserved EBDA and BIOS area, memory from 1 MiB
    to the 32-bit hole, and RAM above 4 GiB."""
    low = ram[0]
    entries = [MemoryMapEntry(0, LOW_MEMORY_END, MEMORY_AVAILABLE),
               MemoryMapEntry(LOW_MEMORY_END, 1 * KiB, MEMORY_RESERVED),
               MemoryMapEntry(BIOS_AREA_START, HIGH_MEMORY_START - BIOS_AREA_START, MEMORY_RESERVED)]
    if low.end > HIGH_MEMORY_START:
        entries.append(MemoryMapEntry(HIGH_MEMORY_START, low.end - HIGH_MEMORY_START, MEMORY_AVAILABLE))
    entries.extend(MemoryMapEntry(extra.gpa, extra.size, MEMORY_AVAILABLE) for extra in ram[1:])
    return tuple(entries)


def boot_data_page(gdt: bytes, ram: tuple[RamRange, ...], cmdline_gpa: int, modules: tuple[BootModule, ...],
                   base: int = BOOT_DATA_GPA, loader_name: bytes = BOOT_LOADER_NAME) -> bytes:
    """The boot-data page image for `base`: the GDT, the information structure (at base + INFO_OFFSET) and
    everything it points to inside the page. The command line and module strings live elsewhere."""
    if len(modules) > MAX_MODULES:
        raise ValueError(f"at most {MAX_MODULES} modules")
    page = bytearray(BOOT_DATA_SIZE)
    page[GDT_OFFSET:GDT_OFFSET + len(gdt)] = gdt
    entries = memory_map(ram)
    for index, entry in enumerate(entries):
        struct.pack_into("<IQQI", page, MMAP_OFFSET + index * (4 + MMAP_ENTRY_SIZE), MMAP_ENTRY_SIZE, entry.base,
                         entry.length, entry.type)
    page[NAME_OFFSET:NAME_OFFSET + len(loader_name) + 1] = loader_name + b"\0"
    for index, module in enumerate(modules):
        struct.pack_into("<IIII", page, MODULES_OFFSET + index * MODULE_ENTRY_SIZE, module.start, module.end,
                         module.string_gpa, 0)
    upper_end = ram[0].end  # mem_upper: KiB of contiguous memory from 1 MiB
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODULES | INFO_MEMORY_MAP | INFO_BOOT_LOADER_NAME
    struct.pack_into("<IIII", page, INFO_OFFSET, flags, LOW_MEMORY_END // KiB, (upper_end - HIGH_MEMORY_START) // KiB,
                     0)
    struct.pack_into("<III", page, INFO_OFFSET + 16, cmdline_gpa, len(modules), base + MODULES_OFFSET)
    struct.pack_into("<II", page, INFO_OFFSET + 44, len(entries) * (4 + MMAP_ENTRY_SIZE), base + MMAP_OFFSET)
    struct.pack_into("<I", page, INFO_OFFSET + 64, base + NAME_OFFSET)
    return bytes(page)
