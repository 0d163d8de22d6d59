"""virtio-balloon driven like a guest driver, without KVM: inflated and reported pages leave the host's RSS and
read back as zero, bad PFNs are counted, statistics round trip, the target reaches the driver, state survives."""

from __future__ import annotations

import ctypes
import random
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

import pytest
from virtio_driver import DriverQueue, MiB

from pyrovisor.api.balloon_routes import BalloonRoutes, add_balloon_routes, describe_balloon
from pyrovisor.api.cli import build_parser
from pyrovisor.api.server import ApiError, Routes
from pyrovisor.config import BalloonConfig
from pyrovisor.devices.base import InterruptLine
from pyrovisor.devices.manager import DeviceContext, Placement
from pyrovisor.devices.platform import KINDS
from pyrovisor.devices.virtio import balloon as balloon_module
from pyrovisor.devices.virtio import mmio
from pyrovisor.devices.virtio.balloon import (
    BALLOON_NAME,
    F_DEFLATE_ON_OOM,
    F_PAGE_REPORTING,
    F_STATS_VQ,
    BalloonStats,
    VirtioBalloon,
    VirtioBalloonState,
    find_balloon,
)
from pyrovisor.devices.virtio.device import F_VERSION_1
from pyrovisor.devices.virtio.mmio import TransportState, VirtioMmio
from pyrovisor.devices.virtio.queue import QueueState, SplitQueue
from pyrovisor.errors import DeviceError
from pyrovisor.events.eventfd import EventFd
from pyrovisor.events.loop import EventLoop
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.persist.codec import decode, encode
from pyrovisor.persist.json_document import dump_json, parse_json

RAM = 16 * MiB
RINGS = (0x10000, 0x14000, 0x18000, 0x1C000)  # inflate, deflate, stats, reporting
ARRAYS = 0x40000  # PFN arrays and statistics buffers
DATA = 4 * MiB  # the pages the tests balloon
PAGE = 4096
ALL_FEATURES = (1 << F_STATS_VQ) | (1 << F_PAGE_REPORTING) | (1 << F_DEFLATE_ON_OOM)
STAT = struct.Struct("<HQ")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int


