"""Flip injection through the read/write protocol, and what an ECC-protected memory then reports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrovisor.lab import ecc
from pyrovisor.lab.bitflips import (
    BitFlip,
    BufferMemory,
    EccMemory,
    MachineCheck,
    flips_from_positions,
    inject,
    random_flips,
)


def test_inject_flips_exactly_the_requested_bits() -> None:
    buffer = bytearray(16)
    applied = inject(BufferMemory(buffer), [BitFlip(0, 0), BitFlip(5, 7), BitFlip(5, 1)])
    assert buffer == bytearray([1, 0, 0, 0, 0, 0x82] + [0] * 10)
    assert [(a.before, a.after) for a in applied] == [(0, 1), (0, 0x80), (0x80, 0x82)]


@given(st.binary(min_size=1, max_size=64), st.data())
def test_injecting_twice_restores_the_buffer(original: bytes, data: st.DataObject) -> None:
    count = data.draw(st.integers(min_value=0, max_value=len(original) * 8))
    flips = random_flips(len(original), count, seed=data.draw(st.integers(0, 1000)))
    buffer = bytearray(original)
    inject(BufferMemory(buffer), flips)
    changed = sum((a ^ b).bit_count() for a, b in zip(buffer, original, strict=True))
    assert changed == count
    inject(BufferMemory(buffer), flips)
    assert bytes(buffer) == original


def test_buffer_bounds_are_checked() -> None:
    with pytest.raises(IndexError):
        BufferMemory(bytearray(4)).read(2, 4)
    with pytest.raises(ValueError):
        BitFlip(0, 8)


def test_guest_memory_satisfies_the_protocol() -> None:
    from pyrovisor.memory import GuestMemory, MemoryRegion

    memory = GuestMemory([MemoryRegion.anonymous(0, 1 << 16)])
    try:
        memory.write(0x1000, b"\x0f")
        inject(memory, [BitFlip(0x1000, 7)])
        assert memory.read(0x1000, 1) == b"\x8f"
    finally:
        memory.close()


def _ecc_memory(size: int = 64, code: ecc.SecdedCode = ecc.HAMMING) -> tuple[bytearray, EccMemory]:
    buffer = bytearray(range(size))
    return buffer, EccMemory(BufferMemory(buffer), size, code)


def test_single_flip_is_corrected_and_scrubbed() -> None:
    buffer, memory = _ecc_memory()
    memory.inject_data_flip(BitFlip(10, 3))
    assert buffer[10] == 10 ^ 8
    assert memory.read(8, 8) == bytes(range(8, 16))
    assert buffer[10] == 10  # scrubbed
    assert memory.log.corrected == 1


def test_check_bit_flip_is_corrected() -> None:
    _, memory = _ecc_memory()
    memory.inject_check_flip(16, 5)
    assert memory.read(16, 8) == bytes(range(16, 24))
    assert memory.log.corrected == 1


def test_double_flip_raises_a_machine_check() -> None:
    _, memory = _ecc_memory()
    for flip in flips_from_positions(24, [1, 40]):
        memory.inject_data_flip(flip)
    with pytest.raises(MachineCheck) as raised:
        memory.read(24, 8)
    assert raised.value.address == 24
    assert memory.log.uncorrected == 1
    assert memory.read(0, 24) == bytes(range(24))  # other words are fine


def test_triple_flip_can_be_silently_miscorrected() -> None:
    _, memory = _ecc_memory()
    memory.inject_codeword_flips(32, [3, 5, 6])  # syndrome 0, odd weight: the decoder "fixes" bit 0
    data = memory.read(32, 8)
    assert data != bytes(range(32, 40))
    assert memory.log.corrected == 1 and memory.log.uncorrected == 0


def test_writes_keep_check_bits_current() -> None:
    _, memory = _ecc_memory()
    memory.write(3, b"\xff\xfe\xfd\xfc\xfb\xfa\xf9")
    memory.inject_data_flip(BitFlip(4, 0))
    assert memory.read(0, 16) == bytes([0, 1, 2, 0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0xFA, 0xF9]) + bytes(range(10, 16))


@pytest.mark.parametrize("code", [ecc.HAMMING, ecc.HSIAO], ids=lambda c: c.key)
def test_every_single_codeword_flip_is_corrected_under_either_code(code: ecc.SecdedCode) -> None:
    for position in range(ecc.CODEWORD_BITS):
        buffer, memory = _ecc_memory(16, code)
        memory.inject_codeword_flips(8, [position])
        assert memory.read(0, 16) == bytes(range(16)), position
        assert memory.log.corrected == 1 and buffer == bytearray(range(16))


def test_hsiao_memory_detects_a_double_flip_and_miscorrects_a_triple() -> None:
    _, memory = _ecc_memory(code=ecc.HSIAO)
    memory.inject_codeword_flips(24, [1, 70])  # a data cell and a check cell
    with pytest.raises(MachineCheck):
        memory.read(24, 8)
    memory.inject_codeword_flips(40, [0, 1, 2])  # their columns XOR to check bit 0's: see test_ecc
    assert memory.read(40, 8) != bytes(range(40, 48))
    assert (memory.log.corrected, memory.log.uncorrected) == (1, 1)


def test_codeword_positions_outside_a_word_are_refused() -> None:
    _, memory = _ecc_memory()
    with pytest.raises(ValueError):
        memory.inject_codeword_flips(0, [72])
