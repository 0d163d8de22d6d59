"""Introspection without KVM: the shipped profile against the kernel ELF, and the readers on a synthetic
guest memory whose page tables and kernel structures are laid out by hand."""

from __future__ import annotations

import copy
import struct
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pyrovisor.arch.x86_64.boot_info import BootInfo
from pyrovisor.arch.x86_64.paging import TranslationFault
from pyrovisor.catalog import guests_dir
from pyrovisor.errors import LoaderError, StateError
from pyrovisor.introspect import GuestKernel, Profile, guest_profile, load_archive, read_archive

KERNEL = 0xFFFFFFFF80000000
DIRECT = 0xFFFF888000000000
PML4, KERNEL_PDPT, KERNEL_PD, DIRECT_PDPT, DIRECT_PD = 0x110000, 0x111000, 0x112000, 0x113000, 0x114000
OS_INFO, PROC_TABLE, MM, CPUS, SYSCALLS, BOOT_INFO_POINTER = 0x120000, 0x121000, 0x122000, 0x123000, 0x124000, 0x125000
FUNCTION_A, FUNCTION_B = 0x101000, 0x101100
MAGIC = 0x534F5950
TABLE = 0x27  # present, writable, user, accessed
HUGE = 0xE3  # present, writable, accessed, dirty, 2 MiB


def field(offset: int, size: int, kind: str) -> dict[str, Any]:
    return {"offset": offset, "size": size, "type": kind}


SYNTHETIC: dict[str, Any] = {
    "format": "pyrovisor-os-profile", "version": 1,
    "kernel": {"file": "synthetic.elf", "sha256": "0" * 64, "entry": KERNEL + 0x101000,
               "segments": [{"vaddr": KERNEL + 0x100000, "paddr": 0x100000, "memsz": 0x100000, "flags": 6}]},
    "layout": {"kernel_map_base": KERNEL, "direct_map_base": DIRECT},
    "symbols": {
        "kernel_pml4": {"address": KERNEL + PML4, "size": 4096, "kind": "object"},
        "os_info": {"address": KERNEL + OS_INFO, "size": 56, "kind": "object"},
        "proc_table": {"address": KERNEL + PROC_TABLE, "size": 4 * 104, "kind": "object"},
        "cpus": {"address": KERNEL + CPUS, "size": 2 * 48, "kind": "object"},
        "syscall_table": {"address": KERNEL + SYSCALLS, "size": 16, "kind": "object"},
        "boot_info": {"address": KERNEL + BOOT_INFO_POINTER, "size": 8, "kind": "object"},
        "sys_a": {"address": KERNEL + FUNCTION_A, "size": 0x40, "kind": "function"},
        "sys_b": {"address": KERNEL + FUNCTION_B, "size": 0x40, "kind": "function"},
    },
    "structs": {
        "process": {"size": 104, "fields": {
            "pid": field(0, 4, "u32"), "state": field(4, 4, "enum:proc_state"), "name": field(8, 16, "char[16]"),
            "cr3": field(24, 8, "u64"), "parent": field(32, 4, "u32"), "cpu": field(36, 4, "u32"),
            "affinity": field(40, 4, "i32"), "exit_code": field(44, 4, "i32"), "syscalls": field(48, 8, "u64"),
            "page_faults": field(56, 8, "u64"), "switches": field(64, 8, "u64"), "ticks": field(72, 8, "u64"),
            "cpus_ran": field(80, 8, "u64"), "args_offset": field(88, 4, "u32"), "args_len": field(92, 4, "u32"),
            "mm": field(96, 8, "ptr:mm")}},
        "mm": {"size": 16, "fields": {"cr3": field(0, 8, "u64"), "pages_mapped": field(8, 8, "u64")}},
        "cpu": {"size": 48, "fields": {
            "current": field(0, 8, "ptr:process"), "index": field(8, 4, "u32"), "online": field(12, 4, "u32"),
            "ticks": field(16, 8, "u64"), "idle_ticks": field(24, 8, "u64"), "switches": field(32, 8, "u64"),
            "syscalls": field(40, 8, "u64")}},
        "os_info": {"size": 56, "fields": {
            "magic": field(0, 4, "u32"), "nr_cpus": field(4, 4, "u32"), "jiffies": field(8, 8, "u64"),
            "hz": field(16, 4, "u32"), "live": field(20, 4, "u32"), "next_pid": field(24, 4, "u32"),
            "failures": field(28, 4, "u32"), "tsc_khz": field(32, 8, "u64"), "pages_reused": field(40, 8, "u64"),
            "pages_discarded": field(48, 8, "u64")}},
    },
    "constants": {"MAX_PROCS": 4, "OS_INFO_MAGIC": MAGIC, "SYS_COUNT": 2},
    "enums": {"proc_state": {"free": 0, "runnable": 1, "running": 2, "sleeping": 3, "exited": 4},
              "syscall": {"first": 0, "second": 1}},
}


