"""`pyrovisor lab`: list the models, or run one and print its tables, JSON, CSV files, a sweep or a plot."""

from __future__ import annotations

import argparse
import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyrovisor.lab.model import LabModel

LAB_EXTRA = "lab"
LAB_MODULES = ("numpy", "matplotlib")  # what `pip install 'pyrovisor[lab]'` adds


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # Registration reads only the registry's table: a model's module (and numpy, matplotlib) is imported
    # when that model runs. Its options are parsed then, by a parser of its own (`pyrovisor lab MODEL --help`).
    from pyrovisor.lab.registry import MODELS

    listing = "\n".join(f"  {name:<19} {entry.summary}" for name, entry in MODELS.items())
    lab = subparsers.add_parser(
        "lab", help="quantitative models of memory-virtualization effects",
        description="Run a model of what the hardware hides and print its tables; with no MODEL, list the models. "
                    f"Running a model needs the lab extra: pip install 'pyrovisor[{LAB_EXTRA}]'.",
        epilog=f"models:\n{listing}\n\n'pyrovisor lab MODEL --help' shows a model's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    lab.add_argument("model", nargs="?", choices=tuple(MODELS), metavar="MODEL", help="the model to run")
    lab.add_argument("options", nargs=argparse.REMAINDER, metavar="...",
                     help="the model's options, e.g. --json, --csv DIR, --sweep PARAM=a:b:n, --plot FILE.png")
    lab.set_defaults(handler=_lab, lab_parser=lab)


def require_lab_extra() -> None:
    """Refuse to run a model without numpy and matplotlib, with the line that says what to install."""
    from pyrovisor.errors import MissingExtraError

    missing = [name for name in LAB_MODULES if not _installed(name)]
    if missing:
        raise MissingExtraError("pyrovisor lab", LAB_EXTRA, tuple(missing))


def _installed(name: str) -> bool:
    """Whether a top-level package can be imported, found without importing it (matplotlib takes 85 ms)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a finder that refuses the name outright
        return False


def _lab(args: argparse.Namespace) -> int:
    if args.model is None:
        return _list_models()
    require_lab_extra()
    from pyrovisor.lab.registry import get

    model = get(args.model)
    parser = _model_parser(args.lab_parser, model)
    return _run_model(model, parser, parser.parse_args(args.options))


def _model_parser(lab_parser: argparse.ArgumentParser, model: LabModel) -> argparse.ArgumentParser:
    """A parser for one model's options, of the same class as the lab's (so errors look the same)."""
    from pyrovisor.lab.report import PLOT_FORMATS, csv_directory, plot_path

    parser = type(lab_parser)(prog=f"{lab_parser.prog} {model.name}", description=model.summary)
    output = parser.add_argument_group("output (instead of the tables, or besides them for --plot)")
    output.add_argument("--plot", type=plot_path, metavar="FILE.png",
                        help=f"also save a plot ({', '.join(PLOT_FORMATS)}, by the file's suffix); "
                             "the path is checked before the model runs")
    output.add_argument("--json", action="store_true",
                        help="print one JSON document: inputs, assumptions, headline figures, tables "
                             "(src/pyrovisor/lab/result.schema.json)")
    output.add_argument("--csv", type=csv_directory, metavar="DIR",
                        help="write each table to DIR/NN-title.csv (DIR must exist)")
    output.add_argument("--sweep", metavar="PARAM=a:b:n",
                        help="run once per value of a numeric option (n values from a to b) and show how the "
                             "headline figures move, e.g. --sweep t-enc=0:128:9")
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


def _run_model(model: LabModel, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    import json
    import sys

    from pyrovisor.errors import ConfigError
    from pyrovisor.lab.export import result_document, write_csv_tables
    from pyrovisor.lab.report import print_result, save_plot
    from pyrovisor.lab.sweep import parse_sweep, run_sweep
    from pyrovisor.output import console as output_console

    sweep = None
    if args.sweep is not None:
        if args.plot is not None:
            raise ConfigError("--plot", str(args.plot), "a sweep has no plot; give --json or --csv for its table")
        try:
            spec = parse_sweep(args.sweep, parser)
        except ConfigError as exc:
            parser.error(f"argument --sweep: {exc.reason}")  # a usage error: exit code 2, like other options
        sweep, result = run_sweep(model, args, spec)
    else:
        result = model.run(args)
    quiet = args.json  # stdout carries only the document
    if args.json:
        json.dump(result_document(model.name, model.summary, args, result, sweep), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.csv is None:
        print_result(result)
    if args.csv is not None:
        for path in write_csv_tables(result, args.csv):
            if not quiet:
                output_console().print(f"table written to {path}")
    if args.plot is not None:
        save_plot(result, args.plot)
        if not quiet:
            output_console().print(f"plot written to {args.plot}")
    return 0
