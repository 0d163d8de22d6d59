"""Offline remote attestation: golden values, quote documents, and checking a quote against a boot's log."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyrovisor.errors import AttestationError, ConfigError, MissingExtraError
from pyrovisor.tpm.commands import Quote, check_pcrs, tss
from pyrovisor.tpm.event_log import MEASUREMENT_PCRS, Event, parse_event_log, replay

GOLDEN_FORMAT = "pyrovisor-golden/1"
QUOTE_FORMAT = "pyrovisor-quote/1"
TPM_GENERATED_VALUE = 0xFF544347  # "\xffTCG": TPMS_ATTEST.magic of a structure the TPM made
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B
TPM_ALG_RSASSA = 0x0014
TPM_ALG_RSAPSS = 0x0016
TPM_ALG_ECDSA = 0x0018
HASHES: dict[int, Callable[..., Any]] = {0x0004: hashlib.sha1, 0x000B: hashlib.sha256, 0x000C: hashlib.sha384,
                                       0x000D: hashlib.sha512}
SHOWN_HEX = 12  # digits of a digest in a check's detail


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Verdict:
    """Every check verify() made; the quote is trusted only when all passed."""

    ok: bool
    checks: tuple[Check, ...]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [{"name": check.name, "ok": check.ok, "detail": check.detail}
                                          for check in self.checks]}

    def failed(self) -> tuple[str, ...]:
        return tuple(check.name for check in self.checks if not check.ok)


# --- golden values ------------------------------------------------------------------------------------------
def golden_values(kernel: Path, initrd: Path | None, cmdline: str) -> dict[str, Any]:
    """The measurements a good boot of these files with this command line produces."""
    measurements: dict[str, Any] = {"kernel": _golden(kernel.read_bytes(), "kernel")}
    if initrd is not None:
        measurements["initrd"] = _golden(initrd.read_bytes(), "initrd")
    measurements["cmdline"] = _golden(cmdline.encode(), "cmdline")
    return {"format": GOLDEN_FORMAT, "measurements": measurements}


def _golden(measured: bytes, name: str) -> dict[str, Any]:
    return {"pcr": MEASUREMENT_PCRS[name], "sha256": hashlib.sha256(measured).hexdigest()}


def _require_format(document: Any, expected: str, source: str) -> None:
    if not isinstance(document, dict) or document.get("format") != expected:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise AttestationError(source, f"not a {expected} document (format {found!r})")


def check_golden(document: Any, source: str = "golden values") -> dict[str, tuple[int, bytes]]:
    """A golden-values document's measurements as {name: (pcr, sha256)}; anything malformed raises."""
    _require_format(document, GOLDEN_FORMAT, source)
    measurements = document.get("measurements")
    if not isinstance(measurements, dict):
        raise AttestationError(source, "'measurements' must be an object")
    unknown = sorted(set(measurements) - set(MEASUREMENT_PCRS))
    if unknown:
        raise AttestationError(source, f"unknown measurement(s) {', '.join(unknown)} (known: "
                                       f"{', '.join(MEASUREMENT_PCRS)})")
    result: dict[str, tuple[int, bytes]] = {}
    for name in ("kernel", "initrd", "cmdline"):
        entry = measurements.get(name)
        if entry is None:
            if name == "initrd":
                continue
            raise AttestationError(source, f"no '{name}' measurement")
        if not isinstance(entry, dict) or entry.get("pcr") != MEASUREMENT_PCRS[name]:
            raise AttestationError(source, f"'{name}' must be an object with \"pcr\": {MEASUREMENT_PCRS[name]}")
        result[name] = (MEASUREMENT_PCRS[name], _hex(entry.get("sha256"), f"{name}.sha256", source, 32))
    return result


# --- quote documents ----------------------------------------------------------------------------------------
def quote_document(quote: Quote, pcr_values: dict[int, bytes]) -> dict[str, Any]:
    """A quote as JSON, with the PCR values the TPM reported (unsigned: for diagnosis, not for trust)."""
    return {"format": QUOTE_FORMAT, "nonce": quote.nonce.hex(), "pcrs": list(quote.pcrs),
            "attest": base64.b64encode(quote.attest).decode("ascii"),
            "signature": base64.b64encode(quote.signature).decode("ascii"),
            "pcr_values": {str(pcr): value.hex() for pcr, value in sorted(pcr_values.items())}}


