"""Migration results: per-round statistics and totals, as a table and as JSON."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from pyrovisor.migration.policy import RoundStats


@dataclass(frozen=True)
class MigrationResult:
    destination: str
    rounds: tuple[RoundStats, ...]  # pre-copy rounds, then the stop-and-copy round (last)
    total_seconds: float
    downtime_source_s: float  # source paused → destination's RESUMED received
    downtime_destination_s: float  # source paused (its clock) → guest resumed (destination's clock)
    bytes_on_wire: int
    memory_bytes: int
    switch_reason: str
    memory_digest_source: str | None = None
    memory_digest_destination: str | None = None

    @property
    def precopy_rounds(self) -> int:
        return len(self.rounds) - 1


def rounds_table(result: MigrationResult) -> Table:
    table = Table(title=f"migration to {result.destination}")
    for column in ("round", "pages sent", "zero pages", "MiB on wire", "duration", "dirtied", "dirty rate",
                   "bandwidth", "WWS pages", "throttle"):
        table.add_column(column, justify="right")
    for stats in result.rounds:
        name = "stop+copy" if stats is result.rounds[-1] else str(stats.round)
        table.add_row(name, str(stats.pages_sent), str(stats.zero_pages), f"{stats.bytes_on_wire / 2**20:.1f}",
                      f"{stats.duration_s * 1e3:.0f} ms", str(stats.dirty_pages),
                      f"{stats.dirty_rate_bytes_per_s / 1e6:.1f} MB/s", f"{stats.bandwidth_bytes_per_s / 1e6:.0f} MB/s",
                      str(stats.wws_pages), f"{stats.throttle:.0%}")
    return table


def summary_lines(result: MigrationResult) -> list[str]:
    rate = result.memory_bytes / result.total_seconds / 1e9 if result.total_seconds else 0.0
    lines = [
        f"total {result.total_seconds:.2f} s, {result.precopy_rounds} pre-copy rounds + stop-and-copy "
        f"({result.switch_reason})",
        f"downtime {result.downtime_source_s * 1e3:.1f} ms at the source, "
        f"{result.downtime_destination_s * 1e3:.1f} ms at the destination",
        f"{result.bytes_on_wire / 2**20:.1f} MiB on the wire for {result.memory_bytes / 2**20:.0f} MiB of RAM "
        f"({rate:.2f} GB/s of guest memory)",
    ]
    if result.memory_digest_source is not None:
        same = result.memory_digest_source == result.memory_digest_destination
        lines.append(f"memory checksum at pause {'matches' if same else 'DIFFERS from'} the destination's at resume")
    return lines
