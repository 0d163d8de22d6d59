"""build_vm: assembles a VM from a MachineConfig as a short recipe of attach steps."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pyrovisor.arch.x86_64 import cpuid, layout
from pyrovisor.arch.x86_64.boot import long_mode_entry
from pyrovisor.arch.x86_64.boot_info import BOOT_INFO_MAGIC, BOOT_INFO_VERSION, MAX_RAM_RANGES, BootInfo
from pyrovisor.arch.x86_64.descriptors import boot_gdt, tss_image
from pyrovisor.arch.x86_64.paging import BootPageTables, boot_alias_to_physical, build_boot_page_tables
from pyrovisor.config import MachineConfig
from pyrovisor.devices.bus import Bus, PortBus
from pyrovisor.devices.console import COM1_IRQ, COM1_PORT, PORT_COUNT, SerialConsole, SerialConsoleArgs
from pyrovisor.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from pyrovisor.devices.page_discard import PAGE_DISCARD_PORT, PAGE_DISCARD_PORTS, PageDiscard
from pyrovisor.errors import ConfigError, KvmError, LoaderError
from pyrovisor.kvm import Cap, Kvm, VcpuFd, uapi
from pyrovisor.kvm.vm import DIRTY_GFN_SIZE, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE
from pyrovisor.loader import LoadResult, load_elf
from pyrovisor.loader.elf import AP_ENTRY_SYMBOL
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.snapshot.chain import SnapshotLink, load_chain
from pyrovisor.snapshot.memory_file import apply_diff_image, open_full_image
from pyrovisor.snapshot.state import MachineState
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.registers import apply_entry_state
from pyrovisor.vstate.run_control import RunControl, RunOutcome, StopReason
from pyrovisor.vstate.vcpu import Vcpu, install_kick_handler
from pyrovisor.vstate.vcpu_state import restore_vcpu
from pyrovisor.vstate.vm import Vm
from pyrovisor.vstate.vm_state import restore_vm_state


@dataclass
class Assembly:
    """What the recipe has built so far; each step reads and adds to it."""

    config: MachineConfig
    kvm: Kvm
    console_output: Callable[[bytes], None]
    control: RunControl = field(default_factory=RunControl)
    port_bus: PortBus = field(default_factory=PortBus)
    mmio_bus: Bus = field(default_factory=lambda: Bus("MMIO"))
    vm: Vm | None = None
    memory: GuestMemory | None = None
    console: SerialConsole | None = None
    debug_exit: DebugExit | None = None
    kernel: LoadResult | None = None
    initrd_gpa: int = 0
    initrd_size: int = 0
    page_tables: BootPageTables | None = None
    vcpu_fds: list[VcpuFd] = field(default_factory=list)

    def require_vm(self) -> Vm:
        assert self.vm is not None, "create_vm must run first"
        return self.vm

    def require_memory(self) -> GuestMemory:
        assert self.memory is not None, "attach_memory must run first"
        return self.memory


def create_vm(assembly: Assembly) -> None:
    install_kick_handler()
    assembly.vm = Vm(assembly.kvm)


def attach_memory(assembly: Assembly) -> None:
    config = assembly.config
    regions = []
    for ram in layout.ram_ranges(config.memory_size):
        if config.shared_memory:
            regions.append(MemoryRegion.memfd(ram.gpa, ram.size))
        else:
            regions.append(MemoryRegion.anonymous(ram.gpa, ram.size, huge_pages=config.huge_pages))
    assembly.memory = GuestMemory(regions)
    assembly.require_vm().add_guest_memory(assembly.memory)


PIC_VECTOR_BASES = {IRQCHIP_PIC_MASTER: 0x20, IRQCHIP_PIC_SLAVE: 0x28}


def attach_irqchip(assembly: Assembly) -> None:
    """The in-kernel LAPICs, IOAPIC and PICs, the PICs left as PC firmware leaves them: remapped above
    the exception vectors (0x20-0x2f) with every line masked. Untouched, KVM's PICs deliver IRQ n as
    vector n, so a guest enabling a device interrupt would see it as a CPU exception."""
    vm = assembly.require_vm()
    vm.create_irqchip()
    for chip_id, base in PIC_VECTOR_BASES.items():
        chip = vm.fd.get_irqchip(chip_id)
        chip.chip.pic.irq_base = base
        chip.chip.pic.imr = 0xFF
        chip.chip.pic.init4 = 1
        vm.fd.set_irqchip(chip)


def enable_dirty_ring(assembly: Assembly) -> None:
    """Per-vCPU dirty rings instead of the dirty bitmap, when the configuration asks (before any vCPU)."""
    entries = assembly.config.dirty_ring_entries
    if not entries:
        return
    limit = assembly.kvm.check_extension(Cap.DIRTY_LOG_RING)
    if entries * DIRTY_GFN_SIZE > limit:
        raise ConfigError("dirty ring entries", entries,
                          "this host has no dirty ring" if not limit else f"this host allows {limit // DIRTY_GFN_SIZE}")
    assembly.require_vm().fd.enable_cap(Cap.DIRTY_LOG_RING, entries * DIRTY_GFN_SIZE)


def attach_legacy_devices(assembly: Assembly) -> None:
    vm = assembly.require_vm()
    control = assembly.control
    assembly.console = SerialConsole(assembly.console_output, vm.interrupt_line(COM1_IRQ))
    assembly.port_bus.insert(COM1_PORT, PORT_COUNT, assembly.console, "serial0")

    def guest_exit(code: int) -> None:
        control.finish(RunOutcome(StopReason.GUEST_EXIT, exit_code=code))

    assembly.debug_exit = DebugExit(guest_exit)
    assembly.port_bus.insert(DEBUG_EXIT_PORT, 4, assembly.debug_exit, "debug-exit")
    _attach_page_discard(assembly)


def _attach_page_discard(assembly: Assembly) -> None:
    """Pages a guest gives back read as zero afterwards. They are zeroed through GuestMemory, so dirty
    tracking (snapshots, migration) sees the change; unmapping them (`GuestMemory.discard`) would not be
    seen, and in lazily restored memory would bring back the snapshot's bytes."""
    memory = assembly.require_memory()
    device = PageDiscard(memory.read, lambda gpa, size: memory.fill(gpa, size, 0))
    assembly.port_bus.insert(PAGE_DISCARD_PORT, PAGE_DISCARD_PORTS, device, "page-discard")


