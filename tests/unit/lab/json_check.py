"""The check every lab model's --json must pass: one document, valid against the published schema."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from pyrovisor.api.cli import main
from pyrovisor.lab.export import SCHEMA_PATH


def lab_json(capsys: pytest.CaptureFixture[str], model: str, *options: str) -> dict[str, Any]:
    """Run `pyrovisor lab MODEL --json OPTIONS`, check the document against the schema and return it."""
    capsys.readouterr()
    assert main(["lab", model, "--json", *options]) == 0
    document: dict[str, Any] = json.loads(capsys.readouterr().out)
    jsonschema.validate(document, json.loads(SCHEMA_PATH.read_text()))
    assert document["model"] == model
    return document
