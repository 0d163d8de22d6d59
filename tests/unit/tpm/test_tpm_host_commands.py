"""The VMM's TPM commands on a real swtpm: startup, extend, the attestation key, quotes, saved state."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from tpm_helpers import Booted, need_swtpm, need_tss

from pyrovisor.errors import ConfigError, TpmError
from pyrovisor.tpm.swtpm import Swtpm

pytestmark = pytest.mark.usefixtures("tss")
TPM_RC_RETRY = 0x922


@pytest.fixture
def tss() -> None:
    need_swtpm()
    need_tss()


def started(tpm: Swtpm):  # type: ignore[no-untyped-def]
    from pyrovisor.tpm.commands import TpmCommands

    commands = TpmCommands(tpm.transmit)
    commands.startup()
    return commands


def test_extend_then_read_back(swtpm: Swtpm) -> None:
    commands = started(swtpm)
    first, second = hashlib.sha256(b"one").digest(), hashlib.sha256(b"two").digest()
    commands.extend(16, first)
    commands.extend(16, second)
    expected = hashlib.sha256(hashlib.sha256(bytes(32) + first).digest() + second).digest()
    assert commands.read_pcrs([16, 8]) == {8: bytes(32), 16: expected}
    commands.close()


def test_startup_twice_is_a_tpm_error(swtpm: Swtpm) -> None:
    commands = started(swtpm)
    with pytest.raises(TpmError, match="startup") as caught:
        commands.startup()
    assert caught.value.response_code == 0x100  # TPM_RC_INITIALIZE


def test_bad_arguments_are_config_errors(swtpm: Swtpm) -> None:
    commands = started(swtpm)
    with pytest.raises(ConfigError, match="digest"):
        commands.extend(8, b"short")
    with pytest.raises(ConfigError, match="pcr"):
        commands.extend(24, bytes(32))
    with pytest.raises(ConfigError, match="pcrs"):
        commands.read_pcrs([8, 8])
    with pytest.raises(ConfigError, match="nonce"):
        commands.quote(bytes(65), [8])


def test_quote_without_an_attestation_key_says_so(swtpm: Swtpm) -> None:
    with pytest.raises(TpmError, match="no attestation key at 0x81010002"):
        started(swtpm).quote(b"nonce", [8])


def test_attestation_key_is_made_once(tmp_path: Path) -> None:
    from pyrovisor.tpm.commands import AK_HANDLE

    with Swtpm.start(tmp_path) as tpm:
        commands = started(tpm)
        pem = commands.attestation_key()
        assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
        assert commands.attestation_key() == pem
        commands.close()
    with Swtpm.start(tmp_path) as tpm:  # the same state directory: the key is still at its handle
        commands = started(tpm)
        assert commands.attestation_key() == pem
        commands.close()
    with Swtpm.start() as tpm:  # another TPM (other seeds): another key
        other = started(tpm)
        assert other.attestation_key() != pem
        other.close()
    assert AK_HANDLE == 0x81010002


def test_attestation_key_is_ecdsa_p256() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with Swtpm.start() as tpm:
        key = serialization.load_pem_public_key(started(tpm).attestation_key())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_quote_verifies(booted: Booted) -> None:
    from pyrovisor.tpm.attestation import quote_document, verify

    quote = booted.commands.quote(b"fresh nonce", [9, 8])
    assert quote.pcrs == (8, 9) and quote.nonce == b"fresh nonce"
    document = quote_document(quote, booted.commands.read_pcrs(quote.pcrs))
    verdict = verify(document, booted.log, booted.ak_pem, booted.golden, b"fresh nonce")
    assert verdict.ok, verdict.to_json()


def test_saved_state_restores_pcrs_and_key_and_the_original_carries_on(booted: Booted) -> None:
    from pyrovisor.tpm.commands import TpmCommands

    before = booted.commands.read_pcrs([8, 9])
    state = booted.swtpm.save_state()
    assert booted.commands.read_pcrs([8, 9]) == before  # unchanged, still answering
    with Swtpm.start(state=state) as copy:
        restored = TpmCommands(copy.transmit)
        assert restored.read_pcrs([8, 9]) == before
        assert restored.attestation_key() == booted.ak_pem
        restored.extend(8, bytes(32))  # the copy and the original now differ
        assert restored.read_pcrs([8]) != booted.commands.read_pcrs([8])
        restored.close()
    booted.commands.extend(9, hashlib.sha256(b"after").digest())
    assert booted.commands.read_pcrs([9])[9] == hashlib.sha256(before[9] + hashlib.sha256(b"after").digest()).digest()


def test_a_dead_swtpm_is_a_tpm_error_through_the_esapi(swtpm: Swtpm) -> None:
    import os
    import signal

    commands = started(swtpm)
    os.kill(swtpm.pid, signal.SIGKILL)
    with pytest.raises(TpmError):
        commands.read_pcrs([8])


def _guest_quote(tpm: Swtpm, nonce: bytes, pcrs: tuple[int, ...]) -> tuple[bytes, bytes]:
    """TPM2_Quote as a guest program sends it: raw bytes, a password session with an empty password."""
    from pyrovisor.tpm.commands import AK_HANDLE

    select = bytearray(3)
    for pcr in pcrs:
        select[pcr // 8] |= 1 << pcr % 8
    session = struct.pack(">IHBH", 0x40000009, 0, 0, 0)  # TPM_RS_PW, no nonce, no attributes, empty password
    parameters = (struct.pack(">H", len(nonce)) + nonce + struct.pack(">H", 0x0010)  # TPM_ALG_NULL: the key's
                  + struct.pack(">IHB", 1, 0x000B, 3) + bytes(select))
    body = struct.pack(">I", AK_HANDLE) + struct.pack(">I", len(session)) + session + parameters
    for _ in range(3):
        response = tpm.transmit(struct.pack(">HII", 0x8002, 10 + len(body), 0x158) + body)
        (code,) = struct.unpack_from(">I", response, 6)
        # libtpms answers the first signature after TPM2_Startup with TPM_RC_RETRY: a TPM's "send it again"
        if code != TPM_RC_RETRY:
            break
    assert code == 0, hex(code)
    (parameter_size,) = struct.unpack_from(">I", response, 10)
    parameters_out = response[14:14 + parameter_size]
    (attest_size,) = struct.unpack_from(">H", parameters_out)
    return parameters_out[2:2 + attest_size], parameters_out[2 + attest_size:]


def test_a_guest_style_quote_verifies(booted: Booted) -> None:
    """The guest's quote program uses the AK with TPM_RS_PW and an empty password and hands over the attest
    and signature bytes as they come out of the response: verify() takes exactly those."""
    from pyrovisor.tpm.attestation import quote_document, verify
    from pyrovisor.tpm.commands import Quote

    attest, signature = _guest_quote(booted.swtpm, b"guest nonce", (8, 9))
    quote = Quote(attest=attest, signature=signature, pcrs=(8, 9), nonce=b"guest nonce")
    document = quote_document(quote, booted.commands.read_pcrs([8, 9]))
    verdict = verify(document, booted.log, booted.ak_pem, booted.golden, b"guest nonce")
    assert verdict.ok, verdict.to_json()
    host = booted.commands.quote(b"guest nonce", [8, 9])
    assert len(host.attest) == len(attest)  # the same structure (clock and counters differ)
