"""What the operator should do about one volume: desired layout against what agents report.

The operator's reconcile is a pure function of four inputs: the volume's intent (size, policy,
replica count), the layout it decided before (replica nodes, primary, epoch: kept in the
SharedVolume's status, so decisions survive an operator restart), the cluster (nodes, which
agents are alive) and what every live agent reports about the volume. It returns the new layout
and the agent calls that move the world towards it. Actions are derived from the *difference*
between desired and observed, never from the transition that led here, so running the plan
again after its actions succeeded yields none, and a plan interrupted halfway (operator killed)
is simply finished by the next run.

Decisions, in order:

1. Failover: the primary's agent is gone (Lease expired) -> the best live replica is promoted
   at ``epoch + 1``. For Synchronous volumes only one that holds every acknowledged write: the
   newest within reach when the primary never went below writeQuorum at this epoch and few
   enough replicas are out of reach, else one the primary last saw InSync. Otherwise the one
   with the newest received snapshot. The old primary, if it returns, is told the
   newer epoch and rejoins as a replica (it is fenced by the agents meanwhile).
2. Planned switchover (annotation): the target must be a live replica; the caller syncs the old
   primary first (:data:`ActionKind.SYNC_NOW` comes before the promotion). It waits while the
   primary does not serve its epoch (just failed over to, not promoted yet): SyncNow needs a
   serving primary.
3. Stale replacement: a replica whose agent has been gone longer than ``staleReplicaTimeout``
   leaves the layout; placement picks a replacement, which the primary rebuilds.
4. Placement (:func:`sharedsync.core.placement.place`) fills the layout up to the desired count,
   or trims it, never touching the primary. A new volume's first placement also fixes how it
   replicates (:class:`Replication`): by btrfs snapshots when enough nodes keep their replicas
   on btrfs, else file by file when nodes on the ext4 fallback store are needed to place it
   (multi-writer volumes always replicate file by file). From then on a volume that ships
   snapshots takes new replicas on btrfs nodes only.
5. Actions: promote where the primary does not report itself primary at the epoch; apply the
   spec to every live replica whose view is out of date (spec fingerprint, epoch or primary);
   remove the volume from live agents that hold it but are not in the layout, once a live
   primary holds it (until then such a replica may be the only copy within reach).
"""

import enum
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .placement import BTRFS, NodeView, Placement, place
from .policy import Mode, Policy
from .replica_state import ReplicaState


class ActionKind(enum.StrEnum):
    APPLY = "Apply"
    PROMOTE = "Promote"
    REMOVE = "Remove"
    SYNC_NOW = "SyncNow"


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    node: str
    epoch: int = 0


class Replication(enum.StrEnum):
    """How a volume's replicas stay in sync; fixed when the volume is first placed."""

    #: The primary ships btrfs increments (every replica on a btrfs node).
    SNAPSHOTS = "Snapshots"
    #: Files travel one by one (multi-writer volumes, and volumes with a replica on ext4).
    FILES = "Files"


@dataclass(frozen=True, slots=True)
class Layout:
    """Where a volume lives: decided by the operator, persisted in the SharedVolume status."""

    replicas: tuple[str, ...] = ()
    primary: str = ""
    epoch: int = 0
    #: The epoch at which a Synchronous primary was last told to acknowledge writes on fewer
    #: replicas than writeQuorum (onQuorumLoss: Continue); 0: never. While it differs from
    #: ``epoch``, every write the primary acknowledged is on writeQuorum replicas, whatever its
    #: last view of them said.
    quorum_lowered_epoch: int = 0
    #: Decided by the first placement (volumes placed before it was recorded were all made
    #: to ship snapshots, hence the default).
    replication: Replication = Replication.SNAPSHOTS

    @property
    def placed(self) -> bool:
        return bool(self.replicas) and self.primary in self.replicas


