"""A client for the control API: JSON requests to a VMM's Unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from pyrovisor.errors import ControlError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self._socket_path))
        self.sock = sock


class ApiClient:
    def __init__(self, socket_path: Path, timeout: float = 600.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        endpoint = f"{method} {path}"
        connection = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else b""
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            raw = response.read()
        except FileNotFoundError:
            raise ControlError(endpoint, f"no VMM control socket at {self.socket_path}") from None
        except ConnectionRefusedError:
            raise ControlError(endpoint, f"nothing listens on {self.socket_path} (the VMM has exited?)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ControlError(endpoint, f"connection failed: {exc}") from None
        finally:
            connection.close()
        try:
            document = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            raise ControlError(endpoint, f"the VMM answered with invalid JSON (HTTP {response.status})") from None
        if response.status >= 400:
            message = document.get("error", raw.decode(errors="replace")) if isinstance(document, dict) else raw
            raise ControlError(endpoint, str(message), response.status)
        if not isinstance(document, dict):
            raise ControlError(endpoint, "the VMM answered with something other than a JSON object")
        return document

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.request("POST", path, body or {})
