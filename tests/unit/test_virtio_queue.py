"""The split virtqueue against honest and hostile drivers: exact chains, and any ring a driver can write is
either served or refused with a QueueError, never another exception or a hang."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import DriverQueue, MiB

from pyrovisor.devices.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Buffer,
    DescriptorChain,
    QueueError,
    QueueState,
    SplitQueue,
    need_event,
)
from pyrovisor.memory import GuestMemory, MemoryRegion

RAM = 4 * MiB
RING_BASE = 0x10000
SIZE = 16


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory([MemoryRegion.anonymous(0, RAM, huge_pages=False)])
    yield memory
    memory.close()


def queue_pair(memory: GuestMemory, size: int = SIZE, event_idx: bool = False,
               indirect: bool = True) -> tuple[DriverQueue, SplitQueue]:
    memory.fill(RING_BASE, 0x4000, 0)
    driver = DriverQueue(memory, RING_BASE, size)
    device = SplitQueue(memory, 256, QueueState(size=size, ready=True, desc=driver.desc, avail=driver.avail,
                                                used=driver.used, event_idx=event_idx, indirect=indirect))
    device.activate()
    return driver, device


def write_rings(memory: GuestMemory, driver: DriverQueue, table: list[tuple[int, int, int, int]],
                indirect: list[tuple[int, int, int, int]], ring: list[int], avail_index: int) -> None:
    """Raw rings as a (hostile) driver may leave them: the descriptor table, an indirect table at 0x40000, the
    available ring and its index."""
    for index, descriptor in enumerate(table):
        memory.write(driver.desc + 16 * index, struct.pack("<QIHH", *descriptor))
    for index, descriptor in enumerate(indirect):
        memory.write(0x40000 + 16 * index, struct.pack("<QIHH", *descriptor))
    for index, head in enumerate(ring):
        memory.write_u16(driver.avail + 4 + 2 * index, head)
    memory.write_u16(driver.avail + 2, avail_index)


def test_chains_come_out_as_the_driver_put_them_in(memory: GuestMemory) -> None:
    driver, device = queue_pair(memory)
    head = driver.add_chain([(0x20000, 16)], [(0x21000, 512), (0x22000, 1)])
    indirect = driver.add_chain([(0x30000, 8)], [(0x31000, 4096)], indirect_at=0x40000)
    first = device.pop()
    assert first is not None and first.head == head
    assert first.readable == (Buffer(0x20000, 16),) and first.writable == (Buffer(0x21000, 512), Buffer(0x22000, 1))
    second = device.pop()
    assert second is not None and second.head == indirect and second.writable_length == 4096
    assert device.pop() is None
    device.add_used(first.head, 513)
    device.add_used(second.head, 4096)
    assert driver.used_entries() == [(head, 513), (indirect, 4096)]


def test_event_idx_interrupts_only_when_the_driver_asked(memory: GuestMemory) -> None:
    driver, device = queue_pair(memory, event_idx=True)
    used_event = driver.avail + 4 + 2 * SIZE
    memory.write_u16(used_event, 1)  # "interrupt me once the second buffer is used"
    for _ in range(3):
        driver.add_chain([], [(0x20000, 8)])
    for expected in (False, True, False):
        chain = device.pop()
        assert chain is not None
        device.add_used(chain.head, 8)
        assert device.needs_interrupt() is expected
    device.want_notifications()
    assert memory.read_u16(driver.used + 4 + 8 * SIZE) == 3, "avail_event tells the driver where to notify"
    assert need_event(0xFFFF, 0, 0xFFFE) and not need_event(5, 3, 2)


def test_state_survives_save_and_load(memory: GuestMemory) -> None:
    driver, device = queue_pair(memory, event_idx=True)
    driver.add_chain([], [(0x20000, 8)])
    device.add_used(device.pop().head, 8)  # type: ignore[union-attr]
    clone = SplitQueue(memory, 256, device.save())
    assert clone.save() == device.save() and clone.next_avail == 1 and clone.next_used == 1


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: d.memory.write_u16(d.avail + 2, 40), "moved 40 entries ahead"),
    (lambda d: d.memory.write_u16(d.avail + 4, SIZE), "outside the 16-entry descriptor table"),
    (lambda d: d.write_descriptor(d.desc, 0, 0x20000, 8, DESC_F_NEXT, 0), "loops"),
    (lambda d: d.write_descriptor(d.desc, 0, RAM - 8, 16, 0, 0), "not in guest RAM"),
    (lambda d: d.write_descriptor(d.desc, 0, 0x20000, 8, DESC_F_NEXT, 99), "outside its 16-entry table"),
    (lambda d: d.write_descriptor(d.desc, 0, 0x40000, 17, DESC_F_INDIRECT, 0), "indirect table of 17 bytes"),
    (lambda d: d.write_descriptor(d.desc, 0, RAM - 16, 32, DESC_F_INDIRECT, 0), "not aligned in guest RAM"),
    (lambda d: d.write_descriptor(d.desc, 0, 0x40000, 16, DESC_F_INDIRECT | DESC_F_NEXT, 1), "both indirect"),
])
def test_each_broken_rule_is_a_queue_error(memory: GuestMemory, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    driver, device = queue_pair(memory)
    driver.add_chain([(0x20000, 8)], [])
    damage(driver)
    with pytest.raises(QueueError, match=message):
        device.pop()


def test_readable_after_writable_and_nested_indirect_are_refused(memory: GuestMemory) -> None:
    driver, device = queue_pair(memory)
    driver.write_descriptor(driver.desc, 0, 0x20000, 8, DESC_F_WRITE | DESC_F_NEXT, 1)
    driver.write_descriptor(driver.desc, 1, 0x21000, 8, 0, 0)
    memory.write_u16(driver.avail + 4, 0)
    memory.write_u16(driver.avail + 2, 1)
    with pytest.raises(QueueError, match="readable buffer follows a device-writable"):
        device.pop()
    driver, device = queue_pair(memory)
    driver.write_descriptor(0x40000, 0, 0x40100, 16, DESC_F_INDIRECT, 0)
    driver.write_descriptor(driver.desc, 0, 0x40000, 16, DESC_F_INDIRECT, 0)
    memory.write_u16(driver.avail + 2, 1)
    with pytest.raises(QueueError, match="another indirect table"):
        device.pop()
    driver, device = queue_pair(memory, indirect=False)
    driver.add_chain([(0x20000, 8)], [], indirect_at=0x40000)
    with pytest.raises(QueueError, match="INDIRECT_DESC was not negotiated"):
        device.pop()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("size", 12, "not a power of two"), ("size", 512, "not a power of two up to 256"),
    ("desc", 0x10008, "not 16-byte aligned"), ("used", RAM - 8, "not in guest RAM"), ("avail", 0x10001, "2-byte"),
])
def test_activation_checks_the_configuration(memory: GuestMemory, field: str, value: int, message: str) -> None:
    state = QueueState(size=SIZE, ready=True, desc=0x10000, avail=0x11000, used=0x12000)
    queue = SplitQueue(memory, 256, QueueState(**{**state.__dict__, field: value}))
    with pytest.raises(QueueError, match=message):
        queue.activate()


DESCRIPTORS = st.tuples(st.integers(0, RAM + 0x10000), st.integers(0, 0x10000), st.integers(0, 7), st.integers(0, 40))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(DESCRIPTORS, min_size=SIZE, max_size=SIZE),
       indirect=st.lists(DESCRIPTORS, min_size=0, max_size=8),
       ring=st.lists(st.integers(0, 0xFFFF), min_size=SIZE, max_size=SIZE),
       avail_index=st.integers(0, 0xFFFF), event_idx=st.booleans())
def test_random_rings_are_served_or_refused(memory: GuestMemory, table: list[tuple[int, int, int, int]],
                                            indirect: list[tuple[int, int, int, int]], ring: list[int],
                                            avail_index: int, event_idx: bool) -> None:
    driver, device = queue_pair(memory, event_idx=event_idx)
    write_rings(memory, driver, table, indirect, ring, avail_index)
    served = 0
    try:
        while (chain := device.pop()) is not None:
            served += 1
            assert served <= SIZE
            for buffer in (*chain.readable, *chain.writable):
                assert buffer.length == 0 or memory.contains(buffer.address, buffer.length)
            device.add_used(chain.head, chain.writable_length)
            device.needs_interrupt()
    except QueueError:
        pass


# Mostly single direct descriptors (take()'s fast path), many of them at or past the end of RAM.
FAST_PATH_DESCRIPTORS = st.tuples(st.one_of(st.integers(0, RAM + 0x10000), st.integers(RAM - 0x11000, RAM + 8)),
                                  st.one_of(st.just(0), st.integers(0, 0x10000)),
                                  st.one_of(st.sampled_from([0, DESC_F_WRITE]), st.integers(0, 7)),
                                  st.integers(0, 40))


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(table=st.lists(FAST_PATH_DESCRIPTORS, min_size=SIZE, max_size=SIZE),
       indirect=st.lists(DESCRIPTORS, min_size=0, max_size=8),
       ring=st.lists(st.integers(0, 0xFFFF), min_size=SIZE, max_size=SIZE),
       avail_index=st.integers(0, SIZE), limit=st.integers(1, SIZE + 2))
def test_taking_a_batch_serves_and_refuses_exactly_as_popping(memory: GuestMemory,
                                                              table: list[tuple[int, int, int, int]],
                                                              indirect: list[tuple[int, int, int, int]],
                                                              ring: list[int], avail_index: int, limit: int) -> None:
    """take() (the hot devices' batch, with its own fast path) gives the chains pop() gives, in order, and
    breaks the queue on the same chain with the same reason."""
    driver, device = queue_pair(memory)
    write_rings(memory, driver, table, indirect, ring, avail_index)

    def outcome(collect: Callable[[list[DescriptorChain]], None]) -> tuple[list[DescriptorChain], str | None]:
        chains: list[DescriptorChain] = []
        try:
            collect(chains)
        except QueueError as exc:
            return chains, exc.reason
        return chains, None

    def by_pop(chains: list[DescriptorChain]) -> None:
        while (chain := device.pop()) is not None:
            chains.append(chain)

    def by_take(chains: list[DescriptorChain]) -> None:
        while batch := device.take(limit):
            chains.extend(batch)
            if len(batch) < limit:
                break

    popped, pop_error = outcome(by_pop)
    device.next_avail = 0
    taken, take_error = outcome(by_take)
    assert take_error == pop_error
    if pop_error is None:
        assert taken == popped and device.next_avail == avail_index
    else:  # take() loses the batch it was filling when a chain is refused: the device is broken anyway
        assert taken == popped[:len(taken)]


def test_chains_given_back_come_out_again(memory: GuestMemory) -> None:
    driver, device = queue_pair(memory, event_idx=True)
    heads = [driver.add_chain([], [(0x20000 + 0x1000 * n, 64)]) for n in range(5)]
    batch = device.take(4)
    assert [chain.head for chain in batch] == heads[:4]
    device.give_back(3)
    avail_event = driver.used + 4 + 8 * SIZE
    assert [chain.head for chain in device.take(8)] == heads[1:]
    assert memory.read_u16(avail_event) == 0, "a batch, even a short one, asks for no notification"
    assert device.take(8) == []
    assert memory.read_u16(avail_event) == 5, "an empty take asked to be notified from here on"


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(table=st.lists(FAST_PATH_DESCRIPTORS, min_size=SIZE, max_size=SIZE),
       ring=st.lists(st.integers(0, SIZE + 1), min_size=SIZE, max_size=SIZE),
       avail_index=st.integers(0, SIZE), limit=st.integers(1, SIZE + 2))
def test_direct_batches_are_what_popping_gives_up_to_the_first_other_chain(
        memory: GuestMemory, table: list[tuple[int, int, int, int]], ring: list[int], avail_index: int,
        limit: int) -> None:
    """take_direct() returns exactly the chains pop() gives while they are one direct descriptor in RAM, and
    leaves the first chain of any other form (or a bad one) for pop()/take() to serve or refuse."""
    driver, device = queue_pair(memory)
    check_direct_batches(memory, driver, device, table, ring, avail_index, limit)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(first=st.lists(FAST_PATH_DESCRIPTORS, min_size=SIZE, max_size=SIZE),
       second=st.lists(FAST_PATH_DESCRIPTORS, min_size=SIZE, max_size=SIZE),
       ring=st.lists(st.integers(0, SIZE + 1), min_size=SIZE, max_size=SIZE),
       avail_index=st.integers(0, SIZE), limit=st.integers(1, SIZE + 2))
def test_direct_batches_follow_descriptors_the_driver_rewrites(
        memory: GuestMemory, first: list[tuple[int, int, int, int]], second: list[tuple[int, int, int, int]],
        ring: list[int], avail_index: int, limit: int) -> None:
    """take_direct() keeps what it made for each head while the descriptor stays the same: a driver that
    rewrites its descriptors (another buffer, another length, a flag, a buffer outside RAM) gets exactly what
    pop() gives for the new ones, never a kept item."""
    driver, device = queue_pair(memory)
    write_rings(memory, driver, first, [], list(range(SIZE)), SIZE)
    while device.take_direct(SIZE):
        pass
    device.next_avail = 0
    check_direct_batches(memory, driver, device, second, ring, avail_index, limit)


def test_released_queue_keeps_no_view_of_guest_memory() -> None:
    """The items take_direct() keeps hold views of guest memory: release() drops them, so the memory can be
    unmapped after it even though the queue object lives on."""
    memory = GuestMemory([MemoryRegion.anonymous(0, RAM, huge_pages=False)])
    driver, device = queue_pair(memory)
    driver.add_chain([(0x80000, 1500)], [])
    assert len(device.take_direct(4)) == 1
    device.release()
    memory.close()  # raises BufferError while any view of the mapping lives
    assert device.save().next_avail == 1


def check_direct_batches(memory: GuestMemory, driver: DriverQueue, device: SplitQueue,
                         table: list[tuple[int, int, int, int]], ring: list[int], avail_index: int,
                         limit: int) -> None:
    write_rings(memory, driver, table, [], ring, avail_index)
    direct: list[tuple[int, int, int, int]] = []

    def take_batch() -> bool:  # the views die with this call: guest memory can be closed afterwards
        batch = device.take_direct(limit)
        for head, address, view, flags in batch:
            assert bytes(view) == (memory.read(address, len(view)) if len(view) else b""), "the memory at address"
            direct.append((head, address, len(view), flags))
        return bool(batch)

    while take_batch():
        pass
    stopped_at = device.next_avail
    assert stopped_at == len(direct)
    device.next_avail = 0
    for head, address, length, flags in direct:
        chain = device.pop()
        assert chain is not None and chain.head == head
        buffer = Buffer(address, length)
        assert (chain.readable, chain.writable) == (((), (buffer,)) if flags & DESC_F_WRITE else ((buffer,), ()))
    if stopped_at == avail_index:
        return
    try:  # what stopped take_direct() is a chain of another form, or one pop() refuses
        chain = device.pop()
    except QueueError:
        return
    assert chain is not None
    assert len(chain.readable) + len(chain.writable) != 1 or table[chain.head][2] & DESC_F_INDIRECT


@settings(max_examples=300, deadline=None)
@given(address=st.one_of(st.integers(0, 0x90000), st.sampled_from([0, 0xFFFF, 0x10000, 0x3FFFF, 0x40000, 0x5FFFF,
                                                                   0x60000, 0x7FFFF, 0x80000])),
       length=st.one_of(st.integers(0, 0x30000), st.sampled_from([0, 1, 0x10000, 0x20000])),
       flags=st.sampled_from([0, DESC_F_WRITE]))
@pytest.mark.parametrize("regions", [((0x10000, 0x30000), (0x60000, 0x20000)), ((0x10000, 0x30000),)],
                         ids=["two regions", "one region"])
def test_buffers_are_checked_against_ram_with_holes_and_nothing_at_zero(
        regions: tuple[tuple[int, int], ...], address: int, length: int, flags: int) -> None:
    """RAM at [0x10000, 0x40000) and [0x60000, 0x80000), or only the first (take_direct has a way of its own
    for one region): every way of taking a one-buffer chain accepts it exactly when it lies in one region (or
    is empty), as GuestMemory.contains says."""
    memory = GuestMemory([MemoryRegion.anonymous(start, size, huge_pages=False) for start, size in regions])
    try:
        driver = DriverQueue(memory, 0x20000, 4)
        state = QueueState(size=4, ready=True, desc=driver.desc, avail=driver.avail, used=driver.used)
        accepted = length == 0 or memory.contains(address, length)
        for way in ("pop", "take", "take_direct"):
            device = SplitQueue(memory, 256, state)
            device.activate()
            driver.write_descriptor(driver.desc, 0, address, length, flags, 0)
            memory.write_u16(driver.avail + 4, 0)
            memory.write_u16(driver.avail + 2, 1)
            try:
                if way == "pop":
                    got = device.pop() is not None
                elif way == "take":
                    got = len(device.take(4)) == 1
                else:
                    got = len(device.take_direct(4)) == 1
            except QueueError as exc:
                assert "not in guest RAM" in exc.reason
                got = False
            assert got == accepted, (way, hex(address), hex(length))
            device.release()
    finally:
        memory.close()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(start=st.integers(0, 0xFFFF), entries=st.lists(st.tuples(st.integers(0, SIZE - 1), st.integers(0, 1 << 32 - 1)),
                                                     min_size=1, max_size=SIZE))
def test_a_batch_of_used_elements_lands_as_one_by_one_would(memory: GuestMemory, start: int,
                                                           entries: list[tuple[int, int]]) -> None:
    """add_used_many (one copy, the ring may wrap) leaves the used ring exactly as add_used per element does."""
    driver, device = queue_pair(memory)
    rings = []
    for batch in (True, False):
        memory.fill(driver.used, 8 * SIZE + 6, 0)
        device.next_used = start
        if batch:
            device.add_used_many([value for entry in entries for value in entry])
        else:
            for head, written in entries:
                device.add_used(head, written)
        rings.append((memory.read(driver.used, 4 + 8 * SIZE), device.next_used))
    assert rings[0] == rings[1]
    assert rings[0][1] == (start + len(entries)) & 0xFFFF
