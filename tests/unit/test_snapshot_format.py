"""The state file format and the state codec, without KVM: round trips and every kind of damage."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from enum import Enum
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrovisor.arch.x86_64.cpuid import CpuidEntry
from pyrovisor.arch.x86_64.layout import RamRange
from pyrovisor.config import MachineConfig
from pyrovisor.devices.debug_exit import DebugExitState
from pyrovisor.devices.serial import SerialState
from pyrovisor.errors import StateError
from pyrovisor.loader import LoadedSegment, LoadResult
from pyrovisor.persist.codec import decode, encode
from pyrovisor.persist.device import DeviceRecord
from pyrovisor.persist.machine import MachineState
from pyrovisor.snapshot.file_format import FORMAT_VERSION, HEADER, MAX_PAYLOAD, dump_state, load_state
from pyrovisor.snapshot.state import MemoryImage, MemoryRange, SnapshotState
from pyrovisor.vstate.vcpu_state import VcpuState
from pyrovisor.vstate.vm_state import VmState


def sample_state() -> SnapshotState:
    vcpu = VcpuState(index=0, cpuid=(CpuidEntry(1, 0, 0, 2, 3, 4, 5),), regs=b"\x01" * 144, sregs=bytes(312),
                     fpu=bytes(416), xsave=bytes(4096), xcrs=bytes(392), msrs=((0x10, 1 << 40), (0xC0000080, 0xD01)),
                     lapic=bytes(1024), events=bytes(64), mp_state=0, debugregs=bytes(128))
    machine = MachineState(
        config=MachineConfig(kernel=Path("/guests/ticker.elf"), cmdline="ticks=3"),
        kernel=LoadResult("/guests/ticker.elf", 0x100000, None, (LoadedSegment(0x100000, 0x100000, 10, 20, 5),),
                          0x100000, 0x101000),
        ram=(RamRange(0, 64 << 20),), vm=VmState(irqchips=(bytes(520),) * 3, clock=bytes(48)), vcpus=(vcpu,),
        devices=(DeviceRecord("serial0", "uart16550", (0x3F8, 8), None, 4, encode(SerialState(rx_fifo=b"ab"))),
                 DeviceRecord("debug-exit", "debug-exit", (0xF4, 4), None, None, encode(DebugExitState(None)))),
    )
    return SnapshotState(snapshot_id="abc", created="2026-11-22T00:00:00+00:00", pyrovisor_version="0.1.0",
                         machine=machine,
                         memory=MemoryImage("full", "memory.img", 64 << 20, "00" * 32, (MemoryRange(0, 64 << 20, 0),)))


def test_round_trip_is_exact() -> None:
    state = sample_state()
    assert load_state(dump_state(state), "test") == state


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_single_byte_change_is_detected(data: st.DataObject) -> None:
    blob = bytearray(dump_state(sample_state()))
    position = data.draw(st.integers(0, len(blob) - 1))
    blob[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(StateError):
        load_state(bytes(blob), "test")


@given(st.integers(0, 2000))
def test_any_truncation_is_detected(cut: int) -> None:
    blob = dump_state(sample_state())
    with pytest.raises(StateError, match="truncated"):
        load_state(blob[:max(0, len(blob) - 1 - cut)], "test")


def test_trailing_bytes_and_bad_magic_are_refused() -> None:
    blob = dump_state(sample_state())
    with pytest.raises(StateError, match="unexpected bytes"):
        load_state(blob + b"x", "test")
    with pytest.raises(StateError, match="bad magic"):
        load_state(b"NOTASNAP" + blob[8:], "test")


def _rewrap(payload: bytes, version: int = FORMAT_VERSION) -> bytes:
    header = HEADER.pack(b"PYRVSNAP", version, 0, 0, len(payload), 0)
    return header + payload + hashlib.sha256(header + payload).digest()


def test_valid_checksum_but_bad_content_is_refused() -> None:
    with pytest.raises(StateError, match="not valid JSON"):
        load_state(_rewrap(b"{not json"), "test")
    with pytest.raises(StateError, match="not a pyrovisor-machine-state"):
        load_state(_rewrap(b'{"kind": "other", "state": {}}'), "test")
    with pytest.raises(StateError, match="format version 7"):
        load_state(_rewrap(b"{}", version=7), "test")
    document = dump_state(sample_state())[HEADER.size:-32].replace(b'"mp_state":0', b'"mp_state":"zero"')
    with pytest.raises(StateError, match=r"mp_state: expected an integer"):
        load_state(_rewrap(document), "test")
    document = dump_state(sample_state())[HEADER.size:-32].replace(b'"mp_state":0', b'"mp_state":0,"extra":1')
    with pytest.raises(StateError, match="unknown field"):
        load_state(_rewrap(document), "test")


def test_declared_length_over_the_cap_is_refused() -> None:
    blob = bytearray(dump_state(sample_state()))
    struct.pack_into("<Q", blob, 16, MAX_PAYLOAD + 1)
    with pytest.raises(StateError, match="cap"):
        load_state(bytes(blob), "test")


class Colour(Enum):
    RED = "red"


@dataclasses.dataclass(frozen=True)
class Inner:
    data: bytes
    maybe: int | None = None


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str
    colour: Colour
    pairs: tuple[tuple[int, int], ...]
    inner: Inner
    mapping: dict[str, str]
    ratio: float = 0.5


def test_codec_handles_nested_types_and_rejects_mismatches() -> None:
    value = Outer("x", Colour.RED, ((1, 2),), Inner(b"\x00\xff", 3), {"a": "b"})
    assert decode(Outer, encode(value)) == value
    encoded = encode(value)
    with pytest.raises(StateError, match="colour"):
        decode(Outer, {**encoded, "colour": "blue"})
    with pytest.raises(StateError, match="missing field name"):
        decode(Outer, {key: item for key, item in encoded.items() if key != "name"})
    with pytest.raises(StateError, match="invalid base64"):
        decode(Outer, {**encoded, "inner": {"data": {"base64": "!!"}}})
    with pytest.raises(StateError, match=r"pairs\[0\]"):
        decode(Outer, {**encoded, "pairs": [[1, 2, 3]]})
    with pytest.raises(StateError, match="expected an integer, found bool"):
        decode(Outer, {**encoded, "inner": {"data": {"base64": ""}, "maybe": True}})
    assert decode(Outer, {key: item for key, item in encoded.items() if key != "ratio"}).ratio == 0.5