class FlatMemory:
    """4 MiB of guest physical memory in a bytearray."""

    def __init__(self) -> None:
        self.data = bytearray(4 << 20)

    def read(self, gpa: int, size: int) -> bytes:
        assert gpa >= 0 and gpa + size <= len(self.data), f"read outside memory at {gpa:#x}"
        return bytes(self.data[gpa:gpa + size])

    def read_u64(self, gpa: int) -> int:
        return int.from_bytes(self.read(gpa, 8), "little")

    def put(self, gpa: int, fmt: str, *values: object) -> None:
        struct.pack_into(fmt, self.data, gpa, *values)


def process_record(pid: int, state: int, name: bytes, cr3: int, affinity: int, exit_code: int, cpus_ran: int,
                   args: tuple[int, int], mm: int) -> tuple[object, ...]:
    return (pid, state, name, cr3, 0, 1, affinity, exit_code, 10 * pid, pid, 3, 7, cpus_ran, *args, mm)


PROCESS_FORMAT = "<II16sQIIiiQQQQQIIQ"


def synthetic_guest() -> FlatMemory:
    memory = FlatMemory()
    # Kernel map and direct map: one 2 MiB page each, both over physical 0..2 MiB.
    memory.put(PML4 + 8 * 511, "<Q", KERNEL_PDPT | TABLE)
    memory.put(KERNEL_PDPT + 8 * 510, "<Q", KERNEL_PD | TABLE)
    memory.put(KERNEL_PD, "<Q", 0 | HUGE)
    memory.put(PML4 + 8 * 273, "<Q", DIRECT_PDPT | TABLE)
    memory.put(DIRECT_PDPT, "<Q", DIRECT_PD | TABLE)
    memory.put(DIRECT_PD, "<Q", 0 | HUGE)
    # The boot info (found through the kernel's pointer to it) and the command line.
    memory.put(BOOT_INFO_POINTER, "<Q", DIRECT + 0x1000)
    memory.put(0x1000 + BootInfo.cmdline_gpa.offset, "<Q", 0x2000)
    text = b"alpha x=1; beta y=22; gamma\0"
    memory.data[0x2000:0x2000 + len(text)] = text
    memory.put(OS_INFO, "<IIQIIIIQQQ", MAGIC, 2, 500, 100, 2, 4, 1, 2_600_000, 12, 34)
    # Slot 0: a live process whose mm still matches; slot 1 free; slot 2 exited; slot 3 live, pinned.
    memory.put(MM, "<QQ", 0x300000, 77)
    memory.put(MM + 16, "<QQ", 0x999000, 5)  # reused by someone else: its cr3 no longer matches
    records = {
        0: process_record(1, 2, b"alpha", 0x300000, -1, 0, 0b01, (0, 9), KERNEL + MM),
        2: process_record(2, 4, b"beta", 0x301000, -1, 3, 0b11, (11, 9), KERNEL + MM + 16),
        3: process_record(3, 3, b"gamma", 0x302000, 1, 0, 0b10, (23, 0), KERNEL + MM + 16),
    }
    for slot, record in records.items():
        memory.put(PROC_TABLE + 104 * slot, PROCESS_FORMAT, *record)
    memory.put(CPUS, "<QIIQQQQ", KERNEL + PROC_TABLE, 0, 1, 500, 20, 40, 100)
    memory.put(CPUS + 48, "<QIIQQQQ", 0, 1, 1, 498, 300, 20, 50)
    memory.put(SYSCALLS, "<QQ", KERNEL + FUNCTION_B + 8, KERNEL + 0x1F0000)
    return memory


def synthetic_kernel(memory: FlatMemory | None = None) -> GuestKernel:
    return GuestKernel(memory or synthetic_guest(), Profile.from_json(SYNTHETIC))


def test_processes_are_decoded_through_the_page_tables() -> None:
    processes = synthetic_kernel().processes()
    assert [(p.slot, p.pid, p.name, p.state) for p in processes] == [
        (0, 1, "alpha", "running"), (2, 2, "beta", "exited"), (3, 3, "gamma", "sleeping")]
    alpha, beta, gamma = processes
    assert alpha.address == KERNEL + PROC_TABLE and alpha.cr3 == 0x300000 and alpha.syscalls == 10
    assert alpha.affinity is None and alpha.exit_code is None and alpha.cpus_ran == (0,)
    assert alpha.pages_mapped == 77 and alpha.args == "alpha x=1"
    assert beta.exit_code == 3 and beta.pages_mapped is None and beta.cpus_ran == (0, 1) and beta.args == "beta y=22"
    assert gamma.affinity == 1 and gamma.pages_mapped is None, "an mm that belongs to another cr3 is not shown"
    assert gamma.args == ""


