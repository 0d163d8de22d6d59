"""DeviceManager: the registry of a VM's devices, their bus ranges and interrupts; boot and restore attach
through it, snapshots and migration save through it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pyrovisor.devices.base import BusDevice, InterruptLine
from pyrovisor.devices.bus import Bus
from pyrovisor.errors import DeviceError, StateError
from pyrovisor.events.eventfd import EventFd
from pyrovisor.events.loop import EventLoop
from pyrovisor.memory import GuestMemory
from pyrovisor.persist.codec import decode, encode
from pyrovisor.persist.device import DeviceRecord

S = TypeVar("S")


class ManagedDevice(BusDevice, Protocol):
    """A bus device that saves its state (the Persist protocol's save half)."""

    def save(self) -> Any: ...


@dataclass(frozen=True)
class Placement:
    """Where a device sits: a port range and/or an MMIO range, and the GSI its interrupt drives."""

    port: tuple[int, int] | None = None
    mmio: tuple[int, int] | None = None
    irq: int | None = None


@dataclass(frozen=True)
class DeviceContext:
    """The live things a device may be given (never saved): guest memory, interrupt lines, outputs, the
    VM's I/O thread and the KVM calls that connect eventfds (ioeventfd doorbells, irqfd interrupts)."""

    memory: GuestMemory
    interrupt_line: Callable[[int], InterruptLine]
    console_output: Callable[[bytes], None]
    guest_exit: Callable[[int], None]
    loop: EventLoop | None = None
    ioeventfd: Callable[[EventFd, int, int, int, bool], None] | None = None  # (fd, address, length, datamatch, off)
    irqfd: Callable[[EventFd, int, bool], None] | None = None  # (fd, gsi, off)


@dataclass(frozen=True)
class DeviceKind(Generic[S]):
    """How to build one kind of device, fresh (`state` None) or from its saved State."""

    name: str
    state_type: type[S]
    create: Callable[[DeviceContext, str, Placement, S | None], ManagedDevice]  # (context, name, placement, state)


@dataclass(frozen=True)
class AttachedDevice:
    name: str
    kind: DeviceKind[Any]
    placement: Placement
    device: ManagedDevice


class DeviceManager:
    """Attaches devices to the port and MMIO buses in one order, and saves them in that order.

    Boot attaches each device with no state; restore and migration attach the same kinds from their
    records. Either way the device is created by its kind, so there is one path for both.
    """

    def __init__(self, kinds: Mapping[str, DeviceKind[Any]], port_bus: Bus, mmio_bus: Bus,
                 context: DeviceContext) -> None:
        self._kinds = dict(kinds)
        self.port_bus = port_bus
        self.mmio_bus = mmio_bus
        self.context = context
        self._devices: dict[str, AttachedDevice] = {}

    def attach(self, name: str, kind_name: str, placement: Placement, state: Any = None) -> ManagedDevice:
        if name in self._devices:
            raise DeviceError(name, "a device of this name is already attached")
        kind = self._kinds.get(kind_name)
        if kind is None:
            raise DeviceError(name, f"unknown device kind {kind_name!r}")
        device = kind.create(self.context, name, placement, state)
        inserted: list[tuple[Bus, int]] = []
        try:
            for bus, span in ((self.port_bus, placement.port), (self.mmio_bus, placement.mmio)):
                if span is not None:
                    bus.insert(span[0], span[1], device, name)
                    inserted.append((bus, span[0]))
        except BaseException:
            for bus, base in inserted:
                bus.remove(base)
            close = getattr(device, "close", None)
            if close is not None:
                close()
            raise
        self._devices[name] = AttachedDevice(name, kind, placement, device)
        return device

    def restore(self, records: tuple[DeviceRecord, ...], source: str = "device state") -> None:
        """Attach every recorded device with its saved state (decode them all first)."""
        decoded = check_records(self._kinds, records, source)
        for record, state in zip(records, decoded, strict=True):
            self.attach(record.name, record.kind, Placement(record.port, record.mmio, record.irq), state)

    def save(self) -> tuple[DeviceRecord, ...]:
        return tuple(DeviceRecord(name=entry.name, kind=entry.kind.name, port=entry.placement.port,
                                  mmio=entry.placement.mmio, irq=entry.placement.irq,
                                  state=encode(entry.device.save()))
                     for entry in self._devices.values())

    def __getitem__(self, name: str) -> ManagedDevice:
        return self._devices[name].device

    def __contains__(self, name: str) -> bool:
        return name in self._devices

    def __iter__(self) -> Iterator[AttachedDevice]:
        return iter(tuple(self._devices.values()))

    def close(self) -> None:
        """Release what devices hold (threads, fds); devices without a `close` hold nothing."""
        errors: list[BaseException] = []
        for entry in reversed(tuple(self._devices.values())):
            close = getattr(entry.device, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # every device gets its chance to close
                    errors.append(exc)
        if errors:
            raise DeviceError("devices", f"{len(errors)} device(s) failed to close: {errors[0]}")


def check_records(kinds: Mapping[str, DeviceKind[Any]], records: tuple[DeviceRecord, ...],
                  source: str) -> list[Any]:
    """Each record's decoded state; an unknown kind, a duplicate name or a bad state is a StateError."""
    names: set[str] = set()
    states = []
    for record in records:
        where = f"device {record.name!r}"
        if record.name in names:
            raise StateError(source, f"{where} appears twice")
        names.add(record.name)
        kind = kinds.get(record.kind)
        if kind is None:
            raise StateError(source, f"{where} has kind {record.kind!r}, which this pyrovisor does not know")
        for label, span in (("port", record.port), ("mmio", record.mmio)):
            if span is not None and (span[0] < 0 or span[1] <= 0):
                raise StateError(source, f"{where}: invalid {label} range {span}")
        states.append(decode(kind.state_type, record.state, f"{source}: {where}"))
    return states