def resident_pages(memory: GuestMemory, gpa: int, size: int) -> int:
    """Host pages of [gpa, gpa+size) that are resident (mincore(2) on the mapping)."""
    region = memory.region_of(gpa)
    vector = ctypes.create_string_buffer(size // PAGE)
    assert _libc.mincore(region.host_address + gpa - region.gpa, size, vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector.raw)


_queues: list[SplitQueue] = []


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory([MemoryRegion.anonymous(0, RAM, huge_pages=False)])
    yield memory
    while _queues:  # their views of the rings, before the memory is unmapped
        _queues.pop().release()
    memory.close()


@dataclass
class Driver:
    """The driver's side: one DriverQueue per queue the device numbers for the negotiated features."""

    memory: GuestMemory
    device: VirtioBalloon
    queues: list[DriverQueue]
    next_array: int = ARRAYS

    def buffer(self, data: bytes) -> int:
        address = self.next_array
        self.memory.write(address, data)
        self.next_array += (len(data) + 15) // 16 * 16
        return address

    def send_pfns(self, index: int, pfns: list[int]) -> int:
        data = struct.pack(f"<{len(pfns)}I", *pfns)
        return self.queues[index].add_chain([(self.buffer(data), len(data))], [])

    def send_stats(self, index: int, stats: dict[int, int], tail: bytes = b"") -> int:
        data = b"".join(STAT.pack(tag, value) for tag, value in stats.items()) + tail
        return self.queues[index].add_chain([(self.buffer(data), len(data))], [])


def attach(memory: GuestMemory, device: VirtioBalloon, features: int, count: int = 4) -> Driver:
    """Configure `count` queues as a driver would and activate the device with `features`."""
    driver_queues, device_queues = [], []
    for base in RINGS[:count]:
        driver = DriverQueue(memory, base, 64)
        queue = SplitQueue(memory, 256, QueueState(size=64, ready=True, desc=driver.desc, avail=driver.avail,
                                                   used=driver.used))
        queue.activate()
        _queues.append(queue)
        driver_queues.append(driver)
        device_queues.append(queue)
    device.activate(device_queues, features | (1 << F_VERSION_1))
    return Driver(memory, device, driver_queues)


def test_inflated_pages_leave_the_host_and_read_back_as_zero(memory: GuestMemory) -> None:
    pages = 1024  # 4 MiB at DATA, sent as four requests of 256 PFNs in shuffled order
    memory.fill(DATA, pages * PAGE, 0xA5)
    assert resident_pages(memory, DATA, pages * PAGE) == pages
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    first = DATA // PAGE
    for block in range(4):
        pfns = list(range(first + 256 * block, first + 256 * (block + 1)))
        random.Random(block).shuffle(pfns)
        driver.send_pfns(0, pfns)
    device.process(0)
    assert len(driver.queues[0].used_entries()) == 4, "every request is acknowledged"
    assert resident_pages(memory, DATA, pages * PAGE) == 0, "the host took the pages back"
    assert memory.read(DATA, pages * PAGE) == bytes(pages * PAGE)
    counters = device.counters
    assert (counters.inflate_requests, counters.inflated_pages, counters.inflate_rejected) == (4, pages, 0)
    assert counters.discard_calls == 4, "each request's consecutive PFNs went back in one discard"
    assert counters.inflated_bytes == pages * PAGE
    assert device.status().ballooned_pages == pages
    assert resident_pages(memory, ARRAYS, PAGE) == 1, "pages outside the balloon stay"


def test_bad_pfns_are_counted_never_raised(memory: GuestMemory) -> None:
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    first = DATA // PAGE
    memory.fill(DATA, 4 * PAGE, 1)
    outside = [RAM // PAGE, RAM // PAGE + 7, 0xFFFFFFFF]
    driver.send_pfns(0, [first, *outside, first, first + 1])  # outside RAM x3, a repeat
    driver.send_pfns(0, [first + 1, first + 2])  # first + 1 is already in the balloon
    odd = driver.buffer(struct.pack("<II", first + 3, 0) + b"\x01\x02")  # two PFNs and a torn one
    driver.queues[0].add_chain([(odd, 10)], [(driver.buffer(bytes(16)), 16)])
    device.process(0)
    assert len(driver.queues[0].used_entries()) == 3
    counters = device.counters
    assert counters.inflated_pages == 5  # first .. first+3, and page 0
    assert counters.inflate_rejected == 3 + 1 + 1
    assert memory.read(DATA, 4 * PAGE) == bytes(4 * PAGE)
    driver.send_pfns(1, [first, first + 1, first + 9, RAM // PAGE, first])
    device.process(1)
    assert driver.queues[1].used_entries()[0][1] == 0
    assert (device.counters.deflated_pages, device.counters.deflate_rejected) == (2, 3)
    assert device.status().ballooned_pages == 3
    memory.write(DATA, b"reused")  # a deflated page faults back in when the guest uses it
    assert memory.read(DATA, 6) == b"reused" and resident_pages(memory, DATA, PAGE) == 1


def test_a_request_is_read_up_to_its_limit(memory: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(balloon_module, "MAX_PFNS_PER_CHAIN", 3)
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    first = DATA // PAGE
    pfns = driver.buffer(struct.pack("<5I", *range(first, first + 5)))
    driver.queues[0].add_chain([(pfns, 8), (pfns + 8, 12)], [])
    device.process(0)
    assert (device.counters.inflated_pages, device.counters.inflate_rejected) == (3, 2)
    driver.queues[1].add_chain([(pfns, 20)], [])
    device.process(1)
    assert (device.counters.deflated_pages, device.counters.deflate_rejected) == (3, 2)


def test_random_requests_on_every_queue_never_raise(memory: GuestMemory) -> None:
    """Random PFNs (in RAM, near it, anywhere), random statistics bytes and random reported ranges: every request is
    acknowledged and counted, nothing escapes the device."""
    chooser = random.Random(7)
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    posted = [0, 0, 0, 0]
    for _ in range(300):
        index = chooser.randrange(4)
        posted[index] += 1
        if index < 2:
            pfns = [chooser.choice((chooser.randrange(RAM // PAGE), RAM // PAGE + chooser.randrange(4),
                                    chooser.randrange(1 << 32))) for _ in range(chooser.randrange(1, 40))]
            driver.send_pfns(index, pfns)
        elif index == 2:
            data = chooser.randbytes(chooser.randrange(0, 120))
            driver.queues[2].add_chain([(driver.buffer(data or b"\0"), len(data))], [])
        else:
            ranges = [(chooser.randrange(DATA, RAM - 64 * PAGE), chooser.randrange(64 * PAGE)) for _ in range(3)]
            driver.queues[3].add_chain([], ranges)
        device.process(index)
        if driver.next_array > DATA - 4096:
            driver.next_array = ARRAYS
    served = [len(queue.used_entries()) for queue in driver.queues]
    assert served == [posted[0], posted[1], posted[2] - 1, posted[3]], "all acknowledged; one statistics buffer kept"
    counters = device.counters
    assert (counters.inflate_requests, counters.deflate_requests, counters.reports) == (posted[0], posted[1], posted[3])
    assert counters.inflated_pages - counters.deflated_pages == device.status().ballooned_pages


def test_statistics_round_trip(memory: GuestMemory) -> None:
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    assert device.request_stats() is False, "nothing to ask with before the driver's first buffer"
    before = time.time()
    head = driver.send_stats(2, {4: 100 * MiB, 5: 128 * MiB, 99: 7, 2: 3}, tail=b"\x06\x00")
    device.process(2)
    assert driver.queues[2].used_entries() == [], "the buffer is kept until the host asks"
    stats = device.stats
    assert stats is not None and stats.free == 100 * MiB and stats.total == 128 * MiB and stats.major_faults == 3
    assert stats.available is None, "a statistic the driver does not supply stays unknown"
    assert before <= stats.arrived <= time.time()
    assert device.status().stats_held
    assert device.request_stats() is True
    assert driver.queues[2].used_entries() == [(head, 0)]
    driver.send_stats(2, {4: 90 * MiB, 5: 128 * MiB, 6: 95 * MiB, 7: 5 * MiB, 3: 1000, 0: 1, 1: 2, 8: 0, 9: 0})
    device.process(2)
    assert device.stats == BalloonStats(swap_in=1, swap_out=2, major_faults=None, minor_faults=1000, free=90 * MiB,
                                        total=128 * MiB, available=95 * MiB, caches=5 * MiB, hugetlb_allocations=0,
                                        hugetlb_failures=0, arrived=device.stats.arrived)
    assert (device.counters.stats_updates, device.counters.stats_requests) == (2, 1)


def test_a_driver_breaking_the_one_stats_buffer_rule_gets_the_older_one_back(memory: GuestMemory) -> None:
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    first = driver.queues[2].add_chain([], [(driver.buffer(bytes(20)), 20)])  # writable only: no statistics
    device.process(2)
    assert device.stats is None and device.status().stats_held
    driver.send_stats(2, {4: 1})
    device.process(2)
    assert driver.queues[2].used_entries() == [(first, 0)]
    assert device.stats is not None and device.stats.free == 1


def test_free_page_reports_are_discarded_and_returned(memory: GuestMemory) -> None:
    memory.fill(DATA, 64 * PAGE, 0x5A)
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    head = driver.queues[3].add_chain([], [(DATA, 32 * PAGE), (DATA + 40 * PAGE + 100, 8 * PAGE)])
    device.process(3)
    assert driver.queues[3].used_entries() == [(head, 0)]
    assert resident_pages(memory, DATA, 64 * PAGE) == 64 - 32 - 7  # (reading maps the zero page: count first)
    assert memory.read(DATA, 32 * PAGE) == bytes(32 * PAGE)
    assert memory.read(DATA + 40 * PAGE, PAGE) == b"\x5a" * PAGE, "a page the report covers only in part stays"
    assert memory.read(DATA + 41 * PAGE, 7 * PAGE) == bytes(7 * PAGE)
    assert (device.counters.reports, device.counters.reported_bytes) == (1, 39 * PAGE)
    assert device.status().ballooned_pages == 0, "reported pages are not in the balloon"


def test_dirty_tracking_sees_inflated_and_reported_pages(memory: GuestMemory) -> None:
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    first = DATA // PAGE
    driver.send_pfns(0, [first + 5, first + 6, first + 9])
    driver.queues[3].add_chain([], [(DATA + 20 * PAGE, 2 * PAGE)])
    memory.start_tracking()
    try:
        device.process(0)
        device.process(3)
        tracked = set(memory.take_tracked_pages())
    finally:
        memory.stop_tracking()
    assert {first + 5, first + 6, first + 9, first + 20, first + 21} <= tracked
    assert first + 7 not in tracked


def test_queues_are_numbered_by_the_negotiated_features(memory: GuestMemory) -> None:
    """Without STATS_VQ the reporting queue is queue 2, as Linux numbers it (only present queues count)."""
    memory.fill(DATA, 4 * PAGE, 1)
    device = VirtioBalloon(memory)
    driver = attach(memory, device, 1 << F_PAGE_REPORTING, count=3)
    head = driver.queues[2].add_chain([], [(DATA, 4 * PAGE)])
    device.process(2)
    assert driver.queues[2].used_entries() == [(head, 0)] and device.counters.reports == 1
    assert device.request_stats() is False and device.status().negotiated == ("reporting",)
    device.reset()
    bare = attach(memory, device, 0, count=2)
    bare.send_pfns(1, [DATA // PAGE])
    device.process(1)
    assert device.counters.deflate_rejected == 1
    device.process(3)  # a queue these features do not have: ignored


def test_reset_empties_the_balloon(memory: GuestMemory) -> None:
    device = VirtioBalloon(memory)
    driver = attach(memory, device, ALL_FEATURES)
    driver.send_pfns(0, [DATA // PAGE])
    driver.send_stats(2, {4: 1})
    device.process(0)
    device.process(2)
    device.write_config(4, struct.pack("<I", 1))
    device.reset()
    status = device.status()
    assert (status.ballooned_pages, status.actual_pages, status.stats_held, status.driver_ready) == (0, 0, False, False)


def test_config_space_and_target_checks(memory: GuestMemory) -> None:
    device = VirtioBalloon(memory)
    device.set_target(100)
    assert device.config() == struct.pack("<II", 100, 0)
    device.write_config(0, struct.pack("<II", 5, 77))  # num_pages is the host's: only actual changes
    device.write_config(6, b"\x01")  # a partial write of actual's third byte
    assert device.config() == struct.pack("<II", 100, 77 | 0x10000)
    device.write_config(7, b"\x01\x02")  # past the end: ignored
    for bad in (-1, RAM // PAGE + 1, 1 << 40):
        with pytest.raises(DeviceError, match="must be between 0 and 4096"):
            device.set_target(bad)


# --- through the transport, with a real I/O thread ---------------------------------------------------------------
BASE = 0xD0000000


@dataclass
class Rig:
    memory: GuestMemory
    loop: EventLoop
    doorbells: dict[int, EventFd] = field(default_factory=dict)
    interrupt: EventFd | None = None

    def context(self) -> DeviceContext:
        def ioeventfd(fd: EventFd, address: int, length: int, datamatch: int, off: bool) -> None:
            if not off:
                self.doorbells[datamatch] = fd

        def irqfd(fd: EventFd, gsi: int, off: bool) -> None:
            self.interrupt = None if off else fd

        def no_line(gsi: int) -> InterruptLine:
            raise AssertionError("virtio interrupts go through irqfd")

        return DeviceContext(self.memory, no_line, lambda data: None, lambda code: None, self.loop, ioeventfd, irqfd)

    def create(self, state: VirtioBalloonState | None = None) -> VirtioMmio:
        transport = KINDS["virtio-balloon"].create(self.context(), BALLOON_NAME, Placement(mmio=(BASE, 0x1000), irq=5),
                                                   state)
        assert isinstance(transport, VirtioMmio)
        return transport


@pytest.fixture
def rig(memory: GuestMemory) -> Iterator[Rig]:
    loop = EventLoop("test-io")
    loop.start()
    yield Rig(memory, loop)
    loop.close()


def bring_up(transport: VirtioMmio, memory: GuestMemory, features: int) -> list[DriverQueue]:
    """The driver's initialisation (virtio 1.2 §3.1.1) with the queues `features` call for."""
    transport.write(mmio.STATUS, 4, 0)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER)
    features |= 1 << F_VERSION_1
    for select in (0, 1):
        transport.write(mmio.DRIVER_FEATURES_SEL, 4, select)
        transport.write(mmio.DRIVER_FEATURES, 4, (features >> (32 * select)) & 0xFFFFFFFF)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
    assert transport.read(mmio.STATUS, 4) & mmio.FEATURES_OK
    count = 2 + bool(features & (1 << F_STATS_VQ)) + bool(features & (1 << F_PAGE_REPORTING))
    queues = []
    for index in range(count):
        driver = DriverQueue(memory, RINGS[index], 64)
        transport.write(mmio.QUEUE_SEL, 4, index)
        assert transport.read(mmio.QUEUE_NUM_MAX, 4) == 256
        transport.write(mmio.QUEUE_NUM, 4, 64)
        for low, address in ((mmio.QUEUE_DESC_LOW, driver.desc), (mmio.QUEUE_DRIVER_LOW, driver.avail),
                             (mmio.QUEUE_DEVICE_LOW, driver.used)):
            transport.write(low, 4, address & 0xFFFFFFFF)
            transport.write(low + 4, 4, address >> 32)
        transport.write(mmio.QUEUE_READY, 4, 1)
        queues.append(driver)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
    return queues


def wait_for(condition: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.002)


def test_a_new_target_interrupts_the_driver_and_bumps_the_generation(rig: Rig) -> None:
    transport = rig.create(VirtioBalloonState(stats_interval_s=0))
    try:
        assert transport.read(mmio.DEVICE_ID, 4) == 5
        transport.write(mmio.DEVICE_FEATURES_SEL, 4, 0)
        assert transport.read(mmio.DEVICE_FEATURES, 4) & 0xFFFFFF == ALL_FEATURES
        balloon = find_balloon({BALLOON_NAME: transport})
        assert balloon is not None
        balloon.set_target(512)  # before the driver: config only, no interrupt
        assert transport.read(mmio.CONFIG_GENERATION, 4) == 0
        bring_up(transport, rig.memory, ALL_FEATURES)
        assert transport.read(mmio.CONFIG_OFFSET, 4) == 512
        assert rig.interrupt is not None
        rig.interrupt.drain()
        balloon.set_target(1024)
        wait_for(lambda: transport.read(mmio.CONFIG_GENERATION, 4) == 1, "the generation moved")
        assert transport.read(mmio.INTERRUPT_STATUS, 4) & mmio.CONFIG_CHANGE
        assert rig.interrupt.drain() == 1
        assert transport.read(mmio.CONFIG_OFFSET, 4) == 1024
        transport.write(mmio.CONFIG_OFFSET + 4, 4, 1000)  # the driver's actual
        assert balloon.status().actual_pages == 1000
        balloon.set_target(1024)  # unchanged: no interrupt
        time.sleep(0.05)
        assert transport.read(mmio.CONFIG_GENERATION, 4) == 1
    finally:
        transport.close()


def test_doorbells_and_the_statistics_timer_run_on_the_io_thread(rig: Rig) -> None:
    transport = rig.create(VirtioBalloonState(stats_interval_s=0.05))
    try:
        queues = bring_up(transport, rig.memory, ALL_FEATURES)
        driver = Driver(rig.memory, transport.device, queues)  # type: ignore[arg-type]
        rig.memory.fill(DATA, 8 * PAGE, 3)
        driver.send_pfns(0, [DATA // PAGE + i for i in range(8)])
        rig.doorbells[0].signal()
        wait_for(lambda: len(queues[0].used_entries()) == 1, "the inflate request is served")
        assert resident_pages(rig.memory, DATA, 8 * PAGE) == 0
        head = driver.send_stats(2, {4: 1})
        rig.doorbells[2].signal()
        returned: list[tuple[int, int]] = []
        wait_for(lambda: returned.extend(queues[2].used_entries()) or returned, "the timer asks for statistics")
        assert returned == [(head, 0)]
        for value in (2, 3):  # the driver answers each request with a new buffer; the timer asks again
            head = driver.send_stats(2, {4: value})
            rig.doorbells[2].signal()
            wait_for(lambda head=head: (head, 0) in queues[2].used_entries(), "another request")  # type: ignore[misc]
        balloon = find_balloon({BALLOON_NAME: transport})
        assert balloon is not None and balloon.stats is not None and balloon.stats.free == 3
        assert transport.stats.broken == 0
    finally:
        transport.close()
    assert rig.loop.stats.handler_errors == 0


def test_state_survives_save_and_restore_with_a_held_stats_buffer(rig: Rig) -> None:
    transport = rig.create(VirtioBalloonState(stats_interval_s=0, deflate_on_oom=False))
    queues = bring_up(transport, rig.memory, (1 << F_STATS_VQ) | (1 << F_PAGE_REPORTING))
    driver = Driver(rig.memory, transport.device, queues)  # type: ignore[arg-type]
    first = DATA // PAGE
    driver.send_pfns(0, list(range(first, first + 16)))
    head = driver.send_stats(2, {4: 42 * MiB})
    for index in (0, 2):
        rig.doorbells[index].signal()
    wait_for(lambda: len(queues[0].used_entries()) == 1, "inflate served")
    balloon = transport.device
    assert isinstance(balloon, VirtioBalloon)
    wait_for(lambda: balloon.status().stats_held, "the statistics buffer is held")
    balloon.set_target(16)
    transport.write(mmio.CONFIG_OFFSET + 4, 4, 16)
    rig.loop.pause(5)  # a pause hold: a target set now waits for the I/O thread
    balloon.set_target(20)
    saved = transport.save()
    rig.loop.resume()
    transport.close()
    assert isinstance(saved, VirtioBalloonState) and saved.config_pending and saved.stats_head == head
    state = decode(VirtioBalloonState, parse_json(dump_json(encode(saved)), "test"), "test")
    assert state == saved and not state.deflate_on_oom
    rig.interrupt = None
    restored = rig.create(state)
    try:
        balloon = restored.device
        assert isinstance(balloon, VirtioBalloon)
        status = balloon.status()
        assert (status.target_pages, status.actual_pages, status.ballooned_pages, status.stats_held) == (20, 16, 16,
                                                                                                          True)
        assert status.stats is not None and status.stats.free == 42 * MiB
        assert status.counters.inflated_pages == 16
        wait_for(lambda: restored.read(mmio.CONFIG_GENERATION, 4) == saved.transport.config_generation + 1,
                 "the pending target reaches the driver once the I/O thread runs")
        assert balloon.request_stats() is True
        wait_for(lambda: (head, 0) in queues[2].used_entries(), "the held buffer goes back after the restore")
        driver.send_pfns(0, [first, first + 16])  # first is still in the balloon
        rig.doorbells[0].signal()
        wait_for(lambda: len(queues[0].used_entries()) == 1, "inflate served")
        assert (balloon.counters.inflated_pages, balloon.counters.inflate_rejected) == (17, 1)
    finally:
        restored.close()


@pytest.mark.parametrize(("changes", "message"), [
    ({"stats_head": 999}, "outside a 256-entry queue"),
    ({"ballooned": b"not zlib"}, "bitmap is damaged"),
    ({"ballooned": __import__("zlib").compress(bytes(10))}, "covers 80 pages"),
    ({"target_pages": 1 << 32}, "does not fit in 32 bits"),
    ({"stats_interval_s": float("inf")}, "statistics interval"),
])
def test_bad_saved_state_is_one_device_error(memory: GuestMemory, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        VirtioBalloon(memory, VirtioBalloonState(**changes))


def test_the_saved_bitmap_keeps_its_layout(memory: GuestMemory) -> None:
    """Snapshots hold the balloon's pages as numpy.packbits wrote them before issue 16 (PFN 8k + i is bit 7 - i of
    byte k): bitmaps in that layout load, and the device saves the same bytes."""
    assert balloon_module._pack_bitmap(bytearray(b"\x01\x00\x00\x01" + bytes(5) + b"\x01" * 3 + bytes(7) + b"\x01")) \
        == bytes.fromhex("907010")  # numpy.packbits of frames 0, 3, 9, 10, 11, 19 of 20
    pfns = [0, 3, 9, 10, 11, DATA // PAGE, DATA // PAGE + 1, RAM // PAGE - 1]
    layout = bytearray(RAM // PAGE // 8)
    for pfn in pfns:
        layout[pfn // 8] |= 0x80 >> (pfn % 8)
    device = VirtioBalloon(memory, VirtioBalloonState(ballooned=zlib.compress(bytes(layout))))
    assert device.status().ballooned_pages == len(pfns)
    saved = device.save_device(TransportState()).ballooned
    assert zlib.decompress(saved) == layout
    assert VirtioBalloon(memory, VirtioBalloonState()).save_device(TransportState()).ballooned == b""


def test_a_huge_bitmap_bomb_is_refused(memory: GuestMemory) -> None:
    bomb = __import__("zlib").compress(bytes(64 * MiB))
    with pytest.raises(DeviceError, match="covers"):
        VirtioBalloon(memory, VirtioBalloonState(ballooned=bomb))


# --- the API and the command line ------------------------------------------------------------------------------------
def test_api_routes_validate_and_set_the_target(memory: GuestMemory) -> None:
    balloon = VirtioBalloon(memory)
    devices: dict[str, Any] = {}
    vmm = SimpleNamespace(memory=memory, devices=devices, state=SimpleNamespace(terminal=False, value="running"))
    routes = BalloonRoutes(vmm)  # type: ignore[arg-type]
    with pytest.raises(ApiError) as refused:
        routes.get({})
    assert refused.value.status == HTTPStatus.CONFLICT and "no balloon" in refused.value.message
    devices[BALLOON_NAME] = SimpleNamespace(device=balloon)
    for body in ({}, {"target_mib": -1}, {"target_mib": 17}, {"target_mib": "4"}, {"target_mib": True},
                 {"target_mib": float("nan")}, {"target_mib": 1, "extra": 2}):
        with pytest.raises(ApiError) as bad:
            routes.set_target(body)
        assert bad.value.status == HTTPStatus.BAD_REQUEST, body
    document = routes.set_target({"target_mib": 4})
    assert document["target_pages"] == 1024 and document["target_mib"] == 4 and document["stats"] is None
    balloon.stats = BalloonStats(free=8 * MiB, arrived=time.time())
    document = routes.get({})
    assert document["stats"]["free"] == 8 * MiB and document["stats"]["age_s"] < 5
    assert "target 4 MiB (1024 pages)" in describe_balloon(document) and "free 8.0 MiB" in describe_balloon(document)
    vmm.state = SimpleNamespace(terminal=True, value="stopped")
    with pytest.raises(ApiError) as late:
        routes.set_target({"target_mib": 1})
    assert late.value.status == HTTPStatus.CONFLICT
    table = Routes()
    add_balloon_routes(table, Any)  # type: ignore[arg-type]
    assert table.paths == [("GET", "/balloon"), ("POST", "/balloon")]


def test_balloon_options_on_the_command_line() -> None:
    parser = build_parser()
    assert parser.parse_args(["run", "os"]).balloon is None
    assert parser.parse_args(["run", "os", "--balloon"]).balloon == BalloonConfig()
    assert parser.parse_args(["run", "os", "--balloon", "stats=0.5"]).balloon == BalloonConfig(0.5)
    assert parser.parse_args(["run", "os", "--balloon", "stats=0,oom=off"]).balloon == BalloonConfig(0, False)
    ctl = parser.parse_args(["ctl", "sock", "balloon", "--target-mib", "64", "--json"])
    assert (ctl.target_mib, ctl.json) == (64.0, True)


def test_resident_page_helper_sees_what_is_touched(memory: GuestMemory) -> None:
    assert resident_pages(memory, 8 * MiB, 16 * PAGE) == 0
    memory.write(8 * MiB + 5 * PAGE, b"x")
    assert resident_pages(memory, 8 * MiB, 16 * PAGE) == 1
    assert sum(byte != 0 for byte in memory.read(8 * MiB, 16 * PAGE)) == 1
