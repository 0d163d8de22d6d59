"""The control API's endpoints for one VM: status, pause, resume, stop, snapshot, migrate."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrovisor.api.server import ApiError, JsonObject, Routes, reject_unknown_fields
from pyrovisor.errors import LifecycleError
from pyrovisor.persist.codec import encode
from pyrovisor.vmm import Vmm

if TYPE_CHECKING:
    from pyrovisor.migration.source import BackgroundMigration

MAX_PATH_BYTES = 4096


class VmRoutes:
    """Binds the VM's endpoints to a Vmm. Other features add theirs to `routes`.

    Every handler validates its body before acting; requests that conflict with the VM's state get 409
    with the state named, through the VM's lifecycle (the one owner of whether it runs).
    """

    def __init__(self, vmm: Vmm, routes: Routes | None = None) -> None:
        """Adds the endpoints to `routes` (a server's, already listening) or to a new table."""
        self.vmm = vmm
        self.started_at = time.monotonic()
        self.routes = routes if routes is not None else Routes()
        self.routes.add("GET", "/status", self.status)
        self.routes.add("POST", "/pause", self.pause)
        self.routes.add("POST", "/resume", self.resume)
        self.routes.add("POST", "/stop", self.stop)
        self.routes.add("POST", "/snapshot", self.snapshot)
        self.routes.add("POST", "/migrate", self.migrate)
        self.routes.add("GET", "/migration", self.migration_status)
        from pyrovisor.api.balloon_routes import add_balloon_routes
        add_balloon_routes(self.routes, vmm)
        from pyrovisor.api.tpm_routes import add_tpm_routes
        add_tpm_routes(self.routes, vmm)
        from pyrovisor.api.accounting_routes import add_accounting_routes
        add_accounting_routes(self.routes, vmm)
        from pyrovisor.api.monitor_routes import add_monitor_routes
        add_monitor_routes(self.routes, vmm, self.migrate)  # also refuses /migrate while write watches are armed
        self.migration: BackgroundMigration | None = None

    def status(self, body: JsonObject) -> JsonObject:
        _fields(body, {})
        vmm = self.vmm
        outcome = vmm.outcome
        return {
            "state": vmm.state.value,
            "held_by": vmm.lifecycle.held_by,
            "vcpus": len(vmm.vcpus),
            "memory_bytes": vmm.memory.size,
            "guest": vmm.kernel.path,
            "uptime_seconds": round(time.monotonic() - self.started_at, 3),
            "exits": {str(vcpu.index): dataclasses.asdict(vcpu.counters) for vcpu in vmm.vcpus},
            "outcome": None if outcome is None else {"reason": outcome.reason.value, "exit_code": outcome.exit_code,
                                                     "detail": outcome.describe()},
            "last_snapshot": None if vmm.last_snapshot is None else str(vmm.last_snapshot[0]),
        }

    def pause(self, body: JsonObject) -> JsonObject:
        _fields(body, {})
        with _conflicts():
            state = self.vmm.pause()
        return {"state": state.value}

    def resume(self, body: JsonObject) -> JsonObject:
        """Release the user's pause; the answer names any other holds that keep the guest parked."""
        _fields(body, {})
        with _conflicts():
            state = self.vmm.resume()
        answer: JsonObject = {"state": state.value}
        others = self.vmm.lifecycle.held_by
        if others:
            answer["held_by"] = others
        return answer

    def stop(self, body: JsonObject) -> JsonObject:
        _fields(body, {})
        self.vmm.request_stop()
        return {"state": self.vmm.state.value}

    def snapshot(self, body: JsonObject) -> JsonObject:
        from pyrovisor.snapshot.take import take_snapshot

        fields = _fields(body, {"path": (str, REQUIRED), "kind": (str, "full")})
        path = fields["path"]
        if not path or "\0" in path or len(path.encode()) > MAX_PATH_BYTES:
            raise ApiError(HTTPStatus.BAD_REQUEST, "field 'path' must be a non-empty path without NUL bytes")
        if fields["kind"] not in ("full", "diff"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "kind must be 'full' or 'diff'")
        with _conflicts():
            report = take_snapshot(self.vmm, Path(path), fields["kind"])
        result: JsonObject = encode(report)
        return result

    def migrate(self, body: JsonObject) -> JsonObject:
        """Start a live migration; with "wait": true, answer when it has finished."""
        from pyrovisor.migration.policy import PrecopyPolicy
        from pyrovisor.migration.source import BackgroundMigration, MigrationOptions

        fields = _fields(body, {
            "to": (str, REQUIRED), "downtime_ms": (float, 300.0), "max_rounds": (int, 30), "timeout_s": (float, 600.0),
            "on_limit": (str, "switch-over"), "auto_converge": (bool, False), "max_bandwidth": (float, None),
            "compress": (str, None), "verify": (bool, False), "wait": (bool, False), "psk_file": (str, None),
        })
        for name in ("downtime_ms", "max_rounds", "timeout_s", "max_bandwidth"):
            if fields[name] is not None and fields[name] <= 0:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"field '{name}' must be positive")
        if fields["on_limit"] not in ("switch-over", "cancel"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "on_limit must be 'switch-over' or 'cancel'")
        if fields["compress"] not in (None, "lz4", "zstd"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "compress must be 'lz4', 'zstd' or null")
        if self.migration is not None and self.migration.running:
            raise ApiError(HTTPStatus.CONFLICT, "a migration is already running")
        state = self.vmm.state
        if state.value != "running":
            raise ApiError(HTTPStatus.CONFLICT, f"cannot migrate: the VM is {state.value}")
        policy = PrecopyPolicy(downtime_limit_s=fields["downtime_ms"] / 1000, max_rounds=fields["max_rounds"],
                               timeout_s=fields["timeout_s"], on_limit=fields["on_limit"],
                               auto_converge=fields["auto_converge"])
        options = MigrationOptions(policy=policy, compression=fields["compress"], max_bandwidth=fields["max_bandwidth"],
                                   verify_memory=fields["verify"], psk_file=fields["psk_file"])
        self.migration = BackgroundMigration(self.vmm, fields["to"], options)
        if fields["wait"]:
            self.migration.wait()
            return self.migration_status({})
        return {"state": "migrating"}

    def migration_status(self, body: JsonObject) -> JsonObject:
        _fields(body, {})
        migration = self.migration
        if migration is None:
            return {"state": "idle"}
        progress = migration.progress
        state = "migrating" if migration.running else ("completed" if migration.result is not None else "failed")
        document: JsonObject = {
            "state": state, "phase": progress.phase, "round": progress.round, "pages_total": progress.pages_total,
            "pages_left": progress.pages_left, "pages_sent": progress.pages_sent,
            "bandwidth_bytes_per_s": progress.bandwidth_bytes_per_s, "rounds": encode(list(progress.rounds)),
        }
        if migration.result is not None:
            document["result"] = encode(migration.result)
        if migration.error is not None:
            document["error"] = migration.error
        return document


