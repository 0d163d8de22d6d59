"""Regenerate src/pyrovisor/kvm/uapi.py (ctypes structs and KVM constants) from the installed kernel headers."""

from __future__ import annotations

import argparse
import ctypes
import keyword
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from elftools.elf.elffile import ELFFile

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "src" / "pyrovisor" / "kvm" / "uapi.py"
GENERATOR_NAME = "tools/gen_kvm_uapi.py"

ROOT_HEADER = "linux/kvm.h"
# The headers whose struct/union definitions and macros are generated: the generic KVM API and the
# architecture's <asm/kvm.h> that it includes.
DEFINING_HEADER_SUFFIXES = ("/linux/kvm.h", "/asm/kvm.h")
# Macros with this prefix are taken from wherever they are defined; other macros only from the defining
# headers (KVMIO, the x86 exception vectors), and never reserved names (leading underscore).
CONSTANT_PREFIX = "KVM_"
MAX_PROBE_ATTEMPTS = 64

# Names the generator invents; a kernel member with such a name would be ambiguous, so it is refused.
ANONYMOUS_MEMBER_PREFIX = "_anon"
PADDING_MEMBER_PREFIX = "_pad"
SYNTHETIC_MEMBER_NAME = re.compile(rf"({ANONYMOUS_MEMBER_PREFIX}|{PADDING_MEMBER_PREFIX})\d+")

# DWARF base type encodings (DWARF 5, section 7.8).
DW_ATE_BOOLEAN = 0x02
DW_ATE_FLOAT = 0x04
DW_ATE_SIGNED = 0x05
DW_ATE_SIGNED_CHAR = 0x06
DW_ATE_UNSIGNED = 0x07
DW_ATE_UNSIGNED_CHAR = 0x08

FLOAT_CTYPES = {4: "c_float", 8: "c_double", 16: "c_longdouble"}
INTEGER_BYTE_SIZES = (1, 2, 4, 8)
TYPE_QUALIFIER_TAGS = (
    "DW_TAG_typedef",
    "DW_TAG_const_type",
    "DW_TAG_volatile_type",
    "DW_TAG_restrict_type",
    "DW_TAG_atomic_type",
)
AGGREGATE_TAGS = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union"}

LINE_MARKER = re.compile(r'^# (\d+) "([^"]*)"')
ATTRIBUTE = r"__attribute__\s*\(\((?:[^()]|\([^()]*\))*\)\)"
TAG_DEFINITION = re.compile(rf"\b(struct|union)\s+(?:{ATTRIBUTE}\s*)*([A-Za-z_]\w*)\s*\{{")
OBJECT_LIKE_DEFINE = re.compile(r"^#define ([A-Za-z_]\w*)(?:[ \t]+(.*))?$")
UNDEFINE = re.compile(r"^#undef ([A-Za-z_]\w*)")
DECIMAL_LITERAL = re.compile(r"^\(?-?\d+[uUlL]*\)?$")
PROBE_LINE_REFERENCE = re.compile(r"^probe\.c:(\d+):")


class GeneratorError(Exception):
    """The headers, the compiler or the produced layout did not allow a correct uapi module."""


# --------------------------------------------------------------------------------------------------
# Running the C compiler
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompilerRun:
    """The outcome of one compiler or program invocation."""

    returncode: int
    stdout: str
    stderr: str


def run_command(arguments: Sequence[str], workdir: Path, stdin_text: str | None = None) -> CompilerRun:
    """Run a command in `workdir` and capture its output as text."""
    completed = subprocess.run(
        list(arguments),
        cwd=workdir,
        input=stdin_text,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},  # plain ASCII diagnostics, the same on every machine
    )
    return CompilerRun(completed.returncode, completed.stdout, completed.stderr)


def run_checked(arguments: Sequence[str], workdir: Path, stdin_text: str | None = None) -> str:
    """Run a command that must succeed; return its standard output."""
    outcome = run_command(arguments, workdir, stdin_text)
    if outcome.returncode != 0:
        raise GeneratorError(f"`{shlex.join(arguments)}` failed ({outcome.returncode}):\n{outcome.stderr}")
    return outcome.stdout


def preprocess(compiler: str, workdir: Path, source: str, *flags: str) -> str:
    """Preprocess `source` (C text) with the given extra flags and return the output."""
    return run_checked([compiler, *flags, "-E", "-x", "c", "-"], workdir, source)


# --------------------------------------------------------------------------------------------------
# What the headers declare: struct/union tags and macros, read from the preprocessor's output
# --------------------------------------------------------------------------------------------------


def is_defining_header(path: str) -> bool:
    """Whether `path` is one of the headers whose definitions are generated."""
    return path.endswith(DEFINING_HEADER_SUFFIXES)


def split_by_source_file(preprocessed: str) -> list[tuple[str, str]]:
    """Cut preprocessed text (with line markers) into (file, line) pairs."""
    current_file = "<unknown>"
    lines: list[tuple[str, str]] = []
    for line in preprocessed.splitlines():
        marker = LINE_MARKER.match(line)
        if marker:
            current_file = marker.group(2)
        else:
            lines.append((current_file, line))
    return lines


@dataclass(frozen=True)
class HeaderDeclarations:
    """The defining headers as the compiler found them and the aggregate tags they define, in order."""

    header_paths: tuple[str, ...]
    tags: tuple[tuple[str, str], ...]  # (keyword, tag): ("struct", "kvm_run")


