"""The virtio-mmio transport with virtio-rng, driven register by register like a guest driver, without KVM:
doorbells and the interrupt are real eventfds, the work runs on a real I/O thread."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from virtio_driver import DriverQueue, MiB

from pyrovisor.devices.virtio import mmio
from pyrovisor.devices.virtio.device import F_EVENT_IDX, F_VERSION_1
from pyrovisor.devices.virtio.mmio import MmioWiring, VirtioMmio
from pyrovisor.devices.virtio.rng import VirtioRng
from pyrovisor.events.eventfd import EventFd
from pyrovisor.events.loop import EventLoop
from pyrovisor.memory import GuestMemory, MemoryRegion

BASE = 0xD0000000
RING = 0x10000


@dataclass
class FakeKvm:
    """Records what the transport registers with KVM; the test plays KVM's part with the eventfds."""

    doorbells: dict[int, EventFd] = field(default_factory=dict)
    interrupt: EventFd | None = None
    unregistered: int = 0

    def ioeventfd(self, eventfd: EventFd, address: int, length: int, datamatch: int) -> None:
        assert address == BASE + mmio.QUEUE_NOTIFY and length == 4
        self.doorbells[datamatch] = eventfd

    def irqfd(self, eventfd: EventFd, gsi: int) -> None:
        assert gsi == 5
        self.interrupt = eventfd

    def gone(self, *args: object) -> None:
        self.unregistered += 1


@pytest.fixture
def rig() -> Iterator[tuple[VirtioMmio, FakeKvm, GuestMemory]]:
    memory = GuestMemory([MemoryRegion.anonymous(0, 4 * MiB, huge_pages=False)])
    loop = EventLoop("test-io")
    loop.start()
    kvm = FakeKvm()
    wiring = MmioWiring(memory, BASE, 5, loop, kvm.ioeventfd, kvm.gone, kvm.irqfd, kvm.gone)
    transport = VirtioMmio("rng0", VirtioRng(), wiring)
    yield transport, kvm, memory
    transport.close()
    loop.close()
    memory.close()
    assert kvm.unregistered == 2, "the doorbell and the interrupt are handed back to KVM"


def bring_up(transport: VirtioMmio, memory: GuestMemory, features: int) -> DriverQueue:
    """The driver's initialisation sequence (virtio 1.2 §3.1.1) for queue 0."""
    transport.write(mmio.STATUS, 4, 0)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER)
    for select in (0, 1):
        transport.write(mmio.DRIVER_FEATURES_SEL, 4, select)
        transport.write(mmio.DRIVER_FEATURES, 4, (features >> (32 * select)) & 0xFFFFFFFF)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
    assert transport.read(mmio.STATUS, 4) & mmio.FEATURES_OK
    driver = DriverQueue(memory, RING, 16)
    transport.write(mmio.QUEUE_SEL, 4, 0)
    assert transport.read(mmio.QUEUE_NUM_MAX, 4) == 256
    transport.write(mmio.QUEUE_NUM, 4, 16)
    for low, address in ((mmio.QUEUE_DESC_LOW, driver.desc), (mmio.QUEUE_DRIVER_LOW, driver.avail),
                         (mmio.QUEUE_DEVICE_LOW, driver.used)):
        transport.write(low, 4, address & 0xFFFFFFFF)
        transport.write(low + 4, 4, address >> 32)
    transport.write(mmio.QUEUE_READY, 4, 1)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK | mmio.DRIVER_OK)
    return driver


def wait_used(driver: DriverQueue, count: int) -> list[tuple[int, int]]:
    deadline = time.monotonic() + 5
    entries: list[tuple[int, int]] = []
    while len(entries) < count:
        assert time.monotonic() < deadline, f"only {len(entries)} of {count} requests served"
        entries += driver.used_entries()
        time.sleep(0.001)
    return entries


def test_identity_registers(rig: tuple[VirtioMmio, FakeKvm, GuestMemory]) -> None:
    transport, _, _ = rig
    assert [transport.read(offset, 4) for offset in (0, 4, 8)] == [0x74726976, 2, 4]
    transport.write(mmio.DEVICE_FEATURES_SEL, 4, 1)
    assert transport.read(mmio.DEVICE_FEATURES, 4) & 1, "VIRTIO_F_VERSION_1 is offered"
    assert transport.read(mmio.MAGIC_VALUE, 2) == 0xFFFF, "registers are 32-bit only"


