"""Printing lab results as rich tables and saving their plots as PNG files."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table as RichTable

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import LabResult, Table, format_number
from pyrovisor.output import console as output_console


def render_table(table: Table, console: Console) -> None:
    rich_table = RichTable(title=table.title)
    for column in table.columns:
        rich_table.add_column(column, justify="right")
    for row in table.rows:
        rich_table.add_row(*(format_number(cell) for cell in row))
    console.print(rich_table)
    for note in table.notes:
        console.print(f"  {note}")


def print_result(result: LabResult, console: Console | None = None) -> None:
    console = console or output_console()
    for table in result.tables:
        render_table(table, console)
    for line in result.summary:
        console.print(line)


def save_plot(result: LabResult, path: Path) -> None:
    """Draw the result's plot into a PNG file (headless backend)."""
    if result.plot is None:
        raise ConfigError("--plot", str(path), "this model has no plot")
    if path.suffix.lower() != ".png":
        raise ConfigError("--plot", str(path), "the plot is written as PNG: give a file name ending in .png")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    result.plot(figure)
    figure.savefig(path)
