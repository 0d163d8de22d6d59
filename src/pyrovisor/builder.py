"""build_vm and restore_vm: a VM assembled as a short recipe of steps, every resource owned from the moment
it exists, so a failure at any step releases everything built before it."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from pyrovisor.arch.x86_64 import cpuid, layout
from pyrovisor.arch.x86_64.acpi import ACPI_TABLES_GPA, acpi_tables
from pyrovisor.arch.x86_64.boot import long_mode_entry
from pyrovisor.arch.x86_64.boot_info import BOOT_INFO_MAGIC, BOOT_INFO_VERSION, MAX_RAM_RANGES, BootInfo
from pyrovisor.arch.x86_64.descriptors import boot_gdt, tss_image
from pyrovisor.arch.x86_64.layout import CMDLINE_MAX
from pyrovisor.arch.x86_64.multiboot_info import (
    BOOT_DATA_GPA,
    BOOT_DATA_SIZE,
    BOOTLOADER_MAGIC,
    ENTRY_STACK_TOP,
    GDT_OFFSET,
    HIGH_MEMORY_START,
    INFO_OFFSET,
    LOW_MEMORY_END,
    MAX_MODULES,
    MEMORY_AVAILABLE,
    BootModule,
    boot_data_page,
)
from pyrovisor.arch.x86_64.paging import BootPageTables, boot_alias_to_physical, build_boot_page_tables
from pyrovisor.arch.x86_64.protected_mode import flat_gdt, protected_mode_entry
from pyrovisor.arch.x86_64.stealth import firmware_strings, host_brand_string, host_cpu_for, stealth_cpuid
from pyrovisor.config import BOOT_MULTIBOOT, MachineConfig
from pyrovisor.devices.bus import Bus, PortBus
from pyrovisor.devices.console import COM1_IRQ, COM1_PORT
from pyrovisor.devices.debug_exit import DEBUG_EXIT_PORT
from pyrovisor.devices.fw_cfg import FwCfgState, fw_cfg_items
from pyrovisor.devices.manager import DeviceContext, DeviceManager
from pyrovisor.devices.platform import (
    KINDS,
    attach_legacy,
    attach_multiboot_devices,
    attach_tpm,
    attach_virtio,
    virtio_command_line,
)
from pyrovisor.devices.tpm import TPM_NAME, BootMeasurement, VirtualTpm
from pyrovisor.errors import ConfigError, LoaderError
from pyrovisor.events.eventfd import EventFd
from pyrovisor.events.loop import EventLoop
from pyrovisor.kvm import Cap, Kvm, uapi
from pyrovisor.kvm.vm import DIRTY_GFN_SIZE, IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE
from pyrovisor.loader import LoadResult, load_elf
from pyrovisor.loader.elf import AP_ENTRY_SYMBOL, read_image
from pyrovisor.loader.multiboot import ADDRESS_LIMIT, Reserved, load_multiboot
from pyrovisor.memory import GuestMemory, MemoryRegion
from pyrovisor.persist.machine import MachineState
from pyrovisor.snapshot.chain import SnapshotLink, load_chain
from pyrovisor.snapshot.memory_file import apply_diff_image, open_full_image
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.dirty import DirtyTracker, RingSource
from pyrovisor.vstate.registers import apply_entry_state
from pyrovisor.vstate.run_control import RunControl, RunOutcome, StopReason
from pyrovisor.vstate.vcpu import Vcpu, VcpuArgs, install_kick_handler
from pyrovisor.vstate.vcpu_state import host_tsc_khz
from pyrovisor.vstate.vm import Vm
from pyrovisor.vstate.vm_state import KernelDevices


@dataclass
class Assembly:
    """What the recipe has built so far. Each step reads it, adds to it, and hands every resource it
    creates to `resources` at once, so whatever happens next, it is released."""

    config: MachineConfig
    console_output: Callable[[bytes], None]
    resources: ExitStack
    kvm: Kvm | None = None
    saved: MachineState | None = None  # restore and migration: the state to rebuild
    control: RunControl = field(default_factory=RunControl)
    vm: Vm | None = None
    memory: GuestMemory | None = None
    loop: EventLoop | None = None
    devices: DeviceManager | None = None
    kernel: LoadResult | None = None
    initrd_gpa: int = 0
    initrd_size: int = 0
    cmdline: bytes = b""  # the command line the guest gets (the user's words and the devices')
    kernel_image: bytes = b""  # the kernel file's bytes as loaded, and the initrd's: what the vTPM measures
    initrd_image: bytes | None = None
    page_tables: BootPageTables | None = None
    vcpus: list[Vcpu] = field(default_factory=list)
    dirty: DirtyTracker | None = None

    def require_kvm(self) -> Kvm:
        assert self.kvm is not None, "open_kvm must run first"
        return self.kvm

    def require_vm(self) -> Vm:
        assert self.vm is not None, "create_vm must run first"
        return self.vm

    def require_memory(self) -> GuestMemory:
        assert self.memory is not None, "attach_memory must run first"
        return self.memory

    def require_saved(self) -> MachineState:
        assert self.saved is not None, "restore steps need a saved machine state"
        return self.saved


Step = Callable[[Assembly], None]


# --- steps shared by build and restore ---------------------------------------------------------------
def open_kvm(assembly: Assembly) -> None:
    if assembly.kvm is None:
        assembly.kvm = Kvm()
        assembly.resources.callback(assembly.kvm.close)


def create_vm(assembly: Assembly) -> None:
    install_kick_handler()
    assembly.vm = vm = Vm(assembly.require_kvm())
    assembly.resources.callback(vm.close)


def attach_memory(assembly: Assembly) -> None:
    """Fresh RAM for a new VM (restore and migration bring theirs), then a memslot per region."""
    config = assembly.config
    if assembly.memory is None:
        regions: list[MemoryRegion] = []
        for ram in layout.ram_ranges(config.memory_size):
            if config.shared_memory:
                region = MemoryRegion.memfd(ram.gpa, ram.size)
            else:
                region = MemoryRegion.anonymous(ram.gpa, ram.size, huge_pages=config.huge_pages)
            assembly.resources.callback(region.close)
            regions.append(region)
        assembly.memory = GuestMemory(regions)
    vm = assembly.require_vm()
    assembly.resources.callback(vm.remove_all_memslots)  # before the memory is unmapped
    vm.add_guest_memory(assembly.memory)


def create_irqchip(assembly: Assembly) -> None:
    assembly.require_vm().create_irqchip()


def enable_dirty_ring(assembly: Assembly) -> None:
    """Per-vCPU dirty rings instead of the dirty bitmap, when the configuration asks (before any vCPU)."""
    entries = assembly.config.dirty_ring_entries
    if not entries:
        return
    limit = assembly.require_kvm().check_extension(Cap.DIRTY_LOG_RING)
    if entries * DIRTY_GFN_SIZE > limit:
        raise ConfigError("dirty ring entries", entries,
                          "this host has no dirty ring" if not limit else f"this host allows {limit // DIRTY_GFN_SIZE}")
    assembly.require_vm().fd.enable_cap(Cap.DIRTY_LOG_RING, entries * DIRTY_GFN_SIZE)


def create_event_loop(assembly: Assembly) -> None:
    """The VM's I/O thread (it starts with the vCPUs): device work runs there, never on a vCPU."""
    assembly.loop = loop = EventLoop("io")
    assembly.resources.callback(loop.close)


