"""VM placement with and without IOMMUs: SR-IOV's throughput against virtio's freedom to migrate.

A cluster has hosts with an IOMMU (VT-d / AMD-Vi enabled, SR-IOV virtual functions available) and hosts
without one. Every host has a few network ports (two 10 GbE by default); a VF belongs to one port, and
everything sent through a port shares that port's line rate. A VM's network can be

- SR-IOV: a virtual function assigned to the guest. Needs the host's IOMMU (DMA remapping) and a free VF
  on some port; runs at close to the port's line rate with little host CPU. The guest talks to hardware
  directly, so the VM is pinned: its memory must stay pinned (no overcommit or ballooning) and it cannot
  be live-migrated, unless the guest bonds the VF with a virtio interface and the VF is unplugged before
  migration and replugged after (dynamic network interface switching, in the journal version of Dong et
  al.; the same idea as virtio-net failover).
- virtio: a software device emulated by the host (vhost); works on any host, migrates anywhere with
  room, but every packet crosses the host's software path, which caps throughput per VM and per host.
  The host's bridge sends a virtio VM's traffic out through one of its ports.

Placement is greedy: VMs in decreasing demand; an SR-IOV VM goes to the port (of an IOMMU host with
enough memory) that has a free VF and the most capacity left, if that port can carry the VM's rate,
else it falls back to virtio; a virtio VM goes to the host with the most software-path and port capacity
left, preferring hosts without an IOMMU on ties, and to that host's emptiest port. Policies: virtio (all
VMs on virtio), sriov (SR-IOV wherever possible), mixed (SR-IOV only for VMs that need not migrate),
failover (SR-IOV bonded with a virtio interface, so every VM stays migratable). Each policy is then
scored on throughput delivered, the share of VMs that can be live-migrated, how many destinations they
have, and how many hosts could be emptied for maintenance.

Throughput per VM = min(demand, path rate), the SR-IOV path rate being a port's goodput
    g_port = s * port line rate,    s = 9.48 / 10 (Dong et al.: line rate, 9.48 Gb/s, on 10 GbE),
and the virtio path rate an assumed per-VM cap. Then, per host, virtio flows share the host's software
path, and per port, all flows through the port share g_port; when a cap binds, the flows under it get
shares proportional to what they wanted. So VFs on one port can never carry more than that port's line
rate between them, however many VFs the port offers.

Sources and figures
- Y. Dong, X. Yang, X. Li, J. Li, K. Tian, H. Guan, "High performance network virtualization with
  SR-IOV", HPCA 2010: SR-IOV reaches line rate, 9.48 Gb/s, scaling to 60 VMs at 1.76 % extra CPU per VM.
  A journal version (Journal of Parallel and Distributed Computing, 2012) adds dynamic network interface
  switching (DNIS) to migrate SR-IOV VMs. The 9.48 Gb/s fixes the share s of a port's line rate a VF
  delivers.
- N. Amit, M. Ben-Yehuda, D. Tsafrir, A. Schuster, "vIOMMU: Efficient IOMMU Emulation", USENIX ATC 2011:
  direct device assignment requires pinning all of the guest's pages, which disallows overcommitment.
The virtio rates (4 Gb/s per VM, 9 Gb/s of software path per host), the ports and the cluster are
assumptions.
"""

from __future__ import annotations

import argparse
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyrovisor.errors import ConfigError
from pyrovisor.lab.model import Assumption, LabResult, Table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SRIOV_LINE_RATE_GBPS = 9.48  # Dong et al., HPCA 2010: SR-IOV at line rate on 10 GbE
PORT_LINE_RATE_GBPS = 10.0  # one 10 GbE port
SRIOV_GOODPUT_SHARE = SRIOV_LINE_RATE_GBPS / PORT_LINE_RATE_GBPS  # what a port's line rate delivers: 0.948
DONG_SOURCE = "Dong et al., HPCA 2010"
AMIT_SOURCE = "Amit et al., USENIX ATC 2011"


