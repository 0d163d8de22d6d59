"""Bit-flip injection into anything with `read(address, size)` / `write(address, data)`, with or without ECC.

The same two calls are what pyrovisor's guest memory offers (`GuestMemory.read(gpa, size)`,
`GuestMemory.write(gpa, data)`), so a flip pattern computed by the Rowhammer model can be applied to a
plain `bytearray` here and to a live guest's RAM later without change.

`EccMemory` wraps such a memory with a SECDED (72,64) check byte per aligned 8-byte word (see `ecc.py`;
the extended Hamming code by default, or `ecc.HSIAO`): writes encode, reads decode. Flips injected "under" it (in the data or in the check bits, as a DRAM
disturbance would) are corrected on read and scrubbed back, or raise `MachineCheck` when detected but not
correctable, or come back silently wrong when the code miscorrects: exactly what a guest would see.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pyrovisor.lab import ecc

WORD_BYTES = 8


class Memory(Protocol):
    """Byte-addressed memory: a guest's RAM by guest-physical address, or a plain buffer by offset."""

    def read(self, address: int, size: int, /) -> bytes: ...

    def write(self, address: int, data: bytes, /) -> None: ...


class BufferMemory:
    """A `bytearray` seen through the `Memory` protocol (address = offset)."""

    def __init__(self, buffer: bytearray) -> None:
        self.buffer = buffer

    def _check(self, address: int, size: int) -> None:
        if address < 0 or size < 0 or address + size > len(self.buffer):
            raise IndexError(f"access at {address:#x} (+{size}) is outside a {len(self.buffer)}-byte buffer")

    def read(self, address: int, size: int, /) -> bytes:
        self._check(address, size)
        return bytes(self.buffer[address:address + size])

    def write(self, address: int, data: bytes, /) -> None:
        self._check(address, len(data))
        self.buffer[address:address + len(data)] = data


@dataclass(frozen=True)
class BitFlip:
    """One bit to invert: byte `address`, bit `bit` (0 = least significant)."""

    address: int
    bit: int

    def __post_init__(self) -> None:
        if self.address < 0 or not 0 <= self.bit < 8:
            raise ValueError(f"no such bit: address {self.address:#x}, bit {self.bit}")


@dataclass(frozen=True)
class AppliedFlip:
    """A flip as applied: the byte before and after."""

    flip: BitFlip
    before: int
    after: int


def inject(memory: Memory, flips: Iterable[BitFlip]) -> list[AppliedFlip]:
    """Invert each bit in `memory` (read-modify-write of one byte per flip) and report what changed."""
    applied = []
    for flip in flips:
        before = memory.read(flip.address, 1)[0]
        after = before ^ (1 << flip.bit)
        memory.write(flip.address, bytes([after]))
        applied.append(AppliedFlip(flip, before, after))
    return applied


