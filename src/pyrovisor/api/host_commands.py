"""`pyrovisor host` (many VMs under one memory budget) and `pyrovisor host-ctl SOCKET` (its control verbs, also
`pyrovisor ctl SOCKET host ...`)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from pyrovisor.api.cli import positive_seconds, socket_path
from pyrovisor.confine.options import add_seccomp_argument, configure_seccomp

MiB = 1 << 20
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    host = subparsers.add_parser(
        "host", help="run many VMs in one process under a memory budget (docs/overcommit.md)",
        description="Run the VMs of a host.toml under one memory budget: admission by minima, virtio-balloon targets "
                    "from a share-based policy with the idle memory tax over host-measured working sets, an HTTP API "
                    "on a Unix socket (/vms, /status, /metrics). SIGTERM, SIGHUP or Ctrl-C stops every VM.")
    host.add_argument("--config", type=Path, required=True, metavar="HOST.TOML", help="[host], [sampling], [[vm]]")
    host.add_argument("--api", type=socket_path, metavar="SOCKET", help="serve the host's API on this Unix socket")
    host.add_argument("--watch", action="store_true", help="show the live table instead of event lines")
    add_seccomp_argument(host)
    host.set_defaults(handler=_host)

    ctl = subparsers.add_parser("host-ctl", help="control a running `pyrovisor host` through its API socket")
    ctl.add_argument("socket", type=Path, help="the socket given to `pyrovisor host --api`")
    add_host_verbs(ctl)
    existing = subparsers.choices.get("ctl")
    if existing is not None:  # `pyrovisor ctl SOCKET host VERB` too
        for action in existing._actions:
            if isinstance(action, argparse._SubParsersAction):
                add_host_verbs(action.add_parser("host", help="control a `pyrovisor host` (list, create, stop, "
                                                              "target, watch, metrics)"))


def add_host_verbs(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="host_verb", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="the VMs and the host's budget")
    status = verbs.add_parser("status", help="the host: budget, overhead, RSS, policy settings")
    create = verbs.add_parser("create", help="admit and start a VM (a JSON spec or flags)")
    create.add_argument("--spec", type=Path, metavar="FILE.json", help="a JSON object as a [[vm]] table takes it")
    create.add_argument("--id", dest="vm_id")
    create.add_argument("--guest", help="a built-in guest name or an ELF file")
    create.add_argument("--memory", dest="vm_memory", metavar="SIZE", help="e.g. 64M or 1G")
    create.add_argument("--vcpus", dest="vm_vcpus", type=int)
    create.add_argument("--args", dest="vm_args", metavar="CMDLINE")
    create.add_argument("--shares", type=float)
    create.add_argument("--min", dest="vm_min", metavar="SIZE", help="the VM's floor (default: the host's)")
    stop = verbs.add_parser("stop", help="stop a VM (the others keep running)")
    stop.add_argument("vm_id", metavar="ID")
    target = verbs.add_parser("target", help="pin how much memory a VM holds (MiB), or 'auto' for the policy")
    target.add_argument("vm_id", metavar="ID")
    target.add_argument("memory_mib", metavar="MIB|auto")
    metrics = verbs.add_parser("metrics", help="the Prometheus text of /metrics")
    watch = verbs.add_parser("watch", help="the live table, refreshed every second (Ctrl-C ends)")
    watch.add_argument("--interval", type=positive_seconds, default=1.0, metavar="SECONDS")
    for each in (listing, status, create, stop, target):
        each.add_argument("--json", action="store_true", help="print the API's JSON answer")
    for each in (listing, status, create, stop, target, metrics, watch):
        each.set_defaults(handler=_host_ctl)


# --- pyrovisor host -----------------------------------------------------------------------------------------------------
def _host(args: argparse.Namespace) -> int:
    from pyrovisor.api.terminal import host_message
    from pyrovisor.host.config import load_host_config

    config = load_host_config(args.config)
    configure_seccomp(args)
    if args.watch:
        events: list[str] = []
        on_event = events.append
    else:
        def on_event(message: str) -> None:
            host_message(f"pyrovisor host: {message}")

    from pyrovisor.host.host import Host
    from pyrovisor.host.startup import admit_all

    stop = threading.Event()
    received: list[int] = []

    def handler(number: int, frame: FrameType | None) -> None:
        received.append(number)
        stop.set()

    previous = {number: signal.signal(number, handler) for number in STOP_SIGNALS}
    try:
        with Host(config.settings, on_event) as host:
            admit_all(host, config.vms)
            server = None
            if args.api is not None:
                from pyrovisor.host.api import serve

                server = serve(host, args.api)
            try:
                if args.watch:
                    from pyrovisor.host.api import HostRoutes
                    from pyrovisor.host.watch import watch

                    routes = HostRoutes(host)
                    watch(lambda: routes.list({}), until=stop.is_set)
                else:
                    on_event(f"{len(config.vms)} VM(s) running, budget {config.settings.budget >> 20} MiB"
                             + (f", API on {args.api}" if args.api else ""))
                    stop.wait()
            finally:
                if server is not None:
                    server.close()
    finally:
        for number, action in previous.items():
            signal.signal(number, action)
    if received:
        name = signal.Signals(received[0]).name
        host_message(f"pyrovisor host: {name} received: every VM was stopped")
        return 0 if received[0] == signal.SIGINT else 128 + received[0]
    return 0


# --- pyrovisor host-ctl SOCKET VERB -----------------------------------------------------------------------------------
def _host_ctl(args: argparse.Namespace) -> int:
    from pyrovisor.api.client import ApiClient
    from pyrovisor.errors import ConfigError

    client = ApiClient(args.socket)
    verb = args.host_verb
    if verb == "metrics":
        from pyrovisor.errors import ControlError
        from pyrovisor.host.api import raw_get

        status, _, text = raw_get(args.socket, "/metrics")
        if status != 200:
            raise ControlError("GET /metrics", text.strip()[:200], status)
        sys.stdout.write(text)
        return 0
    if verb == "watch":
        from pyrovisor.host.watch import watch

        watch(lambda: client.get("/vms"), args.interval)
        return 0
    document: dict[str, Any]
    if verb == "list":
        document = client.get("/vms")
    elif verb == "status":
        document = client.get("/status")
    elif verb == "create":
        document = client.post("/vms", _create_body(args))
    elif verb == "stop":
        document = client.post(f"/vms/{args.vm_id}/stop")
    else:
        text = args.memory_mib.strip().lower()
        value: float | None
        if text == "auto":
            value = None
        else:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError("memory target", args.memory_mib, "a number of MiB, or 'auto'") from None
        document = client.request("PUT", f"/vms/{args.vm_id}/target", {"memory_mib": value})
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        _describe(verb, document)
    return 0


def _create_body(args: argparse.Namespace) -> dict[str, Any]:
    from pyrovisor.errors import ConfigError

    body: dict[str, Any] = {}
    if args.spec is not None:
        try:
            loaded = json.loads(args.spec.read_text())
        except OSError as exc:
            raise ConfigError("--spec", str(args.spec), exc.strerror or "cannot be read") from None
        except json.JSONDecodeError as exc:
            raise ConfigError("--spec", str(args.spec), f"not valid JSON: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError("--spec", str(args.spec), "must hold a JSON object")
        body.update(loaded)
    for key, value in (("id", args.vm_id), ("guest", args.guest), ("memory", args.vm_memory),
                       ("vcpus", args.vm_vcpus), ("args", args.vm_args), ("shares", args.shares),
                       ("min", args.vm_min)):
        if value is not None:
            body[key] = value
    if isinstance(args.vm_memory, int):  # --memory has the shared size type (api/cli.py FLAG_TYPES): bytes
        body["memory"] = str(args.vm_memory)
    if "guest" not in body:
        raise ConfigError("create", "", "give --guest (or a --spec with a guest)")
    return body


def _describe(verb: str, document: dict[str, Any]) -> None:
    if verb == "list":
        from pyrovisor.host.watch import table
        from pyrovisor.output import console

        console().print(table(document))
    elif verb == "stop":
        print(f"{document['id']}: {document['state']}")
    elif verb == "status":
        host = document
        print(f"budget {host['budget'] / MiB:.0f} MiB, overhead {host['overhead'] / MiB:.0f} MiB, for guests "
              f"{host['available'] / MiB:.0f} MiB, committed {host['committed'] / MiB:.0f} MiB, allocated "
              f"{host['allocated'] / MiB:.0f} MiB; RSS {host['rss'] / MiB:.0f} MiB (+{host['helpers_rss'] / MiB:.0f} "
              f"MiB helpers); {host['running']} running; policy {host['policy']}"
              + ("; under pressure" if host["pressure"] else ""))
    else:
        vm = document
        print(f"{vm['vm_id']}: {vm['state']}, {vm['configured'] / MiB:.0f} MiB, may hold {vm['allocation'] / MiB:.0f} "
              f"MiB" + (" (pinned)" if vm["pinned"] else "") + f", balloon {vm['balloon_actual'] / MiB:.0f}/"
              f"{vm['balloon_target'] / MiB:.0f} MiB, console log {vm['log']}")
