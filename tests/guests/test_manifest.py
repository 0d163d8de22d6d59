"""Every built-in guest runs as its manifest says: expected lines, no FAIL lines, the exit code."""

from __future__ import annotations

import re

import pytest

from pyrovisor.builder import build_vm
from pyrovisor.catalog import GuestSpec, load_catalog
from pyrovisor.config import MachineConfig
from pyrovisor.vstate.run_control import StopReason

pytestmark = pytest.mark.kvm

CATALOG = load_catalog()


def run_guest(spec: GuestSpec) -> tuple[int | None, str, StopReason]:
    output = bytearray()
    config = MachineConfig(kernel=spec.elf, memory_size=spec.memory_size, vcpus=spec.vcpus, cmdline=spec.args,
                           initrd=spec.initrd)
    with build_vm(config, output.extend) as vmm:
        vmm.console.feed(spec.stdin)
        outcome = vmm.run(timeout=spec.timeout)
    return outcome.exit_code, output.decode(errors="replace"), outcome.reason


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_guest_runs_as_its_manifest_says(name: str) -> None:
    spec = CATALOG[name]
    exit_code, console, reason = run_guest(spec)
    assert reason is StopReason.GUEST_EXIT, f"{name} did not exit by itself ({reason.value}):\n{console}"
    for pattern in spec.expect:
        assert re.search(pattern, console, re.MULTILINE), f"{name}: no line matches {pattern!r}:\n{console}"
    assert not re.search(r"^FAIL:", console, re.MULTILINE), console
    assert exit_code == spec.exit_code, console


def test_manifest_lists_hello() -> None:
    assert "hello" in CATALOG and CATALOG["hello"].elf.is_file()