def test_a_doorbell_gets_random_bytes_and_an_interrupt(rig: tuple[VirtioMmio, FakeKvm, GuestMemory]) -> None:
    transport, kvm, memory = rig
    driver = bring_up(transport, memory, 1 << F_VERSION_1)
    heads = [driver.add_chain([], [(0x20000 + 0x1000 * i, 64)]) for i in range(3)]
    kvm.doorbells[0].signal()  # what KVM does when the guest writes QueueNotify
    assert sorted(wait_used(driver, 3)) == [(head, 64) for head in sorted(heads)]
    assert len({memory.read(0x20000 + 0x1000 * i, 64) for i in range(3)}) == 3, "three different random fills"
    assert kvm.interrupt is not None and kvm.interrupt.drain() >= 1
    assert transport.read(mmio.INTERRUPT_STATUS, 4) == mmio.USED_BUFFER
    transport.write(mmio.INTERRUPT_ACK, 4, mmio.USED_BUFFER)
    assert transport.read(mmio.INTERRUPT_STATUS, 4) == 0
    driver.add_chain([], [(0x30000, 16)])
    transport.write(mmio.QUEUE_NOTIFY, 4, 0)  # a notify that trapped instead: the same path
    wait_used(driver, 1)
    assert transport.stats.trapped_notifications == 1 and transport.stats.notifications == 2


def test_features_without_version_1_are_refused(rig: tuple[VirtioMmio, FakeKvm, GuestMemory]) -> None:
    transport, _, _ = rig
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER)
    transport.write(mmio.DRIVER_FEATURES, 4, 1 << F_EVENT_IDX)
    transport.write(mmio.STATUS, 4, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
    assert not transport.read(mmio.STATUS, 4) & mmio.FEATURES_OK


def test_a_hostile_ring_breaks_only_the_device_until_reset(rig: tuple[VirtioMmio, FakeKvm, GuestMemory]) -> None:
    transport, kvm, memory = rig
    driver = bring_up(transport, memory, (1 << F_VERSION_1) | (1 << F_EVENT_IDX))
    memory.write_u16(driver.avail + 2, 500)  # an available index far beyond the queue
    kvm.doorbells[0].signal()
    deadline = time.monotonic() + 5
    while not transport.read(mmio.STATUS, 4) & mmio.NEEDS_RESET:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert transport.stats.broken == 1 and "500 entries ahead" in transport.broken
    assert transport.read(mmio.INTERRUPT_STATUS, 4) & mmio.CONFIG_CHANGE
    driver = bring_up(transport, memory, 1 << F_VERSION_1)  # reset, then start over
    driver.add_chain([], [(0x20000, 8)])
    kvm.doorbells[0].signal()
    assert wait_used(driver, 1)[0][1] == 8


def test_transport_and_queue_state_round_trip(rig: tuple[VirtioMmio, FakeKvm, GuestMemory]) -> None:
    transport, kvm, memory = rig
    driver = bring_up(transport, memory, (1 << F_VERSION_1) | (1 << F_EVENT_IDX))
    driver.add_chain([], [(0x20000, 32)])
    kvm.doorbells[0].signal()
    wait_used(driver, 1)
    saved = transport.save()
    clone_kvm = FakeKvm()
    wiring = MmioWiring(memory, BASE, 5, transport.wiring.loop, clone_kvm.ioeventfd, clone_kvm.gone, clone_kvm.irqfd,
                        clone_kvm.gone)
    clone = VirtioMmio("rng1", VirtioRng(saved), wiring, saved.transport)  # type: ignore[attr-defined]
    try:
        assert clone.save() == saved
        assert clone.read(mmio.STATUS, 4) & mmio.DRIVER_OK
        driver.add_chain([], [(0x21000, 32)])
        clone_kvm.doorbells[0].signal()
        assert wait_used(driver, 1)[0][1] == 32, "the restored device continues where the saved one stopped"
    finally:
        clone.close()
