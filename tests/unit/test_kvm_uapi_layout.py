"""Checks the generated KVM uapi module's layouts and constants against what gcc computes from the headers."""

from __future__ import annotations

import ctypes
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
UAPI_PATH = REPO_ROOT / "src" / "pyrovisor" / "kvm" / "uapi.py"
GENERATOR_PATH = REPO_ROOT / "tools" / "gen_kvm_uapi.py"
COMPILER = shutil.which("gcc")
GCC_MISSING = "gcc is not installed: the layouts can only be checked against a C compiler (CI installs gcc)"
needs_gcc = pytest.mark.skipif(COMPILER is None, reason=GCC_MISSING)

PADDING_MEMBER = re.compile(r"_pad\d+")  # explicit padding the generator may insert; absent from C
IOCTL_MACRO = re.compile(r"^#define (KVM_\w+) (_IO(?:R|W|WR)?\s*\(.*)$", re.MULTILINE)
LEFT_OUT_MACRO = re.compile(r"^#   (\w+): ", re.MULTILINE)
PROVENANCE_LINE = re.compile(r"^# (?:Source|Compiler): .*$", re.MULTILINE)

PathSegment = str | int  # a member name, or an array index
MemberPath = tuple[PathSegment, ...]
Key = TypeVar("Key")


