"""The control API's endpoints for one VM: status, pause, resume, stop, snapshot."""

from __future__ import annotations

import dataclasses
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pyrovisor.api.server import ApiError, JsonObject, Routes
from pyrovisor.migration.source import BackgroundMigration
from pyrovisor.snapshot.codec import encode
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.run_control import RunOutcome, StopReason


class VmRoutes:
    """Binds the VM's endpoints to a Vmm. Other features add theirs to `routes`."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        self.started_at = time.monotonic()
        self.routes = Routes()
        self.routes.add("GET", "/status", self.status)
        self.routes.add("POST", "/pause", self.pause)
        self.routes.add("POST", "/resume", self.resume)
        self.routes.add("POST", "/stop", self.stop)
        self.routes.add("POST", "/snapshot", self.snapshot)
        self.routes.add("POST", "/migrate", self.migrate)
        self.routes.add("GET", "/migration", self.migration_status)
        self.migration: BackgroundMigration | None = None

    def status(self, body: JsonObject) -> JsonObject:
        vmm = self.vmm
        outcome = vmm.outcome
        return {
            "state": vmm.state,
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
        self._require_live()
        if not self.vmm.pause():
            raise ApiError(HTTPStatus.CONFLICT, "the VM stopped while pausing")
        return {"state": self.vmm.state}

    def resume(self, body: JsonObject) -> JsonObject:
        self._require_live()
        self.vmm.resume()
        return {"state": self.vmm.state}

    def stop(self, body: JsonObject) -> JsonObject:
        self.vmm.control.finish(RunOutcome(StopReason.HOST_STOP))
        return {"state": "stopped"}

    def snapshot(self, body: JsonObject) -> JsonObject:
        from pyrovisor.snapshot.take import take_snapshot

        self._require_live()
        path = _field(body, "path", str)
        kind = body.get("kind", "full")
        if kind not in ("full", "diff"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "kind must be 'full' or 'diff'")
        report = take_snapshot(self.vmm, Path(path), kind)
        result: JsonObject = encode(report)
        return result

    def migrate(self, body: JsonObject) -> JsonObject:
        """Start a live migration; with "wait": true, answer when it has finished."""
        from pyrovisor.migration.policy import PrecopyPolicy
        from pyrovisor.migration.source import BackgroundMigration, MigrationOptions

        self._require_live()
        if self.migration is not None and self.migration.running:
            raise ApiError(HTTPStatus.CONFLICT, "a migration is already running")
        destination = _field(body, "to", str)
        policy = PrecopyPolicy(
            downtime_limit_s=float(body.get("downtime_ms", 300)) / 1000,
            max_rounds=int(body.get("max_rounds", 30)),
            timeout_s=float(body.get("timeout_s", 600)),
            on_limit=str(body.get("on_limit", "switch-over")),
            auto_converge=bool(body.get("auto_converge", False)),
        )
        bandwidth = body.get("max_bandwidth")
        options = MigrationOptions(policy=policy, compression=body.get("compress"),
                                   max_bandwidth=float(bandwidth) if bandwidth is not None else None,
                                   verify_memory=bool(body.get("verify", False)))
        self.migration = BackgroundMigration(self.vmm, destination, options)
        if body.get("wait"):
            self.migration.wait()
            return self.migration_status({})
        return {"state": "migrating"}

    def migration_status(self, body: JsonObject) -> JsonObject:
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

    def _require_live(self) -> None:
        if self.vmm.outcome is not None:
            raise ApiError(HTTPStatus.CONFLICT, f"the VM has stopped ({self.vmm.outcome.describe()})")


def _field(body: JsonObject, name: str, kind: type) -> Any:
    if name not in body:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"missing field '{name}'")
    value = body[name]
    if not isinstance(value, kind):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field '{name}' must be a {kind.__name__}")
    return value
