"""The vTPM: the CRB register window in front of a swtpm process, with the boot measurements and the
attestation key the VMM made as the VM's firmware; saved with the TPM's own state."""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyrovisor.devices.tpm_crb import DATA_BUFFER_SIZE, TpmCrb, TpmCrbState
from pyrovisor.errors import DeviceError, TpmError
from pyrovisor.tpm.swtpm import Swtpm, SwtpmState

log = logging.getLogger(__name__)

TPM_NAME = "tpm0"
AK_FILE = "ak.pub"  # in the state directory: the attestation key's public part, for verifiers


@dataclass(frozen=True)
class VirtualTpmState:
    crb: TpmCrbState | None = None  # None: a CRB fresh from reset
    swtpm: SwtpmState | None = None  # None: a TPM not yet started (the boot measures into it)
    state_dir: str = ""  # where swtpm keeps a new VM's keys across runs; "": a private temporary directory
    ak_public: str = ""  # PEM of the attestation key once the firmware made it (the event log is the CRB's)


@dataclass(frozen=True)
class BootMeasurement:
    """What the VMM measures before the guest runs: the files' bytes and the command line the guest gets."""

    kernel: bytes
    kernel_name: str
    initrd: bytes | None
    initrd_name: str
    cmdline: bytes


class VirtualTpm:
    """A bus device (the CRB window) owning its swtpm; `transmit` is the one way to the TPM."""

    def __init__(self, state: VirtualTpmState) -> None:
        directory = Path(state.state_dir) if state.state_dir and state.swtpm is None else None
        self._swtpm = Swtpm.start(directory, state.swtpm, buffer_size=DATA_BUFFER_SIZE)
        try:
            self._crb = TpmCrb(self._swtpm.transmit, state.crb)
        except BaseException:
            self._swtpm.close()
            raise
        self._state_dir = state.state_dir
        self.ak_public = state.ak_public

    # --- the bus side (vCPU threads) ---
    def read(self, offset: int, size: int) -> int:
        return self._crb.read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._crb.write(offset, size, value)

    @property
    def event_log(self) -> bytes:
        """The boot's TCG event log, as the guest reads it in the CRB's log window."""
        return self._crb.log

    @property
    def commands(self) -> int:
        return int(self._crb.commands)

    @property
    def errors(self) -> int:
        return int(self._crb.errors)

    def transmit(self, command: bytes) -> bytes:
        return self._swtpm.transmit(command)

    # --- the firmware side (the builder, before the guest runs) ---
    def measure_boot(self, boot: BootMeasurement) -> None:
        """TPM2_Startup, the boot measured into PCRs 8 and 9 with its event log, and the attestation key
        (created in the TPM the first time, kept at a persistent handle)."""
        from pyrovisor.tpm.commands import TpmCommands
        from pyrovisor.tpm.event_log import EventLog, measure_boot

        commands = TpmCommands(self.transmit)
        try:
            commands.startup()
            event_log = EventLog()
            measure_boot(event_log, commands.extend, boot.kernel, boot.kernel_name, boot.initrd, boot.initrd_name,
                         boot.cmdline)
            self.ak_public = commands.attestation_key().decode("ascii")
        finally:
            commands.close()
        self._crb.set_log(event_log.to_bytes())
        if self._state_dir:
            _write_ak(Path(self._state_dir) / AK_FILE, self.ak_public)

    # --- the API side ---
    def quote(self, nonce: bytes, pcrs: Sequence[int]) -> dict[str, Any]:
        """A quote by the attestation key over `pcrs` with the caller's nonce, with the event log and the key."""
        from pyrovisor.tpm.attestation import quote_document
        from pyrovisor.tpm.commands import TpmCommands

        if not self.ak_public:
            raise TpmError("quote", "the VM has no attestation key (its boot was not measured)")
        commands = TpmCommands(self.transmit)
        try:
            quote = commands.quote(nonce, pcrs)
            values = commands.read_pcrs(pcrs)
        finally:
            commands.close()
        return {"quote": quote_document(quote, values), "log": base64.b64encode(self.event_log).decode("ascii"),
                "ak": self.ak_public}

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        from pyrovisor.tpm.commands import TpmCommands

        commands = TpmCommands(self.transmit)
        try:
            return commands.read_pcrs(pcrs)
        finally:
            commands.close()

    # --- persistence ---
    def save(self) -> VirtualTpmState:
        return VirtualTpmState(crb=self._crb.save(), swtpm=self._swtpm.save_state(), state_dir=self._state_dir,
                               ak_public=self.ak_public)

    def close(self) -> None:
        self._swtpm.close()


def _write_ak(path: Path, pem: str) -> None:
    """The attestation key's public part beside swtpm's state, replaced whole (never half written)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(pem)
        temporary.replace(path)
    except OSError as exc:
        raise DeviceError(TPM_NAME, f"cannot write {path}: {exc.strerror}") from None


def fresh_state(state_dir: Path | None) -> VirtualTpmState:
    """A new VM's vTPM: nothing saved yet, swtpm's keys kept in `state_dir` if one is given."""
    return VirtualTpmState(state_dir=str(state_dir) if state_dir is not None else "")


__all__ = ["AK_FILE", "TPM_NAME", "BootMeasurement", "VirtualTpm", "VirtualTpmState", "fresh_state"]
