"""SR-IOV vs virtio placement: hard constraints (IOMMU, VFs, memory, ports) and the throughput/flexibility trade."""

from __future__ import annotations

from pathlib import Path as FilePath

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_check import lab_json
from png_check import assert_real_png

from pyrovisor.lab.placement import (
    PORT_LINE_RATE_GBPS,
    SRIOV_GOODPUT_SHARE,
    SRIOV_LINE_RATE_GBPS,
    Host,
    Path,
    Policy,
    Rates,
    Vm,
    default_cluster,
    flow_rates,
    place,
)

# docs/lab/placement.md: "one VF alone on an idle 10 GbE port delivers Dong et al.'s 9.48 Gb/s"
DONG_LINE_RATE_TOLERANCE = 0.01  # Gb/s; the figure is an input, so only rounding may separate them
PORT_SLACK = 1e-9  # Gb/s: a port never carries more than its goodput, up to float rounding


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Host], list[Vm]]:
    hosts = [Host(f"h{i}", draw(st.booleans()), draw(st.sampled_from([64, 128, 256])), draw(st.integers(0, 6)),
                  draw(st.integers(1, 3)), draw(st.sampled_from([10.0, 25.0, 40.0])))
             for i in range(draw(st.integers(1, 5)))]
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
        assert sum(p.path is Path.SRIOV for p in residents) <= (host.vfs if host.iommu else 0)  # no IOMMU, no VF
        for port in range(host.ports):
            on_port = [p for p in residents if p.port == port]
            assert sum(p.path is Path.SRIOV for p in on_port) <= host.vfs_on_port(port)
            # every port is its own cap: its VFs and virtio flows together stay under its line rate
            assert sum(p.throughput_gbps for p in on_port) <= rates.port_goodput(host) + PORT_SLACK
            assert rates.port_goodput(host) < host.port_gbps
        virtio = [p for p in residents if p.path is Path.VIRTIO]
        assert sum(p.throughput_gbps for p in virtio) <= rates.virtio_host_gbps + PORT_SLACK
    for p in placement.placed:
        host = by_name[p.host]
        assert 0 <= p.port < host.ports
        assert p.throughput_gbps <= p.vm.demand_gbps + PORT_SLACK
        cap = rates.port_goodput(host) if p.path is Path.SRIOV else rates.virtio_vm_gbps
        assert p.throughput_gbps <= cap + PORT_SLACK
        assert p.memory_pinned == (p.path is Path.SRIOV)
        assert p.migratable == (p.path is Path.VIRTIO or policy is Policy.SRIOV_WITH_FAILOVER)
        assert host.iommu or p.path is Path.VIRTIO
        assert p.host not in {d.rstrip("*") for d in p.destinations}
        if policy is Policy.VIRTIO_ONLY:
            assert p.path is Path.VIRTIO
        if policy is Policy.SRIOV_UNLESS_MIGRATING and p.vm.must_migrate:
            assert p.migratable


@settings(max_examples=40, deadline=None)
@given(clusters())
def test_without_any_iommu_every_policy_is_virtio(cluster: tuple[list[Host], list[Vm]]) -> None:
    hosts = [Host(h.name, False, h.memory_gb, h.vfs, h.ports, h.port_gbps) for h in cluster[0]]
    results = {policy: place(hosts, cluster[1], policy) for policy in Policy}
    reference = results[Policy.VIRTIO_ONLY]
    for placement in results.values():
        assert all(p.path is Path.VIRTIO for p in placement.placed)
        assert placement.throughput_gbps == pytest.approx(reference.throughput_gbps)


def test_vfs_are_dealt_out_over_the_ports() -> None:
    host = Host("h", True, 256, 5, ports=2)
    assert [host.vfs_on_port(p) for p in range(2)] == [3, 2]
    assert Host("h", False, 256, 5).vfs_on_port(0) == 0  # no IOMMU, no usable VF
    assert host.vfs_on_port(2) == 0