def scan_aggregate_tags(preprocessed: str) -> HeaderDeclarations:
    """Find every `struct X {` / `union X {` written in the defining headers, in the order gcc reads them."""
    header_paths: list[str] = []
    defining_lines: list[str] = []
    for source_file, line in split_by_source_file(preprocessed):
        if is_defining_header(source_file):
            defining_lines.append(line)
            if source_file not in header_paths:
                header_paths.append(source_file)
    tags: list[tuple[str, str]] = []
    for match in TAG_DEFINITION.finditer("\n".join(defining_lines)):
        tag = (match.group(1), match.group(2))
        if tag not in tags:
            tags.append(tag)
    if not tags:
        raise GeneratorError(f"no struct or union definitions found in <{ROOT_HEADER}>")
    return HeaderDeclarations(tuple(header_paths), tuple(tags))


@dataclass(frozen=True)
class MacroDefinition:
    """An object-like macro: its name, replacement text and the header that defines it."""

    name: str
    body: str
    header: str


def read_macros(compiler: str, workdir: Path) -> list[MacroDefinition]:
    """The candidate constant macros, in definition order, with their final bodies."""
    source = f"#include <{ROOT_HEADER}>\n"
    final_bodies: dict[str, str] = {}
    for line in preprocess(compiler, workdir, source, "-dM").splitlines():
        definition = OBJECT_LIKE_DEFINE.match(line)
        if definition:
            final_bodies[definition.group(1)] = (definition.group(2) or "").strip()
    defining_header: dict[str, str] = {}
    for source_file, line in split_by_source_file(preprocess(compiler, workdir, source, "-dD")):
        definition = OBJECT_LIKE_DEFINE.match(line)
        undefinition = UNDEFINE.match(line)
        if definition:
            defining_header[definition.group(1)] = source_file
        elif undefinition:
            defining_header.pop(undefinition.group(1), None)
    macros: list[MacroDefinition] = []
    for name, header in defining_header.items():
        body = final_bodies.get(name)
        wanted = name.startswith(CONSTANT_PREFIX) or (is_defining_header(header) and not name.startswith("_"))
        if body and wanted:
            macros.append(MacroDefinition(name, body, header))
    return macros


# --------------------------------------------------------------------------------------------------
# The probe program: values of the macros, sizeof and _Alignof of every named aggregate
# --------------------------------------------------------------------------------------------------

PROBE_PROLOGUE = f"""\
#include <{ROOT_HEADER}>
#include <stdio.h>

#define PROBE_IS_INTEGER(x) _Generic((x), char: 1, signed char: 1, unsigned char: 1, short: 1, \\
    unsigned short: 1, int: 1, unsigned int: 1, long: 1, unsigned long: 1, long long: 1, \\
    unsigned long long: 1, default: 0)
#define PROBE_CHECK(x, tag) _Static_assert(PROBE_IS_INTEGER(x), #x " is not of integer type"); \\
    enum {{ tag = ((x) != 0) }};
#define PROBE_PRINT(x) do {{ if ((x) < 0) printf("constant %s %lld\\n", #x, (long long)(x)); \\
    else printf("constant %s %llu\\n", #x, (unsigned long long)(x)); }} while (0)
"""


@dataclass
class ProbeResults:
    """What the compiled probe printed, and the macros it had to leave out."""

    constants: dict[str, int] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # "struct kvm_run" -> sizeof
    alignments: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # macro -> first compiler complaint


def probe_source(macro_names: Sequence[str], c_types: Sequence[str]) -> tuple[str, dict[int, str]]:
    """C source printing every macro and aggregate layout, and which macro each source line serves."""
    lines = PROBE_PROLOGUE.splitlines()
    line_owner: dict[int, str] = {}
    for index, name in enumerate(macro_names):
        lines.append(f"PROBE_CHECK({name}, probe_check_{index})")
        line_owner[len(lines)] = name
    lines.append("int main(void) {")
    for name in macro_names:
        lines.append(f"    PROBE_PRINT({name});")
        line_owner[len(lines)] = name
    for c_type in c_types:
        lines.append(f'    printf("layout %s %zu %zu\\n", "{c_type}", sizeof({c_type}), _Alignof({c_type}));')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines), line_owner


def first_complaint(stderr: str, line_number: int) -> str:
    """The first error message gcc gave about a probe line (or about the header it expanded into)."""
    messages = [line for line in stderr.splitlines() if ": error: " in line]
    for line in messages:
        if line.startswith(f"probe.c:{line_number}:"):
            return line.split(": error: ", 1)[1]
    return messages[0].split(": error: ", 1)[1] if messages else "rejected by the compiler"


def run_probe(
    compiler: str, workdir: Path, macros: Sequence[MacroDefinition], c_types: Sequence[str]
) -> ProbeResults:
    """Compile and run the probe, dropping macros gcc rejects as integer constants until it builds."""
    results = ProbeResults()
    remaining = [macro.name for macro in macros]
    for _attempt in range(MAX_PROBE_ATTEMPTS):
        source, line_owner = probe_source(remaining, c_types)
        (workdir / "probe.c").write_text(source)
        outcome = run_command([compiler, "-w", "-std=gnu11", "-o", "probe", "probe.c"], workdir)
        if outcome.returncode == 0:
            break
        rejected: dict[str, str] = {}
        for line in outcome.stderr.splitlines():  # errors, and notes on the macro expansions behind them
            reference = PROBE_LINE_REFERENCE.match(line)
            if reference is None:
                continue
            line_number = int(reference.group(1))
            owner = line_owner.get(line_number)
            if owner is not None and owner not in rejected:
                rejected[owner] = first_complaint(outcome.stderr, line_number)
        if not rejected:
            raise GeneratorError(f"the probe program does not compile:\n{outcome.stderr}")
        results.dropped.update(rejected)
        remaining = [name for name in remaining if name not in rejected]
    else:
        raise GeneratorError(f"the probe still fails after {MAX_PROBE_ATTEMPTS} attempts")
    for line in run_checked(["./probe"], workdir).splitlines():
        kind, rest = line.split(" ", 1)
        if kind == "constant":
            name, value = rest.split(" ")
            results.constants[name] = int(value)
        else:
            c_type, size, alignment = rest.rsplit(" ", 2)
            results.sizes[c_type] = int(size)
            results.alignments[c_type] = int(alignment)
    return results


