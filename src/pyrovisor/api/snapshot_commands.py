"""Sub-commands for saved and running VMs: restore a snapshot, control a running VMM."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from pyrovisor.api.cli import positive_seconds, socket_path
from pyrovisor.api.commands import drive
from pyrovisor.api.jail_options import add_jail_arguments
from pyrovisor.api.migration_commands import add_ctl_verbs
from pyrovisor.confine.options import add_seccomp_argument, configure_seccomp


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    restore = subparsers.add_parser("restore", help="restore a snapshot and run it",
                                    description="Restore a snapshot directory (a diff restores on top of its "
                                                "base) into this process and run it.")
    restore.add_argument("snapshot", type=Path, help="snapshot directory")
    restore.add_argument("--eager", action="store_true",
                         help="read all memory now instead of mapping the memory file copy-on-write")
    restore.add_argument("--verify", action="store_true", help="check the memory files' checksums before restoring")
    restore.add_argument("--api", type=socket_path, metavar="SOCKET", help="serve the control API on this Unix socket")
    restore.add_argument("--timeout", type=positive_seconds,
                         help="stop the guest after this many seconds (exit code 124)")
    add_jail_arguments(restore)
    add_seccomp_argument(restore)
    restore.set_defaults(handler=_restore)

    ctl = subparsers.add_parser("ctl", help="control a running VMM through its API socket")
    ctl.add_argument("socket", type=Path, help="the socket given to --api")
    verbs = ctl.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, text in (("status", "show the VM's state"), ("pause", "pause every vCPU"),
                       ("resume", "resume a paused VM"), ("stop", "stop the VM")):
        verbs.add_parser(verb, help=text).set_defaults(handler=_ctl)
    snapshot = verbs.add_parser("snapshot", help="snapshot the VM into a new directory")
    snapshot.add_argument("path", type=Path, help="directory to create")
    snapshot.add_argument("--diff", action="store_true", help="only the pages written since the last snapshot")
    snapshot.set_defaults(handler=_ctl)
    balloon = verbs.add_parser("balloon", help="show the balloon, or set its target")
    balloon.add_argument("--target-mib", type=_target_mib, metavar="MIB",
                         help="memory the guest should give back to the host, 0 to its RAM size")
    balloon.add_argument("--json", action="store_true", help="print the balloon's document as JSON")
    balloon.set_defaults(handler=_ctl_balloon)
    add_ctl_verbs(verbs)


def _restore(args: argparse.Namespace) -> int:
    from pyrovisor.api.jail_options import enter_jail
    from pyrovisor.api.terminal import StdoutConsole
    from pyrovisor.builder import restore_vm
    from pyrovisor.confine.jail import Bind

    jailed = enter_jail(args, [Bind(args.snapshot)] if args.jail is not None else [])
    if jailed is not None:  # the launcher, outside the jail: the jailed VMM's exit code
        return jailed
    configure_seccomp(args)
    console = StdoutConsole()
    with restore_vm(args.snapshot, console, lazy=not args.eager, verify=args.verify) as vmm:
        return drive(vmm, console, args.api, args.timeout)


def _ctl(args: argparse.Namespace) -> int:
    from pyrovisor.api.client import ApiClient

    client = ApiClient(args.socket)
    response: dict[str, Any]
    if args.verb == "status":
        response = client.get("/status")
    elif args.verb == "snapshot":
        response = client.post("/snapshot", {"path": str(args.path.resolve()), "kind": "diff" if args.diff else "full"})
    else:
        response = client.post(f"/{args.verb}")
    print(json.dumps(response, indent=2))
    return 0


def _target_mib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"invalid --target-mib {text!r}: expected a number of MiB, 0 or more")
    return value


def _ctl_balloon(args: argparse.Namespace) -> int:
    from pyrovisor.api.balloon_routes import describe_balloon
    from pyrovisor.api.client import ApiClient

    client = ApiClient(args.socket)
    if args.target_mib is None:
        document = client.get("/balloon")
    else:
        document = client.post("/balloon", {"target_mib": args.target_mib})
    print(json.dumps(document, indent=2) if args.json else describe_balloon(document))
    return 0