def create_device_manager(assembly: Assembly) -> None:
    vm, memory, control = assembly.require_vm(), assembly.require_memory(), assembly.control

    def guest_exit(code: int) -> None:
        control.finish(RunOutcome(StopReason.GUEST_EXIT, exit_code=code))

    def ioeventfd(eventfd: EventFd, address: int, length: int, datamatch: int, deassign: bool) -> None:
        vm.fd.ioeventfd(eventfd.fd, address, length, datamatch, deassign=deassign)

    def irqfd(eventfd: EventFd, gsi: int, deassign: bool) -> None:
        vm.fd.irqfd(eventfd.fd, gsi, deassign=deassign)

    context = DeviceContext(memory=memory, interrupt_line=vm.interrupt_line, console_output=assembly.console_output,
                            guest_exit=guest_exit, loop=assembly.loop, ioeventfd=ioeventfd, irqfd=irqfd)
    assembly.devices = DeviceManager(KINDS, PortBus(), Bus("MMIO"), context)
    assembly.resources.callback(assembly.devices.close)


def create_vcpus(assembly: Assembly) -> None:
    """vCPU fds and their Vcpu objects (threads start later), each fd owned as soon as it exists; when
    restoring, each vCPU is loaded with its saved state."""
    kvm, vm, devices = assembly.require_kvm(), assembly.require_vm(), assembly.devices
    assert devices is not None
    msr_indices = kvm.get_msr_index_list()
    for index in range(assembly.config.vcpus):
        fd = vm.create_vcpu(index)
        assembly.resources.callback(fd.close)
        args = VcpuArgs(index, fd, devices.port_bus, devices.mmio_bus, assembly.control, kvm, msr_indices)
        saved = assembly.saved
        assembly.vcpus.append(Vcpu.restore(args, saved.vcpus[index]) if saved is not None else Vcpu(args))