# --------------------------------------------------------------------------------------------------
# Types read from DWARF
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalarType:
    """A C scalar represented by the ctypes class `ctypes.<name>`."""

    name: str


@dataclass(frozen=True)
class ArrayType:
    """A C array (length 0 for flexible or zero-length array members)."""

    element: TypeSpec
    length: int


@dataclass(frozen=True)
class AggregateType:
    """A struct or union, by the name of its generated class."""

    class_name: str


TypeSpec = ScalarType | ArrayType | AggregateType


@dataclass(frozen=True)
class MemberSpec:
    """One member of a struct or union as DWARF describes it."""

    c_name: str | None  # None for an anonymous struct/union member
    py_name: str
    type: TypeSpec
    byte_offset: int
    bit_size: int | None = None
    bit_offset: int | None = None  # bitfields: first bit, counted from the start of the aggregate


@dataclass
class AggregateSpec:
    """A struct or union to generate."""

    class_name: str
    c_type: str | None  # "struct kvm_run"; None for anonymous types
    is_union: bool
    byte_size: int
    members: list[MemberSpec]
    description: str


def attribute_value(die: Any, name: str) -> Any:
    """The value of a DIE attribute, or None."""
    attribute = die.attributes.get(name)
    return None if attribute is None else attribute.value


def integer_attribute(die: Any, name: str) -> int | None:
    """An integer-valued DIE attribute, or None."""
    value = attribute_value(die, name)
    return value if isinstance(value, int) else None


def die_name(die: Any) -> str | None:
    """The DW_AT_name of a DIE, decoded."""
    value = attribute_value(die, "DW_AT_name")
    return value.decode() if isinstance(value, bytes) else None


def referenced_type(die: Any) -> Any:
    """The DIE named by DW_AT_type, or None (void)."""
    return die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None


def member_byte_offset(die: Any) -> int:
    """DW_AT_data_member_location as a byte offset (absent in unions, meaning 0)."""
    location = attribute_value(die, "DW_AT_data_member_location")
    if location is None:
        return 0
    if isinstance(location, int):
        return location
    # DWARF 2 style location expression: DW_OP_plus_uconst <ULEB128>.
    if isinstance(location, list) and location and location[0] == 0x23:
        value, shift = 0, 0
        for byte in location[1:]:
            value |= (byte & 0x7F) << shift
            shift += 7
        return value
    raise GeneratorError(f"unsupported member location {location!r}")


def scalar_for_base_type(die: Any) -> ScalarType:
    """The ctypes scalar matching a DW_TAG_base_type."""
    name = die_name(die) or ""
    size = integer_attribute(die, "DW_AT_byte_size") or 0
    encoding = integer_attribute(die, "DW_AT_encoding")
    if name == "char":
        return ScalarType("c_char")
    if encoding == DW_ATE_BOOLEAN and size == 1:
        return ScalarType("c_bool")
    if encoding == DW_ATE_FLOAT and size in FLOAT_CTYPES:
        return ScalarType(FLOAT_CTYPES[size])
    if encoding in (DW_ATE_SIGNED, DW_ATE_SIGNED_CHAR) and size in INTEGER_BYTE_SIZES:
        return ScalarType(f"c_int{size * 8}")
    if encoding in (DW_ATE_UNSIGNED, DW_ATE_UNSIGNED_CHAR) and size in INTEGER_BYTE_SIZES:
        return ScalarType(f"c_uint{size * 8}")
    raise GeneratorError(f"no ctypes type for base type {name!r} ({size} bytes, encoding {encoding})")


def scalar_for_enumeration(die: Any) -> ScalarType:
    """The underlying integer type of an enum."""
    underlying = referenced_type(die)
    if underlying is not None:
        while underlying.tag in TYPE_QUALIFIER_TAGS:
            underlying = referenced_type(underlying)
        return scalar_for_base_type(underlying)
    size = integer_attribute(die, "DW_AT_byte_size") or 4
    values = [
        integer_attribute(child, "DW_AT_const_value") or 0
        for child in die.iter_children()
        if child.tag == "DW_TAG_enumerator"
    ]
    return ScalarType(f"c_int{size * 8}" if any(value < 0 for value in values) else f"c_uint{size * 8}")


def array_length(subrange: Any) -> int:
    """Elements in one array dimension; 0 for a flexible array member (no bound)."""
    count = integer_attribute(subrange, "DW_AT_count")
    if count is not None:
        return count
    upper_bound = integer_attribute(subrange, "DW_AT_upper_bound")
    if upper_bound is None or upper_bound in (-1, 2**32 - 1, 2**64 - 1):
        return 0
    lower_bound = integer_attribute(subrange, "DW_AT_lower_bound") or 0
    return upper_bound - lower_bound + 1


