"""The vTPM end to end: measured boot, quotes by the host and by the guest, verification against golden values,
and the TPM's state through snapshots and live migration (docs/vtpm.md)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from harness import VmmProcess
from test_migration import Receiver, free_port

from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig, TpmConfig
from pyrovisor.devices.tpm import TPM_NAME, VirtualTpm
from pyrovisor.snapshot.take import take_snapshot
from pyrovisor.tpm.attestation import golden_values, verify
from pyrovisor.vmm import Vmm

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(shutil.which("swtpm") is None,
                                                  reason="swtpm is not installed (apt-get install swtpm swtpm-tools)")]

KERNEL = guests_dir() / "os.elf"
INITRD = guests_dir() / "os-programs.img"
IDLE = "counter count=0 period_ms=50"
NONCE = bytes(range(1, 21))
OTHER_NONCE = bytes(range(21, 41))
PCR_LINE = re.compile(r"^tpm: pcr(\d+)=([0-9a-f]{64})$", re.MULTILINE)


def config_for(cmdline: str = IDLE, kernel: Path = KERNEL, initrd: Path = INITRD, **extra: Any) -> MachineConfig:
    return MachineConfig(kernel=kernel, initrd=initrd, memory_size=64 << 20, cmdline=cmdline,
                         tpm=extra.pop("tpm", TpmConfig()), **extra)


@contextmanager
def tpm_vm(config: MachineConfig, console: bytearray | None = None) -> Iterator[tuple[Vmm, VirtualTpm]]:
    output = console if console is not None else bytearray()
    with build_vm(config, output.extend) as vmm:
        tpm = vmm.devices[TPM_NAME]
        assert isinstance(tpm, VirtualTpm)
        yield vmm, tpm


def golden(cmdline: str = IDLE, kernel: Path = KERNEL, initrd: Path = INITRD) -> dict[str, Any]:
    return golden_values(kernel, initrd, cmdline)


def check(answer: dict[str, Any], expected: dict[str, Any], nonce: bytes = NONCE, ak: str | None = None) -> Any:
    """The verifier's verdict on a POST /tpm/quote answer."""
    key = (ak if ak is not None else answer["ak"]).encode()
    return verify(answer["quote"], base64.b64decode(answer["log"]), key, expected, nonce)


def failed(verdict: Any) -> dict[str, str]:
    return {item.name: item.detail for item in verdict.checks if not item.ok}


def extended(value: bytes, data: bytes) -> bytes:
    return hashlib.sha256(value + hashlib.sha256(data).digest()).digest()


# --- measured boot and quotes from the host -------------------------------------------------------------------
def test_a_clean_boot_verifies() -> None:
    with tpm_vm(config_for()) as (vmm, tpm):
        vmm.start()
        answer = tpm.quote(NONCE, (8, 9))
        vmm.stop()
    verdict = check(answer, golden())
    assert verdict.ok, failed(verdict)
    assert {item.name for item in verdict.checks} >= {"signature", "nonce", "kernel", "initrd", "cmdline"}


def test_the_pcrs_hold_the_measurements_in_order() -> None:
    """PCR 8 = extend(0, cmdline); PCR 9 = extend(extend(0, kernel), initrd), as replaying the log says."""
    with tpm_vm(config_for()) as (_vmm, tpm):
        values = tpm.read_pcrs((8, 9))
    zero = bytes(32)
    assert values[8] == extended(zero, IDLE.encode())
    assert values[9] == extended(extended(zero, KERNEL.read_bytes()), INITRD.read_bytes())


@pytest.mark.parametrize("changed", ["kernel", "initrd", "cmdline"])
def test_a_changed_measurement_fails_and_is_named(tmp_path: Path, changed: str) -> None:
    kernel, initrd, cmdline = KERNEL, INITRD, IDLE
    if changed == "kernel":
        kernel = tmp_path / "os.elf"
        kernel.write_bytes(KERNEL.read_bytes() + b"\0")  # one byte past the image: it still boots
    elif changed == "initrd":
        initrd = tmp_path / "os-programs.img"
        initrd.write_bytes(INITRD.read_bytes() + bytes(4096))
    else:
        cmdline = IDLE + " "
    with tpm_vm(config_for(cmdline, kernel, initrd)) as (_vmm, tpm):
        answer = tpm.quote(NONCE, (8, 9))
    verdict = check(answer, golden())
    assert not verdict.ok
    assert set(failed(verdict)) == {changed}, failed(verdict)
    assert check(answer, golden(cmdline, kernel, initrd)).ok


def test_a_replayed_quote_fails_on_its_nonce() -> None:
    with tpm_vm(config_for()) as (_vmm, tpm):
        answer = tpm.quote(NONCE, (8, 9))
    verdict = check(answer, golden(), nonce=OTHER_NONCE)
    assert set(failed(verdict)) == {"nonce"}, failed(verdict)


def test_a_quote_from_another_vm_fails_on_its_signature() -> None:
    with tpm_vm(config_for()) as (_first_vmm, first), tpm_vm(config_for()) as (_second_vmm, second):
        assert first.ak_public != second.ak_public
        answer = second.quote(NONCE, (8, 9))
        verdict = check(answer, golden(), ak=first.ak_public)
    assert "signature" in failed(verdict), failed(verdict)


