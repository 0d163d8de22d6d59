"""VM placement with and without IOMMUs: SR-IOV's throughput against virtio's freedom to migrate.

A cluster has hosts with an IOMMU (VT-d / AMD-Vi enabled, SR-IOV virtual functions available) and hosts
without one. A VM's network can be

- SR-IOV: a virtual function assigned to the guest. Needs the host's IOMMU (DMA remapping) and a free VF;
  runs at close to line rate with little host CPU. The guest talks to hardware directly, so the VM is
  pinned: its memory must stay pinned (no overcommit or ballooning) and it cannot be live-migrated, unless
  the guest bonds the VF with a virtio interface and the VF is unplugged before migration and replugged
  after (Dong et al.'s dynamic network interface switching; the same idea as virtio-net failover).
- virtio: a software device emulated by the host (vhost); works on any host, migrates anywhere with
  room, but every packet crosses the host's software path, which caps throughput per VM and per host.

Placement is greedy: VMs in decreasing demand; an SR-IOV VM goes to the IOMMU host with a free VF and
enough link and memory left, else it falls back to virtio; a virtio VM goes to the host with the most
link and software-path capacity left, preferring hosts without an IOMMU on ties. Policies: virtio (all
VMs on virtio), sriov (SR-IOV wherever possible), mixed (SR-IOV only for VMs that need not migrate),
failover (SR-IOV bonded with a virtio interface, so every VM stays migratable). Each
policy is then scored on throughput delivered, the share of VMs that can be live-migrated, how many
destinations they have, and how many hosts could be emptied for maintenance.

Throughput per VM = min(demand, path rate); per host, SR-IOV and virtio flows share the link, and virtio
flows also share the host's software path; when a cap binds, flows get shares proportional to demand.

Sources and figures
- Y. Dong, X. Yang, J. Li, G. Liao, K. Tian, H. Guan, "High performance network virtualization with
  SR-IOV", HPCA 2010 (journal version: Journal of Parallel and Distributed Computing 2012): SR-IOV reaches
  line rate, 9.48 Gb/s on 10 GbE, scaling to 60 VMs at 1.76 % extra CPU per VM; the JPDC version adds
  dynamic network interface switching (DNIS) to migrate SR-IOV VMs. The 9.48 Gb/s is the SR-IOV rate here.
- N. Amit, M. Ben-Yehuda, D. Tsafrir, A. Schuster, "vIOMMU: Efficient IOMMU Emulation", USENIX ATC 2011:
  direct device assignment requires pinning all of the guest's pages, which disallows overcommitment.
The virtio rates (4 Gb/s per VM, 9 Gb/s of software path per host) and the cluster are assumptions.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SRIOV_LINE_RATE_GBPS = 9.48  # Dong et al., HPCA 2010, 10 GbE


@dataclass(frozen=True)
class Host:
    name: str
    iommu: bool
    memory_gb: int
    vfs: int  # SR-IOV virtual functions the NIC offers (usable only with an IOMMU)
    link_gbps: float = 20.0  # two 10 GbE ports


@dataclass(frozen=True)
class Vm:
    name: str
    memory_gb: int
    demand_gbps: float
    must_migrate: bool  # the operator needs to live-migrate it (maintenance, balancing)


class Path(enum.Enum):
    SRIOV = "SR-IOV"
    VIRTIO = "virtio"


class Policy(enum.Enum):
    VIRTIO_ONLY = "virtio"  # every VM on virtio
    SRIOV_FIRST = "sriov"  # SR-IOV wherever a VF is free
    SRIOV_UNLESS_MIGRATING = "mixed"  # SR-IOV only for VMs that need not migrate
    SRIOV_WITH_FAILOVER = "failover"  # SR-IOV bonded with virtio, unplugged for migration


@dataclass(frozen=True)
class Rates:
    sriov_gbps: float = SRIOV_LINE_RATE_GBPS
    virtio_vm_gbps: float = 4.0  # assumed
    virtio_host_gbps: float = 9.0  # assumed: one host's vhost software path


@dataclass(frozen=True)
class Placed:
    vm: Vm
    host: str
    path: Path
    throughput_gbps: float
    migratable: bool
    destinations: tuple[str, ...]
    memory_pinned: bool


@dataclass(frozen=True)
class Placement:
    policy: Policy
    placed: tuple[Placed, ...]
    unplaced: tuple[str, ...]
    evacuable_hosts: tuple[str, ...]

    @property
    def throughput_gbps(self) -> float:
        return sum(p.throughput_gbps for p in self.placed)

    @property
    def migratable_share(self) -> float:
        return sum(p.migratable for p in self.placed) / len(self.placed) if self.placed else 0.0


def _wants_sriov(vm: Vm, policy: Policy) -> bool:
    if policy is Policy.VIRTIO_ONLY:
        return False
    if policy is Policy.SRIOV_UNLESS_MIGRATING:
        return not vm.must_migrate
    return True


def place(hosts: Sequence[Host], vms: Sequence[Vm], policy: Policy, rates: Rates = Rates()) -> Placement:
    if len({h.name for h in hosts}) != len(hosts) or len({v.name for v in vms}) != len(vms):
        raise ConfigError("cluster", [h.name for h in hosts], "host and VM names must be unique")
    free_memory = {h.name: h.memory_gb for h in hosts}
    free_vfs = {h.name: h.vfs if h.iommu else 0 for h in hosts}
    free_link = {h.name: h.link_gbps for h in hosts}
    free_vhost = {h.name: rates.virtio_host_gbps for h in hosts}
    assignment: list[tuple[Vm, str, Path]] = []
    unplaced = []
    for vm in sorted(vms, key=lambda v: (-v.demand_gbps, v.name)):
        choice = None
        sriov_rate = min(vm.demand_gbps, rates.sriov_gbps)
        virtio_rate = min(vm.demand_gbps, rates.virtio_vm_gbps)
        if _wants_sriov(vm, policy):
            candidates = [h for h in hosts if free_vfs[h.name] > 0 and free_memory[h.name] >= vm.memory_gb
                          and free_link[h.name] >= sriov_rate]
            if candidates:
                host = max(candidates, key=lambda h: (free_link[h.name], free_memory[h.name], h.name))
                choice = (host.name, Path.SRIOV, sriov_rate)
                free_vfs[host.name] -= 1
        if choice is None:
            candidates = [h for h in hosts if free_memory[h.name] >= vm.memory_gb]
            if candidates:
                host = max(candidates, key=lambda h: (min(free_link[h.name], free_vhost[h.name]), not h.iommu,
                                                      free_memory[h.name], h.name))
                choice = (host.name, Path.VIRTIO, virtio_rate)
                free_vhost[host.name] -= virtio_rate
        if choice is None:
            unplaced.append(vm.name)
            continue
        name, path, rate = choice
        free_memory[name] -= vm.memory_gb
        free_link[name] -= rate
        assignment.append((vm, name, path))
    throughput = _throughput(hosts, assignment, rates)
    placed = []
    for vm, host_name, path in assignment:
        pinned = path is Path.SRIOV
        migratable = path is Path.VIRTIO or policy is Policy.SRIOV_WITH_FAILOVER
        destinations = tuple(
            h.name + ("*" if path is Path.SRIOV and free_vfs[h.name] == 0 else "")
            for h in hosts if h.name != host_name and free_memory[h.name] >= vm.memory_gb) if migratable else ()
        placed.append(Placed(vm, host_name, path, throughput[vm.name], migratable, destinations, pinned))
    evacuable = tuple(h.name for h in hosts if _can_evacuate(h, hosts, placed, free_memory))
    return Placement(policy, tuple(placed), tuple(unplaced), evacuable)


def _throughput(hosts: Sequence[Host], assignment: list[tuple[Vm, str, Path]], rates: Rates) -> dict[str, float]:
    result = {}
    for host in hosts:
        flows = [(vm, path) for vm, name, path in assignment if name == host.name]
        wanted = {vm.name: min(vm.demand_gbps, rates.sriov_gbps if path is Path.SRIOV else rates.virtio_vm_gbps)
                  for vm, path in flows}
        virtio = [vm.name for vm, path in flows if path is Path.VIRTIO]
        _scale(wanted, virtio, rates.virtio_host_gbps)
        _scale(wanted, list(wanted), host.link_gbps)
        result.update(wanted)
    return result


def _scale(rates: dict[str, float], names: list[str], capacity: float) -> None:
    total = sum(rates[n] for n in names)
    if total > capacity > 0:
        for n in names:
            rates[n] *= capacity / total


def _can_evacuate(host: Host, hosts: Sequence[Host], placed: Sequence[Placed], free_memory: dict[str, int]) -> bool:
    """Can every VM on `host` be live-migrated to the other hosts' free memory (first fit, largest first)?"""
    residents = sorted((p for p in placed if p.host == host.name), key=lambda p: -p.vm.memory_gb)
    if any(not p.migratable for p in residents):
        return False
    room = {name: free for name, free in free_memory.items() if name != host.name}
    for resident in residents:
        target = next((name for name, free in sorted(room.items(), key=lambda kv: -kv[1])
                       if free >= resident.vm.memory_gb), None)
        if target is None:
            return False
        room[target] -= resident.vm.memory_gb
    return True


