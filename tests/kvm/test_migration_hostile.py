"""Migrations that go wrong on the way or at the destination: the guest runs once, both users see why."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_proxy import CUT_INSIDE, FORWARD, FaultProxy, FrameLog, retag
from harness import OS_WORKLOAD, assert_guest_continued, beats_in, memcheck_passes
from test_migration import (
    Receiver,
    assert_migrated_and_continued,
    assert_source_survives,
    free_port,
    start_source,
)

from pyrovisor.arch.x86_64.cpuid import CpuidEntry, for_vcpu
from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.errors import KvmError, MigrationError, PyrovisorError
from pyrovisor.kvm import Kvm, VcpuFd
from pyrovisor.migration.auth import authenticate_source
from pyrovisor.migration.destination import receive
from pyrovisor.migration.protocol import PAGE_SIZE, PAGES, Connection, Encoding, MessageType, Role
from pyrovisor.migration.source import MigrationOptions, migrate
from pyrovisor.persist.codec import encode
from pyrovisor.vmm import Vmm

pytestmark = pytest.mark.kvm


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pyrovisor: error:")]


def ctl_migrate(socket_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyrovisor", "ctl", str(socket_path), "migrate", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


# --- the stream breaks or lies ------------------------------------------------------------------------------
def cut_inside_raw_pages(number: int) -> Callable[[MessageType, bytearray, bytearray, FrameLog], str]:
    """Half of the `number`th frame of several raw pages reaches the destination, which is writing them into
    guest memory, then the connection is cut."""
    seen = [0]

    def rule(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
        if kind is MessageType.PAGES and not log.cut:
            _, count, encoding, _ = PAGES.unpack_from(payload)
            if encoding == Encoding.RAW and count > 1:
                seen[0] += 1
                if seen[0] == number:
                    return CUT_INSIDE
        return FORWARD

    return rule


def pages_outside_ram(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
    """The first page frame moved to 1 TiB, its header checksum fixed up: well formed, but impossible."""
    if kind is MessageType.PAGES and not log.cut:
        _, count, encoding, digest_size = PAGES.unpack_from(payload)
        PAGES.pack_into(payload, 0, 1 << 40, count, encoding, digest_size)
        retag(header, payload)
        log.cut = True
    return FORWARD


@pytest.mark.parametrize("rule, destination_says", [
    (cut_inside_raw_pages(3), "migration failed during stream: connection closed by the peer"),
    (pages_outside_ram, "lie outside guest RAM"),
], ids=["cut-inside-page-frame", "pages-outside-ram"])
def test_the_real_error_reaches_both_users(tmp_path: Path, rule, destination_says: str) -> None:
    """Protocol 1's destination, cut while receiving pages into guest memory, failed to unmap that memory (a
    traceback still held views of it) and reported that instead of the cut."""
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    proxy = FaultProxy(("127.0.0.1", port), rule)
    source = start_source(tmp_path)
    try:
        status = source.api.post("/migrate", {"to": proxy.address, "wait": True})
        assert status["state"] == "failed", status
        assert_source_survives(source, receiver)
        _, _, err = receiver.finish()
        lines = error_lines(err)
        assert len(lines) == 1 and destination_says in lines[0], err
        assert "view" not in err and "BufferError" not in err and "unexpected" not in err, err
        if rule is pages_outside_ram:
            assert "during transfer: destination failed during stream: PAGES frame" in status["error"], status
            assert destination_says in status["error"], status
    finally:
        source.kill()
        receiver.kill()


# --- the destination cannot take the guest --------------------------------------------------------------------
def test_a_bad_api_socket_is_refused_before_listening(tmp_path: Path) -> None:
    """`receive --api` at a path that cannot become the API socket used to accept the VM, let the source stop,
    and then die: the guest was lost. Now it refuses before listening, and `ctl migrate` reports, on stderr, the
    failure to reach it while the source runs on."""
    taken = tmp_path / "not-a-socket"
    taken.write_text("a regular file")
    port = free_port()
    destination = subprocess.Popen([sys.executable, "-m", "pyrovisor", "receive", "--listen", f"127.0.0.1:{port}",
                                    "--api", str(taken), "--accept-timeout", "30"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    source = start_source(tmp_path)
    try:
        deadline = time.monotonic() + 20  # exited, or (before the fix) listening
        while destination.poll() is None and not Receiver._listening(None, "127.0.0.1", port):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        result = ctl_migrate(source.socket_path, "--to", f"127.0.0.1:{port}")
        assert source.api.get("/status")["state"] == "running", "the source keeps the guest"
        out, err = destination.communicate(timeout=60)
        assert destination.returncode == 1 and out == "", (out, err)
        assert err.splitlines() == [f"pyrovisor: error: invalid --api '{taken}': exists and is not a socket"], err
        # ctl migrate: one error line on stderr, nothing on stdout, exit code 1.
        assert result.returncode == 1 and result.stdout == "", result
        assert result.stderr.splitlines() == [f"pyrovisor: error: migration failed during connect: cannot reach "
                                              f"127.0.0.1:{port}: Connection refused; the VM keeps running here"], result
        json_result = ctl_migrate(source.socket_path, "--to", f"127.0.0.1:{port}", "--json")
        assert json_result.returncode == 1 and json.loads(json_result.stdout)["state"] == "failed", json_result
        assert len(json_result.stderr.splitlines()) == 1 and json_result.stderr.startswith("pyrovisor: error:")
        source.wait_for_beat(max(source.beats()) + 5)
    finally:
        source.kill()
        if destination.poll() is None:
            destination.kill()
            destination.communicate()


def receive_here(tmp_path: Path, source: Callable[[str], Any], **options: Any) -> tuple[Any, BaseException | None]:
    """`receive()` in this process (so that it can be patched; on the main thread, where the first VM must be
    made) while `source(address)` runs on another thread once it listens: the source's result, receive's error."""
    address = f"unix:{tmp_path / 'migrate.sock'}"
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(source(address)), daemon=True)
    error: BaseException | None = None
    try:
        receive(address, lambda data: None, accept_timeout=30, on_listening=thread.start, **options).vmm.close()
    except Exception as exc:
        error = exc
    thread.join(120)
    assert result, "the source finished"
    return result[0], error


def test_a_failure_after_the_guest_started_here_resumes_the_source(tmp_path: Path) -> None:
    source = start_source(tmp_path)
    started: list[Vmm] = []

    def fail_to_attach(vmm: Vmm) -> None:
        started.append(vmm)
        assert vmm.state.value == "running"
        raise PyrovisorError("cannot attach the control API here")

    try:
        status, error = receive_here(tmp_path, lambda address: source.api.post("/migrate", {"to": address,
                                                                                             "wait": True}),
                                     on_started=fail_to_attach)
        assert status["state"] == "failed" and "cannot attach the control API here" in status["error"], status
        assert isinstance(error, PyrovisorError) and "cannot attach" in str(error)
        assert started and started[0].closed, "the destination's copy was discarded"
        assert source.api.get("/status")["state"] == "running"
        source.wait_for_beat(max(source.beats()) + 5)
        memcheck_passes(source.text())
    finally:
        source.kill()


def without_sse2(entries: tuple[CpuidEntry, ...]) -> tuple[CpuidEntry, ...]:
    """A host that lacks fpu and sse2 (leaf 1 EDX bits 0 and 26)."""
    return tuple(dataclasses.replace(entry, edx=entry.edx & ~(1 | 1 << 26)) if (entry.function, entry.index) == (1, 0)
                 else entry for entry in entries)


def test_a_destination_without_a_cpu_feature_the_guest_saw_refuses_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real_supported, real_cpuid = Kvm.get_supported_cpuid, VcpuFd.get_cpuid2
    monkeypatch.setattr(Kvm, "get_supported_cpuid", lambda self: without_sse2(real_supported(self)))
    # kvm_pvm answers KVM_GET_CPUID2 with the host's features whatever was set: patch what a vCPU reports too.
    monkeypatch.setattr(VcpuFd, "get_cpuid2", lambda self, capacity=256: without_sse2(real_cpuid(self, capacity)))
    source = start_source(tmp_path)
    try:
        result, error = receive_here(tmp_path, lambda address: ctl_migrate(source.socket_path, "--to", address))
        refusal = "destination refused: this host's CPU lacks features the guest saw: fpu, sse2"
        assert result.returncode == 1 and refusal in result.stderr and len(result.stderr.splitlines()) == 1, result
        assert isinstance(error, MigrationError) and "lacks features the guest saw: fpu, sse2" in str(error)
        assert source.api.get("/status")["state"] == "running"
    finally:
        source.kill()


def host_cpu(lower_by: int) -> tuple[tuple[CpuidEntry, ...], int, bool]:
    """What a guest here sees (CPUID, TSC kHz), and whether KVM here can set a TSC `lower_by` kHz slower."""
    with Kvm() as kvm:
        vm = kvm.create_vm()
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.set_cpuid2(for_vcpu(kvm.get_supported_cpuid(), 0))
            cpuid, khz = vcpu.get_cpuid2(), vcpu.get_tsc_khz()
            try:
                vcpu.set_tsc_khz(khz - lower_by)
                slower = True
            except KvmError:
                slower = False
        finally:
            vcpu.close()
            vm.close()
    return cpuid, khz, slower


@pytest.mark.parametrize("rate", ["higher than KVM can set", "lower than this host's"])
def test_a_tsc_rate_this_host_cannot_give_is_refused(tmp_path: Path, rate: str) -> None:
    cpuid, khz, slower = host_cpu(100_000)
    wanted = 1 << 40 if rate.startswith("higher") else khz - 100_000
    if rate.startswith("lower") and slower:
        pytest.skip("this host's KVM scales the TSC down")
    config = MachineConfig(kernel=guests_dir() / "os.elf", memory_size=64 << 20)

    def hello(address: str) -> dict[str, Any]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(address.removeprefix("unix:"))
        connection = Connection(sock, Role.SOURCE)
        authenticate_source(connection, None)
        connection.send_json(MessageType.HELLO, {
            "protocol": "pyrovisor-migration", "version": 2, "page_size": PAGE_SIZE, "config": encode(config),
            "ram": [[0, 64 << 20]], "cpuid": [list(dataclasses.astuple(entry)) for entry in cpuid], "tsc_khz": wanted})
        welcome = connection.receive().json()
        connection.close()
        return welcome

    welcome, error = receive_here(tmp_path, hello)
    assert welcome["accepted"] is False
    assert welcome["reason"].startswith(f"the guest's TSC runs at {wanted} kHz; this host's runs at {khz} kHz and "
                                        "KVM cannot give it that rate"), welcome
    assert isinstance(error, MigrationError) and "TSC" in str(error)


# --- authentication ---------------------------------------------------------------------------------------------
def key_file(path: Path, key: bytes) -> Path:
    path.write_bytes(key)
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def os_guest_here() -> Iterator[tuple[Vmm, bytearray]]:
    """The OS workload in a VM of this process (the source, migrated with `migrate()`), once it beats."""
    directory = guests_dir()
    config = MachineConfig(kernel=directory / "os.elf", initrd=directory / "os-programs.img", memory_size=128 << 20,
                           vcpus=2, cmdline=OS_WORKLOAD)
    output = bytearray()
    with build_vm(config, output.extend) as vmm:
        vmm.start()
        deadline = time.monotonic() + 30
        while len(beats_in(output.decode(errors="replace").splitlines())) < 5:
            assert time.monotonic() < deadline, output.decode(errors="replace")[-2000:]
            time.sleep(0.05)
        yield vmm, output


def test_migration_with_a_pre_shared_key(tmp_path: Path) -> None:
    """Both ends hold the key: authenticated frames, keyed page digests, compressed pages, memory verified."""
    psk = key_file(tmp_path / "psk", os.urandom(32).hex().encode() + b"\n")
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock", host="0.0.0.0", extra=("--psk-file", str(psk)))
    try:
        with os_guest_here() as (vmm, output):
            result = migrate(vmm, f"127.0.0.1:{port}", MigrationOptions(psk_file=psk, compression="zstd",
                                                                        verify_memory=True))
            assert vmm.state.value == "migrated-away"
            before = output.decode(errors="replace")
        assert result.memory_digest_source == result.memory_digest_destination is not None
        time.sleep(0.5)
        code, out, err = receiver.stop()
        assert code == 0, err
        assert_guest_continued(before, out)
    finally:
        receiver.kill()


def test_a_different_key_is_refused_by_both_and_the_source_runs_on(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock", extra=("--psk-file", str(key_file(tmp_path / "a", b"k" * 32))))
    try:
        with os_guest_here() as (vmm, output):
            with pytest.raises(MigrationError, match="does not hold the same pre-shared key"):
                migrate(vmm, f"127.0.0.1:{port}", MigrationOptions(psk_file=key_file(tmp_path / "b", b"j" * 32)))
            assert vmm.state.value == "running"
            beats = len(beats_in(output.decode(errors="replace").splitlines()))
            time.sleep(0.3)
            assert len(beats_in(output.decode(errors="replace").splitlines())) > beats
        code, out, err = receiver.finish()
        assert code == 1 and out == "", err
        lines = error_lines(err)
        assert len(lines) == 1 and "fails authentication" in lines[0], err
    finally:
        receiver.kill()


def test_ctl_migrate_with_a_pre_shared_key(tmp_path: Path) -> None:
    psk = key_file(tmp_path / "psk", b"a shared secret of some length")
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock", extra=("--psk-file", str(psk)))
    source = start_source(tmp_path)
    try:
        result = ctl_migrate(source.socket_path, "--to", f"127.0.0.1:{port}", "--psk-file", str(psk))
        assert result.returncode == 0 and result.stderr == "", result
        assert_migrated_and_continued(source, receiver)
    finally:
        source.kill()
        receiver.kill()
