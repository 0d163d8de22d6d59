"""`pyrovisor sandbox`: make a base snapshot with the OS's runner, then run programs from it, reverting each time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pyrovisor.api.cli import memory_size, positive_int, positive_seconds, vcpu_count
from pyrovisor.api.jail_options import add_jail_arguments
from pyrovisor.confine.options import add_seccomp_argument, configure_seccomp

if TYPE_CHECKING:
    from pyrovisor.sandbox import SandboxReport

DEFAULT_MEMORY = "256M"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sandbox = subparsers.add_parser(
        "sandbox", help="run a program in a VM restored from a clean snapshot, report what it changed, revert",
        description="With --make-base DIR: boot the OS guest with its runner waiting for a command and snapshot "
                    "it into DIR. With --base DIR --run \"PROGRAM ARGS\": restore DIR, run the program in the guest "
                    "(console to the log file only), stop on its exit or the timeout, and report the guest-physical "
                    "pages it changed, as kernel or user memory of a process; then revert for the next run.")
    mode = sandbox.add_mutually_exclusive_group(required=True)
    mode.add_argument("--make-base", type=Path, metavar="DIR", help="create a base snapshot in DIR")
    mode.add_argument("--base", type=Path, metavar="DIR", help="the base snapshot to restore for every run")
    sandbox.add_argument("--run", metavar="\"PROGRAM ARGS\"", help="the program to run and its key=value arguments")
    sandbox.add_argument("--timeout", type=positive_seconds, default=30.0,
                         help="seconds before a run is stopped (default 30)")
    sandbox.add_argument("--runs", type=positive_int, default=1, help="runs, each from a fresh restore")
    sandbox.add_argument("--log", type=Path, default=Path("sandbox.log"),
                         help="the guest's console, appended run after run (default: sandbox.log)")
    sandbox.add_argument("--json", action="store_true", help="print the reports as JSON")
    sandbox.add_argument("--memory", "-m", type=memory_size, help=f"guest RAM for --make-base (default {DEFAULT_MEMORY})")
    sandbox.add_argument("--vcpus", type=vcpu_count, help="vCPUs for --make-base (default 1)")
    add_jail_arguments(sandbox)
    add_seccomp_argument(sandbox)
    sandbox.set_defaults(handler=_sandbox, parser=sandbox)


def _sandbox(args: argparse.Namespace) -> int:
    from pyrovisor.api.jail_options import enter_jail
    from pyrovisor.arch.x86_64.layout import parse_size
    from pyrovisor.confine.jail import Bind
    from pyrovisor.output import console
    from pyrovisor.sandbox import Sandbox, make_base

    memory = args.memory if args.memory is not None else parse_size(DEFAULT_MEMORY)
    if args.jail is not None:
        created = [("--make-base", args.make_base)] if args.make_base is not None else [("--log", args.log)]
        jailed = enter_jail(args, [Bind(args.base)] if args.base is not None else [], created=created,
                            memory=memory if args.make_base is not None else None)
        if jailed is not None:  # the launcher, outside the jail: the jailed VMM's exit code
            return jailed
    configure_seccomp(args)
    if args.make_base is not None:
        if args.run is not None:
            args.parser.error("--run needs --base, not --make-base")
        make_base(args.make_base, memory, args.vcpus if args.vcpus is not None else 1)
        console().print(f"sandbox base written to {args.make_base}")
        return 0
    if args.run is None:
        args.parser.error("--base needs --run \"PROGRAM ARGS\"")
    for flag, value in (("--memory", args.memory), ("--vcpus", args.vcpus)):
        if value is not None:
            args.parser.error(f"{flag} applies to --make-base; a run restores the base's memory and vCPUs")
    if not args.log.parent.is_dir():
        args.parser.error(f"--log {args.log}: directory {args.log.parent} does not exist")
    reports = []
    with Sandbox(args.base, args.log) as sandbox:
        for _ in range(args.runs):
            reports.append(sandbox.run(args.run, args.timeout))
    if args.json:
        print(json.dumps([report.to_json() for report in reports], indent=2))
    else:
        _print(reports)
    return 0 if all(r.outcome == "exited" and r.program_exit_code == 0 for r in reports) else 1


def _print(reports: list[SandboxReport]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from pyrovisor.output import console

    out = console()
    for report in reports:
        table = Table(title=escape(f"run {report.run}: {report.command} — {report.outcome}, {report.describe_program()}; "
                            f"{report.pages_changed} pages changed "
                            f"({report.pages_written} written), {report.pages_of('user')} user, "
                            f"{report.pages_of('kernel')} kernel"))
        for column in ("guest-physical", "pages", "memory", "pid", "process", "virtual address"):
            table.add_column(column)
        for r in report.ranges:
            table.add_row(f"{r.gpa:#x}", str(r.pages), r.kind, "" if r.pid is None else str(r.pid), r.process or "",
                          "" if r.virtual_address is None else f"{r.virtual_address:#x}")
        out.print(table)
    summary = Table(title="revert cycles (restore, run, compare, tear down)")
    for column in ("run", "restore ms", "run ms", "compare ms", "cycle ms", "clean start: pages re-checked",
                   "same changes as run 1"):
        summary.add_column(column)
    first = {(r.gpa, r.pages, r.kind, r.pid, r.virtual_address) for r in reports[0].ranges}
    for report in reports:
        same = {(r.gpa, r.pages, r.kind, r.pid, r.virtual_address) for r in report.ranges} == first
        summary.add_row(str(report.run), f"{report.restore_ms:.1f}", f"{report.run_ms:.1f}", f"{report.analyse_ms:.1f}",
                        f"{report.cycle_ms:.1f}", str(report.clean_start_pages), "yes" if same else "no")
    out.print(summary)
    out.print(f"console log: {reports[0].log}")