def default_cluster() -> tuple[list[Host], list[Vm]]:
    """Four hosts with two 10 GbE ports each, two with an IOMMU and 4 VFs; ten VMs, seven of which must stay
    migratable."""
    hosts = [Host("h1", True, 256, 4), Host("h2", True, 256, 4), Host("h3", False, 256, 0),
             Host("h4", False, 256, 0)]
    vms = [
        Vm("nfv-router", 32, 9.0, False), Vm("nfv-firewall", 32, 8.0, False),
        Vm("storage-gw", 64, 7.0, True), Vm("db-primary", 96, 6.0, True),
        Vm("cache", 64, 5.0, False), Vm("web-1", 32, 2.0, True), Vm("web-2", 32, 2.0, True),
        Vm("batch", 96, 1.0, True), Vm("ci-runner", 64, 1.5, True), Vm("monitoring", 32, 0.5, True),
    ]
    return hosts, vms


class PlacementModel:
    name = "placement"
    summary = "SR-IOV vs virtio placement on a cluster where some hosts lack an IOMMU: throughput vs migratability"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--policy", choices=[p.value for p in Policy], default=Policy.SRIOV_UNLESS_MIGRATING.value,
                            help="policy detailed per VM (default: %(default)s)")
        parser.add_argument("--iommu-hosts", type=int, default=2,
                            help="how many of the four hosts have an IOMMU (default: %(default)s)")
        parser.add_argument("--vfs", type=int, default=4, help="SR-IOV VFs per IOMMU host (default: %(default)s)")
        parser.add_argument("--virtio-vm-gbps", type=float, default=Rates.virtio_vm_gbps,
                            help="virtio throughput per VM (assumed; default: %(default)s)")
        parser.add_argument("--virtio-host-gbps", type=float, default=Rates.virtio_host_gbps,
                            help="virtio software-path capacity per host (assumed; default: %(default)s)")

    def run(self, args: argparse.Namespace) -> LabResult:
        base_hosts, vms = default_cluster()
        if not 0 <= args.iommu_hosts <= len(base_hosts):
            raise ConfigError("--iommu-hosts", args.iommu_hosts, f"between 0 and {len(base_hosts)}")
        hosts = [Host(h.name, i < args.iommu_hosts, h.memory_gb, args.vfs if i < args.iommu_hosts else 0)
                 for i, h in enumerate(base_hosts)]
        rates = Rates(SRIOV_LINE_RATE_GBPS, args.virtio_vm_gbps, args.virtio_host_gbps)
        placements = {policy: place(hosts, vms, policy, rates) for policy in Policy}
        detailed = Policy(args.policy)
        return LabResult(
            tables=(policy_table(placements, vms), vm_table(placements[detailed])),
            plot=lambda figure: plot(figure, placements, hosts, detailed),
            summary=tuple(f"{p.value}: {pl.throughput_gbps:.1f} Gb/s, {pl.migratable_share:.0%} migratable, "
                          f"{len(pl.evacuable_hosts)} hosts evacuable" for p, pl in placements.items()),
        )