@dataclass(frozen=True)
class Host:
    name: str
    iommu: bool
    memory_gb: int
    vfs: int  # SR-IOV virtual functions the NIC offers, spread over its ports (usable only with an IOMMU)
    ports: int = 2
    port_gbps: float = PORT_LINE_RATE_GBPS  # line rate of each port

    def vfs_on_port(self, port: int) -> int:
        """VFs usable on `port`: the host's VFs dealt out over its ports, the first ports taking any extra."""
        if not self.iommu or not 0 <= port < self.ports:
            return 0
        return self.vfs // self.ports + (port < self.vfs % self.ports)

    @property
    def link_gbps(self) -> float:
        """All ports' line rates together: an upper bound, never a pool (each port is its own cap)."""
        return self.ports * self.port_gbps


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
    goodput_share: float = SRIOV_GOODPUT_SHARE  # of a port's line rate (Dong et al.)
    virtio_vm_gbps: float = 4.0  # assumed
    virtio_host_gbps: float = 9.0  # assumed: one host's vhost software path

    def port_goodput(self, host: Host) -> float:
        """What one port of `host` carries at most, over all the flows through it."""
        return self.goodput_share * host.port_gbps


@dataclass(frozen=True)
class Placed:
    vm: Vm
    host: str
    port: int  # the host's port the VM's traffic leaves through
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

    def port_load(self, host: str, port: int) -> float:
        return sum(p.throughput_gbps for p in self.placed if p.host == host and p.port == port)


def _wants_sriov(vm: Vm, policy: Policy) -> bool:
    if policy is Policy.VIRTIO_ONLY:
        return False
    if policy is Policy.SRIOV_UNLESS_MIGRATING:
        return not vm.must_migrate
    return True


def place(hosts: Sequence[Host], vms: Sequence[Vm], policy: Policy, rates: Rates = Rates()) -> Placement:
    if len({h.name for h in hosts}) != len(hosts) or len({v.name for v in vms}) != len(vms):
        raise ConfigError("cluster", [h.name for h in hosts], "host and VM names must be unique")
    if any(h.ports < 1 for h in hosts):
        raise ConfigError("cluster", [h.ports for h in hosts], "every host needs at least one port")
    free_memory = {h.name: h.memory_gb for h in hosts}
    free_vfs = {(h.name, p): h.vfs_on_port(p) for h in hosts for p in range(h.ports)}
    free_port = {(h.name, p): rates.port_goodput(h) for h in hosts for p in range(h.ports)}
    free_vhost = {h.name: rates.virtio_host_gbps for h in hosts}
    assignment: list[tuple[Vm, str, int, Path]] = []
    unplaced = []
    for vm in sorted(vms, key=lambda v: (-v.demand_gbps, v.name)):
        choice = None
        if _wants_sriov(vm, policy):
            ports = [(h, p) for h in hosts if free_memory[h.name] >= vm.memory_gb for p in range(h.ports)
                     if free_vfs[(h.name, p)] > 0
                     and free_port[(h.name, p)] >= min(vm.demand_gbps, rates.port_goodput(h))]
            if ports:
                host, port = max(ports, key=lambda hp: (free_port[(hp[0].name, hp[1])],
                                                        free_memory[hp[0].name], hp[0].name, -hp[1]))
                choice = (host.name, port, Path.SRIOV, min(vm.demand_gbps, rates.port_goodput(host)))
                free_vfs[(host.name, port)] -= 1
        if choice is None:
            candidates = [h for h in hosts if free_memory[h.name] >= vm.memory_gb]
            if candidates:
                def room(h: Host) -> float:
                    return min(max(free_port[(h.name, p)] for p in range(h.ports)), free_vhost[h.name])

                host = max(candidates, key=lambda h: (room(h), not h.iommu, free_memory[h.name], h.name))
                port = max(range(host.ports), key=lambda p: (free_port[(host.name, p)], -p))
                virtio_rate = min(vm.demand_gbps, rates.virtio_vm_gbps)
                choice = (host.name, port, Path.VIRTIO, virtio_rate)
                free_vhost[host.name] -= virtio_rate
        if choice is None:
            unplaced.append(vm.name)
            continue
        name, port, path, rate = choice
        free_memory[name] -= vm.memory_gb
        free_port[(name, port)] -= rate
        assignment.append((vm, name, port, path))
    throughput = flow_rates(hosts, assignment, rates)
    host_vfs_left = {h.name: sum(free_vfs[(h.name, p)] for p in range(h.ports)) for h in hosts}
    placed = []
    for vm, host_name, port, path in assignment:
        pinned = path is Path.SRIOV
        migratable = path is Path.VIRTIO or policy is Policy.SRIOV_WITH_FAILOVER
        destinations = tuple(
            h.name + ("*" if path is Path.SRIOV and host_vfs_left[h.name] == 0 else "")
            for h in hosts
            if h.name != host_name and free_memory[h.name] >= vm.memory_gb) if migratable else ()
        placed.append(Placed(vm, host_name, port, path, throughput[vm.name], migratable, destinations,
                             pinned))
    evacuable = tuple(h.name for h in hosts if _can_evacuate(h, placed, free_memory))
    return Placement(policy, tuple(placed), tuple(unplaced), evacuable)


