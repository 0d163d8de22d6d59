"""Live migration of the OS guest between processes: continuity, integrity, failure at every phase,
convergence. The guest runs `counter` (liveness), `memcheck` (integrity) and `memdirty` (the load)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_proxy import CUT, FORWARD, FaultProxy, FrameLog, retag
from harness import (
    OS_WORKLOAD,
    VmmProcess,
    assert_guest_continued,
    continuous_beats,
    continuous_ticks,
    memcheck_passes,
    os_run_args,
)
from netns import netns_unavailable, two_hosts

from pyrovisor.api.client import ApiClient
from pyrovisor.errors import ControlError
from pyrovisor.migration.protocol import FRAME, PAGES, Encoding, MessageType

pytestmark = pytest.mark.kvm

# The ticker guest (no kernel mode): ticks, an 8 MiB pattern re-checked every tick, 32 MiB dirtied at ~40 MB/s.
TICKER_WORKLOAD = "ticks=0 period_ms=10 buffer_mib=8 dirty_mib=32 dirty_rate=10000"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_migrated_and_continued(source: VmmProcess, receiver: Receiver, check_guest: bool = True) -> str:
    """The source exited cleanly after the hand-over, and the OS guest went on at the destination; returns
    the destination's console."""
    assert source.finish()[0] == 0
    time.sleep(0.5)
    code, out, err = receiver.stop()
    assert code == 0, err
    if check_guest:
        assert_guest_continued(source.text(), out)
    return out


class Receiver:
    """`pyrovisor receive` in a child process."""

    def __init__(self, port: int, socket_path: Path, netns: str | None = None, host: str = "127.0.0.1",
                 extra: tuple[str, ...] = ()) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.socket_path = socket_path
        self.process = subprocess.Popen([*prefix, sys.executable, "-m", "pyrovisor", "receive", "--listen",
                                         f"{host}:{port}", "--api", str(socket_path), "--accept-timeout", "60",
                                         *extra],
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
        """The arrived VM's control API (the socket is claimed before listening; the VM's endpoints answer once
        the hand-over is complete)."""
        deadline = time.monotonic() + timeout
        client = ApiClient(self.socket_path)
        while True:
            try:
                client.get("/status")
                return client
            except ControlError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(f"the destination's VM has no API: {self.process.poll()}") from None
            time.sleep(0.02)

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


def start_source(tmp_path: Path, programs: str = OS_WORKLOAD, prefix: tuple[str, ...] = ()) -> VmmProcess:
    """The OS guest with `programs` on two vCPUs, once its dirtier runs and the counter beats."""
    source = VmmProcess(os_run_args(programs), tmp_path / "source.sock", prefix=prefix)
    source.wait_for_os_workload()
    return source


def assert_source_survives(source: VmmProcess, receiver: Receiver) -> None:
    """After a failed migration: the source runs on with intact memory; the destination discarded the VM."""
    status = source.api.get("/migration")
    assert status["state"] == "failed" and status["error"], status
    assert source.api.get("/status")["state"] == "running"
    source.wait_for_beat(max(source.beats()) + 5)
    memcheck_passes(source.text())
    code, out, err = receiver.finish()
    assert code == 1 and "pyrovisor: error:" in err, (code, err)
    assert "counter" not in out, "the destination never ran the guest"


def test_migration_between_processes_keeps_count_memory_and_checksum(tmp_path: Path) -> None:
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    source = start_source(tmp_path)
    try:
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "verify": True, "wait": True})
        assert status["state"] == "completed", status
        result = status["result"]
        # All of guest memory hashed at the pause on the source and at the resume on the destination.
        assert result["memory_digest_source"] == result["memory_digest_destination"] is not None
        rounds = result["rounds"]
        assert len(rounds) >= 2 and rounds[0]["dirty_pages"] > 0, "memdirty dirtied pages during round 0"
        assert result["downtime_source_s"] < 5
        code, stderr = source.finish()
        assert code == 0 and "migrated away" in stderr
        assert receiver.api().get("/status")["state"] == "running"
        time.sleep(1.0)
        code, out, err = receiver.stop()
        assert code == 0, err
        assert_guest_continued(source.text(), out, beats_after=20)
        # No jump in guest time either: the beat across the hand-over comes one period (20 ms, sleeps end on
        # 10 ms ticks) after the last one on the source, plus at most the pause.
        beats = dict(continuous_beats(source.text(), out))
        last = max(source.beats())
        gap_ms = beats[last + 1] - beats[last]
        assert gap_ms <= 40 + result["downtime_destination_s"] * 1e3, gap_ms
        assert "memdirty" in out, "the dirtier went on at the destination"
    finally:
        source.kill()
        receiver.kill()


@pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
def test_migration_between_two_hosts(tmp_path: Path) -> None:
    """Source and destination in two network namespaces: the stream crosses a veth link, not loopback."""
    with two_hosts() as (first, second):
        port = free_port()
        receiver = Receiver(port, tmp_path / "dest.sock", netns=second.namespace, host=second.address,
                            extra=("--insecure",))  # not loopback: allowed without a key only so
        source = start_source(tmp_path, prefix=tuple(first.prefix))
        try:
            with pytest.raises(OSError):  # separate network stacks: the root namespace has no route there
                socket.create_connection((second.address, port), timeout=1).close()
            status = source.api.post("/migrate", {"to": f"{second.address}:{port}", "wait": True})
            assert status["state"] == "completed", status
            assert_migrated_and_continued(source, receiver)
        finally:
            source.kill()
            receiver.kill()


