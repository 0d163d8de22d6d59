"""The OS kernel's volatility3 symbol table: valid by volatility3's own schema, and in agreement with the
kernel profile the build emits (the same structures, offsets, sizes, enums, symbols and constants)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pyrovisor.api.cli import main
from pyrovisor.catalog import guests_dir
from pyrovisor.errors import LoaderError
from pyrovisor.introspect.isf import DTB_SYMBOL, ISF_FORMAT, build_isf, constant_value
from pyrovisor.introspect.profile import Profile, guest_profile

KERNEL = guests_dir() / "os.elf"


@pytest.fixture(scope="module")
def isf() -> dict[str, Any]:
    return build_isf(KERNEL, guest_profile())


def volatility_schema() -> dict[str, Any]:
    import volatility3

    path = Path(volatility3.__file__).parent / "schemas" / f"schema-{ISF_FORMAT}.json"
    return dict(json.loads(path.read_text()))


def type_size(isf: dict[str, Any], descriptor: dict[str, Any]) -> int:
    kind = descriptor["kind"]
    if kind == "base":
        return int(isf["base_types"][descriptor["name"]]["size"])
    if kind == "pointer":
        return int(isf["base_types"]["pointer"]["size"])
    if kind == "array":
        return int(descriptor["count"]) * type_size(isf, descriptor["subtype"])
    if kind in ("struct", "union"):
        return int(isf["user_types"][descriptor["name"]]["size"])
    if kind == "enum":
        return int(isf["enums"][descriptor["name"]]["size"])
    raise AssertionError(f"no size for {descriptor}")


def test_the_table_is_valid_by_volatility3s_own_schema(isf: dict[str, Any], tmp_path: Path) -> None:
    validator = jsonschema.Draft4Validator(volatility_schema())  # the schema's own draft ("id", not "$id")
    validator.validate(isf)
    broken = json.loads(json.dumps(isf))
    broken["user_types"]["process"]["fields"]["pid"]["offset"] = "0"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)
    # and volatility3 itself loads it, to the same sizes
    from volatility3.framework import contexts
    from volatility3.framework.symbols import intermed

    path = tmp_path / "os.json"
    path.write_text(json.dumps(isf))
    table = intermed.IntermediateSymbolTable(contexts.Context(), "test", "os", isf_url=path.as_uri())
    assert table.get_type("process").size == guest_profile().struct("process").size
    assert table.get_symbol("proc_table").address == guest_profile().symbol("proc_table").address


def test_every_profile_structure_has_the_same_layout_in_the_table(isf: dict[str, Any]) -> None:
    profile = guest_profile()
    assert {"process", "mm", "cpu", "os_info"} <= set(profile.structs)
    for name, layout in profile.structs.items():
        user_type = isf["user_types"][name]
        assert user_type["size"] == layout.size, name
        for field_name, field in layout.fields.items():
            isf_field = user_type["fields"][field_name]
            assert isf_field["offset"] == field.offset, f"{name}.{field_name}"
            assert type_size(isf, isf_field["type"]) == field.size, f"{name}.{field_name}"
    process = isf["user_types"]["process"]["fields"]
    assert process["name"]["type"] == {"kind": "array", "count": 16, "subtype": {"kind": "base", "name": "char"}}
    assert process["mm"]["type"] == {"kind": "pointer", "subtype": {"kind": "struct", "name": "mm"}}


def test_enums_symbols_and_constants_agree_with_the_profile(isf: dict[str, Any]) -> None:
    profile = guest_profile()
    states = isf["enums"]["proc_state"]["constants"]
    assert {name.removeprefix("PROC_").lower(): value for name, value in states.items()} == \
        {name: value for value, name in profile.enums["proc_state"].items()}
    for name, symbol in profile.symbols.items():
        assert isf["symbols"][name]["address"] == symbol.address, name
    table = isf["symbols"]["proc_table"]["type"]
    assert table == {"kind": "array", "count": profile.constant("MAX_PROCS"),
                     "subtype": {"kind": "struct", "name": "process"}}
    assert isf["symbols"]["os_info"]["type"] == {"kind": "struct", "name": "os_info"}
    for name, value in profile.constants.items():
        assert constant_value(isf["symbols"][name]) == value, name
    kernel_pml4 = profile.symbol("kernel_pml4").address
    assert constant_value(isf["symbols"][DTB_SYMBOL]) == profile.image_physical(kernel_pml4)


def test_a_kernel_without_dwarf_or_not_an_elf_or_another_builds_profile_is_refused(tmp_path: Path) -> None:
    stripped = tmp_path / "os-stripped.elf"
    objcopy = shutil.which("objcopy")
    assert objcopy is not None
    subprocess.run([objcopy, "--strip-debug", str(KERNEL), str(stripped)], check=True)
    with pytest.raises(LoaderError, match="has no DWARF debug information"):
        build_isf(stripped)
    not_elf = tmp_path / "notes.txt"
    not_elf.write_text("hello\n")
    with pytest.raises(LoaderError, match="not an ELF file"):
        build_isf(not_elf)
    with pytest.raises(LoaderError, match=r"missing\.elf: No such file"):
        build_isf(tmp_path / "missing.elf")
    other_build = dataclasses.replace(guest_profile(), kernel_sha256="0" * 64)
    with pytest.raises(LoaderError, match="another build"):
        build_isf(KERNEL, other_build)
    assert isinstance(other_build, Profile)


def test_the_cli_writes_the_table_and_reports_it_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pyrovisor" / "os.json"
    out.parent.mkdir()
    assert main(["forensics", "isf", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert report["out"] == str(out) and report["kernel"] == str(KERNEL)
    assert report["user_types"] == len(written["user_types"]) and "process" in written["user_types"]
    assert report["dtb"] == guest_profile().image_physical(guest_profile().symbol("kernel_pml4").address)

    assert main(["forensics", "isf", str(tmp_path / "nope.elf"), "--out", str(tmp_path / "x.json")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("pyrovisor: error:") and "nope.elf" in error[0]
    with pytest.raises(SystemExit) as exit_info:
        main(["forensics", "isf", "--bogus"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_the_core_never_imports_volatility3() -> None:
    code = ("import sys; from pyrovisor.api.cli import build_parser; build_parser(); "
            "import pyrovisor.introspect.isf, pyrovisor.forensics.run_vol, pyrovisor.api.forensics_commands; "
            "print('volatility3' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
