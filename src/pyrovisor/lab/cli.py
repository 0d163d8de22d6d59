"""`pyrovisor lab`: list the models, or run one, print its tables and optionally save its plot."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyrovisor.lab.model import LabModel


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Registration reads only the registry's table: a model's module (and numpy, matplotlib) is imported
    # when that model runs. Its options are parsed then, by a parser of its own (`pyrovisor lab MODEL --help`).
    from pyrovisor.lab.registry import MODELS

    listing = "\n".join(f"  {name:<19} {entry.summary}" for name, entry in MODELS.items())
    lab = subparsers.add_parser(
        "lab", help="quantitative models of memory-virtualization effects",
        description="Run a model of what the hardware hides and print its tables; with no MODEL, list the models.",
        epilog=f"models:\n{listing}\n\n'pyrovisor lab MODEL --help' shows a model's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    lab.add_argument("model", nargs="?", choices=tuple(MODELS), metavar="MODEL", help="the model to run")
    lab.add_argument("options", nargs=argparse.REMAINDER, metavar="...",
                     help="the model's options, e.g. --plot FILE.png")
    lab.set_defaults(handler=_lab, lab_parser=lab)


def _lab(args: argparse.Namespace) -> int:
    if args.model is None:
        return _list_models()
    from pyrovisor.lab.registry import get

    model = get(args.model)
    parser = _model_parser(args.lab_parser, model)
    return _run_model(model, parser.parse_args(args.options))


def _model_parser(lab_parser: argparse.ArgumentParser, model: LabModel) -> argparse.ArgumentParser:
    """A parser for one model's options, of the same class as the lab's (so errors look the same)."""
    from pyrovisor.lab.report import PLOT_FORMATS, plot_path

    parser = type(lab_parser)(prog=f"{lab_parser.prog} {model.name}", description=model.summary)
    parser.add_argument("--plot", type=plot_path, metavar="FILE.png",
                        help=f"also save a plot ({', '.join(PLOT_FORMATS)}, by the file's suffix); "
                             "the path is checked before the model runs")
    model.add_arguments(parser)
    return parser


def _list_models() -> int:
    from rich.table import Table as RichTable

    from pyrovisor.lab.registry import MODELS
    from pyrovisor.output import console as output_console

    table = RichTable(title="pyrovisor lab models")
    table.add_column("model")
    table.add_column("what it computes")
    for name, entry in MODELS.items():
        table.add_row(name, entry.summary)
    output_console().print(table)
    return 0


def _run_model(model: LabModel, args: argparse.Namespace) -> int:
    from pyrovisor.lab.report import print_result, save_plot
    from pyrovisor.output import console as output_console

    result = model.run(args)
    print_result(result)
    if args.plot is not None:
        save_plot(result, args.plot)
        output_console().print(f"plot written to {args.plot}")
    return 0
