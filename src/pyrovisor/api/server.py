"""The control API of a running VM: JSON over HTTP on a Unix socket (Firecracker's convention)."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import socket
import socketserver
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pyrovisor.api.socket_path import check_socket_path
from pyrovisor.confine.policy import enter_thread
from pyrovisor.errors import (
    ConfigError,
    ControlError,
    DeviceError,
    GuestMemoryError,
    KvmError,
    KvmUnavailableError,
    LoaderError,
    PyrovisorError,
    SeccompViolation,
    TpmError,
)

MAX_BODY = 1 << 20
# sun_path is 108 bytes and must end in a NUL for most tools (curl, socat) to reach the socket.
SOCKET_MODE = 0o600
JsonObject = dict[str, Any]
log = logging.getLogger(__name__)

RouteHandler = Callable[[JsonObject], JsonObject]

_BODY_METHODS = ("POST", "PUT", "PATCH")
_DECIMAL = re.compile(r"[0-9]+")

# The status of an error raised on purpose is that of the first class of its MRO listed here. The
# PyrovisorError entry covers StateError, GuestError, MigrationError and the like: the VM's state did not
# allow the request, and nothing was changed.
ERROR_STATUS: dict[type[BaseException], HTTPStatus] = {
    ConfigError: HTTPStatus.BAD_REQUEST,
    LoaderError: HTTPStatus.BAD_REQUEST,
    DeviceError: HTTPStatus.BAD_REQUEST,
    GuestMemoryError: HTTPStatus.BAD_REQUEST,
    ControlError: HTTPStatus.BAD_GATEWAY,
    TpmError: HTTPStatus.BAD_GATEWAY,  # swtpm failed or a TPM command was refused
    KvmError: HTTPStatus.INTERNAL_SERVER_ERROR,
    KvmUnavailableError: HTTPStatus.INTERNAL_SERVER_ERROR,
    PyrovisorError: HTTPStatus.CONFLICT,
}
# An OSError about a named file (usually a path the request gave): the caller's problem, by errno.
FILE_ERROR_STATUS: dict[int, HTTPStatus] = {
    errno.EEXIST: HTTPStatus.CONFLICT,
    errno.ENOTEMPTY: HTTPStatus.CONFLICT,
    errno.ENOENT: HTTPStatus.BAD_REQUEST,
    errno.ENOTDIR: HTTPStatus.BAD_REQUEST,
    errno.EISDIR: HTTPStatus.BAD_REQUEST,
    errno.ENAMETOOLONG: HTTPStatus.BAD_REQUEST,
    errno.EACCES: HTTPStatus.FORBIDDEN,
    errno.EPERM: HTTPStatus.FORBIDDEN,
    errno.EROFS: HTTPStatus.FORBIDDEN,
    errno.ENOSPC: HTTPStatus.INSUFFICIENT_STORAGE,
    errno.EDQUOT: HTTPStatus.INSUFFICIENT_STORAGE,
}


@dataclass(frozen=True)
class ApiError(Exception):
    """An error with an HTTP status, for problems the caller made (bad request, conflict...)."""

    status: HTTPStatus
    message: str


def reject_unknown_fields(body: JsonObject, allowed: Iterable[str]) -> None:
    """A 400 naming the fields of a request body that are not among `allowed`."""
    unknown = sorted(body.keys() - set(allowed))
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s): {', '.join(unknown)}")


@dataclass(frozen=True)
class ServerLimits:
    """What one client may hold of the server, and how long `close()` lets answers in progress finish."""

    max_body: int = MAX_BODY
    idle_timeout: float = 30.0  # a connection silent this long (between or within requests) is closed
    body_timeout: float = 10.0  # a body must arrive in full this soon after its headers
    drain_timeout: float = 10.0  # close() waits this long for requests being executed, then drops them
    backlog: int = socket.SOMAXCONN  # connections the kernel queues before they are accepted


class Routes:
    """(method, path) → handler taking the JSON body and returning a JSON object."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], RouteHandler] = {}
        # Handlers' preparations (loading lazy C extensions) to run before the server thread loads its seccomp
        # filter, or, for routes added later, by whoever adds them (prepare()).
        self.before_confinement: list[Callable[[], None]] = []

    def add(self, method: str, path: str, handler: RouteHandler) -> None:
        self._routes[(method.upper(), path)] = handler

    def dispatch(self, method: str, path: str, body: JsonObject) -> JsonObject:
        handler = self._routes.get((method, path))
        if handler is None:
            if any(route_path == path for _, route_path in self._routes):
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        return handler(body)

    def prepare(self) -> None:
        """Run the preparations added so far, once each; one that fails is logged (its routes then fail alone)."""
        while self.before_confinement:
            prepare = self.before_confinement.pop(0)
            try:
                prepare()
            except Exception:
                log.exception("api: preparing %s failed", getattr(prepare, "__qualname__", prepare))

    @property
    def paths(self) -> list[tuple[str, str]]:
        return sorted(self._routes)


