"""One volume's replica on this node: the primary's sync loop, or a replica's receiving end.

The primary takes a read-only snapshot of ``live`` whenever it changed and the mode says it is
time (continuously for Asynchronous, on the cron schedule for Scheduled, on every fsync group
for Synchronous) and tells each :class:`PeerLink` that this snapshot is now *wanted*. A link ships
the newest wanted snapshot to its peer as an increment from the newest snapshot both hold (full
only when there is none), one push at a time, retrying with backoff; what a peer acknowledged is
what lag, quorum and retention are computed from.

A replica only receives: it refuses a stream from an older epoch (fencing), adopts a newer
epoch (a failover happened elsewhere, so it is no longer primary), and applies each stream
atomically. Promotion turns the newest complete snapshot into ``live`` at a new epoch.

A multi-writer volume (``spec.multi_writer``, ReadWriteMany on several nodes) has none of this:
every replica is writable, and :class:`~replication_agent.multiwriter.MultiWriter` merges file
changes between them with version vectors. Its "primary" is only the coordinator that the
operator asks first for sync-now and CSI snapshots; epochs and promotion move that role and
nothing else.

A replica on the ext4 fallback store (a node whose kernel has no btrfs) has no snapshots to
send either, so every filesystem volume there replicates the same file-level way
(:attr:`VolumeEngine.file_level`), whether one node writes it or several.
"""

import asyncio
import contextlib
import datetime
import enum
import errno
import json
import math
import os
import shutil
import time
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from sharedsync import failpoints
from sharedsync.core.audit_chain import AuditKind
from sharedsync.core.commit_quorum import (
    COMMIT_TIMEOUT_SECONDS,
    stream_now,
    streams_well,
    write_quorum,
)
from sharedsync.core.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from sharedsync.core.framing import NEVER_COMPRESS, CompressionPolicy, FrameDecoder
from sharedsync.core.isolation import Isolation, isolation_action
from sharedsync.core.replica_state import (
    AckReceived,
    Event,
    IllegalTransition,
    LagExceeded,
    PeerUnreachable,
    RebuildFinished,
    RebuildProgress,
    RebuildStarted,
    ReplicaError,
    ReplicaState,
    StaleTimeout,
    classify_lag,
    transition,
)
from sharedsync.core.schedule import next_after
from sharedsync.core.snapshot_plan import InFlight, Snapshot, SnapshotPlan
from sharedsync.core.token_bucket import TokenBucket
from sharedsync.storage import btrfs
from sharedsync.storage.files import atomic_write
from sharedsync.storage.replicas import ReplicaStore, StoreFilesystem, VolumeKind
from sharedsync.tasks import cancel_and_wait, wait_event

from . import metrics
from .audit import AuditLog
from .fuse import FuseServer
from .journal import (
    JournalBase,
    JournalChannel,
    JournalLog,
    JournalWriter,
    Prepared,
    check_relative,
    sealed,
)
from .lineage import Lineage, SnapRef
from .multiwriter import MultiWriter
from .peers import PeerPool
from .proto import agent_pb2 as pb
from .qos import NodeBandwidth
from .shared_streams import SharedStreams, StreamKey, replay
from .spool import Spool
from .throttle import hold_writer
from .transfer import (
    Outgoing,
    frame_of,
    receive_snapshot,
    ref_message,
    ref_of,
    snapshot_ref,
    stream_snapshot,
)

log = structlog.get_logger(__name__)

#: Longest wait between retries of a failing peer.
MAX_BACKOFF_SECONDS = 5.0
#: A peer unreachable this long is reported Stale (the operator may replace it).
STALE_AFTER_SECONDS = 30.0
#: Longest an fsync or close is held back by onLagExceeded: Throttle.
THROTTLE_MAX_WAIT_SECONDS = 30.0
#: Sync latencies kept for the P50/P90/P99 in status.
LATENCY_WINDOW = 1024
#: How long an Attach refused here (another node is primary) keeps ``attach_wanted`` up:
#: longer than kubelet's longest backoff between mount retries (about 2 minutes).
ATTACH_WANTED_SECONDS = 180.0
#: How long a primary that agreed to hand over (SyncNow with ``handover``) refuses new Attach
#: calls: the operator promotes the new primary right after; if it never does (it died), pods
#: here can use the volume again after this.
HANDOVER_SECONDS = 60.0
#: Consecutive non-network push failures after which a replica is Failed (and rebuilt).
ERRORS_BEFORE_FAILED = 5
#: Complete snapshots a replica keeps (the newest is the next parent; one more covers a lost ack).
REPLICA_KEEP = 2
#: How long a journal record may take to reach the write quorum before the fsync commits
#: through a snapshot instead (a peer that is slow or gone must not hold fsync for long).
JOURNAL_TIMEOUT_SECONDS = 2.0
#: Journal records on the way to one peer at most; beyond, it leaves the session (see
#: ``VolumeEngine.journal_commit``), so a slow peer costs bounded memory.
JOURNAL_MAX_PENDING = 8
#: A Synchronous volume's peer beyond the write quorum waits for the quorum's streams of a
#: change (see ``sharedsync.core.commit_quorum.streams_well``) at most this long.
TURN_MAX_SECONDS = 5.0
#: Pushes smaller than this say little about a link's rate (mostly round trips and syncfs).
RATE_MIN_BYTES = 8 * 1024 * 1024
#: How often a waiting peer looks at the quorum's streams.
TURN_POLL_SECONDS = 0.05


def _rate(spec: pb.VolumeSpec) -> float:
    return float(spec.policy.bandwidth_bytes_per_second) or math.inf