def parse_quote_document(document: Any, source: str = "quote") -> tuple[Quote, dict[int, bytes]]:
    """A quote document back as a Quote and its reported PCR values; anything malformed raises."""
    _require_format(document, QUOTE_FORMAT, source)
    pcrs = document.get("pcrs")
    if not isinstance(pcrs, list):
        raise AttestationError(source, "'pcrs' must be a list of PCR numbers")
    try:
        selection = check_pcrs(pcrs)
    except ConfigError as exc:
        raise AttestationError(source, f"'pcrs': {exc.reason}") from None
    values = document.get("pcr_values", {})
    if not isinstance(values, dict):
        raise AttestationError(source, "'pcr_values' must be an object")
    pcr_values: dict[int, bytes] = {}
    for key, value in values.items():
        if not key.isdecimal() or int(key) not in selection:
            raise AttestationError(source, f"'pcr_values' has PCR {key!r}, which the quote does not cover")
        pcr_values[int(key)] = _hex(value, f"pcr_values.{key}", source, 32)
    quote = Quote(attest=_base64(document.get("attest"), "attest", source),
                  signature=_base64(document.get("signature"), "signature", source),
                  pcrs=selection, nonce=_hex(document.get("nonce"), "nonce", source))
    return quote, pcr_values


def load_json(path: Path, what: str) -> Any:
    """A JSON file; unreadable or invalid JSON raises AttestationError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AttestationError(str(path), f"cannot read the {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AttestationError(str(path), f"the {what} is not UTF-8 text") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AttestationError(str(path), f"the {what} is not JSON: {exc}") from None


def load_quote(path: Path) -> dict[str, Any]:
    """A quote document from a file, checked (parse_quote_document)."""
    document = load_json(path, "quote")
    parse_quote_document(document, str(path))
    result: dict[str, Any] = document
    return result


def load_golden(path: Path) -> dict[str, Any]:
    """A golden-values document from a file, checked (check_golden)."""
    document = load_json(path, "golden values")
    check_golden(document, str(path))
    result: dict[str, Any] = document
    return result


# --- verification -------------------------------------------------------------------------------------------
def verify(quote_doc: dict[str, Any], log: bytes, ak_pem: bytes, golden: dict[str, Any], nonce: bytes) -> Verdict:
    """Check a quote against the attestation key, the expected nonce, the boot's event log and the golden
    values. A failed check is part of the verdict; malformed inputs raise AttestationError."""
    quote, reported = parse_quote_document(quote_doc)
    expected = check_golden(golden)
    events = parse_event_log(log)
    key = load_public_key(ak_pem)
    attest = _parse_attest(quote.attest)
    signature = _parse_signature(quote.signature)

    checks = [_check_signature(key, signature, quote.attest)]
    checks.append(Check("magic", attest.magic == TPM_GENERATED_VALUE,
                        f"{attest.magic:#010x}" + ("" if attest.magic == TPM_GENERATED_VALUE else
                                                   f", not TPM_GENERATED_VALUE {TPM_GENERATED_VALUE:#010x}")))
    checks.append(Check("type", attest.type == TPM_ST_ATTEST_QUOTE,
                        "TPM_ST_ATTEST_QUOTE" if attest.type == TPM_ST_ATTEST_QUOTE else
                        f"{attest.type:#06x}, not TPM_ST_ATTEST_QUOTE ({TPM_ST_ATTEST_QUOTE:#06x})"))
    checks.append(Check("nonce", attest.extra_data == nonce,
                        "matches" if attest.extra_data == nonce else
                        f"the quote was made for nonce {attest.extra_data.hex() or '(none)'}, not {nonce.hex()} "
                        "(an old or replayed quote)"))
    golden_pcrs = sorted({pcr for pcr, _ in expected.values()})
    quoted = attest.selection
    selection_ok = quoted == {TPM_ALG_SHA256: quote.pcrs} and set(golden_pcrs) <= set(quote.pcrs)
    checks.append(Check("pcr selection", selection_ok,
                        _describe_selection(quoted) + ("" if selection_ok else
                                                       f"; expected sha256 {_pcr_list(quote.pcrs)}, covering the "
                                                       f"measured PCRs {_pcr_list(golden_pcrs)}")))
    checks.append(_check_pcr_digest(events, quote.pcrs, attest.pcr_digest, signature.hash_alg, reported))
    checks.append(_check_events(events, quote.pcrs))
    for name in ("kernel", "initrd", "cmdline"):
        checks.append(_check_measurement(name, expected.get(name), events))
    return Verdict(all(check.ok for check in checks), tuple(checks))


def load_public_key(pem: bytes) -> Any:
    """A PEM public key (SubjectPublicKeyInfo): ECC or RSA."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, rsa
    except ImportError:
        raise MissingExtraError("attestation", "tpm", ("cryptography",)) from None
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise AttestationError("attestation key", "not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise AttestationError("attestation key", f"a {type(key).__name__}, not an ECC or RSA key")
    return key


@dataclass(frozen=True)
class _Attest:
    magic: int
    type: int
    extra_data: bytes
    selection: dict[int, tuple[int, ...]]  # hash algorithm -> PCRs (only meaningful for a quote)
    pcr_digest: bytes


@dataclass(frozen=True)
class _Signature:
    algorithm: int
    hash_alg: int
    r: int  # ECDSA
    s: int
    rsa: bytes  # RSASSA/RSAPSS


def _parse_attest(data: bytes) -> _Attest:
    t = tss()
    try:
        attest, used = t.types.TPMS_ATTEST.unmarshal(data)
    except t.TSS2_Exception as exc:
        raise AttestationError("quote", f"'attest' is not a TPMS_ATTEST ({exc})") from None
    if used != len(data):
        raise AttestationError("quote", f"'attest' has {len(data) - used} bytes after its TPMS_ATTEST")
    selection: dict[int, tuple[int, ...]] = {}
    digest = b""
    if int(attest.type) == TPM_ST_ATTEST_QUOTE:
        info = attest.attested.quote
        for index in range(info.pcrSelect.count):
            bank = info.pcrSelect.pcrSelections[index]
            bits = bytes(bank.pcrSelect)[:bank.sizeofSelect]
            selection[int(bank.hash)] = tuple(byte * 8 + bit for byte, value in enumerate(bits)
                                              for bit in range(8) if value >> bit & 1)
        digest = bytes(info.pcrDigest)
    return _Attest(int(attest.magic), int(attest.type), bytes(attest.extraData), selection, digest)


def _parse_signature(data: bytes) -> _Signature:
    t = tss()
    try:
        signature, used = t.types.TPMT_SIGNATURE.unmarshal(data)
    except t.TSS2_Exception as exc:
        raise AttestationError("quote", f"'signature' is not a TPMT_SIGNATURE ({exc})") from None
    if used != len(data):
        raise AttestationError("quote", f"'signature' has {len(data) - used} bytes after its TPMT_SIGNATURE")
    algorithm = int(signature.sigAlg)
    if algorithm == TPM_ALG_ECDSA:
        ecdsa = signature.signature.ecdsa
        return _Signature(algorithm, int(ecdsa.hash), int.from_bytes(bytes(ecdsa.signatureR), "big"),
                          int.from_bytes(bytes(ecdsa.signatureS), "big"), b"")
    if algorithm in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        rsa = signature.signature.rsassa if algorithm == TPM_ALG_RSASSA else signature.signature.rsapss
        return _Signature(algorithm, int(rsa.hash), 0, 0, bytes(rsa.sig))
    raise AttestationError("quote", f"signature algorithm {algorithm:#06x} is not ECDSA, RSASSA or RSAPSS")


def _check_signature(key: Any, signature: _Signature, attest: bytes) -> Check:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

    algorithms: dict[int, Callable[[], hashes.HashAlgorithm]] = {
        0x0004: hashes.SHA1, 0x000B: hashes.SHA256, 0x000C: hashes.SHA384, 0x000D: hashes.SHA512}
    make_hash = algorithms.get(signature.hash_alg)
    if make_hash is None:
        return Check("signature", False, f"unsupported hash algorithm {signature.hash_alg:#06x}")
    hash_name = make_hash().name.upper().replace("SHA", "SHA-")
    try:
        if signature.algorithm == TPM_ALG_ECDSA:
            if not isinstance(key, ec.EllipticCurvePublicKey):
                return Check("signature", False, "an ECDSA signature, but the attestation key is RSA")
            key.verify(utils.encode_dss_signature(signature.r, signature.s), attest, ec.ECDSA(make_hash()))
            kind = f"ECDSA {key.curve.name}/{hash_name}"
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                return Check("signature", False, "an RSA signature, but the attestation key is ECC")
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15() if signature.algorithm == TPM_ALG_RSASSA
                else padding.PSS(mgf=padding.MGF1(make_hash()), salt_length=padding.PSS.AUTO))
            key.verify(signature.rsa, attest, pad, make_hash())
            kind = f"RSA{'SSA' if signature.algorithm == TPM_ALG_RSASSA else 'PSS'}/{hash_name}"
    except InvalidSignature:
        return Check("signature", False, "not signed by this attestation key")
    return Check("signature", True, f"{kind} by the attestation key")