def test_the_key_stays_in_a_state_directory_across_runs(tmp_path: Path) -> None:
    keys = []
    for _ in range(2):
        with tpm_vm(config_for(tpm=TpmConfig(state_dir=tmp_path))) as (_vmm, tpm):
            keys.append(tpm.ak_public)
            answer = tpm.quote(NONCE, (8, 9))
        assert (tmp_path / "ak.pub").read_text() == tpm.ak_public
        assert check(answer, golden(), ak=(tmp_path / "ak.pub").read_text()).ok
    assert keys[0] == keys[1] and keys[0].startswith("-----BEGIN PUBLIC KEY-----")


# --- the guest's side -----------------------------------------------------------------------------------------
def guest_output(program: str, **extra: Any) -> tuple[int | None, str, dict[int, bytes]]:
    """Run one `tpm` program in the OS guest; its exit code, console, and the PCRs the host reads afterwards."""
    console = bytearray()
    with tpm_vm(config_for(program, **extra), console) as (vmm, tpm):
        outcome = vmm.run(timeout=120)
        pcrs = tpm.read_pcrs((8, 9, 16))
    return outcome.exit_code, console.decode(errors="replace"), pcrs


def test_the_guest_extends_a_pcr_the_host_reads() -> None:
    code, console, pcrs = guest_output("tpm op=extend pcr=16 text=hello")
    assert code == 0, console[-2000:]
    expected = extended(bytes(32), b"hello")
    assert (16, expected.hex()) in [(int(index), value) for index, value in PCR_LINE.findall(console)], console
    assert pcrs[16] == expected


def test_the_guest_reads_the_boot_measurements_and_log() -> None:
    code, console, pcrs = guest_output("tpm op=pcrread pcrs=8,9")
    assert code == 0, console[-2000:]
    assert {int(index): bytes.fromhex(value) for index, value in PCR_LINE.findall(console)} == {8: pcrs[8],
                                                                                                9: pcrs[9]}
    code, console, _ = guest_output("tpm op=log")
    assert code == 0, console[-2000:]
    lines = re.findall(r"^tpm: log (\d+) ([0-9a-f]+)$", console, re.MULTILINE)
    length = int(re.search(r"^tpm: log length=(\d+)$", console, re.MULTILINE).group(1))  # type: ignore[union-attr]
    seen = b"".join(bytes.fromhex(chunk) for _offset, chunk in lines)
    with tpm_vm(config_for("tpm op=log")) as (_vmm, tpm):
        assert len(seen) == length == len(tpm.event_log)
        assert seen == tpm.event_log


def test_a_quote_made_by_the_guest_verifies() -> None:
    from pyrovisor.tpm.attestation import quote_document
    from pyrovisor.tpm.commands import Quote

    program = f"tpm op=quote nonce={NONCE.hex()} pcrs=8,9"
    console = bytearray()
    with tpm_vm(config_for(program), console) as (vmm, tpm):
        outcome = vmm.run(timeout=120)
        values = tpm.read_pcrs((8, 9))
        log, ak = tpm.event_log, tpm.ak_public
    text = console.decode(errors="replace")
    assert outcome.exit_code == 0, text[-2000:]
    attest = re.search(r"^tpm: quote attest=([0-9a-f]+)$", text, re.MULTILINE)
    signature = re.search(r"^tpm: quote signature=([0-9a-f]+)$", text, re.MULTILINE)
    assert attest and signature, text[-2000:]
    quote = Quote(attest=bytes.fromhex(attest.group(1)), signature=bytes.fromhex(signature.group(1)), pcrs=(8, 9),
                  nonce=NONCE)
    verdict = verify(quote_document(quote, values), log, ak.encode(), golden(program), NONCE)
    assert verdict.ok, failed(verdict)


# --- the TPM's state through snapshots and migration ------------------------------------------------------------
def test_a_restored_snapshot_keeps_pcrs_and_key_and_verifies(tmp_path: Path) -> None:
    program = "tpm op=extend pcr=16 text=before; " + IDLE
    console = bytearray()
    with tpm_vm(config_for(program), console) as (vmm, tpm):
        vmm.start()
        deadline = time.monotonic() + 60
        while "tpm: pcr16=" not in console.decode(errors="replace"):
            assert time.monotonic() < deadline and vmm.outcome is None, console.decode(errors="replace")[-2000:]
            time.sleep(0.05)
        vmm.pause()
        take_snapshot(vmm, tmp_path / "snap")
        before = tpm.read_pcrs((8, 9, 16))
        ak = tpm.ak_public
        # the source keeps its TPM after the snapshot
        assert check(tpm.quote(NONCE, (8, 9)), golden(program)).ok
        vmm.stop()
    with restore_vm(tmp_path / "snap", bytearray().extend) as restored:
        tpm = restored.devices[TPM_NAME]
        assert isinstance(tpm, VirtualTpm)
        restored.start()
        assert tpm.read_pcrs((8, 9, 16)) == before
        assert before[16] == extended(bytes(32), b"before")
        answer = tpm.quote(OTHER_NONCE, (8, 9))
        restored.stop()
    verdict = check(answer, golden(program), nonce=OTHER_NONCE, ak=ak)
    assert verdict.ok, failed(verdict)


