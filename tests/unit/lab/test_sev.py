"""SEV: decryption on DRAM fetches only, exact costs at the extremes, monotone and linear in t_enc, the CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.mmu.config import MmuConfig
from pyrovisor.lab.sev import PARK_NATIVE, PARK_VIRTUALIZED, WALKS, Latencies, Walk, overhead

rates = st.floats(0.0, 1.0)
latencies = st.builds(Latencies, cache=st.floats(1, 100), memory=st.floats(100, 1000), decryption=st.floats(0, 300),
                      page_table_hit_rate=rates, data_hit_rate=rates, walks_per_access=st.one_of(st.just(0.0), st.floats(1e-3, 2)),
                      host_encrypts=st.booleans())
walks = st.sampled_from(WALKS)



def test_hits_are_plaintext_and_misses_pay_decryption() -> None:
    at = Latencies(cache=40, memory=250, decryption=60)
    assert at.reference(1.0) == 40
    assert at.reference(0.0) == 310
    assert at.reference(0.0, encrypted=False) == 250
    assert at.reference(0.75) == pytest.approx(0.75 * 40 + 0.25 * 310)


def test_walk_sizes_come_from_the_paging_model_and_park_et_al() -> None:
    by_label = {w.label: w for w in WALKS}
    assert by_label["nested 4+4, cold"].references == MmuConfig().cold_references() == 24
    assert by_label["native, cold"].references == MmuConfig().native().cold_references() == 4
    assert by_label["native, warm (Park et al.)"].references == PARK_NATIVE
    assert by_label["nested, warm (Park et al.)"].references == pytest.approx(PARK_VIRTUALIZED)


def test_a_cold_nested_walk_with_plaintext_host_tables() -> None:
    walk = Walk("cold", 4, 20)
    at = Latencies(cache=40, memory=250, decryption=100, page_table_hit_rate=0.0, host_encrypts=False)
    assert at.walk(walk) == 4 * 350 + 20 * 250
    assert replace(at, host_encrypts=True).walk(walk) == 24 * 350


@settings(max_examples=200, deadline=None)
@given(latencies, walks, st.floats(1, 300))
def test_cost_is_linear_in_decryption_and_the_inverse_holds(at: Latencies, walk: Walk, more: float) -> None:
    plain = at.plain().access(walk)
    slope = (replace(at, decryption=at.decryption + more).access(walk) - at.access(walk)) / more
    encrypted_refs = walk.guest + (walk.nested if at.host_encrypts else 0)
    expected = (1 - at.data_hit_rate) + at.walks_per_access * encrypted_refs * (1 - at.page_table_hit_rate)
    assert slope == pytest.approx(expected, rel=1e-6, abs=1e-9)
    target = 0.09
    needed = at.decryption_for_overhead(target, walk)
    if needed != float("inf"):
        assert overhead(replace(at, decryption=needed).access(walk), plain) == pytest.approx(target, rel=1e-6)


@settings(max_examples=200, deadline=None)
@given(latencies, walks, rates, rates)
def test_overhead_grows_with_misses_and_vanishes_without_them(at: Latencies, walk: Walk, h1: float, h2: float) -> None:
    low, high = sorted((h1, h2))
    worse = replace(at, page_table_hit_rate=low, data_hit_rate=low)
    better = replace(at, page_table_hit_rate=high, data_hit_rate=high)
    assert overhead(worse.access(walk), worse.plain().access(walk)) >= \
        overhead(better.access(walk), better.plain().access(walk)) - 1e-12
    perfect = replace(at, page_table_hit_rate=1.0, data_hit_rate=1.0)
    assert perfect.access(walk) == perfect.plain().access(walk)
    assert at.access(walk) >= at.plain().access(walk)


def test_invalid_rates() -> None:
    with pytest.raises(ConfigError):
        Latencies(page_table_hit_rate=1.5)
    with pytest.raises(ConfigError):
        Latencies(decryption=-1)


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "sev.png"
    assert main(["lab", "sev", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "walk SEV" in out and "t_enc=128" in out
    row = next(line for line in out.splitlines() if "nested 4+4, cold" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[1:5] == ["4+20", "1464", "1560", "6.6%"]  # 24 x (0.9 x 40 + 0.1 x 250), then + 0.1 x 40 each
    assert_real_png(png)
    assert main(["lab", "sev", "--plain-nested-tables", "--page-table-hit-rate", "0"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "nested 4+4, cold" in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")][2:4] == ["6000", "6160"]  # only 4 refs decrypt
