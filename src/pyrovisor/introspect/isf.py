"""The OS guest's kernel as a volatility3 symbol table (ISF JSON), built from its DWARF with pyelftools."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.dwarf.die import DIE
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from pyrovisor import __version__
from pyrovisor.errors import LoaderError
from pyrovisor.introspect.profile import Profile

ISF_FORMAT = "6.2.0"  # volatility3 reads 6.x with a minor of at least this one
PRODUCER = "pyrovisor-isf"
# Constant symbols (address 0, value in constant_data, 8 bytes little-endian) the plugin reads:
DTB_SYMBOL = "pyrovisor_dtb"  # physical address of kernel_pml4: the kernel's page-table root
DTB_SOURCE_SYMBOL = "kernel_pml4"
POINTER_SIZE = 8

_ENCODINGS = {  # DW_ATE_* -> (ISF kind, signed)
    0x02: ("bool", False), 0x04: ("float", True), 0x05: ("int", True), 0x06: ("char", True),
    0x07: ("int", False), 0x08: ("char", False),
}
_TRANSPARENT = {"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type",
                "DW_TAG_atomic_type"}
_DW_OP_ADDR = 0x03


@dataclass(frozen=True)
class IsfSummary:
    """What a generated table holds, for the CLI's report."""

    kernel: str
    base_types: int
    user_types: int
    enums: int
    symbols: int
    dtb: int | None


class _Converter:
    """Walks every compile unit once, collecting types by name (the first definition of a name wins)."""

    def __init__(self) -> None:
        self.base_types: dict[str, dict[str, Any]] = {
            "void": {"size": 0, "signed": False, "kind": "void", "endian": "little"},
            "pointer": {"size": POINTER_SIZE, "signed": False, "kind": "int", "endian": "little"},
        }
        self.user_types: dict[str, dict[str, Any]] = {}
        self.enums: dict[str, dict[str, Any]] = {}
        self.variable_types: dict[str, dict[str, Any]] = {}
        self._pending: list[DIE] = []

    # --- type descriptors ---------------------------------------------------------------------
    def descriptor(self, die: DIE | None) -> dict[str, Any]:
        """The ISF type descriptor of a DIE (None: void); named structs, unions and enums are queued."""
        while die is not None and die.tag in _TRANSPARENT:
            die = _type_of(die)
        if die is None:
            return {"kind": "base", "name": "void"}
        tag = die.tag
        if tag == "DW_TAG_base_type":
            return {"kind": "base", "name": self._base_type(die)}
        if tag == "DW_TAG_pointer_type":
            return {"kind": "pointer", "subtype": self._pointee(_type_of(die))}
        if tag == "DW_TAG_array_type":
            return self._array(die)
        if tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            self._pending.append(die)
            return {"kind": "union" if tag == "DW_TAG_union_type" else "struct", "name": _type_name(die)}
        if tag == "DW_TAG_enumeration_type":
            self._enum(die)
            return {"kind": "enum", "name": _type_name(die)}
        if tag == "DW_TAG_subroutine_type":
            return {"kind": "function"}
        return {"kind": "base", "name": "void"}

    def _pointee(self, die: DIE | None) -> dict[str, Any]:
        # A pointer to a declared-only struct still names it; the struct may be defined in another unit.
        return self.descriptor(die)

    def _base_type(self, die: DIE) -> str:
        name = _name(die) or f"unnamed_base_{die.offset:x}"
        if name not in self.base_types:
            kind, signed = _ENCODINGS.get(_int_attr(die, "DW_AT_encoding", 0x07), ("int", False))
            self.base_types[name] = {"size": _int_attr(die, "DW_AT_byte_size", 0), "signed": signed,
                                     "kind": kind, "endian": "little"}
        return name

    def _array(self, die: DIE) -> dict[str, Any]:
        counts = [_subrange_count(child) for child in die.iter_children() if child.tag == "DW_TAG_subrange_type"]
        descriptor = self.descriptor(_type_of(die))
        for count in reversed(counts or [0]):
            descriptor = {"kind": "array", "count": count, "subtype": descriptor}
        return descriptor

    def _enum(self, die: DIE) -> None:
        name = _type_name(die)
        if name in self.enums or _is_declaration(die):
            return
        underlying = _type_of(die)
        base = self._base_type(underlying) if underlying is not None else "unsigned int"
        constants = {(_name(child) or ""): _int_attr(child, "DW_AT_const_value", 0)
                     for child in die.iter_children() if child.tag == "DW_TAG_enumerator"}
        self.enums[name] = {"size": _int_attr(die, "DW_AT_byte_size", 4), "base": base, "constants": constants}

    # --- structures ---------------------------------------------------------------------------
    def drain(self) -> None:
        """Define every struct and union referred to so far (and those they refer to)."""
        while self._pending:
            die = self._pending.pop()
            name = _type_name(die)
            if name in self.user_types or _is_declaration(die):
                continue
            self.user_types[name] = {"kind": "struct", "size": 0, "fields": {}}  # placeholder: recursion
            self.user_types[name] = self._user_type(die)

    def _user_type(self, die: DIE) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for index, member in enumerate(child for child in die.iter_children() if child.tag == "DW_TAG_member"):
            field_name = _name(member)
            descriptor = self.descriptor(_type_of(member))
            if "DW_AT_bit_size" in member.attributes:
                descriptor = self._bitfield(member, descriptor)
            field: dict[str, Any] = {"type": descriptor, "offset": _member_offset(member)}
            if field_name is None:
                field_name = f"unnamed_field_{index}"
                field["anonymous"] = True
            fields[field_name] = field
        return {"kind": "union" if die.tag == "DW_TAG_union_type" else "struct",
                "size": _int_attr(die, "DW_AT_byte_size", 0), "fields": fields}

    def _bitfield(self, member: DIE, descriptor: dict[str, Any]) -> dict[str, Any]:
        bit_offset = _int_attr(member, "DW_AT_data_bit_offset", 0) % 8 if "DW_AT_data_bit_offset" in \
            member.attributes else 0
        return {"kind": "bitfield", "bit_position": bit_offset, "bit_length": _int_attr(member, "DW_AT_bit_size", 0),
                "type": descriptor}

    # --- variables ----------------------------------------------------------------------------
    def variable(self, die: DIE) -> None:
        """Remember the type of a named global variable (its address comes from the symbol table)."""
        name = _name(die)
        if name is None or name in self.variable_types or "DW_AT_type" not in die.attributes:
            return
        self.variable_types[name] = self.descriptor(_type_of(die))