def error_response(exc: Exception) -> tuple[HTTPStatus, JsonObject]:
    """The status and JSON document answering a request whose handler raised `exc`."""
    if isinstance(exc, ApiError):
        return exc.status, {"error": exc.message}
    if isinstance(exc, PyrovisorError):
        status = next(ERROR_STATUS[kind] for kind in type(exc).__mro__ if kind in ERROR_STATUS)
        return status, {"error": str(exc), "type": type(exc).__name__}
    if isinstance(exc, OSError) and exc.filename is not None and exc.errno in FILE_ERROR_STATUS:
        return FILE_ERROR_STATUS[exc.errno], {"error": str(exc), "type": type(exc).__name__}
    return HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc!r}"}


class _FramingError(Exception):
    """The request's body cannot be delimited or did not arrive: answer, then drop the connection."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _UnixHttpServer(socketserver.UnixStreamServer):
    """One thread per connection; knows which connections are executing a request so that closing can
    drop the idle ones at once and let the others answer first."""

    def __init__(self, routes: Routes, limits: ServerLimits) -> None:
        self.request_queue_size = limits.backlog
        super().__init__("", _Handler, bind_and_activate=False)
        self.routes = routes
        self.limits = limits
        self.closing = False
        self._changed = threading.Condition()
        self._busy: dict[socket.socket, bool] = {}  # every open connection → executing a request now

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._changed:
            if self.closing:
                super().shutdown_request(request)
                return
            self._busy[request] = False
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                  name="api-connection", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # out of threads: refuse this one connection, keep serving
            self.shutdown_request(request)

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def shutdown_request(self, request: Any) -> None:
        with self._changed:  # forgotten before it is closed, so close() never touches a closed socket
            self._busy.pop(request, None)
            self._changed.notify_all()
        super().shutdown_request(request)

    def begin_request(self, connection: socket.socket) -> bool:
        """Mark `connection` as executing a request; False if the server is closing (do not execute)."""
        with self._changed:
            if self.closing:
                return False
            self._busy[connection] = True
            return True

    def end_request(self, connection: socket.socket) -> bool:
        """Mark `connection` idle again; True if the server is closing (close the connection)."""
        with self._changed:
            if connection in self._busy:
                self._busy[connection] = False
            return self.closing

    def drain(self, timeout: float) -> bool:
        """Refuse new requests, drop idle connections now and the others once they have answered or
        `timeout` has passed; True if every connection ended in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self.closing = True
            for connection, busy in self._busy.items():
                if not busy:
                    _drop(connection)
            if self._changed.wait_for(lambda: not self._busy, timeout):
                return True
            for connection in self._busy:
                _drop(connection)
            # A dropped connection blocked on the socket ends at once; one still in its handler is left behind.
            self._changed.wait_for(lambda: not self._busy, max(0.0, deadline + 0.2 - time.monotonic()))
            return False

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # the client went away, timed out or was dropped by close()
            return
        print(f"pyrovisor: control API: unexpected error on a connection: {error!r}", file=sys.stderr)


