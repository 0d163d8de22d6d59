"""Segment descriptors, the boot GDT and 64-bit TSS images, as plain data."""

from __future__ import annotations

import struct
from dataclasses import dataclass

KERNEL_CS = 0x08
KERNEL_DS = 0x10
USER_DS = 0x18 | 3
USER_CS = 0x20 | 3
FIRST_TSS_SELECTOR = 0x28
TSS_SIZE = 104  # 64-bit TSS without an I/O bitmap
TSS_LIMIT = TSS_SIZE - 1
IOMAP_NONE = TSS_SIZE  # I/O map base at the limit: every port is denied at CPL3

# Flat 64-bit code/data descriptors in SYSCALL/SYSRET order (STAR: kernel 0x08, user base 0x10),
# with the accessed bit set: VMX entry checks require it, and the CPU never has to write the GDT.
_KERNEL_CODE64 = 0x00AF9B000000FFFF
_KERNEL_DATA = 0x00CF93000000FFFF
_USER_DATA = 0x00CFF3000000FFFF
_USER_CODE64 = 0x00AFFB000000FFFF


@dataclass(frozen=True)
class Segment:
    """A segment register as KVM sees it (struct kvm_segment, without padding)."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741  (the kernel's name for the long-mode bit)
    g: int
    avl: int = 0
    unusable: int = 0


def tss_selector(vcpu_index: int) -> int:
    return FIRST_TSS_SELECTOR + 16 * vcpu_index


def boot_gdt(tss_addresses: list[int]) -> bytes:
    """The GDT image: null, kernel code/data, user data/code, then one 16-byte TSS descriptor per vCPU."""
    flat = [0, _KERNEL_CODE64, _KERNEL_DATA, _USER_DATA, _USER_CODE64]
    image = b"".join(struct.pack("<Q", descriptor) for descriptor in flat)
    for address in tss_addresses:
        image += tss_descriptor(address, TSS_LIMIT)
    return image


def tss_descriptor(base: int, limit: int) -> bytes:
    """A 16-byte available 64-bit TSS system descriptor (type 9, present)."""
    low = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40) | (((limit >> 16) & 0xF) << 48) \
        | (((base >> 24) & 0xFF) << 56)
    return struct.pack("<QQ", low, base >> 32)


def tss_image(rsp0: int = 0) -> bytes:
    """A 64-bit TSS with no I/O permission bitmap (CPL3 port access faults until the guest adds one)."""
    image = bytearray(TSS_SIZE)
    struct.pack_into("<Q", image, 4, rsp0)
    struct.pack_into("<H", image, 102, IOMAP_NONE)
    return bytes(image)


def decode_descriptor(raw: int) -> Segment:
    """Decode an 8-byte code/data descriptor into a Segment (selector left 0)."""
    limit = (raw & 0xFFFF) | ((raw >> 32) & 0xF0000)
    base = ((raw >> 16) & 0xFFFFFF) | (((raw >> 56) & 0xFF) << 24)
    access = (raw >> 40) & 0xFF
    flags = (raw >> 52) & 0xF
    granular = (flags >> 3) & 1
    return Segment(
        base=base,
        limit=(limit << 12) | 0xFFF if granular else limit,
        selector=0,
        type=access & 0xF,
        present=(access >> 7) & 1,
        dpl=(access >> 5) & 3,
        db=(flags >> 2) & 1,
        s=(access >> 4) & 1,
        l=(flags >> 1) & 1,
        g=granular,
        avl=flags & 1,
    )


def flat_segment(raw: int, selector: int) -> Segment:
    decoded = decode_descriptor(raw)
    return Segment(**{**decoded.__dict__, "selector": selector})


KERNEL_CODE_SEGMENT = flat_segment(_KERNEL_CODE64, KERNEL_CS)
KERNEL_DATA_SEGMENT = flat_segment(_KERNEL_DATA, KERNEL_DS)
USER_CODE_SEGMENT = flat_segment(_USER_CODE64, USER_CS)
USER_DATA_SEGMENT = flat_segment(_USER_DATA, USER_DS)


def tss_segment(base: int, vcpu_index: int) -> Segment:
    """TR as loaded after LTR: busy 64-bit TSS (type 11)."""
    return Segment(base=base, limit=TSS_LIMIT, selector=tss_selector(vcpu_index), type=11, present=1,
                   dpl=0, db=0, s=0, l=0, g=0)