def flow_rates(hosts: Sequence[Host], assignment: Sequence[tuple[Vm, str, int, Path]],
               rates: Rates) -> dict[str, float]:
    """Gb/s per VM: each flow capped by its path, virtio flows scaled to the host's software path, then every
    port's flows scaled to the port's goodput (proportional shares when a cap binds)."""
    result = {}
    for host in hosts:
        flows = [(vm, port, path) for vm, name, port, path in assignment if name == host.name]
        wanted = {vm.name: min(vm.demand_gbps, rates.port_goodput(host) if path is Path.SRIOV
                               else rates.virtio_vm_gbps) for vm, _, path in flows}
        _scale(wanted, [vm.name for vm, _, path in flows if path is Path.VIRTIO], rates.virtio_host_gbps)
        for port in range(host.ports):
            _scale(wanted, [vm.name for vm, p, _ in flows if p == port], rates.port_goodput(host))
        result.update(wanted)
    return result


def _scale(rates: dict[str, float], names: list[str], capacity: float) -> None:
    total = sum(rates[n] for n in names)
    if total > capacity > 0:
        for n in names:
            rates[n] *= capacity / total


def _can_evacuate(host: Host, placed: Sequence[Placed], free_memory: dict[str, int]) -> bool:
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


@dataclass(frozen=True)
class ClusterShape:
    """The default cluster's knobs: four hosts, the first `iommu_hosts` of them with an IOMMU."""

    iommu_hosts: int = 2
    vfs: int = 4  # per IOMMU host, dealt out over its ports
    ports: int = 2
    port_gbps: float = PORT_LINE_RATE_GBPS
    memory_gb: int = 256
    demand_scale: float = 1.0  # multiplies every VM's demand


def default_cluster(shape: ClusterShape = ClusterShape()) -> tuple[list[Host], list[Vm]]:
    """Four hosts with two 10 GbE ports each, two with an IOMMU and 4 VFs (2 per port); ten VMs, seven of
    which must stay migratable."""
    hosts = [Host(f"h{i + 1}", i < shape.iommu_hosts, shape.memory_gb,
                  shape.vfs if i < shape.iommu_hosts else 0, shape.ports, shape.port_gbps) for i in range(4)]
    vms = [
        Vm("nfv-router", 32, 9.0, False), Vm("nfv-firewall", 32, 8.0, False),
        Vm("storage-gw", 64, 7.0, True), Vm("db-primary", 96, 6.0, True),
        Vm("cache", 64, 5.0, False), Vm("web-1", 32, 2.0, True), Vm("web-2", 32, 2.0, True),
        Vm("batch", 96, 1.0, True), Vm("ci-runner", 64, 1.5, True), Vm("monitoring", 32, 0.5, True),
    ]
    if shape.demand_scale != 1.0:
        vms = [Vm(v.name, v.memory_gb, v.demand_gbps * shape.demand_scale, v.must_migrate) for v in vms]
    return hosts, vms


HEADLINE_POLICIES = (Policy.VIRTIO_ONLY, Policy.SRIOV_FIRST, Policy.SRIOV_UNLESS_MIGRATING)