def policy_table(placements: dict[Policy, Placement], vms: Sequence[Vm]) -> Table:
    demand = sum(v.demand_gbps for v in vms)
    rows = []
    for policy, placement in placements.items():
        sriov = sum(p.path is Path.SRIOV for p in placement.placed)
        must = [p for p in placement.placed if p.vm.must_migrate]
        rows.append((policy.value, round(placement.throughput_gbps, 2), f"{placement.throughput_gbps / demand:.0%}",
                     sriov, f"{placement.migratable_share:.0%}", f"{sum(p.migratable for p in must)}/{len(must)}",
                     sum(p.memory_pinned for p in placement.placed),
                     ", ".join(placement.evacuable_hosts) or "-"))
    return Table(
        title=f"Throughput vs flexibility by policy ({len(vms)} VMs demanding {demand:g} Gb/s)",
        columns=("policy", "Gb/s", "of demand", "SR-IOV", "migratable", "needs met", "pinned", "evacuable"),
        rows=tuple(rows),
        notes=("virtio: all VMs on virtio; sriov: SR-IOV wherever a VF is free; mixed: SR-IOV only for VMs "
               "that need not migrate; failover: SR-IOV bonded with virtio (unplugged to migrate).",
               "SR-IOV: VMs on a VF; needs met: VMs that must migrate and can; pinned: VMs whose memory must "
               "stay pinned (device assignment); evacuable: hosts whose VMs can all move elsewhere.",
               f"SR-IOV at {SRIOV_LINE_RATE_GBPS} Gb/s (Dong et al., HPCA 2010); virtio rates assumed.",),
    )


