"""The control API's write-monitor endpoints: GET /monitor, POST /monitor/add and /monitor/remove, GET /monitor/records."""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from pyrovisor.api.server import ApiError, JsonObject, RouteHandler, Routes, reject_unknown_fields

if TYPE_CHECKING:
    from pyrovisor.vmm import Vmm

MAX_PATH_BYTES = 4096


def add_monitor_routes(routes: Routes, vmm: Vmm, migrate: RouteHandler) -> None:
    """Serve /monitor for `vmm`, and serve POST /migrate as `migrate` refused while watches are armed (the
    destination would not trap their writes)."""
    handlers = MonitorRoutes(vmm)
    routes.add("POST", "/migrate", guard_migration(vmm, migrate))
    routes.add("GET", "/monitor", handlers.list)
    routes.add("POST", "/monitor/add", handlers.add)
    routes.add("POST", "/monitor/remove", handlers.remove)
    routes.add("GET", "/monitor/records", handlers.records)
    routes.before_confinement.append(_load_disassembler)  # capstone's C library: mapped before the filter loads


def guard_migration(vmm: Vmm, migrate: RouteHandler) -> RouteHandler:
    """`migrate`, refused with one clear line while the VM has write watches."""
    def guarded(body: JsonObject) -> JsonObject:
        from pyrovisor.introspect.write_monitor import saved_watches

        armed = saved_watches(vmm)
        if armed:
            raise ApiError(HTTPStatus.CONFLICT, f"cannot migrate while {len(armed)} write watch(es) are armed: the "
                                                "destination would not trap their writes (remove them first: "
                                                "pyrovisor monitor SOCKET remove ID)")
        return migrate(body)
    return guarded


def _load_disassembler() -> None:
    import contextlib

    with contextlib.suppress(ImportError):
        import capstone  # noqa: F401


class MonitorRoutes:
    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm

    def list(self, body: JsonObject) -> JsonObject:
        reject_unknown_fields(body, set())
        from pyrovisor.introspect.write_monitor import existing_monitor

        monitor = existing_monitor(self.vmm)
        if monitor is None:
            return {"watches": [], "collateral_writes": 0, "log_failures": 0}
        return {"watches": [monitor.describe(watch) for watch in monitor.watches],
                "collateral_writes": monitor.collateral_writes, "log_failures": monitor.log_failures}

    def add(self, body: JsonObject) -> JsonObject:
        """One of {"gpa", "size"}, {"pid", "gva", "size"} or {"symbol"}; "log": a JSON-lines file for the records;
        "mode": "memslot" (the default: full records) or "uffd" (userfaultfd write protection, address only)."""
        reject_unknown_fields(body, {"gpa", "gva", "pid", "size", "symbol", "log", "mode"})
        from pyrovisor.introspect.write_monitor import monitor_of

        log = body.get("log")
        if log is not None and (not isinstance(log, str) or not log or "\0" in log
                                or len(log.encode()) > MAX_PATH_BYTES):
            raise ApiError(HTTPStatus.BAD_REQUEST, "field 'log' must be a non-empty path without NUL bytes")
        mode = body.get("mode", "memslot")
        if mode not in ("memslot", "uffd"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "field 'mode' must be 'memslot' or 'uffd'")
        chosen = [name for name in ("gpa", "gva", "symbol") if name in body]
        if len(chosen) != 1:
            raise ApiError(HTTPStatus.BAD_REQUEST, "give exactly one of 'gpa', 'gva' (with 'pid') or 'symbol'")
        symbol: str | None = None
        if chosen == ["symbol"]:
            if "size" in body or "pid" in body:
                raise ApiError(HTTPStatus.BAD_REQUEST, "a symbol watch takes no 'size' or 'pid' (the symbol has both)")
            symbol = body["symbol"]
            if not isinstance(symbol, str) or not symbol:
                raise ApiError(HTTPStatus.BAD_REQUEST, "field 'symbol' must be a non-empty string")
        elif chosen == ["gpa"]:
            if "pid" in body:
                raise ApiError(HTTPStatus.BAD_REQUEST, "'pid' goes with 'gva', not 'gpa'")
            address, size = _address(body, "gpa"), _size(body)
        else:
            if "pid" not in body:
                raise ApiError(HTTPStatus.BAD_REQUEST, "a 'gva' watch needs the 'pid' of the process")
            pid, address, size = _integer(body, "pid"), _address(body, "gva"), _size(body)
        if self.vmm.state.terminal:
            raise ApiError(HTTPStatus.CONFLICT, f"the VM is {self.vmm.state.value}")
        monitor = monitor_of(self.vmm)
        if symbol is not None:
            watch = monitor.watch_symbol(symbol, log, mode)
        elif chosen == ["gpa"]:
            watch = monitor.watch_physical(address, size, log, mode)
        else:
            watch = monitor.watch_virtual(pid, address, size, log, mode)
        return monitor.describe(watch)

    def remove(self, body: JsonObject) -> JsonObject:
        reject_unknown_fields(body, {"id"})
        from pyrovisor.introspect.write_monitor import existing_monitor

        watch_id = _integer(body, "id")
        monitor = existing_monitor(self.vmm)
        if monitor is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"no watch {watch_id}: this VM has no watches")
        found = next((each for each in monitor.watches if each.id == watch_id), None)
        document = monitor.describe(found) if found is not None else {}
        monitor.remove(watch_id)  # an unknown id: one line naming the watches there are
        return document

    def records(self, body: JsonObject) -> JsonObject:
        reject_unknown_fields(body, set())
        from pyrovisor.introspect.write_monitor import existing_monitor

        monitor = existing_monitor(self.vmm)
        return {"records": [] if monitor is None else list(monitor.recent)}



def _integer(body: JsonObject, name: str) -> int:
    value: Any = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field '{name}' must be an integer")
    return value


def _address(body: JsonObject, name: str) -> int:
    """An address as a JSON integer or a string such as "0x10f000"."""
    value: Any = body.get(name)
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"field '{name}' must be an address (an integer or '0x...')") \
                from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"field '{name}' must be an address (an integer or '0x...')")
    return value


def _size(body: JsonObject) -> int:
    if "size" not in body:
        return 8
    size = _address(body, "size")
    if size < 1:
        raise ApiError(HTTPStatus.BAD_REQUEST, "field 'size' must be at least 1 byte")
    return size