class DwarfTypeReader:
    """Turns the DWARF struct/union definitions of one object file into AggregateSpecs."""

    def __init__(self, stream: BinaryIO) -> None:
        dwarf = ELFFile(stream).get_dwarf_info()
        self._named_definitions: dict[str, Any] = {}
        for unit in dwarf.iter_CUs():
            for die in unit.iter_DIEs():
                keyword_ = AGGREGATE_TAGS.get(str(die.tag))
                name = die_name(die)
                if keyword_ and name and "DW_AT_declaration" not in die.attributes:
                    self._named_definitions.setdefault(f"{keyword_} {name}", die)
        self.aggregates: list[AggregateSpec] = []  # every dependency before its user
        self._class_by_offset: dict[int, str] = {}
        self._anonymous_count: dict[str, int] = {}

    def named(self, c_type: str) -> str:
        """Read `struct X`/`union X` (and everything it contains); return its class name."""
        die = self._named_definitions.get(c_type)
        if die is None:
            raise GeneratorError(f"{c_type} has no definition in the DWARF data")
        tag = c_type.split(" ", 1)[1]
        return self._aggregate(die, tag, scope=tag, location=tag, description=c_type)

    def _aggregate(self, die: Any, class_name: str, scope: str, location: str, description: str) -> str:
        """Read one struct/union; `scope` names anonymous types inside it, `location` is its C path."""
        known = self._class_by_offset.get(die.offset)
        if known is not None:
            return known
        self._class_by_offset[die.offset] = class_name
        keyword_ = AGGREGATE_TAGS[die.tag]
        tag = die_name(die)
        members = [
            self._member(child, scope, location)
            for child in die.iter_children()
            if child.tag == "DW_TAG_member"
        ]
        self.aggregates.append(
            AggregateSpec(
                class_name=class_name,
                c_type=f"{keyword_} {tag}" if tag else None,
                is_union=keyword_ == "union",
                byte_size=integer_attribute(die, "DW_AT_byte_size") or 0,
                members=members,
                description=description,
            )
        )
        return class_name

    def _member(self, die: Any, scope: str, location: str) -> MemberSpec:
        c_name = die_name(die)
        member_type = referenced_type(die)
        if c_name is None:
            index = self._anonymous_count.get(scope, 0)
            self._anonymous_count[scope] = index + 1
            py_name = f"{ANONYMOUS_MEMBER_PREFIX}{index}"
            type_spec = self._type(
                member_type, f"_{scope}{py_name}", scope, location, f"member of {location}"
            )
        else:
            if SYNTHETIC_MEMBER_NAME.fullmatch(c_name):
                raise GeneratorError(
                    f"member {c_name} of {location} clashes with the generator's synthetic names"
                )
            py_name = c_name
            type_spec = self._type(
                member_type,
                f"_{scope}_{c_name}",
                f"{scope}_{c_name}",
                f"{location}.{c_name}",
                f"type of {location}.{c_name}",
            )
        bit_size = integer_attribute(die, "DW_AT_bit_size")
        byte_offset = member_byte_offset(die)
        bit_offset = None
        if bit_size is not None:
            bit_offset = integer_attribute(die, "DW_AT_data_bit_offset")
            if bit_offset is None:  # DWARF 2/3: bits counted from the storage unit's most significant end
                storage_bits = (integer_attribute(die, "DW_AT_byte_size") or 0) * 8
                legacy = integer_attribute(die, "DW_AT_bit_offset") or 0
                bit_offset = byte_offset * 8 + storage_bits - legacy - bit_size
            byte_offset = bit_offset // 8
        return MemberSpec(c_name, py_name, type_spec, byte_offset, bit_size, bit_offset)

    def _type(self, die: Any, anonymous_name: str, scope: str, location: str, role: str) -> TypeSpec:
        """The TypeSpec of a member type; anonymous aggregates become classes named `anonymous_name`."""
        while die is not None and die.tag in TYPE_QUALIFIER_TAGS:
            die = referenced_type(die)
        if die is None:
            raise GeneratorError(f"the {role} is void")
        if die.tag == "DW_TAG_base_type":
            return scalar_for_base_type(die)
        if die.tag == "DW_TAG_enumeration_type":
            return scalar_for_enumeration(die)
        if die.tag in ("DW_TAG_pointer_type", "DW_TAG_reference_type"):
            return ScalarType("c_void_p")
        if die.tag == "DW_TAG_array_type":
            element = self._type(referenced_type(die), anonymous_name, scope, f"{location}[]", f"{role}[]")
            lengths = [
                array_length(child) for child in die.iter_children() if child.tag == "DW_TAG_subrange_type"
            ]
            for length in reversed(lengths):
                element = ArrayType(element, length)
            return element
        if die.tag in AGGREGATE_TAGS:
            keyword_ = AGGREGATE_TAGS[die.tag]
            tag = die_name(die)
            if tag is not None:
                return AggregateType(self.named(f"{keyword_} {tag}"))
            description = f"Anonymous {keyword_} {role}"
            return AggregateType(self._aggregate(die, anonymous_name, scope, location, description))
        raise GeneratorError(f"unsupported DWARF type {die.tag} as the {role}")


def read_aggregates(object_path: Path, c_types: Sequence[str]) -> list[AggregateSpec]:
    """Every aggregate needed by `c_types`, dependencies first, from an object file's DWARF."""
    with object_path.open("rb") as stream:
        reader = DwarfTypeReader(stream)
        for c_type in c_types:
            reader.named(c_type)
        return reader.aggregates


