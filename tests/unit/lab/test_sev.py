"""SEV: decryption on DRAM fetches only, exact costs at the extremes, monotone and linear in t_enc, the CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_check import lab_json
from png_check import assert_real_png

from pyrovisor.api.cli import main
from pyrovisor.errors import ConfigError
from pyrovisor.lab.mmu.config import MmuConfig
from pyrovisor.lab.sev import (
    COUNTER_LIGHT_SLOWDOWN,
    PARK_NATIVE,
    PARK_VIRTUALIZED,
    ROGERS_DECRYPTION_CYCLES,
    WALKS,
    Latencies,
    Walk,
    consistency,
    decryption_for_slowdown,
    hit_rate_for,
    overhead,
    slowdown,
)

# docs/lab/sev.md: "Counter-light's 9 % is consistent with t_enc from 26 to 55 cycles (26.1 and 54.9) when
# page tables and data hit the caches at rates between 0.5 and 0.9" -- figures given to 0.1 cycle.
T_ENC_TOLERANCE = 0.05
# docs/lab/sev.md: "Rogers et al.'s 128 cycles gives 21.0 % to 44.1 % over the same band" (0.1 point).
SLOWDOWN_TOLERANCE = 0.0005
# docs/lab/sev.md: "128 cycles gives 9 % only at a hit rate of 0.967".
HIT_RATE_TOLERANCE = 0.0005
# docs/lab/sev.md: "At each end of the range the model gives 9 % exactly" (the inversion of a linear cost).
INVERSION_TOLERANCE = 1e-9

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
    png = tmp_path / "sev.png"
    assert main(["lab", "sev", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "walk SEV" in out and "t_enc=128" in out and "Published points" in out
    row = next(line for line in out.splitlines() if "nested 4+4, cold" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[1:5] == ["4+20", "1464", "1560", "6.6%"]  # 24 x (0.9 x 40 + 0.1 x 250), then + 0.1 x 40 each
    assert_real_png(png)
    assert main(["lab", "sev", "--plain-nested-tables", "--page-table-hit-rate", "0"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "nested 4+4, cold" in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")][2:4] == ["6000", "6160"]  # only 4 refs decrypt


def test_counter_light_is_consistent_with_a_range_of_t_enc_conditional_on_hit_rates() -> None:
    """The correction: no single t_enc from a whole-program 9 %; a range, one end per assumed hit rate."""
    defaults = Latencies()
    points = consistency(defaults, 1.0, 0.5, 0.9)
    assert points.t_enc_low == pytest.approx(26.1, abs=T_ENC_TOLERANCE)
    assert points.t_enc_high == pytest.approx(54.9, abs=T_ENC_TOLERANCE)
    for hit_rate, t_enc in ((0.5, points.t_enc_low), (0.9, points.t_enc_high)):
        at = replace(defaults.at_hit_rate(hit_rate), decryption=t_enc)
        assert slowdown(at, 1.0) == pytest.approx(COUNTER_LIGHT_SLOWDOWN, abs=INVERSION_TOLERANCE)
    # Any t_enc is consistent with 9 % at some hit rate: the figure does not pin t_enc down.
    for t_enc in (10.0, 40.0, 128.0, 300.0):
        h = hit_rate_for(replace(defaults, decryption=t_enc), COUNTER_LIGHT_SLOWDOWN, 1.0)
        if h is not None:
            assert slowdown(replace(defaults, decryption=t_enc).at_hit_rate(h), 1.0) == pytest.approx(
                COUNTER_LIGHT_SLOWDOWN, abs=1e-6)
    assert hit_rate_for(replace(defaults, decryption=10.0), COUNTER_LIGHT_SLOWDOWN, 1.0) is None  # 10 is too little


def test_rogers_latency_against_the_same_band() -> None:
    points = consistency(Latencies(), 1.0, 0.5, 0.9)
    assert points.rogers_high == pytest.approx(0.210, abs=SLOWDOWN_TOLERANCE)
    assert points.rogers_low == pytest.approx(0.441, abs=SLOWDOWN_TOLERANCE)
    assert points.rogers_hit_rate == pytest.approx(0.967, abs=HIT_RATE_TOLERANCE)
    assert points.t_enc_high < ROGERS_DECRYPTION_CYCLES  # outside the range for hit rates 0.5-0.9


def test_a_smaller_memory_share_needs_a_proportionally_larger_t_enc() -> None:
    at = Latencies()
    full = decryption_for_slowdown(at, COUNTER_LIGHT_SLOWDOWN, 1.0)
    assert decryption_for_slowdown(at, COUNTER_LIGHT_SLOWDOWN, 0.5) == pytest.approx(2 * full)
    assert slowdown(at, 0.5) == pytest.approx(slowdown(at, 1.0) / 2)


def test_json_carries_headline_and_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "sev")
    headline = document["headline"]
    assert headline["t_enc for 9 %, low hit rate (cycles)"] == pytest.approx(26.1, abs=T_ENC_TOLERANCE)
    assert headline["t_enc for 9 %, high hit rate (cycles)"] == pytest.approx(54.9, abs=T_ENC_TOLERANCE)
    plain, encrypted = Latencies().plain().access(WALKS[3]), Latencies().access(WALKS[3])
    assert headline["slowdown at t_enc %"] == pytest.approx(100 * overhead(encrypted, plain))
    assert headline["slowdown at 128 cycles %"] == pytest.approx(28.7, abs=0.05)
    assumptions = {a["name"]: a for a in document["assumptions"]}
    assert assumptions["t_enc cycles"]["value"] == 40.0
    assert assumptions["t_enc cycles"]["basis"].startswith("assumed")
    assert assumptions["hit-rate band for irregular workloads"]["value"] == [0.5, 0.9]
    assert assumptions["memory share of run time"]["value"] == 1.0
    assert "ISCA 2024" in assumptions["published slowdown under counterless encryption"]["basis"]
    assert "WASSA 2005" in assumptions["published decryption latency cycles"]["basis"]
    assert any("26-55 cycles" in line and "0.5-0.9" in line for line in document["conclusions"])
    assert not any("40 cycles" in line for line in document["conclusions"])


def test_sweeping_t_enc_moves_the_slowdown_and_not_the_consistent_range(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "sev", "--sweep", "t-enc=0:128:5")
    points = document["sweep"]["points"]
    slowdowns = [p["headline"]["slowdown at t_enc %"] for p in points]
    assert slowdowns[0] == 0.0
    assert slowdowns == pytest.approx([slowdowns[1] * k for k in range(5)])  # linear in t_enc
    assert slowdowns[4] == pytest.approx(points[0]["headline"]["slowdown at 128 cycles %"])
    assert {p["headline"]["t_enc for 9 %, low hit rate (cycles)"] for p in points} == {points[0]["headline"][
        "t_enc for 9 %, low hit rate (cycles)"]}


def test_sweeping_the_memory_share_scales_the_consistent_range(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "sev", "--sweep", "memory-share=0.25:1:4")
    low = [p["headline"]["t_enc for 9 %, low hit rate (cycles)"] for p in document["sweep"]["points"]]
    assert low == pytest.approx([26.1 / share for share in (0.25, 0.5, 0.75, 1.0)], rel=0.01)


def test_invalid_band_and_share(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "sev", "--low-hit-rate", "0.95", "--high-hit-rate", "0.9"]) == 1
    assert main(["lab", "sev", "--memory-share", "0"]) == 1
    capsys.readouterr()