@dataclass(frozen=True, slots=True)
class Report:
    """What one live agent says about its replica of the volume (its VolumeStatus)."""

    node: str
    role: str  # "primary" | "replica"
    epoch: int
    primary: str
    fenced: bool = False
    spec_hash: str = ""
    #: The newest snapshot this replica holds completely, as (epoch, seq).
    last_received: tuple[int, int] = (0, 0)
    #: Synchronous fsync journal records it holds on top of that snapshot: of two replicas
    #: with the same snapshot, the one with more holds more acknowledged writes.
    journal_records: int = 0
    #: The primary's view of each replica (only meaningful in the primary's report).
    peer_states: Mapping[str, ReplicaState] = field(default_factory=dict)
    #: Pods on this node use the volume (it is attached here).
    attached: bool = False
    #: A pod on this node asked for the volume while another node was primary.
    attach_wanted: bool = False


def consumer_switchover(layout: Layout, reports: Mapping[str, Report]) -> str | None:
    """The replica node a pod is waiting on, when the primary should move there.

    An RWO volume's pod can be scheduled onto any node holding a replica (the PV's topology),
    e.g. after its node died or it was rescheduled; only the primary serves the volume, so that
    pod waits until the primary moves to its node. Not while pods on the primary still use it
    (moving would fence them), and one node at a time (the first by name, deterministically).
    """
    primary = reports.get(layout.primary)
    if primary is not None and primary.attached:
        return None
    wanting = sorted(n for n, r in reports.items()
                     if r.attach_wanted and n != layout.primary and n in layout.replicas)
    return wanting[0] if wanting else None


@dataclass(frozen=True, slots=True)
class Intent:
    """What the user asked for (SharedVolume spec + its policy)."""

    volume_id: str
    size_bytes: int
    policy: Policy
    desired_replicas: int
    consumer: str | None = None
    switchover_to: str | None = None
    #: The node that must be the primary of a new volume (it holds the content source).
    prefer: str | None = None
    #: ReadWriteMany on several nodes: replicated file by file whatever the nodes' stores.
    multi_writer: bool = False


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # "Normal" | "Warning"
    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class Plan:
    layout: Layout
    actions: tuple[Action, ...]
    events: tuple[Event, ...] = ()
    #: Why the volume cannot have what it asks for ("" when it can).
    problem: str = ""
    problem_reason: str = ""
    #: The write quorum the agents are given (lowered on quorum loss with onQuorumLoss=Continue).
    write_quorum: int = 0


def spec_fingerprint(parts: Mapping[str, object]) -> str:
    """A short stable hash of the spec an agent was given, to notice when it is out of date."""
    encoded = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2s(encoded.encode(), digest_size=8).hexdigest()


def _best_candidate(candidates: Sequence[str], reports: Mapping[str, Report],
                    primary_view: Mapping[str, ReplicaState], synchronous: bool, *,
                    layout: Layout, write_quorum: int) -> str | None:
    """The replica to promote: InSync in the primary's last view first, then the newest
    received snapshot, then the name (so every operator replica picks the same one)."""
    # a replica the primary last saw Rebuilding may hold nothing yet: promoting it could
    # lose the whole volume, so it waits for the primary (or another replica) instead
    usable = [n for n in candidates if n in reports and not reports[n].fenced
              and primary_view.get(n) != ReplicaState.REBUILDING]
    if synchronous and write_quorum >= 2 and layout.quorum_lowered_epoch != layout.epoch:
        # the primary never went below its quorum at this epoch: every acknowledged write is
        # on writeQuorum replicas, whatever its last view of them says (a Stale or Lagging one
        # in it may be a moment out of date, and must not hold the volume hostage)
        usable = _holding_every_acknowledged_write(
            [n for n in usable if primary_view.get(n) != ReplicaState.FAILED], reports,
            layout, write_quorum)
    elif synchronous and primary_view:
        # it acknowledged writes on fewer replicas (onQuorumLoss: Continue, or writeQuorum 1):
        # only a replica it saw InSync is known to hold them all
        usable = [n for n in usable if primary_view.get(n) == ReplicaState.IN_SYNC]
    if not usable:
        return None

    def rank(node: str) -> tuple[bool, int, int, int, str]:
        epoch, seq = reports[node].last_received
        return (primary_view.get(node) != ReplicaState.IN_SYNC, -epoch, -seq,
                -reports[node].journal_records, node)
    return min(usable, key=rank)


def _holds(report: Report) -> tuple[int, int, int]:
    """How much of the volume's history a replica holds: its newest snapshot, then the fsync
    journal records on top of it (records of one snapshot arrive in order, without gaps)."""
    return (*report.last_received, report.journal_records)


