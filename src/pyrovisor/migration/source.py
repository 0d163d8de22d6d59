"""The source side of a live migration: pre-copy rounds, stop-and-copy, hand-over, and safe failure."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyrovisor import __version__
from pyrovisor.arch.x86_64.cpuid import CpuidEntry
from pyrovisor.confine.policy import enter_thread, start_thread
from pyrovisor.errors import LifecycleError, MigrationError, PyrovisorError
from pyrovisor.memory import GuestMemory, PageSet
from pyrovisor.migration.address import Address, connect, parse_address
from pyrovisor.migration.auth import authenticate_source, load_psk
from pyrovisor.migration.pages import MAX_RUNS_PER_MESSAGE, PageSender, SendTally, rewritten_runs
from pyrovisor.migration.policy import Action, ConvergencePolicy, PrecopyPolicy, RoundStats
from pyrovisor.migration.protocol import (
    PAGE_SIZE,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    Connection,
    MessageType,
    Role,
    expect,
    peer_text,
    send_error,
)
from pyrovisor.migration.rate import RateLimiter
from pyrovisor.migration.stats import MigrationResult
from pyrovisor.migration.throttle import Throttler
from pyrovisor.persist.codec import encode
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.dirty import DirtyLog
from pyrovisor.vstate.lifecycle import Operation
from pyrovisor.vstate.run_control import PauseHold
from pyrovisor.vstate.vcpu_state import host_tsc_khz

CONNECT_TIMEOUT_S = 10.0
RESUME_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MigrationOptions:
    policy: ConvergencePolicy = field(default_factory=PrecopyPolicy)
    compression: str | None = None  # "lz4" or "zstd"
    max_bandwidth: float | None = None  # bytes per second, to emulate a slower link
    verify_memory: bool = False  # hash all RAM at pause on both sides (adds to the downtime)
    io_timeout_s: float = 60.0
    psk_file: Path | str | None = None  # pre-shared key: authenticate both ends, MAC every frame (auth.py)


@dataclass
class Progress:
    """Live view of a running migration (read by the API and the progress bar)."""

    phase: str = "connecting"
    round: int = 0
    pages_total: int = 0
    pages_left: int = 0
    pages_sent: int = 0
    bandwidth_bytes_per_s: float = 0.0
    rounds: list[RoundStats] = field(default_factory=list)


def digest_memory(memory: GuestMemory) -> str:
    digest = hashlib.sha256()
    for region in memory.regions:
        digest.update(region.view)
    return digest.hexdigest()


def migrate(vmm: Vmm, destination: str, options: MigrationOptions | None = None,
            progress: Progress | None = None, cancelled: Callable[[], bool] = lambda: False) -> MigrationResult:
    """Move the running `vmm` to `destination` (HOST:PORT or unix:PATH).

    On success the source VM has stopped (outcome MIGRATED) and the guest runs at the destination. On
    any failure the source VM keeps running (resumed if it had been paused) and MigrationError is raised.
    """
    return _Migration(vmm, destination, options or MigrationOptions(), progress or Progress(), cancelled).run()


class _Migration:
    def __init__(self, vmm: Vmm, destination: str, options: MigrationOptions, progress: Progress,
                 cancelled: Callable[[], bool]) -> None:
        self.vmm = vmm
        self.destination = destination
        self.options = options
        self.progress = progress
        self.cancelled = cancelled
        self.throttler = Throttler(vmm)
        self.hold: PauseHold | None = None  # stop-and-copy's hold on the vCPUs
        self.dirty: DirtyLog | None = None

    def run(self) -> MigrationResult:
        """The whole migration as the VM's one operation: no snapshot or second migration meanwhile."""
        address = parse_address(self.destination)
        try:
            psk = load_psk(self.options.psk_file) if self.options.psk_file is not None else None
        except PyrovisorError as exc:
            raise MigrationError("start", str(exc)) from None
        with contextlib.ExitStack() as scope:
            try:
                scope.enter_context(self.vmm.operation(Operation.MIGRATION))
            except LifecycleError as exc:
                raise MigrationError("start", f"{exc.reason} (the VM is {exc.state})") from None
            return self._run(address, psk)

    def _run(self, address: Address, psk: bytes | None) -> MigrationResult:
        started = time.perf_counter()
        cpuid, tsc_khz = self._guest_cpu()
        connection = Connection(connect(address, CONNECT_TIMEOUT_S), Role.SOURCE)
        connection.sock.settimeout(self.options.io_timeout_s)
        try:
            authenticate_source(connection, psk)
            return self._migrate(connection, str(address), started, cpuid, tsc_khz)
        except MigrationError as exc:
            peer_reason = connection.peer_error() if exc.phase == "stream" else None
            self._recover(connection, exc)
            if peer_reason is not None:
                raise MigrationError("transfer", peer_reason) from None
            raise
        except BaseException as exc:
            self._recover(connection, exc)
            raise
        finally:
            connection.close()

    def _recover(self, connection: Connection, error: BaseException) -> None:
        """Leave the source as it was: running, not throttled, no dirty logging left behind."""
        self.throttler.stop()
        self.progress.phase = "failed"
        send_error(connection, "source", error)
        if self.hold is not None:
            self.hold.release()  # only migration's hold: a user's pause stays
            self.hold = None
        if self.dirty is not None:
            self.dirty.close()

    def _guest_cpu(self) -> tuple[tuple[CpuidEntry, ...], int]:
        """The CPUID vCPU 0 presents and its TSC rate, read in a brief pause (a vCPU ioctl waits while the
        vCPU is in KVM_RUN, which can last as long as the guest does not exit)."""
        try:
            with self.vmm.paused("migration handshake"):
                fd = self.vmm.vcpus[0].fd
                return fd.get_cpuid2(), host_tsc_khz(fd)
        except PyrovisorError as exc:  # the VM is not running, or KVM refused
            raise MigrationError("start", str(exc)) from None

    def _migrate(self, connection: Connection, destination: str, started: float,
                 cpuid: tuple[CpuidEntry, ...], tsc_khz: int) -> MigrationResult:
        vmm, options, progress = self.vmm, self.options, self.progress
        connection.send_json(MessageType.HELLO, {
            "protocol": PROTOCOL_NAME, "version": PROTOCOL_VERSION, "pyrovisor": __version__,
            "source": socket.gethostname(), "pid": os.getpid(), "page_size": PAGE_SIZE, "config": encode(vmm.config),
            "ram": [[r.gpa, r.size] for r in vmm.memory.regions],
            "cpuid": [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in cpuid], "tsc_khz": tsc_khz})
        read_welcome(connection)

        sender = PageSender(vmm.memory, connection, RateLimiter(options.max_bandwidth), options.compression)
        self.dirty = dirty = vmm.dirty.subscribe()
        pending = sender.all_pages()
        progress.pages_total = len(pending)
        history: list[RoundStats] = []
        previous_dirty = PageSet()
        bandwidth_estimate = 0.0
        reason = ""
        while True:
            progress.phase, progress.round, progress.pages_left = "pre-copy", len(history), len(pending)
            round_started = time.perf_counter()
            throttle_before = self.throttler.paused_seconds
            tally = SendTally()
            sender.send(pending, tally, self.cancelled)
            dirtied = dirty.collect_pages()
            duration = time.perf_counter() - round_started
            send_round_end(connection, len(history), rewritten_runs(pending, dirtied))
            if tally.data_bytes >= 1 << 20 or bandwidth_estimate == 0.0:
                bandwidth_estimate = tally.data_bytes / tally.send_seconds if tally.send_seconds else bandwidth_estimate
            stats = RoundStats(
                round=len(history), pages_sent=tally.pages, zero_pages=tally.zero_pages,
                bytes_on_wire=connection.bytes_sent - sum(r.bytes_on_wire for r in history),
                duration_s=duration, dirty_pages=len(dirtied),
                dirty_rate_bytes_per_s=len(dirtied) * PAGE_SIZE / duration if duration else 0.0,
                bandwidth_bytes_per_s=bandwidth_estimate or float(options.max_bandwidth or 1e9),
                wws_pages=len(dirtied & previous_dirty),
                throttle=(self.throttler.paused_seconds - throttle_before) / duration if duration else 0.0,
                throttle_target=self.throttler.fraction,
            )
            history.append(stats)
            progress.rounds.append(stats)
            progress.pages_sent += tally.pages
            progress.bandwidth_bytes_per_s = stats.bandwidth_bytes_per_s
            decision = options.policy.decide(history, time.perf_counter() - started)
            pending, previous_dirty = dirtied, dirtied
            if decision.action is Action.CANCEL:
                raise MigrationError("pre-copy", decision.reason or "cancelled by the policy")
            if decision.action is Action.SWITCH_OVER:
                reason = decision.reason
                break
            self.throttler.set(decision.throttle)
            if self.cancelled():
                raise MigrationError("pre-copy", "cancelled")

        return self._stop_and_copy(connection, sender, history, pending, destination, started, reason)

    def _stop_and_copy(self, connection: Connection, sender: PageSender, history: list[RoundStats],
                       pending: PageSet, destination: str, started: float, reason: str) -> MigrationResult:
        vmm, options, progress = self.vmm, self.options, self.progress
        self.throttler.stop()
        progress.phase = "stop-and-copy"
        paused_at_wall = time.time()
        paused_at = time.perf_counter()
        try:
            self.hold = vmm.hold("migration")
        except LifecycleError as exc:
            raise MigrationError("stop-and-copy", str(exc)) from None
        assert self.dirty is not None
        final = pending | self.dirty.collect_pages()
        progress.pages_left = len(final)
        tally = SendTally()
        sender.send(final, tally)
        machine = vmm.save_state()
        digest = digest_memory(vmm.memory) if options.verify_memory else None
        connection.send_json(MessageType.STATE, {"machine": encode(machine), "paused_at": paused_at_wall,
                                                 "memory_sha256": digest})
        resumed_at, digest_destination = read_resumed(connection)
        downtime_source = time.perf_counter() - paused_at
        # Commit: the guest runs at the destination, so this copy stops for good.
        vmm.lifecycle.migrated_away()
        self.hold.release()
        self.hold = None
        progress.phase = "completed"
        # If this confirmation is lost the destination stops its copy too (see destination.py): the one
        # window where the guest is lost rather than duplicated.
        with contextlib.suppress(PyrovisorError):
            connection.send_json(MessageType.STOPPED, {"stopped": True})
        duration = time.perf_counter() - paused_at
        final_round = RoundStats(round=len(history), pages_sent=tally.pages, zero_pages=tally.zero_pages,
                                 bytes_on_wire=connection.bytes_sent - sum(r.bytes_on_wire for r in history),
                                 duration_s=duration, dirty_pages=0, dirty_rate_bytes_per_s=0.0,
                                 bandwidth_bytes_per_s=tally.data_bytes / tally.send_seconds if tally.send_seconds else 0.0,
                                 wws_pages=0, throttle=1.0)
        self.dirty.close()
        rounds = (*history, final_round)
        return MigrationResult(
            destination=destination, rounds=rounds, total_seconds=time.perf_counter() - started,
            downtime_source_s=downtime_source,
            downtime_destination_s=resumed_at - paused_at_wall if resumed_at is not None else 0.0,
            bytes_on_wire=connection.bytes_sent, memory_bytes=vmm.memory.size, switch_reason=reason,
            memory_digest_source=digest, memory_digest_destination=digest_destination,
        )


