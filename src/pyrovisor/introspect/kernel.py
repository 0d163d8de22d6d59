"""GuestKernel: the OS guest's process table, vCPUs and system-call table, read from its memory via a profile."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Protocol

from pyrovisor.arch.x86_64.boot_info import BootInfo
from pyrovisor.arch.x86_64.paging import walk
from pyrovisor.errors import GuestMemoryError, StateError
from pyrovisor.introspect.profile import Profile

_NO_AFFINITY = -1
CR3_ADDRESS_MASK = 0x000F_FFFF_FFFF_F000  # CR3 bits 51:12 (the low bits hold PCID or PWT/PCD flags)


def page_table_root(cr3: int) -> int:
    """The physical address of the top page table a CR3 value points to (what a process's `cr3` field holds)."""
    return cr3 & CR3_ADDRESS_MASK


class MemoryReader(Protocol):
    """Guest physical memory as introspection needs it (GuestMemory fits)."""

    def read(self, gpa: int, size: int) -> bytes: ...

    def read_u64(self, gpa: int) -> int: ...


@dataclass(frozen=True)
class KernelInfo:
    nr_cpus: int
    jiffies: int
    hz: int
    live: int
    next_pid: int
    failures: int
    tsc_khz: int
    pages_reused: int
    pages_discarded: int


@dataclass(frozen=True)
class ProcessInfo:
    """One used entry of the process table."""

    slot: int
    address: int  # kernel virtual address of the entry
    pid: int
    name: str
    state: str  # runnable, running, sleeping, exited
    cr3: int
    parent: int
    cpu: int  # the vCPU it runs on or last ran on
    affinity: int | None
    exit_code: int | None
    syscalls: int
    page_faults: int
    switches: int
    ticks: int
    cpus_ran: tuple[int, ...]
    pages_mapped: int | None  # of its address space, while that still exists
    args: str


@dataclass(frozen=True)
class CpuInfo:
    index: int
    online: bool
    current_pid: int | None
    ticks: int
    idle_ticks: int
    switches: int
    syscalls: int


@dataclass(frozen=True)
class SyscallEntry:
    number: int
    name: str
    handler: int
    handler_symbol: str | None  # the kernel function the entry points into


class GuestKernel:
    """Reads kernel structures through the kernel's own page tables, as the guest's CPU would.

    The root of the walk is the kernel's `kernel_pml4`, found through the ELF segments (where the loader
    put it); every other address is translated by walking real guest page tables. Read a paused VM for a
    consistent picture: a running guest changes the structures while they are read.
    """

    def __init__(self, memory: MemoryReader, profile: Profile) -> None:
        self.memory = memory
        self.profile = profile
        self.root = profile.image_physical(profile.symbol("kernel_pml4").address)

    def next_pid_location(self) -> tuple[int, int]:
        """(physical address, size) of `os_info.next_pid`, readable without a page walk: when it moves, a new
        process may have taken over the page tables (the CR3) of one that exited, so caches by CR3 go stale."""
        field = self.profile.struct("os_info").field("next_pid")
        return self.profile.image_physical(self.profile.symbol("os_info").address) + field.offset, field.size

    # --- addresses ----------------------------------------------------------------------------
    def translate(self, virtual_address: int, cr3: int | None = None) -> int:
        """The physical address of `virtual_address` under `cr3` (default: the kernel's tables)."""
        return walk(self.memory.read_u64, self.root if cr3 is None else cr3, virtual_address).physical_address

    def read_virtual(self, virtual_address: int, size: int, cr3: int | None = None) -> bytes:
        """`size` bytes at a virtual address, page by page through the page tables."""
        root = self.root if cr3 is None else cr3
        pieces = []
        address, remaining = virtual_address, size
        while remaining:
            translation = walk(self.memory.read_u64, root, address)
            chunk = min(remaining, translation.page_size - address % translation.page_size)
            pieces.append(self.memory.read(translation.physical_address, chunk))
            address += chunk
            remaining -= chunk
        return b"".join(pieces)

    def read_struct(self, name: str, virtual_address: int) -> dict[str, int | str | bytes]:
        layout = self.profile.struct(name)
        return layout.unpack(self.read_virtual(virtual_address, layout.size))

    def _integer(self, record: dict[str, int | str | bytes], name: str) -> int:
        value = record[name]
        assert isinstance(value, int), f"{name} is not an integer field"
        return value

    # --- the kernel ---------------------------------------------------------------------------
    def info(self) -> KernelInfo:
        """Global counters; raises StateError until the kernel has set itself up."""
        try:
            record = self.read_struct("os_info", self.profile.symbol("os_info").address)
        except GuestMemoryError as exc:
            raise StateError("guest kernel", f"its page tables are not set up yet ({exc})") from None
        if record["magic"] != self.profile.constant("OS_INFO_MAGIC"):
            raise StateError("guest kernel", "not set up yet (os_info has no magic): is this the os guest, booted?")
        number = self._integer
        return KernelInfo(number(record, "nr_cpus"), number(record, "jiffies"), number(record, "hz"),
                          number(record, "live"), number(record, "next_pid"), number(record, "failures"),
                          number(record, "tsc_khz"), number(record, "pages_reused"), number(record, "pages_discarded"))

    def processes(self) -> list[ProcessInfo]:
        """Every used entry of the process table, in table order (exited ones included)."""
        self.info()
        layout = self.profile.struct("process")
        base = self.profile.symbol("proc_table").address
        count = self.profile.constant("MAX_PROCS")
        table = self.read_virtual(base, layout.size * count)
        free = self.profile.enum_value("proc_state", "free")
        result = []
        for slot in range(count):
            record = layout.unpack(table[slot * layout.size:(slot + 1) * layout.size])
            if record["state"] == free or not record["pid"]:
                continue
            result.append(self._process(slot, base + slot * layout.size, record))
        return result

    def _process(self, slot: int, address: int, record: dict[str, int | str | bytes]) -> ProcessInfo:
        number = self._integer
        state = self.profile.enum_name("proc_state", number(record, "state"))
        affinity = number(record, "affinity")
        cpus_ran = number(record, "cpus_ran")
        cr3 = number(record, "cr3")
        pages_mapped = None
        if state != "exited":
            mm = self.read_struct("mm", number(record, "mm"))
            if mm["cr3"] == cr3:
                pages_mapped = self._integer(mm, "pages_mapped")
        return ProcessInfo(
            slot=slot, address=address, pid=number(record, "pid"), name=str(record["name"]), state=state, cr3=cr3,
            parent=number(record, "parent"), cpu=number(record, "cpu"),
            affinity=None if affinity == _NO_AFFINITY else affinity,
            exit_code=number(record, "exit_code") if state == "exited" else None,
            syscalls=number(record, "syscalls"), page_faults=number(record, "page_faults"),
            switches=number(record, "switches"), ticks=number(record, "ticks"),
            cpus_ran=tuple(index for index in range(64) if cpus_ran >> index & 1),
            pages_mapped=pages_mapped,
            args=self._command_line(number(record, "args_offset"), number(record, "args_len")),
        )

    def _command_line(self, offset: int, length: int) -> str:
        """Part of the kernel command line, found through the kernel's `boot_info` pointer."""
        boot_info = int.from_bytes(self.read_virtual(self.profile.symbol("boot_info").address, 8), "little")
        cmdline_field = BootInfo.cmdline_gpa
        cmdline = int.from_bytes(self.read_virtual(boot_info + cmdline_field.offset, ctypes.sizeof(ctypes.c_uint64)),
                                 "little")
        return self.memory.read(cmdline + offset, length).decode(errors="replace") if length else ""

    def read_process_memory(self, process: ProcessInfo, virtual_address: int, size: int) -> bytes:
        """Bytes of a live process's address space, through its own page tables."""
        if process.state == "exited":
            raise StateError(f"pid {process.pid}", "has exited: its page tables are gone")
        return self.read_virtual(virtual_address, size, cr3=process.cr3)

    def cpus(self) -> list[CpuInfo]:
        info = self.info()
        layout = self.profile.struct("cpu")
        process_layout = self.profile.struct("process")
        base = self.profile.symbol("cpus").address
        result = []
        for index in range(info.nr_cpus):
            record = self.read_struct("cpu", base + index * layout.size)
            current = self._integer(record, "current")
            current_pid = None
            if current:
                pid_field = process_layout.field("pid")
                current_pid = int.from_bytes(self.read_virtual(current + pid_field.offset, pid_field.size), "little")
            result.append(CpuInfo(index, bool(record["online"]), current_pid, self._integer(record, "ticks"),
                                  self._integer(record, "idle_ticks"), self._integer(record, "switches"),
                                  self._integer(record, "syscalls")))
        return result

    def syscall_table(self) -> list[SyscallEntry]:
        """The system-call table as it is now, each entry named by the function it points into."""
        count = self.profile.constant("SYS_COUNT")
        data = self.read_virtual(self.profile.symbol("syscall_table").address, 8 * count)
        result = []
        for number in range(count):
            handler = int.from_bytes(data[8 * number:8 * number + 8], "little")
            symbol = self.profile.function_at(handler)
            result.append(SyscallEntry(number, self.profile.enum_name("syscall", number), handler,
                                       symbol.name if symbol else None))
        return result