def _holding_every_acknowledged_write(usable: Sequence[str], reports: Mapping[str, Report],
                                      layout: Layout, write_quorum: int) -> list[str]:
    """Synchronous, the primary never below ``write_quorum`` at this epoch: the candidates
    that certainly hold every acknowledged write.

    An acknowledged write is on ``write_quorum`` replicas, the primary included, so on at least
    ``write_quorum - 1`` of the others, and replicas receive snapshots (and the fsync journal
    records on top of the newest) in order: whichever of them holds the newest snapshot and
    the most records on it holds every write any of them holds. So when at most
    ``write_quorum - 2`` of the other replicas are out of reach, the newest reachable one holds
    every acknowledged write; otherwise none is certain to, and failover waits. The primary's
    last view is not consulted: it may be a few seconds old (a replica it saw Rebuilding may
    have caught up and acknowledged since), and a wrong view must only ever delay a failover.
    """
    others = [n for n in layout.replicas if n != layout.primary]
    reachable = [n for n in others if n in reports]
    if len(others) - len(reachable) > write_quorum - 2 or not reachable:
        return []
    newest = max(_holds(reports[n]) for n in reachable)
    # the newest may be one that cannot serve (fenced, Rebuilding, Failed): then wait
    return [n for n in usable if n in reachable and _holds(reports[n]) == newest]


def _serving(report: Report | None, layout: Layout) -> bool:
    """Whether the layout's primary reports that it serves the layout's epoch."""
    return report is not None and report.role == "primary" and not report.fenced \
        and report.epoch == layout.epoch


def _first_placement(place_replicas: Callable[[bool], Placement], nodes: Sequence[NodeView],
                     prefer: str | None) -> tuple[Placement, Replication]:
    """A new volume's replicas and how they will replicate: btrfs snapshots if enough btrfs
    nodes can hold it (work in proportion to the change, checksummed stores), else file by
    file over whichever nodes can, ext4 ones included. The node holding the content source
    (``prefer``) must be among them: on an ext4 node it makes the volume file-level."""
    on_btrfs = place_replicas(True)
    if not on_btrfs.shortfall and (prefer is None or prefer in on_btrfs.nodes):
        return on_btrfs, Replication.SNAPSHOTS
    anywhere = place_replicas(False)
    stores = {node.name: node.store_filesystem for node in nodes}
    if any(stores.get(name, BTRFS) != BTRFS for name in anywhere.nodes):
        return anywhere, Replication.FILES
    return anywhere, Replication.SNAPSHOTS


