"""verify(): a good quote passes every check; each kind of lie fails the check named for it; bad input raises."""

from __future__ import annotations

import base64
import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
from tpm_helpers import CMDLINE, INITRD, KERNEL, Booted, boot, need_swtpm, need_tss

from pyrovisor.errors import AttestationError
from pyrovisor.tpm.event_log import EV_IPL, EventLog, measure_boot
from pyrovisor.tpm.swtpm import Swtpm

NONCE = bytes.fromhex("5eed0f00d5eed0f00d")


@pytest.fixture(autouse=True)
def _tools() -> None:
    need_swtpm()
    need_tss()


def quoted(machine: Booted, nonce: bytes = NONCE, pcrs: tuple[int, ...] = (8, 9)) -> dict[str, Any]:
    from pyrovisor.tpm.attestation import quote_document

    quote = machine.commands.quote(nonce, pcrs)
    return quote_document(quote, machine.commands.read_pcrs(pcrs))


def check(machine: Booted, document: dict[str, Any], log: bytes | None = None, ak: bytes | None = None,
          golden: dict[str, Any] | None = None, nonce: bytes = NONCE) -> tuple[str, ...]:
    """The names of the checks that failed."""
    from pyrovisor.tpm.attestation import verify

    verdict = verify(document, machine.log if log is None else log, machine.ak_pem if ak is None else ak,
                     machine.golden if golden is None else golden, nonce)
    assert verdict.ok == (not verdict.failed())
    return verdict.failed()


def detail(machine: Booted, document: dict[str, Any], name: str, **changes: Any) -> str:
    from pyrovisor.tpm.attestation import verify

    arguments: dict[str, Any] = {"log": machine.log, "ak_pem": machine.ak_pem, "golden": machine.golden,
                                 "nonce": NONCE, **changes}
    verdict = verify(document, **arguments)
    return next(each.detail for each in verdict.checks if each.name == name)


def golden_for(tmp_path: Path, kernel: bytes = KERNEL, initrd: bytes | None = INITRD,
               cmdline: bytes = CMDLINE) -> dict[str, Any]:
    from pyrovisor.tpm.attestation import golden_values

    (tmp_path / "k").write_bytes(kernel)
    if initrd is not None:
        (tmp_path / "i").write_bytes(initrd)
    return golden_values(tmp_path / "k", tmp_path / "i" if initrd is not None else None, cmdline.decode())


def test_a_good_quote_passes_every_check(booted: Booted) -> None:
    from pyrovisor.tpm.attestation import verify

    verdict = verify(quoted(booted), booted.log, booted.ak_pem, booted.golden, NONCE)
    assert verdict.ok
    assert [each.name for each in verdict.checks] == ["signature", "magic", "type", "nonce", "pcr selection",
                                                      "pcr digest", "events", "kernel", "initrd", "cmdline"]
    document = verdict.to_json()
    assert document["ok"] is True and all(each["ok"] for each in document["checks"])
    assert "ECDSA secp256r1/SHA-256" in document["checks"][0]["detail"]


def test_golden_document_format(tmp_path: Path) -> None:
    golden = golden_for(tmp_path)
    assert golden["format"] == "pyrovisor-golden/1"
    assert golden["measurements"] == {
        "kernel": {"pcr": 9, "sha256": hashlib.sha256(KERNEL).hexdigest()},
        "initrd": {"pcr": 9, "sha256": hashlib.sha256(INITRD).hexdigest()},
        "cmdline": {"pcr": 8, "sha256": hashlib.sha256(CMDLINE).hexdigest()}}
    assert "initrd" not in golden_for(tmp_path, initrd=None)["measurements"]


def test_quote_document_format(booted: Booted) -> None:
    document = quoted(booted)
    assert document["format"] == "pyrovisor-quote/1"
    assert document["nonce"] == NONCE.hex() and document["pcrs"] == [8, 9]
    assert set(document["pcr_values"]) == {"8", "9"}
    base64.b64decode(document["attest"], validate=True)
    base64.b64decode(document["signature"], validate=True)


def test_a_replayed_quote_fails_on_the_nonce(booted: Booted) -> None:
    old = quoted(booted, nonce=b"yesterday")
    assert check(booted, old) == ("nonce",)
    assert b"yesterday".hex() in detail(booted, old, "nonce")


def test_a_quote_by_another_tpm_fails_on_the_signature(booted: Booted, tmp_path: Path) -> None:
    with Swtpm.start() as other_tpm:
        other = boot(other_tpm, tmp_path / "other")
        try:
            forged = quoted(other)
        finally:
            other.commands.close()
    assert check(booted, forged) == ("signature",)  # same boot, same PCRs: only the key gives it away
    assert detail(booted, forged, "signature") == "not signed by this attestation key"


def test_an_altered_attest_fails_on_the_signature(booted: Booted) -> None:
    document = quoted(booted)
    attest = bytearray(base64.b64decode(document["attest"]))
    attest[-1] ^= 1  # the last byte of the PCR digest
    document["attest"] = base64.b64encode(bytes(attest)).decode()
    assert check(booted, document) == ("signature", "pcr digest")