def load_kernel(assembly: Assembly) -> None:
    memory = assembly.require_memory()
    identity_limit = max(layout.MMIO_HOLE_END, memory.end)
    assembly.kernel = load_elf(assembly.config.kernel, memory, layout.KERNEL_MIN_GPA,
                               lambda address: boot_alias_to_physical(address, identity_limit))
    if assembly.config.vcpus > 1 and assembly.kernel.ap_entry is None:
        raise LoaderError(assembly.kernel.path, f"has no '{AP_ENTRY_SYMBOL}' symbol, so it cannot start "
                          f"{assembly.config.vcpus} vCPUs; run it with --vcpus 1")


def load_initrd(assembly: Assembly) -> None:
    path = assembly.config.initrd
    if path is None:
        return
    assert assembly.kernel is not None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoaderError(str(path), exc.strerror or "cannot read") from None
    memory = assembly.require_memory()
    gpa = assembly.kernel.image_end
    if not memory.contains(gpa, max(len(data), 1)):
        raise LoaderError(str(path), f"{len(data)} bytes do not fit in guest RAM after the kernel; use more --memory")
    memory.write(gpa, data)
    assembly.initrd_gpa, assembly.initrd_size = gpa, len(data)


def write_boot_data(assembly: Assembly) -> None:
    """Page tables, GDT, per-vCPU TSS, command line and the boot-info block (boot protocol v1)."""
    config, memory = assembly.config, assembly.require_memory()
    assert assembly.kernel is not None
    ranges = layout.ram_ranges(config.memory_size)
    assembly.page_tables = build_boot_page_tables(ranges, memory.write_u64, layout.PAGE_TABLES_GPA,
                                                  layout.PAGE_TABLES_END)
    tss_addresses = [layout.tss_gpa(index) for index in range(config.vcpus)]
    gdt = boot_gdt(tss_addresses)
    memory.write(layout.GDT_GPA, gdt)
    for address in tss_addresses:
        memory.write(address, tss_image())
    cmdline = config.cmdline.encode()
    memory.write(layout.CMDLINE_GPA, cmdline + b"\0")

    info = BootInfo(
        magic=BOOT_INFO_MAGIC, version=BOOT_INFO_VERSION, size=ctypes.sizeof(BootInfo), nr_vcpus=config.vcpus,
        cmdline_gpa=layout.CMDLINE_GPA, cmdline_len=len(cmdline), nr_ram_ranges=len(ranges),
        initrd_gpa=assembly.initrd_gpa, initrd_size=assembly.initrd_size,
        kernel_start=assembly.kernel.image_start, kernel_end=assembly.kernel.image_end,
        page_tables_gpa=assembly.page_tables.root,
        page_tables_size=assembly.page_tables.pages_used * layout.PAGE_SIZE,
        gdt_gpa=layout.GDT_GPA, gdt_limit=len(gdt) - 1, tss_gpa=layout.TSS_ARRAY_GPA, tss_stride=layout.TSS_STRIDE,
        direct_map_base=layout.DIRECT_MAP_BASE, kernel_map_base=layout.KERNEL_MAP_BASE,
        console_port=COM1_PORT, debug_exit_port=DEBUG_EXIT_PORT, console_irq=COM1_IRQ,
    )
    if len(ranges) > MAX_RAM_RANGES:
        raise ConfigError("memory size", config.memory_size, "too many RAM ranges for the boot info")
    for index, ram in enumerate(ranges):
        info.ram[index].gpa, info.ram[index].size = ram.gpa, ram.size
    assembly.vcpu_fds = [assembly.require_vm().create_vcpu(index) for index in range(config.vcpus)]
    info.tsc_khz = _tsc_khz(assembly.vcpu_fds[0])
    memory.write(layout.BOOT_INFO_GPA, bytes(info))


