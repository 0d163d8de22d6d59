"""The ACPI tables a Multiboot kernel looks for: RSDP in the BIOS area, an RSDT, and a MADT with every vCPU."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyrovisor.arch.x86_64.layout import IOAPIC_GPA, LAPIC_GPA

ACPI_TABLES_GPA = 0xE0000  # the RSDP is searched for on 16-byte boundaries in 0xE0000-0xFFFFF
OEM_ID = b"PYROVI"
OEM_TABLE_ID = b"PYROVISR"
CREATOR_ID = b"PYRV"
HEADER_SIZE = 36
RSDP_SIZE = 20  # ACPI 1.0 (revision 0): an RSDT with 32-bit pointers
RSDT_OFFSET = 0x20
MADT_OFFSET = 0x60  # after the RSDT (36 + 4 bytes per table)
MADT_PCAT_COMPAT = 1 << 0  # the PICs are there too (KVM emulates them)
LAPIC_ENABLED = 1 << 0
IOAPIC_ID = 0


@dataclass(frozen=True)
class AcpiIdentity:
    """Who the tables say made them (OEM ID 6 bytes, OEM table ID 8, creator ID 4; padded with spaces)."""

    oem_id: bytes = OEM_ID
    oem_table_id: bytes = OEM_TABLE_ID
    creator_id: bytes = CREATOR_ID


PYROVISOR_IDENTITY = AcpiIdentity()


def checksum(data: bytes) -> int:
    """The byte that makes `data` plus itself sum to zero modulo 256."""
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, body: bytes, identity: AcpiIdentity = PYROVISOR_IDENTITY) -> bytes:
    header = struct.pack("<4sIBB6s8sI4sI", signature, HEADER_SIZE + len(body), revision, 0,
                         identity.oem_id.ljust(6), identity.oem_table_id.ljust(8), 1, identity.creator_id.ljust(4), 1)
    table = bytearray(header + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def madt(vcpus: int, identity: AcpiIdentity = PYROVISOR_IDENTITY) -> bytes:
    """One enabled processor-local-APIC entry per vCPU (APIC ID = vCPU index) and the IOAPIC at GSI 0."""
    body = struct.pack("<II", LAPIC_GPA, MADT_PCAT_COMPAT)
    for index in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, index, index, LAPIC_ENABLED)
    body += struct.pack("<BBBBII", 1, 12, IOAPIC_ID, 0, IOAPIC_GPA, 0)
    return _table(b"APIC", 3, body, identity)


def rsdp(rsdt_gpa: int, identity: AcpiIdentity = PYROVISOR_IDENTITY) -> bytes:
    image = bytearray(struct.pack("<8sB6sBI", b"RSD PTR ", 0, identity.oem_id.ljust(6), 0, rsdt_gpa))
    image[8] = checksum(bytes(image))
    return bytes(image)


def acpi_tables(vcpus: int, base: int = ACPI_TABLES_GPA, identity: AcpiIdentity = PYROVISOR_IDENTITY) -> bytes:
    """RSDP, RSDT and MADT as one image to write at `base` (16-byte aligned)."""
    table = madt(vcpus, identity)
    rsdt = _table(b"RSDT", 1, struct.pack("<I", base + MADT_OFFSET), identity)
    image = bytearray(MADT_OFFSET + len(table))
    image[0:RSDP_SIZE] = rsdp(base + RSDT_OFFSET, identity)
    image[RSDT_OFFSET:RSDT_OFFSET + len(rsdt)] = rsdt
    image[MADT_OFFSET:] = table
    return bytes(image)
