"""Writes the kernel profile (JSON) the host's introspection loads: symbols from the kernel ELF's symbol
table, struct layouts and constants from the marker lines of os/profile_layout.c compiled to assembly.

Usage: mkprofile.py KERNEL.elf LAYOUT.s OUTPUT.json
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from elf64 import PT_LOAD, STT_FUNC, STT_OBJECT, Elf

FORMAT = "pyrovisor-os-profile"
VERSION = 1
KERNEL_MAP_BASE = 0xFFFFFFFF80000000
DIRECT_MAP_BASE = 0xFFFF888000000000
MARKER = re.compile(r'\.ascii\s+"@@ (.*)"')
ARRAY = re.compile(r"^(?:char|struct:\w+)\[(\d+)\]$")


def layout(assembly: str) -> dict[str, Any]:
    structs: dict[str, Any] = {}
    constants: dict[str, int] = {}
    enums: dict[str, dict[str, int]] = {}
    ended = False
    for line in assembly.splitlines():
        match = MARKER.search(line)
        if not match:
            continue
        words = match.group(1).split()
        if words[0] == "struct":
            structs[words[1]] = {"size": int(words[2]), "fields": {}}
        elif words[0] == "field":
            _, struct, name, offset, size, kind = words
            field: dict[str, Any] = {"offset": int(offset), "size": int(size), "type": kind}
            if (array := ARRAY.match(kind)) is not None:
                field["count"] = int(array.group(1))
            structs[struct]["fields"][name] = field
        elif words[0] == "const":
            constants[words[1]] = int(words[2]) & 0xFFFFFFFFFFFFFFFF
        elif words[0] == "const64":
            constants[words[1]] = (int(words[2]) << 32) | (int(words[3]) & 0xFFFFFFFF)
        elif words[0] == "enum":
            enums.setdefault(words[1], {})[words[2]] = int(words[3])
        elif words[0] == "end":
            ended = True
    if not ended:
        raise SystemExit("layout markers incomplete: was the file compiled with -S?")
    return {"structs": structs, "constants": constants, "enums": enums}


def main() -> None:
    kernel, assembly, output = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    data = kernel.read_bytes()
    elf = Elf(data)
    kinds = {STT_OBJECT: "object", STT_FUNC: "function"}
    symbols = {
        symbol.name: {"address": symbol.value, "size": symbol.size, "kind": kinds[symbol.kind]}
        for symbol in sorted(elf.symbols(), key=lambda s: s.value)
        if symbol.kind in kinds
    }
    segments = [{"vaddr": s.vaddr, "paddr": s.paddr, "memsz": s.memsz, "flags": s.flags}
                for s in elf.segments() if s.type == PT_LOAD]
    profile = {
        "format": FORMAT,
        "version": VERSION,
        "kernel": {"file": kernel.name, "sha256": hashlib.sha256(data).hexdigest(), "entry": elf.entry,
                   "segments": segments},
        "layout": {"kernel_map_base": KERNEL_MAP_BASE, "direct_map_base": DIRECT_MAP_BASE},
        "symbols": symbols,
        **layout(assembly.read_text()),
    }
    output.write_text(json.dumps(profile, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
