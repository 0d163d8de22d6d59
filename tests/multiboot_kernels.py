"""Builds the test Multiboot kernels (tests/guests/multiboot) with the system gcc and binutils."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCES = Path(__file__).resolve().parent / "guests" / "multiboot"
CFLAGS = ["-m32", "-march=i686", "-ffreestanding", "-nostdlib", "-fno-pic", "-fno-stack-protector",
          "-fno-asynchronous-unwind-tables", "-mno-sse", "-mno-mmx", "-O2", "-Wall", "-Wextra", "-Werror"]


@dataclass(frozen=True)
class MultibootKernels:
    elf: Path  # C kernel, ELF32 with a Multiboot header
    aout: Path  # assembly kernel, flat binary loaded through the header's address fields


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")


def build_multiboot_kernels(directory: Path) -> MultibootKernels:
    """Compile both kernels into `directory`; skips the test when gcc, as or ld (or 32-bit gcc) is missing."""
    for tool in ("gcc", "as", "ld"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install gcc binutils)")
    probe = subprocess.run(["gcc", "-m32", "-ffreestanding", "-c", "-x", "c", "-", "-o", str(directory / "probe.o")],
                           input="#include <stdint.h>\nuint32_t x;\n", capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"gcc cannot compile 32-bit code here: {probe.stderr.strip()}")
    elf = directory / "mbkernel.elf"
    _run(["gcc", *CFLAGS, "-c", str(SOURCES / "kernel.c"), "-o", str(directory / "kernel.o")])
    _run(["gcc", "-m32", "-c", str(SOURCES / "entry.S"), "-o", str(directory / "entry.o")])
    quiet = ["--no-warn-rwx-segments"] if "no-warn-rwx-segments" in subprocess.run(
        ["ld", "--help"], capture_output=True, text=True).stdout else []  # binutils 2.39 and later
    _run(["ld", "-m", "elf_i386", "-static", *quiet, "-T", str(SOURCES / "kernel.ld"), "-o", str(elf),
          str(directory / "entry.o"), str(directory / "kernel.o")])
    aout = directory / "mbaout.bin"
    _run(["as", "--32", str(SOURCES / "aout.S"), "-o", str(directory / "aout.o")])
    _run(["ld", "-m", "elf_i386", "-Ttext", "0x200000", "--oformat", "binary", "-e", "entry", "-o", str(aout),
          str(directory / "aout.o")])
    return MultibootKernels(elf, aout)
