"""`--sweep PARAM=a:b:n`: run a model once per value of one numeric option and follow its headline figures."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pyrovisor.errors import ConfigError
from pyrovisor.lab.export import Sweep, SweepPoint
from pyrovisor.lab.model import LabModel, LabResult, Table

MAX_POINTS = 200


@dataclass(frozen=True)
class SweepSpec:
    option: str  # as the user wrote it, e.g. "t-enc"
    dest: str  # the argparse attribute, e.g. "t_enc"
    kind: type  # int or float, the option's type
    values: tuple[float, ...]


def numeric_options(parser: argparse.ArgumentParser) -> dict[str, tuple[str, type]]:
    """The model's options that take one int or float: long name without dashes -> (attribute, type)."""
    found: dict[str, tuple[str, type]] = {}
    for action in parser._actions:
        kind = action.type
        if kind in (int, float) and action.nargs is None:
            for flag in action.option_strings:
                if flag.startswith("--"):
                    found[flag[2:]] = (action.dest, kind)
    return found


def parse_sweep(text: str, parser: argparse.ArgumentParser) -> SweepSpec:
    """PARAM=a:b:n, n values from a to b inclusive; PARAM is one of the model's numeric options."""
    options = numeric_options(parser)
    name, equals, bounds = text.partition("=")
    name = name.strip().removeprefix("--").replace("_", "-")
    if not equals:
        raise ConfigError("--sweep", text, "give PARAM=a:b:n, e.g. t-enc=0:128:9")
    if name not in options:
        raise ConfigError("--sweep", text, f"{name!r} is not a numeric option of this model; "
                                           f"these are: {', '.join(sorted(options)) or 'none'}")
    parts = bounds.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        low, high, count = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ConfigError("--sweep", text, "give PARAM=a:b:n with numbers a, b and a whole count n") from None
    if not 2 <= count <= MAX_POINTS:
        raise ConfigError("--sweep", text, f"n is between 2 and {MAX_POINTS}")
    dest, kind = options[name]
    values = [low + (high - low) * i / (count - 1) for i in range(count)]
    if kind is int:
        values = sorted({float(round(v)) for v in values})
        if len(values) < 2:
            raise ConfigError("--sweep", text, f"--{name} takes whole numbers: the range gives fewer than 2 of them")
    return SweepSpec(name, dest, kind, tuple(values))


def run_sweep(model: LabModel, args: argparse.Namespace, spec: SweepSpec) -> tuple[Sweep, LabResult]:
    """One run per value; the result holds one table (value -> headline figures) and the first run's assumptions."""
    points = []
    first: LabResult | None = None
    for value in spec.values:
        point_args = argparse.Namespace(**{**vars(args), spec.dest: spec.kind(value)})
        result = model.run(point_args)
        if not result.headline:
            raise ConfigError("--sweep", spec.option, f"model {model.name} names no headline figure to follow")
        first = first or result
        points.append(SweepPoint(spec.kind(value), result.headline))
    assert first is not None
    names = [name for name, _ in first.headline]
    table = Table(title=f"{model.name}: headline figures as --{spec.option} goes from {spec.values[0]:g} to "
                        f"{spec.values[-1]:g}",
                  columns=(spec.option, *names),
                  rows=tuple((point.value, *(dict(point.headline).get(name, "") for name in names))
                             for point in points),
                  notes=("every other option as given (or its default)",))
    return Sweep(spec.option, tuple(points)), LabResult(tables=(table,), headline=first.headline,
                                                      assumptions=first.assumptions)
