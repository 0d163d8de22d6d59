"""Exits, throughput, host CPU and delivery delay of 1,000,000 device-register writes in four I/O mechanisms."""

# The OS guest's `exits` program (guests/programs/exits.c) makes N writes from user mode in one of four modes,
# each in a fresh VM (64 MiB, 1 vCPU):
#   trap       8-byte MMIO stores of the guest's TSC to a Python bus device, no memslot: one exit per write;
#   coalesced  the same, with the page registered as coalesced MMIO: KVM buffers the writes in its ring, the vCPU
#              delivers them at its next exit (the write that finds the ring full exits);
#   ioeventfd  the guest stores its TSC and the write's number in a mailbox page of RAM, then a 4-byte doorbell
#              store that KVM turns into an eventfd signal; the device counts on the VM's I/O thread;
#   polled     the mailbox store alone: the page is a memslot of its own in the MMIO hole, read by a VMM thread
#              every millisecond.
# Around the writes the guest writes start and end marks to a trapped sync page; the mark handlers (on the vCPU
# thread) take the vCPU's exit counters, KVM's per-vCPU statistics (binary stats fd) and the process CPU time, so
# the exit figures cover exactly the writes. Delay = when the device saw a write (host TSC) minus when the guest
# made it (its TSC minus the offset between guest and host TSC). The offset is bounded by round trips: the guest
# reads a register that answers with the host's TSC between two reads of its own, 8 times before the writes and
# 8 after; each round bounds it to [t1 - host, t2 - host]. Where the bounds admit 0 (this host: user mode reads
# the host TSC) 0 is used, otherwise the middle of the bounds. Trapped and coalesced writes carry their own TSC,
# so each write's delay is exact; the ioeventfd and polled devices learn (number, TSC) of the newest write at each
# wake-up or poll, and the time of the writes in between is interpolated linearly between such points.
#
# Run: python benchmarks/io_exits.py [--writes N] [--rounds R] [--modes trap,coalesced,ioeventfd,polled]

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import mmap
import os
import statistics
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pyrovisor.builder import build_vm
from pyrovisor.catalog import guests_dir
from pyrovisor.config import MachineConfig
from pyrovisor.errors import PyrovisorError
from pyrovisor.events.eventfd import EventFd
from pyrovisor.kvm import VcpuFd, uapi
from pyrovisor.kvm.ioctl import ioctl_struct
from pyrovisor.memory.region import MemoryRegion
from pyrovisor.vmm import Vmm

MODES = ("trap", "coalesced", "ioeventfd", "polled")
REGISTER_GPA = 0xD0000000  # the device register (trap, coalesced) or doorbell (ioeventfd): no memslot
SYNC_GPA = 0xD0001000  # marks and TSC round trips, always trapped
MAILBOX_GPA = 0xBFFFC000  # 4 pages of RAM just below the virtio window (0xC0000000): ioeventfd and polled
MAILBOX_SIZE = 0x4000
POLL_PERIOD_S = 0.001
SYNC_ROUNDS = 8
GOAL_FACTOR = 1000  # ioeventfd and polled need at least this many times fewer userspace exits than trap
MEMORY = 64 << 20

# The sync page's registers (exits.c).
SYNC_HOST_TSC, SYNC_T1, SYNC_T2, SYNC_START, SYNC_END, SYNC_COUNT = 0x00, 0x08, 0x10, 0x18, 0x20, 0x28
KVM_STATS = ("exits", "io_exits", "mmio_exits")  # per-vCPU: every exit into KVM; those KVM sent to userspace


class HostTsc:
    """The host's TSC from Python: `rdtsc; shl rdx, 32; or rax, rdx; ret` in an executable page (~0.1 µs a call)."""

    CODE = bytes((0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3))

    def __init__(self) -> None:
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._page.write(self.CODE)
        self._anchor = ctypes.c_char.from_buffer(self._page)
        self.read: Callable[[], int] = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(self._anchor))


HOST_TSC = HostTsc()


