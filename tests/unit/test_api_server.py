"""The control API server under careless or hostile clients, on real Unix sockets (no KVM)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from pyrovisor.api.client import ApiClient
from pyrovisor.api.server import MAX_BODY, ApiError, ControlServer, JsonObject, Routes, ServerLimits
from pyrovisor.errors import (
    ConfigError,
    ControlError,
    KvmError,
    MigrationError,
    PyrovisorError,
    StateError,
)

BOUND = 5.0  # no single wait in these tests lasts longer


class Recorder:
    """Routes whose handlers note every call, so a test can tell whether a request was executed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, JsonObject]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.routes = Routes()
        self.routes.add("GET", "/ping", lambda body: self._note("ping", body, {"pong": True}))
        self.routes.add("POST", "/record", lambda body: self._note("record", body, {"recorded": True}))
        self.routes.add("POST", "/slow", self._slow)
        self.routes.add("GET", "/slow", self._slow)
        self.routes.add("POST", "/blocked", self._blocked)

    def _note(self, name: str, body: JsonObject, answer: JsonObject) -> JsonObject:
        self.calls.append((name, body))
        return answer

    def _slow(self, body: JsonObject) -> JsonObject:
        self.started.set()
        time.sleep(0.3)
        return self._note("slow", body, {"slow": True})

    def _blocked(self, body: JsonObject) -> JsonObject:
        self.started.set()
        self.release.wait(30)
        return self._note("blocked", body, {"released": True})


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(BOUND)
    sock.connect(str(path))
    return sock


