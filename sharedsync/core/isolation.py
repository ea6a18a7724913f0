"""A primary cut off from everything stops acknowledging writes: when, and when it may resume.

The operator fails a volume over when the primary's agent Lease expires. An agent that lost
the API server *and* every peer of a volume cannot tell whether that happened: if it did,
whatever it acknowledges from then on is set aside when it rejoins (a newer primary's data
wins), so an Asynchronous writer would lose every write of the partition, not just
``maxLag``'s worth. So shortly before its Lease can look expired to the operator, such a primary
suspends writes (the replica turns read-only and fsync/close fail with EROFS) until its Lease is
renewed again and a peer confirms that no newer epoch exists (a peer at a newer epoch fences it
for good, as any newer epoch does).

Either loss alone suspends nothing: with the API server down everywhere (an upgrade, say) the
operator cannot fail anything over, and a primary that reaches a peer learns of a promotion
from it within seconds. A volume with no other replica is never suspended: nothing can take
its place.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

#: Suspend this share of the Lease duration before it expires: by then at least one renewal
#: (every third of the duration) failed, and the check interval, the peers' probe
#: (:func:`probe_seconds`) and the operator's clock fit in what is left.
LAPSE_MARGIN = 0.4


class Isolation(enum.Enum):
    KEEP = "keep"  # nothing to change
    SUSPEND = "suspend"  # stop acknowledging writes
    RESUME = "resume"  # take writes again
    FENCE = "fence"  # a newer epoch exists: stop being primary for good


def lease_lapsed(renewed_at: float | None, started_at: float, duration: float,
                 now: float) -> bool:
    """Whether our Lease may look expired to the operator soon: its last renewal (or, before
    the first, the agent's start) is older than the duration less the margin. Monotonic
    times, seconds."""
    since = renewed_at if renewed_at is not None else started_at
    return now - since >= duration * (1 - LAPSE_MARGIN)


def probe_seconds(duration: float) -> float:
    """How long to wait for each peer's answer: a tenth of the Lease duration, 2 s at most,
    so that a suspension lands before the Lease can expire."""
    return min(2.0, duration / 10)


def isolation_action(*, suspended: bool, lapsed: bool, peers: int, answers: Sequence[int],
                     epoch: int) -> Isolation:
    """What a primary at ``epoch`` does, given whether its Lease lapsed, how many peers the
    volume has and the epochs of those that answered a probe just now."""
    if any(answer > epoch for answer in answers):
        return Isolation.FENCE
    if peers == 0:
        return Isolation.RESUME if suspended else Isolation.KEEP
    if not suspended:
        return Isolation.SUSPEND if lapsed and not answers else Isolation.KEEP
    return Isolation.RESUME if not lapsed and answers else Isolation.KEEP
