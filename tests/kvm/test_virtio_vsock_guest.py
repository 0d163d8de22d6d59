"""virtio-vsock with the OS guest's `vsock` program under `pyrovisor run`: a guest connection to a host Unix
server, a host connection echoed byte-exact (200 KiB, so credit has to flow both ways), a port nobody listens on,
a snapshot restored with the guest told its connections are gone, and the --vsock errors. Run as a script it
measures the echo: `python tests/kvm/test_virtio_vsock_guest.py [MiB] [poll|irq]`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import VmmProcess
from test_migration import Receiver, free_port

from pyrovisor.builder import build_vm, restore_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig, VsockConfig
from pyrovisor.snapshot.take import take_snapshot

pytestmark = pytest.mark.kvm

RUN = [sys.executable, "-m", "pyrovisor", "run", "os", "--memory", "128M", "--vcpus", "1"]
WAIT_S = 60.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vk", dir="/tmp") as name:
        yield Path(name)


def reply_server(path: Path, received: list[bytes]) -> tuple[socket.socket, threading.Thread]:
    """A host service at `path`: reads a line, answers "pong: LINE\\n", then reads to the end."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(WAIT_S)

    def serve() -> None:
        connection, _ = listener.accept()
        connection.settimeout(WAIT_S)
        with connection:
            data = b""
            while not data.endswith(b"\n"):
                piece = connection.recv(256)
                if not piece:
                    break
                data += piece
            received.append(data)
            connection.sendall(b"pong: " + data)
            received.append(connection.recv(256))  # b"": the guest closed

    thread = threading.Thread(target=serve)
    thread.start()
    return listener, thread


def connect_to_guest(uds: Path, port: int) -> tuple[socket.socket, int]:
    """Connect to the device's socket, ask for guest `port`, return the stream and the host port of the OK."""
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(WAIT_S)
    host.connect(str(uds))
    host.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        piece = host.recv(1)
        assert piece, f"the device closed the connection after {line!r}"
        line += piece
    found = re.fullmatch(rb"OK (\d+)\n", line)
    assert found, line
    return host, int(found.group(1))


def echo(host: socket.socket, data: bytes) -> tuple[bytes, float]:
    """Write `data` while a second thread reads the echo; (what came back, seconds from first byte to last)."""
    back = bytearray()

    def read() -> None:
        while len(back) < len(data):
            piece = host.recv(1 << 20)
            if not piece:
                return
            back.extend(piece)

    reader = threading.Thread(target=read)
    started = time.monotonic()
    reader.start()
    host.sendall(data)
    reader.join(WAIT_S * 4)
    return bytes(back), time.monotonic() - started


