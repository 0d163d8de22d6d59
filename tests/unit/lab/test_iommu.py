"""Two-stage vs shadow IOMMU translation: reference counts, correctness of both paths, the crossover, the share
of guest invalidations that trap, and vIOMMU's line rates under strict, deferred and optimistic teardown."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_check import lab_json
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.iommu import (
    VIOMMU_LINE_RATE,
    Costs,
    DmaApi,
    Events,
    Invalidation,
    IoAddressSpace,
    Iotlb,
    LineRate,
    Mode,
    RadixTable,
    Workload,
    calibrate,
    crossover_dmas_per_map,
    cycles_per_packet,
    line_rate_rows,
    line_rate_share,
    nested_references,
    run,
    simulate_receive,
)

# docs/lab/iommu.md: "bare-metal strict, deferred and optimistic teardown within 2 points of vIOMMU's 43, 91
# and 100 % of 10 Gb/s" (strict and deferred are calibrated, optimistic teardown is predicted)
VIOMMU_TOLERANCE_POINTS = 2.0
# docs/lab/iommu.md: "the calibrated defaults are what `calibrate` gives, rounded to 10 cycles"
CALIBRATION_ROUNDING_CYCLES = 10.0
# docs/lab/iommu.md: "the reference counts are exact" ((n+1)(m+1)-1 nested, n shadow)
REFERENCE_COUNT_TOLERANCE = 0
# docs/lab/iommu.md: "static mappings favour the shadow table by the ratio of the walks, 24/4"
WALK_RATIO_TOLERANCE = 1e-9  # relative

QUICK = ("--ring", "32", "--iotlb", "16", "--dmas", "256", "--packets", "300", "--seeds", "3")


@pytest.mark.parametrize("guest_levels", range(1, 6))
@pytest.mark.parametrize("host_levels", range(1, 6))
def test_cold_nested_walk_counts_every_reference(guest_levels: int, host_levels: int) -> None:
    space = IoAddressSpace(Mode.NESTED, guest_levels, host_levels, iotlb_entries=0, costs=Costs())
    buffer = space.allocate_buffer()
    space.map(0x1F, buffer)
    hpa, references = space.nested_walk(0x1F)
    assert hpa == space.host.walk(buffer)[0]
    expected = (guest_levels + 1) * (host_levels + 1) - 1
    assert abs(references - nested_references(guest_levels, host_levels)) <= REFERENCE_COUNT_TOLERANCE
    assert nested_references(guest_levels, host_levels) == expected
    for mode in (Mode.SHADOW, Mode.NATIVE):
        one_stage = IoAddressSpace(mode, guest_levels, host_levels, iotlb_entries=0, costs=Costs())
        page = one_stage.allocate_buffer()
        one_stage.map(0x1F, page)
        assert one_stage.dma(0x1F) == one_stage.resolve(page)
        assert one_stage.walk_references == guest_levels


def test_published_shapes() -> None:
    assert nested_references(4, 4) == 24
    assert nested_references(5, 5) == 35
    assert Costs().exit == 2_000  # SplitX, WIOV 2011: direct exit cost


def test_radix_table_map_unmap_walk() -> None:
    pages = iter(range(100, 200))
    table = RadixTable(3, lambda: next(pages))
    assert table.map(0x12345, 7) == 3  # two new intermediate nodes and the leaf entry
    assert table.map(0x12346, 8) == 1  # same leaf node
    target, reads = table.walk(0x12345)
    assert target == 7 and len(reads) == 3
    assert table.unmap(0x12345) and not table.unmap(0x12345)
    assert table.walk(0x12345)[0] is None


def test_iotlb_is_lru_and_invalidates() -> None:
    tlb = Iotlb(2)
    tlb.fill(1, 10)
    tlb.fill(2, 20)
    assert tlb.lookup(1) == 10
    tlb.fill(3, 30)  # evicts 2, the least recently used
    assert tlb.lookup(2) is None and tlb.lookup(3) == 30
    tlb.invalidate(3)
    assert tlb.lookup(3) is None
    assert (tlb.hits, tlb.misses) == (2, 2)
    tlb.flush()
    assert tlb.lookup(1) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["map", "unmap", "dma"]), st.integers(0, 40)), max_size=120),
       st.integers(0, 8))
def test_nested_and_shadow_translate_every_dma_identically(ops: list[tuple[str, int]], iotlb: int) -> None:
    spaces = {mode: IoAddressSpace(mode, 4, 4, iotlb, Costs()) for mode in (Mode.NESTED, Mode.SHADOW)}
    mapped: dict[int, int] = {}
    for op, iova in ops:
        if op == "map" and iova not in mapped:
            gpas = {mode: space.allocate_buffer() for mode, space in spaces.items()}
            assert len(set(gpas.values())) == 1  # both guests allocate the same pages
            for space in spaces.values():
                space.map(iova, gpas[Mode.NESTED])
            mapped[iova] = gpas[Mode.NESTED]
        elif op == "unmap" and iova in mapped:
            for space in spaces.values():
                space.unmap(iova)
            del mapped[iova]
        elif op == "dma":
            if iova in mapped:
                results = {mode: space.dma(iova) for mode, space in spaces.items()}
                assert results == {mode: space.resolve(mapped[iova]) for mode, space in spaces.items()}
            else:
                for space in spaces.values():
                    with pytest.raises(ConfigError):
                        space.dma(iova)
    assert spaces[Mode.NESTED].exits == 0
    assert spaces[Mode.SHADOW].exits == spaces[Mode.SHADOW].counts["map"] + spaces[Mode.SHADOW].counts["unmap"]


def test_unmapped_iova_is_not_reachable_from_a_stale_iotlb() -> None:
    space = IoAddressSpace(Mode.NESTED, 4, 4, 16, Costs())
    space.map(5, space.allocate_buffer())
    space.dma(5)
    space.unmap(5)
    with pytest.raises(ConfigError):
        space.dma(5)


def test_invalidation_policies_protect_as_their_names_say() -> None:
    """Strict: the device loses the page at unmap. Deferred: it keeps it through the stale IOTLB entry until
    the batch flush. Optimistic teardown: the mapping stays until it expires or the page comes back."""
    for policy in Invalidation:
        space = IoAddressSpace(Mode.NATIVE, 4, 4, 16, Costs())
        api = DmaApi(space, policy, flush_batch=2, teardown_window=1)
        page = space.allocate_buffer()
        iova = api.map(page)
        assert space.dma(iova) == page  # now cached in the IOTLB
        api.unmap(iova, page)
        if policy is Invalidation.STRICT:
            with pytest.raises(ConfigError):
                space.dma(iova)
            continue
        assert space.dma(iova) == page  # stale IOTLB entry (deferred) or kept mapping (optimistic)
        if policy is Invalidation.OPTIMISTIC:
            assert api.map(page) == iova and api.events.reused == 1  # the page came back: no new mapping
            api.unmap(iova, page)
        other = space.allocate_buffer()
        other_iova = api.map(other)
        api.unmap(other_iova, other)  # second teardown: the batch of 2 is flushed (optimistic: 1st expiry)
        if policy is Invalidation.DEFERRED:
            assert api.events.flushes == 1
            with pytest.raises(ConfigError):
                space.dma(iova)


def test_simulated_winner_switches_at_the_analytic_crossover() -> None:
    costs = Costs()
    crossover = crossover_dmas_per_map(4, 4, 1.0, costs)
    assert crossover == pytest.approx((2 * (2000 + 2000) + 10 * 100) / (20 * 100))  # 4.5
    trapped_crossover = crossover_dmas_per_map(4, 4, 1.0, costs, trapped_invalidations=1.0)
    assert trapped_crossover == pytest.approx((1 * (2000 + 2000) + 10 * 100) / (20 * 100))  # 2.5
    for share, analytic in ((0.0, crossover), (1.0, trapped_crossover)):
        winners = {}
        for per_map in (1, 2, 4, 8, 16):
            workload = Workload(ring_slots=128, dmas_per_map=per_map, dmas=2 * 128 * per_map)
            nested = run(Mode.NESTED, workload, trapped_invalidations=share)
            shadow = run(Mode.SHADOW, workload)
            assert nested.miss_rate > 0.7  # a 128-buffer ring cycles through a 64-entry IOTLB
            assert nested.references_per_dma == pytest.approx(24 * nested.miss_rate)
            winners[per_map] = "nested" if nested.cycles_per_dma < shadow.cycles_per_dma else "shadow"
        assert [p for p, w in winners.items() if w == "nested"] == [p for p in winners if p < analytic]


def test_static_mappings_favour_the_shadow_table() -> None:
    nested, shadow = (run(mode, Workload(128, 0, 1024)) for mode in (Mode.NESTED, Mode.SHADOW))
    assert nested.map_unmap_per_dma == shadow.map_unmap_per_dma == 0
    assert shadow.exits == 0
    assert nested.cycles_per_dma / shadow.cycles_per_dma == pytest.approx(24 / 4, rel=WALK_RATIO_TOLERANCE)


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_a_share_of_the_guests_invalidations_exits(share: float) -> None:
    result = run(Mode.NESTED, Workload(64, 1, 512), trapped_invalidations=share)
    assert result.exits == round(share * result.unmaps)
    with pytest.raises(ConfigError):
        run(Mode.NESTED, Workload(64, 1, 64), trapped_invalidations=1.5)


def test_the_3x_advantage_holds_only_without_trapped_invalidations() -> None:
    # Issue 16: "the 3x advantage of nested translation holds only when guest invalidations do not trap".
    # The old page's costs (1,000-cycle invalidation, no IOVA cost) gave the 3x; trapping cuts it to 1.4x.
    old = Costs(invalidation=1_000, iova=0)
    workload = Workload(128, 1, 2048)
    shadow = run(Mode.SHADOW, workload, costs=old).cycles_per_dma
    free = shadow / run(Mode.NESTED, workload, costs=old).cycles_per_dma
    trapped = shadow / run(Mode.NESTED, workload, costs=old, trapped_invalidations=1.0).cycles_per_dma
    assert free == pytest.approx(2.94, abs=0.01) and trapped == pytest.approx(1.39, abs=0.01)
    # With the invalidation cost calibrated on vIOMMU, both shrink, and trapping still takes most of it.
    shadow = run(Mode.SHADOW, workload).cycles_per_dma
    free = shadow / run(Mode.NESTED, workload).cycles_per_dma
    trapped = shadow / run(Mode.NESTED, workload, trapped_invalidations=1.0).cycles_per_dma
    assert free == pytest.approx(1.92, abs=0.01) and trapped == pytest.approx(1.26, abs=0.01)


def test_calibration_gives_the_default_costs() -> None:
    line, costs = LineRate(), Costs()
    assert line.budget_cycles == pytest.approx(3600)  # 3 GHz, 1500-byte frames, 10 Gb/s
    stack, invalidation = calibrate(line, costs)
    assert abs(stack - line.stack_cycles) <= CALIBRATION_ROUNDING_CYCLES / 2
    assert abs(invalidation - costs.invalidation) <= CALIBRATION_ROUNDING_CYCLES / 2


def test_bare_metal_line_rates_match_viommu() -> None:
    line, costs = LineRate(), Costs()
    rows = line_rate_rows(line, costs, ring=64, levels=(4, 4), iotlb=64, packets=1000, seeds=range(3),
                          trapped_invalidations=1.0)
    for row in rows:
        published = 100 * VIOMMU_LINE_RATE[row.policy]
        assert row.bare_metal.n == 3
        assert abs(row.bare_metal.mean - published) <= VIOMMU_TOLERANCE_POINTS, row.policy
        assert row.nested == row.bare_metal  # untrapped nested invalidation costs the CPU nothing more
        assert row.shadow.mean <= row.nested_trapped.mean <= row.nested.mean
    strict, deferred, optimistic = rows
    assert strict.nested_trapped.mean < strict.nested.mean - 10  # strict guests pay an exit per unmap
    assert deferred.nested_trapped.mean > deferred.shadow.mean + 10  # batching spares nested, not shadow's maps
    assert optimistic.reused.low > 80  # about --page-reuse 0.9 of the buffers come back with their mapping
    # which pages come back is random: the seeds differ, and the figures that depend on it carry an interval
    assert optimistic.shadow.low < optimistic.shadow.mean < optimistic.shadow.high
    assert strict.bare_metal.low == strict.bare_metal.high  # strict does not depend on the pages


def test_optimistic_teardown_reaches_line_rate_only_with_enough_page_reuse() -> None:
    # docs/lab/iommu.md: "optimistic teardown reaches line rate once about two thirds of the new buffers
    # (between 0.55 and 0.75) come back to a page whose mapping is still kept"
    costs = Costs()
    shares = {}
    for reuse in (0.3, 0.55, 0.75, 0.9):
        line = LineRate(page_reuse=reuse)
        events = simulate_receive(Invalidation.OPTIMISTIC, line, ring=64, packets=3000, seed=3)
        shares[reuse] = line_rate_share(cycles_per_packet(events, line, costs), line)
    assert shares[0.3] < 0.95 and shares[0.55] < 1.0
    assert shares[0.75] == shares[0.9] == 1.0


@pytest.mark.parametrize("policy", list(Invalidation))
@pytest.mark.parametrize("mode", [Mode.NATIVE, Mode.NESTED, Mode.SHADOW])
def test_cycles_per_packet_agree_with_the_address_space(policy: Invalidation, mode: Mode) -> None:
    """The line-rate table prices the DMA API's events by formula; the simulated address space (its own
    exits, walks and writes) must count the same cycles."""
    line, costs = LineRate(flush_batch=16), Costs()
    events = simulate_receive(policy, line, ring=32, packets=600, seed=1, mode=mode, costs=costs,
                              trapped_invalidations=0.5)
    formula = cycles_per_packet(events, line, costs, mode, (4, 4), trapped_invalidations=0.5)
    counted = events.dma_api_cycles / events.packets
    one_trap = (costs.exit + costs.handler) / events.packets  # a share of 0.5 traps every other invalidation
    assert abs(formula - line.stack_cycles - counted) <= 0.01 * counted + one_trap


def test_events_do_not_depend_on_the_mode() -> None:
    line = LineRate()
    runs = [simulate_receive(Invalidation.OPTIMISTIC, line, ring=16, packets=200, seed=5, mode=mode)
            for mode in (Mode.NATIVE, Mode.NESTED, Mode.SHADOW)]
    counts = [(e.maps, e.unmaps, e.reused, e.flushes) for e in runs]
    assert counts[0] == counts[1] == counts[2]
    assert Events(packets=1, sync_invalidations=1, flushes=2).invalidations == 3


def test_json_has_headline_and_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "iommu", *QUICK)
    headline = document["headline"]
    assert set(headline) == {"nested advantage, invalidations not trapped (x)",
                             "nested advantage, invalidations trapped (x)", "crossover DMAs/map",
                             "strict line rate, bare metal %"}
    assert headline["crossover DMAs/map"] == pytest.approx(2.5)  # default: every invalidation traps
    assert headline["nested advantage, invalidations not trapped (x)"] > headline[
        "nested advantage, invalidations trapped (x)"] > 1
    strict = headline["strict line rate, bare metal %"]
    assert strict["n"] == 3 and abs(strict["mean"] - 43) <= VIOMMU_TOLERANCE_POINTS
    assumptions = {a["name"]: a for a in document["assumptions"]}
    assert assumptions["VM exit, direct cost (cycles)"]["value"] == 2000
    assert "Landau et al., WIOV 2011" in assumptions["VM exit, direct cost (cycles)"]["basis"]
    trapped = assumptions["guest invalidations that trap under nested translation (share)"]
    assert trapped["value"] == 1.0 and trapped["basis"].startswith("assumed")
    assert "Amit et al., USENIX ATC 2011" in assumptions["IOTLB invalidation waited for (cycles)"]["basis"]
    assert document["inputs"]["trapped_invalidations"] == 1.0
    line_table = next(t for t in document["tables"] if t["title"].startswith("Share of a 10 Gb/s line rate"))
    assert [row[1] for row in line_table["rows"]] == [43.0, 91.0, 100.0]


def test_sweeping_the_trapped_share_erodes_the_advantage(capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    capsys.readouterr()
    assert main(["lab", "iommu", "--json", *QUICK, "--sweep", "trapped-invalidations=0:1:3"]) == 0
    import json

    points = json.loads(capsys.readouterr().out)["sweep"]["points"]
    assert [p["value"] for p in points] == [0.0, 0.5, 1.0]
    free = [p["headline"]["nested advantage, invalidations not trapped (x)"] for p in points]
    trapped = [p["headline"]["nested advantage, invalidations trapped (x)"] for p in points]
    crossover = [p["headline"]["crossover DMAs/map"] for p in points]
    assert free[0] == trapped[0] and len(set(free)) == 1
    assert trapped[0] > trapped[1] > trapped[2]
    assert crossover == pytest.approx([4.5, 3.5, 2.5])


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "iommu.png"
    assert main(["lab", "iommu", "--ring", "64", "--iotlb", "32", "--packets", "400", "--seeds", "2",
                 "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "IOMMU walk references" in out and "Cycles per DMA" in out and "Cost model" in out
    assert "by the share of guest invalidations that trap" in out and "Share of a 10 Gb/s line rate" in out
    assert "crossover: nested is cheaper below 2.5 DMAs per map/unmap pair" in out
    assert "(guest invalidations trapped: 1)" in out
    assert_real_png(png)


def test_cli_without_trapped_invalidations(capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    assert main(["lab", "iommu", *QUICK, "--trapped-invalidations", "0"]) == 0
    assert "crossover: nested is cheaper below 4.5 DMAs per map/unmap pair" in capsys.readouterr().out
