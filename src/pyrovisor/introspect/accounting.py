"""Per-process exit accounting: each exit charged to the guest process whose CR3 was loaded, named via the profile."""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrovisor.errors import LoaderError, PyrovisorError, StateError
from pyrovisor.introspect.kernel import GuestKernel, page_table_root
from pyrovisor.introspect.profile import Profile, guest_profile

if TYPE_CHECKING:
    from pyrovisor.memory.guest_memory import GuestMemory
    from pyrovisor.vmm import Vmm

KINDS = ("pio", "mmio", "hlt", "interrupted", "other")
TallyKey = tuple[str, int]  # (kind, port / MMIO address / exit reason / 0)


@dataclass(frozen=True)
class Owner:
    """Who an exit is charged to: a process (pid and name), the kernel (pid 0) or an unnamed CR3 (pid None)."""

    pid: int | None
    name: str
    cr3: int


class ProcessTally:
    """One owner's exits on one vCPU, by (kind, where): [count, VMM thread CPU ns]. Written by that vCPU only."""

    __slots__ = ("exits", "owner")

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.exits: dict[TallyKey, list[int]] = {}


class VcpuAccount:
    """The tallies of one vCPU. Its thread calls `tally_for` when the CR3 or the kernel's pid counter changed."""

    def __init__(self, accountant: Accountant, index: int) -> None:
        self.accountant = accountant
        self.index = index
        self.tallies: list[ProcessTally] = []
        self._by_owner: dict[Owner, ProcessTally] = {}
        self._owners: dict[int, Owner] = {}  # CR3 -> owner, valid while the kernel's pid counter stays the same
        self._generation = -1
        self.resolutions = 0  # how often the process table was read for this vCPU

    def tally_for(self, cr3: int, generation: int = 0) -> dict[TallyKey, list[int]]:
        """The exit table of whoever owns `cr3` now; called when the CR3 or the kernel's pid counter changed.

        A CR3 can only change owner when a process exits and a new one reuses its page tables; a new process
        moves the pid counter (`generation`), which empties the cache."""
        if generation != self._generation:
            self._owners.clear()
            self._generation = generation
        owner = self._owners.get(cr3)
        if owner is None:
            self.resolutions += 1
            owner = self.accountant.resolve(cr3)
            if owner.pid is not None or self.accountant.kernel is None:  # a failed lookup is tried again next time
                self._owners[cr3] = owner
        tally = self._by_owner.get(owner)
        if tally is None:
            tally = self._by_owner[owner] = ProcessTally(owner)
            self.tallies.append(tally)
        return tally.exits


class DeviceCharge:
    """The queue work of one virtio device, charged to the process the guest kernel lent the device to.

    The OS guest lends a virtio device to one process at a time (`virtio_devices[i].owner_pid`, exclusive: the
    kernel refuses a second opener), and the driver runs in that process, so every request on its queues was
    issued by it. `device.process(queue)` (from a doorbell on the I/O thread, a trapped QueueNotify on a vCPU
    thread, or a backend becoming ready) is timed in thread CPU time and charged to the owner read at that moment.
    """

    def __init__(self, accountant: Accountant, name: str, base: int) -> None:
        self.accountant = accountant
        self.name = name
        self.base = base
        self.by_owner: dict[int, list[int]] = {}  # owner pid (0: the kernel's, -1: not found) -> [calls, ns]
        self._owner_gpa: int | None = None

    def run(self, process: Callable[[int], None], index: int) -> None:
        """The transport's `queue_work`: run the device's work on queue `index`, timed and charged while enabled."""
        if not self.accountant.enabled:
            process(index)
            return
        started = time.thread_time_ns()
        try:
            process(index)
        finally:
            tally = self.by_owner.setdefault(self.owner_pid(), [0, 0])
            tally[0] += 1
            tally[1] += time.thread_time_ns() - started

    def owner_pid(self) -> int:
        """The pid the guest kernel lent this device to now: 0 when the kernel holds it, -1 when unknown."""
        kernel = self.accountant.kernel
        if kernel is None:
            return -1
        try:
            if self._owner_gpa is None:
                self._owner_gpa = self._find_entry(kernel)
                if self._owner_gpa is None:
                    return -1
            return self.accountant.memory.read_u32(self._owner_gpa)
        except PyrovisorError:
            return -1

    def _find_entry(self, kernel: GuestKernel) -> int | None:
        """The guest-physical address of `owner_pid` in the kernel's entry for this device (matched by base)."""
        profile = kernel.profile
        layout = profile.struct("virtio_device")
        table = profile.image_physical(profile.symbol("virtio_devices").address)
        count = self.accountant.memory.read_u32(profile.image_physical(profile.symbol("nr_virtio_devices").address))
        base_offset = layout.field("base").offset
        for index in range(min(count, profile.constant("MAX_VIRTIO"))):
            entry = table + index * layout.size
            if self.accountant.memory.read_u64(entry + base_offset) == self.base:
                return entry + layout.field("owner_pid").offset
        return None