def _drop(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _UnixHttpServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.idle_timeout)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        try:
            raw = self._read_body(method)
        except _FramingError as exc:
            self.close_connection = True
            self._respond(exc.status, {"error": exc.message})
            return
        if not self.server.begin_request(self.connection):
            self.close_connection = True
            self._respond(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "the VMM is shutting down"})
            return
        try:
            status, data = self._execute(method, raw)
            if self.server.closing:
                self.close_connection = True
            self._respond(status, data)
        finally:
            if self.server.end_request(self.connection):
                self.close_connection = True

    def _execute(self, method: str, raw: bytes) -> tuple[HTTPStatus, bytes]:
        try:
            body = _parse_body(raw)
            status, payload = HTTPStatus.OK, self.server.routes.dispatch(method, self.path.split("?")[0], body)
            return status, json.dumps(payload).encode()
        except Exception as exc:  # a bug must not kill the server thread or the VM
            status, payload = error_response(exc)
            return status, json.dumps(payload).encode()

    def _read_body(self, method: str) -> bytes:
        """The request's body, read in full; raises _FramingError if it cannot be delimited or does not
        arrive (then nothing of it may be executed)."""
        lengths = self.headers.get_all("Content-Length") or []
        if self.headers.get_all("Transfer-Encoding"):
            if lengths:
                raise _FramingError(HTTPStatus.BAD_REQUEST, "both Transfer-Encoding and Content-Length given")
            raise _FramingError(HTTPStatus.LENGTH_REQUIRED,
                                "Transfer-Encoding (chunked bodies) is not supported; send a Content-Length")
        if len(lengths) > 1:
            raise _FramingError(HTTPStatus.BAD_REQUEST, "more than one Content-Length header")
        if not lengths:
            if method in _BODY_METHODS:
                raise _FramingError(HTTPStatus.LENGTH_REQUIRED, f"a {method} needs a Content-Length (0 for no body)")
            return b""
        text = lengths[0].strip()
        if not _DECIMAL.fullmatch(text):
            raise _FramingError(HTTPStatus.BAD_REQUEST, f"invalid Content-Length {text[:40]!r}")
        limit = self.server.limits.max_body
        if len(text.lstrip("0")) > len(str(limit)) or int(text) > limit:
            raise _FramingError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {limit} bytes")
        return self._read_exactly(int(text))

    def _read_exactly(self, length: int) -> bytes:
        limits = self.server.limits
        deadline = time.monotonic() + limits.body_timeout
        chunks: list[bytes] = []
        received = 0
        try:
            while received < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(length - received)
                if not chunk:
                    raise _FramingError(HTTPStatus.BAD_REQUEST,
                                        f"the body ended after {received} of its {length} bytes")
                chunks.append(chunk)
                received += len(chunk)
        except TimeoutError:
            raise _FramingError(HTTPStatus.REQUEST_TIMEOUT, f"only {received} of the body's {length} bytes "
                                f"arrived within {limits.body_timeout} s") from None
        finally:
            with contextlib.suppress(OSError):
                self.connection.settimeout(limits.idle_timeout)
        return b"".join(chunks)

    def _respond(self, status: HTTPStatus | int, payload: JsonObject | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found by http.server itself (bad request line, headers too long...), in JSON."""
        if not self.command:  # the request line was unreadable: answer in HTTP/1.1, not as HTTP/0.9
            self.request_version = self.protocol_version
        self.close_connection = True
        self._respond(code, {"error": message or HTTPStatus(code).phrase})

    def log_message(self, format: str, *args: Any) -> None:
        return None


def _parse_body(raw: bytes) -> JsonObject:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(HTTPStatus.BAD_REQUEST, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
    return body


class ControlServer:
    """Serves `routes` on a Unix socket from a background thread until `close()`.

    The path is checked, and a stale socket replaced, before anything starts; a bad path raises
    ConfigError("--api", ...). The socket is created with mode 0600 whatever the process umask.
    The server thread confines itself as a `seccomp_kind` thread (its connection threads inherit the filter);
    a refused call goes to `on_denied` once set.
    """

    seccomp_kind: str | None = "api"

    def __init__(self, socket_path: Path, routes: Routes, limits: ServerLimits | None = None) -> None:
        self.socket_path = socket_path
        self.limits = limits or ServerLimits()
        check_socket_path(socket_path)
        _claim_socket_path(socket_path)
        self._server = _UnixHttpServer(routes, self.limits)
        try:
            self._identity = _bind(self._server, socket_path)
        except BaseException:
            self._server.server_close()
            raise
        self._closed = False
        self._close_lock = threading.Lock()
        self.on_denied: Callable[[SeccompViolation], None] | None = None
        self.denied: list[SeccompViolation] = []
        self._thread = threading.Thread(target=self._serve, name="api", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._server.routes.prepare()
        if self.seccomp_kind is not None:
            enter_thread(self.seccomp_kind, self._denied)
        self._server.serve_forever(poll_interval=0.1)

    def _denied(self, violation: SeccompViolation) -> None:
        self.denied.append(violation)
        if self.on_denied is not None:
            self.on_denied(violation)

    def close(self) -> None:
        """Stop accepting, drop idle connections, let requests being executed answer (for at most
        `limits.drain_timeout` seconds), and remove the socket. Returns within about that bound."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5.0)
            self._server.drain(self.limits.drain_timeout)
            with contextlib.suppress(OSError):
                if _identity(self.socket_path) == self._identity:  # still ours, not a successor's socket
                    self.socket_path.unlink()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _bind(server: _UnixHttpServer, path: Path) -> tuple[int, int]:
    """Bind and listen at `path` with mode 0600 (set on the socket before bind, so never wider, then
    exactly); returns the socket file's identity. ConfigError for the usual reasons it fails."""
    with contextlib.suppress(OSError):  # Linux gives the socket file this mode (less the umask)
        os.fchmod(server.socket.fileno(), SOCKET_MODE)
    server.server_address = str(path)
    try:
        server.server_bind()
    except OSError as exc:
        raise _bind_error(path, exc) from None
    try:
        os.chmod(path, SOCKET_MODE)
        server.server_activate()
        return _identity(path)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise ConfigError("--api", str(path), f"cannot serve on the socket: {exc.strerror}") from None


def _bind_error(path: Path, exc: OSError) -> ConfigError:
    directory = path.parent
    reasons = {
        errno.ENOENT: f"directory {directory} does not exist",
        errno.ENOTDIR: f"{directory} is not a directory",
        errno.EACCES: f"permission denied: cannot create a socket in {directory}",
        errno.EPERM: f"permission denied: cannot create a socket in {directory}",
        errno.EROFS: f"{directory} is on a read-only file system",
        errno.EADDRINUSE: "the path was created by someone else at the same time",
        errno.ENAMETOOLONG: "a component of the path is too long",
    }
    return ConfigError("--api", str(path), reasons.get(exc.errno or 0, exc.strerror or str(exc)))


def _identity(path: Path) -> tuple[int, int]:
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a dead VMM; refuse a live one or any other kind of file."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return  # binding says what is wrong with the directory, if anything
    except PermissionError:
        raise ConfigError("--api", str(path), f"permission denied: cannot look into {path.parent}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError("--api", str(path), "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)  # a listener whose queue is full answers EAGAIN at once; never hang here
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    except PermissionError:
        raise ConfigError("--api", str(path), "permission denied: the socket belongs to someone else") from None
    except (BlockingIOError, TimeoutError):
        raise ConfigError("--api", str(path), "another VMM is serving on this socket (and is not accepting)") from None
    finally:
        probe.close()
    raise ConfigError("--api", str(path), "another VMM is serving on this socket")
