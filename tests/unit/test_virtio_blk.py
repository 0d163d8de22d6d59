"""virtio-blk on a real file, driven through its queue like a guest driver: data round trips byte-exact,
read-only disks refuse writes, bad requests get IOERR or break only the device."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from virtio_driver import DriverQueue, MiB

from pyrovisor.devices.virtio.blk import (
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    BlockOptions,
    VirtioBlk,
)
from pyrovisor.devices.virtio.queue import QueueError, QueueState, SplitQueue
from pyrovisor.errors import DeviceError
from pyrovisor.memory import GuestMemory, MemoryRegion

RING = 0x10000
HEADER_AT, DATA_AT, STATUS_AT = 0x20000, 0x30000, 0x2F000
DISK_BYTES = 1 * MiB


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory([MemoryRegion.anonymous(0, 4 * MiB, huge_pages=False)])
    yield memory
    memory.close()


def disk(tmp_path: Path, content: bytes | None = None) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(content if content is not None else os.urandom(DISK_BYTES))
    return path


def attach(memory: GuestMemory, device: VirtioBlk) -> DriverQueue:
    driver = DriverQueue(memory, RING, 16)
    queue = SplitQueue(memory, 256, QueueState(size=16, ready=True, desc=driver.desc, avail=driver.avail,
                                               used=driver.used))
    queue.activate()
    device.activate([queue], 0)
    return driver


def request(memory: GuestMemory, driver: DriverQueue, device: VirtioBlk, kind: int, sector: int,
            data: list[tuple[int, int]], write: bool) -> tuple[int, int]:
    """Submit one request; returns (status, bytes the device reported writing)."""
    memory.write(HEADER_AT, struct.pack("<IIQ", kind, 0, sector))
    memory.write_u8(STATUS_AT, 0xEE)
    readable = [(HEADER_AT, 16), *([] if write else data)]
    writable = [*(data if write else []), (STATUS_AT, 1)]
    driver.add_chain(readable, writable)
    device.process(0)
    (_, written), = driver.used_entries()
    return memory.read_u8(STATUS_AT), written


def test_reads_and_writes_round_trip_byte_exact(tmp_path: Path, memory: GuestMemory) -> None:
    path = disk(tmp_path)
    original = path.read_bytes()
    device = VirtioBlk(BlockOptions(path))
    driver = attach(memory, device)
    try:
        assert struct.unpack_from("<Q", device.config())[0] == DISK_BYTES // 512
        status, written = request(memory, driver, device, T_IN, 8, [(DATA_AT, 4096), (DATA_AT + 8192, 512)], True)
        assert (status, written) == (S_OK, 4096 + 512 + 1)
        assert memory.read(DATA_AT, 4096) + memory.read(DATA_AT + 8192, 512) == original[4096:4096 + 4608]
        payload = os.urandom(8192)
        memory.write(DATA_AT, payload)
        assert request(memory, driver, device, T_OUT, 100, [(DATA_AT, 8192)], False) == (S_OK, 1)
        assert request(memory, driver, device, T_FLUSH, 0, [], False)[0] == S_OK
        assert path.read_bytes()[100 * 512:100 * 512 + 8192] == payload
        status, written = request(memory, driver, device, T_GET_ID, 0, [(DATA_AT, 20)], True)
        assert status == S_OK and memory.read(DATA_AT, 20).rstrip(b"\0") == b"disk.img"
        assert device.stats.reads == 1 and device.stats.writes == 1 and device.stats.flushes == 1
    finally:
        device.close()


def test_read_only_out_of_range_and_unknown_requests_get_errors(tmp_path: Path, memory: GuestMemory) -> None:
    path = disk(tmp_path)
    before = path.read_bytes()
    device = VirtioBlk(BlockOptions(path, read_only=True, serial="x" * 30))
    driver = attach(memory, device)
    try:
        assert device.features & (1 << 5), "VIRTIO_BLK_F_RO is offered"
        assert request(memory, driver, device, T_OUT, 0, [(DATA_AT, 512)], False)[0] == S_IOERR
        assert request(memory, driver, device, T_IN, DISK_BYTES // 512, [(DATA_AT, 512)], True)[0] == S_IOERR
        assert request(memory, driver, device, T_IN, 0, [(DATA_AT, 100)], True)[0] == S_IOERR, "not whole sectors"
        assert request(memory, driver, device, 77, 0, [], False)[0] == S_UNSUPP
        request(memory, driver, device, T_GET_ID, 0, [(DATA_AT, 20)], True)
        assert memory.read(DATA_AT, 20) == b"x" * 20, "the serial is cut to 20 bytes"
        assert path.read_bytes() == before and device.stats.errors == 4
    finally:
        device.close()


def test_a_request_without_status_or_header_breaks_the_queue(tmp_path: Path, memory: GuestMemory) -> None:
    device = VirtioBlk(BlockOptions(disk(tmp_path)))
    driver = attach(memory, device)
    try:
        driver.add_chain([(HEADER_AT, 16)], [])
        with pytest.raises(QueueError, match="without a status byte"):
            device.process(0)
        driver.add_chain([(HEADER_AT, 8)], [(STATUS_AT, 1)])
        with pytest.raises(QueueError, match="header of 8 bytes"):
            device.process(0)
        # Three descriptors, the usual count, all on one side: refused, not a crash of the fast path.
        driver.add_chain([], [(DATA_AT, 16), (DATA_AT + 4096, 512), (STATUS_AT, 1)])
        with pytest.raises(QueueError, match="header of 0 bytes"):
            device.process(0)
        driver.add_chain([(HEADER_AT, 16), (DATA_AT, 512), (DATA_AT + 4096, 1)], [])
        with pytest.raises(QueueError, match="without a status byte"):
            device.process(0)
    finally:
        device.close()


def test_bad_disks_are_refused_with_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="No such file"):
        VirtioBlk(BlockOptions(tmp_path / "missing.img"))
    with pytest.raises(DeviceError, match="not a regular file or a block device"):
        os.mkfifo(tmp_path / "fifo")
        VirtioBlk(BlockOptions(tmp_path / "fifo"))
    with pytest.raises(DeviceError, match="Is a directory"):
        VirtioBlk(BlockOptions(tmp_path))


LENGTHS = st.sampled_from([0, 1, 8, 16, 17, 512, 4096, 4097])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(readable=st.lists(LENGTHS, max_size=4), writable=st.lists(LENGTHS, max_size=4),
       kind=st.sampled_from([T_IN, T_OUT, 4, 8, 99]), sector=st.sampled_from([0, 8, DISK_BYTES // 512 - 1, 1 << 40]),
       read_only=st.booleans())
def test_any_request_shape_is_served_or_refused(tmp_path: Path, memory: GuestMemory, readable: list[int],
                                                writable: list[int], kind: int, sector: int, read_only: bool) -> None:
    """Whatever the driver puts in a chain, the device answers it (status OK, IOERR or UNSUPP) or refuses it
    with QueueError: no other exception (the fast path for the usual shape included)."""
    assume(readable or writable)  # a chain has at least one descriptor
    device = VirtioBlk(BlockOptions(disk(tmp_path), read_only=read_only))
    driver = attach(memory, device)
    try:
        memory.write(HEADER_AT, struct.pack("<IIQ", kind, 0, sector))
        places = iter(range(HEADER_AT, HEADER_AT + 0x10000, 0x2000))
        driver.add_chain([(next(places), n) for n in readable], [(next(places), n) for n in writable])
        try:
            device.process(0)
        except QueueError:
            return
        (_, written), = driver.used_entries()
        assert written <= sum(writable)
    finally:
        device.close()
