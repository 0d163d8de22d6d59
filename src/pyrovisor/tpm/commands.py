"""The VMM's own TPM 2.0 commands (as the VM's firmware, and for quotes), through tpm2-pytss's ESAPI."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pyrovisor.errors import ConfigError, MissingExtraError, TpmError

AK_HANDLE = 0x81010002  # the attestation key's persistent handle (the guest's quote program uses it too)
PCR_COUNT = 24  # a PC Client TPM's PCRs
NONCE_MAX = 64  # bytes: TPM2B_DATA holds at most one (SHA-512) digest
SHA256_SIZE = 32
TPM_RESPONSE_MAX = 4096  # swtpm's I/O buffer
TPM_ST_NO_SESSIONS = 0x8001
TPM_CC_STARTUP = 0x144
TPM_SU_CLEAR = 0x0000
TPM_RC_INITIALIZE = 0x100

Transmit = Callable[[bytes], bytes]


@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote's result, as the bytes the TPM produced (the guest's quote program yields the same)."""

    attest: bytes  # the TPMS_ATTEST as marshalled inside TPM2B_ATTEST (without the 2-byte size)
    signature: bytes  # the marshalled TPMT_SIGNATURE
    pcrs: tuple[int, ...]  # the SHA-256 PCRs quoted, increasing
    nonce: bytes  # the caller's qualifying data (TPMS_ATTEST.extraData)


def tss() -> ModuleType:
    """tpm2_pytss, imported on first use (the rest of pyrovisor works without it)."""
    # libtss2 logs every TPM error response on stderr; a refused command is reported as a TpmError instead.
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    try:
        import tpm2_pytss
    except ImportError:
        raise MissingExtraError("the vTPM", "tpm", ("tpm2-pytss",)) from None
    module: ModuleType = tpm2_pytss
    return module


def check_pcrs(pcrs: Sequence[int], field: str = "pcrs") -> tuple[int, ...]:
    """PCR indices as a sorted tuple: a non-empty selection of distinct PCRs 0-23."""
    values = tuple(pcrs)
    if not values or any(isinstance(pcr, bool) or not isinstance(pcr, int) or not 0 <= pcr < PCR_COUNT
                         for pcr in values) or len(set(values)) != len(values):
        raise ConfigError(field, list(values), f"expected distinct PCR numbers from 0 to {PCR_COUNT - 1}")
    return tuple(sorted(values))


def _make_tcti(transmit: Transmit) -> Any:
    """A tpm2-pytss TCTI whose transmit goes to `transmit` (one whole command in, one whole response out)."""
    tss()
    from tpm2_pytss.TCTI import PyTCTI  # the submodule (the package's `TCTI` is a class)

    class CallableTcti(PyTCTI):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(max_size=TPM_RESPONSE_MAX, magic=b"PYROVISR")
            self._response = b""

        def do_transmit(self, command: bytes) -> None:
            self._response = transmit(bytes(command))

        def do_receive(self, timeout: int) -> bytes:
            response, self._response = self._response, b""
            return response

    return CallableTcti()


