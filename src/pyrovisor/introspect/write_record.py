"""WriteRecorder: turns one trapped guest write into a log record (vCPU, process, RIP, instruction, old/new value)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyrovisor.arch.x86_64.paging import walk
from pyrovisor.errors import GuestMemoryError, MissingExtraError, PyrovisorError
from pyrovisor.introspect.kernel import GuestKernel, MemoryReader, page_table_root

if TYPE_CHECKING:
    from pyrovisor.vstate.vcpu import Vcpu

MAX_INSTRUCTION_BYTES = 15  # the longest x86 instruction
MAX_FUNCTION_BYTES = 1 << 16  # decode forward from a function's start only within this distance
KERNEL_HALF = 1 << 63  # addresses at or above: the kernel's, the same in every address space
WRITER_CACHE = 4096


@dataclass(frozen=True)
class GuestProcess:
    pid: int | None
    name: str


KERNEL = GuestProcess(None, "kernel")
UNKNOWN = GuestProcess(None, "unknown")


def load_disassembler() -> Any:
    """A capstone x86-64 disassembler; import it at set-up time (loading the C library maps executable pages,
    which a confined vCPU thread may not do)."""
    try:
        import capstone
    except ImportError:
        raise MissingExtraError("write monitoring", "introspect", ("capstone",)) from None
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


class WriteRecorder:
    """Builds the record of a write, on the vCPU thread that trapped it (whose registers are at hand).

    `kernel` is None for guests without a profile: the record then has RIP and instruction but no process.
    Processes are cached by CR3 and the table is read again only when a CR3 is not known.
    """

    def __init__(self, memory: MemoryReader, kernel: GuestKernel | None) -> None:
        self.memory = memory
        self.kernel = kernel
        self._disassembler = load_disassembler()
        self._by_cr3: dict[int, GuestProcess] = {}
        self._writers: dict[tuple[int, int, int], tuple[int | None, str | None]] = {}
        # The kernel's next_pid, read where the loader put it (no page walk): when it moves, a new process may
        # have taken over a CR3 (and code addresses) of one that exited, and what is cached is forgotten.
        self._next_pid_at: tuple[int, int] | None = None
        self._next_pid = -1
        if kernel is not None:
            self._next_pid_at = kernel.next_pid_location()

    def record(self, vcpu: Vcpu | None, gpa: int, size: int, old: int, new: int, watch: int) -> dict[str, Any]:
        document: dict[str, Any] = {"time": round(time.time(), 6), "vcpu": None, "pid": None, "process": None,
                                    "rip": None, "instruction": None}
        if vcpu is not None:
            document["vcpu"] = vcpu.index
            try:
                regs = vcpu.fd.get_regs()
                cr3 = vcpu.fd.get_sregs().cr3
            except PyrovisorError:
                regs = None
            if regs is not None:
                self._forget_if_new_processes()
                process = self.process(cr3)
                rip, text = self.writer(regs.rip, cr3, size)
                document.update(pid=process.pid, process=process.name, rip=None if rip is None else f"{rip:#x}",
                                next_rip=f"{regs.rip:#x}", instruction=text)
        document.update(address=f"{gpa:#x}", size=size, old=f"{old:#x}", new=f"{new:#x}", watch=watch)
        return document

    # --- who wrote ------------------------------------------------------------------------------------
    def process(self, cr3: int) -> GuestProcess:
        if self.kernel is None:
            return UNKNOWN
        root = page_table_root(cr3)
        if root == self.kernel.root:
            return KERNEL
        known = self._by_cr3.get(root)
        if known is not None:
            return known
        try:
            live = [process for process in self.kernel.processes() if process.state != "exited"]
        except PyrovisorError:
            return UNKNOWN
        self._by_cr3 = {page_table_root(process.cr3): GuestProcess(process.pid, process.name) for process in live}
        return self._by_cr3.get(root, UNKNOWN)

    def _forget_if_new_processes(self) -> None:
        if self._next_pid_at is None:
            return
        gpa, size = self._next_pid_at
        next_pid = int.from_bytes(self.memory.read(gpa, size), "little")
        if next_pid != self._next_pid:
            self.forget_processes()
            self._next_pid = next_pid

    def forget_processes(self) -> None:
        self._by_cr3 = {}
        self._writers = {}

    # --- what wrote -----------------------------------------------------------------------------------
    def writer(self, next_rip: int, cr3: int, size: int) -> tuple[int | None, str | None]:
        """The address and text of the instruction that made a `size`-byte write and ended at `next_rip`.

        KVM completes an emulated MMIO write before it exits, so RIP already points past the writing instruction.
        Kernel code is decoded forward from the start of its function (the profile's symbols): exact. Elsewhere
        the candidates are the decodings that end exactly at `next_rip` with a memory operand of the write's
        size; the longest one is taken.
        """
        key = (0 if next_rip >= KERNEL_HALF else page_table_root(cr3), next_rip, size)
        known = self._writers.get(key)
        if known is not None:
            return known
        found = self._forward_from_function(next_rip, cr3)
        if found is None:
            found = self._backward(next_rip, cr3, size)
        result: tuple[int | None, str | None] = found if found is not None else (None, None)
        if len(self._writers) >= WRITER_CACHE:
            self._writers.clear()
        self._writers[key] = result
        return result

    def _forward_from_function(self, next_rip: int, cr3: int) -> tuple[int, str] | None:
        if self.kernel is None or next_rip < KERNEL_HALF:
            return None
        function = self.kernel.profile.function_at(next_rip - 1)
        if function is None or next_rip - function.address > MAX_FUNCTION_BYTES:
            return None
        code = self.code_at(function.address, next_rip - function.address, cr3)
        for instruction in self._disassembler.disasm(code, function.address):
            if instruction.address + instruction.size == next_rip:
                return instruction.address, _text(instruction)
        return None

    def _backward(self, next_rip: int, cr3: int, size: int) -> tuple[int, str] | None:
        start = next_rip - MAX_INSTRUCTION_BYTES
        code = self.code_at(start, MAX_INSTRUCTION_BYTES, cr3)
        if len(code) < MAX_INSTRUCTION_BYTES:
            return None
        width = _WIDTHS.get(size, "")
        fallback: tuple[int, str] | None = None
        for offset in range(MAX_INSTRUCTION_BYTES):  # the longest decoding first
            for instruction in self._disassembler.disasm(code[offset:], start + offset, 1):
                if instruction.address + instruction.size != next_rip or "ptr [" not in instruction.op_str:
                    continue
                if f"{width} ptr [" in instruction.op_str:
                    return instruction.address, _text(instruction)
                fallback = fallback or (instruction.address, _text(instruction))
        return fallback

    def code_at(self, address: int, length: int, cr3: int) -> bytes:
        """Up to `length` bytes of code at a virtual address; fewer when a page on the way is not mapped."""
        code = b""
        while len(code) < length:
            try:
                translation = walk(self.memory.read_u64, page_table_root(cr3), address)
                chunk = min(length - len(code), translation.page_size - address % translation.page_size)
                code += self.memory.read(translation.physical_address, chunk)
            except GuestMemoryError:
                break
            address += chunk
        return code


_WIDTHS = {1: "byte", 2: "word", 4: "dword", 8: "qword", 16: "xmmword"}


def _text(instruction: Any) -> str:
    return f"{instruction.mnemonic} {instruction.op_str}".strip()