def start_listener_guest(uds: Path, args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`pyrovisor run os --vsock ...` with the guest listening; returns once it says so."""
    vm = subprocess.Popen([*RUN, "--vsock", f"cid=3,uds={uds}", "--args", args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    assert vm.stdout is not None
    lines: list[str] = []
    for line in vm.stdout:
        lines.append(line)
        if "listening on cid 3 port" in line:
            return vm, lines
    vm.wait(10)
    raise AssertionError("".join(lines) + (vm.stderr.read() if vm.stderr else ""))


def test_the_guest_connects_to_a_host_service(short_dir: Path) -> None:
    uds = short_dir / "v.sock"
    received: list[bytes] = []
    listener, server = reply_server(Path(f"{uds}_5000"), received)
    try:
        run = subprocess.run([*RUN, "--vsock", f"cid=3,uds={uds}", "--args", "vsock connect port=5000 msg=hello"],
                             capture_output=True, text=True, timeout=WAIT_S)
    finally:
        server.join(WAIT_S)
        listener.close()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    assert re.search(r"^os: virtio 0: base 0xc0000000 size 0x1000 irq 5: device 19 \(vsock\)", run.stdout, re.M)
    assert "vsock 1: virtio 0 (irq 5): guest cid 3" in run.stdout
    assert "vsock 1: connected, peer buf_alloc 262144" in run.stdout
    assert "vsock 1: reply 'pong: hello'" in run.stdout
    assert "vsock 1: closed: SHUTDOWN sent, RST received" in run.stdout
    assert "PASS: vsock 1: connect cid 2 port 5000: sent 6 bytes, received 12 bytes" in run.stdout
    assert received == [b"hello\n", b""], "the service got the line, then end of file"
    assert not uds.exists(), "the listening socket is removed when the VM ends"


def test_a_port_nobody_listens_on_is_refused(short_dir: Path) -> None:
    run = subprocess.run([*RUN, "--vsock", f"cid=7,uds={short_dir / 'v.sock'}", "--args",
                          "vsock connect port=5999 wait=irq"], capture_output=True, text=True, timeout=WAIT_S)
    assert "vsock 1: virtio 0 (irq 5): guest cid 7" in run.stdout, run.stdout + run.stderr
    assert "FAIL: vsock 1: connect to cid 2 port 5999: refused (RST)" in run.stdout
    assert run.returncode != 0


@pytest.mark.parametrize("wait", ["poll", "irq"])
def test_the_host_connects_and_200_kib_echo_byte_exact(short_dir: Path, wait: str) -> None:
    uds = short_dir / "v.sock"
    vm, lines = start_listener_guest(uds, f"vsock listen port=6000 count=1 wait={wait}")
    try:
        host, host_port = connect_to_guest(uds, 6000)
        data = os.urandom(200 << 10)
        back, _ = echo(host, data)
        assert back == data, f"{len(back)} of {len(data)} bytes came back, equal up to {_common(back, data)}"
        host.shutdown(socket.SHUT_WR)
        assert host.recv(16) == b"", "after the guest closed, the host reads end of file"
        host.close()
        out, err = vm.communicate(timeout=WAIT_S)
    finally:
        vm.kill()
        vm.wait()
    console = "".join(lines) + out
    assert vm.returncode == 0, console[-2000:] + err
    assert f"vsock 1: accepted cid 2 port {host_port}" in console
    assert f"connection from cid 2 port {host_port}: echoed {200 << 10} bytes, closed: SHUTDOWN sent, RST " \
           "received" in console
    assert f"PASS: vsock 1: listen port 6000: 1 connections, {200 << 10} bytes echoed" in console
    if wait == "irq":
        assert re.search(r"vsock 1: \d+ notifies, \d+ waits, [1-9]\d* interrupts", console)


def test_a_restored_vm_tells_the_guest_its_connections_are_gone(short_dir: Path) -> None:
    uds = short_dir / "v.sock"
    config = MachineConfig(kernel=guests_dir() / "os.elf", initrd=guests_dir() / "os-programs.img",
                           memory_size=128 << 20, cmdline="vsock listen port=6000 count=2 seconds=60",
                           vsock=VsockConfig(3, uds))
    before = bytearray()
    with build_vm(config, before.extend) as vmm:
        vmm.start()
        _wait_for(before, "listening on cid 3 port 6000")
        first, _ = connect_to_guest(uds, 6000)
        assert echo(first, b"one")[0] == b"one"
        take_snapshot(vmm, short_dir / "snap")  # with the connection open
    first.settimeout(WAIT_S)
    assert first.recv(16) == b"", "the connection ends with the VM it belonged to"
    first.close()
    assert not uds.exists()
    after = bytearray()
    with restore_vm(short_dir / "snap", after.extend) as restored:
        restored.start()
        _wait_for(after, "transport reset, guest cid now 3")
        _wait_for(after, "echoed 3 bytes, reset by the peer")
        second, _ = connect_to_guest(uds, 6000)
        assert echo(second, b"two after the restore")[0] == b"two after the restore"
        second.shutdown(socket.SHUT_WR)
        assert second.recv(16) == b""
        outcome = restored.wait(WAIT_S)
    console = after.decode(errors="replace")
    assert outcome is not None and outcome.exit_code == 0, console[-2000:]
    assert "PASS: vsock 1: listen port 6000: 2 connections, 24 bytes echoed" in console
    assert re.search(r"vsock 1: .* 1 transport resets", console)


def test_a_migrated_vm_takes_the_socket_over_and_accepts_new_connections(short_dir: Path, tmp_path: Path) -> None:
    """Both VMMs on one host: the destination takes the listening path over while the source still holds it, and
    the source, closing, leaves it alone. The guest's connection from before does not survive."""
    uds = short_dir / "v.sock"
    port = free_port()
    receiver = Receiver(port, tmp_path / "dest.sock")
    source = VmmProcess([*RUN[3:], "--vsock", f"cid=3,uds={uds}", "--args",
                         "vsock listen port=6000 count=2 seconds=60"], tmp_path / "source.sock")
    try:
        source.wait_for(lambda: "listening on cid 3 port 6000" in source.text(), "the guest to listen")
        first, _ = connect_to_guest(uds, 6000)
        assert echo(first, b"before")[0] == b"before"
        status = source.api.post("/migrate", {"to": f"127.0.0.1:{port}", "wait": True})
        assert status["state"] == "completed", status
        assert source.finish()[0] == 0
        first.settimeout(WAIT_S)
        assert first.recv(16) == b"", "the connection ended with the source"
        assert uds.exists(), "the source did not remove the destination's socket"
        second = _connect_when_accepted(uds, 6000)
        assert echo(second, b"after the migration")[0] == b"after the migration"
        second.shutdown(socket.SHUT_WR)
        assert second.recv(16) == b""
        code, out, err = receiver.finish(timeout=WAIT_S)
    finally:
        source.kill()
        receiver.kill()
    assert code == 0, err + out[-2000:]
    assert "vsock 1: transport reset, guest cid now 3" in out
    assert "PASS: vsock 1: listen port 6000: 2 connections, 25 bytes echoed" in out
    assert not uds.exists()


def _connect_when_accepted(uds: Path, port: int, timeout: float = 30) -> socket.socket:
    """Connect to guest `port`, again while the guest refuses (it may still be closing an earlier stream)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect_to_guest(uds, port)[0]
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_bad_vsock_options_are_one_error_line(short_dir: Path) -> None:
    (short_dir / "file").write_text("not a socket")
    for option, message in ((f"cid=2,uds={short_dir / 'v.sock'}", "invalid vsock cid 2: must be at least 3"),
                            (f"cid=1,uds={short_dir / 'v.sock'}", "invalid vsock cid 1"),
                            (f"cid=3,uds={short_dir / 'missing' / 'v.sock'}",
                             f"vsock0: cannot listen on {short_dir / 'missing' / 'v.sock'}: No such file or directory"),
                            (f"cid=3,uds={short_dir / 'file'}", "the file exists and is not a socket"),
                            (f"cid=3,uds={short_dir / ('x' * 120)}", "a Unix socket path has at most 107 bytes"),
                            ("cid=3", "expected cid=N,uds=PATH")):
        bad = subprocess.run([*RUN, "--vsock", option, "--args", "vsock listen"], capture_output=True, text=True,
                             timeout=WAIT_S)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("pyrovisor: error:"), bad.stderr
        assert message in lines[0], lines[0]
    assert (short_dir / "file").read_text() == "not a socket"


def _wait_for(output: bytearray, text: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while text not in output.decode(errors="replace"):
        assert time.monotonic() < deadline, f"no {text!r} in:\n{output.decode(errors='replace')[-2000:]}"
        time.sleep(0.005)


def _common(a: bytes, b: bytes) -> int:
    return next((index for index, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def measure(mib: int, wait: str) -> None:
    """Echo `mib` MiB through the guest and print the rate (each direction carries all of it)."""
    with tempfile.TemporaryDirectory(prefix="vk", dir="/tmp") as name:
        uds = Path(name) / "v.sock"
        vm, _ = start_listener_guest(uds, f"vsock listen port=6000 count=1 wait={wait} seconds=300")
        try:
            host, _ = connect_to_guest(uds, 6000)
            data = os.urandom(mib << 20)
            back, seconds = echo(host, data)
            assert back == data
            host.close()
            vm.wait(WAIT_S)
        finally:
            vm.kill()
            vm.wait()
    print(f"{mib} MiB echoed (wait={wait}) in {seconds:.2f} s: {len(data) / seconds / 1e6:.1f} MB/s host->guest "
          f"and the same guest->host; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 64, sys.argv[2] if len(sys.argv) > 2 else "poll")