def load_uapi() -> ModuleType:
    """The generated module, loaded from its file so these checks do not depend on the rest of pyrovisor.kvm."""
    spec = importlib.util.spec_from_file_location("generated_kvm_uapi_under_test", UAPI_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


uapi = load_uapi()


# --------------------------------------------------------------------------------------------------
# The Python side: sizes, offsets and bitfield bits as ctypes sees them
# --------------------------------------------------------------------------------------------------


def c_type_name(cls: type[Any]) -> str:
    """`struct kvm_run` for the class kvm_run."""
    return f"{'union' if issubclass(cls, ctypes.Union) else 'struct'} {cls.__name__}"


def c_member_path(path: MemberPath) -> str:
    """The C member designator of a path: ("redirtbl", 0, "fields") -> redirtbl[0].fields."""
    text = ""
    for segment in path:
        text += f"[{segment}]" if isinstance(segment, int) else f"{'.' if text else ''}{segment}"
    return text


@dataclass(frozen=True)
class Member:
    """One (possibly nested) member: where it starts and how big it is (None for a zero-sized array)."""

    path: MemberPath
    offset: int
    size: int | None


@dataclass(frozen=True)
class Bitfield:
    """One bitfield member, whose bits are compared instead of an offset."""

    path: MemberPath
    bits: int
    signed: bool


def is_aggregate(ctype: Any) -> bool:
    """Whether a ctypes type is a struct or union class."""
    return isinstance(ctype, type) and issubclass(ctype, ctypes.Structure | ctypes.Union)


def walk_members(cls: Any, prefix: MemberPath = (), base: int = 0) -> Iterator[Member | Bitfield]:
    """Every member reachable from `cls` by a C path: through anonymous members, nested structs, element [0]."""
    anonymous = set(getattr(cls, "_anonymous_", ()))
    for entry in cls._fields_:
        name, ctype = entry[0], entry[1]
        if PADDING_MEMBER.fullmatch(name):
            continue
        offset = base + getattr(cls, name).offset
        if name in anonymous:
            yield from walk_members(ctype, prefix, offset)  # C reaches these members without a name
            continue
        path = (*prefix, name)
        if len(entry) == 3:
            yield Bitfield(path, entry[2], ctype(-1).value < 0)
            continue
        element, element_path, is_array = ctype, path, False
        while isinstance(element, type) and issubclass(element, ctypes.Array):
            element, element_path, is_array = element._type_, (*element_path, 0), True
        # Zero-sized arrays are flexible (or [0]) array members, whose sizeof C does not always define.
        yield Member(path, offset, None if is_array and ctypes.sizeof(ctype) == 0 else ctypes.sizeof(ctype))
        if is_aggregate(element):
            yield from walk_members(element, element_path, offset)


def member_layout(cls: Any, c_type: str | None = None) -> dict[tuple[str, str], tuple[int, int | None]]:
    """(C type, member path) -> (offset, size) for every non-bitfield member of `cls`."""
    name = c_type or c_type_name(cls)
    return {
        (name, c_member_path(member.path)): (member.offset, member.size)
        for member in walk_members(cls)
        if isinstance(member, Member)
    }


def bitfield_bits(cls: Any, bitfield: Bitfield) -> tuple[int, ...]:
    """The bits of a zeroed `cls` that storing all ones into `bitfield` sets (bit i of byte n is n*8+i)."""
    instance = cls()
    target: Any = instance
    for segment in bitfield.path[:-1]:
        target = target[segment] if isinstance(segment, int) else getattr(target, segment)
    setattr(target, str(bitfield.path[-1]), -1 if bitfield.signed else (1 << bitfield.bits) - 1)
    raw = bytes(instance)
    return tuple(index * 8 + bit for index, byte in enumerate(raw) for bit in range(8) if byte >> bit & 1)


def python_facts(classes: tuple[Any, ...], constant_names: list[str]) -> LayoutFacts:
    """The same facts as the C probe prints, computed from the ctypes classes and module constants."""
    facts = LayoutFacts()
    for cls in classes:
        name = c_type_name(cls)
        facts.sizes[name] = (ctypes.sizeof(cls), ctypes.alignment(cls))
        facts.members.update(member_layout(cls))
        for member in walk_members(cls):
            if isinstance(member, Bitfield):
                facts.bits[(name, c_member_path(member.path))] = bitfield_bits(cls, member)
    facts.constants = {constant: getattr(uapi, constant) for constant in constant_names}
    return facts


def mismatches(expected: Mapping[Key, object], actual: Mapping[Key, object]) -> list[str]:
    """Every key whose value differs between C (`expected`) and Python (`actual`), or that only one side has."""
    problems: list[str] = []
    for key in sorted(expected.keys() | actual.keys(), key=repr):
        if key not in actual:
            problems.append(f"{key}: missing in Python (C: {expected[key]})")
        elif key not in expected:
            problems.append(f"{key}: not in C (Python: {actual[key]})")
        elif expected[key] != actual[key]:
            problems.append(f"{key}: Python {actual[key]}, C {expected[key]}")
    return problems


# --------------------------------------------------------------------------------------------------
# The C side: one generated program printing the same facts
# --------------------------------------------------------------------------------------------------


@dataclass
class LayoutFacts:
    """Sizes and alignments, member offsets and sizes, bitfield bits and constant values."""

    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    members: dict[tuple[str, str], tuple[int, int | None]] = field(default_factory=dict)
    bits: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    constants: dict[str, int] = field(default_factory=dict)


C_PROLOGUE = r"""#include <linux/kvm.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

static void print_set_bits(const char *c_type, const char *path, const void *object, size_t size)
{
    const unsigned char *bytes = object;
    printf("bits\t%s\t%s\t", c_type, path);
    for (size_t bit = 0; bit < size * 8; bit++)
        if (bytes[bit / 8] >> (bit % 8) & 1)
            printf("%zu,", bit);
    printf("\n");
}

#define PRINT_CONSTANT(x) do { if ((x) < 0) printf("constant\t%s\t%lld\n", #x, (long long)(x)); \
    else printf("constant\t%s\t%llu\n", #x, (unsigned long long)(x)); } while (0)

int main(void)
{
"""


def c_probe_source(classes: tuple[Any, ...], constant_names: list[str]) -> str:
    """A C program printing what python_facts computes: for each class's C type, then for each constant."""
    lines = [C_PROLOGUE]
    for cls in classes:
        c_type = c_type_name(cls)
        lines.append(
            f'    printf("size\\t%s\\t%zu\\t%zu\\n", "{c_type}", sizeof({c_type}), _Alignof({c_type}));'
        )
        for member in walk_members(cls):
            path = c_member_path(member.path)
            if isinstance(member, Bitfield):
                lines.append(
                    f"    {{ {c_type} object; memset(&object, 0, sizeof object); object.{path} = -1;"
                    f' print_set_bits("{c_type}", "{path}", &object, sizeof object); }}'
                )
                continue
            size = "-1LL" if member.size is None else f"(long long)sizeof((({c_type} *)0)->{path})"
            lines.append(
                f'    printf("member\\t%s\\t%s\\t%zu\\t%lld\\n", "{c_type}", "{path}",'
                f" offsetof({c_type}, {path}), {size});"
            )
    lines += [f"    PRINT_CONSTANT({name});" for name in constant_names]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def run_c_probe(source: str, workdir: Path) -> LayoutFacts:
    """Compile and run a probe program; parse what it prints."""
    assert COMPILER is not None
    (workdir / "probe.c").write_text(source)
    build = subprocess.run(
        [COMPILER, "-std=gnu11", "-w", "-o", "probe", "probe.c"], cwd=workdir, capture_output=True, text=True
    )
    assert build.returncode == 0, f"the C probe does not compile:\n{build.stderr[:4000]}"
    run = subprocess.run(["./probe"], cwd=workdir, capture_output=True, text=True, check=True)
    facts = LayoutFacts()
    for line in run.stdout.splitlines():
        kind, *fields = line.split("\t")
        if kind == "size":
            facts.sizes[fields[0]] = (int(fields[1]), int(fields[2]))
        elif kind == "member":
            size = int(fields[3])
            facts.members[(fields[0], fields[1])] = (int(fields[2]), None if size < 0 else size)
        elif kind == "bits":
            facts.bits[(fields[0], fields[1])] = tuple(int(bit) for bit in fields[2].split(",") if bit)
        else:
            facts.constants[fields[0]] = int(fields[1])
    return facts


def uapi_constant_names() -> list[str]:
    """Every integer constant of the generated module."""
    return [name for name, value in vars(uapi).items() if name.isupper() and type(value) is int]


@pytest.fixture(scope="module")
def c_facts(tmp_path_factory: pytest.TempPathFactory) -> LayoutFacts:
    """What gcc says about every generated struct (and nested member)."""
    if COMPILER is None:
        pytest.skip(GCC_MISSING)
    return run_c_probe(c_probe_source(uapi.STRUCTS, []), tmp_path_factory.mktemp("kvm_uapi_layout"))


@pytest.fixture(scope="module")
def c_constants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """What gcc says every generated constant is (a separate program, so a bad name cannot hide layouts)."""
    if COMPILER is None:
        pytest.skip(GCC_MISSING)
    return run_c_probe(
        c_probe_source((), uapi_constant_names()), tmp_path_factory.mktemp("kvm_uapi_constants")
    ).constants


@pytest.fixture(scope="module")
def py_facts() -> LayoutFacts:
    """The same facts as computed from the generated ctypes classes."""
    return python_facts(uapi.STRUCTS, uapi_constant_names())


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------


def test_struct_sizes_and_alignments_match_c(c_facts: LayoutFacts, py_facts: LayoutFacts) -> None:
    assert mismatches(c_facts.sizes, py_facts.sizes) == []


def test_member_offsets_and_sizes_match_c(c_facts: LayoutFacts, py_facts: LayoutFacts) -> None:
    assert len(py_facts.members) > 1000
    assert mismatches(c_facts.members, py_facts.members) == []


def test_bitfields_occupy_the_same_bits_as_in_c(c_facts: LayoutFacts, py_facts: LayoutFacts) -> None:
    assert ("struct kvm_ioapic_state", "redirtbl[0].fields.delivery_mode") in py_facts.bits
    assert mismatches(c_facts.bits, py_facts.bits) == []


def test_every_generated_class_is_checked() -> None:
    reached: set[Any] = set()
    pending: list[Any] = list(uapi.STRUCTS)
    while pending:
        cls = pending.pop()
        if cls in reached:
            continue
        reached.add(cls)
        for entry in cls._fields_:
            element = entry[1]
            while isinstance(element, type) and issubclass(element, ctypes.Array):
                element = element._type_
            if is_aggregate(element):
                pending.append(element)
    defined = {value for value in vars(uapi).values() if is_aggregate(value)}
    assert defined - reached == set()


def test_every_kvm_struct_in_the_headers_is_generated() -> None:
    header_text = ""
    for header in (Path("/usr/include/linux/kvm.h"), *Path("/usr/include").glob("*/asm/kvm.h")):
        if header.exists():
            header_text += header.read_text()
    if not header_text:
        pytest.skip("the KVM headers are not installed under /usr/include (linux-libc-dev)")
    in_headers = set(re.findall(r"\bstruct (kvm_\w+)\s*\{", header_text))
    generated = {cls.__name__ for cls in uapi.STRUCTS}
    assert in_headers - generated == set()


# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------


def test_every_constant_matches_c(c_constants: dict[str, int], py_facts: LayoutFacts) -> None:
    assert len(py_facts.constants) > 500
    assert mismatches(c_constants, py_facts.constants) == []


@needs_gcc
def test_every_ioctl_of_the_header_is_generated_or_listed_as_left_out(tmp_path: Path) -> None:
    assert COMPILER is not None
    macros = subprocess.run(
        [COMPILER, "-dM", "-E", "-x", "c", "-"],
        input="#include <linux/kvm.h>\n",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ioctls = set(IOCTL_MACRO.findall(macros))
    assert len(ioctls) > 100
    left_out = set(LEFT_OUT_MACRO.findall(UAPI_PATH.read_text()))
    missing = {name for name, _body in ioctls if not hasattr(uapi, name)}
    assert missing - left_out == set(), "ioctls neither generated nor listed as left out"
    for name in sorted(missing):  # each of those must really be unusable here (e.g. another arch's struct)
        (tmp_path / "left_out.c").write_text(f"#include <linux/kvm.h>\nunsigned long value = {name};\n")
        build = subprocess.run(
            [COMPILER, "-fsyntax-only", "left_out.c"], cwd=tmp_path, capture_output=True, text=True
        )
        assert build.returncode != 0, f"{name} compiles, so it should have been generated"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVM_API_VERSION", 12),
        ("KVM_GET_API_VERSION", 0xAE00),
        ("KVM_CREATE_VM", 0xAE01),
        ("KVM_CREATE_VCPU", 0xAE41),
        ("KVM_RUN", 0xAE80),
        ("KVM_GET_REGS", 0x8090AE81),
        ("KVM_SET_REGS", 0x4090AE82),
        ("KVM_GET_SREGS", 0x8138AE83),
        ("KVM_SET_USER_MEMORY_REGION", 0x4020AE46),
        ("KVM_EXIT_IO", 2),
        ("KVM_EXIT_HLT", 5),
        ("KVM_EXIT_MMIO", 6),
        ("KVM_EXIT_SHUTDOWN", 8),
        ("KVM_EXIT_INTERNAL_ERROR", 17),
        ("KVM_MEM_READONLY", 2),
        ("KVM_COALESCED_MMIO_PAGE_OFFSET", 2),
    ],
)
def test_known_constant_values(name: str, value: int) -> None:
    assert getattr(uapi, name) == value