class KvmStats:
    """Cumulative scalar statistics from a KVM binary stats fd (Documentation/virt/kvm/api.rst, KVM_GET_STATS_FD)."""

    def __init__(self, fd: int, names: tuple[str, ...]) -> None:
        self.fd = fd
        _flags, name_size, count, _id_offset, desc_offset, self._data_offset = struct.unpack(
            "<6I", os.pread(fd, 24, 0))
        size = 16 + name_size  # struct kvm_stats_desc: flags, exponent, size, offset, bucket_size, name
        table = os.pread(fd, size * count, desc_offset)
        self._offsets: dict[str, int] = {}
        for index in range(count):
            entry = table[index * size:(index + 1) * size]
            _desc_flags, _exponent, length, offset, _bucket = struct.unpack_from("<IhHII", entry)
            name = entry[16:].split(b"\0")[0].decode()
            if name in names and length == 1:
                self._offsets[name] = offset
        self._span = (min(self._offsets.values()), max(self._offsets.values()) + 8) if self._offsets else (0, 0)

    def read(self) -> dict[str, int]:
        first, end = self._span
        data = os.pread(self.fd, end - first, self._data_offset + first)
        return {name: struct.unpack_from("<Q", data, offset - first)[0] for name, offset in self._offsets.items()}

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Mark:
    """The machine at a mark (taken on the vCPU thread while it handles the mark's exit)."""

    host_tsc: int
    guest_tsc: int
    cpu_s: float
    user_exits: int
    kvm: dict[str, int]


class SyncDevice:
    """The trapped sync page: TSC round trips and the marks around the writes."""

    def __init__(self, vmm: Vmm, stats: KvmStats | None) -> None:
        self.vmm = vmm
        self.stats = stats
        self.bounds: list[tuple[int, int]] = []  # (t1 - host, t2 - host) per round: the offset lies within
        self.start: Mark | None = None
        self.end: Mark | None = None
        self.guest_count = 0
        self._host = 0
        self._t1 = 0

    def mark(self, guest_tsc: int) -> Mark:
        return Mark(HOST_TSC.read(), guest_tsc, time.process_time(), self.vmm.vcpus[0].counters.total,
                    self.stats.read() if self.stats is not None else {})

    def read(self, offset: int, size: int) -> int:
        if offset == SYNC_HOST_TSC:
            self._host = HOST_TSC.read()
            return self._host
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == SYNC_T1:
            self._t1 = value
        elif offset == SYNC_T2:
            self.bounds.append((self._t1 - self._host, value - self._host))
        elif offset == SYNC_START:
            self.start = self.mark(value)
        elif offset == SYNC_END:
            self.end = self.mark(value)
        elif offset == SYNC_COUNT:
            self.guest_count = value


@dataclass
class Completion:
    host_tsc: int = 0
    cpu_s: float = 0.0


class TscRegister:
    """Trap and coalesced modes: every write carries the guest's TSC; the device notes when it saw it."""

    def __init__(self) -> None:
        self.guest = array("Q")
        self.seen = array("Q")

    @property
    def count(self) -> int:
        return len(self.guest)

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.seen.append(HOST_TSC.read())
        self.guest.append(value)


class MailboxObserver:
    """What the ioeventfd and polled devices know: at each wake-up or poll, when (host TSC), how many writes they
    have accounted for, and the mailbox's newest (number, guest TSC)."""

    def __init__(self, mailbox: memoryview, target: int) -> None:
        self.words = mailbox[:16].cast("Q")
        self.target = target
        self.count = 0
        self.seen = array("Q")
        self.counts = array("Q")
        self.numbers = array("Q")
        self.stamps = array("Q")
        self.done = Completion()

    def observe(self, count: int) -> None:
        number = self.words[0]  # the number first: the TSC read after it belongs to that write or a newer one
        stamp = self.words[1]
        now = HOST_TSC.read()
        self.count = count
        self.seen.append(now)
        self.counts.append(count)
        self.numbers.append(number)
        self.stamps.append(stamp)
        if count >= self.target and not self.done.host_tsc:
            self.done = Completion(now, time.process_time())

    def close(self) -> None:
        self.words.release()