def _burst(spec: pb.VolumeSpec) -> float:
    """A tenth of a second of traffic, within [1 MiB, 4 MiB]: frames fit, the cap holds."""
    rate = spec.policy.bandwidth_bytes_per_second
    return float(min(4 << 20, max(1 << 20, rate // 10))) if rate else float(4 << 20)


def _order(ref: SnapRef) -> int:
    """A single sortable number for (epoch, seq), as the snapshot plan wants."""
    return (ref.epoch << 40) | ref.seq


STATE_TO_PROTO = {
    ReplicaState.IN_SYNC: pb.IN_SYNC, ReplicaState.LAGGING: pb.LAGGING,
    ReplicaState.REBUILDING: pb.REBUILDING, ReplicaState.STALE: pb.STALE,
    ReplicaState.FAILED: pb.FAILED,
}


class Role(enum.StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


@dataclass
class PersistedState:
    """What survives a restart: the spec as last applied, the epoch and the role, the peers
    this primary placed a replica on that has not held any of the volume yet, and the peers
    whose replica failed and has not been rebuilt since."""

    spec: pb.VolumeSpec
    epoch: int
    role: Role
    primary: str
    fenced: bool = False
    awaiting_copy: frozenset[str] = frozenset()
    failed: frozenset[str] = frozenset()
    #: Why this primary's writes are suspended (empty: they are not); see
    #: sharedsync.core.isolation. Kept so that a restart does not take writes it must not.
    suspended: str = ""
    #: When pods here lost the volume (it stopped being served here: fenced or demoted) and
    #: have not unmounted it since, Unix ns; 0: none (VolumeStatus.consumers_stranded_unix_ns).
    stranded_ns: int = 0

    def to_json(self) -> bytes:
        return json.dumps({
            "spec": json_format.MessageToDict(self.spec), "epoch": self.epoch,
            "role": str(self.role), "primary": self.primary, "fenced": self.fenced,
            "awaitingCopy": sorted(self.awaiting_copy), "failedReplicas": sorted(self.failed),
            "writesSuspended": self.suspended, "consumersStrandedAt": self.stranded_ns,
        }, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "PersistedState":
        raw = json.loads(data)
        spec = json_format.ParseDict(raw["spec"], pb.VolumeSpec())
        return cls(spec=spec, epoch=int(raw["epoch"]), role=Role(raw["role"]),
                   primary=str(raw["primary"]), fenced=bool(raw.get("fenced", False)),
                   awaiting_copy=frozenset(map(str, raw.get("awaitingCopy", ()))),
                   failed=frozenset(map(str, raw.get("failedReplicas", ()))),
                   suspended=str(raw.get("writesSuspended", "")),
                   stranded_ns=int(raw.get("consumersStrandedAt", 0)))


class PeerLink:
    """Ships snapshots of one volume to one peer, newest wanted first, one push at a time."""

    def __init__(self, engine: "VolumeEngine", node: str, *, placed: bool = False,
                 failed: bool = False) -> None:
        self.engine = engine
        self.node = node
        self.acked: SnapRef | None = None
        self.known = False  # whether `acked` reflects the peer's holdings
        self.partial: tuple[SnapRef, int] | None = None
        self.wanted: SnapRef | None = None
        self.in_flight: SnapRef | None = None
        #: A replica this primary placed (a new volume, a node added to it) holds nothing
        #: until its first copy arrived, across restarts of this agent too: it is Rebuilding
        #: from the start (see VolumeEngine.awaiting_copy). Shown Lagging (healthy) until its
        #: full stream began, it made a volume Ready, and CreateVolume return, before any
        #: replica had its data, and it could be promoted with nothing in it. Any other link
        #: (this node was promoted, say) starts Lagging: not confirmed until the first
        #: acknowledgement, and not wrongly Rebuilding in the status the operator remembers
        #: (a replica shown Rebuilding is never promoted). A replica that failed and was not
        #: rebuilt since (VolumeEngine.failed_replicas) starts Failed: what it holds counts
        #: for nothing until a full rebuild, across restarts of this agent too.
        self.state = ReplicaState.FAILED if failed else (
            ReplicaState.REBUILDING if placed else ReplicaState.LAGGING)
        self.errors = 0  # consecutive failures that were not the network
        self.message = ""
        self.failures = 0
        self.unreachable_since: float | None = None
        self.last_sync_ns = 0
        self.rebuild_progress = 0.0
        #: The snapshot the current rebuild brings the peer to (None: not rebuilding). Until
        #: the peer holds it or a newer one, the snapshots it held before count for nothing.
        self.rebuilding_to: SnapRef | None = None
        #: When the current push last sent a frame (its start, before the first).
        self.progressed_at = 0.0
        #: Bytes per second of the recent pushes that moved at least ``RATE_MIN_BYTES``
        #: (a moving average; 0 until one did).
        self.rate = 0.0
        self._wake = asyncio.Event()
        self._acked_changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.journal = JournalChannel(lambda: engine.peers.stub(node))
        self.journal_pending = 0  # records on the way to this peer
        self.journal_out = 0  # the writer session this peer was left out of (0: none)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"peer-{self.node}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        self.journal.close()

    def event(self, event: Event) -> None:
        """Feed the replica state machine (sharedsync.core.replica_state)."""
        try:
            self.state = transition(self.state, event)
        except IllegalTransition:
            log.debug("ignored replica event", volume_id=self.engine.volume_id, peer=self.node,
                      state=str(self.state), replica_event=str(event.kind))

    def want(self, ref: SnapRef | None) -> None:
        if ref is not None and (self.wanted is None or ref > self.wanted):
            self.wanted = ref
        self._wake.set()

    def has(self, ref: SnapRef) -> bool:
        return self.acked is not None and self.acked >= ref

    async def wait_for(self, ref: SnapRef) -> None:
        async with self._acked_changed:
            await self._acked_changed.wait_for(lambda: self.has(ref))

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.wanted is not None and not self.has(self.wanted):
                try:
                    await self._ship()
                    self.failures = 0
                    self.unreachable_since = None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure is retried with backoff
                    await self._failed(exc)
                    await asyncio.sleep(min(MAX_BACKOFF_SECONDS, 0.1 * 2 ** self.failures))
            self.engine.refresh_state(self)

    async def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.in_flight = None
        await self.engine.links_moved()
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        self.message = f"{type(exc).__name__}: {detail}"[:500]
        reason = code.name.lower() if code is not None else type(exc).__name__
        metrics.SYNC_ERRORS.labels(self.engine.volume_id, reason).inc()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED):
            if self.unreachable_since is None:
                self.unreachable_since = time.monotonic()
            self.event(PeerUnreachable(since=self.unreachable_since))
        elif code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
            # (a full replica is intact: it freed what it could and takes the send again;
            # rebuilding it from scratch would not make the volume's data any smaller)
            self.errors += 1
            if self.errors >= ERRORS_BEFORE_FAILED:
                self.event(ReplicaError(reason=self.message))
        if code is grpc.StatusCode.FAILED_PRECONDITION and "epoch" in (detail or ""):
            await self.engine.fence(f"peer {self.node} refused our epoch: {detail}")
        self.known = False  # re-read what the peer holds before the next attempt
        if self.state is ReplicaState.FAILED:
            self.acked = None  # only a full rebuild brings a failed replica back
            self.engine.replica_failed(self.node)
        self.engine.refresh_state(self)
        log.warning("push failed", volume_id=self.engine.volume_id, peer=self.node,
                    error=self.message, failures=self.failures)

    async def _wait_turn(self, wanted: SnapRef) -> None:
        """Synchronous mode: the peers a commit waits for get the CPUs and the link first.

        An fsync returns once ``writeQuorum - 1`` peers hold the change. Streamed to every peer
        at once, the change splits the sender's CPU (and on a busy node the receivers'), so the
        streams the fsync waits for end later than one would alone: measured here for a 64 MiB
        fsync, 0.41 s alone, 0.69-0.95 s with a second stream beside it. So when enough other
        peers already stream this change, this one waits until they acknowledged it, then
        ships it while the writer goes on (and, recorded, the very stream they were sent: see
        .shared_streams). It stops waiting as soon as one of them failed or stopped streaming
        well (``streams_well``), and after ``TURN_MAX_SECONDS`` at most. Only incremental sends
        of a Synchronous volume wait: a rebuild never does.
        """
        engine = self.engine
        need = engine.peers_needed()
        if engine.spec.policy.mode != pb.SYNCHRONOUS or self.acked is None or need == 0:
            return
        others = [link for link in engine.links.values() if link is not self]

        def ahead(link: PeerLink, now: float) -> bool:
            return (link.in_flight is not None and link.in_flight >= wanted
                    and streams_well(idle_seconds=now - link.progressed_at, rate=link.rate,
                                     own_rate=self.rate))

        def go() -> bool:
            now = time.monotonic()
            held = sum(1 for link in others if link.has(wanted))
            busy = sum(1 for link in others if not link.has(wanted) and ahead(link, now))
            return stream_now(need, held, busy)

        deadline = time.monotonic() + TURN_MAX_SECONDS
        async with engine.links_changed:
            while not go() and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TURN_POLL_SECONDS):
                        await engine.links_changed.wait()

    async def _learn_holdings(self) -> None:
        stub = self.engine.peers.stub(self.node)
        reply = await stub.Holdings(pb.HoldingsRequest(volume_id=self.engine.volume_id),
                                    timeout=10)
        self.unreachable_since = None  # it answered
        if reply.epoch > self.engine.epoch:
            # the peer follows a newer primary: whatever we write now can no longer count
            await self.engine.fence(f"peer {self.node} is at epoch {reply.epoch}, "
                                    f"we are at {self.engine.epoch}")
            raise FailedPrecondition(f"stale epoch {self.engine.epoch}: {self.node} is at "
                                     f"epoch {reply.epoch}")
        theirs = {ref_of(r) for r in reply.snapshots}
        ours = set(self.engine.lineage.complete())
        # a replica being rebuilt (a failed one, say) may still hold snapshots from before:
        # what it holds counts only from the rebuild's own snapshot on
        floor = self.rebuilding_to if self.state is ReplicaState.REBUILDING else None
        common = sorted(ref for ref in theirs & ours if floor is None or ref >= floor)
        async with self._acked_changed:
            self.acked = common[-1] if common and self.state is not ReplicaState.FAILED else None
            # a commit may be waiting for a snapshot whose answer was lost, which the peer
            # turns out to hold: without this it waited for its timeout and failed (EIO)
            self._acked_changed.notify_all()
        self.partial = (ref_of(reply.partial), reply.partial_offset) \
            if reply.HasField("partial") else None
        self.known = True
        if self.acked is not None:
            self.engine.copy_held(self.node)
        if self.acked is not None and self.state is ReplicaState.REBUILDING:
            if self.rebuilding_to is None:
                # placed anew, but it holds a snapshot we have (a node given back to the
                # volume, say): an increment brings it up to date, no full copy is needed
                self.event(RebuildFinished())
            else:
                # the rebuild's stream ended on the peer, but its answer never reached us
                # (the peer restarted, the link broke): it is over all the same. Left
                # Rebuilding, the replica stayed so for good (no full stream would follow),
                # and a Rebuilding replica is never promoted.
                self._finish_rebuild(self.acked, answer="lost")
            # (Lagging now; the link's refresh_state, once this push attempt is over, counts
            # it in sync as for any acknowledgement learnt here.)

    async def _ship(self) -> None:
        engine = self.engine
        if not self.known:
            await self._learn_holdings()
        if self.wanted is None or self.has(self.wanted):
            return
        await self._wait_turn(self.wanted)
        complete = engine.lineage.complete()
        target = self.wanted if self.wanted in complete else (complete[-1] if complete else None)
        if target is None or self.has(target):
            return
        parent = self.acked if self.acked in complete else None
        skip = 0
        if parent is None:
            # A full stream (a new or rebuilt replica): resume an interrupted one if we can.
            if self.partial is not None and self.partial[0] in complete:
                target, skip = self.partial
            self.rebuilding_to = target
            self.event(RebuildStarted())
            engine.audit(AuditKind.REBUILD, phase="start", peer=self.node,
                         snapshot=target.name, resume_offset=skip)
        self.in_flight = target
        self.progressed_at = time.monotonic()
        taken = engine.snapshot_times.get(target, (time.time_ns(), time.time()))[0]
        header = pb.StreamHeader(
            volume_id=engine.volume_id, epoch=engine.epoch, sender_node=engine.node,
            snapshot=ref_message(target), parent=ref_message(parent),
            kind=pb.BTRFS_SEND, resume_offset=skip, volume_size_bytes=engine.spec.size_bytes,
            snapshot_unix_ns=taken, volume_kind=engine.spec.kind,
            total_bytes=engine.used_bytes() if parent is None else 0)
        sent = 0
        total = max(1, header.total_bytes)
        # gRPC stops reading the stream when the call ends, but does not close it: a frame
        # it was waiting for (paced by the token bucket, say) still comes, after the next push
        # may already have finished. That frame must not count: its progress put a replica
        # that had just been rebuilt back to Rebuilding, for good, and its pacing took the
        # next push's tokens.
        live = True

        async def pace(n: int) -> None:
            if live:
                await engine.pace(n)

        def progress(n: int) -> None:
            nonlocal sent
            if not live:
                return
            sent += n
            self.progressed_at = time.monotonic()
            metrics.BYTES.labels(engine.volume_id, "sent").inc(n)
            engine.bytes_shipped += n
            if parent is None:
                self.rebuild_progress = min(0.99, (skip + sent) / total)
                self.event(RebuildProgress(done_bytes=skip + sent, total_bytes=total))
                metrics.REBUILD_PROGRESS.labels(engine.volume_id, self.node).set(
                    self.rebuild_progress)

        push = engine.peers.push(self.node)
        started = time.monotonic()
        policy = engine.spec.policy
        engine.node_bandwidth.begin(engine.volume_id, policy.priority,
                                    float(policy.bandwidth_bytes_per_second))
        stream = self._stream(Outgoing(engine.lineage, target, parent, header, skip),
                              pace, progress)
        try:
            result = await push(stream)
        finally:
            live = False
            engine.node_bandwidth.end(engine.volume_id)
            # stop the kernel's send now rather than when the stream is collected; gRPC may
            # still be inside it (then it ends at its next frame, which goes nowhere)
            with contextlib.suppress(RuntimeError):
                await stream.aclose()
        received = ref_of(result.received)
        # it answered: the states below must not count the time it was cut off (a push that
        # succeeded more than STALE_AFTER_SECONDS into an outage turned the peer Stale again)
        self.unreachable_since = None
        async with self._acked_changed:
            self.acked = received
            self.in_flight = None
            self._acked_changed.notify_all()
        engine.copy_held(self.node)
        await engine.links_moved()
        self.last_sync_ns = time.time_ns()
        self.message = ""
        self.partial = None
        took = time.monotonic() - started
        engine.observe_sync(target, took)
        if sent >= RATE_MIN_BYTES:
            rate = sent / max(took, 1e-6)
            self.rate = rate if not self.rate else (self.rate + rate) / 2
        self.errors = 0
        if parent is None:
            self._finish_rebuild(received, bytes=sent)
        self.event(AckReceived(lag_seconds=engine.lag_of(self),
                               max_lag_seconds=engine.max_lag()))
        engine.refresh_state(self)
        engine.prune_soon()

    def _finish_rebuild(self, snapshot: SnapRef, **details: str | int) -> None:
        self.rebuilding_to = None
        self.event(RebuildFinished())
        self.engine.replica_rebuilt(self.node)
        self.rebuild_progress = 1.0
        metrics.REBUILD_PROGRESS.labels(self.engine.volume_id, self.node).set(1.0)
        self.engine.audit(AuditKind.REBUILD, phase="finished", peer=self.node,
                          snapshot=snapshot.name, **details)

    def _stream(self, out: Outgoing, pace: Callable[[int], Awaitable[None]],
                progress: Callable[[int], None]) -> AsyncGenerator[pb.PushMessage | bytes, None]:
        """The request stream of a push: the increment another peer was just sent, if it
        was recorded for this one (see .shared_streams), else a fresh ``btrfs send``, recorded
        when another peer holds the same parent and will want the same increment."""
        engine = self.engine
        compress = engine.compression()
        if out.parent is None or out.skip:
            return stream_snapshot(out, pace=pace, progress=progress, compress=compress)
        key = StreamKey(out.parent, out.snapshot, compress)
        frames = engine.shared_streams.take(key)
        if frames is not None:
            metrics.SHARED_STREAMS.labels(engine.volume_id).inc()
            return replay(out.header, frames, pace, progress)
        # peers that hold the parent, or are being sent it now (a trailing one, mid-push), and
        # are not being sent this very increment already
        wanted = sum(1 for link in engine.links.values()
                     if link is not self and not link.has(out.snapshot)
                     and link.in_flight != out.snapshot
                     and out.parent in (link.acked, link.in_flight))
        record = engine.shared_streams.record(key, wanted) if wanted else None
        return stream_snapshot(out, pace=pace, progress=progress, compress=compress,
                               record=record)


class VolumeEngine:
    """This node's replica of one volume, as primary or replica."""

    def __init__(self, *, node: str, spec: pb.VolumeSpec, store: ReplicaStore,
                 peers: PeerPool, state_dir: Path, spool_dir: Path, audit: AuditLog,
                 node_bandwidth: NodeBandwidth | None = None, epoch: int | None = None,
                 role: Role | None = None, fenced: bool = False,
                 awaiting_copy: Collection[str] = (), failed: Collection[str] = (),
                 suspended: str = "", stranded_ns: int = 0) -> None:
        self.node = node
        self.spec = spec
        self.volume_id = spec.volume_id
        self.store = store
        self.peers = peers
        self.state_path = state_dir / f"{self.volume_id}.json"
        self.spool = Spool(spool_dir, self.volume_id)
        self.audit_log = audit
        self.node_bandwidth = node_bandwidth or NodeBandwidth(0)
        self.epoch = epoch if epoch is not None else max(1, spec.epoch)
        self.role = role if role is not None else (
            Role.PRIMARY if spec.primary_node == node else Role.REPLICA)
        self.primary = spec.primary_node
        self.fenced = fenced
        #: The peers this node, as primary, placed a replica on that has held nothing of the
        #: volume yet (persisted): their links start Rebuilding (see PeerLink.state).
        self.awaiting_copy = set(awaiting_copy)
        #: The peers whose replica failed (ERRORS_BEFORE_FAILED errors in a row) and has not
        #: been rebuilt since (persisted): their links start Failed. In memory only, a failed
        #: replica came back Lagging after a restart of this agent, counted healthy (so
        #: promotable) until it failed again.
        self.failed_replicas = set(failed)
        self.lineage = Lineage(store, self.volume_id)
        self.links: dict[str, PeerLink] = {}
        #: The increment last sent to one peer, kept for the others (see .shared_streams).
        self.shared_streams = SharedStreams()
        self.snapshot_times: dict[SnapRef, tuple[int, float]] = {}
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.bytes_shipped = 0
        self.bytes_received = 0
        self.last_received_ns = 0
        self.conflicts = 0
        #: Attach succeeded and no Detach since: pods here use the volume.
        self.attached = False
        #: When pods here lost the volume, it having stopped being served here (persisted,
        #: Unix ns, 0: none): set by a fence or a demotion while attached, cleared by Detach
        #: or a new Attach.
        self.stranded_ns = stranded_ns
        #: When a pod here last asked for the volume while another node served it.
        self.attach_wanted_at: float | None = None
        self.handover_until: float | None = None
        self.last_clean_check = time.time()
        self._cycle_lock = asyncio.Lock()
        self._receive_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._bucket = TokenBucket(_rate(spec), _burst(spec), now=time.monotonic())
        self._manual_trigger = spec.policy.manual_trigger
        self._snapshot_bytes_cache: tuple[float, int] = (0.0, 0)
        self._fuse: FuseServer | None = None
        self._suspended = ""
        self.suspended = suspended
        #: Held while the live subvolume's read-only flag is changed (fence, suspend, resume):
        #: a resume must not make a replica fenced meanwhile writable again.
        self._read_only_lock = asyncio.Lock()
        self._retired: set[asyncio.Future[None]] = set()
        self._pruning = False
        self._prune_again = False
        self._scrubber: asyncio.Task[None] | None = None
        self.fuse_root = state_dir.parent / "fuse"
        self.multiwriter: MultiWriter | None = None
        #: The replica's filesystem (read from the store by ``start``).
        self.filesystem = StoreFilesystem.BTRFS
        self.multiwriter_db = state_dir.parent / "multiwriter" / f"{self.volume_id}.sqlite"
        #: Synchronous fsyncs that changed only data ship journal records (see .journal).
        self.journal_writer = JournalWriter(self.volume_id, node)
        self.journal_log = JournalLog(self.lineage.root)
        self._journal_lock = asyncio.Lock()
        self._journal_acks: set[asyncio.Task[None]] = set()
        #: The newest complete snapshot received, to check journal records against without a
        #: directory scan (checked to exist before use; None: scan).
        self._newest_received: SnapRef | None = None
        #: Notified when a peer's push ends (see ``PeerLink._wait_turn``).
        self.links_changed = asyncio.Condition()

    @property
    def suspended(self) -> str:
        """Why this primary takes no writes for now (empty: it does). Set while its agent Lease
        lapsed and no peer answers (sharedsync.core.isolation); persisted, so a restart keeps
        it until the agent's isolation guard resumes it."""
        return self._suspended

    @suspended.setter
    def suspended(self, why: str) -> None:
        self._suspended = why
        metrics.WRITES_SUSPENDED.labels(self.volume_id).set(1 if why else 0)

    @property
    def file_level(self) -> bool:
        """Replicated file by file (MultiWriter) rather than by snapshot streams: multi-writer
        volumes, volumes the operator made file-level (``spec.file_level``: some replica is on
        an ext4 node), and every filesystem volume on the ext4 fallback store."""
        return (self.spec.multi_writer or self.spec.file_level
                or self.filesystem is StoreFilesystem.EXT4)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create or open the replica and start the loops its role calls for."""
        kind = VolumeKind(self.spec.kind or "filesystem")
        if not self.state_path.exists() and self.role is Role.PRIMARY:
            # new to this node (its replica may have been made from a content source a moment
            # ago): no peer can hold a snapshot of it
            self.awaiting_copy = set(self.spec.replica_nodes) - {self.node}
        await asyncio.to_thread(self.store.ensure_layout)
        meta = await asyncio.to_thread(self.store.meta, self.volume_id)
        if meta is None:
            await asyncio.to_thread(self.store.create, self.volume_id, self.spec.size_bytes, kind)
        await asyncio.to_thread(self.store.open, self.volume_id)
        await asyncio.to_thread(self.lineage.ensure)
        await asyncio.to_thread(self.lineage.discard_partial)
        if not self.file_level:
            newest = await asyncio.to_thread(self.lineage.newest)
            async with self._journal_lock:
                await asyncio.to_thread(self.journal_log.load, newest)
        self.persist()
        metrics.EPOCH.labels(self.volume_id).set(self.epoch)
        self.filesystem = await asyncio.to_thread(self.store.filesystem_of, self.volume_id)
        if self.file_level:
            if kind is VolumeKind.BLOCK:
                # validate_spec refused multi_writer and file_level block specs: what is left
                # is a block replica the store made on ext4
                raise InvalidArgument(
                    "a block volume needs the btrfs replica store: the ext4 fallback replicates "
                    "files, which a raw block device does not have")
            self.multiwriter = MultiWriter(
                self, self.lineage.live, self.multiwriter_db,
                watch_changes=self.filesystem is StoreFilesystem.EXT4)
            await self.multiwriter.start()
        else:
            self._sync_links()
            if self.awaiting_copy:
                # a snapshot for them to receive now, whatever the mode, schedule or pause:
                # without one they stayed Rebuilding, and the volume not Ready, until the
                # first scheduled cycle (a new replica gets a first copy while paused, too)
                self._wake.set()
            if self.role is Role.PRIMARY and not self.fenced:
                if self.suspended:  # still so: the isolation guard resumes it
                    await self._set_live_read_only()
                else:  # a suspension cut short by a restart without a Lease (standalone)
                    await self._writable_again("no suspension is in force")
                self._start_primary_loop()
        self._scrubber = asyncio.create_task(self._scrub_loop(), name=f"scrub-{self.volume_id}")

    async def stop(self) -> None:
        if self._scrubber is not None:
            self._scrubber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scrubber
            self._scrubber = None
        await self.detach()
        await cancel_and_wait(self._loop_task)
        self._loop_task = None
        for link in self.links.values():
            await link.stop()
        self.shared_streams.clear()
        if self.multiwriter is not None:
            await self.multiwriter.stop()
        for task in list(self._journal_acks):
            task.cancel()
        self.journal_log.close()

    async def remove(self) -> None:
        await self.stop()
        if self.multiwriter is not None:
            self.multiwriter.remove_state()
        self.spool.clear()
        await asyncio.to_thread(self._remove_replica)
        self.state_path.unlink(missing_ok=True)
        self.audit(AuditKind.VOLUME, action="removed")

    def _remove_replica(self) -> None:
        if self.store.meta(self.volume_id) is not None:
            for ref in self.lineage.complete():
                self.lineage.delete(ref)
            self.store.close(self.volume_id)
            self.store.delete(self.volume_id)

    def persist(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path, PersistedState(
            self.spec, self.epoch, self.role, self.primary, self.fenced,
            frozenset(self.awaiting_copy), frozenset(self.failed_replicas),
            self.suspended, self.stranded_ns).to_json())

    def _mark(self, peers: set[str], node: str, member: bool) -> None:
        """Put ``node`` in or out of one of the persisted peer sets; the state file is written
        only when that changes it (these are called on every acknowledgement or failure)."""
        if (node in peers) != member:
            if member:
                peers.add(node)
            else:
                peers.discard(node)
            self.persist()

    def copy_held(self, node: str) -> None:
        """``node`` holds a snapshot of the volume: from now on it is a replica like any."""
        self._mark(self.awaiting_copy, node, False)

    def replica_failed(self, node: str) -> None:
        """``node``'s replica failed: only a full rebuild brings it back, even after a restart."""
        self._mark(self.failed_replicas, node, True)

    def replica_rebuilt(self, node: str) -> None:
        """A rebuild of ``node`` ended: its replica is one like any again."""
        self._mark(self.failed_replicas, node, False)

    def audit(self, kind: AuditKind, **details: str | int | float | bool) -> None:
        self.audit_log.append(kind, self.volume_id, details)

    async def apply(self, spec: pb.VolumeSpec) -> None:
        """Take a new spec (policy, peers, size) live, without touching the data path."""
        old = self.spec
        if spec.multi_writer != old.multi_writer:
            raise FailedPrecondition(
                f"volume {self.volume_id} was made with multi_writer={old.multi_writer}; it "
                "cannot change on an existing volume (make a new volume and copy the data)")
        if spec.file_level != old.file_level:
            raise FailedPrecondition(
                f"volume {self.volume_id} was made with file_level={old.file_level}; how a "
                "volume replicates cannot change on an existing volume (make a new volume and "
                "copy the data)")
        if self.file_level:
            self.follow_coordinator(spec.epoch, spec.primary_node)
        elif spec.epoch > self.epoch:
            await self.adopt_epoch(spec.epoch, spec.primary_node)
        self.spec = spec
        if spec.size_bytes > old.size_bytes:
            await asyncio.to_thread(self.store.expand, self.volume_id, spec.size_bytes)
        self._bucket.set_burst(_burst(spec), time.monotonic())
        self._bucket.set_rate(_rate(spec), time.monotonic())
        if spec.policy.manual_trigger != self._manual_trigger:
            self._manual_trigger = spec.policy.manual_trigger
            self._wake.set()
            if self.multiwriter is not None:
                self.multiwriter.wake()
        if json_format.MessageToDict(old.policy) != json_format.MessageToDict(spec.policy):
            self.audit(AuditKind.POLICY, mode=pb.Mode.Name(spec.policy.mode),
                       bandwidth=spec.policy.bandwidth_bytes_per_second,
                       write_quorum=spec.policy.write_quorum)
        if self.role is Role.PRIMARY:
            self.awaiting_copy |= set(spec.replica_nodes) - set(old.replica_nodes) - {self.node}
        self.awaiting_copy &= set(spec.replica_nodes)
        self.failed_replicas &= set(spec.replica_nodes)
        self._sync_links()
        if self.multiwriter is not None:
            self.multiwriter.sync_peers()
        self.persist()
        self._wake.set()

    def _sync_links(self) -> None:
        """One link per peer while this node is primary."""
        wanted = {n for n in self.spec.replica_nodes if n != self.node} \
            if self.role is Role.PRIMARY and not self.file_level else set()
        for node in set(self.links) - wanted:
            link = self.links.pop(node)
            self._background(link.stop())
        for node in wanted - set(self.links):
            link = PeerLink(self, node, placed=node in self.awaiting_copy,
                            failed=node in self.failed_replicas)
            self.links[node] = link
            link.start()
            link.want(self.lineage.newest())

    # -- epochs ------------------------------------------------------------------------------

    def follow_coordinator(self, epoch: int, primary: str) -> None:
        """File-level replication: the operator's (or a peer's) epoch and coordinator, taken as
        they come (no data moves, nothing is fenced: every replica stays writable)."""
        if epoch < self.epoch or (epoch == self.epoch and primary == self.primary):
            return
        previous = self.primary
        self.epoch, self.primary = epoch, primary
        self.role = Role.PRIMARY if primary == self.node else Role.REPLICA
        self.persist()
        metrics.EPOCH.labels(self.volume_id).set(epoch)
        if previous != primary:
            self.audit(AuditKind.EPOCH, epoch=epoch, primary=primary, multi_writer=True)

    async def adopt_epoch(self, epoch: int, primary: str) -> None:
        """A newer epoch exists: someone else is primary now; this replica follows it."""
        if self.file_level:
            self.follow_coordinator(epoch, primary)
            return
        if epoch <= self.epoch:
            return
        was_primary = self.role is Role.PRIMARY
        was_suspended = bool(self.suspended)
        self.epoch, self.primary, self.handover_until = epoch, primary, None
        self._newest_received = None
        if primary != self.node:
            self.role = Role.REPLICA
            self._strand_consumers()  # before stop() detaches
            await self.stop()
            self.links.clear()
        self.fenced, self.suspended = False, ""
        if was_suspended and primary == self.node:
            await self._writable_again("still the primary at a newer epoch")
        self.persist()
        metrics.EPOCH.labels(self.volume_id).set(epoch)
        self.audit(AuditKind.EPOCH, epoch=epoch, primary=primary, was_primary=was_primary)
        log.info("adopted newer epoch", volume_id=self.volume_id, epoch=epoch, primary=primary)

    async def fence(self, why: str) -> None:
        """Stop acting as primary: a newer epoch exists, so our writes may no longer count."""
        if self.fenced:
            return
        self.fenced, self.suspended = True, ""
        self._strand_consumers()
        self.persist()
        self.audit(AuditKind.FENCE, reason=why[:200])
        log.warning("fenced", volume_id=self.volume_id, reason=why)
        try:
            async with self._read_only_lock:
                await asyncio.to_thread(btrfs.set_read_only, self.lineage.live, True)
        except Exception:
            log.exception("could not make the fenced replica read-only", volume_id=self.volume_id)
        if self._loop_task is not None and self._loop_task is not asyncio.current_task():
            self._loop_task.cancel()

    # -- isolation ---------------------------------------------------------------------------

    async def check_isolation(self, lapsed: bool, probe_seconds: float) -> None:
        """Suspend or resume writes as sharedsync.core.isolation decides, from whether the
        agent's Lease ``lapsed`` and what the peers answer a probe now (each given
        ``probe_seconds``). Only a primary that
        ships snapshots is concerned: file-level replicas are all writable by design (their
        concurrent changes are merged), and a replica takes no writes anyway."""
        if self.file_level or self.role is not Role.PRIMARY or self.fenced:
            return
        if not lapsed and not self.suspended:
            return  # the common case: no probe
        epoch = self.epoch
        answers = await self._probe_peers(probe_seconds) if self.links else []
        if self.role is not Role.PRIMARY or self.fenced or self.epoch != epoch:
            return  # promoted, demoted or fenced while we asked: decide on the next round
        action = isolation_action(suspended=bool(self.suspended), lapsed=lapsed,
                                  peers=len(self.links), answers=answers, epoch=self.epoch)
        if action is Isolation.FENCE:
            await self.fence(f"a peer is at epoch {max(answers)}, we are at {self.epoch}")
        elif action is Isolation.SUSPEND:
            await self._suspend("the agent's Lease lapsed and no peer answers: the operator "
                                "may be failing this volume over")
        elif action is Isolation.RESUME:
            await self._resume()

    async def _probe_peers(self, wait_seconds: float) -> list[int]:
        """The epochs of the peers that answer a Holdings call now."""
        async def epoch_of(node: str) -> int | None:
            try:
                reply = await self.peers.stub(node).Holdings(
                    pb.HoldingsRequest(volume_id=self.volume_id), timeout=wait_seconds)
            except Exception:  # noqa: BLE001 - any failure is "did not answer"
                return None
            return int(reply.epoch)
        found = await asyncio.gather(*(epoch_of(node) for node in sorted(self.links)))
        return [epoch for epoch in found if epoch is not None]

    async def _suspend(self, why: str) -> None:
        self.suspended = why  # the commit hook refuses from here on
        self.persist()
        self.audit(AuditKind.SUSPEND, suspended=True, reason=why[:200])
        log.warning("writes suspended", volume_id=self.volume_id, reason=why)
        await self._set_live_read_only()

    async def _set_live_read_only(self) -> None:
        """Make a suspended primary's live subvolume read-only (new opens for writing fail)."""
        try:
            async with self._read_only_lock:
                if self.suspended and self.role is Role.PRIMARY and not self.fenced:
                    await asyncio.to_thread(btrfs.set_read_only, self.lineage.live, True)
        except Exception:
            log.exception("could not make the suspended replica read-only",
                          volume_id=self.volume_id)

    async def _resume(self) -> None:
        await self._writable_again("the Lease is renewed and a peer confirms our epoch")
        self.suspended = ""
        self.persist()
        self.audit(AuditKind.SUSPEND, suspended=False)
        log.info("writes resumed", volume_id=self.volume_id)

    async def _writable_again(self, why: str) -> None:
        """Make this primary's live subvolume writable if it is read-only (and this node
        still the primary, not fenced)."""
        live = self.lineage.live
        async with self._read_only_lock:
            if self.role is not Role.PRIMARY or self.fenced:
                return
            if await asyncio.to_thread(lambda: btrfs.is_subvolume(live)
                                       and btrfs.subvolume_info(live).read_only):
                await asyncio.to_thread(btrfs.set_read_only, live, False)
                log.info("live made writable", volume_id=self.volume_id, reason=why)

    async def promote(self, epoch: int) -> None:
        """Become primary at ``epoch``: the newest complete snapshot becomes ``live``."""
        if epoch <= self.epoch and not (self.role is Role.PRIMARY and epoch == self.epoch):
            raise FailedPrecondition(
                f"promotion needs an epoch newer than {self.epoch}, got {epoch}")
        if self.role is Role.PRIMARY and epoch == self.epoch and not self.fenced:
            return
        if self.file_level:
            # every replica is writable already: only the coordinator role moves here
            self.follow_coordinator(epoch, self.node)
            self.audit(AuditKind.PROMOTION, epoch=epoch, multi_writer=True)
            return
        async with self._receive_lock:
            newest = await asyncio.to_thread(self.lineage.newest)
            if newest is not None:
                kept = await asyncio.to_thread(self.lineage.restore_live, newest)
                if kept:
                    self.audit(AuditKind.PROMOTION, diverged_kept_as=kept)
            async with self._journal_lock:
                replayed = await asyncio.to_thread(self._replay_journal, newest)
            if replayed:
                self.audit(AuditKind.PROMOTION, journal_records_replayed=replayed)
            self.epoch, self.role, self.primary, self.fenced = epoch, Role.PRIMARY, self.node, False
            self.suspended = ""
            self.handover_until = None
            self.awaiting_copy = set()  # what the peers hold is learnt, not presumed
            self.failed_replicas = set()
            self.persist()
        metrics.EPOCH.labels(self.volume_id).set(epoch)
        self.audit(AuditKind.PROMOTION, epoch=epoch, snapshot=newest.name if newest else "")
        log.info("promoted", volume_id=self.volume_id, epoch=epoch)
        self._sync_links()
        # The first snapshot of the new epoch: shipping it tells every peer (including an old
        # primary that comes back) that this epoch exists, even when no data changed.
        async with self._cycle_lock:
            marker = SnapRef(epoch, (newest.seq if newest else 0) + 1)
            await asyncio.to_thread(self.lineage.take, marker)
            self.snapshot_times[marker] = (time.time_ns(), time.time())
        for link in self.links.values():
            link.known = False
            link.want(marker)
        self._start_primary_loop()

    def _replay_journal(self, newest: SnapRef | None) -> int:
        """Write the fsync journal held on top of ``newest`` into the restored ``live``."""
        log_ = self.journal_log
        if log_.base is None or log_.base != newest:
            log_.drop()
            return 0
        replayed = log_.replay(self.lineage.live)
        log_.drop()
        log.info("journal replayed", volume_id=self.volume_id, records=replayed,
                 snapshot=newest.name if newest else "")
        return replayed

    # -- the primary's loop ------------------------------------------------------------------

    def _start_primary_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._primary_loop(), name=self.volume_id)

    def tick_seconds(self) -> float:
        policy = self.spec.policy
        if policy.mode == pb.ASYNCHRONOUS:
            # a tenth of maxLag: measured, a quarter let the lag P99 at 50 MB/s exceed maxLag
            # (each cycle commits a btrfs transaction, which writers pay for: see bench/)
            return min(1.0, max(0.05, (policy.max_lag_seconds or 5.0) / 10))
        return 1.0

    async def _primary_loop(self) -> None:
        while True:
            policy = self.spec.policy
            timeout = self.tick_seconds()
            if policy.mode == pb.SCHEDULED and policy.schedule:
                now = datetime.datetime.now(datetime.UTC)
                timeout = (next_after(policy.schedule, now) - now).total_seconds()
            woken = await wait_event(self._wake, timeout)
            self._wake.clear()
            if policy.paused and not woken:
                continue
            if not woken and policy.mode == pb.SYNCHRONOUS and self.journal_writer.carrying():
                continue  # the fsync journal has it; the snapshot follows (see .journal)
            try:
                await self.cycle()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sync cycle failed", volume_id=self.volume_id)
                await asyncio.sleep(1)

    def sync_now(self) -> None:
        self._wake.set()

    async def cycle(self) -> SnapRef | None:
        """Snapshot ``live`` if it changed and make that the snapshot every peer wants."""
        if self.file_level:
            raise FailedPrecondition(f"volume {self.volume_id} replicates file by file here: "
                                     "it ships no replication snapshots")
        if self.role is not Role.PRIMARY or self.fenced:
            raise FailedPrecondition(f"volume {self.volume_id} is not primary on {self.node}")
        async with self._cycle_lock:
            # read before the snapshot: a namespace change counted after this may be missing
            # from it, and then the journal waits for the next one (see FuseServer.mutations)
            server = self._fuse
            mutations = server.mutations if server is not None else 0
            newest = await asyncio.to_thread(self.lineage.newest)
            checked_at = time.time()
            changed = await asyncio.to_thread(self.lineage.changed_since, newest)
            target = newest
            if changed:
                seq = (newest.seq if newest else 0) + 1
                target = SnapRef(self.epoch, seq)
                # no record may be made on the old snapshot once the new one exists: a peer
                # holding the new one answers "covered" for records of the old
                self.journal_writer.rebase(None)
                await asyncio.to_thread(self.lineage.take, target)
                self.snapshot_times[target] = (time.time_ns(), self.last_clean_check)
            self.last_clean_check = checked_at
            if target is not None and server is not None:
                generation = await asyncio.to_thread(
                    lambda: btrfs.subvolume_info(self.lineage.path(target)).generation)
                self.journal_writer.rebase(JournalBase(target, generation, server, mutations))
            for link in self.links.values():
                link.want(target)
            if changed:
                self.prune_soon()
            return target

    async def commit(self) -> None:
        """Synchronous mode: return once ``writeQuorum`` replicas hold everything written."""
        target = await self.cycle()
        need = self.peers_needed()
        if target is None or need == 0:
            return
        waits = [asyncio.ensure_future(link.wait_for(target)) for link in self.links.values()]
        if len(waits) < need:
            for w in waits:
                w.cancel()
            raise Unavailable(f"write quorum {need + 1} needs more peers than "
                              f"{len(waits)} configured")
        started = time.monotonic()
        try:
            done = 0
            for finished in asyncio.as_completed(waits, timeout=COMMIT_TIMEOUT_SECONDS):
                await finished
                done += 1
                if done >= need:
                    break
        except TimeoutError as exc:
            raise Unavailable(f"only {done} of {need} peers acknowledged within "
                              f"{COMMIT_TIMEOUT_SECONDS:.0f} s") from exc
        finally:
            for w in waits:
                w.cancel()
        metrics.SYNC_SECONDS.labels(self.volume_id, "Synchronous").observe(
            time.monotonic() - started)

    def peers_needed(self) -> int:
        """How many peers must hold a change before an fsync returns (writeQuorum - 1)."""
        return write_quorum(self.spec.policy.write_quorum, len(self.spec.replica_nodes)) - 1

    def journal_useful(self) -> bool:
        """Whether a journal record could stand for a snapshot commit now: peers must
        acknowledge (writeQuorum above 1) and this replica serves the volume."""
        need = self.peers_needed()
        return 0 < need <= len(self.links) and not self.fenced and self.role is Role.PRIMARY

    async def journal_commit(self, record: pb.JournalRecord) -> bool:
        """Synchronous mode, a data-only fsync group: True once ``writeQuorum`` replicas
        (this one included) hold ``record`` durably; False (never an exception) when they do
        not within ``JOURNAL_TIMEOUT_SECONDS``: the caller then commits through a snapshot."""
        if not self.journal_useful():
            return False
        need = self.peers_needed()
        base = ref_of(record.base)
        size = record.ByteSize()

        async def deliver(link: PeerLink) -> None:
            link.journal_pending += 1
            try:
                async with asyncio.timeout(JOURNAL_TIMEOUT_SECONDS):
                    if not link.has(base):
                        await link.wait_for(base)
                    ack = await link.journal.send(record)
                if ack.refused:
                    raise FailedPrecondition(
                        f"{link.node} refused journal record: {ack.refused}")
                if not ack.covered:
                    self.bytes_shipped += size
                    metrics.BYTES.labels(self.volume_id, "sent").inc(size)
            except BaseException:
                link.journal_out = record.session  # it may miss this record: no more of them
                raise
            finally:
                link.journal_pending -= 1

        started = time.monotonic()
        # The peers beyond the quorum get the record too, in the background, so that their
        # logs stay complete. A peer that fell behind (too many records on the way to it) or
        # failed one is left out for the rest of the session: it would refuse the next record
        # anyway (a gap), and records waiting for it must not pile up in memory.
        tasks = []
        for link in self.links.values():
            if link.journal_out == record.session:
                continue
            if link.journal_pending >= JOURNAL_MAX_PENDING:
                link.journal_out = record.session
                continue
            task = asyncio.ensure_future(deliver(link))
            self._journal_acks.add(task)
            task.add_done_callback(_settle_journal_ack(self._journal_acks))
            tasks.append(task)
        if len(tasks) < need:
            return False
        done = 0
        for finished in asyncio.as_completed(tasks):
            try:
                await finished
            except (Exception, TimeoutError) as exc:  # noqa: BLE001 - counted, retried
                log.debug("journal record not acknowledged", volume_id=self.volume_id,
                          error=str(exc)[:300])
                continue
            done += 1
            if done >= need:
                break
        if done < need:
            metrics.SYNC_ERRORS.labels(self.volume_id, "journal").inc()
            return False
        seconds = time.monotonic() - started
        self.latencies.append(seconds)
        metrics.SYNC_SECONDS.labels(self.volume_id, "Synchronous").observe(seconds)
        metrics.JOURNAL_RECORDS.labels(self.volume_id).inc()
        return True

    async def journal_append(self, record: pb.JournalRecord) -> pb.JournalAck:
        """A replica takes a journal record (see .journal for the rules)."""
        refused = ""
        if self.file_level or self.role is Role.PRIMARY or self.fenced:
            refused = f"{self.node} is not a replica that ships by snapshots"
        elif record.epoch != self.epoch or record.sender_node != self.primary:
            refused = (f"record of epoch {record.epoch} from {record.sender_node}: this replica "
                       f"follows {self.primary} at epoch {self.epoch}")
        if refused:
            return pb.JournalAck(seq=record.seq, refused=refused)

        def append() -> pb.JournalAck:
            if not sealed(record):
                return pb.JournalAck(seq=record.seq, refused="checksum mismatch")
            newest = self._newest_received
            if newest is None or not btrfs.is_subvolume(self.lineage.path(newest)):
                newest = self._newest_received = self.lineage.newest()
            return self.journal_log.append(record, newest)

        async with self._journal_lock:
            ack = await asyncio.to_thread(append)
        if not ack.refused and not ack.covered:
            size = record.ByteSize()
            self.bytes_received += size
            metrics.BYTES.labels(self.volume_id, "received").inc(size)
        return ack

    async def wait_lag_within(self, limit: float) -> None:
        """Throttle a writer: hold it while a reachable replica is more than maxLag behind.

        What was written so far is snapshotted first, so it counts in the lag; the writer is
        released once every reachable replica is back within maxLag, or after ``limit``
        seconds. A writer that outpaces replication is thereby slowed to its pace.
        """
        await self.cycle()
        max_lag = self.max_lag()
        await hold_writer(self.volume_id, lambda: any(
            link.unreachable_since is None and self.lag_of(link) > max_lag
            for link in self.links.values()), limit)

    async def links_moved(self) -> None:
        """A peer's push ended (acknowledged or failed): wake the peers waiting their turn."""
        async with self.links_changed:
            self.links_changed.notify_all()

    def observe_sync(self, ref: SnapRef, seconds: float) -> None:
        self.latencies.append(seconds)
        metrics.SYNC_SECONDS.labels(self.volume_id, pb.Mode.Name(self.spec.policy.mode)).observe(
            seconds)
        self.audit(AuditKind.SYNC, snapshot=ref.name, seconds=round(seconds, 6))

    async def pace(self, nbytes: int) -> None:
        """Hold a frame back until the volume's cap and its share of the node allow it."""
        delay = max(self._bucket.take(nbytes, time.monotonic()),
                    self.node_bandwidth.delay(self.volume_id, nbytes))
        if delay > 0:
            await asyncio.sleep(delay)

    def compression(self) -> CompressionPolicy:
        cap = self.spec.policy.bandwidth_bytes_per_second
        return CompressionPolicy(link_bytes_per_second=float(cap)) if cap else NEVER_COMPRESS

    def used_bytes(self) -> int:
        st = os.statvfs(self.lineage.live)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _background(self, work: Awaitable[None]) -> None:
        """Run housekeeping off the sync path; failures are logged, never raised."""
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("background housekeeping failed", volume_id=self.volume_id)

        task = asyncio.ensure_future(run())
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def prune_soon(self) -> None:
        """Prune in a worker thread, once at a time, without delaying acknowledgements. A
        request that comes while a prune runs makes it run once more (an acknowledgement that
        arrived meanwhile may free a snapshot the running prune still had to keep)."""
        self._prune_again = True
        if self._pruning:
            return
        self._pruning = True

        async def prune() -> None:
            try:
                while self._prune_again:
                    self._prune_again = False
                    self._forget(await asyncio.to_thread(self.prune))
            finally:
                self._pruning = False

        self._background(prune())

    def _forget(self, pruned: list[SnapRef]) -> None:
        """Drop the times of pruned snapshots (on the loop: lag_of iterates over them)."""
        for ref in pruned:
            self.snapshot_times.pop(ref, None)

    def prune(self) -> list[SnapRef]:
        """Delete snapshots no peer needs (see sharedsync.core.snapshot_plan); returns them."""
        links = list(self.links.values())
        if any(not link.known for link in links):
            return []  # until we know what every peer holds, any snapshot may be its parent
        complete = self.lineage.complete()
        plan = SnapshotPlan.build(
            [Snapshot(seq=_order(ref), name=ref.name) for ref in complete],
            {link.node: link.acked.name if link.acked else None for link in links},
            pinned=[link.partial[0].name for link in links if link.partial],
            in_flight=[InFlight(peer=link.node, snapshot=link.in_flight.name,
                                parent=link.acked.name if link.acked else None)
                       for link in links if link.in_flight is not None])
        doomed = [ref for ref in (SnapRef.parse(s.name) for s in plan.deletable())
                  if ref is not None]
        self.lineage.prune(doomed)
        return doomed

    # -- the data path ---------------------------------------------------------------------

    async def attach(self) -> Path:
        """Serve the volume on this node and return the directory to bind into pods.

        Filesystem volumes are served through the FUSE daemon with kernel passthrough: reads
        and writes go straight to the replica (native speed), while fsync, fdatasync and the
        close of a written file reach the daemon, which in Synchronous mode answers only once
        the write quorum holds the change. Because the daemon is always in the path, a policy
        change between modes applies live, without remounting anything in the pod.

        A multi-writer volume is served the same way on every node that holds a replica: in
        Synchronous mode an fsync there returns once the write quorum merged the change (see
        :meth:`MultiWriter.commit`); the merge loop finds changes by scanning.
        """
        self.attached, self.attach_wanted_at = True, None
        self.consumers_released()
        if self.spec.kind == "block":
            return self.store.block_file(self.volume_id)
        if self._fuse is None:
            mountpoint = self.fuse_root / self.volume_id
            mountpoint.mkdir(parents=True, exist_ok=True, mode=0o700)
            server = FuseServer(self.lineage.live, mountpoint,
                                _CommitHooks(self, asyncio.get_running_loop()))
            await asyncio.to_thread(server.start)
            self._fuse = server
            self.audit(AuditKind.VOLUME, action="attach", passthrough=server.passthrough_active)
        return self._fuse.mountpoint

    def writing(self, path: str) -> bool:
        """Whether a pod here has ``path`` (relative to ``live``) open for writing."""
        server = self._fuse
        return server is not None and server.writing(path)

    def want_attach(self) -> None:
        """A pod here asked for the volume while another node serves it: say so in status
        (``attach_wanted``) until it is served here or the asking stops."""
        self.attach_wanted_at = time.monotonic()

    def begin_handover(self) -> None:
        """The operator is about to move the primary to a node where a pod waits for it.

        Refused while pods here use the volume: the operator decided on a status a few seconds
        old, and moving now would fence them. Otherwise no new pod may start using this replica
        until the move is done (or given up, after ``HANDOVER_SECONDS``).
        """
        if self.attached:
            raise FailedPrecondition(
                f"volume {self.volume_id} is in use on {self.node}: its primary stays here "
                "while pods use it")
        self.handover_until = time.monotonic() + HANDOVER_SECONDS

    def handing_over(self) -> bool:
        return self.handover_until is not None and time.monotonic() < self.handover_until

    def attach_wanted(self) -> bool:
        return (self.attach_wanted_at is not None
                and time.monotonic() - self.attach_wanted_at < ATTACH_WANTED_SECONDS)

    def _strand_consumers(self) -> None:
        """The volume stops being served here: pods that use it keep a mount that no longer
        works, until kubelet unmounts it (the caller persists)."""
        if self.attached and not self.stranded_ns:
            self.stranded_ns = time.time_ns()
            log.warning("pods here lost the volume", volume_id=self.volume_id,
                        primary=self.primary)

    def consumers_released(self) -> None:
        """The pods that lost the volume here are gone (kubelet detached it) or have it
        again (attached anew)."""
        if self.stranded_ns:
            self.stranded_ns = 0
            self.persist()

    async def detach(self) -> None:
        self.attached = False
        if self._fuse is not None:
            server, self._fuse = self._fuse, None
            await asyncio.to_thread(server.stop)
            self.audit(AuditKind.VOLUME, action="detach")

    # -- the replica's side ------------------------------------------------------------------

    def check_epoch(self, epoch: int, sender: str) -> None:
        if epoch < self.epoch:
            raise FailedPrecondition(
                f"stale epoch {epoch} from {sender}: volume {self.volume_id} is at epoch "
                f"{self.epoch} (primary {self.primary})")
        if epoch == self.epoch and self.role is Role.PRIMARY and sender != self.node:
            raise FailedPrecondition(
                f"{sender} claims epoch {epoch}, at which {self.node} is primary")

    async def receive(self, header: pb.StreamHeader,
                      messages: AsyncIterator[pb.PushMessage]) -> pb.PushResult:
        if self.file_level:
            raise FailedPrecondition(
                f"volume {self.volume_id} replicates file by file on {self.node} (multi-writer, "
                "or the ext4 fallback store): a snapshot stream would overwrite local writes; "
                "every replica of a volume needs the same store filesystem")
        self.check_epoch(header.epoch, header.sender_node)
        if header.epoch > self.epoch:
            await self.adopt_epoch(header.epoch, header.sender_node)
        if self._receive_lock.locked():
            raise Aborted(f"volume {self.volume_id} is already receiving a stream")
        async with self._receive_lock:
            ref = ref_of(header.snapshot)
            complete = await asyncio.to_thread(self.lineage.complete)
            if ref not in complete:
                if header.volume_size_bytes > self.spec.size_bytes:
                    # (a size from a peer: bounded by this node's free space)
                    await asyncio.to_thread(self.store.expand, self.volume_id,
                                            header.volume_size_bytes, within_free_space=True)

                def progress(n: int) -> None:
                    self.bytes_received += n
                    metrics.BYTES.labels(self.volume_id, "received").inc(n)

                try:
                    await receive_snapshot(self.lineage, header, messages, self.spool,
                                           progress)
                except (ResourceExhausted, OSError) as exc:
                    # ENOSPC may also come from our own steps on a full replica (deleting an
                    # interrupted receive needs metadata space too)
                    if isinstance(exc, OSError) and exc.errno != errno.ENOSPC:
                        raise
                    raise await self._out_of_space(header, exc) from exc
                if self._newest_received is not None and ref > self._newest_received:
                    self._newest_received = ref
                self.last_received_ns = time.time_ns()
                # a replica promoted later counts its peers' lag from these: the time the
                # primary took the snapshot, not 0 (a lag of decades, LagExceeded at once)
                self.snapshot_times[ref] = (
                    header.snapshot_unix_ns,
                    header.snapshot_unix_ns / 1e9 if header.snapshot_unix_ns else time.time())
                self._background(self._prune_replica())
                failpoints.hit("agent.receive.before_answer")
            return pb.PushResult(received=ref_message(ref), epoch=self.epoch,
                                 bytes_received=self.bytes_received)

    async def _out_of_space(self, header: pb.StreamHeader, exc: Exception) -> ResourceExhausted:
        """A receive ran out of space: older snapshots may hold what the increment needs.

        Everything but the stream's parent and the newest snapshot goes, and their space is
        freed before the sender is told to send again. (The newest stays even when it is not
        the parent, after a lost acknowledgement: this replica's fsync journal, whose records
        it acknowledged, builds on it.) A replica is never thrown away for this: it is intact,
        only full, and it stays Lagging with this message until the send fits.
        """
        keep = {ref_of(header.parent)} if header.HasField("parent") else set()
        newest = await asyncio.to_thread(self.lineage.newest)
        if newest is not None:
            keep.add(newest)
        try:
            freed = await asyncio.to_thread(self.lineage.reclaim, keep)
        except OSError as failed:  # too full even to delete: the next attempt tries again
            log.warning("could not free space", volume_id=self.volume_id, error=str(failed))
            freed = []
        self._forget(freed)
        log.warning("receive ran out of space", volume_id=self.volume_id,
                    snapshot=ref_of(header.snapshot).name, freed_snapshots=len(freed))
        return ResourceExhausted(f"replica of {self.volume_id} on {self.node} ran out of space "
                                 f"receiving {ref_of(header.snapshot).name} ({exc}); "
                                 f"freed {len(freed)} older snapshot(s): send it again")

    async def _prune_replica(self) -> None:
        """Keep the REPLICA_KEEP newest snapshots (and the times of those alone)."""
        def prune() -> list[SnapRef]:
            doomed = self.lineage.complete()[:-REPLICA_KEEP]
            self.lineage.prune(doomed)
            return doomed

        self._forget(await asyncio.to_thread(prune))

    def holdings(self) -> pb.HoldingsResponse:
        complete = self.lineage.complete()
        reply = pb.HoldingsResponse(snapshots=[snapshot_ref(r) for r in complete],
                                    epoch=self.epoch)
        partial = self.spool.partial()
        if partial is not None and partial[0] in complete:
            # the stream it kept ended after all (the agent died before deleting it): a spool
            # can be the size of the volume, and nothing else would ever delete this one
            self.spool.clear()
            partial = None
        if partial is not None:
            reply.partial.CopyFrom(snapshot_ref(partial[0]))
            reply.partial_offset = partial[1]
        return reply

    # -- integrity ---------------------------------------------------------------------------

    async def scrub(self) -> pb.ScrubResponse:
        """Verify every checksum of this replica; repair what is damaged, from a healthy copy.

        A damaged replica asks the primary to rebuild it (its snapshots are dropped, so the
        rebuild is a full stream). A damaged primary re-reads every file of its live data and
        replaces each unreadable one with the copy in a healthy replica's newest snapshot.
        A file-level replica repairs each damaged file from a peer; on ext4, which checksums
        no data, "damaged" means its content no longer matches the digest recorded for it.
        """
        damaged: list[str] | None = None
        if self.filesystem is StoreFilesystem.EXT4 and self.multiwriter is not None:
            # ext4 keeps no data checksums: every file whose stat says unchanged is read
            # again and its digest compared with the one recorded when it was written
            damaged = await self.multiwriter.verify()
            errors = len(damaged)
            counters = {"digest_mismatches": errors}
        else:
            counters = await asyncio.to_thread(btrfs.scrub, self.lineage.root)
            errors = sum(counters.get(k, 0) for k in btrfs.SCRUB_ERROR_COUNTERS)
        metrics.SCRUB_ERRORS.labels(self.volume_id).inc(errors)
        if errors == 0:
            return pb.ScrubResponse(errors=0, message="no errors")
        log.warning("scrub found damage", volume_id=self.volume_id, errors=errors,
                    counters=counters)
        if self.multiwriter is not None:
            if damaged is None:
                damaged = await asyncio.to_thread(self._damaged_files)
            repaired = await self.multiwriter.repair(damaged) if self.spec.policy.auto_repair \
                else []
            self.audit(AuditKind.REPAIR, errors=errors, repaired=len(repaired),
                       files=",".join(repaired)[:500], multi_writer=True)
            return pb.ScrubResponse(errors=errors, repaired_files=repaired,
                                    message=f"repaired {len(repaired)} file(s) from peers")
        if self.role is Role.REPLICA:
            await self._request_resync(f"scrub found {errors} errors")
            return pb.ScrubResponse(errors=errors, resync_requested=True,
                                    message="asked the primary for a rebuild")
        repaired = await self._repair_files() if self.spec.policy.auto_repair else []
        self.audit(AuditKind.REPAIR, errors=errors, repaired=len(repaired),
                   files=",".join(repaired)[:500])
        return pb.ScrubResponse(errors=errors, repaired_files=repaired,
                                message=f"repaired {len(repaired)} file(s)")

    async def _request_resync(self, reason: str) -> None:
        async with self._receive_lock:
            # the damaged extents must be freed, not merely unlinked, before the copy comes back
            self._forget(await asyncio.to_thread(self.lineage.reclaim))
        self.spool.clear()
        self.audit(AuditKind.REPAIR, action="resync-requested", reason=reason)
        await self.peers.stub(self.primary).Resync(pb.ResyncRequest(
            volume_id=self.volume_id, node=self.node, reason=reason), timeout=30)

    def resync(self, node: str, reason: str) -> None:
        """A replica lost its copy: forget what it held and rebuild it from scratch."""
        if self.file_level:
            raise FailedPrecondition(f"volume {self.volume_id} replicates file by file: damaged "
                                     "files are repaired one by one, not by a rebuild")
        link = self.links.get(node)
        if link is None:
            raise FailedPrecondition(f"{node} is not a replica of {self.volume_id} here")
        link.known = False
        link.acked = None
        self.awaiting_copy.add(node)  # it dropped every snapshot: it holds nothing now
        self.persist()
        link.want(self.lineage.newest())
        self.audit(AuditKind.REBUILD, phase="requested", peer=node, reason=reason[:200])

    def _damaged_files(self) -> list[str]:
        """Files of ``live`` that cannot be read back (checksum errors surface as EIO)."""
        damaged = []
        live = self.lineage.live
        for path in live.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                with open(path, "rb") as source:
                    while source.read(1 << 20):
                        pass
            except OSError as exc:
                if exc.errno == errno.EIO:
                    damaged.append(str(path.relative_to(live)))
        return damaged

    async def _repair_files(self) -> list[str]:
        damaged = await asyncio.to_thread(self._damaged_files)
        healthy = [link for link in self.links.values()
                   if link.state is ReplicaState.IN_SYNC and link.acked is not None]
        log.info("repairing", volume_id=self.volume_id, damaged=damaged,
                 sources=[link.node for link in healthy])
        repaired = []
        for rel in damaged:
            for link in healthy:
                try:
                    await self._fetch_into_live(link, rel)
                except (grpc.aio.AioRpcError, OSError) as exc:
                    log.warning("repair from peer failed", volume_id=self.volume_id,
                                peer=link.node, path=rel, error=str(exc))
                    continue
                repaired.append(rel)
                break
        return repaired

    async def _fetch_into_live(self, link: PeerLink, rel: str) -> None:
        assert link.acked is not None
        decoder = FrameDecoder()
        target = self.lineage.live / rel
        temporary = target.with_name(f".{target.name}.repair")
        call = self.peers.stub(link.node).FetchFile(pb.FetchFileRequest(
            volume_id=self.volume_id, snapshot=snapshot_ref(link.acked), path=rel), timeout=600)
        with open(temporary, "wb") as out:  # noqa: ASYNC230 - rare repair path, small writes
            async for message in call:
                out.write(decoder.accept(frame_of(message)))
            if not decoder.finished:
                raise OSError(errno.EIO, f"the copy of {rel} from {link.node} was cut short")
            out.flush()
            os.fsync(out.fileno())
        shutil.copystat(target, temporary, follow_symlinks=False)
        os.replace(temporary, target)

    def open_snapshot_file(self, ref: SnapRef, rel: str) -> Path:
        """A file of a complete snapshot, for FetchFile; refuses any path leaving it."""
        if ref not in self.lineage.complete():
            raise NotFound(f"snapshot {ref.name} of {self.volume_id} is not here")
        root = self.lineage.path(ref)
        try:
            check_relative(rel)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        path = root / rel
        resolved = path.resolve()
        if root.resolve() not in resolved.parents or path.is_symlink() or not path.is_file():
            raise NotFound(f"{rel} is not a regular file of snapshot {ref.name}")
        return resolved

    async def _scrub_loop(self) -> None:
        while True:
            interval = self.spec.policy.scrub_interval_seconds
            await asyncio.sleep(interval if interval > 0 else 60)
            if interval > 0:
                try:
                    await self.scrub()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("scheduled scrub failed", volume_id=self.volume_id)

    # -- status ------------------------------------------------------------------------------

    def lag_of(self, link: PeerLink) -> float:
        """Upper bound on the age of the oldest change the peer does not hold."""
        newest = max(self.snapshot_times, default=None)
        if link.acked is not None and newest is not None and link.acked >= newest:
            return 0.0
        pending = [since for ref, (_, since) in self.snapshot_times.items()
                   if link.acked is None or ref > link.acked]
        return max(0.0, time.time() - min(pending)) if pending else 0.0

    def max_lag(self) -> float:
        """The lag a replica may have and still count as in sync.

        Asynchronous and Scheduled volumes use the policy's maxLag; for Synchronous volumes a
        replica is in sync only when it holds everything (lag 0).
        """
        if self.spec.policy.mode == pb.SYNCHRONOUS:
            return 0.0
        if self.spec.policy.mode == pb.SCHEDULED:
            return 0.0  # in sync means: holds the newest scheduled snapshot
        return self.spec.policy.max_lag_seconds or 5.0

    def refresh_state(self, link: PeerLink) -> None:
        """Re-evaluate a peer between acknowledgements: lag grows, silence turns stale."""
        lag = self.lag_of(link)
        previous = link.state
        if link.unreachable_since is not None and \
                time.monotonic() - link.unreachable_since > STALE_AFTER_SECONDS:
            link.event(StaleTimeout())
        elif lag > self.max_lag() and link.state is ReplicaState.IN_SYNC:
            link.event(LagExceeded(lag_seconds=lag))
        elif (link.state in (ReplicaState.LAGGING, ReplicaState.IN_SYNC)
              or (link.state is ReplicaState.STALE and link.known)) and \
                link.unreachable_since is None and link.acked is not None and \
                classify_lag(lag, self.max_lag()) is ReplicaState.IN_SYNC:
            # (a Stale peer that answers again and already holds the newest snapshot is sent
            # nothing, so no push acknowledges it: what it holds, learnt now, does)
            link.event(AckReceived(lag_seconds=lag, max_lag_seconds=self.max_lag()))
        if link.state is ReplicaState.LAGGING and previous is ReplicaState.IN_SYNC:
            metrics.LAG_EXCEEDED.labels(self.volume_id, link.node).inc()
            self.audit(AuditKind.LAG, peer=link.node, lag_seconds=round(lag, 3),
                       action=pb.LagAction.Name(self.spec.policy.on_lag_exceeded or pb.ALERT))
        metrics.LAG.labels(self.volume_id, link.node).set(lag)
        for state in ReplicaState:
            metrics.REPLICA_STATE.labels(self.volume_id, link.node, str(state)).set(
                1 if state is link.state else 0)

    def snapshot_bytes(self) -> int:
        at, value = self._snapshot_bytes_cache
        if time.monotonic() - at > 60:
            try:
                value = self.lineage.exclusive_bytes()
            except Exception:  # noqa: BLE001 - a status field must not break status
                value = 0
            self._snapshot_bytes_cache = (time.monotonic(), value)
            metrics.SNAPSHOT_BYTES.labels(self.volume_id).set(value)
        return value

    def status(self) -> pb.VolumeStatus:
        if self.multiwriter is not None:
            return self._multiwriter_status(self.multiwriter)
        newest = self.lineage.newest()
        lat = list(self.latencies)
        replicas = [pb.ReplicaStatus(
            node=self.node, role=str(self.role), state=pb.IN_SYNC,
            last_sync_unix_ns=self.last_received_ns,
            last_received=ref_message(newest),
            message="fenced: a newer epoch exists" if self.fenced
            else f"writes suspended: {self.suspended}" if self.suspended else "")]
        for link in self.links.values():
            self.refresh_state(link)
            replicas.append(pb.ReplicaStatus(
                node=link.node, role=str(Role.REPLICA), state=STATE_TO_PROTO[link.state],
                lag_seconds=self.lag_of(link), last_sync_unix_ns=link.last_sync_ns,
                rebuild_progress=link.rebuild_progress, last_received=ref_message(link.acked),
                message=link.message))
        return self._status_message(
            replicas, lat, shipped=self.bytes_shipped, received=self.bytes_received,
            conflicts=self.conflicts, last_snapshot=ref_message(newest), fenced=self.fenced,
            attached=self.attached, attach_wanted=self.attach_wanted(),
            journal_records=self.journal_log.records_on(newest),
            consumers_stranded_unix_ns=self.stranded_ns)

    def _status_message(self, replicas: list[pb.ReplicaStatus], latencies: list[float], *,
                        shipped: int, received: int, conflicts: int,
                        **extra: Any) -> pb.VolumeStatus:
        """The status fields every volume reports, whichever way it replicates."""
        return pb.VolumeStatus(
            volume_id=self.volume_id, epoch=self.epoch, primary_node=self.primary,
            role=str(self.role), mode=self.spec.policy.mode, replicas=replicas,
            sync_latency_p50_seconds=percentile(latencies, 0.5),
            sync_latency_p90_seconds=percentile(latencies, 0.9),
            sync_latency_p99_seconds=percentile(latencies, 0.99),
            bytes_shipped=shipped, bytes_received=received, conflicts=conflicts,
            snapshot_bytes=self.snapshot_bytes(), size_bytes=self.spec.size_bytes,
            spec_revision=self.spec.revision, store_filesystem=str(self.filesystem), **extra)

    def _multiwriter_status(self, writer: MultiWriter) -> pb.VolumeStatus:
        """Each peer's state is how current this replica is with that peer's writes."""
        replicas = [pb.ReplicaStatus(node=self.node, role=str(self.role), state=pb.IN_SYNC,
                                     last_sync_unix_ns=writer.last_change_ns),
                    *writer.peer_statuses()]
        for replica in replicas[1:]:
            metrics.LAG.labels(self.volume_id, replica.node).set(replica.lag_seconds)
            for state, value in STATE_TO_PROTO.items():
                metrics.REPLICA_STATE.labels(self.volume_id, replica.node, str(state)).set(
                    1 if value == replica.state else 0)
        lat = list(writer.latencies)
        return self._status_message(
            replicas, lat, shipped=writer.bytes_sent, received=writer.bytes_received,
            conflicts=writer.conflicts, multi_writer=self.spec.multi_writer,
            attached=self.attached, attach_wanted=self.attach_wanted())


class _CommitHooks:
    """What the FUSE daemon's threads call: fsync groups become quorum commits."""

    def __init__(self, engine: VolumeEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop

    def commit(self, paths: list[str], datasync: bool) -> None:
        engine = self.engine
        log.debug("commit requested", volume_id=engine.volume_id, paths=len(paths),
                  mode=pb.Mode.Name(engine.spec.policy.mode))
        policy = engine.spec.policy
        throttle = policy.mode == pb.ASYNCHRONOUS and policy.on_lag_exceeded == pb.THROTTLE
        if engine.multiwriter is not None:
            if policy.mode == pb.SYNCHRONOUS:
                self._wait(engine.multiwriter.commit())
            elif throttle:
                self._hold(engine.multiwriter.hold_writer(THROTTLE_MAX_WAIT_SECONDS))
            return
        if engine.fenced:
            raise OSError(errno.EROFS, "this replica was fenced: a newer primary exists")
        if engine.suspended:
            raise OSError(errno.EROFS, f"writes suspended: {engine.suspended}")
        if engine.role is not Role.PRIMARY:
            return
        if throttle:
            self._hold(engine.wait_lag_within(THROTTLE_MAX_WAIT_SECONDS))
            return
        if policy.mode != pb.SYNCHRONOUS:
            return  # Asynchronous/Scheduled: the daemon already made it durable locally
        server = engine._fuse
        prepared = None if server is None or not engine.journal_useful() else \
            engine.journal_writer.prepare(engine.lineage.live, paths, server, engine.epoch)
        if prepared is not None and self._journal(prepared):
            return
        self._wait(engine.commit())

    def _journal(self, prepared: Prepared) -> bool:
        """Ship a journal record; False when the snapshot commit must do it instead."""
        writer = self.engine.journal_writer
        future = asyncio.run_coroutine_threadsafe(
            self.engine.journal_commit(prepared.record), self.loop)
        try:
            ok = future.result(timeout=JOURNAL_TIMEOUT_SECONDS + 5)
        except Exception:  # noqa: BLE001 - the snapshot commit follows and reports errors
            future.cancel()
            ok = False
        if ok:
            writer.shipped(prepared)
        else:
            writer.stop_on(prepared.base)
        return ok

    def _hold(self, throttle: Coroutine[Any, Any, None]) -> None:
        """Throttle writers: an fsync or close waits while a replica lags beyond maxLag, so
        writers slow down to the pace replication keeps (bounded, never an error)."""
        asyncio.run_coroutine_threadsafe(throttle, self.loop).result(
            timeout=THROTTLE_MAX_WAIT_SECONDS + 5)

    def _wait(self, commit: Coroutine[Any, Any, None]) -> None:
        """Run a quorum commit on the agent's loop; any failure is the caller's EIO."""
        future = asyncio.run_coroutine_threadsafe(commit, self.loop)
        try:
            future.result(timeout=COMMIT_TIMEOUT_SECONDS + 10)
        except Exception as exc:
            future.cancel()
            raise OSError(errno.EIO, f"replication did not reach the write quorum: {exc}") from exc

    def on_write(self, path: str, offset: int, length: int) -> None:
        return None  # passthrough: changes are found through the btrfs increment


def _settle_journal_ack(pending: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback: forget the delivery and mark its outcome retrieved (it was counted)."""
    def settle(task: asyncio.Task[None]) -> None:
        pending.discard(task)
        if not task.cancelled():
            task.exception()
    return settle


def load_state(path: Path) -> PersistedState:
    try:
        return PersistedState.from_json(path.read_bytes())
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidArgument(f"unreadable volume state {path}: {exc}") from exc
