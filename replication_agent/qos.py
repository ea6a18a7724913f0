"""The node's replication bandwidth, shared by priority among the volumes sending right now.

Each volume already paces itself to its own cap (``qos.bandwidth``). When the node also has a
budget (``nodeBandwidth`` in the agent config), every volume that is sending gets a share of it by
weighted max-min fairness (``sharedsync.core.token_bucket.fair_shares``), recomputed whenever a
volume starts or stops sending: a volume with priority 3 gets three times the share of one with
priority 1 while both want more, and what a capped volume leaves is handed to the others.
"""

import math
import time

from sharedsync.core.token_bucket import TokenBucket, fair_shares

#: A share's burst: a tenth of a second of traffic, at least one frame.
MIN_BURST_BYTES = 1 << 20


class NodeBandwidth:
    """Per-volume token buckets whose rates are the volumes' current fair shares."""

    def __init__(self, capacity_bytes_per_second: float) -> None:
        self.capacity = capacity_bytes_per_second if capacity_bytes_per_second > 0 else math.inf
        self._senders: dict[str, int] = {}
        self._wants: dict[str, tuple[float, float]] = {}
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def limited(self) -> bool:
        return not math.isinf(self.capacity)

    def begin(self, volume: str, priority: int, cap_bytes_per_second: float) -> None:
        """A push of ``volume`` starts (several pushes of one volume count once)."""
        self._senders[volume] = self._senders.get(volume, 0) + 1
        self._wants[volume] = (float(max(1, priority)), cap_bytes_per_second or math.inf)
        self._rebalance()

    def end(self, volume: str) -> None:
        left = self._senders.get(volume, 0) - 1
        if left > 0:
            self._senders[volume] = left
            return
        self._senders.pop(volume, None)
        self._wants.pop(volume, None)
        self._buckets.pop(volume, None)
        self._rebalance()

    def share(self, volume: str) -> float:
        bucket = self._buckets.get(volume)
        return bucket.rate if bucket is not None else math.inf

    def delay(self, volume: str, nbytes: int) -> float:
        """Seconds ``volume`` must wait before sending ``nbytes`` within its share."""
        bucket = self._buckets.get(volume)
        return 0.0 if bucket is None else bucket.take(nbytes, time.monotonic())

    def _rebalance(self) -> None:
        if not self.limited:
            return
        now = time.monotonic()
        for volume, rate in fair_shares(self.capacity, self._wants).items():
            burst = max(MIN_BURST_BYTES, rate / 10)
            bucket = self._buckets.get(volume)
            if bucket is None:
                self._buckets[volume] = TokenBucket(max(rate, 1.0), burst, now=now)
            else:
                bucket.set_burst(burst, now)
                bucket.set_rate(max(rate, 1.0), now)