def setup_vcpus(assembly: Assembly) -> None:
    """CPUID per vCPU, the long-mode entry state, and APs made runnable at their entry point."""
    config, kernel = assembly.config, assembly.kernel
    assert kernel is not None and assembly.page_tables is not None
    supported = assembly.kvm.get_supported_cpuid()
    gdt_limit = len(boot_gdt([0] * config.vcpus)) - 1
    for index, fd in enumerate(assembly.vcpu_fds):
        fd.set_cpuid2(cpuid.for_vcpu(supported, index))
        entry = kernel.entry if index == 0 else kernel.ap_entry
        assert entry is not None
        apply_entry_state(fd, long_mode_entry(index, entry, assembly.page_tables.root, gdt_limit,
                                              layout.BOOT_INFO_GPA))
        if index > 0:
            fd.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)


RECIPE: tuple[Callable[[Assembly], None], ...] = (
    create_vm,
    attach_memory,
    attach_irqchip,
    enable_dirty_ring,
    attach_legacy_devices,
    load_kernel,
    load_initrd,
    write_boot_data,
    setup_vcpus,
)


def build_vm(config: MachineConfig, console_output: Callable[[bytes], None], kvm: Kvm | None = None) -> Vmm:
    """Build a VM ready to start. On failure everything built so far is released."""
    config.validate()
    assembly = Assembly(config, kvm or Kvm(), console_output)
    try:
        for step in RECIPE:
            step(assembly)
    except BaseException:
        _release(assembly, owns_kvm=kvm is None)
        raise
    return _finish(assembly, owns_kvm=kvm is None)


def _finish(assembly: Assembly, owns_kvm: bool) -> Vmm:
    assert assembly.console is not None and assembly.debug_exit is not None and assembly.kernel is not None
    vcpus = [Vcpu(index, fd, assembly.port_bus, assembly.mmio_bus, assembly.control)
             for index, fd in enumerate(assembly.vcpu_fds)]
    ring_bytes = assembly.config.dirty_ring_entries * DIRTY_GFN_SIZE
    rings = [fd.map_dirty_ring(ring_bytes) for fd in assembly.vcpu_fds] if ring_bytes else []
    return Vmm(
        config=assembly.config, kvm=assembly.kvm, vm=assembly.require_vm(), memory=assembly.require_memory(),
        vcpus=vcpus, port_bus=assembly.port_bus, mmio_bus=assembly.mmio_bus, control=assembly.control,
        console=assembly.console, debug_exit=assembly.debug_exit, kernel=assembly.kernel, owns_kvm=owns_kvm,
        dirty_rings=rings,
    )


