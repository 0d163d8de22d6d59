"""`pyrovisor monitor SOCKET add|list|remove|records`: write watches on a running VM's guest pages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: expected a number such as 0x10f000") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: must not be negative")
    return value


def _size(text: str) -> int:
    value = _address(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    monitor = subparsers.add_parser(
        "monitor", help="watch writes to guest pages of a running VM (docs/introspection.md)",
        description="Trap every guest write to watched pages (read-only memslots), log it with the vCPU, process, "
                    "RIP and instruction, then perform it: the guest does not notice.")
    monitor.add_argument("socket", type=Path, help="the VMM's API socket (pyrovisor run --api SOCKET)")
    verbs = monitor.add_subparsers(dest="monitor_verb", metavar="VERB", required=True)
    add = verbs.add_parser("add", help="watch a guest-physical range, a process's virtual range or a kernel symbol")
    target = add.add_mutually_exclusive_group(required=True)
    target.add_argument("--gpa", type=_address, metavar="ADDRESS", help="a guest-physical address")
    target.add_argument("--gva", type=_address, metavar="ADDRESS", help="a virtual address in process --pid")
    target.add_argument("--symbol", metavar="NAME", help="a symbol of the guest kernel's profile (syscall_table, "
                                                         "or kernel-text)")
    add.add_argument("--pid", type=int, help="the process whose page tables translate --gva")
    add.add_argument("--size", type=_size, metavar="BYTES", help="bytes watched from the address (default 8)")
    add.add_argument("--log", type=Path, metavar="FILE", help="append a JSON line per write to this file (a path "
                                                              "the VMM opens)")
    add.add_argument("--mode", default="memslot", metavar="MODE",
                     help="memslot (default: a record with process, RIP, instruction, old and new value) or uffd "
                          "(userfaultfd write protection: address, page and vCPU only)")
    listing = verbs.add_parser("list", help="the watches and how many writes each caught")
    remove = verbs.add_parser("remove", help="stop watching (the pages become writable again)")
    remove.add_argument("watch_id", type=int, metavar="ID")
    records = verbs.add_parser("records", help="the last writes caught (up to 1000)")
    for each in (add, listing, remove, records):
        each.add_argument("--json", action="store_true", help="print the API's JSON answer")
        each.set_defaults(handler=_monitor)


def _monitor(args: argparse.Namespace) -> int:
    from pyrovisor.api.client import ApiClient
    from pyrovisor.errors import ConfigError

    client = ApiClient(args.socket)
    verb = args.monitor_verb
    if verb == "add":
        body: dict[str, Any] = {}
        if args.symbol is not None:
            if args.size is not None or args.pid is not None:
                raise ConfigError("--symbol", args.symbol, "takes neither --size nor --pid (the symbol has its size)")
            body["symbol"] = args.symbol
        elif args.gpa is not None:
            if args.pid is not None:
                raise ConfigError("--pid", args.pid, "goes with --gva, not --gpa")
            body["gpa"] = args.gpa
        else:
            if args.pid is None:
                raise ConfigError("--gva", hex(args.gva), "needs --pid (the process whose page tables translate it)")
            body.update(gva=args.gva, pid=args.pid)
        if args.size is not None:
            body["size"] = args.size
        if args.log is not None:
            body["log"] = str(args.log.absolute())
        if args.mode != "memslot":
            body["mode"] = args.mode  # checked by the VMM: one line for an unknown mode
        document = client.post("/monitor/add", body)
        print(json.dumps(document, indent=2) if args.json else f"watch {document['id']}: {_watch_line(document)}")
    elif verb == "list":
        document = client.get("/monitor")
        if args.json:
            print(json.dumps(document, indent=2))
        else:
            for watch in document["watches"]:
                print(f"{watch['id']:>3}  {_watch_line(watch)}  {watch['writes']} write(s)")
            if not document["watches"]:
                print("no watches")
    elif verb == "remove":
        document = client.post("/monitor/remove", {"id": args.watch_id})
        print(json.dumps(document, indent=2) if args.json else
              f"watch {document['id']} removed after {document['writes']} write(s)")
    else:
        document = client.get("/monitor/records")
        if args.json:
            print(json.dumps(document, indent=2))
        else:
            for record in document["records"]:
                if record.get("mode") == "uffd":
                    print(f"{record['time']:.6f} vcpu {record['vcpu']} uffd: a write in page {record['page']} "
                          f"at {record['address']} (watch {record['watch']})")
                    continue
                print(f"{record['time']:.6f} vcpu {record['vcpu']} pid {record['pid']} ({record['process']}) "
                      f"rip {record['rip']} {record['instruction']}: {record['size']} byte(s) at {record['address']} "
                      f"{record['old']} -> {record['new']}")
    return 0


def _watch_line(watch: dict[str, Any]) -> str:
    ranges = ", ".join(f"{each['gpa']}+{each['size']:#x}" for each in watch["ranges"])
    log = f", log {watch['log']}" if watch.get("log") else ""
    mode = " [uffd]" if watch.get("mode") == "uffd" else ""
    return f"{watch['kind']} {watch['target']}{mode}: {ranges} ({watch['pages']} page(s)){log}"
