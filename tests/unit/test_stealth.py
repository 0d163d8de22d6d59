"""The --stealth profile's pieces: the CPUID table it builds, the firmware strings it writes, CPU pinning."""

from __future__ import annotations

import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from pyrovisor.arch.x86_64.acpi import ACPI_TABLES_GPA, RSDT_OFFSET, acpi_tables
from pyrovisor.arch.x86_64.cpuid import CpuidEntry, for_vcpu
from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.arch.x86_64.multiboot_info import BOOT_DATA_GPA, INFO_OFFSET, boot_data_page
from pyrovisor.arch.x86_64.stealth import (
    BRAND_LEAVES,
    HYPERVISOR_BIT,
    NEUTRAL_STRINGS,
    PYROVISOR_STRINGS,
    FirmwareStrings,
    brand_from_entries,
    brand_registers,
    host_brand_string,
    host_cpu_for,
    is_hypervisor_leaf,
    stealth_cpuid,
)
from pyrovisor.config import MachineConfig
from pyrovisor.devices.virtio.mmio import VENDOR_ID, TransportState
from pyrovisor.persist.codec import decode, encode

HOST_BRAND = b"AMD EPYC 7B13 64-Core Processor"


def _signature(text: bytes) -> tuple[int, int, int]:
    ebx, ecx, edx = struct.unpack("<3I", text.ljust(12, b"\0"))
    return ebx, ecx, edx


def kvm_like_table(brand: bytes = b"Common KVM processor") -> tuple[CpuidEntry, ...]:
    """A table shaped like KVM_GET_SUPPORTED_CPUID's: basic leaves, the hypervisor leaves, extended leaves."""
    kvm_ebx, kvm_ecx, kvm_edx = _signature(b"KVMKVMKVM")
    entries = [
        CpuidEntry(0x0, 0, 0, 0x10, *_signature(b"AuthenticAMD")),
        CpuidEntry(0x1, 0, 0, 0x00B00F21, 0x00020800, 0xF7F83203 | HYPERVISOR_BIT, 0x178BFBFF),
        CpuidEntry(0x7, 0, 1, 0, 0xF1BF03AB, 0x5F46, 0x110),
        CpuidEntry(0x7, 1, 1, 0x30, 0, 0, 0),
        CpuidEntry(0x40000000, 0, 0, 0x40000001, kvm_ebx, kvm_ecx, kvm_edx),
        CpuidEntry(0x40000001, 0, 0, 0x01007EFB, 0, 0, 0),
        CpuidEntry(0x40000100, 0, 0, 0x40000101, kvm_ebx, kvm_ecx, kvm_edx),
        CpuidEntry(0x80000000, 0, 0, 0x80000021, *_signature(b"AuthenticAMD")),
        CpuidEntry(0x80000001, 0, 0, 0x00B00F21, 0, 0x75C237FF, 0x2FD3FBFF),
    ]
    entries += [CpuidEntry(function, 0, 0, *registers) for function, registers in zip(BRAND_LEAVES,
                                                                                       brand_registers(brand), strict=True)]
    entries.append(CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0, 0))
    return tuple(entries)


def _by_key(entries: tuple[CpuidEntry, ...]) -> dict[tuple[int, int], CpuidEntry]:
    return {(entry.function, entry.index): entry for entry in entries}


def test_stealth_table_clears_the_bit_drops_the_leaves_and_spells_the_host_brand() -> None:
    table = for_vcpu(kvm_like_table(), 1)
    hidden = stealth_cpuid(table, HOST_BRAND)
    before, after = _by_key(table), _by_key(hidden)

    assert before[(1, 0)].ecx & HYPERVISOR_BIT
    assert after[(1, 0)].ecx == before[(1, 0)].ecx & ~HYPERVISOR_BIT
    assert not after[(1, 0)].ecx & HYPERVISOR_BIT
    assert replace(after[(1, 0)], ecx=before[(1, 0)].ecx) == before[(1, 0)]  # EAX, EBX (APIC ID 1), EDX kept
    assert [key for key in after if is_hypervisor_leaf(key[0])] == []
    assert brand_from_entries(hidden) == HOST_BRAND
    assert brand_from_entries(table) == b"Common KVM processor"
    unchanged = {key for key in before if not is_hypervisor_leaf(key[0]) and key[0] not in (1, *BRAND_LEAVES)}
    assert unchanged and all(after[key] == before[key] for key in unchanged)
    assert set(after) == set(before) - {key for key in before if is_hypervisor_leaf(key[0])}
    assert [entry.function for entry in hidden] == [entry.function for entry in table
                                                     if not is_hypervisor_leaf(entry.function)]  # order kept


def test_brand_leaves_are_added_when_the_table_lacks_them() -> None:
    table = tuple(entry if entry.function != 0x80000000 else replace(entry, eax=0x80000001)
                  for entry in kvm_like_table() if entry.function not in BRAND_LEAVES and entry.function != 0x80000008)
    hidden = stealth_cpuid(table, HOST_BRAND)
    assert brand_from_entries(hidden) == HOST_BRAND
    assert _by_key(hidden)[(0x80000000, 0)].eax == BRAND_LEAVES[-1]  # the extended maximum now covers them