def vm_table(placement: Placement) -> Table:
    rows = []
    for p in sorted(placement.placed, key=lambda p: (p.host, p.vm.name)):
        rows.append((p.vm.name, p.host, p.path.value, p.vm.demand_gbps, round(p.throughput_gbps, 2),
                     "yes" if p.migratable else "no", ", ".join(p.destinations) or "-"))
    notes = ["can go to: hosts with room for a live migration; * no free VF there: the VM continues on virtio."]
    if placement.unplaced:
        notes.append(f"not placed: {', '.join(placement.unplaced)}")
    return Table(title=f"Placement under '{placement.policy.value}'",
                 columns=("VM", "host", "NIC", "demand", "Gb/s", "migratable", "can go to"),
                 rows=tuple(rows), notes=tuple(notes))


def plot(figure: Figure, placements: dict[Policy, Placement], hosts: Sequence[Host], policy: Policy) -> None:
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    for index, (name, placement) in enumerate(placements.items()):
        x, y = placement.migratable_share * 100, placement.throughput_gbps
        left.scatter(x, y, s=80, color=f"C{index}")
        left.annotate(name.value, (x, y), xytext=(6, 6), textcoords="offset points")
    left.set_xlabel("VMs that can be live-migrated (%)")
    left.set_ylabel("throughput delivered (Gb/s)")
    left.set_title("Throughput vs flexibility")
    left.set_xlim(-5, 115)
    placement = placements[policy]
    names = [h.name + (" (IOMMU)" if h.iommu else "") for h in hosts]
    for offset, path in enumerate(Path):
        values = [sum(p.throughput_gbps for p in placement.placed if p.host == h.name and p.path is path)
                  for h in hosts]
        bottoms = [sum(p.throughput_gbps for p in placement.placed if p.host == h.name and p.path is Path.SRIOV)
                   if offset else 0 for h in hosts]
        right.bar(names, values, bottom=bottoms, label=path.value, color=["#d62728", "#1f77b4"][offset])
    right.set_ylabel("Gb/s")
    right.set_title(f"Per host, '{policy.value}'", fontsize="small")
    right.tick_params(axis="x", labelrotation=20, labelsize="small")
    right.legend(fontsize="small")


MODEL = PlacementModel()
