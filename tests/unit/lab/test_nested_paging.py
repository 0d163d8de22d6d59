"""Nested page walks: exact reference counts, correct translations, fast path == reference walker, CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.arch.x86_64.paging import TranslationFault, walk
from pyrovisor.errors import ConfigError
from pyrovisor.lab.mmu import batch
from pyrovisor.lab.mmu.batch import simulate, simulate_stretch
from pyrovisor.lab.mmu.caches import CacheGeometry, LruCache, lru_hits
from pyrovisor.lab.mmu.config import MmuConfig
from pyrovisor.lab.mmu.reference import ReferenceWalker
from pyrovisor.lab.mmu.tables import build_machine
from pyrovisor.lab.mmu.traces import PATTERNS, TraceSpec, load_trace, synthetic
from pyrovisor.lab.mmu.x86 import PAGE_SIZES, PagingSide
from pyrovisor.lab.nested_paging import (
    PARK_NATIVE,
    PARK_VIRTUALIZED,
    CostModel,
    qps_ratio,
    qps_ratio_from_measured,
    run_workload,
)

SIDES = [PagingSide(levels, size) for levels, size in itertools.product((4, 5), PAGE_SIZES.values())]
SMALL_CACHES = MmuConfig(tlb=CacheGeometry(16, 4), pwc=CacheGeometry(2), nested_tlb=CacheGeometry(4),
                         nested_pwc=CacheGeometry(2))



@pytest.mark.parametrize(("guest", "host"), list(itertools.product(SIDES, SIDES)), ids=str)
def test_cold_walk_reads_every_entry_of_both_dimensions(guest: PagingSide, host: PagingSide) -> None:
    addresses = np.array([0x7F12_3456_7ABC, 0x0000_0040_0000, 0x7F12_3456_7ABC])
    machine = build_machine(addresses, guest, host)
    config = MmuConfig(guest=guest, host=host).cold()
    n, m = guest.walked_levels, host.walked_levels
    nested = ReferenceWalker(machine, config)
    native = ReferenceWalker(machine, config.native())
    for address in addresses.tolist():
        nested.access(address)
        native.access(address)
    assert nested.counts().references == 3 * ((n + 1) * (m + 1) - 1)
    assert nested.counts().guest_references == 3 * n
    assert native.counts().references == 3 * n
    assert simulate(machine, config, addresses) == nested.counts()
    assert simulate(machine, config.native(), addresses) == native.counts()


def test_published_cold_walk_figures() -> None:
    four_k, two_m = PAGE_SIZES["4K"], PAGE_SIZES["2M"]
    assert MmuConfig().cold_references() == 24
    assert MmuConfig().native().cold_references() == 4
    assert MmuConfig(guest=PagingSide(5), host=PagingSide(5)).cold_references() == 35
    assert MmuConfig(guest=PagingSide(4, two_m), host=PagingSide(4, two_m)).cold_references() == 15
    assert MmuConfig(guest=PagingSide(4, two_m), host=PagingSide(4, four_k)).cold_references() == 19


def test_translations_match_an_independent_walk_of_the_same_tables() -> None:
    trace = synthetic(TraceSpec("random", accesses=300, footprint=1 << 34, seed=3))
    machine = build_machine(trace)
    native = ReferenceWalker(machine, MmuConfig().native())
    nested = ReferenceWalker(machine, MmuConfig())
    expected = machine.translate(trace)
    for address, host_physical in zip(trace.tolist(), expected.tolist(), strict=True):
        oracle = walk(machine.native_memory.read, machine.cr3, address)  # pyrovisor.arch's x86-64 walker
        assert native.access(address) == oracle.physical_address
        assert nested.access(address) == host_physical
        assert machine.host_walk(np.array([oracle.physical_address]))[0] == host_physical


def test_an_unmapped_address_faults() -> None:
    machine = build_machine(np.array([0x7F00_0000_0000]))
    with pytest.raises(TranslationFault):
        ReferenceWalker(machine, MmuConfig()).access(0x1234_5678_9000)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("config", [MmuConfig(), MmuConfig().native(), SMALL_CACHES,
                                    MmuConfig(guest=PagingSide(5, PAGE_SIZES["2M"]), host=PagingSide(4))],
                         ids=["default", "native", "small", "5-level-2M-on-4K"])
def test_fast_path_counts_equal_the_reference_walker(pattern: str, config: MmuConfig) -> None:
    trace = synthetic(TraceSpec(pattern, accesses=6_000, footprint=1 << 28, nodes=3000, hot_bytes=1 << 20, seed=2))
    machine = build_machine(trace, config.guest, config.host or PagingSide())
    assert simulate(machine, config, trace, workers=1) == ReferenceWalker(machine, config).run(trace.tolist())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=400), st.sampled_from([64, 4096, 1 << 21]),
       st.integers(0, 8), st.sampled_from([0, 1, 2]), st.integers(0, 6), st.integers(0, 3), st.booleans())
def test_fast_path_equals_reference_on_arbitrary_traces(slots: list[int], spacing: int, tlb: int, tlb_ways: int,
                                                        nested_tlb: int, pwc: int, nested: bool) -> None:
    trace = 0x7F00_0000_0000 + np.array(slots, dtype=np.int64) * spacing
    ways = tlb_ways if tlb_ways and tlb % tlb_ways == 0 else 0
    config = MmuConfig(tlb=CacheGeometry(tlb, ways), pwc=CacheGeometry(pwc), nested_tlb=CacheGeometry(nested_tlb),
                       nested_pwc=CacheGeometry(pwc))
    config = config if nested else config.native()
    machine = build_machine(trace)
    assert simulate(machine, config, trace, workers=1) == ReferenceWalker(machine, config).run(trace.tolist())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=300), st.integers(0, 6), st.integers(0, 3))
def test_lru_hits_is_the_lru_cache(keys: list[int], entries: int, ways: int) -> None:
    geometry = CacheGeometry(entries, ways if ways and entries % ways == 0 else 0)
    cache = LruCache(geometry)
    expected = []
    for key in keys:
        hit = cache.lookup(key) is not None
        if not hit:
            cache.fill(key, key)
        expected.append(hit)
    assert lru_hits(np.array(keys), geometry).tolist() == expected


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(50, 1500), st.integers(0, 1500), st.sampled_from([30, 300, 3000]))
def test_a_certified_stretch_counts_what_a_run_from_the_start_counts(seed: int, first: int, warm_up: int,
                                                                      span: int) -> None:
    rng = np.random.default_rng(seed)
    trace = 0x7F00_0000_0000 + rng.integers(0, span, 2000) * 4096
    machine = build_machine(trace)
    warm_up = min(warm_up, first)
    stretch = simulate_stretch(machine, SMALL_CACHES, trace[first - warm_up:], warm_up, at_trace_start=False)
    if stretch.certain:
        assert stretch.counts == simulate_stretch(machine, SMALL_CACHES, trace, first).counts


def test_parallel_stretches_give_the_sequential_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "PARALLEL_MINIMUM", 5_000)
    monkeypatch.setattr(batch, "WARM_UP_MINIMUM", 500)
    for pattern in ("random", "sequential"):
        trace = synthetic(TraceSpec(pattern, accesses=30_000, footprint=1 << 28, seed=4))
        machine = build_machine(trace)
        one = simulate(machine, MmuConfig(), trace, workers=1)
        assert simulate(machine, MmuConfig(), trace, workers=3) == one
        assert one.accesses == 30_000


def test_warm_caches_bring_walks_near_the_published_averages() -> None:
    result = run_workload("random", synthetic(TraceSpec("random", accesses=60_000)), MmuConfig())
    native, nested = result.native.references_per_walk, result.nested.references_per_walk
    assert 1.0 <= native < 4 and nested < 24 / 4  # caches remove most of a cold walk
    assert abs(native - PARK_NATIVE) / PARK_NATIVE < 0.4
    assert abs(nested - PARK_VIRTUALIZED) / PARK_VIRTUALIZED < 0.25
    assert result.nested.walks == result.native.walks  # same TLB, same trace


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.floats(1, 500), st.floats(1, 500))
def test_qps_model_is_the_ratio_of_cycles(accesses: int, native_refs: int, extra_refs: int, access_cycles: float,
                                          reference_cycles: float) -> None:
    from pyrovisor.lab.mmu.counts import WalkCounts

    def counts(references: int) -> WalkCounts:
        return WalkCounts(accesses, 1, references, 0, 0, 0, (), (), ())

    costs = CostModel(access_cycles, reference_cycles)
    native, nested = counts(native_refs), counts(native_refs + extra_refs)
    ratio = qps_ratio(costs.walk_fraction(native, native), costs.walk_fraction(nested, native))
    assert ratio == pytest.approx(costs.cycles(native) / costs.cycles(nested))
    assert qps_ratio(0.3, 0.3) == 1.0
    assert qps_ratio_from_measured(0.2, 3.0) == pytest.approx(1 / 1.4)


def test_trace_files(tmp_path: Path) -> None:
    text = tmp_path / "trace.txt"
    text.write_text("# a comment\n0x7f0000001000\n\n140737488355328  # decimal\n0xffff888000001000\n")
    assert load_trace(text).tolist() == [0x7F0000001000, 140737488355328, 0xFFFF888000001000 & (2**63 - 1)]
    addresses = np.array([0x1000, 0x7F0000002008], dtype=np.uint64)
    (tmp_path / "trace.bin").write_bytes(addresses.astype("<u8").tobytes())
    np.save(tmp_path / "trace.npy", addresses)
    assert load_trace(tmp_path / "trace.bin").tolist() == addresses.tolist()
    assert load_trace(tmp_path / "trace.npy").tolist() == addresses.tolist()
    (tmp_path / "bad.txt").write_text("0x1000\nnot-an-address\n")
    with pytest.raises(ConfigError, match=r"bad\.txt:2"):
        load_trace(tmp_path / "bad.txt")


def test_cli_prints_tables_and_writes_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    trace = tmp_path / "mine.txt"
    trace.write_text("\n".join(hex(0x7F00_0000_0000 + 4096 * i) for i in range(500)))
    assert main(["lab", "nested-paging", "--trace", str(trace)]) == 0
    assert "mine.txt" in capsys.readouterr().out
    png = tmp_path / "walks.png"
    assert main(["lab", "nested-paging", "--accesses", "20000", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "refs/walk nested" in out and "QPS vm/native" in out
    for pattern in PATTERNS:
        assert pattern in out
    assert "│                  24 │             24 │" in out  # 4+4 cold walk: formula and count
    assert "│                  35 │             35 │" in out
    assert "│                  15 │             15 │" in out
    assert_real_png(png)
