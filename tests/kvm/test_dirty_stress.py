"""Dirty tracking under concurrency: writer threads, the page-discard device and a harvester racing,
with thread switches forced every microsecond; every page written must be reported, none lost."""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Iterator

import pytest

from pyrovisor.devices.page_discard import PageDiscard
from pyrovisor.kvm import Kvm
from pyrovisor.memory import GuestMemory, MemoryRegion, PageSet
from pyrovisor.vstate.dirty import DirtyTracker
from pyrovisor.vstate.vm import Vm

pytestmark = pytest.mark.kvm

PAGE = 4096
PAGES = 65536  # 256 MiB of guest RAM
WRITERS = 3
DISCARD_FIRST = 60000  # pages from here on are released through the page-discard device instead
REQUEST_GPA = 0x1000  # the discard request block (itself written through GuestMemory)


@pytest.fixture
def tracked_memory() -> Iterator[tuple[GuestMemory, DirtyTracker]]:
    with Kvm() as kvm:
        vm = Vm(kvm)
        memory = GuestMemory([MemoryRegion.anonymous(0, PAGES * PAGE)])
        try:
            vm.add_guest_memory(memory)
            yield memory, DirtyTracker(vm, memory)
        finally:
            vm.close()
            memory.close()


@pytest.fixture
def tiny_switch_interval() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def test_no_page_is_lost_between_writers_and_a_concurrent_harvester(
        tracked_memory: tuple[GuestMemory, DirtyTracker], tiny_switch_interval: None) -> None:
    memory, tracker = tracked_memory
    log = tracker.subscribe()
    harvested: list[PageSet] = []
    done = threading.Event()

    def harvester() -> None:
        while not done.is_set():
            harvested.append(log.collect_pages())

    def writer(first: int) -> None:
        for page in range(first + 16, DISCARD_FIRST, WRITERS):
            memory.write_u64(page * PAGE + 8, page)

    device = PageDiscard(memory.read, lambda gpa, size: memory.fill(gpa, size, 0))

    def discarder() -> None:
        for first in range(DISCARD_FIRST, PAGES, 32):
            ranges = [(page * PAGE, 1) for page in range(first, min(first + 32, PAGES))]
            request = struct.pack("<II", len(ranges), 0) + b"".join(struct.pack("<QQ", *r) for r in ranges)
            memory.write(REQUEST_GPA, request)
            device.write(0, 4, REQUEST_GPA)

    collector = threading.Thread(target=harvester)
    workers = [threading.Thread(target=writer, args=(index,)) for index in range(WRITERS)]
    workers.append(threading.Thread(target=discarder))
    collector.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    done.set()
    collector.join(30)
    harvested.append(log.collect_pages())
    log.close()

    reported = {page for pages in harvested for page in pages}
    expected = set(range(16, PAGES)) | {REQUEST_GPA // PAGE}
    lost = expected - reported
    assert device.rejected == 0 and device.pages == PAGES - DISCARD_FIRST
    assert len(harvested) > 10, "the harvester ran while the writers wrote"
    assert not lost, f"{len(lost)} of {len(expected)} written pages were never reported, e.g. {sorted(lost)[:5]}"
    assert reported == expected, "only written pages are reported"
