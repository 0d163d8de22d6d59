"""The lab's models: a table of names and summaries that costs nothing to read, and their modules on demand."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyrovisor.errors import ConfigError

if TYPE_CHECKING:
    from pyrovisor.lab.model import LabModel

_INFRASTRUCTURE = {"cli", "model", "registry", "report"}


@dataclass(frozen=True)
class ModelEntry:
    """Where a model lives and what it computes, known without importing it (numpy, the MMU, ...)."""

    module: str  # inside pyrovisor.lab; the module sets MODEL
    summary: str  # the same text as MODEL.summary (tests/unit/test_cli_args.py checks they agree)


# Sorted by name. A new model module adds its line here; the test above fails until it does.
MODELS: dict[str, ModelEntry] = {
    "balloon": ModelEntry("balloon", "Share-based memory reclamation with Waldspurger's idle memory tax and "
                                     "sampled working sets"),
    "false-sharing": ModelEntry("false_sharing", "False sharing: line transfers between cores, N threads on one "
                                                 "line vs separate lines"),
    "iommu": ModelEntry("iommu", "Nested (two-stage) vs shadow IOMMU translation: cost per map/unmap vs per DMA, "
                                 "and the crossover"),
    "mixed-criticality": ModelEntry("mixed_criticality", "Priority inversion (none, inheritance, ceiling, immediate "
                                                         "ceiling) and AMC mixed criticality, simulated and analysed"),
    "nested-paging": ModelEntry("nested_paging", "Nested (2-D) page walks on a software MMU: references per walk, "
                                                 "walks per access, QPS model"),
    "permissions": ModelEntry("permissions", "EPT R/W/X combinations (misconfigurations, execute-only) and an audit "
                                             "for invisible code"),
    "placement": ModelEntry("placement", "SR-IOV vs virtio placement on a cluster where some hosts lack an IOMMU: "
                                         "throughput vs migratability"),
    "precopy": ModelEntry("precopy", "Pre-copy live migration: rounds, total time, downtime, bytes (Liu et al. model "
                                     "+ WWS simulator)"),
    "rowhammer": ModelEntry("rowhammer", "Rowhammer flips in a DRAM bank against SECDED (72,64) ECC: corrected, "
                                         "machine check, silent"),
    "sev": ModelEntry("sev", "SEV memory encryption: walk and access cost when every DRAM fetch pays a decryption "
                             "latency"),
}


def get(name: str) -> LabModel:
    """Import one model's module and return its model."""
    entry = MODELS.get(name)
    if entry is None:
        raise ConfigError("lab model", name, f"known models: {', '.join(MODELS) or 'none'}")
    model: LabModel = importlib.import_module(f"pyrovisor.lab.{entry.module}").MODEL
    return model


def discover() -> dict[str, LabModel]:
    """Import every module directly inside `pyrovisor.lab` and return the models they define, by name.

    Slow (it imports them all); the command line uses MODELS instead, and the tests compare the two."""
    import pyrovisor.lab as lab_package

    models: dict[str, LabModel] = {}
    for info in pkgutil.iter_modules(lab_package.__path__):
        if info.name.startswith("_") or info.name in _INFRASTRUCTURE:
            continue
        module = importlib.import_module(f"{lab_package.__name__}.{info.name}")
        model: LabModel | None = getattr(module, "MODEL", None)
        if model is not None:
            models[model.name] = model
    return dict(sorted(models.items()))
