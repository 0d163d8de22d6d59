"""Two test hosts on one machine: network namespaces joined by a veth pair, made and removed by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]


def netns_unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (.ci/run installs it)"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def two_hosts(subnet: str = "10.231.7") -> Iterator[tuple[Host, Host]]:
    """Namespaces `pyrovisor-a-<pid>` (subnet.1) and `pyrovisor-b-<pid>` (subnet.2), linked by veth."""
    tag = str(os.getpid())
    first, second = Host(f"pyrovisor-a-{tag}", f"{subnet}.1"), Host(f"pyrovisor-b-{tag}", f"{subnet}.2")
    created: list[str] = []
    try:
        for host in (first, second):
            _ip("netns", "add", host.namespace)
            created.append(host.namespace)
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        _ip("link", "add", f"pv-a-{tag}"[:15], "netns", first.namespace, "type", "veth",
            "peer", "name", f"pv-b-{tag}"[:15], "netns", second.namespace)
        for host, device in ((first, f"pv-a-{tag}"[:15]), (second, f"pv-b-{tag}"[:15])):
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", device)
            _ip("-n", host.namespace, "link", "set", device, "up")
        yield first, second
    finally:
        for namespace in created:  # deleting a namespace also deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