def random_flips(size: int, count: int, seed: int = 0, base: int = 0) -> list[BitFlip]:
    """`count` distinct random bit positions in [base, base + size) bytes."""
    if count > size * 8:
        raise ValueError(f"cannot choose {count} distinct bits from {size} bytes")
    rng = np.random.default_rng(seed)
    bits = rng.choice(size * 8, size=count, replace=False)
    return [BitFlip(base + int(b) // 8, int(b) % 8) for b in sorted(bits)]


def flips_from_positions(word_address: int, positions: Sequence[int]) -> list[BitFlip]:
    """The byte/bit flips for data-bit positions (0..63) of the little-endian 64-bit word at `word_address`."""
    return [BitFlip(word_address + p // 8, p % 8) for p in positions if 0 <= p < ecc.WORD_BITS]


class MachineCheck(Exception):
    """An uncorrectable memory error: what a machine-check exception reports to the OS (or kills the VM)."""

    def __init__(self, address: int, syndrome: int) -> None:
        self.address = address
        self.syndrome = syndrome
        super().__init__(f"uncorrectable ECC error in the word at {address:#x} (syndrome {syndrome:#04x})")


@dataclass
class EccLog:
    """Counters a memory controller keeps (as exposed by EDAC on Linux)."""

    corrected: int = 0
    uncorrected: int = 0


class EccMemory:
    """`Memory` with SECDED check bits per aligned 8-byte word, kept beside the data (as on a 72-bit DIMM).

    `inject_data_flip` and `inject_check_flip` disturb stored cells without updating the check bits;
    `read` decodes, corrects (and scrubs) single errors, raises `MachineCheck` on detected double errors.
    `code` is the SECDED code of the memory controller: `ecc.HAMMING` (default) or `ecc.HSIAO`.
    """

    def __init__(self, backing: Memory, size: int, code: ecc.SecdedCode = ecc.HAMMING) -> None:
        if size % WORD_BYTES:
            raise ValueError(f"ECC memory size must be a multiple of {WORD_BYTES} bytes")
        self.backing = backing
        self.size = size
        self.code = code
        self.log = EccLog()
        self._check_mask = sum(1 << p for p in code.check_positions)
        self._data_bit_of_position = {position: bit for bit, position in enumerate(code.data_positions)}
        self._check_index_of_position = {position: index for index, position in enumerate(code.check_positions)}
        self._check_bytes = bytearray(size // WORD_BYTES)
        for word in range(size // WORD_BYTES):
            self._check_bytes[word] = self._check_byte(self._load(word * WORD_BYTES))

    def _load(self, address: int) -> int:
        return int.from_bytes(self.backing.read(address, WORD_BYTES), "little")

    def _check_byte(self, data: int) -> int:
        """The 8 check bits of `data`'s codeword packed into a byte (bit i = check position i of the code)."""
        codeword = self.code.encode(data)
        return sum(((codeword >> position) & 1) << index for index, position in enumerate(self.code.check_positions))

    def _spread_check_byte(self, check: int) -> int:
        return sum(((check >> index) & 1) << position for index, position in enumerate(self.code.check_positions))

    def _codeword(self, address: int) -> int:
        codeword = self.code.encode(self._load(address))
        stored_check = self._spread_check_byte(self._check_bytes[address // WORD_BYTES])
        return (codeword & ~self._check_mask) | stored_check

    def read(self, address: int, size: int, /) -> bytes:
        out = bytearray()
        first = address - address % WORD_BYTES
        for word_address in range(first, address + size, WORD_BYTES):
            decoded = self.code.decode(self._codeword(word_address))
            if decoded.data is None:
                self.log.uncorrected += 1
                raise MachineCheck(word_address, decoded.syndrome)
            if decoded.corrected_position is not None:
                self.log.corrected += 1
                self._store(word_address, decoded.data)
            out += decoded.data.to_bytes(WORD_BYTES, "little")
        offset = address - first
        return bytes(out[offset:offset + size])

    def write(self, address: int, data: bytes, /) -> None:
        self.backing.write(address, data)
        first = address - address % WORD_BYTES
        for word_address in range(first, address + len(data), WORD_BYTES):
            self._check_bytes[word_address // WORD_BYTES] = self._check_byte(self._load(word_address))

    def _store(self, address: int, data: int) -> None:
        self.backing.write(address, data.to_bytes(WORD_BYTES, "little"))
        self._check_bytes[address // WORD_BYTES] = self._check_byte(data)

    def inject_data_flip(self, flip: BitFlip) -> AppliedFlip:
        """Flip a stored data bit behind the ECC's back (a disturbance error in a data cell)."""
        return inject(self.backing, [flip])[0]

    def inject_check_flip(self, word_address: int, check_bit: int) -> None:
        """Flip one of the 8 stored check bits of the word at `word_address` (in the order of
        `code.check_positions`; for the Hamming layout 0 is the overall parity bit)."""
        if not 0 <= check_bit < 8:
            raise ValueError("a word has 8 check bits (0..7)")
        self._check_bytes[word_address // WORD_BYTES] ^= 1 << check_bit

    def inject_codeword_flips(self, word_address: int, positions: Sequence[int]) -> None:
        """Flip codeword positions (0..71, as the code numbers them) of one word: data cells or check cells."""
        data_flips = []
        for position in positions:
            if position in self._data_bit_of_position:
                data_flips.append(self._data_bit_of_position[position])
            elif position in self._check_index_of_position:
                self.inject_check_flip(word_address, self._check_index_of_position[position])
            else:
                raise ValueError(f"bit position {position} is outside a 72-bit codeword")
        inject(self.backing, flips_from_positions(word_address, data_flips))
