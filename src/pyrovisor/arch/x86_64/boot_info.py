"""The boot-info block pyrovisor hands a guest in RDI (mirrors guests/lib/include/pyrovisor/boot_info.h)."""

from __future__ import annotations

import ctypes

BOOT_INFO_MAGIC = 0x56525950  # "PYRV" in memory
BOOT_INFO_VERSION = 2  # 2: the virtio-mmio device table
MAX_RAM_RANGES = 8
MAX_VIRTIO = 16


class RamRangeEntry(ctypes.Structure):
    _fields_ = (("gpa", ctypes.c_uint64), ("size", ctypes.c_uint64))


class VirtioMmioEntry(ctypes.Structure):
    """A virtio-mmio device at [base, base + size), its interrupt on IOAPIC pin `irq`."""

    _fields_ = (("base", ctypes.c_uint64), ("size", ctypes.c_uint32), ("irq", ctypes.c_uint32))


class BootInfo(ctypes.Structure):
    """Layout checked against the C header by tests/unit/test_boot_info_layout.py."""

    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("nr_vcpus", ctypes.c_uint32),
        ("cmdline_gpa", ctypes.c_uint64),
        ("cmdline_len", ctypes.c_uint32),
        ("nr_ram_ranges", ctypes.c_uint32),
        ("initrd_gpa", ctypes.c_uint64),
        ("initrd_size", ctypes.c_uint64),
        ("kernel_start", ctypes.c_uint64),
        ("kernel_end", ctypes.c_uint64),
        ("page_tables_gpa", ctypes.c_uint64),
        ("page_tables_size", ctypes.c_uint64),
        ("gdt_gpa", ctypes.c_uint64),
        ("tss_gpa", ctypes.c_uint64),
        ("tss_stride", ctypes.c_uint32),
        ("gdt_limit", ctypes.c_uint32),
        ("tsc_khz", ctypes.c_uint64),
        ("direct_map_base", ctypes.c_uint64),
        ("kernel_map_base", ctypes.c_uint64),
        ("console_port", ctypes.c_uint16),
        ("debug_exit_port", ctypes.c_uint16),
        ("console_irq", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 3),
        ("ram", RamRangeEntry * MAX_RAM_RANGES),
        ("nr_virtio", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint32),
        ("virtio", VirtioMmioEntry * MAX_VIRTIO),
    )
