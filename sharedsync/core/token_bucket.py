"""Bandwidth shaping: a token bucket per volume and a fair split of a node's link.

A SyncPolicy caps each volume's replication traffic (``qos.bandwidth``) and ranks volumes by
``qos.priority`` for the node's shared link. The agent asks :class:`TokenBucket` how long to wait
before sending each frame, and re-splits the link with :func:`fair_shares` whenever demands
change. Time is always passed in (a monotonic clock reading in seconds), never read here, so the
pacing is deterministic and tests can run hours of traffic in microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidArgument


def _check_rate(rate: float) -> None:
    if not rate > 0:  # also refuses NaN
        raise InvalidArgument(f"rate must be positive bytes per second (math.inf: no limit), "
                              f"got {rate}")


def _check_burst(burst: float) -> None:
    if not (burst > 0 and math.isfinite(burst)):
        raise InvalidArgument(f"burst must be a positive, finite number of bytes, got {burst}")


@dataclass(frozen=True, slots=True)
class BucketState:
    """The bucket's level at a point in time; negative when in debt."""

    tokens: float
    at: float


def refill(state: BucketState, rate: float, burst: float, now: float) -> BucketState:
    """The level at ``now``: topped up at ``rate``, never above ``burst``.

    A clock that went backwards adds nothing (and does not move ``at`` back).
    """
    elapsed = now - state.at
    if elapsed <= 0:
        return state
    return BucketState(tokens=min(burst, state.tokens + elapsed * rate), at=now)


class TokenBucket:
    """Paces a byte stream to ``rate`` bytes per second with bursts of up to ``burst`` bytes.

    ``take(n, now)`` charges ``n`` bytes at once and answers how long to wait before sending
    them. A request larger than the bucket is allowed: the bucket goes into debt and the wait
    covers it, so frames bigger than the burst still flow, at the configured rate. Callers that
    take while in debt queue behind the debt. The rate can change at any time.
    """

    __slots__ = ("_burst", "_rate", "_state")

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float, *, now: float = 0.0,
                 tokens: float | None = None) -> None:
        _check_rate(rate_bytes_per_s)
        _check_burst(burst_bytes)
        self._rate = float(rate_bytes_per_s)
        self._burst = float(burst_bytes)
        start = self._burst if tokens is None else min(float(tokens), self._burst)
        self._state = BucketState(tokens=start, at=now)

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def unlimited(self) -> bool:
        return math.isinf(self._rate)

    def tokens(self, now: float) -> float:
        """The level at ``now`` (negative while in debt)."""
        if self.unlimited:
            return self._burst
        return refill(self._state, self._rate, self._burst, now).tokens

    def take(self, n: float, now: float) -> float:
        """Charge ``n`` bytes at ``now``; return the seconds to wait before sending them."""
        if not n >= 0 or math.isinf(n):
            raise InvalidArgument(f"cannot take {n} bytes")
        if self.unlimited:
            return 0.0
        state = refill(self._state, self._rate, self._burst, now)
        tokens = state.tokens - n
        self._state = BucketState(tokens=tokens, at=state.at)
        if tokens >= 0:
            return 0.0
        # The debt is paid off ``-tokens / rate`` after ``state.at``, which is later than ``now``
        # only if the clock stepped back.
        return max(0.0, state.at - now) + (-tokens / self._rate)

    def set_rate(self, rate_bytes_per_s: float, now: float) -> None:
        """Change the rate from ``now`` on; what accrued until ``now`` used the old rate."""
        _check_rate(rate_bytes_per_s)
        if not self.unlimited:
            self._state = refill(self._state, self._rate, self._burst, now)
        else:
            self._state = BucketState(tokens=self._burst, at=max(now, self._state.at))
        self._rate = float(rate_bytes_per_s)

    def set_burst(self, burst_bytes: float, now: float) -> None:
        """Change the burst from ``now`` on (the level is clipped to the new burst)."""
        _check_burst(burst_bytes)
        state = self._state if self.unlimited else refill(self._state, self._rate,
                                                          self._burst, now)
        self._burst = float(burst_bytes)
        self._state = BucketState(tokens=min(state.tokens, self._burst), at=state.at)


# -- fair shares ---------------------------------------------------------------------------------


def _check_share_inputs(capacity: float, demands: Mapping[str, tuple[float, float]]) -> None:
    if not capacity >= 0:
        raise InvalidArgument(f"capacity must be non-negative, got {capacity}")
    for volume, (priority, demand) in demands.items():
        if not (priority > 0 and math.isfinite(priority)):
            raise InvalidArgument(f"priority of {volume!r} must be a positive finite weight, "
                                  f"got {priority}")
        if not demand >= 0:
            raise InvalidArgument(f"demand of {volume!r} must be non-negative, got {demand}")


def fair_shares(capacity: float,
                demands: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """Split ``capacity`` among volumes by weighted max-min fairness.

    ``demands`` maps a volume to ``(priority, demand)``: the priority is its weight (2 gets
    twice the share of 1 while both want more), the demand is what it would use (``math.inf``:
    as much as it can get). Volumes that want less than their weighted share get exactly what
    they want, and what they leave is divided again among the others by weight ("water
    filling"). So no volume gets more than it asked for, nothing is left idle while someone
    wants more, and every volume still short of its demand gets the same share per unit of
    weight. The result is deterministic (volumes are handled in name order).
    """
    _check_share_inputs(capacity, demands)
    if math.isinf(capacity):
        return {v: float(demand) for v, (_, demand) in demands.items()}
    shares = dict.fromkeys(demands, 0.0)
    active = sorted(v for v, (_, demand) in demands.items() if demand > 0)
    remaining = float(capacity)
    while active and remaining > 0:
        weight = math.fsum(demands[v][0] for v in active)
        level = remaining / weight  # share per unit of weight this round
        satisfied = [v for v in active if demands[v][1] <= level * demands[v][0]]
        if not satisfied:
            for v in active:
                shares[v] = remaining * (demands[v][0] / weight)
            break
        for v in satisfied:
            shares[v] = demands[v][1]
        remaining = max(0.0, remaining - math.fsum(demands[v][1] for v in satisfied))
        active = [v for v in active if v not in satisfied]
    return shares
