"""WriteMonitor: traps, logs and performs guest writes to watched pages through read-only memslots."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from pyrovisor.arch.x86_64.layout import IOAPIC_GPA, LAPIC_GPA
from pyrovisor.arch.x86_64.paging import walk
from pyrovisor.errors import ConfigError, GuestMemoryError, LoaderError, PyrovisorError
from pyrovisor.introspect.kernel import GuestKernel
from pyrovisor.introspect.profile import Profile, guest_profile
from pyrovisor.introspect.watch import MODES, Watch
from pyrovisor.introspect.write_record import WriteRecorder
from pyrovisor.memory.region import PAGE_SIZE
from pyrovisor.vstate.memslot_split import PageRun, relayout
from pyrovisor.vstate.vcpu import current_vcpu

if TYPE_CHECKING:
    from pyrovisor.introspect.write_monitor_uffd import UffdWriteWatcher
    from pyrovisor.memory import MemoryRegion
    from pyrovisor.vmm import Vmm

_log = logging.getLogger(__name__)

KERNEL_TEXT = "kernel-text"  # the pseudo-symbol for every executable segment of the kernel image
RECENT_RECORDS = 1000
PF_X = 1
IN_KERNEL_MMIO = ((IOAPIC_GPA, IOAPIC_GPA + PAGE_SIZE, "the in-kernel IOAPIC"),
                  (LAPIC_GPA, LAPIC_GPA + PAGE_SIZE, "the local APIC"))


@dataclass
class WatchCounters:
    writes: int = 0  # trapped writes that touched the watched bytes (each one logged)


class _TrapWindow:
    """What the MMIO bus sees over one run of watched pages: writes go to the monitor with their address."""

    def __init__(self, monitor: WriteMonitor, base: int) -> None:
        self._monitor = monitor
        self._base = base

    def read(self, offset: int, size: int) -> int:  # reads run natively; an emulated one still gets RAM
        return int.from_bytes(self._monitor.memory.read(self._base + offset, size), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self._monitor.trap(self._base + offset, size, value)


class WriteMonitor:
    """The write watches of one VM. Every write to a watched page exits (read-only memslot) to the vCPU thread,
    which logs it (when it touches watched bytes) and then performs it, so the guest sees its write done.

    Watches are changed with the vCPUs parked; the trap path reads only immutable tuples.
    """

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        self.memory = vmm.memory
        self.profile = _profile_of(vmm)
        self.kernel = GuestKernel(vmm.memory, self.profile) if self.profile is not None else None
        self.recorder = WriteRecorder(vmm.memory, self.kernel)  # imports capstone now, not on a vCPU thread
        self.watches: tuple[Watch, ...] = ()
        self.counters: dict[int, WatchCounters] = {}
        self.collateral_writes = 0  # trapped writes to a watched page outside every watched range
        self.log_failures = 0  # log files dropped because writing to them failed
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_RECORDS)
        self._windows: dict[int, int] = {}  # bus base -> length
        self._runs: dict[int, list[PageRun]] = {}  # RAM region start -> its read-only runs
        self._sinks: dict[str, IO[str]] = {}
        self._lock = threading.Lock()  # two vCPUs may log at once
        self._next_id = 1
        self._uffd: UffdWriteWatcher | None = None  # the uffd mode's fault server, started by its first watch
        vmm.on_close(self.close)

    # --- watches --------------------------------------------------------------------------------------
    def watch_physical(self, gpa: int, size: int, log: str | None = None, mode: str = "memslot") -> Watch:
        _check_mode(mode)
        self._check_ram(gpa, size)
        return self._arm(Watch(0, "physical", f"{gpa:#x}+{size:#x}", ((gpa, size),), log, mode))

    def watch_symbol(self, name: str, log: str | None = None, mode: str = "memslot") -> Watch:
        _check_mode(mode)
        profile = self._need_profile("symbol", name)
        if name == KERNEL_TEXT:
            ranges = tuple((segment.paddr, segment.memsz) for segment in profile.segments
                           if segment.flags & PF_X and segment.vaddr >= 1 << 63)
        else:
            try:
                symbol = profile.symbol(name)
                ranges = ((profile.image_physical(symbol.address), max(symbol.size, 1)),)
            except LoaderError:
                raise ConfigError("symbol", name, "the guest kernel's profile has no such symbol "
                                                  f"(for example syscall_table, or {KERNEL_TEXT})") from None
        for gpa, size in ranges:
            self._check_ram(gpa, size)
        return self._arm(Watch(0, "symbol", name, ranges, log, mode))

    def watch_virtual(self, pid: int, address: int, size: int, log: str | None = None,
                      mode: str = "memslot") -> Watch:
        """Bytes of a live process's address space, translated now through its page tables."""
        _check_mode(mode)
        self._need_profile("pid", pid)
        if size <= 0:
            raise ConfigError("size", size, "must be at least 1 byte")
        assert self.kernel is not None
        with self._parked():
            live = [process for process in self.kernel.processes() if process.state != "exited"]
        process = next((each for each in live if each.pid == pid), None)
        if process is None:
            names = ", ".join(f"{each.pid} {each.name}" for each in live) or "none"
            raise ConfigError("pid", pid, f"no such process in the guest (live: {names})")
        ranges: list[tuple[int, int]] = []
        position, end = address, address + size
        while position < end:
            try:
                translation = walk(self.memory.read_u64, process.cr3, position)
            except GuestMemoryError:
                raise ConfigError("virtual address", hex(position), f"is not mapped in pid {pid} ({process.name})") \
                    from None
            chunk = min(end - position, translation.page_size - position % translation.page_size)
            ranges.append((translation.physical_address, chunk))
            position += chunk
        for gpa, length in ranges:
            self._check_ram(gpa, length)
        return self._arm(Watch(0, "virtual", f"pid {pid} {address:#x}+{size:#x}", tuple(ranges), log, mode))

    def rearm(self, watches: Iterable[Watch]) -> None:
        """Arm watches saved with a snapshot (same ids, same physical ranges)."""
        for watch in watches:
            for gpa, size in watch.ranges:
                self._check_ram(gpa, size)
            if watch.mode == "uffd":
                from pyrovisor.introspect.write_monitor_uffd import check_protectable

                try:
                    check_protectable(self.memory, watch)
                except ConfigError as exc:  # lazily restored RAM: the watch traps in memslot mode instead
                    _log.warning("write watch %d: %s; it is re-armed in memslot mode", watch.id, exc)
                    watch = replace(watch, mode="memslot")
            if watch.log is not None:
                try:
                    self._sink(watch.log)
                except ConfigError as exc:  # restored elsewhere: the watch still traps, its records stay in memory
                    _log.warning("write watch %d: %s; its records are kept in memory only", watch.id, exc)
                    self.log_failures += 1
                    watch = replace(watch, log=None)
            self._arm(watch, keep_id=True)

    def remove(self, watch_id: int) -> Watch:
        found = next((watch for watch in self.watches if watch.id == watch_id), None)
        if found is None:
            known = ", ".join(str(watch.id) for watch in self.watches) or "none"
            raise ConfigError("watch id", watch_id, f"no such watch (watches: {known})")
        if found.mode == "uffd" and self._uffd is not None:
            self._uffd.unprotect(found, self.watches)
        self._apply(tuple(watch for watch in self.watches if watch.id != watch_id))
        self.counters.pop(watch_id, None)
        return found

    def _arm(self, watch: Watch, keep_id: bool = False) -> Watch:
        if not keep_id:
            watch = replace(watch, id=self._next_id)
        self._next_id = max(self._next_id, watch.id + 1)
        if watch.log is not None:
            self._sink(watch.log)
        self.counters[watch.id] = WatchCounters()
        try:
            if watch.mode == "uffd":
                self._uffd_watcher().protect(watch, self.watches)
            self._apply((*self.watches, watch))
        except BaseException:
            del self.counters[watch.id]
            raise
        return watch

    def _apply(self, watches: tuple[Watch, ...]) -> None:
        """Lay the memslots and bus windows out for `watches`, with the vCPUs parked."""
        pages = sorted(set().union(*(watch.pages() for watch in watches if watch.mode == "memslot")))
        runs = _runs(pages)
        by_region: dict[int, list[PageRun]] = {}
        regions: dict[int, MemoryRegion] = {}
        for start, end in runs:
            region = self.memory.region_of(start)
            regions[region.gpa] = region
            by_region.setdefault(region.gpa, []).append((start, end))
        for region in self.memory.regions:
            if region.gpa in self._runs:
                regions.setdefault(region.gpa, region)
        with self._parked():
            if self.vmm.dirty.active:
                self.vmm.dirty.harvest()  # the dirty bits of the slots about to be deleted
            bus = self.vmm.mmio_bus
            for base in list(self._windows):
                bus.remove(base)
                del self._windows[base]
            for gpa, region in regions.items():
                new_runs = by_region.get(gpa, [])
                if new_runs != self._runs.get(gpa, []):
                    relayout(self.vmm.vm, region, new_runs)
                if new_runs:
                    self._runs[gpa] = new_runs
                else:
                    self._runs.pop(gpa, None)
            for start, end in runs:
                bus.insert(start, end - start, _TrapWindow(self, start), f"write watch {start:#x}")
                self._windows[start] = end - start
            self.watches = watches
            self.recorder.forget_processes()

    def _parked(self) -> Any:
        vmm = self.vmm
        if not vmm.started:
            return contextlib.nullcontext()
        if vmm.state.terminal:
            raise PyrovisorError(f"the VM is {vmm.state.value}: its watches cannot change")
        return vmm.paused("write monitor")

    # --- the trap (a vCPU thread) ---------------------------------------------------------------------
    def trap(self, gpa: int, size: int, value: int) -> None:
        memory = self.memory
        old = int.from_bytes(memory.read(gpa, size), "little")
        if size == 1:
            memory.write_u8(gpa, value)
        elif size == 2:
            memory.write_u16(gpa, value)
        elif size == 4:
            memory.write_u32(gpa, value)
        elif size == 8:
            memory.write_u64(gpa, value)
        else:
            memory.write(gpa, value.to_bytes(size, "little"))
        hits = [watch for watch in self.watches if watch.mode == "memslot" and watch.covers(gpa, size)]
        if not hits:
            self.collateral_writes += 1
            return
        vcpu = current_vcpu()
        for watch in hits:
            try:
                record = self.recorder.record(vcpu, gpa, size, old, value, watch.id)
            except Exception as exc:  # whatever the guest left in its tables: log what is known, keep running
                record = {"time": time.time(), "vcpu": None if vcpu is None else vcpu.index, "address": f"{gpa:#x}",
                          "size": size, "old": f"{old:#x}", "new": f"{value:#x}", "watch": watch.id,
                          "error": f"{type(exc).__name__}: {exc}"}
            self.keep(watch, record)

    def keep(self, watch: Watch, record: dict[str, Any]) -> None:
        """Count a record, keep it with the recent ones and append it to its watch's log (any thread)."""
        with self._lock:
            counters = self.counters.get(watch.id)
            if counters is None:  # removed meanwhile (a uffd record still in flight)
                return
            counters.writes += 1
            self.recent.append(record)
            if watch.log is not None:
                self._append(watch.log, record)

    def log_uffd_failure(self, error: Exception) -> None:
        _log.warning("write monitor: a userfaultfd record was lost: %s: %s", type(error).__name__, error)

    def _uffd_watcher(self) -> UffdWriteWatcher:
        if self._uffd is None:
            from pyrovisor.introspect.write_monitor_uffd import UffdWriteWatcher

            self._uffd = UffdWriteWatcher(self)
        return self._uffd

    def _append(self, path: str, record: dict[str, Any]) -> None:
        """One JSON line to a log file; a log that fails (disk full) is dropped and counted, the guest goes on."""
        sink = self._sinks.get(path)
        if sink is None:
            return
        try:
            sink.write(json.dumps(record) + "\n")
        except (OSError, ValueError):
            self.log_failures += 1
            del self._sinks[path]
            with contextlib.suppress(OSError, ValueError):
                sink.close()

    # --- reports and release --------------------------------------------------------------------------
    def describe(self, watch: Watch) -> dict[str, Any]:
        counters = self.counters.get(watch.id, WatchCounters())
        return {"id": watch.id, "kind": watch.kind, "target": watch.target,
                "ranges": [{"gpa": f"{gpa:#x}", "size": size} for gpa, size in watch.ranges],
                "pages": len(watch.pages()), "log": watch.log, "writes": counters.writes, "mode": watch.mode}

    def close(self) -> None:
        """Join the slots back (the vCPUs have stopped) and close the logs: the VM's memory can then be unmapped."""
        if self._uffd is not None:
            self._uffd.close()  # its server exits: the kernel lifts every protection
            self._uffd = None
        for region in self.memory.regions:
            if self._runs.pop(region.gpa, None):
                relayout(self.vmm.vm, region, [])
        with _MONITORS_LOCK:
            if _MONITORS.get(self.vmm) is self:
                del _MONITORS[self.vmm]
        with self._lock:
            for sink in self._sinks.values():
                sink.close()
            self._sinks.clear()

    # --- checks ---------------------------------------------------------------------------------------
    def _check_ram(self, gpa: int, size: int) -> None:
        if size <= 0:
            raise ConfigError("size", size, "must be at least 1 byte")
        if self.memory.contains(gpa, size):
            return
        devices = [(mapping.base, mapping.end, mapping.name) for mapping in self.vmm.mmio_bus.mappings
                   if not isinstance(mapping.device, _TrapWindow)]
        for base, end, name in (*devices, *IN_KERNEL_MMIO):
            if base < gpa + size and gpa < end:
                raise ConfigError("address", hex(gpa), f"is MMIO ({name} at {base:#x}), not RAM: "
                                                       "only guest RAM can be watched")
        ram = ", ".join(f"[{region.gpa:#x}, {region.end:#x})" for region in self.memory.regions)
        raise ConfigError("address", hex(gpa), f"range +{size:#x} lies outside guest memory (RAM: {ram})")

    def _need_profile(self, field: str, value: object) -> Profile:
        if self.profile is None:
            raise ConfigError(field, value, "this guest has no kernel profile (only the os guest has one): "
                                            "watch guest-physical addresses instead")
        return self.profile

    def _sink(self, path: str) -> IO[str]:
        sink = self._sinks.get(path)
        if sink is None:
            try:
                sink = self._sinks[path] = open(path, "a", buffering=1)  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise ConfigError("log", path, f"cannot be opened for appending: {exc.strerror}") from None
        return sink


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError("mode", mode, "expected memslot or uffd")


