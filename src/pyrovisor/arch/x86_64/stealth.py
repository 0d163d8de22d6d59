"""The --stealth profile: a CPUID table without hypervisor traces, neutral firmware strings, TSC and pinning facts."""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from pyrovisor.arch.x86_64.acpi import PYROVISOR_IDENTITY, AcpiIdentity
from pyrovisor.arch.x86_64.cpuid import LEAF_FEATURES, CpuidEntry
from pyrovisor.arch.x86_64.multiboot_info import BOOT_LOADER_NAME
from pyrovisor.devices.virtio.mmio import VENDOR_ID
from pyrovisor.errors import KvmError
from pyrovisor.kvm import uapi
from pyrovisor.kvm.ioctl import ioctl_struct

HYPERVISOR_BIT = 1 << 31  # CPUID.1:ECX[31], "running under a hypervisor" (always 0 on bare metal)
HYPERVISOR_LEAVES_FIRST = 0x40000000  # the range Intel and AMD leave to hypervisors (vendor signature, features)
HYPERVISOR_LEAVES_END = 0x50000000
EXTENDED_MAX_LEAF = 0x80000000  # EAX: the highest extended leaf
BRAND_LEAVES = (0x80000002, 0x80000003, 0x80000004)  # 48 bytes of processor brand string, 16 per leaf
BRAND_SIZE = 48
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class FirmwareStrings:
    """Every string a guest can read that pyrovisor chooses (grep of the sources for "pyrovisor"/"PYRO")."""

    acpi: AcpiIdentity  # OEM ID, OEM table ID and creator ID of the RSDP and every ACPI table (Multiboot machines)
    boot_loader_name: bytes  # the Multiboot information's boot_loader_name
    virtio_vendor_id: int  # the virtio-mmio VendorID register ("PYRV" in ASCII by default)


PYROVISOR_STRINGS = FirmwareStrings(acpi=PYROVISOR_IDENTITY, boot_loader_name=BOOT_LOADER_NAME, virtio_vendor_id=VENDOR_ID)
# What ordinary firmware and loaders say: AMI's OEM fields as many PC boards ship them, GRUB's loader name,
# and vendor id 0 as Firecracker's virtio-mmio devices report it (the VendorID field has no registry).
NEUTRAL_STRINGS = FirmwareStrings(acpi=AcpiIdentity(oem_id=b"ALASKA", oem_table_id=b"A M I ", creator_id=b"AMI "),
                                  boot_loader_name=b"GRUB 2.06", virtio_vendor_id=0)


def firmware_strings(stealth: bool) -> FirmwareStrings:
    return NEUTRAL_STRINGS if stealth else PYROVISOR_STRINGS


def is_hypervisor_leaf(function: int) -> bool:
    return HYPERVISOR_LEAVES_FIRST <= function < HYPERVISOR_LEAVES_END


def brand_registers(brand: bytes) -> tuple[tuple[int, int, int, int], ...]:
    """The (EAX, EBX, ECX, EDX) of leaves 0x80000002-4 that spell `brand`, NUL-padded to 48 bytes (47 kept)."""
    padded = brand[:BRAND_SIZE - 1].ljust(BRAND_SIZE, b"\0")
    return tuple(struct.unpack_from("<4I", padded, 16 * index) for index in range(len(BRAND_LEAVES)))


def brand_from_entries(entries: Iterable[CpuidEntry]) -> bytes:
    """The brand string a CPUID table spells (NULs stripped); b"" when it has no brand leaves."""
    by_function = {entry.function: entry for entry in entries if entry.index == 0}
    if not all(function in by_function for function in BRAND_LEAVES):
        return b""
    raw = b"".join(struct.pack("<4I", e.eax, e.ebx, e.ecx, e.edx) for e in (by_function[f] for f in BRAND_LEAVES))
    return raw.rstrip(b"\0")