class Doorbell(MailboxObserver):
    """ioeventfd mode: the I/O thread drains the eventfd (its counter is the number of writes since the last read)."""

    def __init__(self, mailbox: memoryview, target: int) -> None:
        super().__init__(mailbox, target)
        self.eventfd = EventFd()

    def ring(self) -> None:
        signals = self.eventfd.drain()
        if signals:
            self.observe(self.count + signals)

    def close(self) -> None:
        super().close()
        self.eventfd.close()


class Poller(MailboxObserver):
    """Polled mode: a VMM thread reads the register page every millisecond."""

    def __init__(self, mailbox: memoryview, target: int) -> None:
        super().__init__(mailbox, target)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="io-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            number = self.words[0]
            if number != self.count:
                self.observe(number)
            deadline += POLL_PERIOD_S
            time.sleep(max(0.0, deadline - time.monotonic()))

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(5)
        if self.words[0] != self.count:  # a last look after the guest stopped
            self.observe(self.words[0])

    def close(self) -> None:
        self.stop()
        super().close()


@dataclass
class ModeResult:
    mode: str
    writes: int
    guest_count: int
    device_count: int
    user_exits: int  # between the marks (vCPU counters), the end mark's own exit excluded
    kvm_exits: dict[str, int]  # the same window from KVM's statistics (empty if unavailable)
    seconds: float  # from the start mark until the device had seen every write
    cpu_s: float  # process CPU time over that span
    delays_us: list[float]  # ascending
    offset: int  # guest TSC - host TSC, cycles
    offset_bounds: tuple[int, int]  # what the round trips allow
    kvm_offset: int | None  # what KVM says
    tsc_khz: int
    guest_cycles: int  # the guest's own time for the writes
    console: str = field(repr=False)

    @property
    def ops_per_s(self) -> float:
        return self.writes / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_op(self) -> float:
        return self.cpu_s / self.writes * 1e6

    @property
    def exits_per_op(self) -> float:
        return self.user_exits / self.writes

    @property
    def kvm_user_exits(self) -> int | None:
        if not self.kvm_exits:
            return None
        return self.kvm_exits["io_exits"] + self.kvm_exits["mmio_exits"]

    def delay_percentile(self, percent: float) -> float:
        return percentile(self.delays_us, percent) if self.delays_us else float("nan")


def percentile(ordered: list[float], percent: float) -> float:
    """The percentile of ascending values, interpolated linearly between the two nearest ranks (numpy's default)."""
    position = (len(ordered) - 1) * percent / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def kvm_tsc_offset(vcpu: VcpuFd) -> int | None:
    """KVM's TSC offset for the vCPU (KVM_VCPU_TSC_OFFSET, Linux 5.16+), None where KVM does not tell.

    Test-only wiring: VcpuFd has no method for KVM_GET_DEVICE_ATTR, so this uses the kvm package's ioctl helper.
    """
    value = ctypes.c_int64()
    attribute = uapi.kvm_device_attr(group=uapi.KVM_VCPU_TSC_CTRL, attr=uapi.KVM_VCPU_TSC_OFFSET,
                                     addr=ctypes.addressof(value))
    try:
        ioctl_struct(vcpu.fd, uapi.KVM_GET_DEVICE_ATTR, attribute, "KVM_GET_DEVICE_ATTR")
    except PyrovisorError:
        return None
    return value.value


def tsc_offset(bounds: list[tuple[int, int]], kvm_offset: int | None) -> tuple[int, tuple[int, int]]:
    """Guest TSC minus host TSC: KVM's offset, else 0, where every round trip admits it; else the middle of the
    bounds (of the tightest round trip if the bounds disagree)."""
    low = max(bound[0] for bound in bounds)
    high = min(bound[1] for bound in bounds)
    for candidate in (kvm_offset, 0):
        if candidate is not None and low <= candidate <= high:
            return candidate, (low, high)
    if low <= high:
        return (low + high) // 2, (low, high)
    tightest = min(bounds, key=lambda bound: bound[1] - bound[0])  # the bounds disagree: the TSCs drift apart
    return (tightest[0] + tightest[1]) // 2, (low, high)