@pytest.mark.parametrize(
    ("first", "second"),
    [("KVM_GET_PIT2", "KVM_GET_VCPU_EVENTS"), ("KVM_IRQ_LINE_STATUS", "KVM_REGISTER_COALESCED_MMIO")],
)
def test_ioctls_sharing_a_number_keep_their_own_size(first: str, second: str) -> None:
    first_value, second_value = getattr(uapi, first), getattr(uapi, second)
    assert first_value & 0xFFFF == second_value & 0xFFFF  # same type byte and number
    assert first_value != second_value


# --------------------------------------------------------------------------------------------------
# Known facts and C-like access
# --------------------------------------------------------------------------------------------------


def field_offset(cls: Any, path: str) -> int:
    """Offset of a dotted member path, through anonymous members as in C."""
    return member_layout(cls)[(c_type_name(cls), path)][0]


@pytest.mark.parametrize(
    ("struct", "path", "offset"),
    [
        ("kvm_run", "immediate_exit", 1),
        ("kvm_run", "exit_reason", 8),
        ("kvm_run", "io", 32),
        ("kvm_run", "io.port", 34),
        ("kvm_run", "mmio.phys_addr", 32),
        ("kvm_run", "s.regs.regs.rip", 304 + 128),
        ("kvm_segment", "dpl", 16),
        ("kvm_msrs", "entries", 8),
        ("kvm_cpuid2", "entries", 8),
    ],
)
def test_known_offsets(struct: str, path: str, offset: int) -> None:
    assert field_offset(getattr(uapi, struct), path) == offset


