"""`pyrovisor attest`: golden values, a quote from a running VM, reading an event log, verifying a quote."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
from pathlib import Path
from typing import Any

from pyrovisor.tpm.commands import NONCE_MAX


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    attest = subparsers.add_parser(
        "attest", help="remote attestation: golden values, quotes, event logs, verification",
        description="Measured boot and remote attestation with the vTPM (docs/vtpm.md): compute the golden "
                    "values of a boot, fetch a quote from a running VM, read its event log, and verify a quote.")
    verbs = attest.add_subparsers(dest="verb", metavar="VERB", required=True)

    golden = verbs.add_parser("golden", help="the measurements a good boot of these files produces",
                              description="Compute the golden values (SHA-256 of the kernel, the initrd and the "
                                          "command line, with their PCRs) that `attest verify --expect` takes.")
    golden.add_argument("kernel", type=Path, help="the kernel image the VM boots")
    golden.add_argument("initrd", help="the initial archive, or - for none")
    golden.add_argument("cmdline", help="the command line exactly as the guest gets it (run's --args)")
    golden.add_argument("--out", type=Path, metavar="FILE", help="write the document here instead of printing it")
    golden.add_argument("--json", action="store_true", help="print the document as JSON (also with --out)")
    golden.set_defaults(handler=_golden)

    quote = verbs.add_parser("quote", help="ask a running VM's vTPM for a quote",
                             description="POST /tpm/quote to a VMM's control API: a quote by the VM's attestation "
                                         "key over its boot PCRs, with your nonce, its event log and the key.")
    quote.add_argument("socket", type=Path, help="the socket given to --api")
    quote.add_argument("--nonce", required=True, type=nonce, metavar="HEX",
                       help=f"fresh random bytes (1 to {NONCE_MAX}) as hex, e.g. from `openssl rand -hex 16`")
    quote.add_argument("--out", required=True, type=Path, metavar="QUOTE", help="write the quote document here")
    quote.add_argument("--log", type=Path, metavar="LOG", help="write the boot's event log (binary) here")
    quote.add_argument("--ak", type=Path, metavar="AK.pub", help="write the attestation key (PEM) here")
    quote.add_argument("--pcrs", type=pcr_list, metavar="8,9", help="PCRs to quote (default: 8,9)")
    quote.add_argument("--json", action="store_true", help="print what was written as JSON")
    quote.set_defaults(handler=_quote)

    log = verbs.add_parser("log", help="print a TCG event log and the PCR values it replays to")
    log.add_argument("log", type=Path, help="a crypto-agile (SHA-256) event log, as `attest quote --log` writes")
    log.add_argument("--json", action="store_true", help="print the events and PCRs as JSON")
    log.set_defaults(handler=_log)

    verify = verbs.add_parser("verify", help="check a quote against the key, the nonce, the log and golden values",
                              description="Exit status 0 when every check passes, 1 when one fails.")
    verify.add_argument("quote", type=Path, help="the quote document (`attest quote --out`)")
    verify.add_argument("--log", required=True, type=Path, metavar="LOG", help="the boot's event log")
    verify.add_argument("--ak", required=True, type=Path, metavar="AK.pub",
                        help="the attestation key's public PEM, obtained from a source you trust")
    verify.add_argument("--expect", required=True, type=Path, metavar="GOLDEN.json",
                        help="golden values (`attest golden`)")
    verify.add_argument("--nonce", required=True, type=nonce, metavar="HEX", help="the nonce you asked the quote for")
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verify.set_defaults(handler=_verify)


# --- flag types ---------------------------------------------------------------------------------------------
def nonce(text: str) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid nonce {text!r}: expected hex digits") from None
    if not 1 <= len(value) <= NONCE_MAX:
        raise argparse.ArgumentTypeError(f"invalid nonce {text!r}: expected 1 to {NONCE_MAX} bytes, "
                                         f"not {len(value)}")
    return value


def pcr_list(text: str) -> tuple[int, ...]:
    from pyrovisor.errors import ConfigError
    from pyrovisor.tpm.commands import check_pcrs

    try:
        return check_pcrs([int(part) for part in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid PCR list {text!r}: expected numbers such as 8,9") from None
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"invalid PCR list {text!r}: {exc.reason}") from None


# --- handlers -----------------------------------------------------------------------------------------------
def _golden(args: argparse.Namespace) -> int:
    from pyrovisor.tpm.attestation import golden_values

    initrd = None if args.initrd == "-" else Path(args.initrd)
    document = golden_values(args.kernel, initrd, args.cmdline)
    text = json.dumps(document, indent=2)
    if args.out is None:
        print(text)
        return 0
    args.out.write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for name, entry in document["measurements"].items():
            print(f"{name:8} PCR {entry['pcr']}  sha256 {entry['sha256']}")
        print(f"wrote {args.out}")
    return 0


def _quote(args: argparse.Namespace) -> int:
    from pyrovisor.api.client import ApiClient
    from pyrovisor.errors import AttestationError
    from pyrovisor.tpm.attestation import parse_quote_document
    from pyrovisor.tpm.event_log import QUOTE_PCRS

    pcrs = args.pcrs or QUOTE_PCRS
    answer = ApiClient(args.socket).post("/tpm/quote", {"nonce": args.nonce.hex(), "pcrs": list(pcrs)})
    source = f"{args.socket} POST /tpm/quote"
    document = answer.get("quote")
    quote, values = parse_quote_document(document, source)
    if quote.nonce != args.nonce:
        raise AttestationError(source, f"the VMM answered for nonce {quote.nonce.hex()}, not {args.nonce.hex()}")
    log_text, ak = answer.get("log"), answer.get("ak")
    if not isinstance(log_text, str) or not isinstance(ak, str):
        raise AttestationError(source, "the answer lacks 'log' (base64) or 'ak' (PEM)")
    try:
        log = base64.b64decode(log_text, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationError(source, "'log' is not valid base64") from None
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    written: dict[str, Any] = {"quote": str(args.out)}
    if args.log is not None:
        args.log.write_bytes(log)
        written["log"] = str(args.log)
    if args.ak is not None:
        args.ak.write_text(ak)
        written["ak"] = str(args.ak)
    if args.json:
        print(json.dumps({"written": written, "pcrs": list(quote.pcrs),
                          "pcr_values": {str(pcr): value.hex() for pcr, value in sorted(values.items())}}, indent=2))
    else:
        for pcr, value in sorted(values.items()):
            print(f"PCR {pcr:2}  {value.hex()}")
        print("wrote " + ", ".join(f"{what} {path}" for what, path in written.items()))
    return 0


def _log(args: argparse.Namespace) -> int:
    from pyrovisor.tpm.event_log import EV_NO_ACTION, parse_event_log, replay

    events = parse_event_log(args.log.read_bytes())
    pcrs = sorted({event.pcr for event in events if event.event_type != EV_NO_ACTION})
    values = replay(events, pcrs)
    if args.json:
        print(json.dumps({"events": [event.to_json() for event in events],
                          "pcrs": {str(pcr): value.hex() for pcr, value in values.items()}}, indent=2))
        return 0
    for event in events:
        data = event.data.removesuffix(b"\x00").decode("utf-8", errors="replace")
        print(f"PCR {event.pcr:2}  {event.type_name:12}  {event.digest.hex()}  {data}")
    print(f"{len(events)} events; replayed:")
    for pcr, value in values.items():
        print(f"PCR {pcr:2}  {value.hex()}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pyrovisor.tpm.attestation import load_golden, load_quote, verify

    verdict = verify(load_quote(args.quote), args.log.read_bytes(), args.ak.read_bytes(), load_golden(args.expect),
                     args.nonce)
    if args.json:
        print(json.dumps(verdict.to_json(), indent=2))
    else:
        for check in verdict.checks:
            print(f"{'PASS' if check.ok else 'FAIL'}  {check.name:13}  {check.detail}")
        print("verified: every check passed" if verdict.ok else f"NOT verified: {', '.join(verdict.failed())} failed")
    return 0 if verdict.ok else 1
