"""The devices every pyrovisor VM has, their kinds and where they sit (PC-compatible ports)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pyrovisor.arch.x86_64.layout import VIRTIO_FIRST_GSI, VIRTIO_MMIO_BASE, VIRTIO_MMIO_WINDOW
from pyrovisor.arch.x86_64.stealth import firmware_strings
from pyrovisor.config import MachineConfig
from pyrovisor.devices.console import COM1_IRQ, COM1_PORT, PORT_COUNT, SerialConsole, SerialConsoleArgs
from pyrovisor.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit, DebugExitState
from pyrovisor.devices.fw_cfg import FW_CFG_PORT, FW_CFG_PORTS, FwCfg, FwCfgArgs, FwCfgState
from pyrovisor.devices.isa_debug_exit import (
    ISA_DEBUG_EXIT_PORT,
    ISA_DEBUG_EXIT_PORTS,
    IsaDebugExit,
    IsaDebugExitState,
)
from pyrovisor.devices.manager import DeviceContext, DeviceKind, DeviceManager, ManagedDevice, Placement
from pyrovisor.devices.page_discard import (
    PAGE_DISCARD_PORT,
    PAGE_DISCARD_PORTS,
    PageDiscard,
    PageDiscardArgs,
    PageDiscardState,
)
from pyrovisor.devices.serial import SerialState
from pyrovisor.devices.tpm import TPM_NAME, VirtualTpm, VirtualTpmState, fresh_state
from pyrovisor.devices.tpm_crb import TPM_CRB_BASE, TPM_WINDOW_SIZE
from pyrovisor.devices.virtio.balloon import BALLOON_NAME, VirtioBalloon, VirtioBalloonState
from pyrovisor.devices.virtio.blk import BlockOptions, VirtioBlk, VirtioBlkState
from pyrovisor.devices.virtio.mmio import MmioWiring, VirtioMmio
from pyrovisor.devices.virtio.net import NetOptions, VirtioNet, VirtioNetState
from pyrovisor.devices.virtio.rng import VirtioRng, VirtioRngState
from pyrovisor.devices.virtio.vsock import VirtioVsock, VirtioVsockState
from pyrovisor.errors import DeviceError

SERIAL = "serial0"
DEBUG_EXIT = "debug-exit"
PAGE_DISCARD = "page-discard"


def _serial(context: DeviceContext, name: str, placement: Placement, state: SerialState | None) -> ManagedDevice:
    interrupt = context.interrupt_line(placement.irq) if placement.irq is not None else None
    return SerialConsole.restore(SerialConsoleArgs(context.console_output, interrupt), state or SerialState())


def _debug_exit(context: DeviceContext, name: str, placement: Placement,
                state: DebugExitState | None) -> ManagedDevice:
    return DebugExit.restore(context.guest_exit, state or DebugExitState())


def _page_discard(context: DeviceContext, name: str, placement: Placement,
                  state: PageDiscardState | None) -> ManagedDevice:
    """Pages a guest gives back read as zero afterwards. They are zeroed through GuestMemory, so dirty
    tracking (snapshots, migration) sees the change; unmapping them (`GuestMemory.discard`) would, in
    lazily restored memory, bring back the snapshot's bytes."""
    memory = context.memory
    args = PageDiscardArgs(memory.read, lambda gpa, size: memory.fill(gpa, size, 0))
    return PageDiscard.restore(args, state or PageDiscardState())


def _wiring(context: DeviceContext, placement: Placement) -> MmioWiring:
    if context.loop is None or context.ioeventfd is None or context.irqfd is None or placement.mmio is None \
            or placement.irq is None:
        raise DeviceError("virtio", "needs an MMIO window, an interrupt, the I/O thread and KVM eventfds")
    ioeventfd, irqfd = context.ioeventfd, context.irqfd
    return MmioWiring(
        memory=context.memory, base=placement.mmio[0], gsi=placement.irq, loop=context.loop,
        register_ioeventfd=lambda fd, address, length, match: ioeventfd(fd, address, length, match, False),
        unregister_ioeventfd=lambda fd, address, length, match: ioeventfd(fd, address, length, match, True),
        register_irqfd=lambda fd, gsi: irqfd(fd, gsi, False),
        unregister_irqfd=lambda fd, gsi: irqfd(fd, gsi, True))


