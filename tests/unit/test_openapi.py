"""docs/api/openapi.yaml describes exactly the endpoints the control API serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import yaml

from pyrovisor.api.vm_routes import VmRoutes
from pyrovisor.vmm import Vmm

SPEC = Path(__file__).resolve().parents[2] / "docs" / "api" / "openapi.yaml"


def test_every_route_is_documented_and_nothing_else() -> None:
    spec = yaml.safe_load(SPEC.read_text())
    documented = {(method.upper(), path) for path, methods in spec["paths"].items() for method in methods}
    served = set(VmRoutes(cast(Vmm, Any)).routes.paths)  # routing needs no VM
    assert documented == served


def test_every_reference_resolves() -> None:
    spec = yaml.safe_load(SPEC.read_text())

    def references(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [ref for value in node.values() for ref in references(value)]
        if isinstance(node, list):
            return [ref for value in node for ref in references(value)]
        return []

    for reference in references(spec):
        target: Any = spec
        for part in reference.removeprefix("#/").split("/"):
            target = target[part]
        assert target, reference
