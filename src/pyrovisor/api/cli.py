"""The `pyrovisor` command: a thin argparse front end over command modules."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from pyrovisor import __version__
from pyrovisor.errors import PyrovisorError

# Each module defines `register(subparsers)`, adding one or more sub-commands whose parser
# sets `handler=callable(args) -> int`. Registration must stay cheap: import heavy code in the handler.
COMMAND_MODULES: tuple[str, ...] = (
    "pyrovisor.api.commands",
    "pyrovisor.api.snapshot_commands",
    "pyrovisor.api.migration_commands",
    "pyrovisor.api.sandbox_commands",
    "pyrovisor.lab.cli",
)


class _Registrar(Protocol):
    def __call__(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyrovisor",
        description="A virtual machine monitor in Python on Linux KVM.",
    )
    parser.add_argument("--version", action="version", version=f"pyrovisor {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        register: _Registrar = importlib.import_module(name).register
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except PyrovisorError as exc:
        print(f"pyrovisor: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pyrovisor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
