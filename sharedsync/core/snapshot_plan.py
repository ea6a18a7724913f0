"""Which snapshot each peer's next increment builds on, and which snapshots may go.

Replication ships ``btrfs send -p <parent> <snapshot>``: the increment only applies on a peer
that holds ``parent``, so the sender must keep, for every peer, the last snapshot that peer
fully received. Keep too few and a peer falls back to a full send (the whole volume over the
wire); keep too many and the volume fills with old snapshots. This module draws that line from
the facts the agent holds (its snapshots, each peer's last fully received snapshot, snapshots
pinned by CSI, sends in progress) and nothing else, so it can be tested exhaustively.

A peer whose last received snapshot the sender no longer has (or never had: another lineage,
after a failover) gets ``None``: a full send. A peer that stays unreachable keeps its parent
alive indefinitely; it is the operator's job to declare such a replica stale and drop it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from .errors import InvalidArgument, NotFound


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One read-only snapshot on the sender; ``seq`` orders them (higher is newer)."""

    seq: int
    name: str


@dataclass(frozen=True, slots=True)
class InFlight:
    """A send in progress: both its snapshot and its parent must survive until it ends."""

    peer: str
    snapshot: str
    parent: str | None = None


@dataclass(frozen=True, slots=True)
class SnapshotPlan:
    """The sender's snapshot bookkeeping for one volume. Build it with :meth:`build`."""

    snapshots: tuple[Snapshot, ...]  # oldest first
    peers: tuple[tuple[str, str | None], ...]  # peer -> last fully received snapshot, by peer
    pinned: frozenset[str] = frozenset()
    in_flight: tuple[InFlight, ...] = ()

    @classmethod
    def build(cls, snapshots: Iterable[Snapshot], peers: Mapping[str, str | None],
              pinned: Collection[str] = (), in_flight: Iterable[InFlight] = ()) -> SnapshotPlan:
        ordered = tuple(sorted(snapshots, key=lambda s: s.seq))
        seqs = [s.seq for s in ordered]
        names = [s.name for s in ordered]
        if len(set(seqs)) != len(seqs):
            raise InvalidArgument("two snapshots share a sequence number")
        if len(set(names)) != len(names):
            raise InvalidArgument("two snapshots share a name")
        if any(not name for name in names):
            raise InvalidArgument("a snapshot has an empty name")
        return cls(snapshots=ordered, peers=tuple(sorted(peers.items())),
                   pinned=frozenset(pinned), in_flight=tuple(in_flight))

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.snapshots)

    @property
    def newest(self) -> Snapshot | None:
        return self.snapshots[-1] if self.snapshots else None

    def last_received(self, peer: str) -> str | None:
        for name, last in self.peers:
            if name == peer:
                return last
        raise NotFound(f"peer {peer!r} is not a replica of this volume")

    def parent_for(self, peer: str) -> Snapshot | None:
        """The snapshot the next increment to ``peer`` builds on; ``None``: a full send."""
        return parent_for(self.snapshots, self.last_received(peer))

    def up_to_date(self, peer: str) -> bool:
        """Whether ``peer`` already has the newest snapshot (nothing to send)."""
        newest = self.newest
        return newest is not None and self.parent_for(peer) == newest

    def needed(self) -> frozenset[str]:
        """Names of the sender's snapshots that must be kept, and why is in :meth:`reasons`."""
        return frozenset(self.reasons())

    def reasons(self) -> dict[str, tuple[str, ...]]:
        """For every snapshot that must be kept, why (for logs and ``kubectl describe``)."""
        why: dict[str, list[str]] = {}

        def keep(name: str | None, reason: str) -> None:
            if name is not None and name in self.names:
                why.setdefault(name, []).append(reason)

        if self.newest is not None:
            keep(self.newest.name, "newest")
        for peer, _ in self.peers:
            parent = self.parent_for(peer)
            keep(parent.name if parent else None, f"parent for {peer}")
        for name in sorted(self.pinned):
            keep(name, "pinned")
        for send in self.in_flight:
            keep(send.snapshot, f"being sent to {send.peer}")
            keep(send.parent, f"parent of the send to {send.peer}")
        return {name: tuple(reasons) for name, reasons in why.items()}

    def deletable(self) -> tuple[Snapshot, ...]:
        """Every snapshot nothing needs, oldest first."""
        needed = self.needed()
        return tuple(s for s in self.snapshots if s.name not in needed)


def parent_for(snapshots: Iterable[Snapshot], last_received: str | None) -> Snapshot | None:
    """The newest snapshot both sides have, given the peer's last fully received one."""
    if last_received is None:
        return None
    return next((s for s in snapshots if s.name == last_received), None)


def deletable(snapshots: Iterable[Snapshot], peers: Mapping[str, str | None],
              pinned: Collection[str] = (),
              in_flight: Iterable[InFlight] = ()) -> tuple[Snapshot, ...]:
    """Every snapshot that is not the newest, no peer's parent, not pinned and not in flight."""
    return SnapshotPlan.build(snapshots, peers, pinned, in_flight).deletable()


#: Below this share of its filesystem free, a replica has the snapshots it prunes freed at
#: once (btrfs' cleaner woken, one extra transaction commit) rather than at the kernel's next
#: periodic run, up to 30 s later. With more free than this, the wait costs a writer nothing.
RECLAIM_BELOW_FREE_SHARE = 0.5


def reclaim_now(free_bytes: int, total_bytes: int) -> bool:
    """Whether pruned snapshots' space must come back now (see RECLAIM_BELOW_FREE_SHARE).

    The space a snapshot held is used until then: a volume that deleted a large file and is
    writing another as large runs out of space on its primary, and a replica's receive fails
    with ENOSPC, when the old file's last snapshot was pruned moments before.
    """
    if total_bytes <= 0:
        return False
    return free_bytes < total_bytes * RECLAIM_BELOW_FREE_SHARE