@pytest.mark.parametrize(
    ("struct", "size"),
    [
        ("kvm_run", 2352),
        ("kvm_regs", 144),
        ("kvm_sregs", 312),
        ("kvm_segment", 24),
        ("kvm_lapic_state", 1024),
        ("kvm_xsave", 4096),
        ("kvm_msrs", 8),
        ("kvm_cpuid_entry2", 40),
        ("kvm_userspace_memory_region", 32),
    ],
)
def test_known_sizes(struct: str, size: int) -> None:
    assert ctypes.sizeof(getattr(uapi, struct)) == size


def test_anonymous_members_are_reached_as_in_c() -> None:
    run = uapi.kvm_run()
    run.exit_reason = uapi.KVM_EXIT_IO
    run.io.port = 0x3F8
    raw = bytes(run)
    assert int.from_bytes(raw[8:12], "little") == uapi.KVM_EXIT_IO
    assert int.from_bytes(raw[34:36], "little") == 0x3F8
    run.mmio.phys_addr = 0xFEE0_0000
    assert int.from_bytes(bytes(run)[32:40], "little") == 0xFEE0_0000
    assert run.io.port == 0xFEE0  # the exit union's members overlap, as in C: port is phys_addr's bytes 2-3
    msrs = uapi.kvm_msrs(nmsrs=1)
    assert uapi.kvm_msrs.entries.offset == 8 and len(msrs.entries) == 0


