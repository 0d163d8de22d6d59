"""The host's HTTP API on a Unix socket: list, create, stop, pin a memory target, status and /metrics (Prometheus
text), served by api/server.py's ControlServer."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path

from pyrovisor.api import server as control
from pyrovisor.api.server import ApiError, ControlServer, JsonObject, Routes, ServerLimits
from pyrovisor.errors import ConfigError
from pyrovisor.host.config import parse_vm_spec
from pyrovisor.host.host import AdmissionError, Host, HostedVm, UnknownVmError

MiB = 1 << 20
VM_PATH = re.compile(r"/vms/(?P<id>[^/]+)(?P<action>/stop|/target)?")
VmHandler = Callable[[str, JsonObject], JsonObject]
TextHandler = Callable[[], str]


class HostRoutes(Routes):
    """Routes with `/vms/ID[/stop|/target]` paths and text endpoints (/metrics) besides the JSON ones."""

    def __init__(self, host: Host) -> None:
        super().__init__()
        self.host = host
        self.add("GET", "/status", self.status)
        self.add("GET", "/vms", self.list)
        self.add("POST", "/vms", self.create)
        self.vm_routes: dict[tuple[str, str], VmHandler] = {
            ("GET", ""): self.show, ("DELETE", ""): self.stop, ("POST", "/stop"): self.stop,
            ("PUT", "/target"): self.target, ("POST", "/target"): self.target,
        }
        self.text_routes: dict[str, TextHandler] = {"/metrics": self.metrics}

    def dispatch(self, method: str, path: str, body: JsonObject) -> JsonObject:
        match = VM_PATH.fullmatch(path)
        if match is None:
            return _errors(lambda: super(HostRoutes, self).dispatch(method, path, body))
        handler = self.vm_routes.get((method, match["action"] or ""))
        if handler is None:
            raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")
        return _errors(lambda: handler(match["id"], body))

    @property
    def paths(self) -> list[tuple[str, str]]:
        return sorted([*super().paths, *((m, f"/vms/{{id}}{a}") for m, a in self.vm_routes),
                       *(("GET", p) for p in self.text_routes)])

    # --- handlers -------------------------------------------------------------------------------------------------
    def status(self, body: JsonObject) -> JsonObject:
        _no_fields(body)
        return host_document(self.host)

    def list(self, body: JsonObject) -> JsonObject:
        _no_fields(body)
        samples = self.host.samples()
        return {"host": dataclasses.asdict(self.host.host_sample(samples)),
                "vms": [dataclasses.asdict(sample) for sample in samples]}

    def create(self, body: JsonObject) -> JsonObject:
        settings = self.host.settings
        spec = parse_vm_spec(body, _free_id(self.host), settings.default_min, settings.log_dir)
        hosted = self.host.create(spec)
        return vm_document(hosted)

    def show(self, vm_id: str, body: JsonObject) -> JsonObject:
        _no_fields(body)
        return vm_document(self.host.get(vm_id))

    def stop(self, vm_id: str, body: JsonObject) -> JsonObject:
        _no_fields(body)
        return {"id": vm_id, "state": self.host.stop(vm_id)}

    def target(self, vm_id: str, body: JsonObject) -> JsonObject:
        """{"memory_mib": N}: the VM holds N MiB (its balloon takes the rest) until {"memory_mib": null} gives it
        back to the policy."""
        unknown = sorted(set(body) - {"memory_mib"})
        if unknown:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s): {', '.join(unknown)}")
        if "memory_mib" not in body:
            raise ApiError(HTTPStatus.BAD_REQUEST, "missing field 'memory_mib' (a number of MiB, or null for the "
                                                   "policy)")
        self.host.get(vm_id)  # 404 before 400 for an unknown VM
        value = body["memory_mib"]
        if value is None:
            return vm_document(self.host.pin(vm_id, None))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field 'memory_mib' must be a number of MiB (or null), not "
                                                   f"{json.dumps(value)[:40]}")
        memory = int(value * MiB) // (2 * MiB) * (2 * MiB)
        return vm_document(self.host.pin(vm_id, memory))

    def metrics(self) -> str:
        from pyrovisor.host.metrics import render

        return render(self.host)


def _errors(call: Callable[[], JsonObject]) -> JsonObject:
    """The host's own errors as HTTP statuses: unknown VM 404, admission 409; the rest as the server maps them."""
    try:
        return call()
    except UnknownVmError as exc:
        raise ApiError(HTTPStatus.NOT_FOUND, str(exc)) from None
    except AdmissionError as exc:
        raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None
    except ConfigError as exc:
        if exc.field == "vm id" and "already in use" in exc.reason:
            raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None
        raise


