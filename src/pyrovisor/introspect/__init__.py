"""Guest introspection: reading the OS guest's kernel state from outside, through a profile of its kernel."""

from pyrovisor.introspect.archive import ArchiveEntry, load_archive, read_archive
from pyrovisor.introspect.kernel import (
    CpuInfo,
    GuestKernel,
    KernelInfo,
    MemoryReader,
    ProcessInfo,
    SyscallEntry,
)
from pyrovisor.introspect.profile import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    Field,
    KernelSegment,
    Profile,
    StructLayout,
    Symbol,
    guest_profile,
)

__all__ = [
    "PROFILE_FORMAT",
    "PROFILE_VERSION",
    "ArchiveEntry",
    "CpuInfo",
    "Field",
    "GuestKernel",
    "KernelInfo",
    "KernelSegment",
    "MemoryReader",
    "ProcessInfo",
    "Profile",
    "StructLayout",
    "Symbol",
    "SyscallEntry",
    "guest_profile",
    "load_archive",
    "read_archive",
]