def _check_pcr_digest(events: list[Event], pcrs: tuple[int, ...], signed: bytes, hash_alg: int,
                      reported: dict[int, bytes]) -> Check:
    """The quote signs a digest of the selected PCRs' values (concatenated in PCR order, hashed with the
    signing scheme's hash); replaying the log over those PCRs must give the same digest."""
    make_hash = HASHES.get(hash_alg, hashlib.sha256)
    replayed = replay(events, pcrs)
    digest = make_hash(b"".join(replayed[pcr] for pcr in pcrs)).digest()
    if digest == signed:
        return Check("pcr digest", True, f"the log replays to the quoted PCRs {_pcr_list(pcrs)}")
    detail = f"the log replays to {_short(digest)}, the quote signs {_short(signed)}"
    if set(reported) == set(pcrs) and make_hash(b"".join(reported[pcr] for pcr in pcrs)).digest() == signed:
        differing = [f"PCR {pcr} (log {_short(replayed[pcr])}, TPM {_short(reported[pcr])})"
                     for pcr in pcrs if replayed[pcr] != reported[pcr]]
        detail += "; differing: " + ", ".join(differing)
    return Check("pcr digest", False, detail + " (the log does not describe this boot)")


def _check_events(events: list[Event], pcrs: tuple[int, ...]) -> Check:
    """Every event in the quoted PCRs is one of the boot's measurements, each at most once."""
    seen: dict[str, int] = {}
    strangers: list[str] = []
    for event in events:
        if event.pcr not in pcrs or event.event_type == 0x3:  # EV_NO_ACTION extends nothing
            continue
        measurement = event.measurement
        if measurement is None or MEASUREMENT_PCRS[measurement[0]] != event.pcr:
            strangers.append(f"{event.type_name} on PCR {event.pcr} ({_printable(event.data)})")
        else:
            seen[measurement[0]] = seen.get(measurement[0], 0) + 1
    repeated = [f"{name} measured {count} times" for name, count in seen.items() if count > 1]
    if strangers or repeated:
        return Check("events", False, "; ".join(repeated + [f"unexpected event {text}" for text in strangers]))
    return Check("events", True, f"{sum(seen.values())} boot measurements, nothing else")