def send_round_end(connection: Connection, round_number: int, rewritten: list[list[int]]) -> None:
    """End a round, naming the pages of it rewritten after they were read: in DIRTIED messages first when
    there are many runs, so that every message stays small."""
    while len(rewritten) > MAX_RUNS_PER_MESSAGE:
        chunk, rewritten = rewritten[:MAX_RUNS_PER_MESSAGE], rewritten[MAX_RUNS_PER_MESSAGE:]
        connection.send_json(MessageType.DIRTIED, {"round": round_number, "rewritten": chunk})
    connection.send_json(MessageType.ROUND_END, {"round": round_number, "rewritten": rewritten})


def read_welcome(connection: Connection) -> None:
    """The destination's answer to HELLO: returns if it accepted the VM, raises MigrationError otherwise."""
    welcome = expect(connection.receive(), MessageType.WELCOME).json()
    if welcome.get("accepted") is True:
        return
    reason = welcome.get("reason")
    shown = peer_text(reason) if isinstance(reason, str) else "no reason given"
    raise MigrationError("handshake", f"destination refused: {shown}")


def read_resumed(connection: Connection) -> tuple[float | None, str | None]:
    """The destination's RESUMED message: when the guest resumed there (its clock) and its memory digest."""
    resumed = expect(connection.receive(), MessageType.RESUMED).json()
    at: Any = resumed.get("resumed_at")
    digest: Any = resumed.get("memory_sha256")
    if at is not None and (isinstance(at, bool) or not isinstance(at, int | float)):
        raise MigrationError("stop-and-copy", "malformed RESUMED message: 'resumed_at' must be a time")
    if digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise MigrationError("stop-and-copy", "malformed RESUMED message: 'memory_sha256' must be a SHA-256 digest")
    return (float(at) if at is not None else None), digest


class BackgroundMigration:
    """A migration running on its own thread (for the control API)."""

    def __init__(self, vmm: Vmm, destination: str, options: MigrationOptions) -> None:
        self.progress = Progress()
        self.result: MigrationResult | None = None
        self.error: str | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(vmm, destination, options), name="migration",
                                        daemon=True)
        start_thread(self._thread)  # not a child of the API thread that asked: it confines itself as "migration"

    def _run(self, vmm: Vmm, destination: str, options: MigrationOptions) -> None:
        try:
            enter_thread("migration", vmm.stop_for_violation)
            self.result = migrate(vmm, destination, options, self.progress, self._cancel.is_set)
        except PyrovisorError as exc:
            self.error = str(exc)
        except Exception as exc:  # never let a bug kill the VMM: report it like any other failure
            self.error = f"internal error: {exc!r}"
            self.progress.phase = "failed"

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


__all__ = ["BackgroundMigration", "MigrationOptions", "Progress", "digest_memory", "migrate"]
