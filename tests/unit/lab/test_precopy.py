"""Pre-copy migration: the closed form against its own recurrence, convergence, the WWS simulator, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.precopy import MB, MiB, precopy_rounds, predict, simulate

GiB = 1 << 30



def iterate(memory: float, bandwidth: float, dirty: float, limit: float, max_rounds: int) -> tuple[int, list[float]]:
    """The recurrence itself: send V_i, dirty D * V_i / R meanwhile (at most all of memory), stop when it fits."""
    volumes = [memory]
    while True:
        left = min(memory, dirty * volumes[-1] / bandwidth)
        if left <= bandwidth * limit or len(volumes) >= max_rounds:
            return len(volumes), [*volumes, left]
        volumes.append(left)


memories = st.integers(1, 64 * GiB)
bandwidths = st.floats(1e6, 1e10)
limits = st.one_of(st.just(0.0), st.floats(1e-6, 2.0))  # no subnormal products
round_limits = st.integers(1, 40)


@settings(max_examples=300, deadline=None)
@given(memories, bandwidths, st.one_of(st.just(0.0), st.floats(1e-6, 3.0)), limits, round_limits)
def test_closed_form_equals_the_recurrence(memory: int, bandwidth: float, ratio: float, limit: float,
                                          max_rounds: int) -> None:
    p = predict(memory, bandwidth, ratio * bandwidth, limit, max_rounds, page_size=1)
    rounds, volumes = iterate(memory, bandwidth, ratio * bandwidth, limit, max_rounds)
    assert p.rounds == rounds
    assert p.round_bytes == pytest.approx(volumes, rel=1e-9)
    assert p.bytes_sent == pytest.approx(sum(volumes), rel=1e-9, abs=1)
    assert p.total_time_s == pytest.approx(sum(volumes) / bandwidth, rel=1e-9)
    assert p.downtime_s == pytest.approx(volumes[-1] / bandwidth, rel=1e-9, abs=1e-12)
    assert p.converged == (volumes[-1] <= bandwidth * limit)


@settings(max_examples=200, deadline=None)
@given(memories, bandwidths, st.floats(1.0, 5.0), limits, round_limits)
def test_no_convergence_when_dirtying_at_least_as_fast_as_sending(memory: int, bandwidth: float, ratio: float,
                                                                   limit: float, max_rounds: int) -> None:
    p = predict(memory, bandwidth, ratio * bandwidth, limit, max_rounds, page_size=1)
    if memory > bandwidth * limit:
        assert not p.converged and p.rounds == max_rounds
        assert p.downtime_s == pytest.approx(p.round_bytes[0] / bandwidth)  # everything is still dirty
    else:
        assert p.converged and p.rounds == 1


@settings(max_examples=200, deadline=None)
@given(memories, bandwidths, st.floats(0.0, 0.99), st.floats(0.001, 2.0))
def test_below_the_bandwidth_pre_copy_converges_within_the_limit(memory: int, bandwidth: float, ratio: float,
                                                                 limit: float) -> None:
    p = predict(memory, bandwidth, ratio * bandwidth, limit, max_rounds=10_000, page_size=1)
    assert p.converged and p.downtime_s <= limit * (1 + 1e-9)
    if ratio > 0 and memory > bandwidth * limit:  # Liu et al.: n = ceil(log_lambda(V_thd / V_mem))
        assert p.rounds == max(1, math.ceil(math.log(bandwidth * limit / memory, ratio) - 1e-9))
        assert p.bytes_sent == pytest.approx(memory * (1 - ratio ** (p.rounds + 1)) / (1 - ratio), rel=1e-9, abs=1)


def test_a_worked_example() -> None:
    # 1 GiB at 125 MB/s while dirtying 50 MB/s: lambda = 0.4, V_thd = 37.5 MB,
    # V_i = 1073.7, 429.5, 171.8, 68.7, 27.5 MB -> four live rounds, 220 ms of downtime.
    p = predict(GiB, 125 * MB, 50 * MB, 0.3)
    assert (p.rounds, p.converged) == (4, True)
    assert p.downtime_s == pytest.approx(GiB * 0.4**4 / 125e6)
    assert p.total_time_s == pytest.approx(GiB * (1 - 0.4**5) / 0.6 / 125e6)
    idle = predict(GiB, 125 * MB, 0.0)
    assert (idle.rounds, idle.downtime_s, idle.bytes_sent) == (1, 0.0, GiB)
    assert predict(GiB, 125 * MB, 10 * MB, resume_time_s=0.02).downtime_s == pytest.approx(
        GiB * 0.08**2 / 125e6 + 0.02)


def test_more_dirtying_never_makes_migration_faster() -> None:
    totals = [predict(GiB, 125 * MB, rate * MB).total_time_s for rate in range(0, 124, 3)]
    assert totals == sorted(totals)
    assert precopy_rounds(100.0, 0.5, 10.0, 30) == 4  # 100 * 0.5^4 = 6.25 <= 10 < 12.5


def test_simulator_without_rewrites_follows_the_model() -> None:
    # Writes spread over all of memory and few per round: nearly every write dirties a new page.
    for rate in (5, 10, 20):
        p = predict(4 * GiB, 125 * MB, rate * MB, 0.3)
        s = simulate(4 * GiB, 125 * MB, rate * MB, wws_bytes=4 * GiB)
        assert s.rounds == p.rounds
        assert s.bytes_sent == pytest.approx(p.bytes_sent, rel=0.03)
        assert s.downtime_s == pytest.approx(p.downtime_s, rel=0.15)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 128), st.floats(0, 100), st.integers(0, 2**16))
def test_simulated_dirty_set_stays_within_the_working_set(wws_mib: int, rate: float, seed: int) -> None:
    memory = 128 * MiB
    s = simulate(memory, 30 * MB, rate * MB, wws_mib * MiB, max_rounds=10, seed=seed)
    assert all(pages <= s.wws_pages for pages in s.round_pages[1:])
    assert s.round_pages[0] == memory // 4096
    assert s.bytes_sent == sum(s.round_pages) * 4096
    assert s.converged == (s.round_pages[-1] * 4096 / (30 * MB) <= 0.3)
    assert s.rounds == len(s.round_pages) - 1 <= 10


def test_a_small_working_set_converges_where_the_model_cannot() -> None:
    # 200 MB/s of writes over a 125 MB/s link: the model never converges, but the writes keep hitting
    # the same 16 MiB, which fits in 0.3 s (16 MiB / 125 MB/s = 134 ms).
    p = predict(GiB, 125 * MB, 200 * MB, 0.3)
    s = simulate(GiB, 125 * MB, 200 * MB, wws_bytes=16 * MiB)
    assert not p.converged and s.converged
    assert s.downtime_s <= 0.3 and s.round_pages[-1] <= 16 * MiB // 4096
    assert s.rounds < p.rounds


def test_invalid_inputs() -> None:
    with pytest.raises(ConfigError):
        predict(GiB, 0.0, 1.0)
    with pytest.raises(ConfigError):
        predict(GiB, 1.0, -1.0)
    with pytest.raises(ConfigError):
        simulate(GiB, 1.0, 1.0, wws_bytes=2 * GiB)


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "precopy.png"
    assert main(["lab", "precopy", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "lambda" in out and "sim converged" in out
    row = next(line for line in out.splitlines() if line.startswith("│         50 │"))
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[1:7] == ["0.4", "4", "14.17", "219.9", "1689", "yes"]
    assert "does not converge" in out
    assert_real_png(png)
