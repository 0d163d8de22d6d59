"""Command-line forms of the virtio devices: --disk FILE[,ro][,serial=S], --net tap=NAME[,mac=M],
--vsock cid=N,uds=PATH; each parsed into its configuration or refused with one clear line."""

from __future__ import annotations

import argparse
from pathlib import Path

from pyrovisor.config import BalloonConfig, DiskConfig, NetConfig, TpmConfig, VsockConfig, check_balloon
from pyrovisor.errors import ConfigError


def _options(text: str, flag: str, allowed: set[str], flags: set[str]) -> tuple[list[str], dict[str, str]]:
    """Split "a,b=c,d": bare words first (positional), then key=value pairs, each key once."""
    bare: list[str] = []
    pairs: dict[str, str] = {}
    for part in text.split(","):
        if not part:
            raise argparse.ArgumentTypeError(f"invalid {flag} {text!r}: empty item")
        key, equals, value = part.partition("=")
        if not equals:
            if key in flags:
                pairs[key] = "1"
            else:
                bare.append(part)
            continue
        if key not in allowed:
            raise argparse.ArgumentTypeError(f"invalid {flag} {text!r}: unknown option {key!r} "
                                             f"(known: {', '.join(sorted(allowed | flags))})")
        if key in pairs:
            raise argparse.ArgumentTypeError(f"invalid {flag} {text!r}: {key} given twice")
        pairs[key] = value
    return bare, pairs


def disk(text: str) -> DiskConfig:
    bare, pairs = _options(text, "--disk", {"serial", "path"}, {"ro"})
    paths = bare + ([pairs["path"]] if "path" in pairs else [])
    if len(paths) != 1:
        raise argparse.ArgumentTypeError(f"invalid --disk {text!r}: expected FILE[,ro][,serial=S]")
    serial = pairs.get("serial", "")
    if len(serial.encode()) > 20:
        raise argparse.ArgumentTypeError(f"invalid --disk {text!r}: serial is at most 20 bytes")
    return DiskConfig(path=Path(paths[0]), read_only="ro" in pairs, serial=serial)


def net(text: str) -> NetConfig:
    bare, pairs = _options(text, "--net", {"tap", "mac"}, set())
    if bare or "tap" not in pairs:
        raise argparse.ArgumentTypeError(f"invalid --net {text!r}: expected tap=NAME[,mac=52:54:00:xx:xx:xx]")
    return NetConfig(tap=pairs["tap"], mac=pairs.get("mac", "").lower())


def vsock(text: str) -> VsockConfig:
    bare, pairs = _options(text, "--vsock", {"cid", "uds"}, set())
    if bare or "cid" not in pairs or "uds" not in pairs:
        raise argparse.ArgumentTypeError(f"invalid --vsock {text!r}: expected cid=N,uds=PATH")
    try:
        cid = int(pairs["cid"], 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --vsock {text!r}: cid must be a number") from None
    return VsockConfig(cid=cid, uds_path=Path(pairs["uds"]))


def balloon(text: str) -> BalloonConfig:
    bare, pairs = _options(text, "--balloon", {"stats", "oom"}, set())
    if bare:
        raise argparse.ArgumentTypeError(f"invalid --balloon {text!r}: expected [stats=SECONDS][,oom=on|off]")
    try:
        interval = float(pairs.get("stats", "1"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --balloon {text!r}: stats must be a number of seconds") from None
    if pairs.get("oom", "on") not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"invalid --balloon {text!r}: oom must be on or off")
    config = BalloonConfig(stats_interval_s=interval, deflate_on_oom=pairs.get("oom", "on") == "on")
    try:
        check_balloon(config)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"invalid --balloon {text!r}: stats must be {exc.reason}") from None
    return config


def tpm(text: str) -> TpmConfig:
    bare, pairs = _options(text, "--tpm", {"dir"}, set())
    if bare or not pairs.get("dir"):
        raise argparse.ArgumentTypeError(f"invalid --tpm {text!r}: expected dir=DIR (or --tpm alone)")
    return TpmConfig(state_dir=Path(pairs["dir"]))


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--disk", type=disk, action="append", default=[], metavar="FILE[,ro][,serial=S]",
                        help="a virtio-blk disk on a raw file (repeat for more disks)")
    parser.add_argument("--net", type=net, action="append", default=[], metavar="tap=NAME[,mac=M]",
                        help="a virtio-net interface on the host tap device NAME (opened, or created if allowed)")
    parser.add_argument("--rng", action="store_true", help="a virtio-rng device fed by the host's getrandom()")
    parser.add_argument("--vsock", type=vsock, metavar="cid=N,uds=PATH",
                        help="a virtio-vsock device: the guest's CID, and the host Unix socket its streams meet")
    parser.add_argument("--balloon", type=balloon, nargs="?", const=BalloonConfig(), metavar="stats=SECONDS",
                        help="a virtio-balloon device; its memory statistics are asked for every SECONDS (default 1, "
                             "0: only on request); oom=off refuses deflate-on-OOM")
    parser.add_argument("--tpm", type=tpm, nargs="?", const=TpmConfig(), metavar="dir=DIR",
                        help="a TPM 2.0 (CRB) backed by swtpm; the VMM measures kernel, initrd and command line into "
                             "PCRs 9 and 8 and keeps an event log; dir=DIR keeps the TPM's keys across runs "
                             "(docs/vtpm.md)")