def _runs(pages: list[int]) -> list[PageRun]:
    """Sorted page frame numbers as [start, end) byte runs of consecutive pages."""
    runs: list[PageRun] = []
    for page in pages:
        if runs and runs[-1][1] == page * PAGE_SIZE:
            runs[-1] = (runs[-1][0], (page + 1) * PAGE_SIZE)
        else:
            runs.append((page * PAGE_SIZE, (page + 1) * PAGE_SIZE))
    return runs


def _profile_of(vmm: Vmm) -> Profile | None:
    """The kernel profile of a built-in guest that ships one (the os guest), else None."""
    name = Path(vmm.kernel.path).stem
    try:
        return guest_profile(name)
    except (PyrovisorError, OSError):
        return None


_MONITORS: weakref.WeakKeyDictionary[Vmm, WriteMonitor] = weakref.WeakKeyDictionary()
_MONITORS_LOCK = threading.Lock()


def monitor_of(vmm: Vmm) -> WriteMonitor:
    """The VM's write monitor, created on first use."""
    with _MONITORS_LOCK:
        monitor = _MONITORS.get(vmm)
        if monitor is None:
            monitor = _MONITORS[vmm] = WriteMonitor(vmm)
        return monitor


def existing_monitor(vmm: Vmm) -> WriteMonitor | None:
    return _MONITORS.get(vmm)


def saved_watches(vmm: Vmm) -> tuple[Watch, ...]:
    """What a snapshot stores: the VM's armed watches."""
    monitor = existing_monitor(vmm)
    return monitor.watches if monitor is not None else ()


def rearm_watches(vmm: Vmm, watches: tuple[Watch, ...]) -> None:
    """Arm on a restored VM the watches its snapshot saved."""
    if watches:
        monitor_of(vmm).rearm(watches)
