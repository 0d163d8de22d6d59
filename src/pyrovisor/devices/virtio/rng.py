"""virtio-rng (virtio 1.2 §5.4): fills the driver's buffers with bytes from the host's getrandom()."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pyrovisor.devices.virtio.device import ID_RNG, VirtioDevice
from pyrovisor.devices.virtio.mmio import TransportState

MAX_BYTES_PER_REQUEST = 64 << 10  # a larger buffer is filled up to this and reported as such


@dataclass(frozen=True)
class VirtioRngState:
    transport: TransportState = field(default_factory=TransportState)
    requests: int = 0
    bytes_served: int = 0


class VirtioRng(VirtioDevice):
    device_id = ID_RNG
    queue_sizes = (256,)

    def __init__(self, state: VirtioRngState | None = None) -> None:
        super().__init__()
        state = state or VirtioRngState()
        self.requests = state.requests
        self.bytes_served = state.bytes_served

    def process(self, queue_index: int) -> None:
        queue = self.queues[queue_index]
        memory = queue.memory
        served = False
        for chain in queue.available_chains():
            written = 0
            for buffer in chain.writable:
                count = min(buffer.length, MAX_BYTES_PER_REQUEST - written)
                if count <= 0:
                    break
                memory.write(buffer.address, os.getrandom(count))
                written += count
            queue.add_used(chain.head, written)
            self.requests += 1
            self.bytes_served += written
            served = True
        if served:
            self.publish(queue)

    def save_device(self, transport: TransportState) -> VirtioRngState:
        return VirtioRngState(transport, self.requests, self.bytes_served)
