"""What every lab model offers besides its tables: JSON against the schema, CSV files, sweeps, seeds, the extra."""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
from pathlib import Path

import pytest
from json_check import lab_json

from import_blocker import PYROVISOR
from pyrovisor.api.cli import main
from pyrovisor.lab.export import csv_header_and_rows, json_value, write_csv_tables
from pyrovisor.lab.model import LabResult, Table
from pyrovisor.lab.registry import MODELS
from pyrovisor.lab.stats import Estimate, add_seed_arguments, estimate, seeds_of, t_quantile_95
from pyrovisor.lab.sweep import parse_sweep

# Options that keep each model's --json run to a few seconds; the defaults where they already do.
QUICK: dict[str, tuple[str, ...]] = {name: () for name in MODELS} | {
    "iommu": ("--ring", "32", "--iotlb", "16", "--dmas", "256", "--packets", "300", "--seeds", "3"),
    "mixed-criticality": ("--phasings", "2", "--seeds", "2"),
    "nested-paging": ("--pattern", "random", "--accesses", "20000", "--seeds", "2", "--calibration-accesses", "5000"),
    "precopy": ("--seeds", "2"),
    "rowhammer": ("--rows", "8", "--seeds", "3"),
}


def test_student_t_interval_by_hand() -> None:
    # 1..5: mean 3, sample standard deviation sqrt(2.5), t(0.975, 4 df) = 2.776 from the standard table
    five = estimate([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776 * math.sqrt(2.5 / 5)
    assert (five.mean, five.n) == (3.0, 5)
    assert five.low == pytest.approx(3 - half) and five.high == pytest.approx(3 + half)
    assert t_quantile_95(1) == 12.706 and t_quantile_95(30) == 2.042 and t_quantile_95(31) == 1.960
    assert estimate([7.0]) == Estimate(7.0, 7.0, 7.0, 1)
    assert estimate([0.1 + 0.2, 0.1 + 0.2, 0.1 + 0.2]) == Estimate(0.1 + 0.2, 0.1 + 0.2, 0.1 + 0.2, 3)
    with pytest.raises(ValueError):
        estimate([])


def test_estimates_print_with_their_interval_and_export_as_objects() -> None:
    value = Estimate(12.34, 11.0, 13.5, 5)
    assert f"{value:.3g}" == "12.3 [11, 13.5]"
    assert f"{Estimate(2.0, 2.0, 2.0, 1)}" == "2"
    assert json_value(value) == {"mean": 12.34, "low": 11.0, "high": 13.5, "n": 5}
    assert json_value(float("inf")) == "inf" and json_value(float("nan")) == "nan"
    assert json_value((1, Path("/x"))) == [1, "/x"]


def test_seed_options() -> None:
    parser = argparse.ArgumentParser()
    add_seed_arguments(parser, first=4, count=3)
    assert list(seeds_of(parser.parse_args([]))) == [4, 5, 6]
    assert list(seeds_of(parser.parse_args(["--seed", "10", "--seeds", "2"]))) == [10, 11]
    for bad in ("0", "x", "1001"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--seeds", bad])


def test_csv_spreads_an_estimate_column_into_mean_low_high(tmp_path: Path) -> None:
    table = Table("Outcomes, 3 flips (Hsiao)!", ("code", "silent"),
                  (("a", Estimate(0.5, 0.4, 0.6, 5)), ("b", 0.25)))
    header, rows = csv_header_and_rows(table)
    assert header == ["code", "silent", "silent low", "silent high"]
    assert rows == [["a", 0.5, 0.4, 0.6], ["b", 0.25, 0.25, 0.25]]
    [path] = write_csv_tables(LabResult(tables=(table,)), tmp_path)
    assert path.name == "01-outcomes-3-flips-hsiao.csv"
    with path.open() as handle:
        assert list(csv.reader(handle)) == [header, ["a", "0.5", "0.4", "0.6"], ["b", "0.25", "0.25", "0.25"]]


def test_sweep_specs_and_their_errors() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--t-enc", type=float, default=40.0)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--name", default="x")
    spec = parse_sweep("t-enc=0:100:5", parser)
    assert (spec.dest, spec.kind, spec.values) == ("t_enc", float, (0.0, 25.0, 50.0, 75.0, 100.0))
    assert parse_sweep("--rounds=1:3:5", parser).values == (1.0, 2.0, 3.0)  # whole numbers, each once
    for bad, reason in (("t-enc", "PARAM=a:b:n"), ("name=1:2:3", "not a numeric option"),
                        ("t-enc=1:2", "PARAM=a:b:n"), ("t-enc=1:2:1", "between 2"), ("rounds=1:1:4", "fewer than 2")):
        with pytest.raises(Exception, match=reason):
            parse_sweep(bad, parser)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_prints_json_valid_against_the_schema(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, model, *QUICK[model])
    assert document["headline"], f"{model} names no headline figure"
    assert document["assumptions"], f"{model} lists no assumptions"
    assert all(name not in document["inputs"] for name in ("json", "csv", "plot", "sweep"))


def test_a_sweep_follows_the_headline(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "sev", "--sweep", "t-enc=0:128:5")
    points = document["sweep"]["points"]
    assert [p["value"] for p in points] == [0.0, 32.0, 64.0, 96.0, 128.0]
    assert document["sweep"]["parameter"] == "t-enc"
    assert len(document["tables"]) == 1 and len(document["tables"][0]["rows"]) == 5


def test_bad_sweep_and_output_options_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for options, reason in ((["--sweep", "bogus=1:2:3"], "not a numeric option"),
                            (["--csv", str(tmp_path / "missing")], "not an existing directory")):
        with pytest.raises(SystemExit) as stopped:
            main(["lab", "sev", *options])
        assert stopped.value.code == 2
        assert reason in capsys.readouterr().err
    assert main(["lab", "sev", "--sweep", "t-enc=0:1:2", "--plot", str(tmp_path / "p.png")]) == 1
    assert "a sweep has no plot" in capsys.readouterr().err


def test_csv_option_writes_every_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "sev", "--csv", str(tmp_path)]) == 0
    files = sorted(tmp_path.glob("*.csv"))
    printed = capsys.readouterr().out
    assert len(files) >= 2 and all(f"table written to {f}" in printed for f in files)
    with files[0].open() as handle:
        header = next(csv.reader(handle))
    assert "walk" in header


def test_without_the_lab_extra_the_lab_lists_models_and_says_what_to_install() -> None:
    listing = subprocess.run([*PYROVISOR, "lab"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "nested-paging" in listing.stdout
    running = subprocess.run([*PYROVISOR, "lab", "sev"], capture_output=True, text=True, timeout=60)
    assert running.returncode == 1
    assert running.stderr.splitlines()[-1] + "\n" == ("pyrovisor: error: pyrovisor lab needs numpy and matplotlib, which are not installed: "
                              "pip install 'pyrovisor[lab]'\n")
