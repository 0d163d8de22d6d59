"""virtio-balloon (virtio 1.2 §5.5): a host target, inflate and deflate, memory statistics, free page reporting."""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import logging
import math
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from pyrovisor.config import MAX_BALLOON_INTERVAL_S
from pyrovisor.devices.virtio.device import ID_BALLOON, VirtioDevice
from pyrovisor.devices.virtio.mmio import TransportState
from pyrovisor.devices.virtio.queue import DescriptorChain, SplitQueue
from pyrovisor.errors import DeviceError
from pyrovisor.events.eventfd import EventFd
from pyrovisor.events.loop import EventLoop
from pyrovisor.memory import GuestMemory, PageSet

log = logging.getLogger(__name__)

BALLOON_NAME = "balloon0"  # the device's name in the device manager (one balloon per VM)

# Feature bits (§5.5.3). MUST_TELL_HOST, FREE_PAGE_HINT and PAGE_POISON are not offered.
F_MUST_TELL_HOST = 0
F_STATS_VQ = 1
F_DEFLATE_ON_OOM = 2
F_FREE_PAGE_HINT = 3
F_PAGE_POISON = 4
F_PAGE_REPORTING = 5

PAGE_SHIFT = 12  # balloon PFNs are in 4 KiB units whatever the guest's page size (§5.5.6)
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_PAGES = 0xFFFFFFFF  # num_pages and actual are le32
QUEUE_SIZE = 256
CONFIG = struct.Struct("<II")  # num_pages, actual (free_page_hint_cmd_id and poison_val need features not offered)
STAT = struct.Struct("<HQ")  # struct virtio_balloon_stat: packed, 10 bytes
MAX_STAT_ENTRIES = 64  # a stats buffer is read up to this many entries (the spec defines 10 tags)
MAX_PFNS_PER_CHAIN = 1 << 20  # PFNs read from one inflate or deflate request (4 GiB of pages); the rest are rejected

# Statistics tags (§5.5.6.3.1) and the BalloonStats field each one fills.
STAT_FIELDS: dict[int, str] = {0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free",
                               5: "total", 6: "available", 7: "caches", 8: "hugetlb_allocations",
                               9: "hugetlb_failures"}


