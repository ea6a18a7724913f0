"""Reconcile one SharedVolume: plan (pure, in core), persist the layout, call agents, report.

The order matters for safety. The layout (replica nodes, primary, epoch) is written to the
SharedVolume's status *before* any agent is told about it, so an operator killed halfway
restarts from the same decision instead of making a second, different one (two primaries at
the same epoch would be the worst outcome of all). A planned switchover syncs the old primary
*before* the new layout is written, so a failed sync leaves everything as it was.
"""

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import structlog

from replication_agent.proto import agent_pb2 as pb
from sharedsync.core.errors import InvalidArgument
from sharedsync.core.ids import check_id
from sharedsync.core.placement import NodeView
from sharedsync.core.policy import Mode, Policy, policy_from_spec
from sharedsync.core.quantity import parse_bytes
from sharedsync.core.replica_state import ReplicaState
from sharedsync.core.sizes import MIN_VOLUME_BYTES, align_up
from sharedsync.core.volume_plan import (
    ActionKind,
    Event,
    Intent,
    Layout,
    Plan,
    Replication,
    Report,
    consumer_switchover,
    plan_volume,
    replica_states,
    spec_fingerprint,
)

from . import conditions as cond
from .agents import Agents
from .kube import SHARED_VOLUMES, SYNC_POLICIES, Kube
from .metrics import AGENT_CALL_ERRORS
from .snapshots import content_source

log = structlog.get_logger(__name__)

SYNC_NOW = "sharedsync.io/sync-now"
#: Held by a SyncPolicy while volumes use it (the operator's handlers remove it when unused).
IN_USE_FINALIZER = "sharedsync.io/in-use"
SWITCHOVER = "sharedsync.io/switchover"
REBUILD = "sharedsync.io/rebuild"

_MODES = {Mode.SYNCHRONOUS: pb.SYNCHRONOUS, Mode.ASYNCHRONOUS: pb.ASYNCHRONOUS,
          Mode.SCHEDULED: pb.SCHEDULED}
_STATES = {pb.IN_SYNC: ReplicaState.IN_SYNC, pb.LAGGING: ReplicaState.LAGGING,
           pb.REBUILDING: ReplicaState.REBUILDING, pb.STALE: ReplicaState.STALE,
           pb.FAILED: ReplicaState.FAILED}

EmitEvent = Callable[[str, str, str], None]


@dataclass
class VolumeMemory:
    """What the operator remembers about a volume between reconciles (in memory only: losing
    it on restart costs at most a repeated event)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_warnings: set[tuple[str, str]] = field(default_factory=set)
    #: The layout this operator wrote last. A reconcile can start from a body read before
    #: that write landed (a timer and a change handler in a row); the leader's own last
    #: write is never older than what it reads back, so it wins over a stale body.
    layout: Layout | None = None


def agent_policy(policy: Policy, write_quorum: int) -> pb.VolumePolicy:
    """The Agent API's view of a SyncPolicy."""
    return pb.VolumePolicy(
        mode=_MODES[policy.mode], replicas=policy.replicas, write_quorum=write_quorum,
        max_lag_seconds=policy.max_lag_seconds,
        on_lag_exceeded=pb.THROTTLE if policy.on_lag_exceeded == "Throttle" else pb.ALERT,
        schedule=policy.schedule, manual_trigger=policy.manual_trigger, paused=policy.paused,
        bandwidth_bytes_per_second=policy.bandwidth_bytes_per_second, priority=policy.priority,
        rebuild_bandwidth_bytes_per_second=policy.rebuild_bandwidth_bytes_per_second,
        conflict_resolution=pb.KEEP_BOTH if policy.conflict_resolution == "KeepBoth"
        else pb.LAST_WRITER_WINS,
        scrub_interval_seconds=policy.scrub_interval_seconds, auto_repair=policy.auto_repair)


def multi_writer(spec: Mapping[str, Any]) -> bool:
    """A ReadWriteMany filesystem volume may be written on several nodes at once: every replica
    is writable and the agents merge file-level changes (the policy's conflictResolution)."""
    return ("ReadWriteMany" in (spec.get("accessModes") or ())
            and (spec.get("volumeMode") or "Filesystem") == "Filesystem")