class Accountant:
    """Accounting for one VM: per-vCPU tallies, and the CR3 → process resolution through the kernel profile.

    Without a kernel (no profile matches the guest) exits are still charged by CR3, unnamed; the control API
    refuses such a VM, benchmarks of the bare mechanism may use it.
    """

    def __init__(self, memory: GuestMemory, vcpu_count: int, kernel: GuestKernel | None,
                 generation_gpa: int | None) -> None:
        self.memory = memory
        self.kernel = kernel
        self.generation_gpa = generation_gpa  # the kernel's next_pid: when it changes, CR3s may have new owners
        self.accounts = [VcpuAccount(self, index) for index in range(vcpu_count)]
        self.devices: list[DeviceCharge] = []
        self.enabled = False
        self.enabled_at: float | None = None
        self.enabled_seconds = 0.0  # summed over earlier enabled periods

    @classmethod
    def for_guest(cls, memory: GuestMemory, vcpu_count: int, profile: Profile | None) -> Accountant:
        if profile is None:
            return cls(memory, vcpu_count, None, None)
        kernel = GuestKernel(memory, profile)
        next_pid_gpa, size = kernel.next_pid_location()
        assert size == 4, "the run loop reads next_pid as one u32"
        return cls(memory, vcpu_count, kernel, next_pid_gpa)

    def memory_view(self, gpa: int, size: int) -> memoryview:
        """A window on guest memory for a run loop to read a kernel word per exit (release it when done)."""
        return self.memory.view(gpa, size)

    def resolve(self, cr3: int) -> Owner:
        """The owner of a CR3 value at this moment. Never raises: the guest's state is not trusted."""
        root = page_table_root(cr3)
        kernel = self.kernel
        if kernel is None:
            return Owner(None, f"cr3 {root:#x}", root)
        if root == kernel.root:
            return Owner(0, "kernel", root)
        try:  # only reads guest memory: several vCPU threads may do it at once
            processes = kernel.processes()
        except (PyrovisorError, ValueError, KeyError, AssertionError):  # a table caught mid-update, or garbage
            return Owner(None, "unresolved", root)
        matching = [process for process in processes if page_table_root(process.cr3) == root]
        live = [process for process in matching if process.state != "exited"]
        chosen = (live or matching)[-1:] if matching else []
        if not chosen:
            return Owner(None, "unknown", root)
        return Owner(chosen[0].pid, chosen[0].name, root)

    # --- switching -------------------------------------------------------------------------------------
    def mark_enabled(self, enabled: bool) -> None:
        now = time.monotonic()
        if enabled and not self.enabled:
            self.enabled_at = now
        elif not enabled and self.enabled and self.enabled_at is not None:
            self.enabled_seconds += now - self.enabled_at
            self.enabled_at = None
        self.enabled = enabled

    def accounted_seconds(self) -> float:
        running = time.monotonic() - self.enabled_at if self.enabled and self.enabled_at is not None else 0.0
        return self.enabled_seconds + running

    # --- reading (any thread) --------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """Totals per owner, summed over vCPUs; counts may trail a running vCPU by the exit in progress."""
        merged: dict[Owner, dict[str, Any]] = {}
        for account in self.accounts:
            for tally in list(account.tallies):
                row = merged.get(tally.owner)
                if row is None:
                    owner = tally.owner
                    row = merged[owner] = {"pid": owner.pid, "name": owner.name, "cr3": owner.cr3, "vcpus": [],
                                           "exits": dict.fromkeys(KINDS, 0), "total": 0, "vmm_cpu_ns": 0,
                                           "targets": {}}
                row["vcpus"].append(account.index)
                for (kind, where), (count, nanoseconds) in tally.exits.copy().items():
                    row["exits"][kind] += count
                    row["total"] += count
                    row["vmm_cpu_ns"] += nanoseconds
                    target = row["targets"].setdefault((kind, where), [0, 0])
                    target[0] += count
                    target[1] += nanoseconds
        processes = []
        for row in merged.values():
            targets = row.pop("targets")
            row["targets"] = [{"kind": kind, "where": where, "count": count, "vmm_cpu_ns": nanoseconds}
                              for (kind, where), (count, nanoseconds) in sorted(targets.items())]
            processes.append(row)
        processes.sort(key=lambda row: (-row["vmm_cpu_ns"], row["pid"] if row["pid"] is not None else -1))
        return {
            "enabled": self.enabled,
            "accounted_seconds": round(self.accounted_seconds(), 6),
            "resolutions": sum(account.resolutions for account in self.accounts),
            "processes": processes,
            "devices": self._device_report(),
        }

    def _device_report(self) -> list[dict[str, Any]]:
        names: dict[int, str] = {0: "kernel"}
        if self.kernel is not None and any(device.by_owner for device in self.devices):
            with contextlib.suppress(PyrovisorError, ValueError, KeyError, AssertionError):  # names are a courtesy
                names.update((process.pid, process.name) for process in self.kernel.processes())
        rows = []
        for device in self.devices:
            for pid, (calls, nanoseconds) in sorted(device.by_owner.copy().items()):
                rows.append({"device": device.name, "base": device.base, "pid": None if pid < 0 else pid,
                             "name": names.get(pid, "unknown"), "queue_runs": calls, "vmm_cpu_ns": nanoseconds})
        return rows

    def charge_devices(self, devices: Any) -> None:
        """Time each virtio device's queue work from now on (`vmm.devices`; see DeviceCharge)."""
        from pyrovisor.devices.virtio.mmio import VirtioMmio

        for attached in devices:
            transport = getattr(attached, "device", None)
            if not isinstance(transport, VirtioMmio):
                continue
            charge = DeviceCharge(self, transport.name, transport.wiring.base)
            transport.queue_work = charge.run
            self.devices.append(charge)