def plan_volume(intent: Intent, layout: Layout, nodes: Sequence[NodeView],
                reports: Mapping[str, Report], down_for: Mapping[str, float], *,
                last_primary_view: Mapping[str, ReplicaState] | None = None,
                fingerprint: Callable[[Layout, int], str] = lambda layout, quorum: "") -> Plan:
    """Decide the layout and the agent calls for one volume.

    ``reports`` holds the live agents' reports about this volume (absent: the agent is alive but
    holds no replica, or is not alive). ``down_for`` maps every node whose agent is *not* alive
    to how long (seconds) it has been gone. ``last_primary_view`` is the primary's most recent
    per-replica view, remembered by the caller (it survives the primary's loss).
    ``fingerprint(layout, write_quorum)`` names the spec the caller will send for a layout;
    replicas reporting another one are sent it again.
    """
    policy = intent.policy
    alive = {n.name for n in nodes if n.agent_alive} - set(down_for)
    events: list[Event] = []
    actions: list[Action] = []
    primary_report = reports.get(layout.primary)
    primary_view = dict(last_primary_view or {})
    if primary_report is not None and primary_report.peer_states:
        primary_view = dict(primary_report.peer_states)

    # -- 1. failover ---------------------------------------------------------------------
    if layout.placed and layout.primary not in alive:
        others = [n for n in layout.replicas if n != layout.primary and n in alive]
        chosen = _best_candidate(others, reports, primary_view, policy.mode is Mode.SYNCHRONOUS,
                                 layout=layout,
                                 write_quorum=min(policy.write_quorum, intent.desired_replicas))
        if chosen is not None:
            epoch = max([layout.epoch, *(r.epoch for r in reports.values())]) + 1
            events.append(Event("Warning", "Failover",
                                f"primary {layout.primary} is gone; promoted {chosen} "
                                f"at epoch {epoch}"))
            layout = replace(layout, primary=chosen, epoch=epoch)
        elif others:
            events.append(Event("Warning", "FailoverBlocked",
                                f"primary {layout.primary} is gone and no replica is known to "
                                "hold every acknowledged write; waiting for it to return"))
        else:
            rest = ", ".join(n for n in layout.replicas if n != layout.primary) or "none"
            events.append(Event("Warning", "FailoverBlocked",
                                f"primary {layout.primary} is gone and no other replica's agent "
                                f"is alive ({rest}); waiting for one"))

    # -- 2. planned switchover -----------------------------------------------------------
    target = intent.switchover_to
    if target and layout.placed and target != layout.primary:
        if target not in layout.replicas or target not in alive or target not in reports:
            events.append(Event("Warning", "SwitchoverRefused",
                                f"switchover target {target} is not a live replica of "
                                f"{intent.volume_id}"))
        elif not _serving(reports.get(layout.primary), layout):
            # SyncNow needs a serving primary, and a failed SyncNow ends the caller's
            # reconcile before anything else: planning both would never let the primary (just
            # failed over to, or not yet promoted) start serving, and promoting the target
            # without the sync could lose acknowledged writes
            events.append(Event("Warning", "SwitchoverWaiting",
                                f"switchover to {target} waits for primary {layout.primary} "
                                f"to serve epoch {layout.epoch}"))
        else:
            actions.append(Action(ActionKind.SYNC_NOW, layout.primary))
            epoch = max([layout.epoch, *(r.epoch for r in reports.values())]) + 1
            events.append(Event("Normal", "Switchover",
                                f"primary moves from {layout.primary} to {target} at epoch "
                                f"{epoch}"))
            layout = replace(layout, primary=target, epoch=epoch)

    # -- 3. stale replicas ---------------------------------------------------------------
    # With the primary gone and no replica promoted (step 1 is waiting), no replica leaves for
    # being out of reach: one whose agent looks gone may hold the only copy of acknowledged
    # writes (or be back in a moment), and its replacement could only rebuild from the missing
    # primary.
    waiting = layout.placed and layout.primary not in alive
    keep = list(layout.replicas) if waiting else [
        n for n in layout.replicas
        if n in down_for and down_for[n] < policy.stale_replica_timeout_seconds]
    stale = [] if waiting else [n for n in layout.replicas if n != layout.primary
                                and n in down_for
                                and down_for[n] >= policy.stale_replica_timeout_seconds]
    current = [n for n in layout.replicas if n not in stale]
    for node in stale:
        events.append(Event("Warning", "ReplicaReplaced",
                             f"replica on {node} has been gone for "
                             f"{down_for[node]:.0f}s (staleReplicaTimeout "
                             f"{policy.stale_replica_timeout_seconds:.0f}s); placing a new one"))

    # -- 4. placement --------------------------------------------------------------------
    first = not layout.placed

    def place_replicas(snapshots_only: bool) -> Placement:
        return place(policy, intent.desired_replicas, intent.size_bytes, nodes, current,
                     keep=keep, consumer=intent.consumer,
                     protect=() if first else (layout.primary,),
                     prefer=intent.prefer if first else None, snapshots_only=snapshots_only)

    if intent.multi_writer:
        replication = Replication.FILES
        placement = place_replicas(False)
    elif first:
        placement, replication = _first_placement(place_replicas, nodes, intent.prefer)
    else:
        replication = layout.replication
        placement = place_replicas(replication is Replication.SNAPSHOTS)
    if first and placement.shortfall:
        # a new volume is placed whole or not at all: half a volume would look provisioned
        return Plan(layout=Layout(), actions=(), problem=placement.reason,
                    problem_reason="InsufficientNodes",
                    events=(Event("Warning", "PlacementFailed", placement.reason),))
    replicas = placement.nodes
    if first:
        primary = intent.prefer if intent.prefer in replicas else (
            intent.consumer if intent.consumer in replicas else replicas[0])
        layout = Layout(replicas=replicas, primary=primary, epoch=1, replication=replication)
        events.append(Event("Normal", "Placed",
                            f"replicas on {', '.join(replicas)}; primary {primary}"))
    else:
        layout = replace(layout, replicas=replicas, replication=replication)
        for node in placement.added:
            events.append(Event("Normal", "RebuildStarted",
                                f"new replica on {node}, rebuilding from {layout.primary}"))
        for node in placement.removed:
            if node not in stale:
                events.append(Event("Normal", "ReplicaRemoved", f"replica on {node} removed"))
    problem = placement.reason if placement.shortfall else ""

    # -- quorum --------------------------------------------------------------------------
    # spec.desiredReplicas may ask for fewer replicas than the policy's writeQuorum: then the
    # quorum is every replica, not a number no write could ever reach
    quorum = write_quorum = min(policy.write_quorum, intent.desired_replicas)
    if policy.mode is Mode.SYNCHRONOUS:
        live = sum(1 for n in layout.replicas if n in alive)
        if live < write_quorum:
            if policy.on_quorum_loss == "Continue":
                write_quorum = max(1, live)
                if write_quorum < quorum:
                    layout = replace(layout, quorum_lowered_epoch=layout.epoch)
            problem = problem or (f"only {live} of {len(layout.replicas)} replicas are live, "
                                  f"below writeQuorum {quorum}"
                                  + (": writes continue with the live ones"
                                     if policy.on_quorum_loss == "Continue"
                                     else ": writes are frozen until one returns"))

    # -- 5. actions ----------------------------------------------------------------------
    spec_hash = fingerprint(layout, write_quorum)
    if layout.primary in alive:
        report = reports.get(layout.primary)
        if report is not None and (report.role != "primary" or report.epoch < layout.epoch
                                   or report.fenced):
            actions.append(Action(ActionKind.PROMOTE, layout.primary, layout.epoch))
    for node in layout.replicas:
        if node not in alive:
            continue
        report = reports.get(node)
        if report is None or report.spec_hash != spec_hash or report.epoch < layout.epoch \
                or report.primary != layout.primary:
            actions.append(Action(ActionKind.APPLY, node, layout.epoch))
    if layout.primary in alive and layout.primary in reports:
        # data leaves a node only while a live primary holds the volume: with the primary gone
        # (failover blocked) or not created yet, a replica outside the layout may be the only
        # copy anyone can reach
        for node in sorted(reports):
            if node not in layout.replicas and node in alive:
                actions.append(Action(ActionKind.REMOVE, node))
    # PROMOTE is only planned for a primary that already holds the volume (it reported), so
    # the order below never promotes a replica that does not exist yet
    order = {ActionKind.SYNC_NOW: 0, ActionKind.PROMOTE: 1, ActionKind.APPLY: 2,
             ActionKind.REMOVE: 3}
    actions.sort(key=lambda a: (order[a.kind], a.node != layout.primary, a.node))
    return Plan(layout=layout, actions=tuple(actions), events=tuple(events), problem=problem,
                problem_reason="InsufficientNodes" if placement.shortfall else
                ("QuorumLost" if problem else ""), write_quorum=write_quorum)


def replica_states(layout: Layout, reports: Mapping[str, Report],
                   down_for: Mapping[str, float],
                   primary_view: Mapping[str, ReplicaState]) -> dict[str, ReplicaState]:
    """The state shown for each replica: the primary's view where it has one, Stale for replicas
    whose agent is gone, Rebuilding for a replica that does not exist yet.

    A live agent whose report is missing for a moment (a status call that failed, a busy
    node) keeps the state last seen: this status is what the next operator (or this one,
    after its primary died) remembers as the primary's last view, and a replica wrongly shown
    Rebuilding there could never be promoted.
    """
    states: dict[str, ReplicaState] = {}
    for node in layout.replicas:
        if node in down_for:
            states[node] = ReplicaState.STALE
        elif node not in reports:
            states[node] = primary_view.get(node, ReplicaState.REBUILDING)
        elif node == layout.primary:
            report = reports[node]
            states[node] = ReplicaState.FAILED if report.fenced else ReplicaState.IN_SYNC
        else:
            states[node] = primary_view.get(node, ReplicaState.REBUILDING)
    return states
