"""The control API's vTPM endpoints: GET /tpm (counters, key, PCRs) and POST /tpm/quote (a signed quote)."""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from pyrovisor.api.server import ApiError, JsonObject, Routes, reject_unknown_fields
from pyrovisor.errors import ConfigError
from pyrovisor.tpm.commands import NONCE_MAX, check_pcrs
from pyrovisor.tpm.event_log import QUOTE_PCRS

if TYPE_CHECKING:
    from pyrovisor.devices.tpm import VirtualTpm
    from pyrovisor.vmm import Vmm

SHOWN_PCRS = (8, 9, 16)  # GET /tpm: the boot's PCRs and the debug PCR guests may extend


def add_tpm_routes(routes: Routes, vmm: Vmm) -> None:
    handlers = TpmRoutes(vmm)
    routes.add("GET", "/tpm", handlers.get)
    routes.add("POST", "/tpm/quote", handlers.quote)
    routes.before_confinement.append(handlers.preload)


class TpmRoutes:
    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm

    def get(self, body: JsonObject) -> JsonObject:
        reject_unknown_fields(body, ())
        tpm = self._tpm()
        values = tpm.read_pcrs(SHOWN_PCRS)
        return {"commands": tpm.commands, "errors": tpm.errors, "ak": tpm.ak_public,
                "event_log_bytes": len(tpm.event_log),
                "pcrs": {str(index): value.hex() for index, value in sorted(values.items())}}

    def quote(self, body: JsonObject) -> JsonObject:
        """{"nonce": HEX, "pcrs": [8, 9]}: the quote document, the boot's event log (base64) and the key."""
        reject_unknown_fields(body, ("nonce", "pcrs"))
        nonce = parse_nonce(body.get("nonce"))
        pcrs = parse_pcrs(body.get("pcrs", list(QUOTE_PCRS)))
        tpm = self._tpm()
        if self.vmm.state.terminal:
            raise ApiError(HTTPStatus.CONFLICT, f"the VM is {self.vmm.state.value}")
        return tpm.quote(nonce, pcrs)

    def preload(self) -> None:
        """With a TPM, load a quote's modules now (tpm2_pytss is a C extension): the API thread's seccomp filter
        forbids mapping code."""
        from pyrovisor.devices.tpm import TPM_NAME

        if any(entry.name == TPM_NAME for entry in self.vmm.devices):
            from pyrovisor.tpm.attestation import quote_document  # noqa: F401
            from pyrovisor.tpm.commands import tss

            tss()

    def _tpm(self) -> VirtualTpm:
        from pyrovisor.devices.tpm import TPM_NAME, VirtualTpm

        device = next((entry.device for entry in self.vmm.devices if entry.name == TPM_NAME), None)
        if not isinstance(device, VirtualTpm):
            raise ApiError(HTTPStatus.CONFLICT, "this VM has no TPM (start it with --tpm)")
        return device


def parse_nonce(value: Any) -> bytes:
    """A nonce given as hex: 1 to 64 bytes."""
    if not isinstance(value, str):
        raise ApiError(HTTPStatus.BAD_REQUEST, "field 'nonce' must be a hex string")
    try:
        nonce = bytes.fromhex(value)
    except ValueError:
        raise ApiError(HTTPStatus.BAD_REQUEST, "field 'nonce' is not hex") from None
    if not 1 <= len(nonce) <= NONCE_MAX:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field 'nonce' must be 1 to {NONCE_MAX} bytes, not {len(nonce)}")
    return nonce


def parse_pcrs(value: Any) -> tuple[int, ...]:
    """PCR indices: a non-empty list of distinct PCRs 0-23, quoted in increasing order."""
    if not isinstance(value, list):
        raise ApiError(HTTPStatus.BAD_REQUEST, "field 'pcrs' must be a list of PCR numbers")
    try:
        return check_pcrs(value)
    except ConfigError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field 'pcrs': {exc.reason}") from None