def reference_unit(c_types: Sequence[str]) -> str:
    """A translation unit defining one object of every aggregate, so gcc emits all of their DWARF."""
    lines = [f"#include <{ROOT_HEADER}>", ""]
    for index, c_type in enumerate(c_types):
        lines.append(f"{c_type} gen_kvm_uapi_reference_{index};")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# ctypes layout: choosing fields, padding and _pack_, checked against DWARF with real ctypes classes
# --------------------------------------------------------------------------------------------------


def type_expression(spec: TypeSpec) -> str:
    """Python source for the ctypes type of `spec`."""
    if isinstance(spec, ScalarType):
        return f"ctypes.{spec.name}"
    if isinstance(spec, AggregateType):
        return spec.class_name
    return f"{type_expression(spec.element)} * {spec.length}"


def annotation_type_expression(spec: TypeSpec) -> str:
    """The ctypes class of `spec` as a typing expression (arrays as ctypes.Array[...])."""
    if isinstance(spec, ArrayType):
        return f"ctypes.Array[{annotation_type_expression(spec.element)}]"
    return type_expression(spec)


def value_annotation(spec: TypeSpec) -> str:
    """The Python type that reading a field of type `spec` gives."""
    if isinstance(spec, ScalarType):
        if spec.name == "c_char":
            return "bytes"
        if spec.name == "c_bool":
            return "bool"
        if spec.name == "c_void_p":
            return "int | None"
        return "float" if spec.name in FLOAT_CTYPES.values() else "int"
    if isinstance(spec, ArrayType) and spec.element == ScalarType("c_char"):
        return "bytes"
    return annotation_type_expression(spec)


@dataclass(frozen=True)
class FieldPlan:
    """One entry of a generated `_fields_` list."""

    name: str
    type_source: str
    bit_size: int | None = None


@dataclass
class ClassPlan:
    """The Python class generated for one aggregate."""

    spec: AggregateSpec
    fields: list[FieldPlan]
    pack: int | None
    annotations: dict[str, str]
    alignment_note: str | None = None

    @property
    def anonymous(self) -> list[str]:
        """Members to list in `_anonymous_`."""
        return [member.py_name for member in self.spec.members if member.c_name is None]


class LayoutStrategyNotApplicable(Exception):
    """A layout strategy cannot express this aggregate."""


