"""`pyrovisor forensics`: the OS guest's volatility3 symbol table, and vol run on a saved guest."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    forensics = subparsers.add_parser(
        "forensics", help="memory forensics of saved guests with volatility3",
        description="Write the OS guest kernel's volatility3 symbol table (ISF, from its DWARF) and run vol with "
                    "pyrovisor's plugin on a snapshot (docs/introspection.md, section 4).")
    verbs = forensics.add_subparsers(dest="verb", metavar="VERB", required=True)

    isf = verbs.add_parser("isf", help="write a kernel's volatility3 symbol table (ISF JSON)",
                           description="Convert a kernel ELF's DWARF to a volatility3 ISF; the profile next to it "
                                       "(NAME.profile.json) adds its constants. Default: the built-in OS guest.")
    isf.add_argument("kernel", type=Path, nargs="?", help="kernel ELF with DWARF (default: the built-in os.elf)")
    isf.add_argument("--out", type=Path, required=True, metavar="FILE",
                     help="where to write it (for the plugin: DIR/pyrovisor/os.json, then vol -s DIR)")
    isf.add_argument("--json", action="store_true", help="print what was written as JSON")
    isf.set_defaults(handler=_isf)

    vol = verbs.add_parser("vol", help="run vol with pyrovisor's plugin on a snapshot",
                           description="Write the symbol table of the snapshot's kernel to a temporary directory and "
                                       "run volatility3 on its memory.img. Arguments after -- go to vol in place "
                                       "of the default plugin (pyrovisor.pslist), e.g. -- pyrovisor.pslist --dtb N.")
    vol.add_argument("snapshot", type=Path, help="a full snapshot directory")
    vol.add_argument("--json", action="store_true", help="vol's JSON renderer (-r json)")
    vol.add_argument("vol_args", nargs=argparse.REMAINDER, metavar="-- VOL_ARG",
                     help="vol's plugin and its options, after --")
    vol.set_defaults(handler=_vol)


def _isf(args: argparse.Namespace) -> int:
    from pyrovisor.catalog import guests_dir
    from pyrovisor.forensics.run_vol import kernel_profile
    from pyrovisor.introspect.isf import build_isf, summarize

    kernel: Path = args.kernel if args.kernel is not None else guests_dir() / "os.elf"
    document = build_isf(kernel, kernel_profile(kernel))
    args.out.write_text(json.dumps(document))
    summary = summarize(document, kernel)
    if args.json:
        print(json.dumps({"out": str(args.out), **dataclasses.asdict(summary)}, indent=2))
    else:
        dtb = f"{summary.dtb:#x}" if summary.dtb is not None else "none (no kernel_pml4)"
        print(f"{args.out}: {summary.user_types} structures, {summary.base_types} base types, {summary.enums} enums, "
              f"{summary.symbols} symbols of {kernel}; page-table root {dtb}")
    return 0


def _vol(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    from pyrovisor.forensics.run_vol import require_volatility, saved_guest, vol_command, write_symbols

    require_volatility("pyrovisor forensics vol")
    guest = saved_guest(args.snapshot)
    json_output, plugin_args = _split_vol_args(args.json, args.vol_args)
    with tempfile.TemporaryDirectory(prefix="pyrovisor-isf-") as symbols:
        write_symbols(guest.kernel, Path(symbols))
        renderer = ["-r", "json"] if json_output else []
        return subprocess.run(vol_command(guest.memory_file, Path(symbols), [*renderer, *plugin_args]),
                              check=False).returncode


def _split_vol_args(json_output: bool, rest: list[str]) -> tuple[bool, list[str]]:
    """(--json given, vol's arguments): what follows the snapshot is ours up to --, vol's after it."""
    from pyrovisor.errors import ConfigError
    from pyrovisor.forensics.run_vol import DEFAULT_PLUGIN

    ours, vol_args = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    for arg in ours:
        if arg != "--json":
            raise ConfigError("forensics vol", arg, "unknown argument (vol's plugin and options go after --)")
        json_output = True
    return json_output, vol_args or [DEFAULT_PLUGIN]
