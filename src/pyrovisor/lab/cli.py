"""`pyrovisor lab`: list the models, or run one, print its tables and optionally save its plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table as RichTable

from pyrovisor.output import console as output_console


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from pyrovisor.lab.registry import discover

    lab = subparsers.add_parser("lab", help="quantitative models of memory-virtualization effects")
    lab.set_defaults(handler=_list_models)
    models = lab.add_subparsers(dest="model", metavar="MODEL")
    for name, model in discover().items():
        parser = models.add_parser(name, help=model.summary, description=model.summary)
        parser.add_argument("--plot", type=Path, metavar="FILE.png", help="also save a plot as PNG")
        model.add_arguments(parser)
        parser.set_defaults(handler=_run_model)


def _list_models(args: argparse.Namespace) -> int:
    from pyrovisor.lab.registry import discover

    table = RichTable(title="pyrovisor lab models")
    table.add_column("model")
    table.add_column("what it computes")
    for name, model in discover().items():
        table.add_row(name, model.summary)
    output_console().print(table)
    return 0


def _run_model(args: argparse.Namespace) -> int:
    from pyrovisor.lab.registry import get
    from pyrovisor.lab.report import print_result, save_plot

    result = get(args.model).run(args)
    print_result(result)
    if args.plot is not None:
        save_plot(result, args.plot)
        output_console().print(f"plot written to {args.plot}")
    return 0