class Role(enum.Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    REPORTING = "reporting"


@dataclass(frozen=True)
class BalloonStats:
    """The guest's last memory statistics (bytes, or counts for faults and hugetlb allocations); a statistic the
    driver does not supply is None. `arrived` is when the buffer reached the device (seconds since the epoch)."""

    swap_in: int | None = None
    swap_out: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    free: int | None = None
    total: int | None = None
    available: int | None = None
    caches: int | None = None
    hugetlb_allocations: int | None = None
    hugetlb_failures: int | None = None
    arrived: float = 0.0


@dataclass
class BalloonCounters:
    inflate_requests: int = 0
    inflated_pages: int = 0  # pages that entered the balloon and were given back to the host
    inflated_bytes: int = 0  # the same in bytes (4 KiB a page)
    inflate_rejected: int = 0  # PFNs outside guest RAM, already in the balloon or repeated in one request
    discard_calls: int = 0  # GuestMemory.discard calls for inflated pages (consecutive PFNs coalesce)
    deflate_requests: int = 0
    deflated_pages: int = 0
    deflate_rejected: int = 0  # PFNs that were not in the balloon
    reports: int = 0  # free page reports (one chain each)
    reported_bytes: int = 0  # whole pages of the reported ranges, given back to the host
    stats_updates: int = 0  # statistics buffers that arrived with at least one entry
    stats_requests: int = 0  # held statistics buffers returned to ask for fresh ones


@dataclass(frozen=True)
class VirtioBalloonState:
    transport: TransportState = field(default_factory=TransportState)
    stats_interval_s: float = 1.0  # 0: statistics only when asked for (request_stats)
    deflate_on_oom: bool = True  # offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    target_pages: int = 0  # num_pages: the host's target
    actual_pages: int = 0  # actual: what the driver last wrote
    config_pending: bool = False  # the target changed and the driver has not been interrupted yet
    counters: BalloonCounters = field(default_factory=BalloonCounters)
    stats: BalloonStats | None = None
    stats_head: int | None = None  # the chain head of the statistics buffer the device holds
    ballooned: bytes = b""  # zlib-compressed bitmap of the pages in the balloon: PFN 8k + i is bit 7 - i of byte k


@dataclass(frozen=True)
class BalloonStatus:
    """What the host sees of the balloon (the API's GET /balloon)."""

    target_pages: int
    actual_pages: int
    ballooned_pages: int  # pages the device counts in the balloon (inflated, not deflated)
    driver_ready: bool  # the driver set DRIVER_OK and has not reset the device
    negotiated: tuple[str, ...]  # the balloon features the driver accepted
    stats_interval_s: float
    stats_held: bool  # the device holds a statistics buffer (a request can go out)
    stats: BalloonStats | None
    counters: BalloonCounters


class VirtioBalloon(VirtioDevice):
    """The traditional memory balloon. The host sets `num_pages` with `set_target`; the driver inflates (gives
    pages, which the host discards) or deflates, and writes `actual`.

    Queues are numbered as Linux's drivers number them: inflate 0, deflate 1, then statsq and reporting_vq only if
    their features were negotiated, each taking the next index (a driver without STATS_VQ reports on queue 2).
    Work from the host side (target changes, statistics requests, the statistics timer) runs on the VM's I/O
    thread, which every pause hold parks, so nothing reaches guest memory or the interrupt line while a VM is saved.
    """

    device_id = ID_BALLOON
    queue_sizes = (QUEUE_SIZE,) * 4

    def __init__(self, memory: GuestMemory, state: VirtioBalloonState | None = None, loop: EventLoop | None = None,
                 name: str = BALLOON_NAME) -> None:
        super().__init__()
        state = state or VirtioBalloonState()
        check_state(state, name)
        self.name = name
        self.memory = memory
        self.loop = loop
        self.stats_interval_s = state.stats_interval_s
        self.deflate_on_oom = state.deflate_on_oom
        self.features = (1 << F_STATS_VQ) | (1 << F_PAGE_REPORTING) | ((1 << F_DEFLATE_ON_OOM) if state.deflate_on_oom
                                                                        else 0)
        self.target_pages = state.target_pages
        self.actual_pages = state.actual_pages
        self.counters = dataclasses.replace(state.counters)
        self.stats = state.stats
        self._config_pending = state.config_pending
        self._stats_head = state.stats_head
        self._stats_wanted = False
        self._frames = memory.end >> PAGE_SHIFT
        self._ballooned = _unpack_bitmap(state.ballooned, self._frames, name)
        self._ram = [(region.gpa >> PAGE_SHIFT, region.end >> PAGE_SHIFT) for region in memory.regions]
        self._roles: list[Role] = []
        self.active = False
        # The transport's lock and kick once attached (`attached`); until then (and in unit tests) the device's own.
        self.lock: AbstractContextManager[Any] = threading.RLock()
        self.kick: Callable[[int], None] = self._process_locked
        self._stats_requested = False
        # Host requests (a new target, a statistics request) wake the I/O thread through an eventfd: it stays
        # readable until served, so a request made while the VM is held (or before it runs) waits for it.
        self._requests: EventFd | None = None
        self._timer: _IntervalTimer | None = None
        if loop is not None:
            self._requests = EventFd()
            try:
                loop.add(self._requests, self._serve_host_requests, f"{name}.host")
                if self.stats_interval_s > 0:
                    self._timer = _IntervalTimer(loop, self.stats_interval_s, self._return_stats_buffer,
                                                 f"{name}.stats-timer")
            except BaseException:
                self.close()
                raise

    def attached(self, lock: AbstractContextManager[Any], kick: Callable[[int], None]) -> None:
        """The transport is wired: share its lock, work on queues through its checks, and deliver a target change
        that a save left pending (once the I/O thread runs, that is after the restored VM is complete)."""
        self.lock = lock
        self.kick = kick
        if self._config_pending and self._requests is not None:
            self._requests.signal()

    # --- configuration space ---------------------------------------------------------------------------------
    def config(self) -> bytes:
        return CONFIG.pack(self.target_pages, self.actual_pages)

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver may write `actual` (bytes 4-7); `num_pages` is the host's and writes to it are ignored."""
        if offset < 0 or offset + len(data) > CONFIG.size:
            return
        raw = bytearray(self.config())
        raw[offset:offset + len(data)] = data
        actual = int.from_bytes(raw[4:8], "little")
        if actual != self.actual_pages:
            log.debug("%s: the driver reports %d pages in the balloon", self.name, actual)
            self.actual_pages = actual

    # --- the driver's side ---------------------------------------------------------------------------------------
    def activate(self, queues: Sequence[SplitQueue], driver_features: int) -> None:
        super().activate(queues, driver_features)
        roles = [Role.INFLATE, Role.DEFLATE]
        if driver_features & (1 << F_STATS_VQ):
            roles.append(Role.STATS)
        if driver_features & (1 << F_PAGE_REPORTING):
            roles.append(Role.REPORTING)
        self._roles = roles[:len(queues)]
        self.active = True
        stats = self._index(Role.STATS)
        if stats is None or self._stats_head is None or self._stats_head >= self.queues[stats].size:
            self._stats_head = None  # a restored head that this queue cannot hold is dropped, never published
        if self._timer is not None and stats is not None:
            self._timer.arm(True)

    def reset(self) -> None:
        """The driver's balloon is gone with its driver: every page is the guest's again."""
        super().reset()
        self.active = False
        self._roles = []
        self._stats_head = None
        self._stats_wanted = self._stats_requested = False
        self._config_pending = False
        self.actual_pages = 0
        self._ballooned = bytearray(self._frames)
        if self._timer is not None:
            self._timer.arm(False)

    def process(self, queue_index: int) -> None:
        role = self._roles[queue_index] if queue_index < len(self._roles) else None
        if role is None:
            return  # a queue the negotiated features do not have
        queue = self.queues[queue_index]
        if role is Role.STATS:
            self._serve_stats(queue)
            return
        done = False
        for chain in queue.available_chains():
            if role is Role.REPORTING:
                self._report(chain)
            else:
                pfns, beyond = self._read_pfns(chain)
                if role is Role.INFLATE:
                    self._inflate(pfns, beyond)
                else:
                    self._deflate(pfns, beyond)
            queue.add_used(chain.head, 0)
            done = True
        if done:
            self.publish(queue)

    def _index(self, role: Role) -> int | None:
        return self._roles.index(role) if role in self._roles else None

    def _read_pfns(self, chain: DescriptorChain) -> tuple[list[int], int]:
        """The u32 PFNs in a request's device-readable buffers (device-writable ones carry nothing here), and how
        many more there were beyond MAX_PFNS_PER_CHAIN (not read: rejected)."""
        pfns: list[int] = []
        budget = MAX_PFNS_PER_CHAIN
        for buffer in chain.readable:
            count = min(buffer.length // 4, budget)
            if count:
                raw = self.memory.read(buffer.address, 4 * count)  # a copy: the guest may rewrite its array
                pfns.extend(struct.unpack(f"<{count}I", raw))
                budget -= count
        beyond = sum(buffer.length // 4 for buffer in chain.readable) - MAX_PFNS_PER_CHAIN + budget
        return pfns, beyond

    def _in_ram(self, pfns: list[int]) -> list[int]:
        """The distinct PFNs that are guest RAM, ascending."""
        unique = set(pfns)
        if len(self._ram) == 1:
            first, end = self._ram[0]
            return sorted(pfn for pfn in unique if first <= pfn < end)
        return sorted(pfn for pfn in unique if any(first <= pfn < end for first, end in self._ram))

    def _inflate(self, pfns: list[int], beyond: int) -> None:
        """Pages enter the balloon: each run of consecutive PFNs goes back to the host in one discard."""
        self.counters.inflate_requests += 1
        ballooned = self._ballooned
        fresh = [pfn for pfn in self._in_ram(pfns) if not ballooned[pfn]]
        self.counters.inflate_rejected += len(pfns) - len(fresh) + beyond
        if not fresh:
            return
        for pfn in fresh:
            ballooned[pfn] = 1
        for first, count in PageSet.of(fresh).runs():
            self.memory.discard(first << PAGE_SHIFT, count << PAGE_SHIFT)
            self.counters.discard_calls += 1
        self.counters.inflated_pages += len(fresh)
        self.counters.inflated_bytes += len(fresh) << PAGE_SHIFT

    def _deflate(self, pfns: list[int], beyond: int) -> None:
        """Pages leave the balloon; they were discarded, so they fault back in (as zeros) when the guest uses them."""
        self.counters.deflate_requests += 1
        ballooned = self._ballooned
        held = [pfn for pfn in self._in_ram(pfns) if ballooned[pfn]]
        for pfn in held:
            ballooned[pfn] = 0
        self.counters.deflated_pages += len(held)
        self.counters.deflate_rejected += len(pfns) - len(held) + beyond

    def _report(self, chain: DescriptorChain) -> None:
        """Free page reporting: every buffer is a free range; its whole pages go back to the host."""
        self.counters.reports += 1
        for buffer in (*chain.readable, *chain.writable):
            first = -(-buffer.address // PAGE_SIZE) * PAGE_SIZE
            end = (buffer.address + buffer.length) // PAGE_SIZE * PAGE_SIZE
            if end > first:
                self.memory.discard(first, end - first)
                self.counters.reported_bytes += end - first

    # --- statistics ---------------------------------------------------------------------------------------------
    def _serve_stats(self, queue: SplitQueue) -> None:
        """Take the driver's statistics buffer (parse it, keep it); give it back when the host wants new ones."""
        published = False
        for chain in queue.available_chains():
            if self._stats_head is not None:  # the driver broke the one-buffer rule: return the older one
                queue.add_used(self._stats_head, 0)
                published = True
            self._stats_head = chain.head
            self._parse_stats(chain)
        if self._stats_wanted and self._stats_head is not None:
            queue.add_used(self._stats_head, 0)
            self._stats_head = None
            self.counters.stats_requests += 1
            published = True
        self._stats_wanted = False
        if published:
            self.publish(queue)

    def _parse_stats(self, chain: DescriptorChain) -> None:
        raw = bytearray()
        limit = MAX_STAT_ENTRIES * STAT.size
        for buffer in chain.readable:
            take = min(buffer.length, limit - len(raw))
            if take <= 0:
                break
            raw += self.memory.read(buffer.address, take)
        entries = len(raw) // STAT.size
        if not entries:
            return
        values: dict[str, int] = {}
        for index in range(entries):
            tag, value = STAT.unpack_from(raw, index * STAT.size)
            name = STAT_FIELDS.get(tag)
            if name is not None:  # unknown tags are ignored (§5.5.6.3.2)
                values[name] = value
        self.stats = BalloonStats(**values, arrived=time.time())
        self.counters.stats_updates += 1

    def request_stats(self) -> bool:
        """Ask the driver for fresh statistics by giving back the buffer it left (on the I/O thread). Returns
        whether the device holds a buffer to give back; the new statistics arrive with the driver's next buffer."""
        with self.lock:
            held = self.active and self._stats_head is not None
            self._stats_requested = self._stats_requested or held
        if held:
            self._wake()
        return held

    def _serve_host_requests(self) -> None:
        if self._requests is not None:
            self._requests.drain()
        with self.lock:
            if self._config_pending and self.active:
                self._config_pending = False
                self.config_changed()
            if self._stats_requested:
                self._stats_requested = False
                self._return_stats_buffer()

    def _return_stats_buffer(self) -> None:
        with self.lock:
            index = self._index(Role.STATS)
            if not self.active or index is None or self._stats_head is None:
                return
            self._stats_wanted = True
            self.kick(index)  # through the transport: nothing happens while the device needs a reset
            self._stats_wanted = False

    # --- the host's side ------------------------------------------------------------------------------------------
    def set_target(self, pages: int) -> None:
        """Ask the guest to hold `pages` 4 KiB pages in its balloon: num_pages changes at once, the driver is
        interrupted (configuration change, new generation) from the I/O thread."""
        ram_pages = self.memory.size >> PAGE_SHIFT
        if isinstance(pages, bool) or not isinstance(pages, int) or not 0 <= pages <= min(ram_pages, MAX_PAGES):
            raise DeviceError(self.name, f"target {pages!r} pages: must be between 0 and {ram_pages} (guest RAM)")
        with self.lock:
            if pages == self.target_pages:
                return
            self.target_pages = pages
            if not self.active:
                return  # the driver reads num_pages when it starts
            self._config_pending = True
        self._wake()

    def status(self) -> BalloonStatus:
        with self.lock:
            negotiated = tuple(name for bit, name in ((F_STATS_VQ, "stats"), (F_DEFLATE_ON_OOM, "deflate-on-oom"),
                                                      (F_PAGE_REPORTING, "reporting"))
                               if self.active and self.driver_features & (1 << bit))
            return BalloonStatus(self.target_pages, self.actual_pages, self._ballooned.count(1),
                                 self.active, negotiated, self.stats_interval_s,
                                 self.active and self._stats_head is not None, self.stats,
                                 dataclasses.replace(self.counters))

    def _wake(self) -> None:
        """Have the I/O thread serve host requests (without one, as in unit tests: serve them at once)."""
        if self._requests is not None:
            self._requests.signal()
        else:
            self._serve_host_requests()

    def _process_locked(self, index: int) -> None:
        with self.lock:
            self.process(index)

    # --- persistence and release ------------------------------------------------------------------------------------
    def save_device(self, transport: TransportState) -> VirtioBalloonState:
        bitmap = zlib.compress(_pack_bitmap(self._ballooned), 1) if 1 in self._ballooned else b""
        return VirtioBalloonState(transport, self.stats_interval_s, self.deflate_on_oom, self.target_pages,
                                  self.actual_pages, self._config_pending, dataclasses.replace(self.counters),
                                  self.stats, self._stats_head, bitmap)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        if self._requests is not None:
            if self.loop is not None:
                self.loop.remove(self._requests)
            self._requests.close()
            self._requests = None


def check_state(state: VirtioBalloonState, name: str) -> None:
    """Refuse saved or configured values the device cannot hold (one DeviceError, nothing created)."""
    interval = state.stats_interval_s
    if not math.isfinite(interval) or not (interval == 0 or 0.01 <= interval <= MAX_BALLOON_INTERVAL_S):
        raise DeviceError(name, f"statistics interval {interval!r} s: 0 (only on request) or 0.01 to "
                                f"{MAX_BALLOON_INTERVAL_S:g} s")
    for label, value in (("target", state.target_pages), ("actual", state.actual_pages)):
        if not 0 <= value <= MAX_PAGES:
            raise DeviceError(name, f"{label} of {value} pages does not fit in 32 bits")
    if state.stats_head is not None and not 0 <= state.stats_head < QUEUE_SIZE:
        raise DeviceError(name, f"held statistics buffer {state.stats_head} is outside a {QUEUE_SIZE}-entry queue")


def find_balloon(devices: Any) -> VirtioBalloon | None:
    """The VM's balloon from its device manager (`vmm.devices`), or None when it has none."""
    if BALLOON_NAME not in devices:
        return None
    device = getattr(devices[BALLOON_NAME], "device", None)
    return device if isinstance(device, VirtioBalloon) else None


# The saved bitmap's bit order is numpy.packbits's (the format of existing snapshots): the first page of each byte is
# its most significant bit, and the last byte is padded with zero bits. Through the binary digits of one int: a
# page's flag byte (0 or 1) is its digit.
_FLAG_TO_DIGIT = bytes.maketrans(b"\x00\x01", b"01")
_DIGIT_TO_FLAG = bytes.maketrans(b"01", b"\x00\x01")


def _pack_bitmap(flags: bytearray) -> bytes:
    """One bit per frame (flags: one byte per frame, 0 or 1), most significant bit first."""
    size = (len(flags) + 7) // 8
    value = int(flags.translate(_FLAG_TO_DIGIT), 2) if flags else 0
    return (value << (8 * size - len(flags))).to_bytes(size, "big")


def _unpack_bitmap(data: bytes, frames: int, name: str) -> bytearray:
    if not data:
        return bytearray(frames)
    expected = (frames + 7) // 8
    inflater = zlib.decompressobj()
    try:
        packed = inflater.decompress(data, expected + 1)  # bounded: a hostile file cannot inflate without limit
    except zlib.error as exc:
        raise DeviceError(name, f"saved balloon bitmap is damaged: {exc}") from None
    if len(packed) != expected or not inflater.eof:
        raise DeviceError(name, f"saved balloon bitmap covers {len(packed) * 8} pages, guest memory has {frames}")
    digits = format(int.from_bytes(packed, "big"), f"0{8 * expected}b")[:frames]
    return bytearray(digits.encode("ascii").translate(_DIGIT_TO_FLAG))


# --- a timer on the I/O thread ---------------------------------------------------------------------------------------
# Python 3.11 has no os.timerfd_*: timerfd_create(2) and timerfd_settime(2) through ctypes. A timerfd is one more
# source for the VM's epoll loop, so the statistics timer needs no thread of its own, runs serialised with queue
# work, and is held with the I/O thread by every pause (expirations during a pause coalesce into one).
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.timerfd_create.restype = ctypes.c_int
_libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
_libc.timerfd_settime.restype = ctypes.c_int


def _timespec(seconds: float) -> _Timespec:
    whole = int(seconds)
    return _Timespec(whole, round((seconds - whole) * 1e9))


class _IntervalTimer:
    """A CLOCK_MONOTONIC timerfd on an EventLoop: `handler` runs on the loop's thread every `interval` seconds
    while armed."""

    def __init__(self, loop: EventLoop, interval: float, handler: Callable[[], None], name: str) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            raise DeviceError(name, f"timerfd_create failed: {os.strerror(ctypes.get_errno())}")
        self.fd = fd
        self.interval = interval
        self.loop = loop
        self.fired = 0
        self._handler = handler
        try:
            loop.add(fd, self._expired, name)
        except BaseException:
            os.close(fd)
            raise

    def arm(self, on: bool) -> None:
        period = _timespec(self.interval if on else 0.0)
        spec = _Itimerspec(period, period)
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) != 0:
            raise OSError(ctypes.get_errno(), f"timerfd_settime: {os.strerror(ctypes.get_errno())}")

    def _expired(self) -> None:
        try:
            os.read(self.fd, 8)  # the number of expirations since the last read: one call serves them all
        except BlockingIOError:
            return
        self.fired += 1
        self._handler()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove(self.fd)
            os.close(self.fd)
            self.fd = -1