def vcpu_cpuid(assembly: Assembly, supported: tuple[cpuid.CpuidEntry, ...], index: int) -> tuple[cpuid.CpuidEntry, ...]:
    """The CPUID table of vCPU `index`: KVM's supported leaves, without hypervisor traces under --stealth."""
    table = cpuid.for_vcpu(supported, index)
    return stealth_cpuid(table, host_brand_string()) if assembly.config.stealth else table


def pin_vcpus(assembly: Assembly) -> None:
    """--stealth: each vCPU thread pinned to one host CPU (round robin over the CPUs this process may use), so
    the guest sees one CPU's TSC and no migration noise; the thread pins itself before its seccomp filter loads."""
    if assembly.config.stealth:
        for vcpu in assembly.vcpus:
            vcpu.host_cpus = frozenset({host_cpu_for(vcpu.index)})


def track_dirty_pages(assembly: Assembly) -> None:
    """The dirty tracker, over the vCPUs' dirty rings when configured (mapped here) or KVM's bitmap."""
    ring_bytes = assembly.config.dirty_ring_entries * DIRTY_GFN_SIZE
    source = None
    if ring_bytes:
        rings = []
        for vcpu in assembly.vcpus:
            ring = vcpu.fd.map_dirty_ring(ring_bytes)
            assembly.resources.callback(ring.close)
            rings.append(ring)
        source = RingSource(assembly.require_vm(), rings)
        assembly.resources.callback(source.release)  # drop the views before the rings are unmapped
    assembly.dirty = DirtyTracker(assembly.require_vm(), assembly.require_memory(), source)


# --- build: a new VM from a configuration ---------------------------------------------------------------
PIC_VECTOR_BASES = {IRQCHIP_PIC_MASTER: 0x20, IRQCHIP_PIC_SLAVE: 0x28}


def remap_pics(assembly: Assembly) -> None:
    """The PICs as PC firmware leaves them: remapped above the exception vectors (0x20-0x2f) with every
    line masked. Untouched, KVM's PICs deliver IRQ n as vector n, so a guest enabling a device interrupt
    would see it as a CPU exception."""
    vm = assembly.require_vm()
    for chip_id, base in PIC_VECTOR_BASES.items():
        chip = vm.fd.get_irqchip(chip_id)
        chip.chip.pic.irq_base = base
        chip.chip.pic.imr = 0xFF
        chip.chip.pic.init4 = 1
        vm.fd.set_irqchip(chip)


def attach_devices(assembly: Assembly) -> None:
    """The platform's devices, then the virtio devices the configuration asks for."""
    assert assembly.devices is not None
    attach_legacy(assembly.devices)
    attach_virtio(assembly.devices, assembly.config)
    attach_tpm(assembly.devices, assembly.config)


def load_kernel(assembly: Assembly) -> None:
    memory = assembly.require_memory()
    identity_limit = max(layout.MMIO_HOLE_END, memory.end)
    assembly.kernel_image = read_image(assembly.config.kernel)
    assembly.kernel = load_elf(assembly.config.kernel, memory, layout.KERNEL_MIN_GPA,
                               lambda address: boot_alias_to_physical(address, identity_limit),
                               image=assembly.kernel_image)
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
    assembly.initrd_image = data


