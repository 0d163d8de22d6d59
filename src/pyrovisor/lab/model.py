"""The shape every lab model has: arguments in, tables and an optional plot out."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pyrovisor.lab.stats import Estimate

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class Table:
    """A result table: printed by the CLI with rich, also usable from Python."""

    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]
    notes: tuple[str, ...] = ()

    def column(self, name: str) -> list[object]:
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


@dataclass(frozen=True)
class Assumption:
    """A constant the model takes as given rather than derives: its value and where the value comes from."""

    name: str
    value: object
    basis: str  # "assumed", or the source it is taken from


@dataclass(frozen=True)
class LabResult:
    """What a model run produces. `plot` draws into a matplotlib Figure when the user asks for `--plot`.

    `headline` names the figures a reader looks at first (what `--sweep` follows); `assumptions` lists the
    constants behind them. Both go into `--json` with the inputs and every table."""

    tables: tuple[Table, ...]
    plot: Callable[[Figure], None] | None = None
    summary: tuple[str, ...] = field(default=())
    headline: tuple[tuple[str, float | Estimate], ...] = ()
    assumptions: tuple[Assumption, ...] = ()


class LabModel(Protocol):
    """A model the `pyrovisor lab` command can list and run. Each module exposing one sets `MODEL`."""

    name: str
    summary: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> LabResult: ...


def format_number(value: object, digits: int = 4) -> str:
    """Render table cells: floats to `digits` significant figures, everything else with str()."""
    if isinstance(value, float | Estimate):
        return format(value, f".{digits}g")
    return str(value)


def rows_of(*rows: Sequence[object]) -> tuple[tuple[object, ...], ...]:
    return tuple(tuple(row) for row in rows)