def test_a_migrated_vm_keeps_its_tpm_and_verifies(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    source = VmmProcess(["run", "os", "--memory", "64M", "--vcpus", "1", "--tpm", "--args",
                         "tpm op=extend pcr=16 text=moved; " + IDLE], tmp_path / "source.sock")
    try:
        source.wait_for(lambda: "tpm: pcr16=" in source.text(), "the guest's extend", 60)
        before = source.api.post("/tpm/quote", {"nonce": NONCE.hex()})
        pcrs_before = source.api.get("/tpm")["pcrs"]
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "wait": True})
        assert status["state"] == "completed", status
        assert source.finish()[0] == 0
        destination = receiver.api()
        after = destination.post("/tpm/quote", {"nonce": OTHER_NONCE.hex()})
        pcrs_after = destination.get("/tpm")["pcrs"]
        destination.post("/stop", {})
        receiver.finish(timeout=60)
    finally:
        source.kill()
        receiver.kill()
    assert pcrs_after == pcrs_before and pcrs_after["16"] == extended(bytes(32), b"moved").hex()
    assert after["ak"] == before["ak"]
    expected = golden("tpm op=extend pcr=16 text=moved; " + IDLE)
    verdict = check(after, expected, nonce=OTHER_NONCE, ak=before["ak"])
    assert verdict.ok, failed(verdict)


# --- the commands a user types ------------------------------------------------------------------------------------
def pyrovisor(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_quote_golden_and_verify_from_the_command_line(tmp_path: Path) -> None:
    vm = VmmProcess(["run", "os", "--memory", "64M", "--tpm", "--args", IDLE], tmp_path / "vm.sock")
    try:
        vm.wait_for(lambda: "counter" in vm.text(), "the guest", 60)
        quote = pyrovisor("attest", "quote", str(tmp_path / "vm.sock"), "--nonce", NONCE.hex(), "--out",
                          str(tmp_path / "q.json"), "--log", str(tmp_path / "log.bin"), "--ak",
                          str(tmp_path / "ak.pub"))
        assert quote.returncode == 0, quote.stderr
    finally:
        vm.kill()
    made = pyrovisor("attest", "golden", str(KERNEL), str(INITRD), IDLE, "--out", str(tmp_path / "golden.json"))
    assert made.returncode == 0, made.stderr
    common = [str(tmp_path / "q.json"), "--log", str(tmp_path / "log.bin"), "--ak", str(tmp_path / "ak.pub"),
              "--expect", str(tmp_path / "golden.json")]
    good = pyrovisor("attest", "verify", *common, "--nonce", NONCE.hex(), "--json")
    assert good.returncode == 0, good.stdout + good.stderr
    assert json.loads(good.stdout)["ok"] is True
    replayed = pyrovisor("attest", "verify", *common, "--nonce", OTHER_NONCE.hex())
    assert replayed.returncode == 1 and "nonce" in replayed.stdout, replayed.stdout + replayed.stderr
    listed = pyrovisor("attest", "log", str(tmp_path / "log.bin"), "--json")
    assert listed.returncode == 0, listed.stderr


def test_a_missing_swtpm_is_one_line_naming_the_package(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))  # no swtpm on this PATH
    result = pyrovisor("run", "os", "--tpm", "--args", IDLE, env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "swtpm" in lines[0] and "apt-get install" in lines[0], result.stderr


@pytest.mark.parametrize(("flag", "message"), [("--tpm=dir", "expected dir=DIR"), ("--tpm=path=x", "unknown option"),
                                               ("--tpm=dir=/no/such/dir", "is not a directory")])
def test_bad_tpm_options_are_one_line(flag: str, message: str) -> None:
    result = pyrovisor("run", "os", flag, "--args", IDLE)
    assert result.returncode in (1, 2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_the_api_refuses_bad_quote_requests(tmp_path: Path) -> None:
    vm = VmmProcess(["run", "os", "--memory", "64M", "--tpm", "--args", IDLE], tmp_path / "vm.sock")
    plain = VmmProcess(["run", "os", "--memory", "64M", "--args", IDLE], tmp_path / "plain.sock")
    try:
        for body, words in (({"nonce": "zz"}, "not hex"), ({"nonce": ""}, "1 to 64 bytes"),
                            ({"nonce": "00" * 65}, "1 to 64 bytes"), ({"nonce": "01", "pcrs": [24]}, "0 to 23"),
                            ({"nonce": "01", "pcrs": [8, 8]}, "distinct"), ({"nonce": "01", "extra": 1}, "unknown")):
            with pytest.raises(Exception, match=words):
                vm.api.post("/tpm/quote", body)
        with pytest.raises(Exception, match="no TPM"):
            plain.api.post("/tpm/quote", {"nonce": "01"})
        assert vm.api.get("/tpm")["errors"] == 0
    finally:
        vm.kill()
        plain.kill()
