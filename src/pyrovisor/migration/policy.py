"""When to stop pre-copying: per-round statistics in, a decision out. Replace the policy to experiment."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from pyrovisor.errors import ConfigError

PAGE_SIZE = 4096


@dataclass(frozen=True)
class RoundStats:
    """One pre-copy round, as the policy and the statistics see it."""

    round: int
    pages_sent: int  # pages transferred this round (zero pages included)
    zero_pages: int  # of which sent as zero markers
    bytes_on_wire: int
    duration_s: float
    dirty_pages: int  # pages written while this round ran: the next round's work
    dirty_rate_bytes_per_s: float
    bandwidth_bytes_per_s: float  # page data sent per second spent sending it
    wws_pages: int  # writable working set (Clark et al.): pages written in this round and the one before
    throttle: float  # fraction of the round the vCPUs were actually held paused
    throttle_target: float = 0.0  # the throttle in effect during the round


class Action(Enum):
    CONTINUE = "continue"
    SWITCH_OVER = "switch over"
    CANCEL = "cancel"


@dataclass(frozen=True)
class Decision:
    action: Action
    throttle: float = 0.0  # vCPU throttle for the next round (auto-converge)
    reason: str = ""


class ConvergencePolicy(Protocol):
    """Decides after every round whether to go on, switch over (stop and copy) or give up."""

    def decide(self, history: Sequence[RoundStats], elapsed_s: float) -> Decision: ...


@dataclass(frozen=True)
class PrecopyPolicy:
    """The default policy.

    Never switch over while the pages left would take longer than `downtime_limit_s` to send at the
    measured bandwidth. Within that limit, keep iterating while each round at least halves what is
    left (`shrink_needed`), so a converging guest is paused as briefly as its writable working set
    allows; switch over when rounds stop shrinking or the rest fits in `converged_downtime_s`. With
    `iterate_while_shrinking=False` this is QEMU's rule: switch as soon as the rest fits the limit.
    After `max_rounds` rounds or `timeout_s` seconds, switch over anyway or cancel (`on_limit`).
    With `auto_converge`, whenever the guest dirties memory at half the link's speed or more,
    throttle its vCPUs harder (`throttle_initial`, then `+throttle_increment`, up to `throttle_max`).
    """

    downtime_limit_s: float = 0.3
    max_rounds: int = 30
    timeout_s: float = 600.0
    on_limit: str = "switch-over"
    auto_converge: bool = False
    throttle_initial: float = 0.2
    throttle_increment: float = 0.1
    throttle_max: float = 0.99
    state_transfer_s: float = 0.005  # device state and resume, on top of the last pages
    iterate_while_shrinking: bool = True
    shrink_needed: float = 0.5  # a round must leave at most this fraction of what it sent to be worth another
    converged_downtime_s: float = 0.002

    def __post_init__(self) -> None:
        if self.on_limit not in ("switch-over", "cancel"):
            raise ConfigError("on_limit", self.on_limit, "must be 'switch-over' or 'cancel'")
        if self.downtime_limit_s <= 0 or self.max_rounds < 1 or self.timeout_s <= 0:
            raise ConfigError("migration policy", self, "limits must be positive")

    def expected_downtime(self, last: RoundStats) -> float:
        bandwidth = max(last.bandwidth_bytes_per_s, 1.0)
        return last.dirty_pages * PAGE_SIZE / bandwidth + self.state_transfer_s

    def decide(self, history: Sequence[RoundStats], elapsed_s: float) -> Decision:
        last = history[-1]
        downtime = self.expected_downtime(last)
        if downtime <= self.downtime_limit_s:
            shrinking = last.pages_sent > 0 and last.dirty_pages <= self.shrink_needed * last.pages_sent
            converged = downtime - self.state_transfer_s <= self.converged_downtime_s
            if not self.iterate_while_shrinking or converged or not shrinking:
                why = "converged" if converged else ("within the limit" if not self.iterate_while_shrinking
                                                     else "rounds stopped shrinking")
                return Decision(Action.SWITCH_OVER, last.throttle_target,
                                f"{last.dirty_pages} pages left, ~{downtime * 1e3:.1f} ms: {why}")
        if len(history) >= self.max_rounds or elapsed_s >= self.timeout_s:
            limit = f"{len(history)} rounds" if len(history) >= self.max_rounds else f"{elapsed_s:.0f} s"
            if self.on_limit == "cancel":
                return Decision(Action.CANCEL, 0.0, f"did not converge within {limit} (~{downtime * 1e3:.0f} ms left)")
            return Decision(Action.SWITCH_OVER, last.throttle_target, f"limit of {limit} reached: switching over anyway")
        throttle = last.throttle_target
        if self.auto_converge and last.dirty_rate_bytes_per_s >= 0.5 * last.bandwidth_bytes_per_s:
            throttle = self.throttle_initial if throttle == 0 else min(self.throttle_max, throttle + self.throttle_increment)
        return Decision(Action.CONTINUE, throttle)
