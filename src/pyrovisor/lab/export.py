"""A lab result as a JSON document (inputs, assumptions, headline, tables) and its tables as CSV files."""

from __future__ import annotations

import argparse
import csv
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyrovisor.lab.model import LabResult, Table
from pyrovisor.lab.stats import Estimate

FORMAT = "pyrovisor-lab-result/1"  # the "format" field; result.schema.json describes the document
SCHEMA_PATH = Path(__file__).with_name("result.schema.json")
# Options of the lab command itself, not of the model: left out of "inputs".
_OUTPUT_OPTIONS = {"plot", "json", "csv", "sweep"}

JsonValue = None | bool | int | float | str | list["JsonValue"] | dict[str, "JsonValue"]


@dataclass(frozen=True)
class SweepPoint:
    value: float
    headline: tuple[tuple[str, float | Estimate], ...]


@dataclass(frozen=True)
class Sweep:
    """The headline figures of one model run per value of one parameter."""

    parameter: str
    points: tuple[SweepPoint, ...]


def json_value(value: object) -> JsonValue:
    """A cell or input as JSON: estimates as objects, non-finite floats as strings, paths and the like as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Estimate):
        return {key: json_value(v) for key, v in value.as_json().items()}
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item"):  # a numpy scalar
        return json_value(value.item())
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    return str(value)


def inputs_of(args: argparse.Namespace) -> dict[str, JsonValue]:
    return {name: json_value(value) for name, value in sorted(vars(args).items()) if name not in _OUTPUT_OPTIONS}


def table_json(table: Table) -> dict[str, JsonValue]:
    return {"title": table.title, "columns": list(table.columns),
            "rows": [[json_value(cell) for cell in row] for row in table.rows], "notes": list(table.notes)}


def headline_json(headline: tuple[tuple[str, float | Estimate], ...]) -> dict[str, JsonValue]:
    return {name: json_value(value) for name, value in headline}


def result_document(name: str, summary: str, args: argparse.Namespace, result: LabResult,
                    sweep: Sweep | None = None) -> dict[str, JsonValue]:
    document: dict[str, JsonValue] = {
        "format": FORMAT,
        "model": name,
        "summary": summary,
        "inputs": inputs_of(args),
        "assumptions": [{"name": a.name, "value": json_value(a.value), "basis": a.basis} for a in result.assumptions],
        "headline": headline_json(result.headline),
        "tables": [table_json(table) for table in result.tables],
        "conclusions": list(result.summary),
    }
    if sweep is not None:
        document["sweep"] = {"parameter": sweep.parameter,
                             "points": [{"value": json_value(point.value), "headline": headline_json(point.headline)}
                                        for point in sweep.points]}
    return document


def csv_header_and_rows(table: Table) -> tuple[list[str], list[list[object]]]:
    """Columns holding estimates become three: the mean, and `low` and `high` of the 95 % interval."""
    spread = [any(isinstance(row[i], Estimate) for row in table.rows) for i in range(len(table.columns))]
    header: list[str] = []
    for column, wide in zip(table.columns, spread, strict=True):
        header += [column, f"{column} low", f"{column} high"] if wide else [column]
    rows: list[list[object]] = []
    for row in table.rows:
        cells: list[object] = []
        for cell, wide in zip(row, spread, strict=True):
            if wide:
                cells += [cell.mean, cell.low, cell.high] if isinstance(cell, Estimate) else [cell, cell, cell]
            else:
                cells.append(json_value(cell))
        rows.append(cells)
    return header, rows


def write_csv_tables(result: LabResult, directory: Path) -> list[Path]:
    """One CSV file per table, `NN-title.csv`, in a directory that must exist."""
    written = []
    for number, table in enumerate(result.tables, start=1):
        slug = re.sub(r"[^a-z0-9]+", "-", table.title.lower()).strip("-")[:60] or "table"
        path = directory / f"{number:02d}-{slug}.csv"
        header, rows = csv_header_and_rows(table)
        with path.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(header)
            writer.writerows(rows)
        written.append(path)
    return written
