"""Starting the VMs of a host.toml: all of them are admitted (their minima fit together) before the first starts."""

from __future__ import annotations

from collections.abc import Sequence

from pyrovisor.host.config import VmSpec
from pyrovisor.host.host import AdmissionError, Host

MiB = 1 << 20


def check_config_fits(host: Host, specs: Sequence[VmSpec]) -> None:
    """Refuse the whole file, naming the first VM that does not fit, before anything starts."""
    committed = 0
    for count, spec in enumerate(specs, 1):
        committed += spec.minimum
        available = host.available(count)
        if committed > available:
            raise AdmissionError(
                f"cannot admit VM {spec.vm_id!r}: the minima of the first {count} VM(s) ({committed >> 20} MiB) do "
                f"not fit in the budget of {host.settings.budget >> 20} MiB less the host's overhead "
                f"({host.overhead(count) >> 20} MiB)")


def admit_all(host: Host, specs: Sequence[VmSpec]) -> None:
    check_config_fits(host, specs)
    for spec in specs:
        host.create(spec)
