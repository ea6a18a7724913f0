"""Who a Synchronous commit of a multi-writer volume asks, and when it may return.

A multi-writer volume has no primary: the node where a pod called fsync asks every peer to merge
its change log up to the write (MergeNow) and returns once ``writeQuorum`` replicas, itself
included, hold it. It also waits for every other peer it *trusts*, so that pods on every
reachable node read what was fsync'd when the fsync returns.

A peer whose last MergeNow failed is a *suspect*. Waiting for a suspect at every commit would
make every fsync pay a dead peer's timeout, so while the trusted peers can make the quorum a
suspect is only probed, one call at a time, and not waited for; a probe that succeeds makes it
trusted again. When the quorum needs suspects, every one of them is asked and the commit waits
for them to come up, within its timeout.

The agent's ``replication_agent.multiwriter`` makes the calls; this module only decides.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .errors import Unavailable
from .policy import majority

#: A quorum peer's stream of a change counts as going well while it sent something within this
#: long (a partitioned peer's stream stalls for seconds before it fails)...
STREAM_STALL_SECONDS = 0.25
#: ... and, when both links' rates are known, at this share of the waiting peer's own rate
#: at least (a commit does not wait for a slow link while a fast one idles).
STREAM_RATE_SHARE = 0.5

#: How long a Synchronous commit (an fsync, single- or multi-writer) waits for its write quorum
#: before it fails, and the fsync with it (EIO).
COMMIT_TIMEOUT_SECONDS = 30.0


def write_quorum(configured: int, replicas: int) -> int:
    """Replicas, this one included, that must hold a write before a Synchronous fsync returns:
    the policy's ``writeQuorum`` (0: unset), else a majority of the ``replicas``."""
    return configured or majority(replicas)


@dataclass(frozen=True, slots=True)
class CommitCalls:
    """The peers one commit asks, and those of them asked to wait until they are up."""

    ask: frozenset[str]
    wait_for_ready: frozenset[str]


def plan_commit(peers: Collection[str], suspects: Collection[str],
                probing: Collection[str], need: int) -> CommitCalls:
    """Which ``peers`` to ask for a commit that needs ``need`` of them (the quorum minus this
    node); ``probing`` are the suspects with a call still running.

    Raises Unavailable when the volume has fewer peers than the quorum needs.
    """
    if need > len(peers):
        raise Unavailable(f"write quorum {need + 1} needs more replicas than the "
                          f"{len(peers) + 1} of the volume")
    trusted = {p for p in peers if p not in suspects}
    doubted = set(peers) - trusted
    if len(trusted) >= need:
        return CommitCalls(frozenset(trusted | (doubted - set(probing))), frozenset())
    return CommitCalls(frozenset(peers), frozenset(doubted))


def commit_settled(*, acked: int, need: int, trusted_pending: int) -> bool:
    """Whether a commit may return: its quorum merged, and no trusted peer is still merging."""
    return acked >= need and trusted_pending == 0


def stream_now(need: int, held: int, ahead: int) -> bool:
    """Whether a single-writer Synchronous volume's peer should stream a change now.

    ``need`` peers must hold the change before the fsync returns; ``held`` other peers do,
    ``ahead`` others are streaming it well (see ``PeerLink._wait_turn``). A peer beyond the
    quorum waits, so that the streams the fsync waits for have the CPUs: it streams once the
    quorum holds the change, or as soon as the others cannot make the quorum without it.
    """
    return held >= need or held + ahead < need


def streams_well(*, idle_seconds: float, rate: float, own_rate: float) -> bool:
    """Whether another peer's stream of a change is going well enough for a peer beyond the
    quorum to wait for it (``stream_now``'s ``ahead``): it sent something in the last
    ``STREAM_STALL_SECONDS``, and it is not much slower than the waiting peer's own link.

    ``rate`` and ``own_rate`` are bytes per second measured on recent large pushes, 0 where
    none was measured yet. An unmeasured link is not slow: judged so, a link whose pushes were
    all small (2 MiB commits, say) never counted as ahead of one measured by its rebuild, and
    the peer beyond the quorum streamed every change beside it, each with a ``btrfs send`` of
    its own, on the CPUs the quorum's stream needed.
    """
    if idle_seconds >= STREAM_STALL_SECONDS:
        return False
    return rate == 0 or own_rate == 0 or rate >= STREAM_RATE_SHARE * own_rate
