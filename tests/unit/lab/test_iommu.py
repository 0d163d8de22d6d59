"""Two-stage vs shadow IOMMU translation: reference counts, correctness of both paths, and the crossover."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.errors import ConfigError
from pyrovisor.lab.iommu import (
    Costs,
    IoAddressSpace,
    Iotlb,
    Mode,
    RadixTable,
    Workload,
    crossover_dmas_per_map,
    nested_references,
    run,
)


@pytest.mark.parametrize("guest_levels", range(1, 6))
@pytest.mark.parametrize("host_levels", range(1, 6))
def test_cold_nested_walk_counts_every_reference(guest_levels: int, host_levels: int) -> None:
    space = IoAddressSpace(Mode.NESTED, guest_levels, host_levels, iotlb_entries=0, costs=Costs())
    buffer = space.allocate_buffer()
    space.map(0x1F, buffer)
    hpa, references = space.nested_walk(0x1F)
    assert hpa == space.host.walk(buffer)[0]
    assert references == nested_references(guest_levels, host_levels) == (guest_levels + 1) * (host_levels + 1) - 1
    shadow = IoAddressSpace(Mode.SHADOW, guest_levels, host_levels, iotlb_entries=0, costs=Costs())
    shadow.map(0x1F, shadow.allocate_buffer())
    shadow.dma(0x1F)
    assert shadow.walk_references == guest_levels


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


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["map", "unmap", "dma"]), st.integers(0, 40)), max_size=120),
       st.integers(0, 8))
def test_nested_and_shadow_translate_every_dma_identically(ops: list[tuple[str, int]], iotlb: int) -> None:
    spaces = {mode: IoAddressSpace(mode, 4, 4, iotlb, Costs()) for mode in Mode}
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
                expected = spaces[Mode.NESTED].host.walk(mapped[iova])[0]
                assert results == {Mode.NESTED: expected, Mode.SHADOW: spaces[Mode.SHADOW].host.walk(mapped[iova])[0]}
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


def test_simulated_winner_switches_at_the_analytic_crossover() -> None:
    costs = Costs()
    crossover = crossover_dmas_per_map(4, 4, 1.0, costs)
    assert crossover == pytest.approx((2 * (2000 + 2000) + 10 * 100) / (20 * 100))  # 4.5
    winners = {}
    for per_map in (1, 2, 4, 8, 16):
        workload = Workload(ring_slots=128, dmas_per_map=per_map, dmas=2 * 128 * per_map)
        nested, shadow = run(Mode.NESTED, workload), run(Mode.SHADOW, workload)
        assert nested.miss_rate > 0.7  # a 128-buffer ring cycles through a 64-entry IOTLB
        assert nested.references_per_dma == pytest.approx(24 * nested.miss_rate)
        winners[per_map] = "nested" if nested.cycles_per_dma < shadow.cycles_per_dma else "shadow"
    assert [p for p, w in winners.items() if w == "nested"] == [p for p in winners if p < crossover]


def test_static_mappings_favour_the_shadow_table() -> None:
    nested, shadow = (run(mode, Workload(128, 0, 1024)) for mode in Mode)
    assert nested.map_unmap_per_dma == shadow.map_unmap_per_dma == 0
    assert shadow.exits == 0
    assert nested.cycles_per_dma / shadow.cycles_per_dma == pytest.approx(24 / 4)


def test_trapped_nested_invalidations_move_the_crossover() -> None:
    assert crossover_dmas_per_map(4, 4, 1.0, Costs(), nested_invalidation_exits=True) < crossover_dmas_per_map(
        4, 4, 1.0, Costs())


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "iommu.png"
    assert main(["lab", "iommu", "--ring", "64", "--iotlb", "32", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "IOMMU walk references" in out and "Cycles per DMA" in out and "Cost model" in out
    assert "crossover: nested is cheaper below 4.5 DMAs per map/unmap pair" in out
    assert_real_png(png)
