"""Kvm: the /dev/kvm system fd and its ioctls."""

from __future__ import annotations

import ctypes
import errno
import os
import weakref
from pathlib import Path

from pyrovisor.arch.x86_64.cpuid import CpuidEntry
from pyrovisor.errors import KvmError, KvmUnavailableError
from pyrovisor.kvm import uapi
from pyrovisor.kvm.caps import Cap
from pyrovisor.kvm.flexible import FlexibleBuffer
from pyrovisor.kvm.ioctl import ioctl_int, ioctl_ptr
from pyrovisor.kvm.vm import VmFd

KVM_PATH = "/dev/kvm"
EXPECTED_API_VERSION = 12
MAX_CPUID_ENTRIES = 256
MAX_MSR_INDICES = 1024


class Kvm:
    """An open /dev/kvm. Raises KvmUnavailableError, with how to fix it, when it cannot be used."""

    def __init__(self, path: str = KVM_PATH) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(path, "no such device", "Load the KVM module (modprobe kvm_intel or "
                                      "kvm_amd) or run on a host that exposes /dev/kvm") from None
        except PermissionError:
            raise KvmUnavailableError(path, "permission denied", "Add your user to the 'kvm' group "
                                      "(sudo usermod -aG kvm $USER, then log in again) or run as root") from None
        except OSError as exc:
            raise KvmUnavailableError(path, os.strerror(exc.errno or 0), "Check that KVM works on this host") from None
        self._close_fd = weakref.finalize(self, os.close, self.fd)  # if the object is dropped unclosed
        version = self.get_api_version()
        if version != EXPECTED_API_VERSION:
            self.close()
            raise KvmUnavailableError(path, f"KVM API version {version}", f"pyrovisor needs version {EXPECTED_API_VERSION}")
        self.vcpu_mmap_size = self.get_vcpu_mmap_size()

    def get_api_version(self) -> int:
        return ioctl_int(self.fd, uapi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: Cap | int) -> int:
        return ioctl_int(self.fd, uapi.KVM_CHECK_EXTENSION, int(cap), "KVM_CHECK_EXTENSION")

    def get_vcpu_mmap_size(self) -> int:
        return ioctl_int(self.fd, uapi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def create_vm(self, machine_type: int = 0) -> VmFd:
        fd = ioctl_int(self.fd, uapi.KVM_CREATE_VM, machine_type, "KVM_CREATE_VM")
        return VmFd(fd, self.vcpu_mmap_size)

    def get_supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        buffer = FlexibleBuffer(uapi.kvm_cpuid2, uapi.kvm_cpuid_entry2, MAX_CPUID_ENTRIES)
        buffer.header.nent = MAX_CPUID_ENTRIES
        ioctl_ptr(self.fd, uapi.KVM_GET_SUPPORTED_CPUID, buffer.address, "KVM_GET_SUPPORTED_CPUID")
        return tuple(CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                     for e in buffer.entries[:buffer.header.nent])

    def get_msr_index_list(self) -> tuple[int, ...]:
        return self._msr_list(uapi.KVM_GET_MSR_INDEX_LIST, "KVM_GET_MSR_INDEX_LIST")

    def get_msr_feature_index_list(self) -> tuple[int, ...]:
        return self._msr_list(uapi.KVM_GET_MSR_FEATURE_INDEX_LIST, "KVM_GET_MSR_FEATURE_INDEX_LIST")

    def _msr_list(self, request: int, name: str) -> tuple[int, ...]:
        buffer = FlexibleBuffer(uapi.kvm_msr_list, ctypes.c_uint32, MAX_MSR_INDICES)
        buffer.header.nmsrs = MAX_MSR_INDICES
        try:
            ioctl_ptr(self.fd, request, buffer.address, name)
        except KvmError as exc:
            if exc.errno != errno.E2BIG:
                raise
            raise KvmError(name, exc.errno, f"more than {MAX_MSR_INDICES} MSRs") from None
        return tuple(int(index) for index in buffer.entries[:buffer.header.nmsrs])

    def close(self) -> None:
        if self.fd >= 0:
            self.fd = -1
            self._close_fd()

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def loaded_kvm_modules() -> tuple[str, ...]:
    """The KVM modules loaded on this host (kvm_intel, kvm_amd, kvm_pvm, ...), from /sys/module."""
    modules = Path("/sys/module")
    if not modules.is_dir():
        return ()
    return tuple(sorted(entry.name for entry in modules.iterdir() if entry.name.startswith("kvm")))