def test_kernel_info_cpus_and_syscall_table() -> None:
    kernel = synthetic_kernel()
    info = kernel.info()
    assert (info.nr_cpus, info.jiffies, info.hz, info.live, info.tsc_khz, info.pages_discarded) == (
        2, 500, 100, 2, 2_600_000, 34)
    cpus = kernel.cpus()
    assert [(c.index, c.online, c.current_pid, c.idle_ticks) for c in cpus] == [(0, True, 1, 20), (1, True, None, 300)]
    table = kernel.syscall_table()
    assert [(e.number, e.name, e.handler_symbol) for e in table] == [(0, "first", "sys_b"), (1, "second", None)]


def test_a_kernel_that_has_not_set_up_is_refused() -> None:
    memory = synthetic_guest()
    memory.put(OS_INFO, "<I", 0)
    with pytest.raises(StateError, match="not set up"):
        synthetic_kernel(memory).processes()
    memory = synthetic_guest()
    memory.put(PML4 + 8 * 511, "<Q", 0)  # no kernel page tables yet
    with pytest.raises(StateError, match="page tables"):
        synthetic_kernel(memory).info()


def test_translation_and_reads_across_pages() -> None:
    kernel = synthetic_kernel()
    assert kernel.translate(KERNEL + 0x2000) == 0x2000
    assert kernel.translate(DIRECT + 0x1234) == 0x1234
    assert kernel.read_virtual(DIRECT + 0x2000 - 3, 8) == b"\0\0\0alpha"
    with pytest.raises(TranslationFault):
        kernel.translate(0x400000)


def test_profile_errors_name_the_problem() -> None:
    broken = copy.deepcopy(SYNTHETIC)
    broken["structs"]["mm"]["fields"]["cr3"] = field(12, 8, "u64")
    with pytest.raises(LoaderError, match="runs past the end"):
        Profile.from_json(broken)
    broken = copy.deepcopy(SYNTHETIC)
    broken["structs"]["mm"]["fields"]["cr3"] = field(0, 4, "u64")
    with pytest.raises(LoaderError, match="type u64 but 4 bytes"):
        Profile.from_json(broken)
    with pytest.raises(LoaderError, match="not a pyrovisor-os-profile"):
        Profile.from_json({"format": "volatility"})
    with pytest.raises(LoaderError, match="version 9"):
        Profile.from_json({**SYNTHETIC, "version": 9})
    profile = Profile.from_json(SYNTHETIC)
    with pytest.raises(LoaderError, match="no symbol 'missing'"):
        profile.symbol("missing")
    with pytest.raises(LoaderError, match="not inside the kernel image"):
        profile.image_physical(KERNEL + 0x300000)


def test_the_shipped_profile_matches_the_kernel_elf() -> None:
    """Checked against pyelftools, independently of the build's own ELF reader."""
    profile = guest_profile()
    elf_path = guests_dir() / "os.elf"
    assert profile.matches(elf_path)
    with open(elf_path, "rb") as handle:
        elf = ELFFile(handle)
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        for name in ("proc_table", "cpus", "os_info", "syscall_table", "kernel_pml4", "boot_info", "sys_time"):
            (symbol,) = symtab.get_symbol_by_name(name)
            assert profile.symbol(name).address == symbol["st_value"]
            assert profile.symbol(name).size == symbol["st_size"]
        loads = [(s["p_vaddr"], s["p_paddr"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    assert [(s.vaddr, s.paddr) for s in profile.segments] == loads
    process = profile.struct("process")
    assert profile.symbol("proc_table").size == process.size * profile.constant("MAX_PROCS")
    assert profile.symbol("cpus").size == profile.struct("cpu").size * profile.constant("MAX_CPUS")
    assert profile.image_physical(profile.symbol("kernel_pml4").address) == \
        profile.symbol("kernel_pml4").address - profile.kernel_map_base


def test_the_program_archive() -> None:
    path = guests_dir() / "os-programs.img"
    entries = load_archive(path)
    assert {e.name for e in entries} >= {"counter", "memcheck", "memdirty", "ptrchase", "falseshare", "exits",
                                         "kwriter", "fault"}
    data = path.read_bytes()
    for entry in entries:
        assert entry.offset % 4096 == 0 and entry.image_size % 4096 == 0
        assert entry.contains(entry.entry) and entry.load_va + entry.image_size <= entry.rw_start
        assert data[entry.offset:entry.offset + 4] != bytes(4)
    with pytest.raises(LoaderError, match="not a version 1"):
        read_archive(b"\0" * 64)
    with pytest.raises(LoaderError, match="do not fit"):
        read_archive(data[:20])
