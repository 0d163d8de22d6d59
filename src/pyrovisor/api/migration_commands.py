"""Sub-commands for live migration: receive an incoming VM, and `ctl SOCKET migrate`."""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pyrovisor.api.commands import drive
from pyrovisor.api.jail_options import add_jail_arguments
from pyrovisor.arch.x86_64.layout import parse_size
from pyrovisor.confine.options import add_seccomp_argument, configure_seccomp
from pyrovisor.errors import ConfigError, PyrovisorError
from pyrovisor.output import console as output_console


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    receive = subparsers.add_parser("receive", help="wait for a VM migrating in, then run it",
                                    description="Listen for one incoming live migration; once the guest runs "
                                                "here, behave like `pyrovisor run` (console, API, exit code).")
    receive.add_argument("--listen", required=True, metavar="HOST:PORT",
                         help="address to listen on (or unix:PATH); without --psk-file only a loopback address or "
                              "a Unix socket (created mode 0600)")
    receive.add_argument("--psk-file", type=Path, metavar="FILE",
                         help="pre-shared key (16 bytes or more, in a file only you can read): the source must prove "
                              "it holds the same key, and every frame and page is authenticated")
    receive.add_argument("--insecure", action="store_true",
                         help="allow a non-loopback --listen address without --psk-file: anyone who can reach it "
                              "may send a VM that runs here with this process's rights, and anyone on the path may "
                              "read or alter the guest's memory in transit")
    receive.add_argument("--api", type=Path, metavar="SOCKET",
                         help="serve the control API on this Unix socket (claimed before listening)")
    receive.add_argument("--accept-timeout", type=float, help="give up if no source connects within this many seconds")
    receive.add_argument("--timeout", type=float, help="stop the guest this many seconds after it arrives")
    add_jail_arguments(receive)
    add_seccomp_argument(receive)
    receive.set_defaults(handler=_receive)


