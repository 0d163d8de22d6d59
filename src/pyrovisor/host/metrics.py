"""The host's metrics in Prometheus text format (prometheus-client), built from the same samples as the API and the
live view."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pyrovisor.host.host import Host, HostSample, VmSample

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (name, help, value of a sample or None when unknown): one gauge per VM and column.
VM_GAUGES: tuple[tuple[str, str, Callable[[VmSample], float | None]], ...] = (
    ("configured_bytes", "guest RAM the VM was configured with", lambda s: s.configured),
    ("minimum_bytes", "the VM's floor for admission", lambda s: s.minimum),
    ("shares", "the VM's memory shares", lambda s: s.shares),
    ("allocation_bytes", "memory the policy (or the operator) lets the VM hold: its target", lambda s: s.allocation),
    ("floor_bytes", "the policy's floor: working set plus margin (cut by shares under pressure)", lambda s: s.floor),
    ("balloon_target_bytes", "the balloon size asked of the guest", lambda s: s.balloon_target),
    ("balloon_actual_bytes", "the balloon size the guest reports", lambda s: s.balloon_actual),
    ("resident_bytes", "guest RAM resident on the host (mincore of the VM's mappings)", lambda s: s.resident),
    ("working_set_bytes", "the host's working-set estimate (larger of the fast and slow averages, or the latest "
                          "interval when larger)", lambda s: s.working_set),
    ("working_set_low_bytes", "95 % confidence interval of the latest interval's estimate, low end",
     lambda s: s.working_set_low),
    ("working_set_high_bytes", "95 % confidence interval of the latest interval's estimate, high end",
     lambda s: s.working_set_high),
    ("guest_free_bytes", "free memory the guest reports (balloon statistics)", lambda s: s.guest_free),
    ("guest_available_bytes", "available memory the guest reports (balloon statistics)", lambda s: s.guest_available),
    ("guest_caches_bytes", "page cache the guest reports (balloon statistics)", lambda s: s.guest_caches),
    ("balloon_unresponsive", "1 while the guest ignores its balloon request", lambda s: float(s.unresponsive)),
    ("pinned", "1 when the operator set the VM's target by hand", lambda s: float(s.pinned)),
    ("up", "1 while the VM runs", lambda s: float(s.state == "running")),
    ("wss_faults_per_second", "sampled pages touched per second (the estimator's cost)", lambda s: s.wss_faults_per_s),
    ("start_seconds", "time to build and start the VM", lambda s: s.start_s),
)
HOST_GAUGES: tuple[tuple[str, str, Callable[[HostSample], float]], ...] = (
    ("budget_bytes", "the memory budget for all VMs and the host", lambda h: h.budget),
    ("available_bytes", "the budget less the host's own overhead: memory for guests", lambda h: h.available),
    ("overhead_bytes", "the host's own overhead the policy reserves", lambda h: h.overhead),
    ("committed_bytes", "the running VMs' minima (or fixed amounts), which admission counts", lambda h: h.committed),
    ("allocated_bytes", "the sum of the running VMs' allocations", lambda h: h.allocated),
    ("rss_bytes", "resident memory of the host process (guest pages included)", lambda h: h.rss),
    ("helpers_rss_bytes", "private memory of the working-set fault servers", lambda h: h.helpers_rss),
    ("guest_resident_bytes", "guest RAM resident on the host, all VMs", lambda h: h.guest_resident),
    ("pressure", "1 when the working sets did not fit and floors were cut by shares", lambda h: float(h.pressure)),
    ("running_vms", "VMs running", lambda h: h.running),
    ("policy_rounds", "policy rounds so far", lambda h: h.rounds),
)


class HostCollector(Collector):
    """Collects from the host at scrape time (no state of its own)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        samples = self.host.samples()
        host = self.host.host_sample(samples)
        for name, text, value in HOST_GAUGES:
            yield GaugeMetricFamily(f"pyrovisor_host_{name}", text, value=value(host))
        for name, text, vm_value in VM_GAUGES:
            family = GaugeMetricFamily(f"pyrovisor_vm_{name}", text, labels=["vm"])
            for sample in samples:
                number = vm_value(sample)
                if number is not None:
                    family.add_metric([sample.vm_id], float(number))
            yield family
        ignored = CounterMetricFamily("pyrovisor_vm_balloon_requests_ignored", "balloon requests the guest did not "
                                      "follow within the timeout", labels=["vm"])
        for sample in samples:
            ignored.add_metric([sample.vm_id], sample.ignored)
        yield ignored
        reclaims = CounterMetricFamily("pyrovisor_vm_balloon_guest_reclaims", "times the guest took pages back from "
                                       "its balloon (deflate on OOM)", labels=["vm"])
        for sample in samples:
            reclaims.add_metric([sample.vm_id], sample.reclaims)
        yield reclaims
        info = GaugeMetricFamily("pyrovisor_vm_info", "the VM's guest and state", labels=["vm", "guest", "state"])
        for sample in samples:
            info.add_metric([sample.vm_id, sample.guest, sample.state], 1.0)
        yield info


def render(host: Host) -> str:
    """The exposition text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(host))
    return generate_latest(registry).decode()