def volume_spec(volume_id: str, size: int, kind: str, policy: Policy, layout: Layout,
                write_quorum: int, addresses: Mapping[str, str],
                content: pb.ContentSource | None = None, *,
                many_writers: bool = False) -> pb.VolumeSpec:
    """The spec every replica of the volume gets, with its revision (a fingerprint of it)."""
    spec = pb.VolumeSpec(
        volume_id=volume_id, size_bytes=size, kind=kind,
        policy=agent_policy(policy, write_quorum), replica_nodes=list(layout.replicas),
        primary_node=layout.primary, epoch=layout.epoch,
        peer_addresses={n: addresses[n] for n in layout.replicas if n in addresses},
        content_source=content, multi_writer=many_writers,
        file_level=layout.replication is Replication.FILES and not many_writers)
    spec.revision = spec_fingerprint({"spec": spec.SerializeToString(deterministic=True).hex()})
    return spec


def report_of(node: str, status: pb.VolumeStatus) -> Report:
    peers = {r.node: _STATES.get(r.state, ReplicaState.REBUILDING) for r in status.replicas
             if r.node != node} if status.role == "primary" else {}
    return Report(node=node, role=status.role, epoch=status.epoch,
                  primary=status.primary_node, fenced=status.fenced,
                  spec_hash=status.spec_revision,
                  last_received=(status.last_snapshot.epoch, status.last_snapshot.seq),
                  journal_records=status.journal_records,
                  peer_states=peers, attached=status.attached,
                  attach_wanted=status.attach_wanted)


def layout_from_status(status: Mapping[str, Any]) -> Layout:
    replicas = tuple(str(r["node"]) for r in status.get("replicas") or () if r.get("node"))
    return Layout(replicas=replicas, primary=str(status.get("primary") or ""),
                  epoch=int(status.get("epoch") or 0),
                  quorum_lowered_epoch=int(status.get("quorumLoweredAtEpoch") or 0),
                  replication=_replication(status.get("replication")))


def layout_to_status(layout: Layout) -> dict[str, Any]:
    """The status fields :func:`layout_from_status` reads back (the replica list aside, which
    the status also fills with each replica's state)."""
    return {"primary": layout.primary, "epoch": layout.epoch,
            "quorumLoweredAtEpoch": layout.quorum_lowered_epoch,
            "replication": str(layout.replication)}


def _replication(value: object) -> Replication:
    """Absent for volumes placed before it was recorded: they all ship snapshots."""
    try:
        return Replication(str(value)) if value else Replication.SNAPSHOTS
    except ValueError:
        return Replication.SNAPSHOTS


def _view_from_status(status: Mapping[str, Any]) -> dict[str, ReplicaState]:
    view = {}
    for entry in status.get("replicas") or ():
        try:
            view[str(entry["node"])] = ReplicaState(entry.get("state", ""))
        except ValueError:
            continue
    return view


def _duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _rfc3339(unix_ns: int) -> str | None:
    if unix_ns <= 0:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_ns / 1e9))


