"""Live migration between processes: continuity, integrity, failure at every phase, convergence."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from fault_proxy import CUT, FORWARD, FaultProxy, FrameLog
from harness import VmmProcess, continuous_ticks
from netns import netns_unavailable, two_hosts

from pyrovisor.api.client import ApiClient
from pyrovisor.errors import ControlError
from pyrovisor.migration.protocol import FRAME, PAGES, MessageType

pytestmark = pytest.mark.kvm

# counter + memcheck + memdirty: ticks, an 8 MiB pattern re-checked every tick, 32 MiB dirtied at ~40 MB/s.
WORKLOAD = "ticks=0 period_ms=10 buffer_mib=8 dirty_mib=32 dirty_rate=10000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Receiver:
    """`pyrovisor receive` in a child process."""

    def __init__(self, port: int, socket_path: Path, netns: str | None = None, host: str = "127.0.0.1") -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.socket_path = socket_path
        self.process = subprocess.Popen([*prefix, sys.executable, "-m", "pyrovisor", "receive", "--listen",
                                         f"{host}:{port}", "--api", str(socket_path), "--accept-timeout", "60"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.process.poll() is None:
            if self._listening(netns, host, port):
                return
            time.sleep(0.05)
        raise AssertionError(f"receiver did not start listening: {self.process.communicate(timeout=5)}")

    @staticmethod
    def _listening(netns: str | None, host: str, port: int) -> bool:
        command = ["ss", "-ltnH", f"sport = :{port}"]
        if netns:
            command = ["ip", "netns", "exec", netns, *command]
        return bool(subprocess.run(command, capture_output=True, text=True).stdout.strip())

    def api(self, timeout: float = 30) -> ApiClient:
        """The arrived VM's control API (its socket appears once the hand-over is complete)."""
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"the destination has no API socket: {self.process.poll()}")
            time.sleep(0.02)
        return ApiClient(self.socket_path)

    def stop(self) -> tuple[int, str, str]:
        self.api().post("/stop")
        return self.finish()

    def finish(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = self.process.communicate(timeout=timeout)
        return self.process.returncode, out, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def start_source(tmp_path: Path, args: str = WORKLOAD, memory: str = "128M") -> VmmProcess:
    source = VmmProcess(["run", "ticker", "--memory", memory, "--args", args], tmp_path / "source.sock")
    source.wait_for_tick(5)
    return source


def assert_source_survives(source: VmmProcess, receiver: Receiver) -> None:
    """After a failed migration: the source runs on with intact memory; the destination discarded the VM."""
    status = source.api.get("/migration")
    assert status["state"] == "failed" and status["error"], status
    assert source.api.get("/status")["state"] == "running"
    ticks_then = max(source.ticks())
    source.wait_for_tick(ticks_then + 5)
    code, out, err = receiver.finish()
    assert code == 1 and "pyrovisor: error:" in err, (code, err)
    assert "tick" not in out, "the destination never ran the guest"


def test_migration_between_processes_keeps_count_memory_and_checksum(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    source = start_source(tmp_path)
    try:
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "verify": True, "wait": True})
        assert status["state"] == "completed", status
        result = status["result"]
        assert result["memory_digest_source"] == result["memory_digest_destination"] is not None
        assert len(result["rounds"]) >= 2 and result["downtime_source_s"] < 5
        code, stderr = source.finish()
        assert code == 0 and "migrated away" in stderr
        last_source_tick = max(source.ticks())
        assert receiver.api().get("/status")["state"] == "running"
        time.sleep(0.5)
        code, out, err = receiver.stop()
        assert code == 0, err
        ticks = continuous_ticks(source.text(), out)  # the count continues exactly, across the two processes
        assert ticks[-1] > last_source_tick + 5
        assert "MISMATCH" not in out
    finally:
        source.kill()
        receiver.kill()


@pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
def test_migration_between_two_hosts(tmp_path: Path) -> None:
    """Source and destination in two network namespaces: the stream crosses a veth link, not loopback."""
    with two_hosts() as (first, second):
        port = free_port()
        receiver = Receiver(port, tmp_path / "dest.sock", netns=second.namespace, host=second.address)
        source = VmmProcess(["run", "ticker", "--memory", "128M", "--args", WORKLOAD], tmp_path / "source.sock",
                            prefix=first.prefix)
        try:
            source.wait_for_tick(5)
            with pytest.raises(OSError):  # separate network stacks: the root namespace has no route there
                socket.create_connection((second.address, port), timeout=1).close()
            status = source.api.post("/migrate", {"to": f"{second.address}:{port}", "wait": True})
            assert status["state"] == "completed", status
            assert source.finish()[0] == 0
            time.sleep(0.3)
            code, out, err = receiver.stop()
            assert code == 0, err
            ticks = continuous_ticks(source.text(), out)
            assert ticks[-1] > max(source.ticks())
        finally:
            source.kill()
            receiver.kill()


def test_migration_with_dirty_rings(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    source = VmmProcess(["run", "ticker", "--memory", "128M", "--args", WORKLOAD, "--dirty-ring", "1024"],
                        tmp_path / "source.sock")
    try:
        source.wait_for_tick(5)
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "verify": True, "wait": True})
        assert status["state"] == "completed", status
        assert status["result"]["memory_digest_source"] == status["result"]["memory_digest_destination"]
        assert source.finish()[0] == 0
        time.sleep(0.3)
        code, out, err = receiver.stop()
        assert code == 0, err
        continuous_ticks(source.text(), out)
    finally:
        source.kill()
        receiver.kill()