def write_boot_data(assembly: Assembly) -> None:
    """Page tables, GDT, per-vCPU TSS, command line and the boot-info block (boot protocol v1)."""
    config, memory = assembly.config, assembly.require_memory()
    assert assembly.kernel is not None and assembly.vcpus
    ranges = layout.ram_ranges(config.memory_size)
    if len(ranges) > MAX_RAM_RANGES:
        raise ConfigError("memory size", config.memory_size, "too many RAM ranges for the boot info")
    assembly.page_tables = build_boot_page_tables(ranges, memory.write_u64, layout.PAGE_TABLES_GPA,
                                                  layout.PAGE_TABLES_END)
    tss_addresses = [layout.tss_gpa(index) for index in range(config.vcpus)]
    gdt = boot_gdt(tss_addresses)
    memory.write(layout.GDT_GPA, gdt)
    for address in tss_addresses:
        memory.write(address, tss_image())
    assert assembly.devices is not None
    announced = virtio_command_line(assembly.devices)
    cmdline = " ".join(part for part in (config.cmdline, announced) if part).encode()
    if len(cmdline) > CMDLINE_MAX:
        raise ConfigError("command line", config.cmdline[:40] + "...", f"with the virtio devices' words it is longer "
                          f"than {CMDLINE_MAX} bytes")
    memory.write(layout.CMDLINE_GPA, cmdline + b"\0")
    assembly.cmdline = cmdline

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
    for index, ram in enumerate(ranges):
        info.ram[index].gpa, info.ram[index].size = ram.gpa, ram.size
    virtio = [entry for entry in assembly.devices if entry.placement.mmio is not None and entry.kind.name.startswith(
        "virtio-")]
    info.nr_virtio = len(virtio)
    for index, entry in enumerate(virtio):
        assert entry.placement.mmio is not None and entry.placement.irq is not None
        info.virtio[index].base, info.virtio[index].size = entry.placement.mmio
        info.virtio[index].irq = entry.placement.irq
    info.tsc_khz = host_tsc_khz(assembly.vcpus[0].fd)  # 0 where unknown: the guest calibrates or does without
    memory.write(layout.BOOT_INFO_GPA, bytes(info))


def setup_vcpus(assembly: Assembly) -> None:
    """CPUID per vCPU, the long-mode entry state, and APs made runnable at their entry point."""
    config, kernel = assembly.config, assembly.kernel
    assert kernel is not None and assembly.page_tables is not None
    supported = assembly.require_kvm().get_supported_cpuid()
    gdt_limit = len(boot_gdt([0] * config.vcpus)) - 1
    for vcpu in assembly.vcpus:
        index, fd = vcpu.index, vcpu.fd
        fd.set_cpuid2(vcpu_cpuid(assembly, supported, index))
        entry = kernel.entry if index == 0 else kernel.ap_entry
        assert entry is not None
        apply_entry_state(fd, long_mode_entry(index, entry, assembly.page_tables.root, gdt_limit,
                                              layout.BOOT_INFO_GPA))
        if index > 0:
            fd.set_mp_state(uapi.KVM_MP_STATE_RUNNABLE)


def measure_boot(assembly: Assembly) -> None:
    """As the VM's firmware: the kernel, the initrd and the command line measured into the vTPM, if it has one
    (the bytes that were loaded, read once)."""
    devices, config = assembly.devices, assembly.config
    assert devices is not None
    if TPM_NAME not in devices:
        return
    tpm = devices[TPM_NAME]
    assert isinstance(tpm, VirtualTpm)
    tpm.measure_boot(BootMeasurement(kernel=assembly.kernel_image, kernel_name=config.kernel.name,
                                     initrd=assembly.initrd_image,
                                     initrd_name=config.initrd.name if config.initrd is not None else "",
                                     cmdline=assembly.cmdline))


BUILD_RECIPE: tuple[Step, ...] = (
    open_kvm,
    create_vm,
    attach_memory,
    create_irqchip,
    remap_pics,
    enable_dirty_ring,
    create_event_loop,
    create_device_manager,
    attach_devices,
    load_kernel,
    load_initrd,
    create_vcpus,
    pin_vcpus,
    track_dirty_pages,
    write_boot_data,
    measure_boot,
    setup_vcpus,
)


# --- build a Multiboot machine: QEMU's -kernel, its devices, 32-bit protected-mode entry --------------------
VMX_TSS_GPA = 0xFEFFD000  # 3 pages VMX needs to run real mode without unrestricted guest (as QEMU places them)
VMX_IDENTITY_MAP_GPA = 0xFEFFC000  # its identity page table for protected mode with paging off


def prepare_legacy_modes(assembly: Assembly) -> None:
    """Where Intel VMX without unrestricted guest keeps its real-mode TSS and identity map (the APs start in
    real mode); before any vCPU exists. Other hosts accept and ignore these."""
    vm = assembly.require_vm()
    vm.fd.set_identity_map_addr(VMX_IDENTITY_MAP_GPA)
    vm.fd.set_tss_addr(VMX_TSS_GPA)


def create_pit(assembly: Assembly) -> None:
    """KVM's i8254, as a PC has (after the irqchip: it interrupts through IRQ 0)."""
    assembly.require_vm().fd.create_pit2()