def http_request(method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def read_response(sock: socket.socket) -> Response:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before a response; got {buffer!r}")
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in header_lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("the connection closed in the middle of a response")
        rest += chunk
    return Response(int(status_line.split()[1]), headers, rest[:length])


def exchange(path: Path, data: bytes) -> Response:
    """Send `data` on a new connection and read the response."""
    with connect(path) as sock:
        sock.sendall(data)
        return read_response(sock)


def exchange_and_watch(path: Path, data: bytes, within: float = BOUND) -> tuple[Response, bool]:
    """Send `data` on a new connection; the response, and whether the server closed the connection
    within `within` seconds after it."""
    with connect(path) as sock:
        sock.sendall(data)
        response = read_response(sock)
        return response, closed_by_server(sock, within)


def closed_by_server(sock: socket.socket, within: float = BOUND) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def bounded(action: Callable[[], object], timeout: float = BOUND) -> float:
    """Run `action` on a thread; fail if it has not returned within `timeout`. Returns its duration."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    elapsed = time.monotonic() - started
    assert not thread.is_alive(), f"still running after {timeout} s"
    if errors:
        raise errors[0]
    return elapsed


@contextmanager
def serving(path: Path, routes: Routes, limits: ServerLimits | None = None) -> Iterator[ControlServer]:
    server = ControlServer(path, routes, limits)
    try:
        yield server
    finally:
        bounded(server.close, 30)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.mark.parametrize("client_sends", [
    pytest.param(http_request("GET", "/ping"), id="after-a-keep-alive-request"),
    pytest.param(b"", id="nothing-yet"),
    pytest.param(b"POST /record HTTP/1.1\r\nContent-", id="half-the-headers"),
    pytest.param(http_request("POST", "/record", b'{"x": 1}')[:-3], id="half-the-body"),
])
def test_an_idle_connection_does_not_delay_close(tmp_path: Path, recorder: Recorder, client_sends: bytes) -> None:
    path = tmp_path / "api.sock"
    server = ControlServer(path, recorder.routes)  # the default 30 s idle timeout must not matter
    with connect(path) as idle:
        if client_sends:
            idle.sendall(client_sends)
        if client_sends.endswith(b"\r\n\r\n"):
            assert read_response(idle).json() == {"pong": True}
        else:
            time.sleep(0.2)  # give the server time to start reading the partial request (nothing to await)
        elapsed = bounded(server.close, 3.0)
        assert elapsed < 1.0, f"close() took {elapsed:.2f} s with an idle client"
        assert closed_by_server(idle), "the idle connection is dropped"
    assert not path.exists()
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        connect(path)
    assert [name for name, _ in recorder.calls if name != "ping"] == []


def test_the_idle_timeout_closes_a_silent_connection(tmp_path: Path, recorder: Recorder) -> None:
    with serving(tmp_path / "api.sock", recorder.routes, ServerLimits(idle_timeout=0.3)) as server, \
            connect(server.socket_path) as sock:
        sock.sendall(http_request("GET", "/ping"))
        assert read_response(sock).status == 200
        started = time.monotonic()
        assert closed_by_server(sock, within=3.0)
        assert time.monotonic() - started < 2.0


def test_a_request_in_progress_is_answered_before_close_returns(tmp_path: Path, recorder: Recorder) -> None:
    path = tmp_path / "api.sock"
    server = ControlServer(path, recorder.routes)
    with connect(path) as sock:
        sock.sendall(http_request("POST", "/slow", b'{"n": 1}'))  # keep-alive: the client would send more
        assert recorder.started.wait(BOUND)
        elapsed = bounded(server.close)
        response = read_response(sock)
        assert response.status == 200 and response.json() == {"slow": True}
        assert closed_by_server(sock), "the connection is closed after its answer"
    assert recorder.calls == [("slow", {"n": 1})]
    assert elapsed < 2.0


def test_close_gives_up_on_a_request_that_outlasts_the_drain_timeout(tmp_path: Path, recorder: Recorder) -> None:
    path = tmp_path / "api.sock"
    server = ControlServer(path, recorder.routes, ServerLimits(drain_timeout=0.5))
    try:
        with connect(path) as sock:
            sock.sendall(http_request("POST", "/blocked", b"{}"))
            assert recorder.started.wait(BOUND)
            elapsed = bounded(server.close)
            assert 0.4 < elapsed < 2.5, f"close() took {elapsed:.2f} s"
            assert closed_by_server(sock), "the connection is dropped without an answer"
    finally:
        recorder.release.set()


def test_300_concurrent_clients_are_all_answered(tmp_path: Path, recorder: Recorder) -> None:
    clients = 300
    gate = threading.Barrier(clients)
    answers: list[object] = []
    lock = threading.Lock()

    def client(path: Path) -> None:
        gate.wait(30)
        try:
            answer: object = ApiClient(path, timeout=30).get("/slow")
        except ControlError as exc:
            answer = str(exc)
        with lock:
            answers.append(answer)

    with serving(tmp_path / "api.sock", recorder.routes) as server:
        threads = [threading.Thread(target=client, args=(server.socket_path,), daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    failures = [answer for answer in answers if answer != {"slow": True}]
    assert len(answers) == clients and not failures, f"{len(failures)} of {len(answers)} failed: {failures[:3]}"


def test_a_body_cut_short_by_the_client_is_not_executed(tmp_path: Path, recorder: Recorder) -> None:
    with serving(tmp_path / "api.sock", recorder.routes) as server, connect(server.socket_path) as sock:
        sock.sendall(b'POST /record HTTP/1.1\r\nContent-Length: 40\r\n\r\n{"a": 1}')  # valid JSON, 8 bytes
        sock.shutdown(socket.SHUT_WR)
        response = read_response(sock)
        assert response.status == 400 and "ended after 8 of its 40 bytes" in response.json()["error"]
        assert closed_by_server(sock)
    assert recorder.calls == []


def test_a_body_that_stops_arriving_is_not_executed(tmp_path: Path, recorder: Recorder) -> None:
    with serving(tmp_path / "api.sock", recorder.routes, ServerLimits(body_timeout=0.3)) as server:
        with connect(server.socket_path) as sock:
            sock.sendall(b'POST /record HTTP/1.1\r\nContent-Length: 40\r\n\r\n{"a": 1}')
            response = read_response(sock)  # the client keeps the connection open and sends nothing more
            assert response.status == 408 and "8 of the body's 40 bytes" in response.json()["error"]
            assert closed_by_server(sock)
        assert recorder.calls == []
        response = exchange(server.socket_path, http_request("POST", "/record", b'{"a": 1}'))
        assert response.status == 200 and recorder.calls == [("record", {"a": 1})]


FRAMING_CASES = [
    pytest.param(b"POST /record HTTP/1.1\r\n\r\n{}", 411, id="no-content-length"),
    pytest.param(b"POST /record HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411,
                 id="chunked"),
    pytest.param(b"POST /record HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}", 400,
                 id="chunked-and-content-length"),
    pytest.param(b"POST /record HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", 400,
                 id="two-content-lengths"),
    pytest.param(b"POST /record HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}", 400, id="content-length-list"),
    pytest.param(b"POST /record HTTP/1.1\r\nContent-Length: -2\r\n\r\n{}", 400, id="negative"),
    pytest.param(b"POST /record HTTP/1.1\r\nContent-Length: two\r\n\r\n{}", 400, id="not-a-number"),
    pytest.param(b"POST /record HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n{}", 400, id="superscript-two"),
    pytest.param(b"POST /record HTTP/1.1\r\nContent-Length: %d\r\n\r\n{}" % (MAX_BODY + 1), 413, id="over-the-cap"),
    pytest.param(b"POST /record HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n{}", 413,
                 id="five-thousand-digits"),
]


@pytest.mark.parametrize("data, status", FRAMING_CASES)
def test_a_body_that_cannot_be_delimited_is_refused(tmp_path: Path, recorder: Recorder, data: bytes,
                                                    status: int) -> None:
    with serving(tmp_path / "api.sock", recorder.routes) as server:
        response, closed = exchange_and_watch(server.socket_path, data)
    assert response.status == status, response.body
    assert "error" in response.json()
    assert closed and response.headers.get("connection") == "close", "the rest of the stream cannot be trusted"
    assert recorder.calls == []


@pytest.mark.parametrize("data, status", [
    pytest.param(b"NONSENSE\r\n\r\n", 400, id="bad-request-line"),
    pytest.param(b"HEAD /ping HTTP/1.1\r\n\r\n", 501, id="unsupported-method"),
    pytest.param(b"GET /ping HTTP/1.1\r\n" + b"X-Pad: a\r\n" * 101 + b"\r\n", 431, id="too-many-headers"),
])
def test_requests_http_server_refuses_get_json_errors(tmp_path: Path, recorder: Recorder, data: bytes,
                                                      status: int) -> None:
    with serving(tmp_path / "api.sock", recorder.routes) as server:
        response, closed = exchange_and_watch(server.socket_path, data)
    assert response.status == status and response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["error"], str) and closed
    assert recorder.calls == []


def test_keep_alive_survives_a_bad_json_body(tmp_path: Path, recorder: Recorder) -> None:
    with serving(tmp_path / "api.sock", recorder.routes) as server, connect(server.socket_path) as sock:
        sock.sendall(http_request("POST", "/record", b"{{{{"))
        assert read_response(sock).status == 400  # the body was delimited, so the stream is still in step
        sock.sendall(http_request("POST", "/record", b"[1]"))
        assert read_response(sock).status == 400
        sock.sendall(http_request("POST", "/record", b'{"ok": true}'))
        assert read_response(sock).status == 200
    assert recorder.calls == [("record", {"ok": True})]


class _NewKindOfError(PyrovisorError):
    """A PyrovisorError subclass the server has no entry for."""


def _raise(error: BaseException) -> Callable[[JsonObject], JsonObject]:
    def handler(body: JsonObject) -> JsonObject:
        raise error
    return handler


@pytest.mark.parametrize("error, status, kind", [
    pytest.param(ApiError(HTTPStatus.IM_A_TEAPOT, "teapot"), 418, None, id="ApiError"),
    pytest.param(ConfigError("field", 3, "out of range"), 400, "ConfigError", id="ConfigError"),
    pytest.param(StateError("/snap", "already exists"), 409, "StateError", id="StateError"),
    pytest.param(MigrationError("start", "the VM is paused"), 409, "MigrationError", id="MigrationError"),
    pytest.param(_NewKindOfError("not now"), 409, "_NewKindOfError", id="other-PyrovisorError"),
    pytest.param(ControlError("POST /stop", "unreachable"), 502, "ControlError", id="ControlError"),
    pytest.param(KvmError("KVM_GET_DIRTY_LOG", errno.ENOMEM), 500, "KvmError", id="KvmError"),
    pytest.param(FileExistsError(errno.EEXIST, "File exists", "/snap"), 409, "FileExistsError", id="EEXIST"),
    pytest.param(FileNotFoundError(errno.ENOENT, "No such file", "/a/b"), 400, "FileNotFoundError", id="ENOENT"),
    pytest.param(PermissionError(errno.EACCES, "Permission denied", "/root/x"), 403, "PermissionError",
                 id="EACCES"),
    pytest.param(OSError(errno.ENOSPC, "No space left on device", "/snap/memory"), 507, "OSError", id="ENOSPC"),
    pytest.param(ConnectionResetError(errno.ECONNRESET, "reset"), 500, None, id="OSError-without-a-file"),
    pytest.param(ZeroDivisionError("division by zero"), 500, None, id="bug"),
])
def test_errors_map_to_statuses(tmp_path: Path, error: BaseException, status: int, kind: str | None) -> None:
    routes = Routes()
    routes.add("POST", "/fail", _raise(error))
    with serving(tmp_path / "api.sock", routes) as server:
        response, closed = exchange_and_watch(server.socket_path, http_request("POST", "/fail", b"{}"), 0.2)
    document = response.json()
    assert response.status == status, document
    assert document.get("type") == kind
    assert document["error"].startswith("internal error") == (kind is None and status == 500)
    assert not closed, "an error answer keeps the connection"


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _path_of_length(directory: Path, length: int) -> Path:
    name_length = length - len(os.fsencode(directory)) - 1
    if name_length < 1:
        pytest.skip(f"the temporary directory {directory} is too long to build a {length}-byte path")
    return directory / ("s" * name_length)


@pytest.mark.parametrize("length", [108, 109, 200])
def test_a_socket_path_too_long_for_sun_path_is_a_config_error(tmp_path: Path, length: int) -> None:
    path = _path_of_length(tmp_path, length)
    before = _threads()
    with pytest.raises(ConfigError, match=f"is {length} bytes long; .* at most 107") as info:
        ControlServer(path, Routes())
    assert info.value.field == "--api" and info.value.value == str(path)
    assert _threads() == before and not path.exists()


def test_a_socket_path_of_107_bytes_is_served(tmp_path: Path, recorder: Recorder) -> None:
    path = _path_of_length(tmp_path, 107)
    with serving(path, recorder.routes):
        response = exchange(path, http_request("GET", "/ping"))
    assert response.status == 200


def test_a_socket_in_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "api.sock"
    before = _threads()
    with pytest.raises(ConfigError, match=f"the folder '{tmp_path / 'missing'}' does not exist") as info:
        ControlServer(path, Routes())
    assert info.value.field == "--api"
    assert _threads() == before


def test_a_socket_under_a_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        ControlServer(tmp_path / "file" / "api.sock", Routes())


LOCKED_CHECK = """
import sys
from pathlib import Path
from pyrovisor.api.server import ControlServer, Routes
from pyrovisor.errors import ConfigError
try:
    ControlServer(Path(sys.argv[1]), Routes())
except ConfigError as exc:
    print(exc)
"""


def test_a_socket_in_a_directory_without_write_permission_is_a_config_error(tmp_path: Path) -> None:
    """Run where directory permissions apply: as root, in a child without root's file-access capabilities."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    command = [sys.executable, "-c", LOCKED_CHECK, str(locked / "api.sock")]
    if os.geteuid() == 0:
        assert shutil.which("setpriv"), "setpriv (util-linux) drops root's file access for this test"
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        locked.chmod(0o700)
    assert result.returncode == 0, result.stderr
    assert "permission denied" in result.stdout and not (locked / "api.sock").exists()


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=oct)
def test_the_socket_is_0600_and_the_process_umask_is_never_touched(tmp_path: Path, recorder: Recorder,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   umask: int) -> None:
    previous = os.umask(umask)
    calls: list[int] = []
    real_umask = os.umask
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real_umask(mask))
    try:
        with serving(tmp_path / "api.sock", recorder.routes) as server:
            assert stat.S_IMODE(os.lstat(server.socket_path).st_mode) == 0o600
            assert exchange(server.socket_path, http_request("GET", "/ping")).status == 200
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert calls == [], "other threads create files meanwhile: the process-wide umask must not change"


def test_a_stale_socket_is_replaced(tmp_path: Path, recorder: Recorder) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # left behind with nobody listening
    with serving(path, recorder.routes):
        assert exchange(path, http_request("GET", "/ping")).status == 200


def test_a_live_socket_is_refused_even_when_its_queue_is_full(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(str(path))
        busy.listen(0)  # never accepts: a hung VMM
        queued = []
        for _ in range(8):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            queued.append(client)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        try:
            def claim() -> None:
                with pytest.raises(ConfigError, match="another VMM is serving"):
                    ControlServer(path, Routes())
            bounded(claim)
        finally:
            for client in queued:
                client.close()
    assert path.is_socket(), "a live socket is left alone"


def test_a_symlink_at_the_socket_path_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / "api.sock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a socket"):
        ControlServer(tmp_path / "api.sock", Routes())
    assert (tmp_path / "elsewhere").read_text() == "x"


def test_close_leaves_a_successors_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    server = ControlServer(path, Routes())
    path.unlink()  # someone removed ours and serves there now
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        successor.bind(str(path))
        bounded(server.close)
        assert path.is_socket()
