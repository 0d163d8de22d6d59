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

import numpy as np

from pyrovisor import __version__
from pyrovisor.errors import MigrationError, PyrovisorError
from pyrovisor.memory import GuestMemory
from pyrovisor.migration.address import connect, parse_address
from pyrovisor.migration.pages import PageSender, SendTally, excused_frames
from pyrovisor.migration.policy import Action, ConvergencePolicy, PrecopyPolicy, RoundStats
from pyrovisor.migration.protocol import PAGE_SIZE, PROTOCOL_VERSION, Connection, MessageType, expect
from pyrovisor.migration.rate import RateLimiter
from pyrovisor.migration.stats import MigrationResult
from pyrovisor.migration.throttle import Throttler
from pyrovisor.snapshot.capture import capture_machine
from pyrovisor.snapshot.codec import encode
from pyrovisor.vmm import Vmm
from pyrovisor.vstate.dirty import DirtyLog
from pyrovisor.vstate.run_control import RunOutcome, StopReason

CONNECT_TIMEOUT_S = 10.0
RESUME_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MigrationOptions:
    policy: ConvergencePolicy = field(default_factory=PrecopyPolicy)
    compression: str | None = None  # "lz4" or "zstd"
    max_bandwidth: float | None = None  # bytes per second, to emulate a slower link
    verify_memory: bool = False  # hash all RAM at pause on both sides (adds to the downtime)
    io_timeout_s: float = 60.0


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
        self.paused_by_us = False
        self.dirty: DirtyLog | None = None

    def run(self) -> MigrationResult:
        vmm = self.vmm
        if vmm.outcome is not None or not vmm.started:
            raise MigrationError("start", "only a running VM can be migrated")
        if vmm.paused:
            raise MigrationError("start", "the VM is paused; resume it before migrating")
        address = parse_address(self.destination)
        started = time.perf_counter()
        connection = Connection(connect(address, CONNECT_TIMEOUT_S))
        connection.sock.settimeout(self.options.io_timeout_s)
        try:
            return self._migrate(connection, str(address), started)
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
        reason = str(error) if isinstance(error, PyrovisorError) else repr(error)
        with contextlib.suppress(PyrovisorError):
            connection.send_json(MessageType.ERROR, {"reason": f"source: {reason}"})
        if self.paused_by_us and self.vmm.outcome is None:
            self.vmm.resume()
            self.paused_by_us = False
        if self.dirty is not None:
            self.dirty.close()

    def _migrate(self, connection: Connection, destination: str, started: float) -> MigrationResult:
        vmm, options, progress = self.vmm, self.options, self.progress
        machine_shape = {"config": encode(vmm.config),
                         "ram": [[r.gpa, r.size] for r in vmm.memory.regions]}
        connection.send_json(MessageType.HELLO, {"protocol": "pyrovisor-migration", "version": PROTOCOL_VERSION,
                                                 "pyrovisor": __version__, "source": socket.gethostname(),
                                                 "pid": os.getpid(), "page_size": PAGE_SIZE, **machine_shape})
        welcome = expect(connection.receive(), MessageType.WELCOME).json()
        if not welcome.get("accepted"):
            raise MigrationError("handshake", f"destination refused: {welcome.get('reason', 'no reason given')}")

        sender = PageSender(vmm.memory, connection, RateLimiter(options.max_bandwidth), options.compression)
        self.dirty = dirty = vmm.dirty.subscribe()
        pending = sender.all_pages()
        progress.pages_total = len(pending)
        history: list[RoundStats] = []
        previous_dirty = np.zeros(0, dtype=np.int64)
        bandwidth_estimate = 0.0
        reason = ""
        while True:
            progress.phase, progress.round, progress.pages_left = "pre-copy", len(history), len(pending)
            round_started = time.perf_counter()
            throttle_before = self.throttler.paused_seconds
            tally = SendTally()
            sender.send(pending, tally, self.cancelled)
            dirtied = dirty.collect_array()
            duration = time.perf_counter() - round_started
            connection.send_json(MessageType.ROUND_END, {"round": len(history),
                                                         "excused": excused_frames(tally.frames, dirtied)})
            if tally.data_bytes >= 1 << 20 or bandwidth_estimate == 0.0:
                bandwidth_estimate = tally.data_bytes / tally.send_seconds if tally.send_seconds else bandwidth_estimate
            stats = RoundStats(
                round=len(history), pages_sent=tally.pages, zero_pages=tally.zero_pages,
                bytes_on_wire=connection.bytes_sent - sum(r.bytes_on_wire for r in history),
                duration_s=duration, dirty_pages=len(dirtied),
                dirty_rate_bytes_per_s=len(dirtied) * PAGE_SIZE / duration if duration else 0.0,
                bandwidth_bytes_per_s=bandwidth_estimate or float(options.max_bandwidth or 1e9),
                wws_pages=int(np.intersect1d(dirtied, previous_dirty, assume_unique=True).size),
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
                       pending: np.ndarray, destination: str, started: float, reason: str) -> MigrationResult:
        vmm, options, progress = self.vmm, self.options, self.progress
        self.throttler.stop()
        progress.phase = "stop-and-copy"
        paused_at_wall = time.time()
        paused_at = time.perf_counter()
        if not vmm.pause():
            raise MigrationError("stop-and-copy", "the guest stopped during the migration")
        self.paused_by_us = True
        assert self.dirty is not None
        final = np.union1d(pending, self.dirty.collect_array())
        progress.pages_left = len(final)
        tally = SendTally()
        sender.send(final, tally)
        machine = capture_machine(vmm)
        digest = digest_memory(vmm.memory) if options.verify_memory else None
        connection.send_json(MessageType.STATE, {"machine": encode(machine), "paused_at": paused_at_wall,
                                                 "memory_sha256": digest})
        resumed = expect(connection.receive(), MessageType.RESUMED).json()
        downtime_source = time.perf_counter() - paused_at
        # Commit: the guest runs at the destination, so this copy stops for good.
        vmm.control.finish(RunOutcome(StopReason.MIGRATED))
        self.paused_by_us = False
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
            downtime_destination_s=float(resumed.get("resumed_at", paused_at_wall)) - paused_at_wall,
            bytes_on_wire=connection.bytes_sent, memory_bytes=vmm.memory.size, switch_reason=reason,
            memory_digest_source=digest, memory_digest_destination=resumed.get("memory_sha256"),
        )


class BackgroundMigration:
    """A migration running on its own thread (for the control API)."""

    def __init__(self, vmm: Vmm, destination: str, options: MigrationOptions) -> None:
        self.progress = Progress()
        self.result: MigrationResult | None = None
        self.error: str | None = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(vmm, destination, options), name="migration",
                                        daemon=True)
        self._thread.start()

    def _run(self, vmm: Vmm, destination: str, options: MigrationOptions) -> None:
        try:
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