@dataclass
class VolumeReconciler:
    """Everything a SharedVolume reconcile needs besides the object itself."""

    kube: Kube
    agents: Agents
    memory: dict[str, VolumeMemory] = field(default_factory=dict)
    #: The operator's view of SharedVolumes and SharedVolumeSnapshots (shared with the
    #: handlers' Runtime): where a new volume's content source is held.
    known_volumes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    known_snapshots: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def forget(self, name: str) -> None:
        self.memory.pop(name, None)

    async def reconcile(self, body: Mapping[str, Any], policies: Mapping[str, Mapping[str, Any]],
                        nodes: Sequence[NodeView], emit: EmitEvent) -> None:
        name = body["metadata"]["name"]
        memory = self.memory.setdefault(name, VolumeMemory())
        async with memory.lock:
            await self._reconcile(body, policies, nodes, emit, memory)

    def _warn_once(self, memory: VolumeMemory, emit: EmitEvent, event: Event) -> None:
        key = (event.reason, event.message)
        if event.type == "Warning":
            if key in memory.last_warnings:
                return
            memory.last_warnings.add(key)
        emit(event.type, event.reason, event.message)

    async def _not_ready(self, name: str, status: Mapping[str, Any], generation: int, reason: str,
                         message: str, memory: VolumeMemory, emit: EmitEvent) -> None:
        self._warn_once(memory, emit, Event("Warning", reason, message))
        conditions = cond.set_condition(status.get("conditions"), cond.READY, False,
                                        reason=reason, message=message, generation=generation)
        patch = {"conditions": conditions, "observedGeneration": generation,
                 "phase": str(status.get("phase") or "Pending")}
        if _changed(status, patch):
            await self.kube.patch_status(SHARED_VOLUMES, name, patch)

    async def _reconcile(self, body: Mapping[str, Any],
                         policies: Mapping[str, Mapping[str, Any]], nodes: Sequence[NodeView],
                         emit: EmitEvent, memory: VolumeMemory) -> None:
        metadata = body["metadata"]
        name = str(metadata["name"])
        generation = int(metadata.get("generation") or 0)
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        annotations = metadata.get("annotations") or {}

        try:
            check_id(name, "metadata.name")
        except InvalidArgument as exc:
            await self._not_ready(name, status, generation, "InvalidName",
                                  f"{exc}: SharedVolumes are named by the CSI controller after "
                                  "the volume id", memory, emit)
            return
        policy_name = str(spec.get("policy") or "")
        policy_body = policies.get(policy_name)
        if policy_body is None:
            await self._not_ready(name, status, generation, "PolicyNotFound",
                                  f"SyncPolicy {policy_name!r} does not exist", memory, emit)
            return
        try:
            policy = policy_from_spec(policy_body.get("spec") or {}, name=policy_name)
            # a replica is never smaller than the replica store's minimum (as CreateVolume
            # rounds it), so a hand-made small SharedVolume still gets a usable replica
            size = align_up(max(parse_bytes(spec.get("capacity", 0)), MIN_VOLUME_BYTES))
        except InvalidArgument as exc:
            await self._not_ready(name, status, generation, "InvalidPolicy",
                                  f"SyncPolicy {policy_name}: {exc}", memory, emit)
            return
        if IN_USE_FINALIZER not in (policy_body.get("metadata", {}).get("finalizers") or ()) \
                and not policy_body.get("metadata", {}).get("deletionTimestamp"):
            # before any replica exists: the policy must not be deleted under its volume
            await self.kube.set_finalizer(SYNC_POLICIES, policy_name, IN_USE_FINALIZER, True)
        kind = "block" if spec.get("volumeMode") == "Block" else "filesystem"
        desired = int(spec.get("desiredReplicas") or policy.replicas)
        old_layout = memory.layout or layout_from_status(status)
        # one moment's agent liveness for the content source, the node views and down_for
        # (nothing below awaits before they are all taken): a Lease renewal seen between two
        # of them made a replica neither alive nor gone, and placement dropped it as if it
        # were stale
        alive = self.agents.alive()
        content, holder, waiting = content_source(spec, self.known_volumes,
                                                  self.known_snapshots, alive)
        if waiting and not old_layout.placed:
            await self._not_ready(name, status, generation, "SourceNotReady",
                                  f"content source: {waiting}", memory, emit)
            return
        statuses = self.agents.volume_reports(name)
        reports = {node: report_of(node, s) for node, s in statuses.items()}
        switchover_to = annotations.get(SWITCHOVER) or None
        following_consumer = False
        if switchover_to is None and not multi_writer(spec):
            switchover_to = consumer_switchover(old_layout, reports)
            following_consumer = switchover_to is not None
            following = ("FollowingConsumer",
                         f"a pod on {switchover_to} waits for the volume: moving the primary "
                         "there")
            if switchover_to is not None and following not in memory.last_warnings:
                memory.last_warnings.add(following)
                emit("Normal", *following)
        intent = Intent(volume_id=name, size_bytes=size, policy=policy, desired_replicas=desired,
                        consumer=spec.get("consumerNode") or None,
                        switchover_to=switchover_to, prefer=holder,
                        multi_writer=multi_writer(spec))
        # the caller's node views are from before this reconcile awaited anything
        nodes = [replace(n, agent_alive=n.name in alive) for n in nodes]
        down_for = self.agents.down_for(
            {n.name for n in nodes} | set(old_layout.replicas), alive)
        addresses = self.agents.addresses()

        def fingerprint(layout: Layout, quorum: int) -> str:
            return volume_spec(name, size, kind, policy, layout, quorum, addresses,
                               content, many_writers=multi_writer(spec)).revision

        plan = plan_volume(intent, old_layout, nodes, reports, down_for,
                           last_primary_view=_view_from_status(status), fingerprint=fingerprint)
        for event in plan.events:
            self._warn_once(memory, emit, event)
        if not plan.layout.placed:
            await self._not_ready(name, status, generation, plan.problem_reason or "Pending",
                                  plan.problem or "no node can hold a replica", memory, emit)
            return

        switched = False
        for action in plan.actions:
            if action.kind is not ActionKind.SYNC_NOW:
                continue
            # the old primary ships everything before the new layout exists anywhere; when
            # following a pod, it refuses if pods on its node started using the volume since
            # its last report (and takes no new ones until the move is done)
            deferred = Event("Normal", "SwitchoverDeferred",
                             f"the primary stays on {action.node} while a pod there uses the "
                             "volume") if following_consumer else None
            if not await self._call(emit, "SyncNow", action.node, self.agents.sync_now(
                    action.node, name,
                    handover_to=(switchover_to or "") if following_consumer else ""),
                    refused=deferred):
                return
            switched = True
        if plan.layout != old_layout:
            layout_status = {
                **layout_to_status(plan.layout),
                "replicas": _replica_entries(plan, status, reports, down_for, statuses),
            }
            if not await self.kube.patch_status(SHARED_VOLUMES, name, layout_status):
                return
            memory.layout = plan.layout
        spec_message = volume_spec(name, size, kind, policy, plan.layout, plan.write_quorum,
                                   addresses, content, many_writers=multi_writer(spec))
        for action in plan.actions:
            if action.kind is ActionKind.PROMOTE:
                if not await self._call(emit, "Promote", action.node,
                                        self.agents.promote(action.node, name, action.epoch)):
                    break
            elif action.kind is ActionKind.APPLY:
                await self._call(emit, "Apply", action.node,
                                 self.agents.apply(action.node, spec_message))
            elif action.kind is ActionKind.REMOVE:
                await self._call(emit, "Remove", action.node,
                                 self.agents.remove(action.node, name))
        if switched:
            await self.kube.remove_annotation(SHARED_VOLUMES, name, SWITCHOVER)

        sync_now = annotations.get(SYNC_NOW)
        last_sync_now = status.get("lastSyncNow")
        if sync_now and sync_now != last_sync_now and plan.layout.primary in statuses \
                and await self._call(emit, "SyncNow", plan.layout.primary,
                                     self.agents.sync_now(plan.layout.primary, name)):
            emit("Normal", "Synced", f"sync-now {sync_now!r} done")
            last_sync_now = sync_now
            await self.kube.patch_status(SHARED_VOLUMES, name, {"lastSyncNow": sync_now})
            await self.kube.remove_annotation(SHARED_VOLUMES, name, SYNC_NOW)

        rebuild = annotations.get(REBUILD)
        if rebuild:
            await self._rebuild(name, rebuild, plan.layout, spec_message, emit)

        statuses = self.agents.volume_reports(name)
        reports = {node: report_of(node, s) for node, s in statuses.items()}
        final = _volume_status(plan, status, reports, down_for, statuses, generation, policy,
                               desired)
        if last_sync_now:
            final["lastSyncNow"] = last_sync_now
        for event in _transitions(status, final, policy.mode):
            self._warn_once(memory, emit, event)
        if _changed(status, final):
            await self.kube.patch_status(SHARED_VOLUMES, name, final)
        if final["phase"] == "Ready":
            memory.last_warnings.clear()  # the next trouble is news again

    async def _rebuild(self, name: str, node: str, layout: Layout, spec: pb.VolumeSpec,
                       emit: EmitEvent) -> None:
        """Day-2 ``sharedsync.io/rebuild: <node>``: throw that replica away and copy it afresh
        from the primary (after a disk was replaced, or to clear a damage a scrub could not).
        Never the primary (switch over first), never a replica whose agent is down."""
        if node == layout.primary or node not in layout.replicas \
                or node not in self.agents.alive():
            emit("Warning", "RebuildRefused",
                 f"rebuild {node}: only a live replica other than the primary "
                 f"({layout.primary}) can be rebuilt")
            await self.kube.remove_annotation(SHARED_VOLUMES, name, REBUILD)
            return
        if await self._call(emit, "Remove", node, self.agents.remove(node, name)) and \
                await self._call(emit, "Apply", node, self.agents.apply(node, spec)) and \
                await self._call(emit, "Resync", layout.primary, self.agents.resync(
                    layout.primary, name, node, "rebuild requested by sharedsync.io/rebuild")):
            emit("Normal", "RebuildStarted", f"replica on {node} dropped; rebuilding it from "
                                             f"{layout.primary}")
            await self.kube.remove_annotation(SHARED_VOLUMES, name, REBUILD)

    async def _call(self, emit: EmitEvent, what: str, node: str, call: Any,
                    refused: Event | None = None) -> bool:
        """Await an agent call; False (with a Warning event) if it failed. ``refused`` is the
        event to say instead when the agent refuses on purpose (FAILED_PRECONDITION)."""
        try:
            await call
        except (grpc.aio.AioRpcError, LookupError) as exc:
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "NO_AGENT"
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            if refused is not None and code == "FAILED_PRECONDITION":
                log.info("agent refused", call=what, node=node, detail=detail)
                emit(refused.type, refused.reason, refused.message)
                return False
            AGENT_CALL_ERRORS.labels(what, code).inc()
            log.warning("agent call failed", call=what, node=node, code=code, detail=detail)
            emit("Warning", "AgentCallFailed", f"{what} on {node}: {code}: {detail}"[:1000])
            return False
        return True

    async def delete(self, name: str, emit: EmitEvent) -> None:
        """Remove every replica a live agent holds; agents that are down are cleaned by the
        orphan sweep when they return (see ``handlers._sweep_orphans``).

        Every live agent is asked, not only those whose last report showed the volume: that
        report is a few seconds old (a replica being created, or a status poll that failed),
        and once the finalizer is gone nothing but the sweep would find what it missed, which
        an uninstall right after never runs. RemoveVolume of a volume an agent does not hold
        is a no-op.
        """
        holders = sorted(set(self.agents.volume_reports(name)) | self.agents.alive())
        results = await asyncio.gather(*(self._call(emit, "Remove", node,
                                                    self.agents.remove(node, name))
                                         for node in holders))
        if not all(results):
            raise RuntimeError(f"could not remove every replica of {name}; retrying")
        self.forget(name)