def build_isf(kernel: Path, profile: Profile | None = None) -> dict[str, Any]:
    """The ISF document of a kernel ELF with DWARF; with its profile, the profile's constants too."""
    try:
        with kernel.open("rb") as stream:
            elf = ELFFile(stream)
            if not elf.has_dwarf_info() or elf.get_section_by_name(".debug_info") is None:
                raise LoaderError(str(kernel), "has no DWARF debug information (build it with -g)")
            converter = _Converter()
            for unit in elf.get_dwarf_info().iter_CUs():
                for die in unit.get_top_DIE().iter_children():
                    _visit(converter, die)
            converter.drain()
            symbols = _symbols(elf, converter.variable_types)
            dtb = _physical(elf, symbols[DTB_SOURCE_SYMBOL]["address"]) if DTB_SOURCE_SYMBOL in symbols else None
    except OSError as exc:
        raise LoaderError(str(kernel), exc.strerror or "cannot read") from None
    except ELFError as exc:
        raise LoaderError(str(kernel), f"not an ELF file with readable DWARF: {exc}") from None
    if dtb is not None:
        symbols[DTB_SYMBOL] = _constant(dtb)
    if profile is not None:
        if not profile.matches(kernel):
            raise LoaderError(str(kernel), "the profile given describes another build of the kernel")
        for name, value in profile.constants.items():
            symbols.setdefault(name, _constant(value))
    return {
        "metadata": {"format": ISF_FORMAT,
                     "producer": {"name": PRODUCER, "version": __version__,
                                  "datetime": datetime.datetime.now(datetime.UTC).isoformat()}},
        "base_types": converter.base_types,
        "user_types": converter.user_types,
        "enums": converter.enums,
        "symbols": symbols,
    }