# --------------------------------------------------------------------------------------------------
# The checks can fail
# --------------------------------------------------------------------------------------------------


def test_mismatches_reports_a_wrong_offset() -> None:
    right = member_layout(uapi.kvm_segment)
    wrong = dict(right)
    wrong[("struct kvm_segment", "dpl")] = (17, 1)
    assert mismatches(right, right) == []
    assert mismatches(right, wrong) == ["('struct kvm_segment', 'dpl'): Python (17, 1), C (16, 1)"]
    del wrong[("struct kvm_segment", "g")]
    assert any("missing in Python" in problem for problem in mismatches(right, wrong))


def test_a_misdeclared_struct_is_caught_against_c(c_facts: LayoutFacts) -> None:
    fields = [
        ("selector", ctypes.c_uint32) if entry[0] == "selector" else entry
        for entry in uapi.kvm_segment._fields_
    ]
    misdeclared = type("kvm_segment", (ctypes.Structure,), {"_fields_": fields})
    problems = mismatches(c_facts.members, member_layout(misdeclared))
    assert any("'dpl'" in problem for problem in problems)


def test_a_misplaced_bitfield_is_caught() -> None:
    swapped_fields = list(uapi._kvm_ioapic_state_redirtbl_fields._fields_)
    # Declare dest_mode before delivery_mode: delivery_mode then starts one bit later.
    swapped_fields[1], swapped_fields[2] = swapped_fields[2], swapped_fields[1]
    swapped = type("swapped", (ctypes.Structure,), {"_fields_": swapped_fields})
    bitfield = Bitfield(("delivery_mode",), 3, signed=False)
    assert bitfield_bits(uapi._kvm_ioapic_state_redirtbl_fields, bitfield) == (8, 9, 10)
    assert bitfield_bits(swapped, bitfield) == (9, 10, 11)


# --------------------------------------------------------------------------------------------------
# The committed file is what the generator produces
# --------------------------------------------------------------------------------------------------


@needs_gcc
def test_generated_module_is_up_to_date(tmp_path: Path) -> None:
    regenerated = tmp_path / "uapi.py"
    subprocess.run(
        [sys.executable, str(GENERATOR_PATH), "--output", str(regenerated)], check=True, capture_output=True
    )
    committed_text, regenerated_text = UAPI_PATH.read_text(), regenerated.read_text()
    if PROVENANCE_LINE.findall(committed_text) != PROVENANCE_LINE.findall(regenerated_text):
        pytest.skip(
            "the installed headers or compiler differ from those the committed module was generated from"
        )
    assert regenerated_text == committed_text, f"run python {GENERATOR_PATH.relative_to(REPO_ROOT)}"