def _virtio_rng(context: DeviceContext, name: str, placement: Placement, state: VirtioRngState | None) -> ManagedDevice:
    state = state or VirtioRngState()
    return VirtioMmio(name, VirtioRng(state), _wiring(context, placement), state.transport)


def _virtio_blk(context: DeviceContext, name: str, placement: Placement, state: VirtioBlkState | None) -> ManagedDevice:
    if state is None or not state.path:
        raise DeviceError(name, "a disk needs a file")
    device = VirtioBlk(BlockOptions(Path(state.path), state.read_only, state.serial), state)
    try:
        return VirtioMmio(name, device, _wiring(context, placement), state.transport)
    except BaseException:
        device.close()
        raise


def _virtio_net(context: DeviceContext, name: str, placement: Placement, state: VirtioNetState | None) -> ManagedDevice:
    if state is None or not state.tap:
        raise DeviceError(name, "a network interface needs a tap device")
    wiring = _wiring(context, placement)
    device = VirtioNet(NetOptions(state.tap, state.mac), wiring.loop, state, name)
    try:
        transport = VirtioMmio(name, device, wiring, state.transport)
    except BaseException:
        device.close()
        raise
    device.kick = transport.kick  # the tap's readiness works through the transport, like a doorbell
    return transport


def _virtio_balloon(context: DeviceContext, name: str, placement: Placement,
                    state: VirtioBalloonState | None) -> ManagedDevice:
    wiring = _wiring(context, placement)
    device = VirtioBalloon(context.memory, state, wiring.loop, name)
    try:
        transport = VirtioMmio(name, device, wiring, state.transport if state is not None else None)
    except BaseException:
        device.close()
        raise
    device.attached(transport.lock, transport.kick)  # host requests share its lock and go through its checks
    return transport


def _balloon_entries(config: MachineConfig) -> list[tuple[str, str, Any]]:
    if config.balloon is None:
        return []
    return [(BALLOON_NAME, "virtio-balloon", VirtioBalloonState(stats_interval_s=config.balloon.stats_interval_s,
                                                                 deflate_on_oom=config.balloon.deflate_on_oom))]


def _virtio_vsock(context: DeviceContext, name: str, placement: Placement,
                  state: VirtioVsockState | None) -> ManagedDevice:
    if state is None or not state.uds_path:
        raise DeviceError(name, "a vsock device needs a guest cid and a Unix socket path")
    wiring = _wiring(context, placement)
    device = VirtioVsock(state.cid, Path(state.uds_path), state, name)
    try:
        transport = VirtioMmio(name, device, wiring, state.transport)
    except BaseException:
        device.close()
        raise
    try:
        device.start(transport)  # its sockets go on the event loop, its work runs under the transport's lock
    except BaseException:
        transport.close()
        raise
    return transport


def _tpm(context: DeviceContext, name: str, placement: Placement, state: VirtualTpmState | None) -> ManagedDevice:
    return VirtualTpm(state or fresh_state(None))


def _isa_debug_exit(context: DeviceContext, name: str, placement: Placement,
                    state: IsaDebugExitState | None) -> ManagedDevice:
    return IsaDebugExit.restore(context.guest_exit, state or IsaDebugExitState())


def _fw_cfg(context: DeviceContext, name: str, placement: Placement, state: FwCfgState | None) -> ManagedDevice:
    return FwCfg.restore(FwCfgArgs(context.memory.read, context.memory.write), state or FwCfgState())


