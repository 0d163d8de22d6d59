"""The control API over a real Unix socket: endpoints, errors, the ctl client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import VmmProcess

from pyrovisor.api.client import ApiClient
from pyrovisor.api.server import ControlServer, Routes
from pyrovisor.errors import ConfigError, ControlError

pytestmark = pytest.mark.kvm


def raw_request(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                if len(body) >= length:
                    break
        return b"".join(chunks)


def test_lifecycle_through_the_api_and_ctl(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    vmm = VmmProcess(["run", "ticker", "--args", "ticks=0 period_ms=10 buffer_mib=1"], socket_path)
    try:
        vmm.wait_for_tick(2)
        assert socket_path.stat().st_mode & 0o777 == 0o600
        status = vmm.api.get("/status")
        assert status["state"] == "running" and status["vcpus"] == 1 and status["outcome"] is None
        assert status["exits"]["0"]["io"] > 0

        ctl = [sys.executable, "-m", "pyrovisor", "ctl", str(socket_path)]
        paused = subprocess.run([*ctl, "pause"], capture_output=True, text=True, check=True)
        assert json.loads(paused.stdout) == {"state": "paused"}
        frozen = vmm.ticks()
        assert vmm.api.get("/status")["state"] == "paused"
        snap = subprocess.run([*ctl, "snapshot", str(tmp_path / "snap")], capture_output=True, text=True, check=True)
        assert json.loads(snap.stdout)["kind"] == "full"
        assert vmm.ticks() == frozen, "no tick while paused"
        subprocess.run([*ctl, "resume"], capture_output=True, text=True, check=True)
        vmm.wait_for_tick(max(frozen) + 2)

        with pytest.raises(ControlError, match="already exists"):
            vmm.api.post("/snapshot", {"path": str(tmp_path / "snap")})
        with pytest.raises(ControlError, match="kind must be") as info:
            vmm.api.post("/snapshot", {"path": str(tmp_path / "x"), "kind": "partial"})
        assert info.value.status == 400
        with pytest.raises(ControlError, match="missing field 'path'"):
            vmm.api.post("/snapshot", {})
        with pytest.raises(ControlError, match="no such endpoint") as info:
            vmm.api.get("/nothing")
        assert info.value.status == 404
        with pytest.raises(ControlError, match="not allowed") as info:
            vmm.api.get("/pause")
        assert info.value.status == 405
        garbage = raw_request(socket_path, b"POST /pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n{{{{{")
        assert b" 400 " in garbage.split(b"\r\n")[0] and b"not valid JSON" in garbage
        assert vmm.api.get("/status")["state"] == "running", "bad requests change nothing"

        vmm.api.post("/stop")
        code, stderr = vmm.finish()
        assert code == 0, stderr
        assert not socket_path.exists(), "the socket is removed when the VMM exits"
    finally:
        vmm.kill()
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "ctl", str(socket_path), "status"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "no VMM control socket" in result.stderr


def test_socket_path_in_use_or_not_a_socket_is_refused(tmp_path: Path) -> None:
    busy = tmp_path / "busy.sock"
    with ControlServer(busy, Routes()), pytest.raises(ConfigError, match="another VMM is serving"):
        ControlServer(busy, Routes())
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(regular, Routes())


def test_stale_socket_is_replaced_and_handler_errors_are_reported(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(stale))
    listener.close()  # leaves the file behind with nobody listening
    routes = Routes()
    routes.add("GET", "/boom", lambda body: 1 / 0)  # type: ignore[arg-type,return-value]
    with ControlServer(stale, routes):
        with pytest.raises(ControlError, match="internal error") as info:
            ApiClient(stale).get("/boom")
        assert info.value.status == 500


def keep_alive_client(path: Path) -> socket.socket:
    """A connection that has made one complete keep-alive request, read its answer and stays open."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    sock.sendall(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert b" 200 " in read_response(sock).split(b"\r\n")[0]
    return sock


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a response"
        body += chunk
    return head + b"\r\n\r\n" + body


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_an_idle_api_client_does_not_keep_the_vmm_alive_after_its_timeout(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    vmm = VmmProcess(["run", "ticker", "--args", "ticks=0 period_ms=10 buffer_mib=1", "--timeout", "2"], socket_path)
    try:
        with keep_alive_client(socket_path) as idle:
            code, stderr = vmm.finish(timeout=2 + 5)  # the socket appears just before the guest starts
            assert code == 124, stderr
            assert "Traceback" not in stderr
            assert closed_by_server(idle)
    finally:
        vmm.kill()
    assert not socket_path.exists()


def test_an_idle_api_client_does_not_keep_the_vmm_alive_after_stop(tmp_path: Path) -> None:
    socket_path = tmp_path / "api.sock"
    vmm = VmmProcess(["run", "ticker", "--args", "ticks=0 period_ms=10 buffer_mib=1"], socket_path)
    try:
        vmm.wait_for_tick(1)
        with keep_alive_client(socket_path) as idle, keep_alive_client(socket_path) as stopper:
            stopper.sendall(b"POST /stop HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}")
            answer = read_response(stopper)
            assert b" 200 " in answer.split(b"\r\n")[0] and answer.endswith(b'{"state": "stopped"}')
            assert closed_by_server(stopper), "the keep-alive connection that stopped the VM is closed after its answer"
            code, stderr = vmm.finish(timeout=5)
            assert code == 0 and "Traceback" not in stderr, stderr
            assert closed_by_server(idle)
    finally:
        vmm.kill()


def _path_of_120_characters(tmp_path: Path) -> str:
    return str(tmp_path / ("s" * (120 - len(str(tmp_path)) - 1)))


def _regular_file(tmp_path: Path) -> str:
    (tmp_path / "file").write_text("x")
    return str(tmp_path / "file")


@pytest.mark.parametrize("make_path, reason", [
    (lambda tmp_path: "/nonexistent/dir/sock", "does not exist"),
    (_path_of_120_characters, "107"),
    (_regular_file, "exists and is not a socket"),
], ids=["missing-directory", "120-characters", "regular-file"])
def test_a_bad_api_socket_path_is_one_error_line(tmp_path: Path, make_path: Callable[[Path], str],
                                                  reason: str) -> None:
    api = make_path(tmp_path)
    result = subprocess.run([sys.executable, "-m", "pyrovisor", "run", "--api", api], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=60)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrovisor: error: ") and repr(api) in lines[0], result.stderr
    assert reason in lines[0]
    # The argument parser may refuse the path up front (a usage error, 2); otherwise ControlServer does (1).
    assert result.returncode == (2 if "argument --api" in lines[0] else 1), result.stderr
