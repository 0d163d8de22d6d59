"""CPUID as given to each vCPU: KVM's supported leaves with per-vCPU topology fixed up."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

LEAF_FEATURES = 0x1
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F
LEAF_AMD_TOPOLOGY = 0x8000001E


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def for_vcpu(entries: Iterable[CpuidEntry], vcpu_index: int) -> tuple[CpuidEntry, ...]:
    """Copy of `entries` where every APIC-ID field names vCPU `vcpu_index`."""
    out = []
    for entry in entries:
        if entry.function == LEAF_FEATURES:
            entry = replace(entry, ebx=(entry.ebx & 0x00FFFFFF) | ((vcpu_index & 0xFF) << 24))
        elif entry.function in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
            entry = replace(entry, edx=vcpu_index)
        elif entry.function == LEAF_AMD_TOPOLOGY:
            entry = replace(entry, eax=vcpu_index)
        out.append(entry)
    return tuple(out)
