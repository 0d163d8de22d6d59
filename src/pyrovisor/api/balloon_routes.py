"""The control API's balloon endpoints: GET /balloon (target, actual, statistics, counters) and POST /balloon."""

from __future__ import annotations

import math
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from pyrovisor.api.server import ApiError, JsonObject, Routes, reject_unknown_fields

if TYPE_CHECKING:
    from pyrovisor.devices.virtio.balloon import VirtioBalloon
    from pyrovisor.vmm import Vmm

MiB = 1 << 20
PAGES_PER_MIB = MiB >> 12


def add_balloon_routes(routes: Routes, vmm: Vmm) -> None:
    """Serve /balloon for `vmm` (only stored here: routing needs no VM)."""
    handlers = BalloonRoutes(vmm)
    routes.add("GET", "/balloon", handlers.get)
    routes.add("POST", "/balloon", handlers.set_target)


class BalloonRoutes:
    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm

    def get(self, body: JsonObject) -> JsonObject:
        reject_unknown_fields(body, set())
        return balloon_document(self._balloon())

    def set_target(self, body: JsonObject) -> JsonObject:
        """{"target_mib": N}: the memory the guest should give back, 0 to all of its RAM."""
        reject_unknown_fields(body, {"target_mib"})
        if "target_mib" not in body:
            raise ApiError(HTTPStatus.BAD_REQUEST, "missing field 'target_mib'")
        value = body["target_mib"]
        ram_mib = self.vmm.memory.size / MiB
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ApiError(HTTPStatus.BAD_REQUEST, "field 'target_mib' must be a number")
        if not 0 <= value <= ram_mib:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field 'target_mib' must be between 0 and {ram_mib:g} "
                                                   f"(the guest's RAM), not {value:g}")
        balloon = self._balloon()
        state = self.vmm.state
        if state.terminal:
            raise ApiError(HTTPStatus.CONFLICT, f"the VM is {state.value}")
        balloon.set_target(min(round(value * PAGES_PER_MIB), self.vmm.memory.size >> 12))
        return balloon_document(balloon)

    def _balloon(self) -> VirtioBalloon:
        from pyrovisor.devices.virtio.balloon import find_balloon

        balloon = find_balloon(self.vmm.devices)
        if balloon is None:
            raise ApiError(HTTPStatus.CONFLICT, "this VM has no balloon (start it with --balloon)")
        return balloon



def balloon_document(balloon: VirtioBalloon) -> JsonObject:
    """The balloon as GET /balloon shows it."""
    from pyrovisor.persist.codec import encode

    status = balloon.status()
    stats: JsonObject | None = None
    if status.stats is not None:
        stats = encode(status.stats)
        stats["age_s"] = round(max(0.0, time.time() - status.stats.arrived), 3)
    return {
        "target_pages": status.target_pages,
        "target_mib": round(status.target_pages / PAGES_PER_MIB, 3),
        "actual_pages": status.actual_pages,
        "actual_mib": round(status.actual_pages / PAGES_PER_MIB, 3),
        "ballooned_pages": status.ballooned_pages,
        "driver_ready": status.driver_ready,
        "negotiated": list(status.negotiated),
        "stats_interval_s": status.stats_interval_s,
        "stats_held": status.stats_held,
        "stats": stats,
        "counters": encode(status.counters),
    }


def describe_balloon(document: dict[str, Any]) -> str:
    """GET /balloon's answer for people (`pyrovisor ctl SOCKET balloon`)."""
    lines = [f"target {document['target_mib']:g} MiB ({document['target_pages']} pages), the guest reports "
             f"{document['actual_mib']:g} MiB ({document['actual_pages']} pages) in its balloon"
             + ("" if document["driver_ready"] else "; no driver has started the device")]
    stats = document.get("stats")
    if stats:
        shown = [f"{name} {_mib(stats[name])}" for name in ("free", "available", "caches", "total")
                 if stats.get(name) is not None]
        shown += [f"{name.replace('_', ' ')} {stats[name]}" for name in ("major_faults", "minor_faults")
                  if stats.get(name) is not None]
        shown += [f"{name.replace('_', ' ')} {_mib(stats[name])}" for name in ("swap_in", "swap_out")
                  if stats.get(name) is not None]
        lines.append(f"guest memory ({stats['age_s']:g} s ago): " + (", ".join(shown) or "no statistics supplied"))
    else:
        lines.append("no memory statistics yet")
    counters = document["counters"]
    lines.append(f"inflated {counters['inflated_pages']} pages, deflated {counters['deflated_pages']}, rejected "
                 f"{counters['inflate_rejected'] + counters['deflate_rejected']}; free page reports "
                 f"{counters['reports']} ({_mib(counters['reported_bytes'])})")
    return "\n".join(lines)


def _mib(value: int) -> str:
    return f"{value / MiB:.1f} MiB"
