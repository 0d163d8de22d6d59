"""Finds lab models: every module directly inside `pyrovisor.lab` that defines `MODEL`."""

from __future__ import annotations

import importlib
import pkgutil

import pyrovisor.lab as lab_package
from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import LabModel

_INFRASTRUCTURE = {"cli", "model", "registry", "report"}


def discover() -> dict[str, LabModel]:
    """Import the lab's modules and return their models by name, sorted by name."""
    models: dict[str, LabModel] = {}
    for info in pkgutil.iter_modules(lab_package.__path__):
        if info.name.startswith("_") or info.name in _INFRASTRUCTURE:
            continue
        module = importlib.import_module(f"{lab_package.__name__}.{info.name}")
        model: LabModel | None = getattr(module, "MODEL", None)
        if model is not None:
            models[model.name] = model
    return dict(sorted(models.items()))


def get(name: str) -> LabModel:
    models = discover()
    if name not in models:
        raise ConfigError("lab model", name, f"known models: {', '.join(models) or 'none'}")
    return models[name]
