"""The kernel profile: symbol addresses and structure layouts of a guest kernel, emitted by its build."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyrovisor.catalog import guests_dir
from pyrovisor.errors import LoaderError

PROFILE_FORMAT = "pyrovisor-os-profile"
PROFILE_VERSION = 1
_INTEGER_TYPES = {"u8": (1, False), "u16": (2, False), "u32": (4, False), "u64": (8, False),
                  "i8": (1, True), "i16": (2, True), "i32": (4, True), "i64": (8, True)}
_ARRAY = re.compile(r"^(char|struct:\w+)\[(\d+)\]$")


@dataclass(frozen=True)
class Field:
    """One member of a structure: where it is, how big, and how to read it.

    Types: u8..u64 and i8..i64 (little-endian integers), `enum:NAME` (a u32 whose names the profile
    lists), `ptr:STRUCT` (a kernel virtual address), `char[N]` (NUL-padded text) and `struct:NAME[N]`.
    """

    name: str
    offset: int
    size: int
    type: str

    def decode(self, record: bytes) -> int | str | bytes:
        """This field's value in `record`, the bytes of the whole structure."""
        raw = record[self.offset:self.offset + self.size]
        if len(raw) != self.size:
            raise ValueError(f"field {self.name} lies outside a {len(record)}-byte record")
        kind = self.type
        if kind in _INTEGER_TYPES:
            return int.from_bytes(raw, "little", signed=_INTEGER_TYPES[kind][1])
        if kind.startswith(("enum:", "ptr:")):
            return int.from_bytes(raw, "little")
        if kind.startswith("char["):
            return raw.split(b"\0", 1)[0].decode(errors="replace")
        return raw


@dataclass(frozen=True)
class StructLayout:
    name: str
    size: int
    fields: Mapping[str, Field]

    def field(self, name: str) -> Field:
        try:
            return self.fields[name]
        except KeyError:
            raise LoaderError(f"struct {self.name}", f"the profile has no field {name!r}") from None

    def unpack(self, record: bytes) -> dict[str, int | str | bytes]:
        """Every field of one record."""
        return {name: field.decode(record) for name, field in self.fields.items()}


@dataclass(frozen=True)
class Symbol:
    name: str
    address: int
    size: int
    kind: str  # "object" or "function"


@dataclass(frozen=True)
class KernelSegment:
    """A loadable segment of the kernel ELF: virtual and physical address, size, flags (PF_R/W/X)."""

    vaddr: int
    paddr: int
    memsz: int
    flags: int


@dataclass(frozen=True)
class Profile:
    """What the host knows about one build of the guest kernel (like a LibVMI or Volatility profile)."""

    kernel_file: str
    kernel_sha256: str
    segments: tuple[KernelSegment, ...]
    symbols: Mapping[str, Symbol]
    structs: Mapping[str, StructLayout]
    constants: Mapping[str, int]
    enums: Mapping[str, Mapping[int, str]]
    kernel_map_base: int
    direct_map_base: int

    @classmethod
    def load(cls, path: Path) -> Profile:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise LoaderError(str(path), exc.strerror or "cannot read") from None
        except json.JSONDecodeError as exc:
            raise LoaderError(str(path), f"not JSON: {exc}") from None
        return cls.from_json(data, str(path))

    @classmethod
    def from_json(cls, data: Any, source: str = "profile") -> Profile:
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise LoaderError(source, f"not a {PROFILE_FORMAT} file")
        if data.get("version") != PROFILE_VERSION:
            raise LoaderError(source, f"profile version {data.get('version')!r}, this reader knows {PROFILE_VERSION}")
        try:
            kernel, layout = data["kernel"], data["layout"]
            segments = tuple(KernelSegment(int(s["vaddr"]), int(s["paddr"]), int(s["memsz"]), int(s["flags"]))
                             for s in kernel["segments"])
            symbols = {name: Symbol(name, int(s["address"]), int(s["size"]), str(s["kind"]))
                       for name, s in data["symbols"].items()}
            structs = {name: _struct(name, s) for name, s in data["structs"].items()}
            constants = {str(name): int(value) for name, value in data["constants"].items()}
            enums = {str(kind): {int(value): str(name) for name, value in names.items()}
                     for kind, names in data["enums"].items()}
            return cls(str(kernel["file"]), str(kernel["sha256"]), segments, symbols, structs, constants, enums,
                       int(layout["kernel_map_base"]), int(layout["direct_map_base"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LoaderError(source, f"malformed profile: {exc!r}") from None

    def symbol(self, name: str) -> Symbol:
        try:
            return self.symbols[name]
        except KeyError:
            raise LoaderError(self.kernel_file, f"the profile has no symbol {name!r}") from None

    def struct(self, name: str) -> StructLayout:
        try:
            return self.structs[name]
        except KeyError:
            raise LoaderError(self.kernel_file, f"the profile has no struct {name!r}") from None

    def constant(self, name: str) -> int:
        try:
            return self.constants[name]
        except KeyError:
            raise LoaderError(self.kernel_file, f"the profile has no constant {name!r}") from None

    def enum_name(self, kind: str, value: int) -> str:
        return self.enums.get(kind, {}).get(value, f"{kind}#{value}")

    def enum_value(self, kind: str, name: str) -> int:
        for value, known in self.enums.get(kind, {}).items():
            if known == name:
                return value
        raise LoaderError(self.kernel_file, f"the profile's enum {kind!r} has no {name!r}")

    def image_physical(self, address: int) -> int:
        """Where the loader put a kernel-image address: through the ELF's segments, no page tables."""
        for segment in self.segments:
            if segment.vaddr <= address < segment.vaddr + segment.memsz:
                return segment.paddr + address - segment.vaddr
        raise LoaderError(self.kernel_file, f"{address:#x} is not inside the kernel image")

    def function_at(self, address: int) -> Symbol | None:
        """The function whose code contains `address` (for naming pointers such as system-call handlers)."""
        for symbol in self.symbols.values():
            if symbol.kind == "function" and symbol.address <= address < symbol.address + max(symbol.size, 1):
                return symbol
        return None

    def matches(self, kernel: Path) -> bool:
        """True when `kernel` is the very file this profile describes."""
        return hashlib.sha256(kernel.read_bytes()).hexdigest() == self.kernel_sha256


def _struct(name: str, data: Any) -> StructLayout:
    fields = {}
    for field_name, field in data["fields"].items():
        kind = str(field["type"])
        size = int(field["size"])
        if kind in _INTEGER_TYPES and _INTEGER_TYPES[kind][0] != size:
            raise ValueError(f"{name}.{field_name}: type {kind} but {size} bytes")
        if not (kind in _INTEGER_TYPES or kind.startswith(("enum:", "ptr:")) or _ARRAY.match(kind)):
            raise ValueError(f"{name}.{field_name}: unknown type {kind!r}")
        fields[field_name] = Field(field_name, int(field["offset"]), size, kind)
        if fields[field_name].offset + size > int(data["size"]):
            raise ValueError(f"{name}.{field_name} runs past the end of the struct")
    return StructLayout(name, int(data["size"]), fields)


def guest_profile(name: str = "os") -> Profile:
    """The profile shipped with a built-in guest (`<name>.profile.json` next to its ELF)."""
    return Profile.load(guests_dir() / f"{name}.profile.json")
