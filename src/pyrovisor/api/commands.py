"""Core sub-commands: run a guest, list the built-in guests, describe the host's KVM."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from pyrovisor.arch.x86_64.cpuid import CpuidEntry
from pyrovisor.arch.x86_64.layout import parse_size
from pyrovisor.errors import ConfigError
from pyrovisor.output import console as output_console

if TYPE_CHECKING:
    from pyrovisor.api.terminal import StdoutConsole
    from pyrovisor.vmm import Vmm

DEFAULT_GUEST = "hello"
TIMEOUT_EXIT_CODE = 124


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser("run", help="run a built-in guest or an ELF file",
                                description="Run a guest with its console on stdout and the keyboard on its UART "
                                            "(Ctrl-A x quits when stdin is a terminal). Exits with the guest's exit code.")
    run.add_argument("guest", nargs="?", default=DEFAULT_GUEST, help="built-in guest name or path to an ELF file "
                     f"(default: {DEFAULT_GUEST})")
    run.add_argument("--memory", "-m", type=size_argument, help="guest RAM, e.g. 64M or 1G (default: the guest's manifest, else 64M)")
    run.add_argument("--vcpus", type=positive_int_argument, help="number of vCPUs (default: the guest's manifest, else 1)")
    run.add_argument("--args", dest="cmdline", help="kernel command line passed to the guest")
    run.add_argument("--initrd", type=Path, help="file placed in guest memory after the kernel")
    run.add_argument("--timeout", type=float, help="stop the guest after this many seconds (exit code 124)")
    run.add_argument("--api", type=Path, metavar="SOCKET", help="serve the control API on this Unix socket")
    run.add_argument("--dirty-ring", type=int, default=0, metavar="ENTRIES",
                     help="track dirty pages with per-vCPU rings of this many entries instead of the bitmap")
    run.set_defaults(handler=_run)

    guests = subparsers.add_parser("guests", help="list the built-in guests")
    guests.set_defaults(handler=_guests)

    info = subparsers.add_parser("info", help="show what this host's KVM offers")
    info.add_argument("--cpuid", action="store_true", help="also list every supported CPUID leaf")
    info.set_defaults(handler=_info)


def size_argument(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int_argument(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _run(args: argparse.Namespace) -> int:
    from pyrovisor.api.terminal import StdoutConsole
    from pyrovisor.builder import build_vm
    from pyrovisor.catalog import resolve_guest
    from pyrovisor.config import DEFAULT_MEMORY, MachineConfig

    elf, spec = resolve_guest(args.guest)
    config = MachineConfig(
        kernel=elf,
        memory_size=args.memory or (spec.memory_size if spec else DEFAULT_MEMORY),
        vcpus=args.vcpus or (spec.vcpus if spec else 1),
        cmdline=args.cmdline if args.cmdline is not None else (spec.args if spec else ""),
        initrd=args.initrd or (spec.initrd if spec else None),
        dirty_ring_entries=args.dirty_ring,
    )
    console = StdoutConsole()
    with build_vm(config, console) as vmm:
        return drive(vmm, console, args.api, args.timeout)


def drive(vmm: Vmm, console: StdoutConsole, api_socket: Path | None, timeout: float | None) -> int:
    """Run a VM with the keyboard on its UART and, optionally, the control API; return the exit code."""
    from pyrovisor.api.server import ControlServer
    from pyrovisor.api.terminal import TerminalInput
    from pyrovisor.api.vm_routes import VmRoutes
    from pyrovisor.vstate.run_control import RunOutcome, StopReason

    server = ControlServer(api_socket, VmRoutes(vmm).routes) if api_socket is not None else None
    quit_outcome = RunOutcome(StopReason.HOST_STOP)
    console.on_closed = lambda: vmm.control.finish(quit_outcome)
    try:
        with TerminalInput(vmm.console.feed, lambda: vmm.control.finish(quit_outcome)):
            outcome = vmm.run(timeout=timeout)
    finally:
        if server is not None:
            server.close()
    if outcome.reason is StopReason.GUEST_EXIT:
        assert outcome.exit_code is not None
        return outcome.exit_code
    if outcome.reason is StopReason.MIGRATED:
        output_console(stderr=True).print("pyrovisor: the guest migrated away; this copy has stopped")
        return 0
    if outcome.reason is StopReason.TIMEOUT:
        output_console(stderr=True).print(f"pyrovisor: guest still running after {timeout} s: stopped")
        return TIMEOUT_EXIT_CODE
    if outcome.error is not None:
        raise outcome.error
    output_console(stderr=True).print(f"pyrovisor: {outcome.describe()}")
    return 0 if outcome.reason is StopReason.HOST_STOP else 1


def _guests(args: argparse.Namespace) -> int:
    from pyrovisor.catalog import load_catalog

    table = Table(title="built-in guests")
    for column in ("name", "description", "memory", "vCPUs", "args"):
        table.add_column(column)
    for spec in load_catalog().values():
        table.add_row(spec.name, spec.description, f"{spec.memory_size >> 20} MiB", str(spec.vcpus), spec.args)
    output_console().print(table)
    return 0


def _info(args: argparse.Namespace) -> int:
    from pyrovisor.kvm import Kvm, loaded_kvm_modules
    from pyrovisor.kvm.caps import CAPABILITY_USES

    console = output_console()
    with Kvm() as kvm:
        facts = Table(title="KVM on this host", show_header=False)
        facts.add_column("fact")
        facts.add_column("value")
        facts.add_row("device", kvm.path)
        facts.add_row("API version", str(kvm.get_api_version()))
        facts.add_row("KVM modules", ", ".join(loaded_kvm_modules()) or "unknown")
        facts.add_row("vCPU mmap size", f"{kvm.vcpu_mmap_size} bytes")
        msrs = kvm.get_msr_index_list()
        facts.add_row("MSRs saved/restored", str(len(msrs)))
        cpuid = kvm.get_supported_cpuid()
        basic = max((e.function for e in cpuid if e.function < 0x40000000), default=0)
        extended = max((e.function for e in cpuid if e.function >= 0x80000000), default=0)
        facts.add_row("CPUID leaves", f"{len(cpuid)} (basic up to {basic:#x}, extended up to {extended:#x})")
        facts.add_row("CPU vendor", _vendor(cpuid))
        console.print(facts)

        caps = Table(title="capabilities pyrovisor uses")
        for column in ("capability", "value", "used for"):
            caps.add_column(column)
        for cap, use in CAPABILITY_USES.items():
            value = kvm.check_extension(cap)
            caps.add_row(f"KVM_CAP_{cap.name}", str(value) if value else "[red]absent[/red]", use)
        console.print(caps)

        if args.cpuid:
            leaves = Table(title="supported CPUID leaves")
            for column in ("function", "index", "eax", "ebx", "ecx", "edx"):
                leaves.add_column(column)
            for entry in cpuid:
                leaves.add_row(*(f"{value:#010x}" for value in
                                 (entry.function, entry.index, entry.eax, entry.ebx, entry.ecx, entry.edx)))
            console.print(leaves)
    return 0


def _vendor(cpuid: tuple[CpuidEntry, ...]) -> str:
    for entry in cpuid:
        if entry.function == 0:
            raw = b"".join(value.to_bytes(4, "little") for value in (entry.ebx, entry.edx, entry.ecx))
            return raw.decode("ascii", "replace")
    return "unknown"