class PlacementModel:
    name = "placement"
    summary = "SR-IOV vs virtio placement on a cluster where some hosts lack an IOMMU: throughput vs migratability"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        shape = ClusterShape()
        parser.add_argument("--policy", choices=[p.value for p in Policy],
                            default=Policy.SRIOV_UNLESS_MIGRATING.value,
                            help="policy detailed per VM (default: %(default)s)")
        parser.add_argument("--iommu-hosts", type=int, default=shape.iommu_hosts,
                            help="how many of the four hosts have an IOMMU (default: %(default)s)")
        parser.add_argument("--vfs", type=int, default=shape.vfs,
                            help="SR-IOV VFs per IOMMU host, spread over its ports "
                                 "(assumed; default: %(default)s)")
        parser.add_argument("--ports", type=int, default=shape.ports,
                            help="network ports per host (assumed; default: %(default)s)")
        parser.add_argument("--port-gbps", type=float, default=shape.port_gbps,
                            help="line rate of each port, Gb/s (assumed 10 GbE; default: %(default)s)")
        parser.add_argument("--host-memory-gb", type=int, default=shape.memory_gb,
                            help="memory per host, GB (assumed; default: %(default)s)")
        parser.add_argument("--demand-scale", type=float, default=shape.demand_scale,
                            help="multiply every VM's network demand (default: %(default)s)")
        parser.add_argument("--virtio-vm-gbps", type=float, default=Rates.virtio_vm_gbps,
                            help="virtio throughput per VM (assumed; default: %(default)s)")
        parser.add_argument("--virtio-host-gbps", type=float, default=Rates.virtio_host_gbps,
                            help="virtio software-path capacity per host (assumed; default: %(default)s)")

    def run(self, args: argparse.Namespace) -> LabResult:
        if not 0 <= args.iommu_hosts <= 4:
            raise ConfigError("--iommu-hosts", args.iommu_hosts, "between 0 and 4")
        for option, value in (("--ports", args.ports), ("--port-gbps", args.port_gbps)):
            if value <= 0:
                raise ConfigError(option, value, "must be positive")
        if args.vfs < 0 or args.demand_scale < 0:
            raise ConfigError("--vfs/--demand-scale", (args.vfs, args.demand_scale), "must not be negative")
        shape = ClusterShape(args.iommu_hosts, args.vfs, args.ports, args.port_gbps, args.host_memory_gb,
                             args.demand_scale)
        hosts, vms = default_cluster(shape)
        rates = Rates(SRIOV_GOODPUT_SHARE, args.virtio_vm_gbps, args.virtio_host_gbps)
        placements = {policy: place(hosts, vms, policy, rates) for policy in Policy}
        detailed = Policy(args.policy)
        headline: tuple[tuple[str, float], ...] = (
            *((f"{p.value} Gb/s", round(placements[p].throughput_gbps, 3)) for p in HEADLINE_POLICIES),
            ("sriov migratable %", round(100 * placements[Policy.SRIOV_FIRST].migratable_share, 1)),
        )
        return LabResult(
            tables=(policy_table(placements, vms), vm_table(placements[detailed], hosts, rates),
                    port_table(placements[detailed], hosts, rates)),
            plot=lambda figure: plot(figure, placements, hosts, detailed, rates),
            summary=tuple(f"{p.value}: {pl.throughput_gbps:.1f} Gb/s, {pl.migratable_share:.0%} migratable, "
                          f"{len(pl.evacuable_hosts)} hosts evacuable" for p, pl in placements.items()),
            headline=headline,
            assumptions=assumptions(shape, rates),
        )


def assumptions(shape: ClusterShape, rates: Rates) -> tuple[Assumption, ...]:
    return (
        Assumption("SR-IOV goodput on a 10 GbE port, Gb/s", SRIOV_LINE_RATE_GBPS, DONG_SOURCE),
        Assumption("share of a port's line rate an SR-IOV guest delivers", round(rates.goodput_share, 4),
                   f"{DONG_SOURCE}: 9.48 of 10 Gb/s"),
        Assumption("assigned devices pin all guest memory (no overcommit)", True, AMIT_SOURCE),
        Assumption("port line rate, Gb/s", shape.port_gbps, "assumed (10 GbE)"),
        Assumption("ports per host", shape.ports, "assumed"),
        Assumption("VFs per IOMMU host", shape.vfs, "assumed"),
        Assumption("hosts with an IOMMU, of 4", shape.iommu_hosts, "assumed"),
        Assumption("memory per host, GB", shape.memory_gb, "assumed"),
        Assumption("virtio throughput per VM, Gb/s", rates.virtio_vm_gbps, "assumed"),
        Assumption("virtio software path per host, Gb/s", rates.virtio_host_gbps, "assumed"),
        Assumption("VM demands", f"ten VMs, 42 Gb/s in all, times {shape.demand_scale:g}; seven must migrate",
                   "assumed"),
    )


def policy_table(placements: dict[Policy, Placement], vms: Sequence[Vm]) -> Table:
    demand = sum(v.demand_gbps for v in vms)
    rows = []
    for policy, placement in placements.items():
        sriov = sum(p.path is Path.SRIOV for p in placement.placed)
        must = [p for p in placement.placed if p.vm.must_migrate]
        rows.append((policy.value, round(placement.throughput_gbps, 2),
                     f"{placement.throughput_gbps / demand:.0%}" if demand else "-",
                     sriov, f"{placement.migratable_share:.0%}",
                     f"{sum(p.migratable for p in must)}/{len(must)}",
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
               f"each port carries at most {SRIOV_GOODPUT_SHARE:.1%} of its line rate, shared by every "
               f"VF and virtio flow on it ({SRIOV_LINE_RATE_GBPS} of 10 Gb/s, {DONG_SOURCE}); virtio "
               "rates assumed.",),
    )