# On kvm_pvm, stores the OS kernel makes (its CPL0 code is emulated) do not stop at a full dirty ring: they
# can overwrite entries not yet harvested, and those pages are lost (docs/migration.md). The OS gets rings
# with more entries than its 32768 pages, which can never fill (a page is logged once per harvest); the
# user-mode-only ticker guest gets small rings, so that ring-full exits harvest them in mid-round.
@pytest.mark.parametrize("guest", ["os", "ticker"])
def test_migration_with_dirty_rings(tmp_path: Path, guest: str) -> None:
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    if guest == "os":
        source = VmmProcess([*os_run_args(), "--dirty-ring", "65536"], tmp_path / "source.sock")
        source.wait_for_os_workload()
    else:
        source = VmmProcess(["run", "ticker", "--memory", "128M", "--args", TICKER_WORKLOAD, "--dirty-ring", "1024"],
                            tmp_path / "source.sock")
        source.wait_for_tick(5)
    try:
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "verify": True, "wait": True})
        assert status["state"] == "completed", status
        assert status["result"]["memory_digest_source"] == status["result"]["memory_digest_destination"]
        out = assert_migrated_and_continued(source, receiver, check_guest=guest == "os")
        if guest != "os":
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
        ApiClient(tmp_path / "dest.sock").post("/stop")  # claimed before listening; routes before RESUMED
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert_guest_continued(source.text(), out, beats_after=1)
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


def memcheck_word(index: int, seed: int = 1) -> int:
    """Word `index` of memcheck's pattern (guests/programs/memcheck.c)."""
    return ((index * 0x9E3779B97F4A7C15) ^ (seed << 32) ^ index) & (1 << 64) - 1


# memcheck's 8 MiB lie in 2 MiB pages, physically contiguous each: the 1 MiB frames of round 0 that fall
# inside start with one of these words, and hold pages written once and then only read.
MEMCHECK_FRAME_STARTS = {memcheck_word(offset // 8) for offset in range(0, 8 << 20, 1 << 20)}


def corrupt_a_page(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
    """Flip a byte of a page nobody rewrites: its digest no longer matches, and the source did not name it as
    rewritten in the round."""
    if kind is MessageType.PAGES and not log.cut:
        _, count, encoding, digest_size = PAGES.unpack_from(payload)
        data = PAGES.size + count * digest_size
        first_word = int.from_bytes(payload[data:data + 8], "little")
        if encoding == Encoding.RAW and count == 256 and first_word in MEMCHECK_FRAME_STARTS:
            payload[data + 100] ^= 0xFF
            log.cut = True  # only once
    return FORWARD


def newer_protocol(kind: MessageType, header: bytearray, payload: bytearray, log: FrameLog) -> str:
    if kind is MessageType.AUTH:
        magic, _, message, length, sequence, covered, tag = FRAME.unpack(header)
        header[:] = FRAME.pack(magic, 99, message, length, sequence, covered, tag)
        retag(header, payload)
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
    # A low downtime limit and a steady dirtier guarantee several rounds before switching over. To cut a later
    # round, the link is slowed so that round 1 lasts long enough for the dirtier to write pages round 2 must
    # send: at full speed round 1 can end within a few milliseconds, with nothing dirtied, and switch over.
    slow = {"max_bandwidth": 200e6} if phase == "a later round" else {}
    source = start_source(tmp_path)
    try:
        with pytest.raises(ControlError):
            status = source.api.post("/migrate", {"to": proxy.address, "downtime_ms": 5, "max_rounds": 6,
                                                  "wait": True, **slow})
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
    # memdirty at full speed (rate=0: work per unit of CPU time, so throttling the vCPUs slows it) rewrites its
    # 64 MiB each round: 0.67 s at 100 MB/s, more than the downtime limit, however many rounds run.
    fast_dirtier = "counter count=0 period_ms=20; memdirty pages=16384 rate=0 seconds=0"
    link = 100_000_000  # 100 MB/s: slower than the guest dirties
    source = start_source(tmp_path, fast_dirtier)
    try:
        port = free_port()
        receiver = Receiver(port, tmp_path / "dest.sock")
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "max_bandwidth": link, "max_rounds": 4,
                                              "on_limit": "cancel", "downtime_ms": 300, "wait": True})
        assert status["state"] == "failed" and "did not converge" in status["error"], status
        assert_source_survives(source, receiver)

        port = free_port()
        receiver = Receiver(port, tmp_path / "dest2.sock")
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "max_bandwidth": link, "max_rounds": 30,
                                              "on_limit": "cancel", "downtime_ms": 300, "auto_converge": True,
                                              "wait": True})
        assert status["state"] == "completed", status
        rounds = status["result"]["rounds"][:-1]  # the last one is the stop-and-copy
        assert max(stats["throttle"] for stats in rounds) > 0.1, "auto-converge throttled the vCPUs"
        assert rounds[-1]["dirty_pages"] < rounds[0]["dirty_pages"] / 2, "throttled, memdirty dirtied less"
        assert source.finish()[0] == 0
        time.sleep(1.2)  # memdirty reports once a second: at least one whole report at the destination
        code, out, err = receiver.stop()
        assert code == 0, err
        continuous_beats(source.text(), out)
        assert "memdirty" in out
    finally:
        source.kill()
        receiver.kill()
