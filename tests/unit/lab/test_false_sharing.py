"""False sharing: the closed form, the event simulator that checks it, the calibration, masking, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.false_sharing import MEASURED_SLOWDOWN, TRANSFER_NS, WRITE_NS, Costs, simulate

costs = st.builds(Costs, write_ns=st.floats(0.1, 20), transfer_ns=st.floats(0, 200), translate_ns=st.floats(0, 500))



def test_two_threads_without_translation_pay_two_transfers_per_pair_of_writes() -> None:
    c = Costs(write_ns=1.0, transfer_ns=10.0)
    assert c.slowdown(2) == 2 * (1 + 10)
    assert c.slowdown(1) == 1
    assert c.slowdown(8) == 8 * 11
    shared = simulate(2, 100, True, c)
    assert shared.transfers == 199  # every write but the first finds the other core's write
    assert shared.makespan_ns == pytest.approx(1 + 199 * 11)
    assert simulate(2, 100, False, c).transfers == 0


def test_calibration_to_this_machine() -> None:
    inc, lock = Costs(WRITE_NS["inc"], TRANSFER_NS), Costs(WRITE_NS["lock inc"], TRANSFER_NS)
    assert lock.slowdown(2) == pytest.approx(MEASURED_SLOWDOWN["lock inc"])  # the fitted ratio
    assert round(TRANSFER_NS, 3) == 2.255  # effective ns per write: far below a real line transfer
    # Plain stores batch in the store buffer: the every-write-transfers rule overestimates them four-fold.
    assert inc.slowdown(2) == pytest.approx(17.03, abs=0.01)
    assert inc.slowdown(2) > 4 * MEASURED_SLOWDOWN["inc"]


@settings(max_examples=60, deadline=None)
@given(costs, st.integers(1, 6))
def test_simulator_agrees_with_the_closed_form(c: Costs, threads: int) -> None:
    writes = 400
    shared, separate = simulate(threads, writes, True, c), simulate(threads, writes, False, c)
    assert separate.throughput == pytest.approx(c.separate(threads), rel=0.02)
    assert shared.throughput == pytest.approx(c.shared(threads), rel=0.03)
    assert shared.writes == separate.writes == threads * writes


@settings(max_examples=100, deadline=None)
@given(costs, st.floats(0, 1000), st.integers(2, 16))
def test_a_costlier_translation_hides_false_sharing(c: Costs, extra: float, threads: int) -> None:
    cheap = Costs(c.write_ns, c.transfer_ns, c.translate_ns)
    dear = Costs(c.write_ns, c.transfer_ns, c.translate_ns + extra)
    assert dear.slowdown(threads) <= cheap.slowdown(threads) + 1e-9
    assert dear.slowdown(threads) >= 1.0
    far = Costs(c.write_ns, c.transfer_ns, (threads - 1) * (c.transfer_ns + c.write_ns) + extra)
    assert far.slowdown(threads) == pytest.approx((far.translate_ns + c.transfer_ns + c.write_ns)
                                                  / (far.translate_ns + c.write_ns))


def test_invalid_costs() -> None:
    with pytest.raises(ConfigError):
        Costs(write_ns=0, transfer_ns=1)
    with pytest.raises(ConfigError):
        simulate(0, 10, True, Costs(1, 1))


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "false-sharing.png"
    assert main(["lab", "false-sharing", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    row = next(line for line in lines if line.startswith("│      inc │       2 │"))
    assert [cell.strip() for cell in row.strip("│").split("│")][4] == "17.03"
    row = next(line for line in lines if "nested walk, cold (24 refs)" in line and "│" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    assert cells[1] == "24" and float(cells[2]) < 1.5  # 24 references x 0.1 walks x 10 ns hide almost all of it
    assert "measured on this machine (os-falseshare) 4x" in out
    assert_real_png(png)