def exact_delays(register: TscRegister, offset: int) -> list[float]:
    """Per write, in cycles: when the device saw it minus when the guest made it (its TSC - the offset)."""
    return [float(seen - (made - offset)) for seen, made in zip(register.seen, register.guest, strict=True)]


def interpolated_delays(observer: MailboxObserver, start: Mark, end: Mark, writes: int, offset: int) -> list[float]:
    """Per write k: the first observation that accounted for it, minus its time interpolated between known
    (number, TSC) points: the start mark (0), each observation's mailbox, the end mark (all writes)."""
    points = sorted(zip([0, *observer.numbers, writes], [start.guest_tsc, *observer.stamps, end.guest_tsc],
                        strict=True), key=lambda point: point[0])  # stable: equal numbers keep their order
    numbers = [float(number) for number, _ in points]
    stamps: list[float] = []
    for _, stamp in points:  # a later number never has an earlier time
        stamps.append(max(float(stamp), stamps[-1]) if stamps else float(stamp))
    counts, seen = observer.counts.tolist(), observer.seen.tolist()
    delays = []
    observation = bisect.bisect_left(counts, 1)  # the first that accounted for write k, k = 1, 2, ...
    segment = 0  # numbers[segment] <= k < numbers[segment + 1], as far as there is one
    last = len(numbers) - 1
    for k in range(1, writes + 1):
        while observation < len(counts) and counts[observation] < k:
            observation += 1
        if observation == len(counts):
            break  # no observation accounted for this write or any later one
        while segment < last and numbers[segment + 1] <= k:
            segment += 1
        if segment == last or numbers[segment] == k:
            made = stamps[segment]
        else:  # np.interp's formula, for the same figures
            slope = (stamps[segment + 1] - stamps[segment]) / (numbers[segment + 1] - numbers[segment])
            made = slope * (k - numbers[segment]) + stamps[segment]
        delays.append(seen[observation] - (made - offset))
    return delays


def os_config(command: str) -> MachineConfig:
    directory = guests_dir()
    return MachineConfig(kernel=directory / "os.elf", initrd=directory / "os-programs.img", memory_size=MEMORY,
                         vcpus=1, cmdline=command)


@contextlib.contextmanager
def mailbox_memslot(vmm: Vmm) -> Iterator[MemoryRegion]:
    """A memslot of RAM in the MMIO hole that the guest kernel does not know as RAM (so SYS_MAPIO maps it)."""
    region = MemoryRegion.anonymous(MAILBOX_GPA, MAILBOX_SIZE, huge_pages=False)
    try:
        memslot = vmm.vm.add_memslot(region)
        try:
            yield region
        finally:
            vmm.vm.remove_memslot(memslot.slot)
    finally:
        region.close()


def guest_command(mode: str, writes: int) -> str:
    common = f"count={writes} sync={SYNC_GPA:#x} rounds={SYNC_ROUNDS}"
    if mode in ("trap", "coalesced"):
        return f"exits mode=mmio value=tsc size=8 addr={REGISTER_GPA:#x} {common}"
    if mode == "ioeventfd":
        return f"exits mode=doorbell size=4 addr={REGISTER_GPA:#x} mailbox={MAILBOX_GPA:#x} {common}"
    return f"exits mode=ram mailbox={MAILBOX_GPA:#x} {common}"


