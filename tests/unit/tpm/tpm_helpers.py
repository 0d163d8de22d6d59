"""Helpers for the host-side TPM tests: skips with a reason, a booted swtpm (the VMM as firmware)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyrovisor.tpm.swtpm import Swtpm

KERNEL = b"\x7fELF a kernel image " * 100
INITRD = b"070701 an initial archive " * 50
CMDLINE = b"console=ttyS0 blk mode=verify; counter"


def need_swtpm() -> None:
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed (apt-get install swtpm swtpm-tools)")


def need_tss() -> None:
    pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed (pip install -e '.[tpm]')")
    pytest.importorskip("cryptography", reason="cryptography is not installed (pip install -e '.[tpm]')")


@dataclass
class Booted:
    """A swtpm the VMM booted as firmware: started, measured, with its attestation key."""

    swtpm: Swtpm
    commands: Any  # TpmCommands
    log: bytes
    ak_pem: bytes
    golden: dict[str, Any]


def boot(tpm: Swtpm, files: Path, kernel: bytes = KERNEL, initrd: bytes | None = INITRD,
         cmdline: bytes = CMDLINE) -> Booted:
    """Startup, measure_boot, the AK; golden values computed from files holding the same bytes."""
    from pyrovisor.tpm.attestation import golden_values
    from pyrovisor.tpm.commands import TpmCommands
    from pyrovisor.tpm.event_log import EventLog, measure_boot

    commands = TpmCommands(tpm.transmit)
    commands.startup()
    log = EventLog()
    measure_boot(log, commands.extend, kernel, "os.elf", initrd, "os.initrd", cmdline)
    ak = commands.attestation_key()
    files.mkdir(parents=True, exist_ok=True)
    (files / "os.elf").write_bytes(kernel)
    initrd_path = None
    if initrd is not None:
        initrd_path = files / "os.initrd"
        initrd_path.write_bytes(initrd)
    golden = golden_values(files / "os.elf", initrd_path, cmdline.decode())
    return Booted(tpm, commands, log.to_bytes(), ak, golden)
