"""The Python BootInfo mirror has exactly the layout the guests' C header gives it."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyrovisor.arch.x86_64.boot_info import BootInfo

HEADER_DIR = Path(__file__).resolve().parents[2] / "guests" / "lib" / "include"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed (CI installs it)")
def test_boot_info_matches_c_header(tmp_path: Path) -> None:
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <pyrovisor/boot_info.h>', 'int main(void) {',
             'printf("SIZEOF %zu\\n", sizeof(struct pyrovisor_boot_info));']
    for name, _ in BootInfo._fields_:
        lines.append(f'printf("{name} %zu\\n", offsetof(struct pyrovisor_boot_info, {name}));')
    lines.append("return 0; }")
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines))
    binary = tmp_path / "layout"
    subprocess.run(["gcc", f"-I{HEADER_DIR}", "-o", str(binary), str(source)], check=True)
    printed = dict(line.split() for line in subprocess.run([str(binary)], check=True, capture_output=True,
                                                            text=True).stdout.splitlines())
    assert int(printed.pop("SIZEOF")) == ctypes.sizeof(BootInfo)
    for name, value in printed.items():
        assert int(value) == getattr(BootInfo, name).offset, name