def test_without_a_known_host_brand_the_brand_leaves_stay_as_kvm_gave_them() -> None:
    table = kvm_like_table()
    hidden = stealth_cpuid(table, None)
    assert brand_from_entries(hidden) == brand_from_entries(table)
    assert not _by_key(hidden)[(1, 0)].ecx & HYPERVISOR_BIT


@pytest.mark.parametrize("brand", [b"", b"x", b"A" * 47, b"B" * 60])
def test_brand_registers_round_trip_47_characters_and_a_nul(brand: bytes) -> None:
    registers = brand_registers(brand)
    raw = b"".join(struct.pack("<4I", *r) for r in registers)
    assert len(raw) == 48 and raw[47] == 0
    assert raw.rstrip(b"\0") == brand[:47]


def test_host_brand_comes_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert host_brand_string(cpuinfo) == HOST_BRAND
    assert host_brand_string(tmp_path / "missing") is None
    cpuinfo.write_text("processor\t: 0\n")
    assert host_brand_string(cpuinfo) is None


def _checksum_ok(data: bytes) -> bool:
    return sum(data) & 0xFF == 0


@pytest.mark.parametrize("strings", [PYROVISOR_STRINGS, NEUTRAL_STRINGS], ids=["default", "stealth"])
def test_acpi_tables_carry_the_chosen_identity_with_valid_checksums(strings: FirmwareStrings) -> None:
    identity = strings.acpi
    image = acpi_tables(4, identity=identity)
    assert image[9:15] == identity.oem_id.ljust(6)
    assert _checksum_ok(image[:20])
    rsdt_length = struct.unpack_from("<I", image, RSDT_OFFSET + 4)[0]
    rsdt = image[RSDT_OFFSET:RSDT_OFFSET + rsdt_length]
    madt_gpa = struct.unpack_from("<I", rsdt, 36)[0]
    madt_offset = madt_gpa - ACPI_TABLES_GPA
    madt = image[madt_offset:madt_offset + struct.unpack_from("<I", image, madt_offset + 4)[0]]
    for table in (rsdt, madt):
        assert _checksum_ok(table)
        assert table[10:16] == identity.oem_id.ljust(6) and table[16:24] == identity.oem_table_id.ljust(8)
        assert table[28:32] == identity.creator_id.ljust(4)
    named = b"pyro" in image.lower() or b"pyrv" in image.lower()
    assert named == (strings is PYROVISOR_STRINGS)


def test_the_multiboot_loader_name_is_the_chosen_one() -> None:
    ram = (RamRange(0, 32 << 20),)
    for strings in (PYROVISOR_STRINGS, NEUTRAL_STRINGS):
        page = boot_data_page(b"\0" * 24, ram, 0x200000, (), loader_name=strings.boot_loader_name)
        name_gpa = struct.unpack_from("<I", page, INFO_OFFSET + 64)[0]
        offset = name_gpa - BOOT_DATA_GPA
        assert page[offset:page.index(b"\0", offset)] == strings.boot_loader_name
        assert (b"pyro" in page.lower()) == (strings is PYROVISOR_STRINGS)


def test_neutral_strings_name_no_hypervisor() -> None:
    words = (b"pyro", b"pyrv", b"qemu", b"kvm", b"vmware", b"vbox", b"bochs", b"xen", b"virtual")
    vendor = struct.pack("<I", NEUTRAL_STRINGS.virtio_vendor_id)
    texts = (NEUTRAL_STRINGS.acpi.oem_id, NEUTRAL_STRINGS.acpi.oem_table_id, NEUTRAL_STRINGS.acpi.creator_id,
             NEUTRAL_STRINGS.boot_loader_name, vendor)
    assert not any(word in text.lower() for word in words for text in texts)
    assert struct.pack("<I", PYROVISOR_STRINGS.virtio_vendor_id).lower() in (b"pyrv", b"vryp")
    assert PYROVISOR_STRINGS.virtio_vendor_id == VENDOR_ID


def test_virtio_vendor_id_and_stealth_survive_the_state_codec() -> None:
    transport = TransportState(vendor_id=NEUTRAL_STRINGS.virtio_vendor_id)
    assert decode(TransportState, encode(transport)) == transport
    assert decode(TransportState, {k: v for k, v in encode(TransportState()).items() if k != "vendor_id"}).vendor_id \
        == VENDOR_ID  # states saved before the field existed read as pyrovisor's id
    config = MachineConfig(kernel=Path("os.elf"), stealth=True)
    assert decode(MachineConfig, encode(config)).stealth is True


def test_vcpus_are_pinned_round_robin_over_the_allowed_cpus() -> None:
    assert [host_cpu_for(index, {2, 5}) for index in range(5)] == [2, 5, 2, 5, 2]
    assert host_cpu_for(0) in os.sched_getaffinity(0)