_ACCOUNTANTS: weakref.WeakKeyDictionary[Vmm, Accountant] = weakref.WeakKeyDictionary()


def accountant_of(vmm: Vmm) -> Accountant | None:
    return _ACCOUNTANTS.get(vmm)


def profile_for(vmm: Vmm) -> Profile:
    """The kernel profile of the guest `vmm` runs; raises StateError with one clear line when there is none."""
    kernel_path = Path(str(vmm.kernel.path))
    try:
        profile = guest_profile("os")
    except LoaderError as exc:
        raise StateError("accounting", f"no kernel profile is installed ({exc})") from None
    if not kernel_path.is_file() or not profile.matches(kernel_path):
        raise StateError("accounting", f"needs a guest whose kernel has a profile (the os guest); this VM runs "
                                       f"{kernel_path.name}, which has none")
    return profile


def set_accounting(vmm: Vmm, enabled: bool, profile: Profile | None = None, require_profile: bool = True) -> Accountant:
    """Turn accounting on or off for `vmm` (before it starts, or while it runs: the vCPUs park for the switch).

    The first call builds the accountant (the profile is checked then: StateError if the guest has none and
    `require_profile`); turning it off keeps the counts, turning it on again adds to them."""
    accountant = _ACCOUNTANTS.get(vmm)
    if accountant is None:
        if profile is None and require_profile:
            profile = profile_for(vmm)
        accountant = Accountant.for_guest(vmm.memory, len(vmm.vcpus), profile)
        accountant.charge_devices(vmm.devices)
        _ACCOUNTANTS[vmm] = accountant
    if enabled == accountant.enabled:
        return accountant
    if vmm.state.terminal:
        raise StateError("accounting", f"the VM is {vmm.state.value}")

    def switch() -> None:
        for vcpu, account in zip(vmm.vcpus, accountant.accounts, strict=True):
            vcpu.account = account if enabled else None
        accountant.mark_enabled(enabled)

    if vmm.started:
        with vmm.paused("accounting"):  # each run loop sees the new mode when it leaves its park
            switch()
    else:
        switch()
    return accountant
