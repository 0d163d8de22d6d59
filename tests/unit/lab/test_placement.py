"""SR-IOV vs virtio placement: hard constraints (IOMMU, VFs, memory, links) and the throughput/flexibility trade."""

from __future__ import annotations

from pathlib import Path as FilePath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from png_check import assert_real_png

from pyrovisor.lab.placement import (
    SRIOV_LINE_RATE_GBPS,
    Host,
    Path,
    Policy,
    Rates,
    Vm,
    default_cluster,
    place,
)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Host], list[Vm]]:
    hosts = [Host(f"h{i}", draw(st.booleans()), draw(st.sampled_from([64, 128, 256])), draw(st.integers(0, 4)),
                  draw(st.sampled_from([10.0, 20.0, 40.0]))) for i in range(draw(st.integers(1, 5)))]
    vms = [Vm(f"vm{i}", draw(st.sampled_from([16, 32, 64, 96])), draw(st.floats(0.1, 12)), draw(st.booleans()))
           for i in range(draw(st.integers(0, 14)))]
    return hosts, vms


@settings(max_examples=80, deadline=None)
@given(clusters(), st.sampled_from(list(Policy)))
def test_hard_constraints_hold(cluster: tuple[list[Host], list[Vm]], policy: Policy) -> None:
    hosts, vms = cluster
    rates = Rates()
    placement = place(hosts, vms, policy, rates)
    by_name = {h.name: h for h in hosts}
    assert len(placement.placed) + len(placement.unplaced) == len(vms)
    for host in hosts:
        residents = [p for p in placement.placed if p.host == host.name]
        assert sum(p.vm.memory_gb for p in residents) <= host.memory_gb
        sriov = [p for p in residents if p.path is Path.SRIOV]
        assert len(sriov) <= (host.vfs if host.iommu else 0)  # no IOMMU, no VF
        assert sum(p.throughput_gbps for p in residents) <= host.link_gbps + 1e-9
        virtio = [p for p in residents if p.path is Path.VIRTIO]
        assert sum(p.throughput_gbps for p in virtio) <= rates.virtio_host_gbps + 1e-9
    for p in placement.placed:
        assert p.throughput_gbps <= p.vm.demand_gbps + 1e-9
        assert p.throughput_gbps <= (SRIOV_LINE_RATE_GBPS if p.path is Path.SRIOV else rates.virtio_vm_gbps) + 1e-9
        assert p.memory_pinned == (p.path is Path.SRIOV)
        assert p.migratable == (p.path is Path.VIRTIO or policy is Policy.SRIOV_WITH_FAILOVER)
        assert by_name[p.host].iommu or p.path is Path.VIRTIO
        assert p.host not in {d.rstrip("*") for d in p.destinations}
        if policy is Policy.VIRTIO_ONLY:
            assert p.path is Path.VIRTIO
        if policy is Policy.SRIOV_UNLESS_MIGRATING and p.vm.must_migrate:
            assert p.migratable


@settings(max_examples=40, deadline=None)
@given(clusters())
def test_without_any_iommu_every_policy_is_virtio(cluster: tuple[list[Host], list[Vm]]) -> None:
    hosts = [Host(h.name, False, h.memory_gb, h.vfs, h.link_gbps) for h in cluster[0]]
    results = {policy: place(hosts, cluster[1], policy) for policy in Policy}
    reference = results[Policy.VIRTIO_ONLY]
    for placement in results.values():
        assert all(p.path is Path.VIRTIO for p in placement.placed)
        assert placement.throughput_gbps == pytest.approx(reference.throughput_gbps)


def test_default_cluster_trade_off() -> None:
    hosts, vms = default_cluster()
    results = {policy: place(hosts, vms, policy) for policy in Policy}
    virtio, sriov, mixed, failover = (results[p] for p in Policy)
    assert virtio.migratable_share == 1.0 and not any(p.memory_pinned for p in virtio.placed)
    assert virtio.throughput_gbps < mixed.throughput_gbps <= sriov.throughput_gbps
    must = [p for p in sriov.placed if p.vm.must_migrate]
    assert not all(p.migratable for p in must)  # SR-IOV everywhere strands VMs that must move
    assert all(p.migratable for p in mixed.placed if p.vm.must_migrate)
    assert failover.migratable_share == 1.0 and failover.throughput_gbps == pytest.approx(sriov.throughput_gbps)
    # SR-IOV hosts cannot be emptied for maintenance unless their VMs can fail over to virtio
    assert "h1" not in sriov.evacuable_hosts and "h1" in failover.evacuable_hosts


def test_sriov_gets_line_rate_virtio_its_software_cap() -> None:
    hosts = [Host("iommu", True, 256, 2), Host("plain", False, 256, 0)]
    vms = [Vm("fast", 32, 12.0, False), Vm("slow", 32, 12.0, True)]
    placement = {p.vm.name: p for p in place(hosts, vms, Policy.SRIOV_UNLESS_MIGRATING).placed}
    assert placement["fast"].path is Path.SRIOV and placement["fast"].throughput_gbps == SRIOV_LINE_RATE_GBPS
    assert placement["slow"].path is Path.VIRTIO and placement["slow"].throughput_gbps == Rates().virtio_vm_gbps
    assert placement["slow"].destinations == ("iommu",)


def test_cli_prints_tables_and_writes_a_plot(tmp_path: FilePath, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "placement.png"
    assert main(["lab", "placement", "--policy", "failover", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Throughput vs flexibility by policy" in out and "Placement under 'failover'" in out
    assert "virtio: 27.0 Gb/s, 100% migratable" in out
    assert_real_png(png)


def test_cli_without_iommu_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    assert main(["lab", "placement", "--iommu-hosts", "0"]) == 0
    assert "sriov: 27.0 Gb/s, 100% migratable" in capsys.readouterr().out