def _replica_entries(plan: Plan, status: Mapping[str, Any], reports: Mapping[str, Report],
                     down_for: Mapping[str, float],
                     statuses: Mapping[str, pb.VolumeStatus]) -> list[dict[str, Any]]:
    view = dict(_view_from_status(status))
    primary_status = statuses.get(plan.layout.primary)
    details: dict[str, pb.ReplicaStatus] = {}
    if primary_status is not None and primary_status.role == "primary":
        for replica in primary_status.replicas:
            details[replica.node] = replica
            view[replica.node] = _STATES.get(replica.state, ReplicaState.REBUILDING)
    states = replica_states(plan.layout, reports, down_for, view)
    entries = []
    for node in plan.layout.replicas:
        entry: dict[str, Any] = {
            "node": node, "role": "primary" if node == plan.layout.primary else "replica",
            "state": str(states[node]), "lagSeconds": 0.0, "rebuildProgress": 0.0,
            "message": ""}
        detail = details.get(node)
        if detail is not None:
            entry["lagSeconds"] = round(detail.lag_seconds, 1)
            entry["rebuildProgress"] = round(detail.rebuild_progress, 2)
            entry["message"] = detail.message[:1000]
            synced = _rfc3339(detail.last_sync_unix_ns)
            if synced:
                entry["lastSyncTime"] = synced
        elif node in down_for:
            entry["message"] = f"agent gone for {down_for[node]:.0f}s"
        entries.append(entry)
    return entries


