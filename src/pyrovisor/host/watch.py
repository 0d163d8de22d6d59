"""The live view: a rich table of the host's VMs (the API's /vms document), refreshed every second."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

MiB = 1 << 20
COLUMNS = ("vm", "state", "memory", "target", "balloon", "resident", "working set ± CI", "guest free", "shares",
           "ignored", "reclaims", "detail")


def _mib(value: Any) -> str:
    return "-" if value is None else f"{value / MiB:.0f}"


def table(document: dict[str, Any]) -> Table:
    """The table for one GET /vms answer (MiB)."""
    from rich.table import Table

    host = document["host"]
    title = (f"pyrovisor host: {host['running']} running, budget {_mib(host['budget'])} MiB, for guests "
             f"{_mib(host['available'])}, allocated {_mib(host['allocated'])}, host RSS {_mib(host['rss'])} "
             f"(+{_mib(host['helpers_rss'])} helpers), policy {host['policy']}"
             + (" [red]PRESSURE[/red]" if host["pressure"] else ""))
    view = Table(title=title, title_justify="left")
    for column in COLUMNS:
        view.add_column(column, justify="left" if column in ("vm", "state", "detail") else "right")
    for vm in document["vms"]:
        ws = vm["working_set"]
        ci = (f"{_mib(ws)} ({_mib(vm['working_set_low'])}-{_mib(vm['working_set_high'])})" if ws is not None
              else "-")
        balloon = f"{_mib(vm['balloon_actual'])}/{_mib(vm['balloon_target'])}"
        state = vm["state"] if vm["state"] == "running" else f"[yellow]{vm['state']}[/yellow]"
        ignored = f"[red]{vm['ignored']}[/red]" if vm["unresponsive"] else str(vm["ignored"])
        target = _mib(vm["allocation"]) + (" (pinned)" if vm["pinned"] else "")
        view.add_row(vm["vm_id"], state, _mib(vm["configured"]), target, balloon, _mib(vm["resident"]), ci,
                     _mib(vm["guest_free"]), f"{vm['shares']:g}", ignored, str(vm["reclaims"]), vm["detail"][:60])
    return view


def watch(fetch: Callable[[], dict[str, Any]], interval: float = 1.0, until: Callable[[], bool] | None = None) -> None:
    """Show the table, refreshed every `interval` seconds, until Ctrl-C (or `until()` is true)."""
    from rich.live import Live

    from pyrovisor.output import console

    with Live(table(fetch()), console=console(), refresh_per_second=4, screen=False) as live:
        try:
            while until is None or not until():
                time.sleep(interval)
                live.update(table(fetch()))
        except KeyboardInterrupt:
            return