class TpmCommands:
    """TPM commands over `transmit` (e.g. `Swtpm.transmit`), one at a time; `close` when done."""

    def __init__(self, transmit: Transmit) -> None:
        module = tss()
        self._tss = module
        self._lock = threading.Lock()
        self._transmit = transmit
        self._tcti = _make_tcti(transmit)
        self._esapi = module.ESAPI(self._tcti)

    def close(self) -> None:
        with self._lock:
            if self._esapi is not None:
                self._esapi.close()
                self._esapi = None

    def __enter__(self) -> TpmCommands:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- the firmware's commands --------------------------------------------------------------------------
    def startup(self) -> None:
        """TPM2_Startup(CLEAR): the first command after a TPM reset. Sent as raw bytes because ESAPI takes
        TPM_RC_INITIALIZE (already started) for success, and a measured boot must start from reset PCRs."""
        command = struct.pack(">HIIH", TPM_ST_NO_SESSIONS, 12, TPM_CC_STARTUP, TPM_SU_CLEAR)
        with self._lock:
            response = self._transmit(command)
        code = struct.unpack_from(">I", response, 6)[0] if len(response) >= 10 else None
        if code == TPM_RC_INITIALIZE:
            raise TpmError("startup", "the TPM was already started (it must be reset before a measured boot)",
                           code)
        if code != 0:
            raise TpmError("startup", "the TPM refused TPM2_Startup(CLEAR)", code)

    def extend(self, pcr: int, digest: bytes) -> None:
        """TPM2_PCR_Extend of the SHA-256 bank's `pcr` with a SHA-256 `digest`."""
        (pcr,) = check_pcrs((pcr,), "pcr")
        if len(digest) != SHA256_SIZE:
            raise ConfigError("digest", digest.hex(), f"a SHA-256 digest is {SHA256_SIZE} bytes, not {len(digest)}")

        def extend(esapi: Any, t: Any) -> None:
            values = t.types.TPML_DIGEST_VALUES([t.types.TPMT_HA(hashAlg=t.constants.TPM2_ALG.SHA256,
                                                                  digest=t.types.TPMU_HA(sha256=digest))])
            esapi.pcr_extend(t.constants.ESYS_TR.PCR0 + pcr, values)

        self._call(f"extend PCR {pcr}", extend)

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """The SHA-256 bank's values of `pcrs` (TPM2_PCR_Read, one PCR at a time)."""
        selection = check_pcrs(pcrs)

        def read(esapi: Any, t: Any) -> dict[int, bytes]:
            values: dict[int, bytes] = {}
            for pcr in selection:
                _, _, digests = esapi.pcr_read(t.types.TPML_PCR_SELECTION.parse(f"sha256:{pcr}"))
                if len(digests) != 1:
                    raise TpmError("read PCRs", f"the TPM has no SHA-256 bank for PCR {pcr}")
                values[pcr] = bytes(digests[0])
            return values

        result: dict[int, bytes] = self._call("read PCRs", read)
        return result

    def attestation_key(self) -> bytes:
        """The PEM (SubjectPublicKeyInfo) of the attestation key at AK_HANDLE, created there first if absent:
        a restricted ECDSA P-256/SHA-256 signing key, primary in the endorsement hierarchy, empty auth."""

        def key(esapi: Any, t: Any) -> bytes:
            if not self._persistent(esapi, t, AK_HANDLE):
                self._create_ak(esapi, t)
            handle = esapi.tr_from_tpmpublic(AK_HANDLE)
            try:
                public, _, _ = esapi.read_public(handle)
            finally:
                esapi.tr_close(handle)
            self._check_ak(public.publicArea, t)
            pem: bytes = public.to_pem()
            return pem

        result: bytes = self._call("attestation key", key)
        return result

    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> Quote:
        """TPM2_Quote by the attestation key (which must exist) over the SHA-256 bank's `pcrs`, with `nonce`
        as the qualifying data and the key's own signing scheme."""
        selection = check_pcrs(pcrs)
        if not 1 <= len(nonce) <= NONCE_MAX:
            raise ConfigError("nonce", nonce.hex(), f"expected 1 to {NONCE_MAX} bytes, not {len(nonce)}")

        def quote(esapi: Any, t: Any) -> Quote:
            if not self._persistent(esapi, t, AK_HANDLE):
                raise TpmError("quote", f"the TPM has no attestation key at {AK_HANDLE:#x}")
            handle = esapi.tr_from_tpmpublic(AK_HANDLE)
            try:
                spec = "sha256:" + ",".join(str(pcr) for pcr in selection)
                attest, signature = esapi.quote(handle, t.types.TPML_PCR_SELECTION.parse(spec),
                                                t.types.TPM2B_DATA(nonce),
                                                t.types.TPMT_SIG_SCHEME(scheme=t.constants.TPM2_ALG.NULL))
            finally:
                esapi.tr_close(handle)
            return Quote(attest=bytes(attest), signature=bytes(signature.marshal()), pcrs=selection, nonce=nonce)

        result: Quote = self._call("quote", quote)
        return result

    # --- plumbing ------------------------------------------------------------------------------------------
    def _call(self, operation: str, action: Callable[[Any, Any], Any]) -> Any:
        """Run `action(esapi, tpm2_pytss)` under the lock; a TPM or TSS error becomes a TpmError."""
        t = self._tss
        with self._lock:
            if self._esapi is None:
                raise TpmError(operation, "the TPM command context was closed")
            try:
                return action(self._esapi, t)
            except t.TSS2_Exception as exc:
                raise TpmError(operation, str(exc), int(exc.rc)) from None

    @staticmethod
    def _persistent(esapi: Any, t: Any, handle: int) -> bool:
        _, data = esapi.get_capability(t.constants.TPM2_CAP.HANDLES, handle, 1)
        handles = [int(value) for value in data.data.handles]
        return handle in handles

    @staticmethod
    def _ak_template(t: Any) -> Any:
        attributes = t.constants.TPMA_OBJECT
        area = t.types.TPMT_PUBLIC(
            type=t.constants.TPM2_ALG.ECC, nameAlg=t.constants.TPM2_ALG.SHA256,
            objectAttributes=(attributes.RESTRICTED | attributes.SIGN_ENCRYPT | attributes.FIXEDTPM
                              | attributes.FIXEDPARENT | attributes.SENSITIVEDATAORIGIN | attributes.USERWITHAUTH))
        details = area.parameters.eccDetail
        details.symmetric.algorithm = t.constants.TPM2_ALG.NULL
        details.scheme.scheme = t.constants.TPM2_ALG.ECDSA
        details.scheme.details.ecdsa.hashAlg = t.constants.TPM2_ALG.SHA256
        details.curveID = t.constants.TPM2_ECC.NIST_P256
        details.kdf.scheme = t.constants.TPM2_ALG.NULL
        return t.types.TPM2B_PUBLIC(publicArea=area)

    def _create_ak(self, esapi: Any, t: Any) -> None:
        # CreatePrimary with an empty auth value (USERWITHAUTH: a password session with an empty password
        # signs), then EvictControl under the owner hierarchy (empty auth on a fresh TPM) to keep it.
        transient, _, _, _, _ = esapi.create_primary(t.types.TPM2B_SENSITIVE_CREATE(), self._ak_template(t),
                                                     t.constants.ESYS_TR.ENDORSEMENT)
        try:
            persistent = esapi.evict_control(t.constants.ESYS_TR.OWNER, transient, AK_HANDLE)
            esapi.tr_close(persistent)
        finally:
            esapi.flush_context(transient)

    @staticmethod
    def _check_ak(area: Any, t: Any) -> None:
        """The key at AK_HANDLE is the kind quote() and the verifier expect (not something the guest put)."""
        attributes = t.constants.TPMA_OBJECT
        needed = attributes.RESTRICTED | attributes.SIGN_ENCRYPT | attributes.FIXEDTPM
        if area.type != t.constants.TPM2_ALG.ECC or (area.objectAttributes & needed) != needed:
            raise TpmError("attestation key", f"the object at {AK_HANDLE:#x} is not a restricted ECC signing key")