def host_brand_string(cpuinfo: Path = CPUINFO) -> bytes | None:
    """The host CPU's brand string as Linux reports it ("model name" in /proc/cpuinfo); None where unreadable."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip().encode("ascii", errors="replace")
    return None


def stealth_cpuid(entries: Iterable[CpuidEntry], host_brand: bytes | None) -> tuple[CpuidEntry, ...]:
    """`entries` without hypervisor traces: CPUID.1:ECX[31] cleared, the 0x40000000-0x4fffffff leaves removed,
    and, when `host_brand` is known, leaves 0x80000002-4 spelling it (added, and the extended maximum raised to
    cover them, if the table lacked them). Every other leaf is left exactly as it was."""
    out: list[CpuidEntry] = []
    brand = brand_registers(host_brand) if host_brand is not None else None
    seen_brand: set[int] = set()
    for entry in entries:
        if is_hypervisor_leaf(entry.function):
            continue
        if entry.function == LEAF_FEATURES:
            entry = replace(entry, ecx=entry.ecx & ~HYPERVISOR_BIT)
        elif brand is not None and entry.function in BRAND_LEAVES:
            eax, ebx, ecx, edx = brand[BRAND_LEAVES.index(entry.function)]
            entry = replace(entry, eax=eax, ebx=ebx, ecx=ecx, edx=edx)
            seen_brand.add(entry.function)
        elif brand is not None and entry.function == EXTENDED_MAX_LEAF and entry.eax < BRAND_LEAVES[-1]:
            entry = replace(entry, eax=BRAND_LEAVES[-1])
        out.append(entry)
    if brand is not None:
        for function, (eax, ebx, ecx, edx) in zip(BRAND_LEAVES, brand, strict=True):
            if function not in seen_brand:
                out.append(CpuidEntry(function, 0, 0, eax, ebx, ecx, edx))
    return tuple(out)


@dataclass(frozen=True)
class TscCompensation:
    """Whether this KVM lets the VMM move a vCPU's TSC (to hide time spent in exits), and what was found."""

    available: bool
    reason: str


def _tsc_offset_attribute(address: int) -> uapi.kvm_device_attr:
    return uapi.kvm_device_attr(flags=0, group=uapi.KVM_VCPU_TSC_CTRL, attr=uapi.KVM_VCPU_TSC_OFFSET, addr=address)


def probe_tsc_compensation(vcpu_fd: int, tsc_control: bool) -> TscCompensation:
    """Ask the vCPU for the KVM_VCPU_TSC_CTRL / KVM_VCPU_TSC_OFFSET attribute, and check that it is honoured: the
    offset is moved by one cycle and read back, then put back (call before the vCPU first runs). `tsc_control`:
    whether KVM_CAP_TSC_CONTROL is present (the other facility that moves a guest's TSC)."""
    control = "" if tsc_control else ", no KVM_CAP_TSC_CONTROL"
    try:
        ioctl_struct(vcpu_fd, uapi.KVM_HAS_DEVICE_ATTR, _tsc_offset_attribute(0), "KVM_HAS_DEVICE_ATTR")
    except KvmError:
        return TscCompensation(False, f"no KVM_VCPU_TSC_OFFSET vCPU attribute{control}")
    value = ctypes.c_int64()
    attribute = _tsc_offset_attribute(ctypes.addressof(value))
    ioctl_struct(vcpu_fd, uapi.KVM_GET_DEVICE_ATTR, attribute, "KVM_GET_DEVICE_ATTR")
    original = value.value
    value.value = original + 1
    ioctl_struct(vcpu_fd, uapi.KVM_SET_DEVICE_ATTR, attribute, "KVM_SET_DEVICE_ATTR")
    ioctl_struct(vcpu_fd, uapi.KVM_GET_DEVICE_ATTR, attribute, "KVM_GET_DEVICE_ATTR")
    read_back = value.value
    value.value = original
    ioctl_struct(vcpu_fd, uapi.KVM_SET_DEVICE_ATTR, attribute, "KVM_SET_DEVICE_ATTR")
    if read_back != original + 1:
        return TscCompensation(False, f"KVM_VCPU_TSC_OFFSET is accepted but ignored (offset {original + 1} read back "
                                      f"as {read_back}){control}")
    return TscCompensation(True, "KVM_VCPU_TSC_OFFSET is honoured; pyrovisor does not move it per exit yet")


def host_cpu_for(vcpu_index: int, allowed: Iterable[int] | None = None) -> int:
    """The host CPU vCPU `vcpu_index` is pinned to: the allowed CPUs in turn (round robin)."""
    cpus = sorted(allowed if allowed is not None else os.sched_getaffinity(0))
    return cpus[vcpu_index % len(cpus)]


__all__ = ["BRAND_LEAVES", "HYPERVISOR_BIT", "NEUTRAL_STRINGS", "PYROVISOR_STRINGS", "FirmwareStrings", "TscCompensation",
           "brand_from_entries", "brand_registers", "firmware_strings", "host_brand_string", "host_cpu_for",
           "is_hypervisor_leaf", "probe_tsc_compensation", "stealth_cpuid"]
