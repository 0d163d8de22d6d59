"""The control API's endpoints for one VM: status, pause, resume, stop, snapshot."""

from __future__ import annotations

import dataclasses
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pyrovisor.api.server import ApiError, JsonObject, Routes
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
