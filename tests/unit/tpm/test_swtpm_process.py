"""The swtpm process: start, the data and control channels, failures that raise instead of hanging, cleanup."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tpm_helpers import need_swtpm

from deadlines import deadline
from pyrovisor.errors import MissingToolError, TpmError
from pyrovisor.persist.codec import decode, encode
from pyrovisor.tpm import swtpm as swtpm_module
from pyrovisor.tpm.swtpm import BlobKind, Swtpm, SwtpmState, find_swtpm

TPM_ST_NO_SESSIONS = 0x8001
TPM_CC_STARTUP = 0x144
TPM_CC_GET_RANDOM = 0x17B
TPM_RC_SUCCESS = 0
TPM_RC_INITIALIZE = 0x100
TPM_RC_COMMAND_SIZE = 0x142


def command(code: int, body: bytes = b"") -> bytes:
    return struct.pack(">HII", TPM_ST_NO_SESSIONS, 10 + len(body), code) + body


def response_code(response: bytes) -> int:
    _, size, code = struct.unpack_from(">HII", response)
    assert size == len(response)
    return int(code)


def startup(tpm: Swtpm) -> bytes:
    return tpm.transmit(command(TPM_CC_STARTUP, b"\x00\x00"))  # TPM_SU_CLEAR


def get_random(tpm: Swtpm, count: int = 16) -> bytes:
    response = tpm.transmit(command(TPM_CC_GET_RANDOM, struct.pack(">H", count)))
    assert response_code(response) == TPM_RC_SUCCESS
    (size,) = struct.unpack_from(">H", response, 10)
    assert size == count
    return response[12:]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_find_swtpm_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swtpm_module.shutil, "which", lambda name: None)
    with pytest.raises(MissingToolError, match="apt-get install swtpm swtpm-tools"):
        find_swtpm()


def test_blob_kinds_are_swtpms_numbers() -> None:
    assert (BlobKind.PERMANENT, BlobKind.VOLATILE, BlobKind.SAVESTATE) == (1, 2, 3)


def test_state_survives_the_persist_codec() -> None:
    state = SwtpmState(permanent=b"\x00perm\xff", volatile=b"vol" * 100, savestate=b"")
    assert decode(SwtpmState, encode(state)) == state


def test_a_fresh_tpm_is_initialised_but_not_started(swtpm: Swtpm) -> None:
    # Before TPM2_Startup every command is refused with TPM_RC_INITIALIZE; Startup then succeeds once.
    assert response_code(swtpm.transmit(command(TPM_CC_GET_RANDOM, b"\x00\x08"))) == TPM_RC_INITIALIZE
    assert response_code(startup(swtpm)) == TPM_RC_SUCCESS
    assert response_code(startup(swtpm)) == TPM_RC_INITIALIZE
    assert len(get_random(swtpm)) == 16


@pytest.mark.parametrize("bad", [b"", b"\x80\x01\x00", command(TPM_CC_GET_RANDOM, b"\x00\x08")[:-1] + b"",
                                 struct.pack(">HII", 0x8001, 99, TPM_CC_GET_RANDOM) + b"\x00\x08"])
def test_a_command_whose_size_is_wrong_gets_a_tpm_answer(swtpm: Swtpm, bad: bytes) -> None:
    assert response_code(swtpm.transmit(bad)) == TPM_RC_COMMAND_SIZE
    assert response_code(startup(swtpm)) == TPM_RC_SUCCESS  # the channel is still in step


def test_close_leaves_no_process_and_no_files(tmp_path: Path) -> None:
    need_swtpm()
    tpm = Swtpm.start()
    pid, runtime = tpm.pid, tpm._runtime_dir
    assert (runtime / "data").exists() and (runtime / "control").exists()
    assert tpm.state_dir.is_relative_to(runtime)
    tpm.close()
    tpm.close()  # idempotent
    assert gone(pid)
    assert not runtime.exists()
    with pytest.raises(TpmError, match="closed"):
        tpm.transmit(command(TPM_CC_STARTUP, b"\x00\x00"))


def test_a_given_state_dir_is_kept_and_only_it(tmp_path: Path) -> None:
    need_swtpm()
    state_dir = tmp_path / "tpm"
    with Swtpm.start(state_dir) as tpm:
        runtime = tpm._runtime_dir
        startup(tpm)
    assert not runtime.exists()
    # swtpm's own files (its state and the lock it takes on the directory), no socket, no log
    assert sorted(path.name for path in state_dir.iterdir()) == [".lock", "tpm2-00.permall"]


def test_two_swtpms_cannot_share_a_state_dir(tmp_path: Path) -> None:
    need_swtpm()
    with Swtpm.start(tmp_path), pytest.raises(TpmError, match=r"init: swtpm refused.*lock"):
        Swtpm.start(tmp_path)


def test_start_time_is_small() -> None:
    need_swtpm()
    begin = time.perf_counter()
    with Swtpm.start():
        elapsed = time.perf_counter() - begin
    assert elapsed < 5  # measured about 5 ms; a generous bound for a loaded machine


def test_a_killed_swtpm_raises_instead_of_hanging(swtpm: Swtpm) -> None:
    startup(swtpm)
    os.kill(swtpm.pid, signal.SIGKILL)
    with deadline(10), pytest.raises(TpmError, match="killed by signal 9"):
        get_random(swtpm)
    with pytest.raises(TpmError, match="unusable"):  # and keeps saying so
        get_random(swtpm)
    with pytest.raises(TpmError, match="unusable"):
        swtpm.save_state()


def test_a_hung_swtpm_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    need_swtpm()
    monkeypatch.setattr(swtpm_module, "TRANSMIT_TIMEOUT_S", 0.5)
    tpm = Swtpm.start()
    pid, runtime = tpm.pid, tpm._runtime_dir
    try:
        startup(tpm)
        os.kill(pid, signal.SIGSTOP)
        with deadline(10), pytest.raises(TpmError, match=r"did not answer within 0\.5 s"):
            get_random(tpm)
    finally:
        with deadline(10):
            tpm.close()  # kills the stopped process rather than waiting for it
    assert gone(pid)
    assert not runtime.exists()


def test_swtpm_dies_with_its_parent(tmp_path: Path) -> None:
    """--terminate: when the VMM process dies (even by SIGKILL) its data connection closes and swtpm exits."""
    need_swtpm()
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time\n"
                               "from pyrovisor.tpm.swtpm import Swtpm\n"
                               "tpm = Swtpm.start()\n"
                               "print(tpm.pid, tpm._runtime_dir, flush=True)\n"
                               "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout is not None
    pid_text, runtime = child.stdout.readline().split()
    pid = int(pid_text)
    child.kill()
    child.wait()
    try:
        end = time.monotonic() + 10
        while not gone(pid) and time.monotonic() < end:
            time.sleep(0.02)
        assert gone(pid), "swtpm outlived its parent"
    finally:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", runtime], check=False)  # a SIGKILLed parent cannot clean up


def test_transmit_is_safe_from_many_threads(swtpm: Swtpm) -> None:
    startup(swtpm)
    failures: list[BaseException] = []

    def work(count: int) -> None:
        try:
            for _ in range(50):
                assert len(get_random(swtpm, count)) == count
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(8 + index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures


def test_save_state_keeps_the_tpm_running(swtpm: Swtpm) -> None:
    startup(swtpm)
    state = swtpm.save_state()
    assert state.permanent and state.volatile and state.savestate == b""  # a TPM 2.0 has no save state
    assert len(get_random(swtpm)) == 16  # still started, still answering
    assert response_code(startup(swtpm)) == TPM_RC_INITIALIZE


def test_a_restored_tpm_continues_started(swtpm: Swtpm) -> None:
    startup(swtpm)
    with Swtpm.start(state=swtpm.save_state()) as copy:
        # no Startup needed (nor allowed): the copy resumes from the volatile state
        assert response_code(startup(copy)) == TPM_RC_INITIALIZE
        assert len(get_random(copy)) == 16


def test_a_state_that_is_not_swtpms_is_refused() -> None:
    need_swtpm()
    with pytest.raises(TpmError, match="load the permanent state"):
        Swtpm.start(state=SwtpmState(permanent=b"garbage" * 10, volatile=b"", savestate=b""))


def test_set_locality(swtpm: Swtpm) -> None:
    swtpm.set_locality(0)
    with pytest.raises(TpmError, match="locality 5"):
        swtpm.set_locality(5)
