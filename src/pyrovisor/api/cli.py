"""The `pyrovisor` command: a thin argparse front end over command modules."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn, Protocol, cast

from pyrovisor import __version__
from pyrovisor.errors import ConfigError, PyrovisorError

# Each module defines `register(subparsers)`, adding one or more sub-commands whose parser
# sets `handler=callable(args) -> int`. Registration must stay cheap: import heavy code in the handler
# (tests/unit/test_cli_args.py checks that `ctl` never imports numpy, matplotlib or a lab model).
COMMAND_MODULES: tuple[str, ...] = (
    "pyrovisor.api.commands",
    "pyrovisor.api.snapshot_commands",
    "pyrovisor.api.migration_commands",
    "pyrovisor.api.sandbox_commands",
    "pyrovisor.lab.cli",
    "pyrovisor.api.host_commands",
    "pyrovisor.api.attest_commands",
    "pyrovisor.api.top_commands",
    "pyrovisor.api.monitor_commands",
    "pyrovisor.api.forensics_commands",
)
TRACEBACK_VARIABLE = "PYROVISOR_TRACEBACK"  # set to 1 to see the traceback of an unexpected error


class _Registrar(Protocol):
    def __call__(self, subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None: ...


Handler = Callable[[argparse.Namespace], int]


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one `pyrovisor: error:` line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("pyrovisor").strip()
        where = f"{command}: " if command else ""
        self.exit(2, f"pyrovisor: error: {where}{message} (see '{self.prog} --help')\n")


# --- flag types: every command that takes one of these flags applies the same rule -------------------
def _invalid(text: str, reason: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"invalid value {text!r}: {reason}")


def positive_seconds(text: str) -> float:
    """A time limit: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise _invalid(text, "expected a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise _invalid(text, "must be a positive number of seconds")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _invalid(text, "expected a number") from None
    if not math.isfinite(value) or value <= 0:
        raise _invalid(text, "must be a positive number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _invalid(text, "expected a whole number") from None
    if value < 1:
        raise _invalid(text, "must be at least 1")
    return value


def memory_size(text: str) -> int:
    """Guest RAM such as 64M or 1G, checked against the VMM's and this host's limits; errors quote `text`."""
    from pyrovisor.arch.x86_64.layout import parse_size
    from pyrovisor.config import check_memory_size

    try:
        size = parse_size(text)
        check_memory_size(size, text)
    except ConfigError as exc:
        raise _invalid(text, exc.reason) from None
    return size


def vcpu_count(text: str) -> int:
    from pyrovisor.config import check_vcpu_count

    value = positive_int(text)
    try:
        check_vcpu_count(value)
    except ConfigError as exc:
        raise _invalid(text, exc.reason) from None
    return value


def dirty_ring_entries(text: str) -> int:
    from pyrovisor.config import check_dirty_ring_entries

    try:
        value = int(text)
        check_dirty_ring_entries(value)
    except ValueError:
        raise _invalid(text, "expected a whole number of entries") from None
    except ConfigError as exc:
        raise _invalid(text, exc.reason) from None
    return value


def positive_rate(text: str) -> float:
    """Bytes per second such as 50M, above zero."""
    from pyrovisor.arch.x86_64.layout import parse_size

    try:
        value = parse_size(text)
    except ConfigError as exc:
        raise _invalid(text, exc.reason) from None
    if value <= 0:
        raise _invalid(text, "must be more than 0 bytes per second")
    return float(value)


def socket_path(text: str) -> Path:
    """Where to serve the control API: the rule the server applies, checked before anything is built."""
    from pyrovisor.api.socket_path import check_socket_path

    path = Path(text)
    try:
        check_socket_path(path)
    except ConfigError as exc:
        raise _invalid(text, exc.reason) from None
    return path


# Option string -> type. build_parser() gives every sub-command's flag of that name this type, so
# `run`, `restore`, `receive`, `sandbox` and `ctl migrate` accept and refuse the same values.
FLAG_TYPES: dict[str, Callable[[str], object]] = {
    "--memory": memory_size,
    "--vcpus": vcpu_count,
    "--dirty-ring": dirty_ring_entries,
    "--timeout": positive_seconds,
    "--accept-timeout": positive_seconds,
    "--timeout-s": positive_seconds,
    "--downtime-ms": positive_number,
    "--max-rounds": positive_int,
    "--runs": positive_int,
    "--max-bandwidth": positive_rate,
    "--api": socket_path,
}


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def _apply_flag_types(parser: argparse.ArgumentParser) -> None:
    for each in _parsers(parser):
        for action in each._actions:
            for option in action.option_strings:
                if option in FLAG_TYPES:
                    action.type = FLAG_TYPES[option]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="pyrovisor",
        description="A virtual machine monitor in Python on Linux KVM.",
        epilog=f"Errors are one 'pyrovisor: error:' line; {TRACEBACK_VARIABLE}=1 adds the traceback of an "
               "unexpected one.",
    )
    parser.add_argument("--version", action="version", version=f"pyrovisor {__version__}")
    # Sub-parsers are CommandParsers too (argparse uses the parent's class); registrars see ArgumentParsers.
    subparsers = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
                      parser.add_subparsers(dest="command", metavar="COMMAND"))
    for name in COMMAND_MODULES:
        register: _Registrar = importlib.import_module(name).register
        register(subparsers)
    _apply_flag_types(parser)
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
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        _error("interrupted", prefix="pyrovisor:")
        return 130
    except OSError as exc:
        _error(_describe_os_error(exc))
        _traceback_if_asked()
        return 1
    except Exception as exc:
        _error(f"unexpected {type(exc).__name__}: {exc} (a pyrovisor bug; {TRACEBACK_VARIABLE}=1 shows where)")
        _traceback_if_asked()
        return 1


def _error(message: str, prefix: str = "pyrovisor: error:") -> None:
    from pyrovisor.api.terminal import host_message

    one_line = " ".join(part.strip() for part in message.splitlines())  # whatever the message holds
    host_message(f"{prefix} {one_line}")


def _describe_os_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        target = f" and {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{target}: {reason}"
    return reason


def _traceback_if_asked() -> None:
    if os.environ.get(TRACEBACK_VARIABLE):
        import traceback

        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