def _check_measurement(name: str, expected: tuple[int, bytes] | None, events: list[Event]) -> Check:
    found = [event for event in events if event.measurement is not None and event.measurement[0] == name]
    if expected is None:
        if found:
            return Check(name, False, f"log has {_short(found[0].digest)}, golden expects no {name}")
        return Check(name, True, "none, as expected")
    pcr, digest = expected
    if not found:
        return Check(name, False, f"log has no {name} measurement, golden expects {_short(digest)}")
    event = found[0]
    which = event.measurement[1] if event.measurement else ""
    label = f" ({_printable(which.encode())})" if which else ""
    if event.pcr != pcr:
        return Check(name, False, f"log measures it into PCR {event.pcr}, golden expects PCR {pcr}")
    if event.digest != digest:
        return Check(name, False, f"log has {_short(event.digest)}{label}, golden expects {_short(digest)}")
    return Check(name, True, f"{_short(digest)}{label} in PCR {pcr}")


# --- helpers ------------------------------------------------------------------------------------------------
def _hex(value: Any, field: str, source: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise AttestationError(source, f"'{field}' must be a hex string")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise AttestationError(source, f"'{field}' is not hex") from None
    if size is not None and len(data) != size:
        raise AttestationError(source, f"'{field}' must be {size} bytes, not {len(data)}")
    return data


def _base64(value: Any, field: str, source: str) -> bytes:
    if not isinstance(value, str):
        raise AttestationError(source, f"'{field}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationError(source, f"'{field}' is not valid base64") from None


def _short(digest: bytes) -> str:
    return digest.hex()[:SHOWN_HEX] + "…"


def _pcr_list(pcrs: Any) -> str:
    return ", ".join(str(pcr) for pcr in pcrs) or "(none)"


def _describe_selection(selection: dict[int, tuple[int, ...]]) -> str:
    names = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
    banks = [f"{names.get(bank, hex(bank))} PCRs {_pcr_list(pcrs)}" for bank, pcrs in sorted(selection.items())]
    return "; ".join(banks) or "no PCRs"


def _printable(data: bytes) -> str:
    text = data.removesuffix(b"\x00").decode("utf-8", errors="replace")
    text = "".join(char if char.isprintable() else "?" for char in text)
    return repr(text[:60] + ("…" if len(text) > 60 else ""))
