"""VirtioMmio: the virtio-mmio transport, version 2 (virtio 1.2 §4.2), as a bus device.

Register accesses trap to the vCPU thread; queue notifications arrive by ioeventfd on the VM's I/O thread
(a notify never runs Python on a vCPU); interrupts leave by irqfd into the in-kernel IOAPIC.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyrovisor.devices.base import all_ones
from pyrovisor.devices.virtio.device import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    TRANSPORT_FEATURES,
    VirtioDevice,
)
from pyrovisor.devices.virtio.queue import QueueError, QueueState, SplitQueue
from pyrovisor.events.eventfd import EventFd
from pyrovisor.events.loop import EventLoop
from pyrovisor.memory import GuestMemory

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x50595256  # "PYRV"
WINDOW = 0x1000  # bytes of MMIO space per device
CONFIG_OFFSET = 0x100

# Register offsets.
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH = 0x0AC, 0x0B0, 0x0B4
CONFIG_GENERATION = 0x0FC

# Device status bits.
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 64, 128
# Interrupt status bits.
USED_BUFFER, CONFIG_CHANGE = 1, 2


@dataclass(frozen=True)
class TransportState:
    """The transport's registers and queues (the device's own state is saved beside it)."""

    status: int = 0
    device_features_sel: int = 0
    driver_features: int = 0
    driver_features_sel: int = 0
    queue_sel: int = 0
    interrupt_status: int = 0
    config_generation: int = 0
    queues: tuple[QueueState, ...] = ()
    broken: str = ""  # why the device set DEVICE_NEEDS_RESET, if it did
    vendor_id: int = VENDOR_ID  # what the VendorID register reads (--stealth: a neutral one, arch/x86_64/stealth.py)


@dataclass(frozen=True)
class MmioWiring:
    """The live connections of one transport: doorbells into KVM, the interrupt out, the I/O thread."""

    memory: GuestMemory
    base: int
    gsi: int
    loop: EventLoop
    register_ioeventfd: Callable[[EventFd, int, int, int], None]  # (eventfd, address, length, datamatch)
    unregister_ioeventfd: Callable[[EventFd, int, int, int], None]
    register_irqfd: Callable[[EventFd, int], None]  # (eventfd, gsi)
    unregister_irqfd: Callable[[EventFd, int], None]


@dataclass
class TransportStats:
    notifications: int = 0  # doorbells handled on the I/O thread
    trapped_notifications: int = 0  # QueueNotify writes that reached the vCPU thread (no ioeventfd match)
    interrupts: int = 0
    resets: int = 0
    broken: int = 0  # times the device went to DEVICE_NEEDS_RESET


class VirtioMmio:
    """One virtio-mmio device window. The same lock serialises register accesses (vCPU threads) and queue
    work (the I/O thread), so the device always sees a consistent configuration."""

    def __init__(self, name: str, device: VirtioDevice, wiring: MmioWiring, state: TransportState | None = None) -> None:
        self.name = name
        self.device = device
        self.wiring = wiring
        self.stats = TransportStats()
        # Runs the device's queue work, given it and the queue: per-process accounting times it (None: run it).
        self.queue_work: Callable[[Callable[[int], None], int], None] | None = None
        self.lock = threading.RLock()
        self._doorbells = [EventFd() for _ in device.queue_sizes]
        self._interrupt_line = EventFd()
        self._registered: list[EventFd] = []
        self._irqfd = False
        self.queues = [SplitQueue(wiring.memory, size) for size in device.queue_sizes]
        device.interrupt = self._used_buffer_interrupt
        device.config_changed = self._config_interrupt
        device.kick = self.kick
        self._load(state or TransportState())
        try:
            self._wire()
        except BaseException:
            self.close()
            raise

    # --- wiring to KVM and the I/O thread ----------------------------------------------------------------
    def _wire(self) -> None:
        wiring = self.wiring
        for index, doorbell in enumerate(self._doorbells):
            wiring.register_ioeventfd(doorbell, wiring.base + QUEUE_NOTIFY, 4, index)
            self._registered.append(doorbell)
            wiring.loop.add(doorbell, functools.partial(self._doorbell, index, doorbell), f"{self.name}.queue{index}",
                            self._handler_failed)
        wiring.register_irqfd(self._interrupt_line, wiring.gsi)
        self._irqfd = True

    def close(self) -> None:
        """Disconnect from KVM and the I/O thread, close the eventfds, release the device's resources."""
        wiring = self.wiring
        for index, doorbell in enumerate(self._registered):
            wiring.loop.remove(doorbell)
            try:
                wiring.unregister_ioeventfd(doorbell, wiring.base + QUEUE_NOTIFY, 4, index)
            except Exception as exc:  # the VM may be gone already; the fd is closed below either way
                log.debug("%s: ioeventfd %d: %r", self.name, index, exc)
        self._registered = []
        if self._irqfd:
            try:
                wiring.unregister_irqfd(self._interrupt_line, wiring.gsi)
            except Exception as exc:
                log.debug("%s: irqfd: %r", self.name, exc)
            self._irqfd = False
        for eventfd in (*self._doorbells, self._interrupt_line):
            eventfd.close()
        for queue in self.queues:
            queue.release()
        self.device.close()

    # --- state ------------------------------------------------------------------------------------------------
    def save(self) -> object:
        """The device's State with the transport's inside (the Persist protocol's save half)."""
        with self.lock:
            return self.device.save_device(self.save_transport())

    def _load(self, state: TransportState) -> None:
        self.status = state.status & 0xFF
        self.device_features_sel = state.device_features_sel
        self.driver_features = state.driver_features
        self.driver_features_sel = state.driver_features_sel
        self.queue_sel = state.queue_sel
        self.interrupt_status = state.interrupt_status & (USED_BUFFER | CONFIG_CHANGE)
        self.config_generation = state.config_generation
        self.broken = state.broken
        self.vendor_id = state.vendor_id & 0xFFFFFFFF
        for queue, saved in zip(self.queues, state.queues, strict=False):
            queue.load(saved)
        if self.status & DRIVER_OK and not self.status & NEEDS_RESET:
            try:
                for queue in self.queues:
                    if queue.ready:
                        queue.activate()
                self.device.activate(list(self.queues), self.driver_features)
            except QueueError as exc:
                self._break(f"restored queue configuration is invalid: {exc.reason}")
                return
            # A doorbell rung before the VM was saved is not part of its state: look at every queue once, so
            # requests the driver made available then are served (a driver that polls would wait forever).
            for index, queue in enumerate(self.queues):
                if queue.ready:
                    self._doorbells[index].signal()  # served once the I/O thread runs, interrupts wired

    def save_transport(self) -> TransportState:
        with self.lock:
            return TransportState(self.status, self.device_features_sel, self.driver_features,
                                  self.driver_features_sel, self.queue_sel, self.interrupt_status,
                                  self.config_generation, tuple(queue.save() for queue in self.queues), self.broken,
                                  self.vendor_id)

    # --- registers (vCPU threads) -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                return self._read_config(offset - CONFIG_OFFSET, size)
            if size != 4 or offset % 4:
                return all_ones(size)
            return self._read_register(offset)

    def _read_register(self, offset: int) -> int:
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR:
            return self.vendor_id
        if offset == DEVICE_FEATURES:
            offered = self.offered_features
            return (offered >> (32 * self.device_features_sel)) & 0xFFFFFFFF if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            queue = self._selected_queue()
            return queue.max_size if queue is not None else 0
        if offset == QUEUE_READY:
            queue = self._selected_queue()
            return int(queue.ready) if queue is not None else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
            return 0xFFFFFFFF  # no shared memory regions
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def _read_config(self, offset: int, size: int) -> int:
        config = self.device.config()
        if size not in (1, 2, 4, 8) or offset + size > len(config):
            return all_ones(size)
        return int.from_bytes(config[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                if self.status & DRIVER and size in (1, 2, 4, 8):
                    self.device.write_config(offset - CONFIG_OFFSET, value.to_bytes(size, "little"))
                return
            if size != 4 or offset % 4:
                return  # registers are 32-bit; anything else is ignored, as on hardware
            self._write_register(offset, value & 0xFFFFFFFF)

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.status & FEATURES_OK or self.driver_features_sel > 1:
                return  # features are fixed once accepted
            shift = 32 * self.driver_features_sel
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == QUEUE_NOTIFY:
            self.stats.trapped_notifications += 1
            if value < len(self._doorbells):
                self._doorbells[value].signal()  # the same path as an ioeventfd: work runs on the I/O thread
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value)
        else:
            self._write_queue_register(offset, value)

    def _write_queue_register(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None or self.status & DRIVER_OK:
            return
        if offset == QUEUE_READY:
            if value & 1 and not queue.ready:
                queue.event_idx = bool(self.driver_features & (1 << F_EVENT_IDX))
                queue.indirect = bool(self.driver_features & (1 << F_INDIRECT_DESC))
                try:
                    queue.activate()
                except QueueError as exc:
                    self._break(f"queue {self.queue_sel}: {exc.reason}")
                    return
            queue.ready = bool(value & 1)
            return
        if queue.ready:
            return  # a ready queue's configuration is fixed until reset
        if offset == QUEUE_NUM:
            queue.size = value
        elif offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH):
            queue.desc = _set_half(queue.desc, offset == QUEUE_DESC_HIGH, value)
        elif offset in (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH):
            queue.avail = _set_half(queue.avail, offset == QUEUE_DRIVER_HIGH, value)
        elif offset in (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
            queue.used = _set_half(queue.used, offset == QUEUE_DEVICE_HIGH, value)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        value &= 0xFF
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.offered_features
            if self.driver_features & ~offered or not self.driver_features & (1 << F_VERSION_1):
                value &= ~FEATURES_OK  # refused: the driver sees FEATURES_OK clear when it reads back
        if value & DRIVER_OK and not self.status & DRIVER_OK and not self.status & NEEDS_RESET:
            if not value & FEATURES_OK:
                return
            self.status = value
            self.device.activate(list(self.queues), self.driver_features)
            for index, queue in enumerate(self.queues):
                if queue.ready:  # buffers made available before DRIVER_OK
                    self.wiring.loop.call_soon(functools.partial(self.kick, index))
            return
        self.status = value | (self.status & NEEDS_RESET)

    def _reset(self) -> None:
        self.stats.resets += 1
        self.status = 0
        self.driver_features = self.driver_features_sel = self.device_features_sel = self.queue_sel = 0
        self.interrupt_status = 0
        self.broken = ""
        for queue in self.queues:
            queue.reset()
        self.device.reset()

    def _selected_queue(self) -> SplitQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    @property
    def offered_features(self) -> int:
        return self.device.features | TRANSPORT_FEATURES

    # --- queue work and interrupts (the I/O thread) --------------------------------------------------------
    def _doorbell(self, index: int, doorbell: EventFd) -> None:
        doorbell.drain()
        self.stats.notifications += 1
        self.kick(index)

    def kick(self, index: int) -> None:
        """Let the device work on queue `index` if the driver has made it usable (also for backends)."""
        with self.lock:
            if not self.status & DRIVER_OK or self.status & NEEDS_RESET:
                return
            queue = self.queues[index]
            if not queue.ready:
                return
            try:
                work = self.queue_work
                if work is None:
                    self.device.process(index)
                else:
                    work(self.device.process, index)
            except QueueError as exc:
                self._break(f"queue {index}: {exc.reason}")

    def _handler_failed(self, source: str, error: BaseException) -> None:
        with self.lock:
            self._break(f"{source}: internal error {error!r}")

    def _break(self, reason: str) -> None:
        """The driver (or the device) broke the rules: stop using the queues until the driver resets."""
        self.stats.broken += 1
        self.broken = reason
        log.warning("%s: device needs reset: %s", self.name, reason)
        self.status |= NEEDS_RESET
        if self.status & DRIVER_OK:  # the spec's way to tell a running driver
            self.interrupt_status |= CONFIG_CHANGE
            self._interrupt_line.signal()

    def _used_buffer_interrupt(self) -> None:
        self.interrupt_status |= USED_BUFFER
        self.stats.interrupts += 1
        self._interrupt_line.signal()

    def _config_interrupt(self) -> None:
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self.interrupt_status |= CONFIG_CHANGE
        self.stats.interrupts += 1
        self._interrupt_line.signal()


def _set_half(current: int, high: bool, value: int) -> int:
    if high:
        return (current & 0xFFFFFFFF) | (value << 32)
    return (current & ~0xFFFFFFFF) | value