def _release(assembly: Assembly, owns_kvm: bool) -> None:
    for fd in assembly.vcpu_fds:
        fd.close()
    if assembly.vm is not None:
        assembly.vm.close()
    if assembly.memory is not None:
        assembly.memory.close()
    if owns_kvm:
        assembly.kvm.close()


def _tsc_khz(vcpu: VcpuFd) -> int:
    try:
        return vcpu.get_tsc_khz()
    except KvmError:  # not all hosts report it; the guest then calibrates or does without
        return 0


def restore_vm(directory: Path, console_output: Callable[[bytes], None], lazy: bool = True, verify: bool = False,
               track_dirty: bool = False, kvm: Kvm | None = None) -> Vmm:
    """Rebuild a VM from a snapshot directory (and the bases a diff builds on), ready to start.

    Every file is read and checked before anything is created; a refused snapshot changes nothing.
    With `lazy`, memory is the full image mapped copy-on-write (the file must stay); otherwise its
    data is read into anonymous memory. `verify` checks the memory files' checksums first.
    """
    chain = load_chain(directory)
    machine = chain[-1].state.machine
    memory = open_chain_memory(chain, lazy=lazy, verify=verify)
    vmm = assemble_vm(machine, memory, console_output, kvm)
    vmm.last_snapshot = (chain[-1].directory, chain[-1].state.snapshot_id)
    if track_dirty:
        vmm.snapshot_log = vmm.dirty.subscribe()
    return vmm


def open_chain_memory(chain: list[SnapshotLink], lazy: bool = True, verify: bool = False) -> GuestMemory:
    """The guest memory a snapshot chain describes: its full image, then each diff laid on top."""
    memory = open_full_image(chain[0].directory, chain[0].state.memory, chain[-1].state.machine.ram, lazy=lazy,
                             verify=verify)
    try:
        for link in chain[1:]:
            apply_diff_image(link.directory, link.state.memory, memory, verify=verify)
    except BaseException:
        memory.close()
        raise
    return memory


def assemble_vm(machine: MachineState, memory: GuestMemory, console_output: Callable[[bytes], None],
                kvm: Kvm | None = None) -> Vmm:
    """A VM from saved machine state and guest memory already filled in (restore, migration).

    The memory becomes the VM's; on failure it is released with everything else.
    """
    assembly = Assembly(machine.config, kvm or Kvm(), console_output, memory=memory, kernel=machine.kernel)
    try:
        create_vm(assembly)
        assembly.require_vm().add_guest_memory(memory)
        assembly.require_vm().create_irqchip()  # its state is restored below
        enable_dirty_ring(assembly)
        _attach_devices_from_state(assembly, machine)
        assembly.vcpu_fds = [assembly.require_vm().create_vcpu(index) for index in range(machine.config.vcpus)]
        for fd, vcpu_state in zip(assembly.vcpu_fds, machine.vcpus, strict=True):
            restore_vcpu(fd, vcpu_state, assembly.kvm)
        restore_vm_state(assembly.require_vm().fd, machine.vm)
    except BaseException:
        _release(assembly, owns_kvm=kvm is None)
        raise
    return _finish(assembly, owns_kvm=kvm is None)


def _attach_devices_from_state(assembly: Assembly, state: MachineState) -> None:
    vm, control = assembly.require_vm(), assembly.control
    assembly.console = SerialConsole.restore(SerialConsoleArgs(assembly.console_output, vm.interrupt_line(COM1_IRQ)),
                                             state.devices.serial)
    assembly.port_bus.insert(COM1_PORT, PORT_COUNT, assembly.console, "serial0")

    def guest_exit(code: int) -> None:
        control.finish(RunOutcome(StopReason.GUEST_EXIT, exit_code=code))

    assembly.debug_exit = DebugExit.restore(guest_exit, state.devices.debug_exit)
    assembly.port_bus.insert(DEBUG_EXIT_PORT, 4, assembly.debug_exit, "debug-exit")
    _attach_page_discard(assembly)


__all__ = ["RECIPE", "Assembly", "assemble_vm", "build_vm", "open_chain_memory", "restore_vm"]