def run_mode(mode: str, writes: int, timeout: float = 900) -> ModeResult:
    """Boot the OS guest, let `exits` make `writes` writes in `mode`, and measure them."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
    output = bytearray()
    with build_vm(os_config(guest_command(mode, writes)), output.extend) as vmm, contextlib.ExitStack() as stack:
        vcpu = vmm.vcpus[0]
        try:
            stats: KvmStats | None = KvmStats(vcpu.fd.get_stats_fd(), KVM_STATS)
        except OSError:
            stats = None
        if stats is not None:
            stack.callback(stats.close)
        sync = SyncDevice(vmm, stats)
        vmm.mmio_bus.insert(SYNC_GPA, 4096, sync, "io-sync")
        register: TscRegister | None = None
        observer: MailboxObserver | None = None
        if mode in ("trap", "coalesced"):
            register = TscRegister()
            vmm.mmio_bus.insert(REGISTER_GPA, 4096, register, "io-register")
            if mode == "coalesced":
                vmm.register_coalesced(REGISTER_GPA, 4096)
        else:
            region = stack.enter_context(mailbox_memslot(vmm))
            if mode == "ioeventfd":
                doorbell = observer = Doorbell(region.view, writes)
                stack.callback(doorbell.close)
                vmm.vm.fd.ioeventfd(doorbell.eventfd.fd, REGISTER_GPA, 4)
                stack.callback(vmm.vm.fd.ioeventfd, doorbell.eventfd.fd, REGISTER_GPA, 4, deassign=True)
                vmm.loop.add(doorbell.eventfd, doorbell.ring, "io-doorbell")
                stack.callback(vmm.loop.remove, doorbell.eventfd)
            else:
                poller = observer = Poller(region.view, writes)
                stack.callback(poller.close)
                poller.start()
        tsc_khz = vcpu.fd.get_tsc_khz()
        kvm_offset = kvm_tsc_offset(vcpu.fd)
        outcome = vmm.run(timeout=timeout)
        if isinstance(observer, Poller):
            observer.stop()
        console = output.decode(errors="replace")
        if outcome.exit_code != 0 or sync.start is None or sync.end is None:
            raise RuntimeError(f"{mode}: the guest did not finish ({outcome.describe()}):\n{console[-3000:]}")
        start, end = sync.start, sync.end
        offset, bounds = tsc_offset(sync.bounds, kvm_offset)
        if register is not None:
            device_count, done = register.count, Completion(end.host_tsc, end.cpu_s)
            delays = exact_delays(register, offset)
        else:
            assert observer is not None
            device_count, done = observer.count, observer.done
            delays = interpolated_delays(observer, start, end, writes, offset)
        if not done.host_tsc:  # the device never saw them all: its count tells
            done = Completion(end.host_tsc, end.cpu_s)
        kvm = {name: end.kvm[name] - start.kvm[name] for name in start.kvm}
        if set(kvm) == set(KVM_STATS):  # the end mark's own exit is not one of the writes'
            kvm["exits"] -= 1
            kvm["mmio_exits"] -= 1
        else:
            kvm = {}
        return ModeResult(
            mode=mode, writes=writes, guest_count=sync.guest_count, device_count=device_count,
            user_exits=end.user_exits - start.user_exits - 1, kvm_exits=kvm,
            seconds=(done.host_tsc - start.host_tsc) / (tsc_khz * 1e3), cpu_s=done.cpu_s - start.cpu_s,
            delays_us=sorted(delay / tsc_khz * 1e3 for delay in delays), offset=offset, offset_bounds=bounds, kvm_offset=kvm_offset,
            tsc_khz=tsc_khz,
            guest_cycles=end.guest_tsc - start.guest_tsc, console=console)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _steal_ticks() -> int:
    """CPU time the hypervisor gave to others while this VM wanted it (`steal` of /proc/stat, in clock ticks)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) if len(fields) > 8 else 0


_last_steal = (time.monotonic(), _steal_ticks())


def load_average() -> str:
    """The load averages, and the share of CPU time stolen by the hypervisor since the previous call (on a
    shared cloud host, the figures move with it)."""
    global _last_steal
    now, ticks = time.monotonic(), _steal_ticks()
    then, before = _last_steal
    _last_steal = (now, ticks)
    share = (ticks - before) / os.sysconf("SC_CLK_TCK") / max(now - then, 1e-6) / (os.cpu_count() or 1)
    return " ".join(f"{value:.2f}" for value in os.getloadavg()) + f" (steal {share:.0%})"


def median(results: list[ModeResult], value: Callable[[ModeResult], float]) -> float:
    return statistics.median(value(result) for result in results)


