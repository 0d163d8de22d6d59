"""The control API of a running VM: JSON over HTTP on a Unix socket (Firecracker's convention)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from pyrovisor.errors import ConfigError, PyrovisorError

MAX_BODY = 1 << 20
JsonObject = dict[str, Any]
RouteHandler = Callable[[JsonObject], JsonObject]


@dataclass(frozen=True)
class ApiError(Exception):
    """An error with an HTTP status, for problems the caller made (bad request, conflict...)."""

    status: HTTPStatus
    message: str


class Routes:
    """(method, path) → handler taking the JSON body and returning a JSON object."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], RouteHandler] = {}

    def add(self, method: str, path: str, handler: RouteHandler) -> None:
        self._routes[(method.upper(), path)] = handler

    def dispatch(self, method: str, path: str, body: JsonObject) -> JsonObject:
        handler = self._routes.get((method, path))
        if handler is None:
            if any(route_path == path for _, route_path in self._routes):
                raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")
            raise ApiError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
        return handler(body)

    @property
    def paths(self) -> list[tuple[str, str]]:
        return sorted(self._routes)


class _UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = False
    block_on_close = True  # closing waits for answers in flight (e.g. a migration's final result)
    routes: Routes


class _Handler(BaseHTTPRequestHandler):
    server: _UnixHttpServer
    protocol_version = "HTTP/1.1"

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
            body = self._read_body()
            status, payload = HTTPStatus.OK, self.server.routes.dispatch(method, self.path.split("?")[0], body)
        except ApiError as exc:
            status, payload = exc.status, {"error": exc.message}
        except PyrovisorError as exc:
            status, payload = HTTPStatus.BAD_REQUEST, {"error": str(exc), "type": type(exc).__name__}
        except Exception as exc:  # a bug must not kill the server thread or the VM
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc!r}"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> JsonObject:
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit():
            raise ApiError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        length = int(length_text)
        if length > MAX_BODY:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes")
        if length == 0:
            return {}
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ApiError(HTTPStatus.BAD_REQUEST, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "request body must be a JSON object")
        return body

    def log_message(self, format: str, *args: Any) -> None:
        return None


class ControlServer:
    """Serves `routes` on a Unix socket from a background thread until `close()`."""

    def __init__(self, socket_path: Path, routes: Routes) -> None:
        self.socket_path = socket_path
        _claim_socket_path(socket_path)
        old_umask = os.umask(0o177)  # the socket is the owner's alone (0600)
        try:
            self._server = _UnixHttpServer(str(socket_path), _Handler)
        finally:
            os.umask(old_umask)
        self._server.routes = routes
        self._thread = threading.Thread(target=self._server.serve_forever, name="api", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def __enter__(self) -> ControlServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a dead VMM; refuse a live one or any other kind of file."""
    if not path.exists():
        return
    if not path.is_socket():
        raise ConfigError("--api", str(path), "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ConfigError("--api", str(path), "another VMM is serving on this socket")
