"""The OS guest's TPM driver against QEMU's tpm-crb (`-M microvm` with KVM) on a swtpm: the same program finds
the interface, extends a PCR and makes a quote that pyrovisor's verifier accepts; so the driver speaks the CRB as
the reference device does, not only as pyrovisor's does."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_os_virtio_qemu import MICROVM, run_qemu

from pyrovisor.catalog import guests_dir
from pyrovisor.tpm.attestation import golden_values, quote_document, verify
from pyrovisor.tpm.commands import Quote, TpmCommands
from pyrovisor.tpm.event_log import EventLog
from pyrovisor.tpm.swtpm import Swtpm

QEMU = "qemu-system-x86_64"
pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed (apt-get install qemu-system-x86)"),
    pytest.mark.skipif(shutil.which("swtpm") is None, reason="swtpm is not installed (apt-get install swtpm)"),
]
NONCE = bytes(range(7, 27))


@contextmanager
def qemu_tpm(state: Path) -> Iterator[list[str]]:
    """A swtpm on `state` (already holding the attestation key) for QEMU's tpm-crb; QEMU's -device arguments."""
    control = state / "qemu-control.sock"
    process = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl",
                                f"type=unixio,path={control}", "--terminate", "--flags", "startup-clear"], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not control.exists():
            assert time.monotonic() < deadline and process.poll() is None, "swtpm did not start"
            time.sleep(0.01)
        yield ["-chardev", f"socket,id=tpm,path={control}", "-tpmdev", "emulator,id=tpm0,chardev=tpm",
               "-device", "tpm-crb,tpmdev=tpm0"]
    finally:
        process.kill()
        process.wait()


def provision(state: Path) -> bytes:
    """The attestation key made in a TPM as pyrovisor's firmware makes it; its PEM."""
    with Swtpm.start(state) as swtpm:
        commands = TpmCommands(swtpm.transmit)
        commands.startup()
        key = commands.attestation_key()
        commands.close()
    return key


def test_the_driver_quotes_and_extends_through_qemus_tpm_crb(tmp_path: Path) -> None:
    key = provision(tmp_path)
    program = f"tpm op=info,extend,quote pcr=16 text=qemu pcrs=8,9 nonce={NONCE.hex()}"
    with qemu_tpm(tmp_path) as devices:
        code, console = run_qemu(program, devices, MICROVM)
    assert code == 0, console[-3000:]
    assert "PASS: tpm 1: CRB interface at 0xfed40000" in console
    expected = hashlib.sha256(bytes(32) + hashlib.sha256(b"qemu").digest()).digest()
    assert re.search(rf"^tpm: pcr16={expected.hex()}$", console, re.MULTILINE), console[-3000:]
    attest = re.search(r"^tpm: quote attest=([0-9a-f]+)$", console, re.MULTILINE)
    signature = re.search(r"^tpm: quote signature=([0-9a-f]+)$", console, re.MULTILINE)
    assert attest and signature, console[-3000:]
    quote = Quote(attest=bytes.fromhex(attest[1]), signature=bytes.fromhex(signature[1]), pcrs=(8, 9),
                  nonce=NONCE)
    # QEMU measures nothing: PCRs 8 and 9 are zero, as an empty log replays. The quote itself is sound; only
    # the boot's measurements are missing, and the verifier says exactly that.
    golden = golden_values(guests_dir() / "os.elf", guests_dir() / "os-programs.img", program)
    verdict = verify(quote_document(quote, {8: bytes(32), 9: bytes(32)}), EventLog().to_bytes(), key, golden,
                     NONCE)
    assert {check.name for check in verdict.checks if not check.ok} == {"kernel", "initrd", "cmdline"}, verdict
    assert {"signature", "nonce", "pcr digest"} <= {check.name for check in verdict.checks if check.ok}