def spread(results: list[ModeResult], value: Callable[[ModeResult], float], form: str) -> str:
    values = sorted(value(result) for result in results)
    middle = format(statistics.median(values), form)
    return middle if len(values) == 1 else f"{middle} ({format(values[0], form)}-{format(values[-1], form)})"


def report(runs: dict[str, list[ModeResult]], loads: list[str], writes: int) -> None:
    console = Console(width=220)
    rounds = max(len(results) for results in runs.values())
    table = Table(title=f"{writes:,} register writes per mode: medians of {rounds} round(s) (range)")
    for column in ("mode", "userspace exits", "KVM exits (to userspace)", "exits/op", "ops/s", "host CPU µs/op",
                   "delay median µs", "delay p99 µs", "device saw"):
        table.add_column(column, justify="right")
    for mode, results in runs.items():
        kvm = "n/a"
        if results[0].kvm_exits:
            kvm = (f"{median(results, lambda r: r.kvm_exits['exits']):,.0f} "
                   f"({median(results, lambda r: r.kvm_user_exits or 0):,.0f})")
        table.add_row(mode, f"{median(results, lambda r: r.user_exits):,.0f}", kvm,
                      f"{median(results, lambda r: r.exits_per_op):.4g}",
                      spread(results, lambda r: r.ops_per_s, ",.0f"), spread(results, lambda r: r.cpu_us_per_op, ".3g"),
                      spread(results, lambda r: r.delay_percentile(50), ".3g"),
                      spread(results, lambda r: r.delay_percentile(99), ".3g"),
                      "all" if all(r.device_count == r.guest_count == r.writes for r in results)
                      else ", ".join(f"{r.device_count}/{r.guest_count}" for r in results))
    console.print(table)
    console.print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; load average (1, 5, 15 min) before each round: "
                  + "; ".join(loads) + f"; after: {load_average()}")
    everything = [result for results in runs.values() for result in results]
    khz = everything[0].tsc_khz
    low = max(result.offset_bounds[0] for result in everything) / khz * 1e3
    high = min(result.offset_bounds[1] for result in everything) / khz * 1e3
    widest = max(result.offset_bounds[1] - result.offset_bounds[0] for result in everything) / khz * 1e3
    console.print(f"TSC {khz} kHz. Guest TSC - host TSC: KVM_VCPU_TSC_OFFSET says "
                  f"{sorted({str(result.kvm_offset) for result in everything})}; the {2 * SYNC_ROUNDS} round trips of "
                  f"each run bound it to an interval at most {widest:.1f} µs wide, all runs together to "
                  f"{low:+.1f}..{high:+.1f} µs; offsets used (cycles): {sorted({r.offset for r in everything})}")
    if "trap" in runs:
        trap = median(runs["trap"], lambda r: r.user_exits)
        for mode in ("ioeventfd", "polled"):
            if mode in runs:
                exits = median(runs[mode], lambda r: r.user_exits)
                met = exits * GOAL_FACTOR <= trap
                ratio = f"{trap / exits:,.0f}x fewer" if exits else "none at all"
                console.print(f"goal {mode}: ≥ {GOAL_FACTOR}x fewer userspace exits than trap for the same writes: "
                              f"{exits:,.0f} against {trap:,.0f} ({ratio}) → {'met' if met else 'not met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=1_000_000, help="writes per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every mode; medians are reported")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    runs: dict[str, list[ModeResult]] = {mode: [] for mode in modes}
    loads = []
    for round_index in range(args.rounds):
        loads.append(load_average())
        for mode in modes:
            result = run_mode(mode, args.writes)
            runs[mode].append(result)
            print(f"round {round_index + 1} {mode}: {result.user_exits} exits, {result.ops_per_s:,.0f} ops/s, "
                  f"delay median {result.delay_percentile(50):.3g} µs, device {result.device_count}/"
                  f"{result.guest_count}, load {load_average()}", flush=True)
    report(runs, loads, args.writes)


if __name__ == "__main__":
    main()
