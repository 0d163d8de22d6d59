"""Multiboot kernels written for QEMU's -kernel, run by `pyrovisor run` as users do: the machine state at entry,
the information structure, command line and modules, fw_cfg, ACPI, INIT/SIPI start-up, the debug-exit code,
bad images, and the same output and exit code as QEMU on the same host."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiboot_kernels import MultibootKernels, build_multiboot_kernels
from pyrovisor.builder import build_vm
from pyrovisor.config import BOOT_MULTIBOOT, MachineConfig
from pyrovisor.errors import PyrovisorError

pytestmark = pytest.mark.kvm

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory) -> MultibootKernels:
    return build_multiboot_kernels(tmp_path_factory.mktemp("multiboot"))


@pytest.fixture(scope="module")
def module_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("modules")
    first, second = directory / "first.txt", directory / "second.bin"
    first.write_text("the first module's text\n")
    second.write_bytes(b"MOD2" + bytes(5000))
    return first, second


def pyrovisor(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", "run", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)


def test_state_at_entry_information_structure_modules_and_fw_cfg(kernels: MultibootKernels,
                                                                  module_files: tuple[Path, Path]) -> None:
    first, second = module_files
    result = pyrovisor(str(kernels.elf), "--memory", "32M", "--append", "exit=7 hello=world", "--initrd", str(first),
                       "--module", f"{second},one two", "--verbose")
    lines = result.stdout.splitlines()
    assert result.stderr == f"pyrovisor: {kernels.elf}: Multiboot 1 kernel (ELF32), header at offset 0x1000\n"
    assert lines[1] == ("mb: magic=2badb002 info=00009100 cr0=00000011 cr4=00000000 eflags=00000002 cs=0008 ds=0010 "
                        "es=0010 ss=0010")
    assert lines[2] == "mb: flags=0000024d mem_lower=639 mem_upper=31744"
    assert lines[3:7] == ["mb: mmap 0 9fc00 1", "mb: mmap 9fc00 400 2", "mb: mmap e0000 20000 2",
                          "mb: mmap 100000 1f00000 1"]
    assert lines[7:9] == ["mb: loader=pyrovisor", "mb: layout ok"]
    assert lines[9] == f"mb: cmdline=[{kernels.elf} exit=7 hello=world]"
    assert lines[10:14] == ["mb: modules=2", f"mb: module 0 [{first}] size=24 text=[the first module's text",
                            "]", f"mb: module 1 [{second} one two] size=5004 text=[MOD2]"]
    assert "fw_cfg: signature=QEMU cpus=1 ram=2000000 dma=1" in lines
    assert "fw_cfg: dma read ok ram=2000000" in lines
    assert "fw_cfg: file etc/e820 size=20 key=0020" in lines
    assert "acpi: rsdp found at e0000 madt cpus=1" in lines
    assert lines[-1] == "mb: bye"
    assert result.returncode == (7 << 1) | 1  # QEMU's isa-debug-exit code


def test_application_processors_start_through_init_sipi(kernels: MultibootKernels) -> None:
    result = pyrovisor(str(kernels.elf), "--memory", "16M", "--vcpus", "2", "--append", "exit=0")
    assert "fw_cfg: signature=QEMU cpus=2 ram=1000000 dma=1" in result.stdout, result.stdout + result.stderr
    assert "acpi: rsdp found at e0000 madt cpus=2" in result.stdout
    assert "smp: 2 of 2 cpus up" in result.stdout
    assert result.returncode == 1


def test_a_out_kludge_kernel(kernels: MultibootKernels) -> None:
    result = pyrovisor(str(kernels.aout), "--memory", "4M")
    assert result.stdout == "aout: entered with the Multiboot magic, bss zeroed\n", result.stderr
    assert result.returncode == 11


def _patched(source: Path, target: Path, offset: int, data: bytes) -> Path:
    image = bytearray(source.read_bytes())
    image[offset:offset + len(data)] = data
    target.write_bytes(bytes(image))
    return target


def test_bad_images_are_one_clear_error_line(kernels: MultibootKernels, tmp_path: Path) -> None:
    cases = [
        (_patched(kernels.elf, tmp_path / "plain32.elf", 0x1000, bytes(4)), "32-bit ELF without a Multiboot header"),
        (_patched(kernels.elf, tmp_path / "checksum.elf", 0x1008, b"\1\0\0\0"),
         "Multiboot header at offset 0x1000 has a bad checksum"),
        (_patched(kernels.aout, tmp_path / "inconsistent.bin", 20, struct.pack("<I", 0x100000)),
         "load_end_addr 0x100000 is not above load_addr 0x200000"),
        (_patched(kernels.aout, tmp_path / "low.bin", 12, struct.pack("<IIIII", 0x9000, 0x9000, 0x9080, 0, 0x9020)),
         "overlaps the boot information page at [0x9000, 0xa000)"),
    ]
    for image, message in cases:
        result = pyrovisor(str(image), "--memory", "4M")
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    result = pyrovisor(str(kernels.aout), "--memory", "2M")  # loaded at 2 MiB: past the end of RAM
    assert result.returncode == 1 and "is outside guest RAM (2 MiB)" in result.stderr


def test_a_multiboot_machine_refuses_snapshots_with_one_clear_error(kernels: MultibootKernels) -> None:
    config = MachineConfig(kernel=kernels.aout, memory_size=4 << 20, boot_protocol=BOOT_MULTIBOOT)
    with build_vm(config, lambda data: None) as vmm, pytest.raises(PyrovisorError,
                                                                    match="cannot be snapshotted or migrated yet"):
        vmm.save_state()


@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed (apt-get install qemu-system-x86)")
def test_same_output_and_exit_code_as_qemu(kernels: MultibootKernels, module_files: tuple[Path, Path]) -> None:
    first, second = module_files
    started = time.perf_counter()
    qemu = subprocess.run(
        [QEMU, "-machine", "accel=kvm", "-m", "32M", "-smp", "2", "-display", "none", "-no-reboot", "-nodefaults",
         "-serial", "stdio", "-kernel", str(kernels.elf), "-append", "compare exit=42",
         "-initrd", f"{first},{second} one two", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    qemu_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ours = pyrovisor(str(kernels.elf), "--memory", "32M", "--vcpus", "2", "--append", "compare exit=42",
                     "--initrd", str(first), "--module", f"{second},one two")
    ours_seconds = time.perf_counter() - started
    assert "smp: 2 of 2 cpus up" in qemu.stdout, qemu.stdout + qemu.stderr
    assert ours.stdout == qemu.stdout
    assert ours.returncode == qemu.returncode == (42 << 1) | 1
    print(f"QEMU {qemu_seconds:.2f} s, pyrovisor {ours_seconds:.2f} s")
