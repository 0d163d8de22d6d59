"""Printing lab results as rich tables and saving their plots as PNG, SVG or PDF files."""

from __future__ import annotations

import argparse
import os
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


PLOT_FORMATS = (".png", ".svg", ".pdf")  # written by matplotlib's headless backend, chosen by the suffix


def check_plot_path(path: Path) -> None:
    """Refuse a plot file that could not be written, before a model spends minutes computing."""
    if path.suffix.lower() not in PLOT_FORMATS:
        raise ConfigError("--plot", str(path), f"give a file name ending in {', '.join(PLOT_FORMATS)}")
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError("--plot", str(path), f"directory {str(parent)!r} does not exist")
    if path.exists() and not path.is_file():
        raise ConfigError("--plot", str(path), "exists and is not a file")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise ConfigError("--plot", str(path), "not writable" if path.exists() else f"directory {str(parent)!r} "
                          "is not writable")


def plot_path(text: str) -> Path:
    """argparse type of --plot: a path check_plot_path accepts."""
    path = Path(text)
    try:
        check_plot_path(path)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc.reason}") from None
    return path


def csv_directory(text: str) -> Path:
    """argparse type of --csv: an existing, writable directory."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: not an existing directory")
    if not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: directory is not writable")
    return path


def save_plot(result: LabResult, path: Path) -> None:
    """Draw the result's plot into a PNG, SVG or PDF file, by the suffix (headless backend)."""
    if result.plot is None:
        raise ConfigError("--plot", str(path), "this model has no plot")
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=120, layout="constrained")
    result.plot(figure)
    figure.savefig(path)