def _no_fields(body: JsonObject) -> None:
    if body:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown field(s): {', '.join(sorted(body))}")


def _free_id(host: Host) -> str:
    index = len(host.vms) + 1
    while f"vm{index}" in host.vms:
        index += 1
    return f"vm{index}"


def vm_document(hosted: HostedVm) -> JsonObject:
    return dataclasses.asdict(hosted.sample())


def host_document(host: Host) -> JsonObject:
    document: JsonObject = dataclasses.asdict(host.host_sample())
    document["settings"] = {"budget_mib": host.settings.budget / MiB, "policy": dataclasses.asdict(
        host.settings.policy), "sampling": dataclasses.asdict(host.settings.sampling)}
    return document


# --- serving text next to JSON --------------------------------------------------------------------------------------
class _HostHandler(control._Handler):
    """The control API's request handler, plus text answers for HostRoutes.text_routes (/metrics).

    api/server.py answers JSON only; a route returning another content type would belong there (a handler result
    carrying its own body and type). Until then this subclass serves the text routes and hands the rest on."""

    def _execute(self, method: str, raw: bytes) -> tuple[HTTPStatus, bytes]:
        routes = self.server.routes
        path = self.path.split("?")[0]
        self._content_type = "application/json"
        if isinstance(routes, HostRoutes) and path in routes.text_routes:
            if method != "GET":
                return HTTPStatus.METHOD_NOT_ALLOWED, json.dumps({"error": f"{method} is not allowed on {path}"}).encode()
            try:
                text = routes.text_routes[path]()
            except Exception as exc:
                status, payload = control.error_response(exc)
                return status, json.dumps(payload).encode()
            from pyrovisor.host.metrics import CONTENT_TYPE

            self._content_type = CONTENT_TYPE
            return HTTPStatus.OK, text.encode()
        return super()._execute(method, raw)

    def _respond(self, status: HTTPStatus | int, payload: JsonObject | bytes) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", getattr(self, "_content_type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class HostServer(ControlServer):
    """ControlServer serving HostRoutes, /metrics as text."""

    seccomp_kind = None  # its threads create and close whole VMs: not one of the confined kinds

    def __init__(self, socket_path: Path, routes: HostRoutes, limits: ServerLimits | None = None) -> None:
        super().__init__(socket_path, routes, limits)
        self._server.RequestHandlerClass = _HostHandler


def serve(host: Host, socket_path: Path) -> HostServer:
    return HostServer(socket_path, HostRoutes(host))


def raw_get(socket_path: Path, path: str, timeout: float = 30.0) -> tuple[int, str, str]:
    """GET `path` and return (status, content type, body text): for /metrics, which is not JSON."""
    import http.client
    import socket

    from pyrovisor.errors import ControlError

    connection = http.client.HTTPConnection("localhost", timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
        connection.sock = sock
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read().decode()
    except FileNotFoundError:
        raise ControlError(f"GET {path}", f"no host control socket at {socket_path}") from None
    except ConnectionRefusedError:
        raise ControlError(f"GET {path}", f"nothing listens on {socket_path} (the host has exited?)") from None
    except OSError as exc:
        raise ControlError(f"GET {path}", f"connection failed: {exc}") from None
    finally:
        connection.close()


__all__ = ["HostRoutes", "HostServer", "raw_get", "serve"]