def test_migration_over_unix_socket_with_compression(tmp_path: Path) -> None:
    listen = tmp_path / "migrate.sock"
    process = subprocess.Popen([sys.executable, "-m", "pyrovisor", "receive", "--listen", f"unix:{listen}",
                                "--api", str(tmp_path / "dest.sock")], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    source = start_source(tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not listen.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        for compression in ("zstd",):
            status = source.api.post("/migrate", {"to": f"unix:{listen}", "compress": compression, "wait": True})
            assert status["state"] == "completed", status
            rounds = status["result"]["rounds"]
            raw_page_bytes = sum((r["pages_sent"] - r["zero_pages"]) * 4096 for r in rounds)
            assert status["result"]["bytes_on_wire"] < raw_page_bytes, "compression shrank the page data"
        source.finish()
        deadline = time.monotonic() + 20
        while not (tmp_path / "dest.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        ApiClient(tmp_path / "dest.sock").post("/stop")
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0 and "tick" in out, err
    finally:
        source.kill()
        if process.poll() is None:
            process.kill()


def cut_after_bytes(limit: int):  # round 0: partway through the first pages
    sent = [0]

    def rule(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
        sent[0] += len(header) + len(payload)
        return CUT if sent[0] > limit else FORWARD

    return rule


def cut_in_round(round_number: int):
    def rule(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
        return CUT if log.round_ends >= round_number and kind is MessageType.PAGES else FORWARD

    return rule


def cut_at_state(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
    return CUT if kind is MessageType.STATE else FORWARD


PATTERN_BUFFER = range(16 << 20, 24 << 20)  # ticker's pattern: written once, then only read


def corrupt_a_page(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
    """Flip a bit of a page nobody rewrites (a frame with a page the guest rewrites is excused and re-sent)."""
    if kind is MessageType.PAGES and len(payload) > PAGES.size and not log.cut:
        gpa = PAGES.unpack_from(payload)[0]
        if gpa in PATTERN_BUFFER:
            payload[PAGES.size + 100] ^= 0xFF  # the frame's checksum no longer matches
            log.cut = True  # only once
    return FORWARD


def newer_protocol(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
    if kind is MessageType.HELLO:
        text = payload.decode().replace('"version":1', '"version":99')
        payload[:] = text.encode()
        magic, version, message, _, sequence, _ = FRAME.unpack(header)
        header[:] = FRAME.pack(magic, version, message, len(payload), sequence, zlib.crc32(payload))
    return FORWARD


@pytest.mark.parametrize("rule, phase", [
    (cut_after_bytes(2 << 20), "round 0"),
    (cut_in_round(2), "a later round"),
    (cut_at_state, "stop-and-copy"),
    (corrupt_a_page, "checksum mismatch"),
    (newer_protocol, "destination refuses"),
], ids=["cut-round-0", "cut-later-round", "cut-stop-and-copy", "corrupt-page", "refused"])
def test_failure_at_any_phase_leaves_the_source_running(tmp_path: Path, rule, phase: str) -> None:
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    proxy = FaultProxy(("127.0.0.1", port), rule)
    # A low downtime limit and a steady dirtier guarantee several rounds before switching over.
    source = start_source(tmp_path)
    try:
        with pytest.raises(ControlError):
            status = source.api.post("/migrate", {"to": proxy.address, "downtime_ms": 5, "max_rounds": 6,
                                                  "wait": True})
            if status["state"] == "failed":
                raise ControlError("/migrate", status["error"])
        assert_source_survives(source, receiver)
        if phase == "a later round":
            assert proxy.log.round_ends >= 2
        if phase == "destination refuses":
            assert "version 99 is not supported" in source.api.get("/migration")["error"]
        if phase == "checksum mismatch":
            assert "checksum mismatch" in source.api.get("/migration")["error"]
        # The source can still be migrated afterwards: it was left clean.
        port2 = free_port()
        second = Receiver(port2, tmp_path / "dest2.sock")
        try:
            status = source.api.post("/migrate", {"to": f"127.0.0.1:{port2}", "wait": True})
            assert status["state"] == "completed", status
        finally:
            with contextlib.suppress(ControlError, AssertionError):
                second.stop()
            second.kill()
    finally:
        source.kill()
        receiver.kill()


def test_convergence_needs_auto_converge_on_a_slow_link(tmp_path: Path) -> None:
    fast_dirtier = "ticks=0 period_ms=10 buffer_mib=2 dirty_mib=64 dirty_rate=15000"  # ~60 MB/s
    link = 20_000_000  # 20 MB/s: slower than the guest dirties
    source = start_source(tmp_path, fast_dirtier, memory="128M")
    try:
        port = free_port()
        receiver = Receiver(port, tmp_path / "dest.sock")
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "max_bandwidth": link, "max_rounds": 6,
                                              "on_limit": "cancel", "downtime_ms": 300, "wait": True})
        assert status["state"] == "failed" and "did not converge" in status["error"], status
        assert_source_survives(source, receiver)

        port = free_port()
        receiver = Receiver(port, tmp_path / "dest2.sock")
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "max_bandwidth": link, "max_rounds": 30,
                                              "on_limit": "cancel", "downtime_ms": 300, "auto_converge": True,
                                              "wait": True})
        assert status["state"] == "completed", status
        throttles = [stats["throttle"] for stats in status["result"]["rounds"][:-1]]
        assert max(throttles) > 0.1, "auto-converge throttled the vCPUs"
        code, out, err = receiver.stop()
        assert code == 0 and "tick" in out, err
    finally:
        source.kill()
