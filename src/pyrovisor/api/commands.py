"""Core sub-commands: run a guest, list the built-in guests, describe the host's KVM."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pyrovisor.api.cli import dirty_ring_entries, memory_size, positive_seconds, socket_path, vcpu_count
from pyrovisor.api.device_options import add_device_arguments
from pyrovisor.api.jail_options import add_jail_arguments
from pyrovisor.confine.options import add_seccomp_argument, configure_seccomp

if TYPE_CHECKING:
    from pyrovisor.api.server import ControlServer
    from pyrovisor.api.terminal import StdoutConsole
    from pyrovisor.arch.x86_64.cpuid import CpuidEntry
    from pyrovisor.config import ModuleConfig
    from pyrovisor.vmm import Vmm

DEFAULT_GUEST = "hello"
TIMEOUT_EXIT_CODE = 124
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # stop the guest cleanly and exit with 128 + the signal


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = subparsers.add_parser("run", help="run a built-in guest or an ELF file",
                                description="Run a guest with its console on stdout and the keyboard on its UART "
                                            "(Ctrl-A x quits when stdin is a terminal). Exits with the guest's exit "
                                            "code; SIGTERM or SIGHUP stops the guest and exits with 128 + the signal.")
    run.add_argument("guest", nargs="?", default=DEFAULT_GUEST, help="built-in guest name or path to an ELF file "
                     f"(default: {DEFAULT_GUEST})")
    run.add_argument("--memory", "-m", type=memory_size,
                     help="guest RAM, e.g. 64M or 1G: 2M to 64G in steps of 2M (default: the guest's manifest, else 64M)")
    run.add_argument("--vcpus", type=vcpu_count, help="number of vCPUs, 1 to 32 and at most what the guest supports "
                     "(default: the guest's manifest, else 1)")
    run.add_argument("--args", "--append", dest="cmdline", help="kernel command line passed to the guest")
    run.add_argument("--initrd", type=Path, help="file placed in guest memory after the kernel (a Multiboot "
                     "kernel's first module)")
    run.add_argument("--module", type=_module, action="append", default=[], metavar="FILE[,ARGS]",
                     help="a Multiboot module with its arguments (repeat for more, after --initrd)")
    run.add_argument("--verbose", "-v", action="store_true", help="say which kind of kernel the file is")
    run.add_argument("--timeout", type=positive_seconds,
                     help="stop the guest after this many seconds (exit code 124)")
    run.add_argument("--api", type=socket_path, metavar="SOCKET", help="serve the control API on this Unix socket")
    run.add_argument("--dirty-ring", type=dirty_ring_entries, default=0, metavar="ENTRIES",
                     help="track dirty pages with per-vCPU rings of this many entries (a power of two, at least 256) "
                          "instead of the bitmap")
    run.add_argument("--accounting", action="store_true", help="charge every exit to the guest process that caused "
                     "it (the os guest; see `pyrovisor top`, docs/introspection.md section 2)")
    run.add_argument("--stealth", action="store_true", help="hide the hypervisor where KVM allows: CPUID without the "
                     "hypervisor bit and leaves, the host's brand string, no firmware string naming pyrovisor, vCPUs "
                     "pinned to host CPUs (docs/introspection.md section 3)")
    add_device_arguments(run)
    add_jail_arguments(run)
    add_seccomp_argument(run)
    run.set_defaults(handler=_run)

    guests = subparsers.add_parser("guests", help="list the built-in guests")
    guests.set_defaults(handler=_guests)

    info = subparsers.add_parser("info", help="show what this host's KVM offers")
    info.add_argument("--cpuid", action="store_true", help="also list every supported CPUID leaf")
    info.set_defaults(handler=_info)


def _module(text: str) -> ModuleConfig:
    """--module FILE[,ARGS]: the file, and the arguments its Multiboot string carries after the file name."""
    from pyrovisor.config import ModuleConfig

    path, _, module_args = text.partition(",")
    if not path or "\0" in text:
        raise argparse.ArgumentTypeError(f"invalid --module {text!r}: expected FILE[,ARGS]")
    return ModuleConfig(Path(path), module_args)


def _run(args: argparse.Namespace) -> int:
    from pyrovisor.api.jail_options import enter_jail
    from pyrovisor.api.terminal import StdoutConsole, host_message
    from pyrovisor.builder import build_vm
    from pyrovisor.catalog import check_vcpu_limit, resolve_guest
    from pyrovisor.config import DEFAULT_MEMORY, MachineConfig
    from pyrovisor.loader.multiboot import detect_protocol

    elf, spec = resolve_guest(args.guest)
    protocol, description = detect_protocol(elf)
    if args.verbose:
        host_message(f"pyrovisor: {elf}: {description}")
    vcpus = args.vcpus if args.vcpus is not None else (spec.vcpus if spec else 1)
    check_vcpu_limit(elf, vcpus)
    config = MachineConfig(
        kernel=elf,
        memory_size=args.memory if args.memory is not None else (spec.memory_size if spec else DEFAULT_MEMORY),
        vcpus=vcpus,
        cmdline=args.cmdline if args.cmdline is not None else (spec.args if spec else ""),
        initrd=args.initrd if args.initrd is not None else (spec.initrd if spec else None),
        dirty_ring_entries=args.dirty_ring,
        disks=tuple(args.disk), nets=tuple(args.net), rng=args.rng, vsock=args.vsock, balloon=args.balloon,
        tpm=args.tpm, boot_protocol=protocol, modules=tuple(args.module), stealth=args.stealth,
    )
    jailed = enter_jail(args, machine=config)
    if jailed is not None:  # the launcher, outside the jail: the jailed VMM's exit code
        return jailed
    configure_seccomp(args)
    console = StdoutConsole()
    with build_vm(config, console) as vmm:
        if config.stealth:
            host_message(f"pyrovisor: stealth: {stealth_report(vmm)}")
        if args.accounting:
            from pyrovisor.introspect.accounting import set_accounting
            set_accounting(vmm, True)
        return drive(vmm, console, args.api, args.timeout)


def stealth_report(vmm: Vmm) -> str:
    """What --stealth did for this VM, and whether this KVM can hide time spent in exits (it cannot everywhere)."""
    from pyrovisor.arch.x86_64.stealth import probe_tsc_compensation
    from pyrovisor.kvm import Cap

    tsc = probe_tsc_compensation(vmm.vcpus[0].fd.fd, bool(vmm.kvm.check_extension(Cap.TSC_CONTROL)))
    pinned = ", ".join(f"vCPU {vcpu.index} on CPU {min(vcpu.host_cpus)}" for vcpu in vmm.vcpus if vcpu.host_cpus)
    return (f"CPUID without hypervisor bit and leaves, host brand string; neutral firmware strings; {pinned}; "
            f"TSC compensation {'available' if tsc.available else 'unavailable'} ({tsc.reason})")


def drive(vmm: Vmm, console: StdoutConsole, api_socket: Path | None, timeout: float | None,
          server: ControlServer | None = None) -> int:
    """Run a VM with the keyboard on its UART and, optionally, the control API; return the exit code.

    SIGTERM and SIGHUP stop the guest like Ctrl-A x; the terminal mode is restored, the API socket removed,
    and the exit code is 128 + the signal number."""
    from pyrovisor.api.server import ControlServer
    from pyrovisor.api.terminal import TerminalInput, host_message
    from pyrovisor.api.vm_routes import VmRoutes
    from pyrovisor.confine.policy import enter_command_thread
    from pyrovisor.confine.policy import settle as settle_seccomp
    from pyrovisor.vstate.run_control import RunOutcome, StopReason

    def stop() -> None:
        vmm.request_stop(RunOutcome(StopReason.HOST_STOP))

    if server is None and api_socket is not None:  # a `server` given is already serving this VM's routes
        server = ControlServer(api_socket, VmRoutes(vmm).routes)
    if server is not None:
        server.on_denied = vmm.stop_for_violation
        for violation in server.denied:  # refused before this VM was attached (receive serves early)
            vmm.stop_for_violation(violation)
    console.on_closed = stop
    try:
        with _stop_on_signals(stop) as received, TerminalInput(vmm.console.feed, stop, vmm.stop_for_violation):
            if not vmm.started:
                vmm.start()
            # Every thread this command needs runs now (threads started later come from the unconfined reports
            # thread): the main thread, which only waits and then releases the VM, takes a filter of its own.
            enter_command_thread("vmm", vmm.stop_for_violation)
            outcome = vmm.run(timeout=timeout)
    finally:
        if server is not None:
            server.close()
    settle_seccomp()  # a refused call reported while the VM stopped: it is the outcome, not what it caused
    outcome = vmm.outcome or outcome
    if received:
        name = signal.Signals(received[0]).name
        host_message(f"pyrovisor: {name} received: the guest was stopped")
        return 128 + received[0]
    if outcome.reason is StopReason.GUEST_EXIT:
        assert outcome.exit_code is not None
        return outcome.exit_code
    if outcome.reason is StopReason.MIGRATED:
        host_message("pyrovisor: the guest migrated away; this copy has stopped")
        return 0
    if outcome.reason is StopReason.TIMEOUT:
        host_message(f"pyrovisor: guest still running after {timeout:g} s: stopped")
        return TIMEOUT_EXIT_CODE
    if outcome.error is not None:
        raise outcome.error
    host_message(f"pyrovisor: {outcome.describe()}")
    return 0 if outcome.reason is StopReason.HOST_STOP else 1


@contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[list[int]]:
    """While active, SIGTERM and SIGHUP call `stop` (from a helper thread: a signal handler runs on the main
    thread between bytecodes, possibly while it holds the lock `stop` needs) and are recorded in the list."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread may install handlers; the process default applies
        return

    def handler(number: int, frame: FrameType | None) -> None:
        if not received:
            received.append(number)
        threading.Thread(target=stop, name="signal-stop", daemon=True).start()

    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        yield received
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def _guests(args: argparse.Namespace) -> int:
    from rich.table import Table

    from pyrovisor.catalog import load_catalog
    from pyrovisor.output import console as output_console

    table = Table(title="built-in guests")
    for column in ("name", "description", "memory", "vCPUs", "args"):
        table.add_column(column)
    for spec in load_catalog().values():
        table.add_row(spec.name, spec.description, f"{spec.memory_size >> 20} MiB", str(spec.vcpus), spec.args)
    output_console().print(table)
    return 0


def _info(args: argparse.Namespace) -> int:
    from rich.table import Table

    from pyrovisor.kvm import Kvm, loaded_kvm_modules
    from pyrovisor.kvm.caps import CAPABILITY_USES
    from pyrovisor.output import console as output_console

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