def round_up(value: int, alignment: int) -> int:
    """`value` rounded up to a multiple of `alignment`."""
    return -(-value // alignment) * alignment


class LayoutPlanner:
    """Builds each class from DWARF, executing it to make sure ctypes agrees byte for byte."""

    def __init__(self, probe: ProbeResults) -> None:
        self._probe = probe
        self.namespace: dict[str, Any] = {"ctypes": ctypes}
        self.plans: dict[str, ClassPlan] = {}
        self.notes: list[str] = []

    def ctype(self, spec: TypeSpec) -> Any:
        """The live ctypes type of `spec`."""
        return eval(type_expression(spec), self.namespace)

    def plan(self, spec: AggregateSpec) -> ClassPlan:
        """Pick the first strategy whose class matches DWARF; record it in the namespace."""
        strategies: list[Callable[[AggregateSpec], tuple[list[FieldPlan], int | None]]] = [
            self._natural_fields,
            self._padded_fields,
            self._packed_fields,
        ]
        attempts: list[str] = []
        fallback: ClassPlan | None = None
        for strategy in strategies:
            try:
                fields, pack = strategy(spec)
            except LayoutStrategyNotApplicable as reason:
                attempts.append(f"{strategy.__name__}: {reason}")
                continue
            plan = ClassPlan(spec, fields, pack, self._annotations(spec))
            self._define(plan)
            problems = layout_problems(self.namespace[spec.class_name], spec, self.ctype)
            alignment_problem = self._alignment_problem(spec)
            if not problems and alignment_problem is None:
                self.plans[spec.class_name] = plan
                return plan
            if not problems and fallback is None:
                plan.alignment_note = alignment_problem
                fallback = plan
            attempts.append(f"{strategy.__name__}: {'; '.join(problems) or alignment_problem}")
        if fallback is not None:
            assert fallback.alignment_note is not None
            self.notes.append(fallback.alignment_note)
            self._define(fallback)
            self.plans[spec.class_name] = fallback
            return fallback
        raise GeneratorError(f"cannot represent {spec.class_name} in ctypes:\n  " + "\n  ".join(attempts))

    def _define(self, plan: ClassPlan) -> None:
        exec(render_class(plan), self.namespace)

    def _alignment_problem(self, spec: AggregateSpec) -> str | None:
        if spec.c_type is None or spec.c_type not in self._probe.alignments:
            return None
        expected = self._probe.alignments[spec.c_type]
        actual = ctypes.alignment(self.namespace[spec.class_name])
        if expected == actual:
            return None
        return (
            f"{spec.c_type} is aligned to {expected} bytes in C but {actual} in ctypes "
            "(ctypes before Python 3.13 cannot raise a structure's alignment); its size and offsets are exact"
        )

    def _member_fields(self, spec: AggregateSpec) -> list[FieldPlan]:
        return [
            FieldPlan(member.py_name, type_expression(member.type), member.bit_size)
            for member in spec.members
        ]

    def _natural_fields(self, spec: AggregateSpec) -> tuple[list[FieldPlan], int | None]:
        return self._member_fields(spec), None

    def _padded_fields(self, spec: AggregateSpec) -> tuple[list[FieldPlan], int | None]:
        if any(member.bit_size is not None for member in spec.members):
            raise LayoutStrategyNotApplicable("explicit padding is not combined with bitfields")
        if spec.is_union:
            return [*self._member_fields(spec), padding_field(0, spec.byte_size)], None
        fields: list[FieldPlan] = []
        cursor = 0
        for member in spec.members:
            member_type = self.ctype(member.type)
            alignment = ctypes.alignment(member_type)
            if member.byte_offset < round_up(cursor, alignment) or member.byte_offset % alignment:
                raise LayoutStrategyNotApplicable(f"{member.py_name} is not naturally aligned")
            if member.byte_offset > round_up(cursor, alignment):
                fields.append(padding_field(len(fields), member.byte_offset - cursor))
            fields.append(FieldPlan(member.py_name, type_expression(member.type)))
            cursor = member.byte_offset + ctypes.sizeof(member_type)
        if cursor < spec.byte_size:
            fields.append(padding_field(len(fields), spec.byte_size - cursor))
        return renumber_padding(fields), None

    def _packed_fields(self, spec: AggregateSpec) -> tuple[list[FieldPlan], int | None]:
        if any(member.bit_size is not None for member in spec.members):
            raise LayoutStrategyNotApplicable("_pack_ is not combined with bitfields")
        if spec.is_union:
            return [*self._member_fields(spec), padding_field(0, spec.byte_size)], 1
        fields: list[FieldPlan] = []
        cursor = 0
        for member in spec.members:
            if member.byte_offset < cursor:
                raise LayoutStrategyNotApplicable(f"{member.py_name} overlaps the member before it")
            if member.byte_offset > cursor:
                fields.append(padding_field(len(fields), member.byte_offset - cursor))
            fields.append(FieldPlan(member.py_name, type_expression(member.type)))
            cursor = member.byte_offset + ctypes.sizeof(self.ctype(member.type))
        if cursor < spec.byte_size:
            fields.append(padding_field(len(fields), spec.byte_size - cursor))
        return renumber_padding(fields), 1

    def _annotations(self, spec: AggregateSpec) -> dict[str, str]:
        """Field types for type checkers, including the members reachable through anonymous members."""
        annotations: dict[str, str] = {}
        for member in spec.members:
            annotation = "int" if member.bit_size is not None else value_annotation(member.type)
            annotations[member.py_name] = annotation
            if member.c_name is None:
                # ctypes promotes the members of an anonymous member, recursively, but not the names of
                # the anonymous members nested inside it.
                assert isinstance(member.type, AggregateType)
                nested = self.plans[member.type.class_name]
                annotations.update(
                    (name, annotation)
                    for name, annotation in nested.annotations.items()
                    if name not in nested.anonymous
                )
        return {name: annotation for name, annotation in annotations.items() if annotatable(name)}


def annotatable(name: str) -> bool:
    """Whether `name` can be written as a class-body annotation (keywords cannot; __x would be mangled)."""
    return not keyword.iskeyword(name) and not (name.startswith("__") and not name.endswith("__"))


def padding_field(index: int, size: int) -> FieldPlan:
    """An explicit padding member of `size` bytes."""
    return FieldPlan(f"{PADDING_MEMBER_PREFIX}{index}", f"ctypes.c_uint8 * {size}")


def renumber_padding(fields: list[FieldPlan]) -> list[FieldPlan]:
    """Number padding members 0, 1, 2... in order."""
    renumbered: list[FieldPlan] = []
    count = 0
    for plan in fields:
        if SYNTHETIC_MEMBER_NAME.fullmatch(plan.name) and plan.name.startswith(PADDING_MEMBER_PREFIX):
            renumbered.append(FieldPlan(f"{PADDING_MEMBER_PREFIX}{count}", plan.type_source))
            count += 1
        else:
            renumbered.append(plan)
    return renumbered


def bitfield_positions(cls: Any, member_name: str) -> list[int]:
    """Bits (LSB-first within little-endian bytes) set by storing all ones in one bitfield."""
    instance = cls()
    try:
        setattr(instance, member_name, -1)
        if getattr(instance, member_name) != -1:
            raise ValueError
    except (TypeError, ValueError):
        instance = cls()
        field_size = getattr(cls, member_name).size >> 16
        setattr(instance, member_name, (1 << field_size) - 1)
    raw = bytes(instance)
    return [index * 8 + bit for index, byte in enumerate(raw) for bit in range(8) if byte >> bit & 1]


def layout_problems(cls: Any, spec: AggregateSpec, resolve: Callable[[TypeSpec], Any]) -> list[str]:
    """Differences between a ctypes class and the DWARF description of its aggregate."""
    problems: list[str] = []
    if ctypes.sizeof(cls) != spec.byte_size:
        problems.append(f"size {ctypes.sizeof(cls)} != {spec.byte_size}")
    for member in spec.members:
        descriptor = getattr(cls, member.py_name)
        if member.bit_size is None:
            expected_size = ctypes.sizeof(resolve(member.type))
            if (descriptor.offset, descriptor.size) != (member.byte_offset, expected_size):
                problems.append(
                    f"{member.py_name} at {descriptor.offset} ({descriptor.size} bytes), "
                    f"DWARF says {member.byte_offset} ({expected_size} bytes)"
                )
        else:
            assert member.bit_offset is not None
            expected_bits = list(range(member.bit_offset, member.bit_offset + member.bit_size))
            actual_bits = bitfield_positions(cls, member.py_name)
            if actual_bits != expected_bits:
                problems.append(
                    f"bitfield {member.py_name} occupies bits {actual_bits}, DWARF says {expected_bits}"
                )
    return problems


# --------------------------------------------------------------------------------------------------
# Rendering the module
# --------------------------------------------------------------------------------------------------


def quoted(identifier: str) -> str:
    """A C identifier as a Python string literal, in the double quotes ruff format prefers."""
    return f'"{identifier}"'


def render_class(plan: ClassPlan) -> str:
    """Python source of one ctypes class."""
    spec = plan.spec
    base = "ctypes.Union" if spec.is_union else "ctypes.Structure"
    lines = [
        f"class {spec.class_name}({base}):",
        f'    """{spec.description}: {spec.byte_size} bytes."""',
        "",
    ]
    if plan.alignment_note:
        lines.insert(2, f"    # NOTE: {plan.alignment_note}")
    if plan.anonymous:
        names = ", ".join(quoted(name) for name in plan.anonymous)
        lines.append(f"    _anonymous_ = ({names}{',' if len(plan.anonymous) == 1 else ''})")
    if plan.pack is not None:
        lines.append(f"    _pack_ = {plan.pack}")
    for name, annotation in plan.annotations.items():
        lines.append(f"    {name}: {annotation}")
    if plan.fields:
        lines.append("    _fields_ = [")
        for entry in plan.fields:
            bits = f", {entry.bit_size}" if entry.bit_size is not None else ""
            lines.append(f"        ({quoted(entry.name)}, {entry.type_source}{bits}),")
        lines.append("    ]")
    else:
        lines.append("    _fields_ = []")
    return "\n".join(lines) + "\n"


def render_constant(macro: MacroDefinition, value: int) -> str:
    """`NAME = value  # C expression` for one macro."""
    plain_decimal = DECIMAL_LITERAL.match(macro.body) is not None
    literal = str(value) if plain_decimal or value < 0 else f"0x{value:X}"
    comment = "" if plain_decimal or macro.body.lower() == literal.lower() else f"  # {macro.body}"
    return f"{macro.name} = {literal}{comment}"


@dataclass(frozen=True)
class Provenance:
    """Where the generated module's facts came from, for its header."""

    package: str
    linux_version_code: int | None
    header_paths: tuple[str, ...]
    compiler: str
    target: str


def linux_version_text(code: int | None) -> str:
    """LINUX_VERSION_CODE with its dotted form."""
    if code is None:
        return "LINUX_VERSION_CODE unknown (<linux/version.h> not found)"
    return f"LINUX_VERSION_CODE {code} ({code >> 16}.{code >> 8 & 0xFF}.{code & 0xFF})"


def render_module(
    provenance: Provenance,
    plans: Sequence[ClassPlan],
    macros: Sequence[MacroDefinition],
    probe: ProbeResults,
    notes: Sequence[str],
) -> str:
    """The whole uapi.py text."""
    named = [plan.spec for plan in plans if plan.spec.c_type is not None]
    out: list[str] = [
        f"# GENERATED by {GENERATOR_NAME} -- DO NOT EDIT.",
        f"# Regenerate with: python {GENERATOR_NAME}",
        "#",
        f"# Source: <{ROOT_HEADER}> from {provenance.package}, {linux_version_text(provenance.linux_version_code)};",
        "# structs, unions and macros are taken from:",
        *(f"#   {path}" for path in provenance.header_paths),
        f"# Compiler: {provenance.compiler}, target {provenance.target}.",
        "# Layouts come from the DWARF of a unit compiled with `gcc -g -c` that defines one object of every",
        "# struct/union; each class was executed and checked member by member against that DWARF. Constant",
        "# values were printed by a compiled C program (ioctl numbers are the header's _IO*() expansions).",
        "#",
        "# Naming: structs and unions keep their C tag (struct kvm_run -> kvm_run). Anonymous types get private",
        "# names from the enclosing type and member (_kvm_run_io is the type of kvm_run.io); anonymous members",
        f"# are named {ANONYMOUS_MEMBER_PREFIX}N and listed in _anonymous_, so their members are reached as in C",
        f"# (run.io.port, run.exit_reason). Explicit padding members, if any, are named {PADDING_MEMBER_PREFIX}N."
        " Flexible array",
        "# members are zero-length arrays; pointers are c_void_p; enums are their underlying integer type.",
    ]
    if probe.dropped:
        out += ["#", "# Macros left out because they are not integer constant expressions in C:"]
        out += [f"#   {name}: {reason}" for name, reason in sorted(probe.dropped.items())]
    if notes:
        out += ["#", "# Layout notes:"]
        out += [f"#   {note}" for note in notes]
    out += [
        "",
        f'"""KVM user-API structs, unions and constants for {provenance.target}, generated from <{ROOT_HEADER}>."""',
        "",
        "import ctypes",
        "",
        "# " + "-" * 98,
        "# Constants",
        "# " + "-" * 98,
    ]
    current_header = None
    constant_names: list[str] = []
    for macro in macros:
        if macro.name not in probe.constants:
            continue
        if macro.header != current_header:
            current_header = macro.header
            out += ["", f"# {macro.header}"]
        out.append(render_constant(macro, probe.constants[macro.name]))
        constant_names.append(macro.name)
    out += ["", "# " + "-" * 98, "# Structs and unions", "# " + "-" * 98]
    for plan in plans:
        out += ["", "", render_class(plan).rstrip("\n")]
    out += [
        "",
        "",
        "# Every struct and union the headers name (anonymous member types are reached through them).",
    ]
    out.append("STRUCTS: tuple[type[ctypes.Structure] | type[ctypes.Union], ...] = (")
    out += [f"    {spec.class_name}," for spec in named]
    out += [")", "", "__all__ = ["]
    out += [
        f"    {quoted(name)}," for name in [*constant_names, *(spec.class_name for spec in named), "STRUCTS"]
    ]
    out += ["]", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------------


def header_package(header_path: str, workdir: Path) -> str:
    """The distribution package (name and version) that installed `header_path`, if dpkg knows."""
    if shutil.which("dpkg") is None or shutil.which("dpkg-query") is None:
        return "an unknown package (dpkg is not available)"
    owner = run_command(["dpkg", "-S", header_path], workdir)
    if owner.returncode != 0 or ":" not in owner.stdout:
        return "an unknown package (dpkg does not own the header)"
    package = owner.stdout.splitlines()[0].rsplit(": ", 1)[0].strip()
    version = run_command(["dpkg-query", "-W", "-f", "${Version}", package], workdir)
    if version.returncode != 0:
        return f"the package {package}"
    return f"the Debian package {package} {version.stdout.strip()}"


def linux_version_code(compiler: str, workdir: Path) -> int | None:
    """LINUX_VERSION_CODE from <linux/version.h>, if installed."""
    outcome = run_command([compiler, "-dM", "-E", "-x", "c", "-"], workdir, "#include <linux/version.h>\n")
    match = re.search(r"^#define LINUX_VERSION_CODE (\d+)$", outcome.stdout, re.MULTILINE)
    return int(match.group(1)) if outcome.returncode == 0 and match else None


def read_provenance(compiler: str, workdir: Path, header_paths: tuple[str, ...]) -> Provenance:
    """Package, kernel version, header paths and compiler identity for the module header."""
    root_header = next((path for path in header_paths if path.endswith("/" + ROOT_HEADER)), header_paths[0])
    return Provenance(
        package=header_package(root_header, workdir),
        linux_version_code=linux_version_code(compiler, workdir),
        header_paths=header_paths,
        compiler=run_checked([compiler, "--version"], workdir).splitlines()[0],
        target=run_checked([compiler, "-dumpmachine"], workdir).strip(),
    )


# --------------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------------


def verify_module(text: str, plans: Iterable[ClassPlan], probe: ProbeResults) -> None:
    """Execute the rendered module and check every class, annotation and constant once more."""
    namespace: dict[str, Any] = {}
    exec(compile(text, "uapi.py", "exec"), namespace)

    def resolve(spec: TypeSpec) -> Any:
        return eval(type_expression(spec), namespace)

    failures: list[str] = []
    for plan in plans:
        spec = plan.spec
        cls = namespace[spec.class_name]
        failures += [f"{spec.class_name}: {problem}" for problem in layout_problems(cls, spec, resolve)]
        failures += [
            f"{spec.class_name}: annotation {name} names no ctypes field"
            for name in plan.annotations
            if not hasattr(cls, name)
        ]
        if spec.c_type is not None and ctypes.sizeof(cls) != probe.sizes[spec.c_type]:
            failures.append(f"{spec.class_name}: sizeof is {probe.sizes[spec.c_type]} in C")
    failures += [
        f"{name} = {namespace.get(name)!r}, C says {value}"
        for name, value in probe.constants.items()
        if namespace.get(name) != value
    ]
    if failures:
        raise GeneratorError("the rendered module disagrees with the headers:\n  " + "\n  ".join(failures))


def generate(compiler: str) -> str:
    """Produce the text of uapi.py from the installed headers."""
    with tempfile.TemporaryDirectory(prefix="gen_kvm_uapi_") as temporary:
        workdir = Path(temporary)
        declarations = scan_aggregate_tags(preprocess(compiler, workdir, f"#include <{ROOT_HEADER}>\n"))
        c_types = [f"{keyword_} {tag}" for keyword_, tag in declarations.tags]
        macros = read_macros(compiler, workdir)
        probe = run_probe(compiler, workdir, macros, c_types)

        (workdir / "types.c").write_text(reference_unit(c_types))
        run_checked([compiler, "-g", "-c", "-std=gnu11", "-o", "types.o", "types.c"], workdir)
        specs = read_aggregates(workdir / "types.o", c_types)

        planner = LayoutPlanner(probe)
        plans = [planner.plan(spec) for spec in specs]
        provenance = read_provenance(compiler, workdir, declarations.header_paths)
    text = render_module(provenance, plans, macros, probe, planner.notes)
    verify_module(text, plans, probe)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write (or with --check, compare) the generated module."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="file to write (default: %(default)s)"
    )
    parser.add_argument("--cc", default="gcc", help="C compiler to use (default: %(default)s)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the file differs from what would be generated",
    )
    arguments = parser.parse_args(argv)
    if shutil.which(arguments.cc) is None:
        print(f"error: C compiler {arguments.cc!r} not found", file=sys.stderr)
        return 2
    try:
        text = generate(arguments.cc)
    except GeneratorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    output: Path = arguments.output
    if arguments.check:
        current = output.read_text() if output.exists() else ""
        if current != text:
            print(f"{output} is out of date; run python {GENERATOR_NAME}", file=sys.stderr)
            return 1
        print(f"{output} is up to date")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