def add_ctl_verbs(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = verbs.add_parser("migrate", help="live-migrate the VM to a `pyrovisor receive` elsewhere")
    migrate.add_argument("--to", required=True, metavar="HOST:PORT", help="the destination's --listen address")
    migrate.add_argument("--downtime-ms", type=float, default=300, help="largest acceptable pause (default 300)")
    migrate.add_argument("--auto-converge", action="store_true", help="throttle the guest if it dirties too fast")
    migrate.add_argument("--max-bandwidth", type=_rate, metavar="RATE",
                         help="cap the link, in bytes per second (e.g. 50M): to emulate a slower network")
    migrate.add_argument("--compress", choices=("lz4", "zstd"), help="compress page data")
    migrate.add_argument("--verify", action="store_true",
                         help="compare checksums of all guest memory at pause and at resume (longer pause)")
    migrate.add_argument("--max-rounds", type=int, default=30, help="pre-copy rounds before the limit policy")
    migrate.add_argument("--on-limit", choices=("switch-over", "cancel"), default="switch-over",
                         help="at --max-rounds or --timeout-s: stop and copy anyway, or cancel")
    migrate.add_argument("--timeout-s", type=float, default=600, help="time before the limit policy applies")
    migrate.add_argument("--psk-file", type=Path, metavar="FILE",
                         help="pre-shared key, the same as the destination's --psk-file: both ends authenticate "
                              "each other and every frame and page (read by the VMM, so give a path it can read)")
    migrate.add_argument("--json", action="store_true", help="print the statistics as JSON")
    migrate.set_defaults(handler=_ctl_migrate)


def _rate(text: str) -> float:
    try:
        return float(parse_size(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _receive(args: argparse.Namespace) -> int:
    """Everything the arrived VM needs here is claimed before listening (the API socket) or done before the
    source is told it may stop (attaching the API's routes): a failure then leaves the guest at the source."""
    from pyrovisor.api.jail_options import enter_jail, jail_owner
    from pyrovisor.api.server import ControlServer, Routes
    from pyrovisor.api.terminal import StdoutConsole, host_message
    from pyrovisor.api.vm_routes import VmRoutes
    from pyrovisor.migration.auth import load_psk
    from pyrovisor.migration.destination import listen_socket, receive
    from pyrovisor.vmm import Vmm

    psk = load_psk(args.psk_file) if args.psk_file is not None else None
    # A jailed VMM has no network of its own: the socket is made here, in the host's namespaces, and inherited.
    listener = listen_socket(args.listen, psk, args.insecure) if args.jail is not None else None
    try:
        if listener is not None and listener.family == socket.AF_UNIX:  # its owner may connect: the jail's user
            os.chown(listener.getsockname(), *jail_owner(args))
        jailed = enter_jail(args)
    except BaseException:
        if listener is not None:
            listener.close()
        raise
    if jailed is not None:  # the launcher, outside the jail: the jailed VMM's exit code
        assert listener is not None
        listener.close()
        return jailed
    configure_seccomp(args)
    console = StdoutConsole()
    routes = Routes()
    server = ControlServer(args.api, routes) if args.api is not None else None

    def attach_api(vmm: Vmm) -> None:
        if server is not None:
            VmRoutes(vmm, routes)
            routes.prepare()  # here, on the main thread: the API thread is confined already

    try:
        arrival = receive(args.listen, console, accept_timeout=args.accept_timeout, psk=psk, insecure=args.insecure,
                          on_listening=lambda: host_message(f"pyrovisor: listening on {args.listen}"),
                          on_started=attach_api, listener=listener)
    except BaseException:
        if server is not None:
            server.close()
        raise
    host_message(f"pyrovisor: VM arrived from {arrival.source} after {arrival.rounds} rounds "
                 f"({arrival.bytes_received / 2**20:.1f} MiB); downtime {arrival.downtime_s * 1e3:.1f} ms")
    with arrival.vmm as vmm:
        return drive(vmm, console, None, args.timeout, server=server)


def _ctl_migrate(args: argparse.Namespace) -> int:
    from pyrovisor.api.client import ApiClient
    from pyrovisor.migration.stats import MigrationResult, rounds_table, summary_lines
    from pyrovisor.persist.codec import decode

    client = ApiClient(args.socket)
    body = {"to": args.to, "downtime_ms": args.downtime_ms, "auto_converge": args.auto_converge,
            "max_bandwidth": args.max_bandwidth, "compress": args.compress, "verify": args.verify,
            "max_rounds": args.max_rounds, "on_limit": args.on_limit, "timeout_s": args.timeout_s, "wait": True}
    if args.psk_file is not None:  # the VMM opens it, perhaps from another directory
        body["psk_file"] = str(args.psk_file.resolve())
    outcome: dict[str, Any] = {}

    def start() -> None:
        try:
            outcome["status"] = client.post("/migrate", body)
        except Exception as exc:  # handed to the main thread, which raises it
            outcome["error"] = exc

    worker = threading.Thread(target=start, daemon=True)
    worker.start()
    progress_console = output_console(stderr=True)
    if not args.json and progress_console.is_terminal:  # a progress bar is for people, and not the output
        _show_progress(client, worker, progress_console)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    status = outcome["status"]
    completed = status.get("state") == "completed"
    if args.json:
        print(json.dumps(status, indent=2))
    elif completed:
        console = output_console()
        result = decode(MigrationResult, status["result"], "migration result")
        console.print(rounds_table(result))
        for line in summary_lines(result):
            console.print(line)
    if not completed:  # one `pyrovisor: error:` line on stderr (cli.main), exit code 1
        raise PyrovisorError(f"{status.get('error') or 'migration ' + str(status.get('state'))}; the VM keeps "
                             "running here")
    return 0


def _show_progress(client: Any, worker: threading.Thread, console: Any) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pyrovisor.errors import ControlError

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn())
    with Progress(*columns, transient=True, console=console) as bar:
        task = bar.add_task("connecting", total=1, detail="")
        round_start = (0, 0, 1)  # round, pages sent before it, its pages
        while worker.is_alive():
            try:
                status = client.get("/migration")
            except ControlError:
                break
            if status.get("round", 0) != round_start[0] or status.get("pages_left", 0) > round_start[2]:
                round_start = (status.get("round", 0), status.get("pages_sent", 0), max(1, status.get("pages_left", 1)))
            done = status.get("pages_sent", 0) - round_start[1]
            bar.update(task, description=f"{status.get('phase', '?')} round {status.get('round', 0)}",
                       total=round_start[2], completed=min(done, round_start[2]),
                       detail=f"{status.get('pages_left', 0)} pages left, "
                              f"{status.get('bandwidth_bytes_per_s', 0) / 1e6:.0f} MB/s")
            time.sleep(0.1)