def summarize(document: Mapping[str, Any], kernel: Path) -> IsfSummary:
    dtb = document["symbols"].get(DTB_SYMBOL)
    return IsfSummary(str(kernel), len(document["base_types"]), len(document["user_types"]), len(document["enums"]),
                      len(document["symbols"]), constant_value(dtb) if dtb else None)


def constant_value(symbol: Mapping[str, Any]) -> int:
    """The integer a constant symbol holds."""
    return int.from_bytes(base64.b64decode(symbol["constant_data"]), "little")


def _constant(value: int) -> dict[str, Any]:
    return {"address": 0, "constant_data": base64.b64encode(value.to_bytes(8, "little", signed=value < 0)).decode()}


def _visit(converter: _Converter, die: DIE) -> None:
    tag = die.tag
    if tag == "DW_TAG_variable":
        converter.variable(die)
    elif tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type", "DW_TAG_typedef",
                 "DW_TAG_base_type"):
        converter.descriptor(die)


def _symbols(elf: ELFFile, variable_types: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Every named object and function of the ELF symbol table, with its DWARF type where there is one."""
    table = elf.get_section_by_name(".symtab")
    if not isinstance(table, SymbolTableSection):
        raise LoaderError(elf.stream.name, "has no symbol table (stripped?)")
    symbols: dict[str, Any] = {}
    for symbol in table.iter_symbols():
        kind = symbol["st_info"]["type"]
        if not symbol.name or kind not in ("STT_OBJECT", "STT_FUNC", "STT_NOTYPE") or symbol["st_shndx"] == "SHN_UNDEF":
            continue
        if symbol.name in symbols and symbol["st_info"]["bind"] == "STB_LOCAL":
            continue  # a static of the same name in another file: the global one is what plugins ask for
        entry: dict[str, Any] = {"address": symbol["st_value"]}
        if kind == "STT_FUNC":
            entry["type"] = {"kind": "function"}
        elif symbol.name in variable_types:
            entry["type"] = variable_types[symbol.name]
        symbols[symbol.name] = entry
    return symbols


def _physical(elf: ELFFile, address: int) -> int | None:
    """Where the loader puts a kernel address: through the ELF's loadable segments."""
    for segment in elf.iter_segments():
        if segment["p_type"] == "PT_LOAD" and segment["p_vaddr"] <= address < segment["p_vaddr"] + segment["p_memsz"]:
            return int(segment["p_paddr"] + address - segment["p_vaddr"])
    return None


# --- DIE helpers --------------------------------------------------------------------------------
def _name(die: DIE) -> str | None:
    attribute = die.attributes.get("DW_AT_name")
    if attribute is None:
        specification = die.attributes.get("DW_AT_specification")
        return _name(die.get_DIE_from_attribute("DW_AT_specification")) if specification is not None else None
    value = attribute.value
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _type_name(die: DIE) -> str:
    return _name(die) or f"unnamed_{die.offset:x}"


def _type_of(die: DIE) -> DIE | None:
    return die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None


def _int_attr(die: DIE, name: str, default: int) -> int:
    attribute = die.attributes.get(name)
    return int(attribute.value) if attribute is not None and isinstance(attribute.value, int) else default


def _is_declaration(die: DIE) -> bool:
    return bool(die.attributes.get("DW_AT_declaration") and die.attributes["DW_AT_declaration"].value)


def _subrange_count(die: DIE) -> int:
    if "DW_AT_count" in die.attributes:
        return _int_attr(die, "DW_AT_count", 0)
    if "DW_AT_upper_bound" in die.attributes:
        return _int_attr(die, "DW_AT_upper_bound", -1) + 1
    return 0  # a flexible array member


def _member_offset(member: DIE) -> int:
    if "DW_AT_data_bit_offset" in member.attributes:
        return _int_attr(member, "DW_AT_data_bit_offset", 0) // 8
    attribute = member.attributes.get("DW_AT_data_member_location")
    if attribute is None:
        return 0  # a union member
    value = attribute.value
    if isinstance(value, int):
        return value
    if isinstance(value, list) and value and value[0] == 0x23:  # DW_OP_plus_uconst, ULEB128 operand
        result, shift = 0, 0
        for byte in value[1:]:
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return result
    raise LoaderError(f"DWARF DIE at {member.offset:#x}", f"member location {value!r} is not a constant offset")