def vm_table(placement: Placement, hosts: Sequence[Host], rates: Rates) -> Table:
    rows = []
    for p in sorted(placement.placed, key=lambda p: (p.host, p.port, p.vm.name)):
        rows.append((p.vm.name, p.host, f"p{p.port}", p.path.value, round(p.vm.demand_gbps, 2),
                     round(p.throughput_gbps, 2), "yes" if p.migratable else "no",
                     ", ".join(p.destinations) or "-"))
    notes = ["can go to: hosts with room for a live migration; * no free VF there: the VM continues on "
             "virtio."]
    if placement.unplaced:
        notes.append(f"not placed: {', '.join(placement.unplaced)}")
    return Table(title=f"Placement under '{placement.policy.value}'",
                 columns=("VM", "host", "port", "NIC", "demand", "Gb/s", "migratable", "can go to"),
                 rows=tuple(rows), notes=tuple(notes))


def port_table(placement: Placement, hosts: Sequence[Host], rates: Rates) -> Table:
    rows = []
    for host in hosts:
        for port in range(host.ports):
            on_port = [p for p in placement.placed if p.host == host.name and p.port == port]
            rows.append((host.name + (" (IOMMU)" if host.iommu else ""), f"p{port}", host.port_gbps,
                         round(rates.port_goodput(host), 3), host.vfs_on_port(port),
                         sum(p.path is Path.SRIOV for p in on_port),
                         sum(p.path is Path.VIRTIO for p in on_port),
                         round(placement.port_load(host.name, port), 2)))
    return Table(title=f"Ports under '{placement.policy.value}'",
                 columns=("host", "port", "line rate", "most Gb/s", "VFs", "on VF", "on virtio", "Gb/s"),
                 rows=tuple(rows),
                 notes=("most Gb/s: the port's line rate times the share an SR-IOV guest delivers "
                        f"({DONG_SOURCE}); all flows through a port share it, VFs included.",))


def plot(figure: Figure, placements: dict[Policy, Placement], hosts: Sequence[Host], policy: Policy,
         rates: Rates) -> None:
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    for index, (name, placement) in enumerate(placements.items()):
        x, y = placement.migratable_share * 100, placement.throughput_gbps
        left.scatter(x, y, s=80, color=f"C{index}")
        left.annotate(name.value, (x, y), xytext=(6, 6), textcoords="offset points")
    left.set_xlabel("VMs that can be live-migrated (%)")
    left.set_ylabel("throughput delivered (Gb/s)")
    left.set_title("Throughput vs flexibility")
    left.set_xlim(-5, 125)
    placement = placements[policy]
    ports = [(h, p) for h in hosts for p in range(h.ports)]
    labels = [f"{h.name}/p{p}" + ("*" if h.iommu else "") for h, p in ports]
    positions = list(range(len(ports)))
    bottoms = [0.0] * len(ports)
    for path, color in ((Path.SRIOV, "#d62728"), (Path.VIRTIO, "#1f77b4")):
        values = [sum(q.throughput_gbps for q in placement.placed
                      if q.host == h.name and q.port == p and q.path is path) for h, p in ports]
        right.bar(positions, values, bottom=bottoms, label=path.value, color=color)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    line_rates = sorted({h.port_gbps for h in hosts})
    for rate in line_rates:
        right.axhline(rate, color="black", linestyle=":", linewidth=1)
        right.axhline(rate * rates.goodput_share, color="grey", linestyle="--", linewidth=1)
    right.annotate(f"port line rate {line_rates[-1]:g} Gb/s; dashed: the most a port carries",
                   (positions[-1], line_rates[-1]), xytext=(0, 3), textcoords="offset points", ha="right",
                   fontsize="x-small")
    if PORT_LINE_RATE_GBPS in line_rates:  # the published point belongs to a 10 GbE port
        right.scatter([-0.75], [SRIOV_LINE_RATE_GBPS], marker="*", s=160, color="black", zorder=3,
                      label=f"one VF at line rate, {SRIOV_LINE_RATE_GBPS} Gb/s ({DONG_SOURCE})")
    right.set_xlim(-1.2, positions[-1] + 0.6)
    right.set_xticks(positions, labels)
    right.set_ylim(0, max(line_rates) * 1.4)
    right.set_ylabel("Gb/s through the port")
    right.set_title(f"Per port, '{policy.value}' (* IOMMU host)", fontsize="small")
    right.tick_params(axis="x", labelrotation=35, labelsize="x-small")
    right.legend(fontsize="x-small", loc="upper right")


MODEL = PlacementModel()
