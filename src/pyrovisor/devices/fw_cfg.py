"""QEMU's firmware configuration device (fw_cfg): the legacy I/O ports and the DMA interface."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

from pyrovisor.errors import GuestMemoryError

FW_CFG_PORT = 0x510  # selector (16-bit) at 0x510, data (8-bit) at 0x511, DMA address (big-endian) at 0x514
FW_CFG_PORTS = 12
SELECTOR_OFFSET = 0
DATA_OFFSET = 1
DMA_OFFSET = 4
DMA_REGISTER_SIZE = 8
DMA_SIGNATURE = b"QEMU CFG"  # what reading the DMA address register returns

KEY_SIGNATURE = 0x0000
KEY_ID = 0x0001
KEY_UUID = 0x0002
KEY_RAM_SIZE = 0x0003
KEY_NB_CPUS = 0x0005
KEY_MAX_CPUS = 0x000F
KEY_FILE_DIR = 0x0019
FIRST_FILE_KEY = 0x0020
KEY_WRITE = 0x4000  # the "write" bit of a selector: this device's items are read-only
FEATURE_TRADITIONAL = 1 << 0
FEATURE_DMA = 1 << 1
FILE_NAME_SIZE = 56

DMA_ERROR = 1 << 0
DMA_READ = 1 << 1
DMA_SKIP = 1 << 2
DMA_SELECT = 1 << 3
DMA_WRITE = 1 << 4
DMA_ACCESS_SIZE = 16  # be32 control, be32 length, be64 address
ZERO_CHUNK = 1 << 20


@dataclass(frozen=True)
class FwCfgItem:
    key: int
    data: bytes
    name: str = ""  # a file's name in the directory; unnamed items are the fixed keys


@dataclass(frozen=True)
class FwCfgState:
    items: tuple[FwCfgItem, ...] = ()
    selector: int = 0
    offset: int = 0
    dma_address: bytes = bytes(DMA_REGISTER_SIZE)  # as the guest wrote it, big-endian


@dataclass(frozen=True)
class FwCfgArgs:
    read_memory: Callable[[int, int], bytes]
    write_memory: Callable[[int, bytes], None]


def fw_cfg_items(vcpus: int, ram_size: int, e820: tuple[tuple[int, int, int], ...]) -> tuple[FwCfgItem, ...]:
    """The items a guest asks about: signature, features, UUID, RAM size, CPU counts, and the file directory
    with `etc/e820` (base, length, type of each RAM range)."""
    files = [("etc/e820", b"".join(struct.pack("<QQI", base, length, kind) for base, length, kind in e820))]
    items = [FwCfgItem(KEY_SIGNATURE, b"QEMU"),
             FwCfgItem(KEY_ID, struct.pack("<I", FEATURE_TRADITIONAL | FEATURE_DMA)),
             FwCfgItem(KEY_UUID, bytes(16)),
             FwCfgItem(KEY_RAM_SIZE, struct.pack("<Q", ram_size)),
             FwCfgItem(KEY_NB_CPUS, struct.pack("<H", vcpus)),
             FwCfgItem(KEY_MAX_CPUS, struct.pack("<H", vcpus))]
    directory = struct.pack(">I", len(files))
    for index, (name, data) in enumerate(files):
        key = FIRST_FILE_KEY + index
        directory += struct.pack(">IHH56s", len(data), key, 0, name.encode())
        items.append(FwCfgItem(key, data, name))
    items.append(FwCfgItem(KEY_FILE_DIR, directory))
    return tuple(items)


class FwCfg:
    """Select an item, then read it byte by byte from the data port or in bulk by DMA into guest memory.

    Unknown items read as empty (zeros past the end, like QEMU); writes to items are refused.
    """

    def __init__(self, args: FwCfgArgs, state: FwCfgState) -> None:
        self._args = args
        self._items = {item.key: item.data for item in state.items}
        self._state = state

    def save(self) -> FwCfgState:
        return self._state

    @classmethod
    def restore(cls, args: FwCfgArgs, state: FwCfgState) -> FwCfg:
        return cls(args, state)

    def read(self, offset: int, size: int) -> int:
        if offset == DATA_OFFSET:
            return int.from_bytes(self._take(size), "little")
        if offset >= DMA_OFFSET and offset + size <= DMA_OFFSET + DMA_REGISTER_SIZE:
            start = offset - DMA_OFFSET
            return int.from_bytes(DMA_SIGNATURE[start:start + size], "little")
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == SELECTOR_OFFSET:
            self._select(value & 0xFFFF)
        elif offset >= DMA_OFFSET and offset + size <= DMA_OFFSET + DMA_REGISTER_SIZE:
            start = offset - DMA_OFFSET
            register = bytearray(self._state.dma_address)
            register[start:start + size] = value.to_bytes(size, "little")  # port order: the big-endian bytes
            self._state = replace(self._state, dma_address=bytes(register))
            if start + size == DMA_REGISTER_SIZE:  # the low half completes the address and starts the transfer
                self._dma(int.from_bytes(register, "big"))
                self._state = replace(self._state, dma_address=bytes(DMA_REGISTER_SIZE))

    def _select(self, key: int) -> None:
        self._state = replace(self._state, selector=key & ~KEY_WRITE, offset=0)

    def _take(self, length: int) -> bytes:
        """`length` bytes of the selected item from the current offset (zeros past its end), advancing."""
        chunk = self._advance(length)
        return chunk + bytes(length - len(chunk))

    def _advance(self, length: int) -> bytes:
        """Move `length` bytes on; what the selected item has of them (the rest reads as zeros)."""
        data = self._items.get(self._state.selector, b"")
        offset = self._state.offset
        self._state = replace(self._state, offset=min(offset + length, 1 << 32))
        return data[offset:offset + length]

    def _dma(self, address: int) -> None:
        read, write = self._args.read_memory, self._args.write_memory
        try:
            control, length, target = struct.unpack(">IIQ", read(address, DMA_ACCESS_SIZE))
        except GuestMemoryError:
            return  # nowhere to report the error
        status = 0
        if control & DMA_SELECT:
            self._select(control >> 16)
        try:
            if control & DMA_WRITE:
                status = DMA_ERROR
            elif control & DMA_READ:
                chunk = self._advance(length)
                write(target, chunk)
                for start in range(len(chunk), length, ZERO_CHUNK):  # zeros past the item, without a huge buffer
                    write(target + start, bytes(min(ZERO_CHUNK, length - start)))
            elif control & DMA_SKIP:
                self._advance(length)
        except GuestMemoryError:
            status = DMA_ERROR
        write(address, struct.pack(">I", status))