def _volume_status(plan: Plan, status: Mapping[str, Any], reports: Mapping[str, Report],
                   down_for: Mapping[str, float], statuses: Mapping[str, pb.VolumeStatus],
                   generation: int, policy: Policy, desired: int) -> dict[str, Any]:
    entries = _replica_entries(plan, status, reports, down_for, statuses)
    healthy = [e for e in entries if e["state"] in (ReplicaState.IN_SYNC, ReplicaState.LAGGING)]
    in_sync = [e for e in entries if e["state"] == ReplicaState.IN_SYNC]
    primary = statuses.get(plan.layout.primary)
    serving = primary is not None and primary.role == "primary" and not primary.fenced \
        and primary.epoch == plan.layout.epoch
    lag = max((e["lagSeconds"] for e in entries), default=0.0)
    ready = serving and len(healthy) >= desired and not plan.problem
    degraded = serving and len(healthy) < desired
    if not serving:
        reason, message = "PrimaryUnavailable", (
            f"primary {plan.layout.primary} is not serving epoch {plan.layout.epoch} yet")
    elif plan.problem:
        reason, message = plan.problem_reason or "Degraded", plan.problem
    elif len(healthy) < desired:
        reason, message = "ReplicasNotReady", (
            f"{len(healthy)} of {desired} replicas are in sync or catching up")
    else:
        reason, message = "ReplicasReady", f"{len(healthy)} of {desired} replicas healthy"
    conditions = cond.set_condition(status.get("conditions"), cond.READY, ready, reason=reason,
                                    message=message, generation=generation)
    if plan.problem or degraded:
        degraded_reason = plan.problem_reason or "ReplicasNotReady"
        degraded_message = plan.problem or message
    elif serving:
        degraded_reason, degraded_message = "AsExpected", "every replica is healthy"
    else:
        degraded_reason, degraded_message = "NotServing", "no replica serves the volume yet"
    conditions = cond.set_condition(
        conditions, cond.DEGRADED, degraded or bool(plan.problem), reason=degraded_reason,
        message=degraded_message, generation=generation)
    all_synced = len(in_sync) == len(entries) >= desired
    conditions = cond.set_condition(
        conditions, cond.SYNCED, all_synced,
        reason="AllInSync" if all_synced else "NotAllInSync",
        message=f"{len(in_sync)} of {len(entries)} replicas in sync"
        + (f" (lag {_duration_text(lag)})" if lag else ""), generation=generation)
    phase = "Ready" if ready else ("Degraded" if serving else "Placing")
    result: dict[str, Any] = {
        "observedGeneration": generation, "phase": phase, "mode": str(policy.mode),
        **layout_to_status(plan.layout), "replicas": entries, "readyReplicas": len(healthy),
        "desiredReplicas": desired, "replicasReady": f"{len(healthy)}/{desired}",
        "lag": _duration_text(lag), "lagSeconds": lag, "conditions": conditions,
    }
    if primary is not None:
        result.update({
            "syncLatency": {"p50Seconds": round(primary.sync_latency_p50_seconds, 3),
                            "p90Seconds": round(primary.sync_latency_p90_seconds, 3),
                            "p99Seconds": round(primary.sync_latency_p99_seconds, 3)},
            "bytesShipped": primary.bytes_shipped, "conflicts": primary.conflicts,
            "snapshotBytes": primary.snapshot_bytes})
    return result


