"""Guest physical layout helpers: RAM ranges around the MMIO hole and size parsing."""

from __future__ import annotations

import itertools

import pytest

from pyrovisor.arch.x86_64 import layout
from pyrovisor.errors import ConfigError


@pytest.mark.parametrize("text, size", [("64M", 64 << 20), ("1G", 1 << 30), ("512k", 512 << 10),
                                        ("2MiB", 2 << 20), ("4096", 4096), ("1gb", 1 << 30)])
def test_parse_size(text: str, size: int) -> None:
    assert layout.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "12X", "-1M", "1.5G", "lots"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError, match="expected a number"):
        layout.parse_size(text)


def test_ram_below_the_hole_is_one_range() -> None:
    assert layout.ram_ranges(64 << 20) == (layout.RamRange(0, 64 << 20),)


def test_ram_above_three_gib_continues_at_four() -> None:
    low, high = layout.ram_ranges(4 << 30)
    assert (low.gpa, low.size, high.gpa, high.size) == (0, 3 << 30, 4 << 30, 1 << 30)


@pytest.mark.parametrize("size", [0, 1 << 20, (64 << 20) + 4096, 128 << 30])
def test_ram_sizes_out_of_range_are_refused(size: int) -> None:
    with pytest.raises(ConfigError):
        layout.ram_ranges(size)


def test_boot_areas_do_not_overlap() -> None:
    areas = sorted([
        (layout.BOOT_INFO_GPA, layout.PAGE_SIZE), (layout.CMDLINE_GPA, layout.PAGE_SIZE),
        (layout.GDT_GPA, layout.PAGE_SIZE), (layout.TSS_ARRAY_GPA, layout.MAX_VCPUS * layout.TSS_STRIDE),
        (layout.PAGE_TABLES_GPA, layout.PAGE_TABLES_END - layout.PAGE_TABLES_GPA),
        (layout.BOOT_STACKS_GPA, layout.BOOT_STACKS_END - layout.BOOT_STACKS_GPA),
    ])
    for (start, size), (next_start, _) in itertools.pairwise(areas):
        assert start + size <= next_start
    assert areas[-1][0] + areas[-1][1] <= layout.KERNEL_MIN_GPA


def test_missing_kvm_device_says_how_to_fix_it() -> None:
    from pyrovisor.errors import KvmUnavailableError
    from pyrovisor.kvm import Kvm

    with pytest.raises(KvmUnavailableError, match=r"no such device.*modprobe"):
        Kvm("/nonexistent/kvm")
