"""The control API's accounting endpoints: GET /accounting (exits per guest process) and POST /accounting."""

from __future__ import annotations

from http import HTTPStatus
from typing import TYPE_CHECKING

from pyrovisor.api.server import ApiError, JsonObject, Routes, reject_unknown_fields
from pyrovisor.errors import PyrovisorError

if TYPE_CHECKING:
    from pyrovisor.vmm import Vmm


def add_accounting_routes(routes: Routes, vmm: Vmm) -> None:
    """Serve /accounting for `vmm`."""
    handlers = AccountingRoutes(vmm)
    routes.add("GET", "/accounting", handlers.get)
    routes.add("POST", "/accounting", handlers.set_enabled)


class AccountingRoutes:
    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm

    def get(self, body: JsonObject) -> JsonObject:
        from pyrovisor.introspect.accounting import accountant_of, profile_for

        reject_unknown_fields(body, set())
        accountant = accountant_of(self.vmm)
        if accountant is None:
            try:
                profile_for(self.vmm)  # the same error as turning it on would give
            except PyrovisorError as exc:
                raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None
            return {"enabled": False, "accounted_seconds": 0.0, "resolutions": 0, "processes": []}
        return accountant.report()

    def set_enabled(self, body: JsonObject) -> JsonObject:
        """{"enabled": true|false}: start or stop charging exits to processes (the vCPUs park for the switch)."""
        from pyrovisor.introspect.accounting import set_accounting

        reject_unknown_fields(body, {"enabled"})
        enabled = body.get("enabled")
        if not isinstance(enabled, bool):
            raise ApiError(HTTPStatus.BAD_REQUEST, "field 'enabled' must be true or false")
        try:
            accountant = set_accounting(self.vmm, enabled)
        except PyrovisorError as exc:
            raise ApiError(HTTPStatus.CONFLICT, str(exc)) from None
        return {"enabled": accountant.enabled}