def _transitions(old: Mapping[str, Any], new: Mapping[str, Any], mode: Mode) -> list[Event]:
    """Events for replica state changes worth a human's attention (rebuild done, lag).

    Lag is worth one only in Asynchronous mode, where Lagging means behind by more than maxLag;
    a Synchronous replica shows Lagging whenever a write is in flight to it, every second.
    """
    before = {e.get("node"): e.get("state") for e in old.get("replicas") or ()}
    events = []
    for entry in new.get("replicas") or ():
        was, now = before.get(entry["node"]), entry["state"]
        if was == ReplicaState.REBUILDING and now == ReplicaState.IN_SYNC \
                and entry["role"] != "primary":
            events.append(Event("Normal", "RebuildCompleted",
                                f"replica on {entry['node']} is in sync"))
        elif was == ReplicaState.IN_SYNC and now == ReplicaState.LAGGING \
                and mode is Mode.ASYNCHRONOUS:
            events.append(Event("Warning", "LagExceeded",
                                f"replica on {entry['node']} lags by {entry['lagSeconds']}s"))
    conflicts = int(new.get("conflicts") or 0) - int(old.get("conflicts") or 0)
    if conflicts > 0 and "conflicts" in old:
        events.append(Event("Warning", "Conflict",
                            f"{conflicts} concurrent write conflict(s) on the same file were "
                            f"resolved ({new.get('conflicts')} in total)"))
    return events


def _changed(status: Mapping[str, Any], patch: Mapping[str, Any]) -> bool:
    return any(status.get(key) != value for key, value in patch.items())
