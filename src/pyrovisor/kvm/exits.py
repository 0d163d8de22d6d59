"""Typed VM exits, decoded once from the shared kvm_run page after each KVM_RUN."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any

from pyrovisor.kvm import uapi


@dataclass(slots=True)
class IoOut:
    """The guest wrote `data` (size * count bytes) to `port`."""

    port: int
    size: int
    data: bytes

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[:self.size], "little")


@dataclass(slots=True)
class IoIn:
    """The guest reads `count` values of `size` bytes from `port`: answer with `respond` before the next run."""

    port: int
    size: int
    count: int
    page: mmap.mmap
    data_offset: int

    def respond(self, value: int, index: int = 0) -> None:
        start = self.data_offset + index * self.size
        self.page[start:start + self.size] = (value & ((1 << (8 * self.size)) - 1)).to_bytes(self.size, "little")


@dataclass(slots=True)
class MmioWrite:
    address: int
    data: bytes

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")


@dataclass(slots=True)
class MmioRead:
    """The guest reads `size` bytes at `address`: answer with `respond` before the next run."""

    address: int
    size: int
    page: mmap.mmap

    def respond(self, value: int) -> None:
        value &= (1 << (8 * self.size)) - 1
        self.page[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + self.size] = value.to_bytes(self.size, "little")


@dataclass(slots=True)
class Hlt:
    pass


@dataclass(slots=True)
class Shutdown:
    """Triple fault or a shutdown request: the guest cannot continue."""


@dataclass(slots=True)
class Debug:
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(slots=True)
class FailEntry:
    hardware_reason: int
    cpu: int


@dataclass(slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]

    def describe(self) -> str:
        names = {
            uapi.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
            uapi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
            uapi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
            uapi.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
        }
        words = " ".join(f"{word:#x}" for word in self.data)
        return f"{names.get(self.suberror, f'suberror {self.suberror}')} [{words}]"


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned early because of a signal or immediate_exit (a kick)."""


@dataclass(slots=True)
class SystemEvent:
    type: int
    data: tuple[int, ...]


@dataclass(slots=True)
class DirtyRingFull:
    pass


@dataclass(slots=True)
class IrqWindowOpen:
    pass


@dataclass(slots=True)
class Unknown:
    reason: int
    hardware_reason: int


VcpuExit = (IoOut | IoIn | MmioWrite | MmioRead | Hlt | Shutdown | Debug | FailEntry | InternalError
            | Interrupted | SystemEvent | DirtyRingFull | IrqWindowOpen | Unknown)


def field_offset(owner: type, name: str) -> int:
    """offsetof(owner, name) from a generated ctypes class (anonymous members are reachable as in C)."""
    field: Any = getattr(owner, name)
    return int(field.offset)


RUN = uapi.kvm_run
EXIT_REASON_OFFSET = field_offset(RUN, "exit_reason")
IMMEDIATE_EXIT_OFFSET = field_offset(RUN, "immediate_exit")
_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset
_IO_OFFSET = field_offset(RUN, "io")
_MMIO = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write
_MMIO_OFFSET = field_offset(RUN, "mmio")
_MMIO_DATA_OFFSET = _MMIO_OFFSET + field_offset(uapi._kvm_run_mmio, "data")
_DEBUG = struct.Struct("<IIQQQ")  # exception, pad, pc, dr6, dr7
_DEBUG_OFFSET = field_offset(RUN, "debug")
_FAIL_ENTRY = struct.Struct("<QI")  # hardware_entry_failure_reason, cpu
_FAIL_ENTRY_OFFSET = field_offset(RUN, "fail_entry")
_INTERNAL = struct.Struct("<II")  # suberror (or type), ndata
_INTERNAL_OFFSET = field_offset(RUN, "internal")
_SYSTEM_EVENT_OFFSET = field_offset(RUN, "system_event")
_HW_OFFSET = field_offset(RUN, "hw")
_EXIT_REASON_INDEX = EXIT_REASON_OFFSET // 4
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")

KVM_EXIT_IO_OUT = uapi.KVM_EXIT_IO_OUT


class ExitDecoder:
    """Reads the exit out of one vCPU's mapped kvm_run page."""

    def __init__(self, run_page: mmap.mmap) -> None:
        self._page = run_page
        self._words = memoryview(run_page).cast("I")  # exit_reason read as one index: the cheapest access

    def exit_reason(self) -> int:
        reason: int = self._words[_EXIT_REASON_INDEX]
        return reason

    def decode(self) -> VcpuExit:
        page = self._page
        reason = self._words[_EXIT_REASON_INDEX]
        if reason == uapi.KVM_EXIT_IO:
            direction, size, port, count, data_offset = _IO.unpack_from(page, _IO_OFFSET)
            end = data_offset + size * count
            if direction == KVM_EXIT_IO_OUT:
                return IoOut(port, size, page[data_offset:end])
            return IoIn(port, size, count, page, data_offset)
        if reason == uapi.KVM_EXIT_MMIO:
            address, data, length, is_write = _MMIO.unpack_from(page, _MMIO_OFFSET)
            if is_write:
                return MmioWrite(address, data[:length])
            return MmioRead(address, length, page)
        return self._decode_rare(reason)

    def _decode_rare(self, reason: int) -> VcpuExit:
        page = self._page
        if reason == uapi.KVM_EXIT_HLT:
            return Hlt()
        if reason == uapi.KVM_EXIT_SHUTDOWN:
            return Shutdown()
        if reason == uapi.KVM_EXIT_INTR:
            return Interrupted()
        if reason == uapi.KVM_EXIT_DEBUG:
            exception, _pad, pc, dr6, dr7 = _DEBUG.unpack_from(page, _DEBUG_OFFSET)
            return Debug(exception, pc, dr6, dr7)
        if reason == uapi.KVM_EXIT_FAIL_ENTRY:
            hardware_reason, cpu = _FAIL_ENTRY.unpack_from(page, _FAIL_ENTRY_OFFSET)
            return FailEntry(hardware_reason, cpu)
        if reason == uapi.KVM_EXIT_INTERNAL_ERROR:
            suberror, count = _INTERNAL.unpack_from(page, _INTERNAL_OFFSET)
            count = min(count, 16)
            words = struct.unpack_from(f"<{count}Q", page, _INTERNAL_OFFSET + 8)
            return InternalError(suberror, words)
        if reason == uapi.KVM_EXIT_SYSTEM_EVENT:
            event_type, count = _INTERNAL.unpack_from(page, _SYSTEM_EVENT_OFFSET)
            count = min(count, 16)
            words = struct.unpack_from(f"<{count}Q", page, _SYSTEM_EVENT_OFFSET + 8)
            return SystemEvent(event_type, words)
        if reason == uapi.KVM_EXIT_DIRTY_RING_FULL:
            return DirtyRingFull()
        if reason == uapi.KVM_EXIT_IRQ_WINDOW_OPEN:
            return IrqWindowOpen()
        return Unknown(reason, _U64.unpack_from(page, _HW_OFFSET)[0])

    def close(self) -> None:
        """Release the view on the page so that it can be unmapped."""
        self._words.release()