@contextmanager
def _conflicts() -> Iterator[None]:
    """A request that does not fit the VM's state is the caller's conflict (409), naming the state."""
    try:
        yield
    except LifecycleError as exc:
        raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None


REQUIRED = object()  # a field's default in a spec: the request must give it
_KIND_NAMES: dict[type, str] = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
_CHECKS: dict[type, Callable[[Any], bool]] = {
    str: lambda value: isinstance(value, str),
    int: lambda value: isinstance(value, int) and not isinstance(value, bool),
    float: lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    bool: lambda value: isinstance(value, bool),
}


def _fields(body: JsonObject, spec: dict[str, tuple[type, Any]]) -> dict[str, Any]:
    """The body's fields checked against `spec` (name → (type, default)): REQUIRED fields must be there,
    a None default also accepts null. Unknown fields and wrong types are 400s and never reach a handler."""
    reject_unknown_fields(body, spec)
    values: dict[str, Any] = {}
    for name, (kind, default) in spec.items():
        if name not in body:
            if default is REQUIRED:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"missing field '{name}'")
            values[name] = default
            continue
        value = body[name]
        if value is None and default is None:
            values[name] = None
        elif not _CHECKS[kind](value):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field '{name}' must be {_KIND_NAMES[kind]}")
        else:
            values[name] = float(value) if kind is float else value
    return values
