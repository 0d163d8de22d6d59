"""The devices every pyrovisor VM has, their kinds and where they sit (PC-compatible ports)."""

from __future__ import annotations

from typing import Any

from pyrovisor.devices.console import COM1_IRQ, COM1_PORT, PORT_COUNT, SerialConsole, SerialConsoleArgs
from pyrovisor.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit, DebugExitState
from pyrovisor.devices.manager import DeviceContext, DeviceKind, DeviceManager, ManagedDevice, Placement
from pyrovisor.devices.page_discard import (
    PAGE_DISCARD_PORT,
    PAGE_DISCARD_PORTS,
    PageDiscard,
    PageDiscardArgs,
    PageDiscardState,
)
from pyrovisor.devices.serial import SerialState

SERIAL = "serial0"
DEBUG_EXIT = "debug-exit"
PAGE_DISCARD = "page-discard"


def _serial(context: DeviceContext, placement: Placement, state: SerialState | None) -> ManagedDevice:
    interrupt = context.interrupt_line(placement.irq) if placement.irq is not None else None
    return SerialConsole.restore(SerialConsoleArgs(context.console_output, interrupt), state or SerialState())


def _debug_exit(context: DeviceContext, placement: Placement, state: DebugExitState | None) -> ManagedDevice:
    return DebugExit.restore(context.guest_exit, state or DebugExitState())


def _page_discard(context: DeviceContext, placement: Placement, state: PageDiscardState | None) -> ManagedDevice:
    """Pages a guest gives back read as zero afterwards. They are zeroed through GuestMemory, so dirty
    tracking (snapshots, migration) sees the change; unmapping them (`GuestMemory.discard`) would, in
    lazily restored memory, bring back the snapshot's bytes."""
    memory = context.memory
    args = PageDiscardArgs(memory.read, lambda gpa, size: memory.fill(gpa, size, 0))
    return PageDiscard.restore(args, state or PageDiscardState())


KINDS: dict[str, DeviceKind[Any]] = {kind.name: kind for kind in (
    DeviceKind("uart16550", SerialState, _serial),
    DeviceKind("debug-exit", DebugExitState, _debug_exit),
    DeviceKind("page-discard", PageDiscardState, _page_discard),
)}

# (name, kind, placement) of the devices a new VM gets, in attach order.
LEGACY_DEVICES: tuple[tuple[str, str, Placement], ...] = (
    (SERIAL, "uart16550", Placement(port=(COM1_PORT, PORT_COUNT), irq=COM1_IRQ)),
    (DEBUG_EXIT, "debug-exit", Placement(port=(DEBUG_EXIT_PORT, 4))),
    (PAGE_DISCARD, "page-discard", Placement(port=(PAGE_DISCARD_PORT, PAGE_DISCARD_PORTS))),
)


def attach_legacy(manager: DeviceManager) -> None:
    for name, kind, placement in LEGACY_DEVICES:
        manager.attach(name, kind, placement)