def test_vfs_on_one_port_share_its_line_rate() -> None:
    # Issue 16: two 10 GbE ports were pooled as 20 Gb/s, so two VFs on one port could carry 18 Gb/s.
    host = Host("h", True, 256, 4, ports=2)
    busy = [Vm("a", 16, 9.0, False), Vm("b", 16, 9.0, False)]
    shared = flow_rates([host], [(busy[0], "h", 0, Path.SRIOV), (busy[1], "h", 0, Path.SRIOV)], Rates())
    assert sum(shared.values()) == pytest.approx(SRIOV_LINE_RATE_GBPS)  # one port's worth, not 18
    assert shared["a"] == pytest.approx(shared["b"]) == pytest.approx(SRIOV_LINE_RATE_GBPS / 2)
    apart = flow_rates([host], [(busy[0], "h", 0, Path.SRIOV), (busy[1], "h", 1, Path.SRIOV)], Rates())
    assert apart == {"a": 9.0, "b": 9.0}  # one per port: each fits under its own port
    # The placer itself: one port with four VFs and four VMs wanting 9 Gb/s each never exceeds that port.
    single = [Host("one-port", True, 256, 4, ports=1)]
    vms = [Vm(f"vm{i}", 16, 9.0, False) for i in range(4)]
    for policy in Policy:
        placement = place(single, vms, policy)
        assert placement.port_load("one-port", 0) <= SRIOV_LINE_RATE_GBPS + PORT_SLACK
        assert placement.throughput_gbps <= PORT_LINE_RATE_GBPS


def test_one_vf_on_an_idle_port_gets_dongs_line_rate() -> None:
    hosts = [Host("iommu", True, 256, 2), Host("plain", False, 256, 0)]
    vms = [Vm("fast", 32, 12.0, False), Vm("slow", 32, 12.0, True)]
    placement = {p.vm.name: p for p in place(hosts, vms, Policy.SRIOV_UNLESS_MIGRATING).placed}
    assert placement["fast"].path is Path.SRIOV
    assert placement["fast"].throughput_gbps == pytest.approx(SRIOV_LINE_RATE_GBPS, abs=DONG_LINE_RATE_TOLERANCE)
    assert pytest.approx(9.48) == SRIOV_GOODPUT_SHARE * PORT_LINE_RATE_GBPS
    assert placement["slow"].path is Path.VIRTIO and placement["slow"].throughput_gbps == Rates().virtio_vm_gbps
    assert placement["slow"].destinations == ("iommu",)


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
    # with per-port caps the two IOMMU hosts' four ports cannot carry all 42 Gb/s of demand
    assert sriov.throughput_gbps < sum(v.demand_gbps for v in vms)


def test_json_has_headline_and_assumptions(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "placement")
    headline = document["headline"]
    assert set(headline) == {"virtio Gb/s", "sriov Gb/s", "mixed Gb/s", "sriov migratable %"}
    assert headline["virtio Gb/s"] == pytest.approx(27.0)
    assert headline["sriov Gb/s"] == pytest.approx(41.0)
    assert headline["sriov migratable %"] == pytest.approx(30.0)
    assumptions = {a["name"]: a for a in document["assumptions"]}
    dong = assumptions["SR-IOV goodput on a 10 GbE port, Gb/s"]
    assert dong["value"] == SRIOV_LINE_RATE_GBPS and "Dong et al., HPCA 2010" in dong["basis"]
    assert assumptions["port line rate, Gb/s"]["value"] == 10.0
    assert assumptions["virtio throughput per VM, Gb/s"] == {"name": "virtio throughput per VM, Gb/s",
                                                              "value": 4.0, "basis": "assumed"}
    assert document["inputs"]["ports"] == 2


def test_sweep_port_line_rate_raises_sriov_throughput(capsys: pytest.CaptureFixture[str]) -> None:
    document = lab_json(capsys, "placement", "--sweep", "port-gbps=10:40:4")
    points = document["sweep"]["points"]
    assert [p["value"] for p in points] == [10.0, 20.0, 30.0, 40.0]
    sriov = [p["headline"]["sriov Gb/s"] for p in points]
    virtio = [p["headline"]["virtio Gb/s"] for p in points]
    assert sriov[0] < sriov[-1] == pytest.approx(42.0)  # faster ports: every demand fits on a VF
    assert sriov == sorted(sriov)
    assert virtio[0] == pytest.approx(virtio[-1])  # virtio is capped by its software path, not the ports


def test_cli_prints_tables_and_writes_a_plot(tmp_path: FilePath, capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    png = tmp_path / "placement.png"
    assert main(["lab", "placement", "--policy", "failover", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Throughput vs flexibility by policy" in out and "Placement under 'failover'" in out
    assert "Ports under 'failover'" in out
    assert "virtio: 27.0 Gb/s, 100% migratable" in out
    assert_real_png(png)


def test_cli_without_iommu_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    from pyrovisor.api.cli import main

    assert main(["lab", "placement", "--iommu-hosts", "0"]) == 0
    assert "sriov: 27.0 Gb/s, 100% migratable" in capsys.readouterr().out