@pytest.mark.parametrize("name", ["kernel", "initrd", "cmdline"])
def test_a_different_golden_measurement_fails_naming_it(booted: Booted, tmp_path: Path, name: str) -> None:
    changed = {"kernel": KERNEL, "initrd": INITRD, "cmdline": CMDLINE}
    changed[name] = changed[name] + b" (patched)"
    golden = golden_for(tmp_path, changed["kernel"], changed["initrd"], changed["cmdline"])
    document = quoted(booted)
    assert check(booted, document, golden=golden) == (name,)
    text = detail(booted, document, name, golden=golden)
    logged = hashlib.sha256({"kernel": KERNEL, "initrd": INITRD, "cmdline": CMDLINE}[name]).hexdigest()
    expected = golden["measurements"][name]["sha256"]
    assert text.startswith(f"log has {logged[:12]}…") and text.endswith(f"golden expects {expected[:12]}…")


def test_golden_without_initrd_fails_a_boot_with_one(booted: Booted, tmp_path: Path) -> None:
    golden = golden_for(tmp_path, initrd=None)
    assert check(booted, quoted(booted), golden=golden) == ("initrd",)


def test_a_log_rewritten_to_match_the_golden_values_fails_on_the_pcr_digest(booted: Booted, tmp_path: Path) -> None:
    """The VM booted KERNEL; a log claiming the golden kernel instead does not replay to the quoted PCRs."""
    golden_kernel = KERNEL + b" (the approved build)"
    lie = EventLog()
    measure_boot(lie, lambda pcr, digest: None, golden_kernel, "os.elf", INITRD, "os.initrd", CMDLINE)
    golden = golden_for(tmp_path, kernel=golden_kernel)
    document = quoted(booted)
    assert check(booted, document, log=lie.to_bytes(), golden=golden) == ("pcr digest",)
    text = detail(booted, document, "pcr digest", log=lie.to_bytes(), golden=golden)
    assert "PCR 9" in text and "PCR 8" not in text  # the reported values show which PCR the log gets wrong


def test_an_extra_event_fails(booted: Booted) -> None:
    log = EventLog()
    measure_boot(log, lambda pcr, digest: None, KERNEL, "os.elf", INITRD, "os.initrd", CMDLINE)
    log.measure(9, EV_IPL, b"module evil.ko\x00", b"evil")
    failed = check(booted, quoted(booted), log=log.to_bytes())
    assert failed == ("pcr digest", "events")


def test_a_narrower_selection_fails(booted: Booted) -> None:
    document = quoted(booted, pcrs=(8,))
    assert "pcr selection" in check(booted, document)


def test_document_pcrs_must_match_the_signed_selection(booted: Booted) -> None:
    document = quoted(booted)
    document["pcrs"] = [8, 9, 10]
    assert "pcr selection" in check(booted, document)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("attest", "not base64!", "'attest' is not valid base64"),
    ("signature", 12, "'signature' must be a base64 string"),
    ("nonce", "xyz", "'nonce' is not hex"),
    ("pcrs", [8, 99], "'pcrs'"),
    ("format", "pyrovisor-quote/0", "not a pyrovisor-quote/1 document"),
    ("pcr_values", {"3": "00" * 32}, "PCR '3'"),
])
def test_malformed_quote_documents_raise(booted: Booted, field: str, value: Any, message: str) -> None:
    document = copy.deepcopy(quoted(booted))
    document[field] = value
    with pytest.raises(AttestationError, match=message):
        check(booted, document)


def test_a_truncated_attest_raises(booted: Booted) -> None:
    document = quoted(booted)
    document["attest"] = base64.b64encode(base64.b64decode(document["attest"])[:40]).decode()
    with pytest.raises(AttestationError, match="'attest' is not a TPMS_ATTEST"):
        check(booted, document)
    document = quoted(booted)
    document["signature"] = base64.b64encode(base64.b64decode(document["signature"]) + b"\x00").decode()
    with pytest.raises(AttestationError, match="1 bytes after its TPMT_SIGNATURE"):
        check(booted, document)


def test_a_pem_that_is_not_a_key_raises(booted: Booted) -> None:
    with pytest.raises(AttestationError, match="attestation key: not a PEM public key"):
        check(booted, quoted(booted), ak=b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")


@pytest.mark.parametrize("golden", [{"format": "pyrovisor-golden/2", "measurements": {}}, [],
                                    {"format": "pyrovisor-golden/1", "measurements": {"kernel": {"pcr": 9}}},
                                    {"format": "pyrovisor-golden/1", "measurements": {"bios": {}}}])
def test_a_malformed_golden_document_raises(booted: Booted, golden: Any) -> None:
    with pytest.raises(AttestationError, match="golden values"):
        check(booted, quoted(booted), golden=golden)


def test_a_malformed_log_raises(booted: Booted) -> None:
    with pytest.raises(AttestationError, match="event log: truncated at offset"):
        check(booted, quoted(booted), log=booted.log[:-3])


def test_load_quote_names_the_file(booted: Booted, tmp_path: Path) -> None:
    from pyrovisor.tpm.attestation import load_golden, load_quote

    path = tmp_path / "quote.json"
    path.write_text("{not json")
    with pytest.raises(AttestationError, match=f"{path}: the quote is not JSON"):
        load_quote(path)
    path.write_text('{"format": "something else"}')
    with pytest.raises(AttestationError, match=f"{path}: not a pyrovisor-quote/1 document"):
        load_quote(path)
    with pytest.raises(AttestationError, match="cannot read the golden values"):
        load_golden(tmp_path / "missing.json")
