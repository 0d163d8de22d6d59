"""VirtioDevice: what a virtio device type provides to the transport (features, config space, queue work)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pyrovisor.devices.virtio.queue import SplitQueue

if TYPE_CHECKING:
    from pyrovisor.devices.virtio.mmio import TransportState

# Feature bits the transport handles for every device (virtio 1.2 §6).
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
TRANSPORT_FEATURES = (1 << F_INDIRECT_DESC) | (1 << F_EVENT_IDX) | (1 << F_VERSION_1)

# Device IDs (virtio 1.2 §5).
ID_NET = 1
ID_BLOCK = 2
ID_RNG = 4
ID_BALLOON = 5
ID_VSOCK = 19


class VirtioDevice:
    """A device type behind the virtio-mmio transport.

    The transport owns registers, status and queues; the device says what it offers (`device_id`,
    `features`, `queue_sizes`, config space) and does the work when a queue is notified (`process`,
    called on the VM's I/O thread with the transport's lock held). `interrupt()` tells the driver that
    used buffers are ready; `config_changed()` that the config space changed; `kick(queue)` runs `process`
    the way a doorbell does (for backends: a tap that became readable). The transport sets all three before
    it loads any saved state. Devices with host resources (files, taps, sockets) release them in `close()`.
    """

    device_id = 0
    features = 0  # device-specific feature bits offered (the transport adds TRANSPORT_FEATURES)
    queue_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.queues: Sequence[SplitQueue] = ()
        self.driver_features = 0
        self.interrupt: Callable[[], None] = lambda: None
        self.config_changed: Callable[[], None] = lambda: None
        self.kick: Callable[[int], None] = lambda queue_index: None

    def config(self) -> bytes:
        """The device-specific configuration space as the driver reads it."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the config space (most devices ignore them)."""
        return None

    def activate(self, queues: Sequence[SplitQueue], driver_features: int) -> None:
        """DRIVER_OK: the queues are configured and checked."""
        self.queues = queues
        self.driver_features = driver_features

    def process(self, queue_index: int) -> None:
        """The driver notified `queue_index` (or a backend became ready): do the work that is possible."""
        raise NotImplementedError

    def reset(self) -> None:
        """The driver reset the device: forget everything negotiated (host resources stay open)."""
        self.queues = ()
        self.driver_features = 0

    def save_device(self, transport: TransportState) -> Any:
        """The device's State (a frozen dataclass with a `transport` field): the transport's registers and
        queues, the device's options (a disk's path...) and anything else it keeps."""
        raise NotImplementedError

    def close(self) -> None:
        return None

    def publish(self, queue: SplitQueue) -> None:
        """After adding used buffers to `queue`: interrupt the driver if it asked for it."""
        if queue.needs_interrupt():
            self.interrupt()
