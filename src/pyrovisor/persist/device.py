"""DeviceRecord: one device as saved: its name, kind, where it sits on the buses, and its own state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceRecord:
    """`state` is the device kind's State dataclass in its encoded (JSON) form; the kind decodes it."""

    name: str
    kind: str
    port: tuple[int, int] | None  # (base, length) on the I/O port bus
    mmio: tuple[int, int] | None  # (base, length) on the MMIO bus
    irq: int | None  # the GSI its interrupt output drives
    state: Any
