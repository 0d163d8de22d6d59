"""Multiboot 1 without KVM: header search, loading (ELF32 and the a.out kludge), bad images, the information
structure, the ACPI tables, fw_cfg and QEMU's debug-exit codes."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from multiboot_kernels import MultibootKernels, build_multiboot_kernels
from pyrovisor.arch.x86_64.acpi import ACPI_TABLES_GPA, MADT_OFFSET, RSDT_OFFSET, acpi_tables
from pyrovisor.arch.x86_64.layout import MiB, ram_ranges
from pyrovisor.arch.x86_64.multiboot_info import (
    INFO_OFFSET,
    MMAP_OFFSET,
    MODULES_OFFSET,
    BootModule,
    boot_data_page,
    memory_map,
)
from pyrovisor.arch.x86_64.protected_mode import FLAT_CODE_SEGMENT, flat_gdt, protected_mode_entry
from pyrovisor.config import BOOT_MULTIBOOT, BOOT_PYROVISOR, MachineConfig, ModuleConfig
from pyrovisor.devices.fw_cfg import FwCfg, FwCfgArgs, FwCfgState, fw_cfg_items
from pyrovisor.devices.isa_debug_exit import IsaDebugExit, qemu_exit_code
from pyrovisor.errors import ConfigError, LoaderError
from pyrovisor.loader.multiboot import HEADER_MAGIC, Reserved, detect_protocol, find_header, load_multiboot
from pyrovisor.memory import GuestMemory, MemoryRegion

RESERVED = (Reserved(0x9000, 0xA000, "boot information page"), Reserved(0x9FC00, 0x100000, "BIOS area"))


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> MultibootKernels:
    return build_multiboot_kernels(tmp_path_factory.mktemp("multiboot"))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    guest = GuestMemory([MemoryRegion.anonymous(0, 16 * MiB)])
    yield guest
    guest.close()


def header(flags: int, checksum: int | None = None, fields: tuple[int, ...] = ()) -> bytes:
    total = checksum if checksum is not None else -(HEADER_MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<III", HEADER_MAGIC, flags, total) + b"".join(struct.pack("<I", f) for f in fields)


def kludge_image(load: int = 0x200000, load_end: int = 0x200040, bss_end: int = 0x201000, entry: int = 0x200020,
                 header_addr: int | None = None) -> bytes:
    fields = (header_addr if header_addr is not None else load, load, load_end, bss_end, entry)
    return (header(0x10000, fields=fields) + b"\x90" * 64)[:64]


def test_header_is_found_on_a_4_byte_boundary_in_the_first_8_kib() -> None:
    data = bytes(4096) + header(0x3)
    found = find_header(data, "k")
    assert found is not None and found.offset == 4096 and found.flags == 3 and not found.aout_kludge
    assert find_header(bytes(8192) + header(0x3), "k") is None  # too far in
    assert find_header(bytes(2) + header(0x3), "k") is None  # not 32-bit aligned


@pytest.mark.parametrize("data, message", [
    (header(0x3, checksum=1), "header at offset 0x0 has a bad checksum"),
    (header(0x8), r"requires features this loader does not know \(flags 0x8\)"),
    (header(0x10000), "cut short: its address fields are missing"),
])
def test_bad_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        find_header(data + (b"" if b"cut" in message.encode() else bytes(64)), "k")


def test_a_out_kludge_loads_from_the_header_addresses_and_zeroes_bss(tmp_path: Path, memory: GuestMemory) -> None:
    image = tmp_path / "k.bin"
    image.write_bytes(kludge_image())
    memory.fill(0x200000, 0x1000, 0xAA)
    kernel = load_multiboot(image, memory, RESERVED)
    assert kernel.format == "a.out kludge"
    assert kernel.image.entry == 0x200020 and kernel.image.image_start == 0x200000
    assert kernel.image.image_end == 0x201000
    assert memory.read(0x200000, 4) == struct.pack("<I", HEADER_MAGIC)
    assert memory.read(0x200040, 0xFC0) == bytes(0xFC0)


@pytest.mark.parametrize("fields, message", [
    ({"header_addr": 0x1FF000}, "load_addr 0x200000 is above header_addr"),
    ({"header_addr": 0x200100}, "is more than the header's offset in the file"),
    ({"load_end": 0x200000}, "load_end_addr 0x200000 is not above load_addr"),
    ({"load_end": 0x200100}, "is past the end of the file"),
    ({"bss_end": 0x200020}, "bss_end_addr 0x200020 is below the end of the loaded image"),
    ({"entry": 0x300000}, "entry_addr 0x300000 is outside the image"),
    ({"load": 0x9000, "load_end": 0x9040, "bss_end": 0, "entry": 0x9000}, "overlaps the boot information page"),
    ({"load": 0xF00000, "load_end": 0xF00040, "bss_end": 0x1100000, "entry": 0xF00000}, "outside guest RAM"),
])
def test_inconsistent_a_out_kludge_fields_are_one_clear_error(tmp_path: Path, memory: GuestMemory,
                                                              fields: dict[str, int], message: str) -> None:
    image = tmp_path / "k.bin"
    image.write_bytes(kludge_image(**fields))
    with pytest.raises(LoaderError, match=message) as caught:
        load_multiboot(image, memory, RESERVED)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(f"cannot load {image}: ")


def test_elf32_kernel_loads_at_its_physical_addresses(kernels: MultibootKernels, memory: GuestMemory) -> None:
    kernel = load_multiboot(kernels.elf, memory, RESERVED)
    assert kernel.format == "ELF32" and kernel.image.image_start == 0x100000
    assert kernel.image.image_start <= kernel.image.entry < kernel.image.image_end
    assert find_header(kernels.elf.read_bytes(), "k") == kernel.header


def test_the_format_is_recognised(kernels: MultibootKernels, tmp_path: Path) -> None:
    assert detect_protocol(kernels.elf)[0] == BOOT_MULTIBOOT
    assert detect_protocol(kernels.elf)[1] == "Multiboot 1 kernel (ELF32), header at offset 0x1000"
    assert detect_protocol(kernels.aout) == (BOOT_MULTIBOOT, "Multiboot 1 kernel (a.out kludge), header at offset 0x0")
    plain32 = tmp_path / "plain32.elf"
    data = bytearray(kernels.elf.read_bytes())
    data[0x1000:0x1004] = b"\0\0\0\0"  # the magic gone
    plain32.write_bytes(bytes(data))
    with pytest.raises(LoaderError, match="32-bit ELF without a Multiboot header"):
        detect_protocol(plain32)
    broken = tmp_path / "broken.elf"
    data[0x1000:0x1004] = struct.pack("<I", HEADER_MAGIC)
    data[0x1008:0x100C] = b"\1\0\0\0"
    broken.write_bytes(bytes(data))
    with pytest.raises(LoaderError, match="header at offset 0x1000 has a bad checksum"):
        detect_protocol(broken)
    assert detect_protocol(tmp_path / "missing")[0] == BOOT_PYROVISOR  # the ELF loader reports it


def test_information_structure_and_memory_map() -> None:
    ranges = ram_ranges(64 * MiB)
    modules = (BootModule(0x200000, 0x200100, 0x1FF000),)
    page = boot_data_page(flat_gdt(), ranges, 0x1FE000, modules)
    flags, lower, upper = struct.unpack_from("<III", page, INFO_OFFSET)
    assert flags == 0x24D and lower == 639 and upper == 63 * 1024
    cmdline, count, mods = struct.unpack_from("<III", page, INFO_OFFSET + 16)
    assert (cmdline, count, mods) == (0x1FE000, 1, 0x9000 + MODULES_OFFSET)
    assert struct.unpack_from("<IIII", page, MODULES_OFFSET) == (0x200000, 0x200100, 0x1FF000, 0)
    length, address = struct.unpack_from("<II", page, INFO_OFFSET + 44)
    entries = [struct.unpack_from("<IQQI", page, MMAP_OFFSET + offset) for offset in range(0, length, 24)]
    assert address == 0x9000 + MMAP_OFFSET
    assert [(base, size, kind) for _, base, size, kind in entries] == [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xE0000, 0x20000, 2), (0x100000, 63 * MiB, 1)]
    high = memory_map(ram_ranges(4096 * MiB))
    assert high[-1].base == 4096 * MiB and high[-1].length == 1024 * MiB


def test_entry_state_is_flat_32_bit_protected_mode_without_paging() -> None:
    state = protected_mode_entry(0x100010, 0x9000, 0x9000)
    assert state.cr0 == 0x11 and state.cr4 == 0 and state.efer == 0 and state.rflags == 2
    assert FLAT_CODE_SEGMENT.db == 1 and FLAT_CODE_SEGMENT.l == 0 and FLAT_CODE_SEGMENT.limit == 0xFFFFFFFF
    assert state.code.selector == 0x08 and state.data.selector == 0x10 and state.rip == 0x100010


def test_acpi_tables_have_valid_checksums_and_one_lapic_per_vcpu() -> None:
    image = acpi_tables(3)
    assert image[:8] == b"RSD PTR " and sum(image[:20]) % 256 == 0
    assert struct.unpack_from("<I", image, 16)[0] == ACPI_TABLES_GPA + RSDT_OFFSET
    rsdt_length = struct.unpack_from("<I", image, RSDT_OFFSET + 4)[0]
    assert sum(image[RSDT_OFFSET:RSDT_OFFSET + rsdt_length]) % 256 == 0
    madt = image[MADT_OFFSET:]
    assert madt[:4] == b"APIC" and sum(madt) % 256 == 0 and struct.unpack_from("<I", madt, 4)[0] == len(madt)
    entries, offset = [], 44
    while offset < len(madt):
        entries.append(madt[offset:offset + madt[offset + 1]])
        offset += madt[offset + 1]
    assert [(e[0], e[3]) for e in entries if e[0] == 0] == [(0, 0), (0, 1), (0, 2)]
    assert [struct.unpack_from("<I", e, 4)[0] for e in entries if e[0] == 1] == [0xFEC00000]


def test_fw_cfg_legacy_ports_and_dma(memory: GuestMemory) -> None:
    device = FwCfg(FwCfgArgs(memory.read, memory.write), FwCfgState(fw_cfg_items(2, 64 * MiB, ((0, 64 * MiB, 1),))))

    def set_access(control: int, length: int, target: int) -> None:
        memory.write(0x100, struct.pack(">IIQ", control, length, target))

    def start_dma() -> bytes:
        device.write(4, 4, 0)
        device.write(8, 4, int.from_bytes((0x100).to_bytes(4, "big"), "little"))
        return memory.read(0x100, 4)

    def read_item(key: int, length: int) -> bytes:
        device.write(0, 2, key)
        return bytes(device.read(1, 1) for _ in range(length))

    assert read_item(0, 4) == b"QEMU" and read_item(1, 4) == struct.pack("<I", 3)
    assert read_item(5, 2) == struct.pack("<H", 2) and read_item(3, 8) == struct.pack("<Q", 64 * MiB)
    assert read_item(0x1234, 2) == b"\0\0"  # unknown items read as zeros
    directory = read_item(0x19, 4 + 64)
    assert struct.unpack_from(">I", directory)[0] == 1 and directory[12:20] == b"etc/e820"
    assert device.read(4, 4).to_bytes(4, "little") + device.read(8, 4).to_bytes(4, "little") == b"QEMU CFG"
    memory.fill(0x200, 12, 0xAA)
    set_access((3 << 16) | 0x8 | 0x2, 12, 0x200)  # select the RAM size, read 12 bytes (4 past its end)
    assert start_dma() == bytes(4)
    assert memory.read(0x200, 12) == struct.pack("<Q", 64 * MiB) + bytes(4)
    set_access(0x10, 4, 0x200)  # writes are refused
    assert start_dma() == struct.pack(">I", 1)
    set_access(0x2, 0x100000, 16 * MiB - 0x10)  # a target past the end of RAM: an error, no crash
    assert start_dma() == struct.pack(">I", 1)


@pytest.mark.parametrize("value, code", [(0, 1), (1, 3), (0x21, 0x43), (0x80, 1), (0xFF, 0xFF)])
def test_isa_debug_exit_gives_qemus_exit_code(value: int, code: int) -> None:
    codes: list[int] = []
    IsaDebugExit(codes.append).write(0, 1, value)
    assert codes == [code] == [qemu_exit_code(value)]


def test_config_keeps_modules_and_virtio_devices_apart(tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    with pytest.raises(ConfigError, match="modules are for Multiboot kernels"):
        MachineConfig(kernel=kernel, modules=(ModuleConfig(tmp_path / "m"),)).validate()
    with pytest.raises(ConfigError, match=r"virtio devices .* need pyrovisor's boot protocol"):
        MachineConfig(kernel=kernel, boot_protocol=BOOT_MULTIBOOT, rng=True).validate()
    with pytest.raises(ConfigError, match="invalid boot protocol 'pvh'"):
        MachineConfig(kernel=kernel, boot_protocol="pvh").validate()
    MachineConfig(kernel=kernel, boot_protocol=BOOT_MULTIBOOT, modules=(ModuleConfig(tmp_path / "m", "a b"),)).validate()


def test_run_takes_append_modules_and_verbose() -> None:
    from pyrovisor.api.cli import build_parser

    args = build_parser().parse_args(["run", "k.elf", "--append", "a b", "--module", "m1", "--module", "m2,x, y",
                                      "--verbose"])
    assert args.cmdline == "a b" and args.verbose
    assert args.module == [ModuleConfig(Path("m1"), ""), ModuleConfig(Path("m2"), "x, y")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "k.elf", "--module", ",args"])