KINDS: dict[str, DeviceKind[Any]] = {kind.name: kind for kind in (
    DeviceKind("uart16550", SerialState, _serial),
    DeviceKind("debug-exit", DebugExitState, _debug_exit),
    DeviceKind("page-discard", PageDiscardState, _page_discard),
    DeviceKind("virtio-rng", VirtioRngState, _virtio_rng),
    DeviceKind("virtio-blk", VirtioBlkState, _virtio_blk),
    DeviceKind("virtio-vsock", VirtioVsockState, _virtio_vsock),
    DeviceKind("virtio-net", VirtioNetState, _virtio_net),
    DeviceKind("virtio-balloon", VirtioBalloonState, _virtio_balloon),
    DeviceKind("isa-debug-exit", IsaDebugExitState, _isa_debug_exit),
    DeviceKind("fw-cfg", FwCfgState, _fw_cfg),
    DeviceKind("tpm-crb", VirtualTpmState, _tpm),
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


FW_CFG = "fw-cfg"
ISA_DEBUG_EXIT = "isa-debug-exit"

# The devices of a Multiboot machine, at the addresses QEMU gives them (-device isa-debug-exit,iobase=0xf4,iosize=4).
MULTIBOOT_DEVICES: tuple[tuple[str, str, Placement], ...] = (
    (SERIAL, "uart16550", Placement(port=(COM1_PORT, PORT_COUNT), irq=COM1_IRQ)),
    (ISA_DEBUG_EXIT, "isa-debug-exit", Placement(port=(ISA_DEBUG_EXIT_PORT, ISA_DEBUG_EXIT_PORTS))),
)


def attach_multiboot_devices(manager: DeviceManager, fw_cfg: FwCfgState) -> None:
    """QEMU's legacy devices for a Multiboot kernel: COM1, isa-debug-exit and fw_cfg with these items."""
    for name, kind, placement in MULTIBOOT_DEVICES:
        manager.attach(name, kind, placement)
    manager.attach(FW_CFG, "fw-cfg", Placement(port=(FW_CFG_PORT, FW_CFG_PORTS)), fw_cfg)


def virtio_placement(index: int) -> Placement:
    """The n-th virtio-mmio device's window and interrupt (the guest learns them from the command line and
    the boot info)."""
    return Placement(mmio=(VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_WINDOW, VIRTIO_MMIO_WINDOW),
                     irq=VIRTIO_FIRST_GSI + index)


def virtio_devices(config: MachineConfig) -> list[tuple[str, str, Any]]:
    """(name, kind, initial state) of the virtio devices a configuration asks for, in attach order."""
    devices: list[tuple[str, str, Any]] = []
    for index, disk in enumerate(config.disks):
        devices.append((f"blk{index}", "virtio-blk", VirtioBlkState(path=str(disk.path), read_only=disk.read_only,
                                                                     serial=disk.serial)))
    if config.rng:
        devices.append(("rng0", "virtio-rng", VirtioRngState()))
    devices.extend(_balloon_entries(config))  # virtio-balloon: devices/virtio/balloon.py
    for index, net in enumerate(config.nets):  # virtio-net: devices/virtio/net.py
        devices.append((f"net{index}", "virtio-net", VirtioNetState(tap=net.tap, mac=net.mac)))
    if config.vsock is not None:  # virtio-vsock: devices/virtio/vsock.py
        devices.append(("vsock0", "virtio-vsock", VirtioVsockState(cid=config.vsock.cid,
                                                                   uds_path=str(config.vsock.uds_path))))
    return devices


def attach_virtio(manager: DeviceManager, config: MachineConfig) -> None:
    vendor_id = firmware_strings(config.stealth).virtio_vendor_id  # --stealth: not pyrovisor's "PYRV"
    for index, (name, kind, state) in enumerate(virtio_devices(config)):
        state = replace(state, transport=replace(state.transport, vendor_id=vendor_id))
        manager.attach(name, kind, virtio_placement(index), state)


TPM_PLACEMENT = Placement(mmio=(TPM_CRB_BASE, TPM_WINDOW_SIZE))  # where QEMU's tpm-crb sits; no interrupt


def attach_tpm(manager: DeviceManager, config: MachineConfig) -> None:
    """The vTPM the configuration asks for (its swtpm starts now; the boot is measured once it is loaded)."""
    if config.tpm is not None:
        manager.attach(TPM_NAME, "tpm-crb", TPM_PLACEMENT, fresh_state(config.tpm.state_dir))


def virtio_command_line(manager: DeviceManager) -> str:
    """Linux's announcement of virtio-mmio devices: virtio_mmio.device=<size>@<base>:<irq> for each."""
    words = []
    for entry in manager:
        if isinstance(entry.device, VirtioMmio):
            base, size = entry.placement.mmio or (0, 0)
            words.append(f"virtio_mmio.device={size // 1024}K@{base:#x}:{entry.placement.irq}")
    return " ".join(words)