def attach_multiboot_platform(assembly: Assembly) -> None:
    assert assembly.devices is not None
    config = assembly.config
    e820 = tuple((ram.gpa, ram.size, MEMORY_AVAILABLE) for ram in layout.ram_ranges(config.memory_size))
    attach_multiboot_devices(assembly.devices, FwCfgState(fw_cfg_items(config.vcpus, config.memory_size, e820)))


def load_multiboot_kernel(assembly: Assembly) -> None:
    assembly.kernel = load_multiboot(assembly.config.kernel, assembly.require_memory(), MULTIBOOT_RESERVED).image


def write_multiboot_data(assembly: Assembly) -> None:
    """After the kernel: the command lines, then each module on a page boundary; below 1 MiB the boot-data page
    (GDT, information structure, memory map) and the ACPI tables."""
    config, memory, kernel = assembly.config, assembly.require_memory(), assembly.kernel
    assert kernel is not None
    files = ([(config.initrd, "")] if config.initrd is not None else []) + [(m.path, m.args) for m in config.modules]
    if len(files) > MAX_MODULES:
        raise ConfigError("modules", len(files), f"at most {MAX_MODULES}")
    texts = [f"{config.kernel} {config.cmdline}"] + [f"{path} {args}" if args else str(path) for path, args in files]
    strings, string_gpas = b"", []
    for text in texts:
        string_gpas.append(kernel.image_end + len(strings))
        strings += text.encode() + b"\0"
    _place(memory, str(config.kernel), kernel.image_end, strings)
    modules, gpa = [], kernel.image_end + len(strings)
    for (path, _), string_gpa in zip(files, string_gpas[1:], strict=True):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise LoaderError(str(path), exc.strerror or "cannot read") from None
        gpa = -(-gpa // layout.PAGE_SIZE) * layout.PAGE_SIZE
        _place(memory, str(path), gpa, data)
        modules.append(BootModule(gpa, gpa + len(data), string_gpa))
        gpa += len(data)
    ranges = layout.ram_ranges(config.memory_size)
    firmware = firmware_strings(config.stealth)
    memory.write(BOOT_DATA_GPA, boot_data_page(flat_gdt(), ranges, string_gpas[0], tuple(modules),
                                               loader_name=firmware.boot_loader_name))
    memory.write(ACPI_TABLES_GPA, acpi_tables(config.vcpus, identity=firmware.acpi))


def _place(memory: GuestMemory, name: str, gpa: int, data: bytes) -> None:
    """Write boot data the VMM places after the kernel, if it fits in RAM below 4 GiB, clear of the BIOS area."""
    end = gpa + len(data)
    if end > ADDRESS_LIMIT or not memory.contains(gpa, max(len(data), 1)) or any(
            gpa < area.end and area.start < end for area in MULTIBOOT_RESERVED):
        raise LoaderError(name, f"{len(data)} bytes do not fit in guest RAM at {gpa:#x} after the kernel and the "
                          "modules before it; use more --memory")
    memory.write(gpa, data)


def setup_multiboot_vcpus(assembly: Assembly) -> None:
    """vCPU 0 enters the kernel in 32-bit protected mode with EAX = the Multiboot magic and EBX = the information
    structure; the others stay as KVM resets them, waiting for INIT/SIPI through their in-kernel LAPIC."""
    kernel = assembly.kernel
    assert kernel is not None
    supported = assembly.require_kvm().get_supported_cpuid()
    for vcpu in assembly.vcpus:
        vcpu.fd.set_cpuid2(vcpu_cpuid(assembly, supported, vcpu.index))
    boot = assembly.vcpus[0].fd
    apply_entry_state(boot, protected_mode_entry(kernel.entry, BOOT_DATA_GPA + GDT_OFFSET, ENTRY_STACK_TOP))
    regs = boot.get_regs()
    regs.rax, regs.rbx = BOOTLOADER_MAGIC, BOOT_DATA_GPA + INFO_OFFSET
    boot.set_regs(regs)


MULTIBOOT_RESERVED = (Reserved(BOOT_DATA_GPA, BOOT_DATA_GPA + BOOT_DATA_SIZE, "boot information page"),
                      Reserved(LOW_MEMORY_END, HIGH_MEMORY_START, "BIOS area (ACPI tables)"))

MULTIBOOT_RECIPE: tuple[Step, ...] = (
    open_kvm,
    create_vm,
    prepare_legacy_modes,
    attach_memory,
    create_irqchip,
    remap_pics,
    create_pit,
    enable_dirty_ring,
    create_event_loop,
    create_device_manager,
    attach_multiboot_platform,
    load_multiboot_kernel,
    create_vcpus,
    pin_vcpus,
    track_dirty_pages,
    write_multiboot_data,
    setup_multiboot_vcpus,
)


# --- restore: a VM from saved state and memory already filled in -----------------------------------------
def restore_devices(assembly: Assembly) -> None:
    assert assembly.devices is not None
    assembly.devices.restore(assembly.require_saved().devices)


def restore_kernel_devices(assembly: Assembly) -> None:
    """The PICs, IOAPIC and clock, after the vCPUs (their LAPICs in place) so routed interrupts land."""
    KernelDevices.restore(assembly.require_vm().fd, assembly.require_saved().vm)


RESTORE_RECIPE: tuple[Step, ...] = (
    open_kvm,
    create_vm,
    attach_memory,
    create_irqchip,
    enable_dirty_ring,
    create_event_loop,
    create_device_manager,
    restore_devices,
    create_vcpus,
    pin_vcpus,
    track_dirty_pages,
    restore_kernel_devices,
)


def _assemble(assembly: Assembly, recipe: tuple[Step, ...]) -> Vmm:
    """Run the recipe; on success the Vmm owns every resource, on failure all are released."""
    with assembly.resources:
        for step in recipe:
            step(assembly)
        assert assembly.kernel is not None and assembly.devices is not None and assembly.dirty is not None
        assert assembly.loop is not None
        vmm = Vmm(config=assembly.config, kvm=assembly.require_kvm(), vm=assembly.require_vm(),
                  memory=assembly.require_memory(), vcpus=assembly.vcpus, devices=assembly.devices,
                  control=assembly.control, kernel=assembly.kernel, dirty=assembly.dirty, loop=assembly.loop)
        vmm.adopt(assembly.resources.pop_all())  # cannot fail: from here on the Vmm releases everything
    return vmm


def build_vm(config: MachineConfig, console_output: Callable[[bytes], None], kvm: Kvm | None = None) -> Vmm:
    """Build a VM ready to start. On failure everything built so far is released.

    A `kvm` passed in stays the caller's; otherwise the VM opens (and closes) its own.
    """
    config.validate()
    recipe = MULTIBOOT_RECIPE if config.boot_protocol == BOOT_MULTIBOOT else BUILD_RECIPE
    return _assemble(Assembly(config, console_output, ExitStack(), kvm=kvm), recipe)


def assemble_vm(machine: MachineState, memory: GuestMemory, console_output: Callable[[bytes], None],
                kvm: Kvm | None = None) -> Vmm:
    """A VM from saved machine state and guest memory already filled in (restore, migration).

    The memory becomes the VM's at once: on failure it is released with everything else.
    """
    resources = ExitStack()
    resources.callback(memory.close)
    assembly = Assembly(machine.config, console_output, resources, kvm=kvm, saved=machine, memory=memory,
                        kernel=machine.kernel)
    return _assemble(assembly, RESTORE_RECIPE)


def restore_vm(directory: Path, console_output: Callable[[bytes], None], lazy: bool = True, verify: bool = False,
               track_dirty: bool = False, kvm: Kvm | None = None) -> Vmm:
    """Rebuild a VM from a snapshot directory (and the bases a diff builds on), ready to start.

    Every file is read and checked before anything is created; a refused snapshot changes nothing.
    With `lazy`, memory is the full image mapped copy-on-write (the file must stay); otherwise its
    data is read into anonymous memory. `verify` checks the memory files' checksums first.
    """
    chain = load_chain(directory)
    memory = open_chain_memory(chain, lazy=lazy, verify=verify)
    vmm = assemble_vm(chain[-1].state.machine, memory, console_output, kvm)
    vmm.last_snapshot = (chain[-1].directory, chain[-1].state.snapshot_id)
    try:
        if chain[-1].state.watches:  # the write watches armed when the snapshot was taken
            from pyrovisor.introspect.write_monitor import rearm_watches
            rearm_watches(vmm, chain[-1].state.watches)
        if track_dirty:
            vmm.snapshot_log = vmm.dirty.subscribe()
    except BaseException:
        vmm.close()
        raise
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


__all__ = ["BUILD_RECIPE", "MULTIBOOT_RECIPE", "RESTORE_RECIPE", "Assembly", "assemble_vm", "build_vm", "open_chain_memory",
           "restore_vm"]
