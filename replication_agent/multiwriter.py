"""The file-level merge loop of one multi-writer (ReadWriteMany) volume on one node.

Every replica of a multi-writer volume is writable, so no node may overwrite another's replica
with a btrfs increment. Instead each node:

* scans its live tree (only when the subvolume's ``ctransid`` moved, and at least once a minute),
  rehashing only files whose ``(size, mtime, inode, mode, owner)`` changed, and records each
  changed file, with this node's counter bumped in its version vector, at the next sequence
  number of its change log (a deletion is recorded as a tombstone);
* pulls from every peer, on the policy's interval (``sharedsync.core.file_merge``), the changes
  after the last sequence it merged from that peer, decides for each with version vectors what
  it lacks (``plan_merge``), fetches only that content (checksummed frames, the BLAKE3 content
  digest checked before anything is renamed into place), and applies it; concurrent writes are
  settled by ``conflictResolution`` the same way on every node, counted once per conflict, and
  written to the audit log with both versions' digests.

All decisions are in ``sharedsync.core.file_merge``; this module is the I/O around them: the
tree (``livetree``, never following a symlink), the database (``manifest_db``, one transaction
per scan or merge), and the two Replication RPCs (``PullChanges``, ``FetchContents``) on both
sides. A file about to be replaced is checked against its record right before the rename (and
rehashed when its stat cannot be trusted), so a local write that the last scan has not seen yet
is never overwritten: the change waits for the next round, after the next scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import stat as stat_module
import string
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import grpc
import structlog

from sharedsync.core.audit_chain import AuditKind
from sharedsync.core.change_ages import ChangeAges
from sharedsync.core.chunk_delta import DIGEST_BYTES, chunk_count, split_base
from sharedsync.core.commit_quorum import (
    COMMIT_TIMEOUT_SECONDS,
    commit_settled,
    plan_commit,
    write_quorum,
)
from sharedsync.core.errors import Aborted, FailedPrecondition, InvalidArgument, Unavailable
from sharedsync.core.file_merge import (
    DIRECTORY,
    TOMBSTONE,
    ConflictNote,
    MergePlan,
    Record,
    StatKey,
    Step,
    Write,
    check_path,
    collectable_tombstones,
    exchange_interval,
    is_tracked_mode,
    needs_hash,
    plan_merge,
    plan_scan,
    raised_floor,
    verifiable,
)
from sharedsync.core.framing import CorruptFrame, FrameDecoder, FrameEncoder
from sharedsync.core.tree_refresh import Listing, refresh
from sharedsync.core.version_vectors import ConflictPolicy, VersionVector
from sharedsync.storage import btrfs
from sharedsync.storage.change_watch import ChangeWatch
from sharedsync.storage.files import syncfs
from sharedsync.tasks import cancel_and_wait, wait_event

from . import metrics
from .chunk_fetch import Rebuild, base_of, encode_chunks
from .livetree import Incoming, LiveTree
from .manifest_db import ManifestDB
from .peers import PeerPool
from .proto import agent_pb2 as pb
from .throttle import hold_writer
from .transfer import frame_message, frame_of

if TYPE_CHECKING:
    from .proto.agent_pb2_grpc import ReplicationAsyncStub

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: Changes asked for in one PullChanges call (the caller asks again while there are more).
CHANGES_PER_PULL = 1000
#: Most files (and bytes of their paths) one FetchContents call may ask for: the request must
#: stay well within gRPC's message limit (peers.MAX_MESSAGE_BYTES).
MAX_FILES_PER_FETCH = 10_000
#: Chunk digests sent with one FetchContents request at most (a 1 GiB file's base is 512 KiB;
#: a request must stay under the peers' 8 MiB message limit with its paths).
MAX_BASE_BYTES_PER_FETCH = 4 << 20
MAX_PATH_BYTES_PER_FETCH = 2 << 20
#: Space left free on the replica when a round decides how much new content to fetch: every
#: new version is written beside the old one until the round installs it.
FETCH_SPACE_MARGIN_BYTES = 16 << 20
PULL_TIMEOUT_SECONDS = 60.0
FETCH_TIMEOUT_SECONDS = 600.0
#: A scan walks the tree at least this often even when ``ctransid`` did not move.
FULL_SCAN_EVERY_SECONDS = 60.0
#: How often tombstones every peer merged are dropped (see file_merge.collectable_tombstones).
COLLECT_EVERY_SECONDS = 60.0
#: A peer unreachable this long is reported Stale.
STALE_AFTER_SECONDS = 30.0
MAX_BACKOFF_SECONDS = 5.0
#: How long SyncNow waits for the pull rounds of reachable peers.
SYNC_NOW_WAIT_SECONDS = 300.0
#: How long a commit retries a peer it trusts that is not reachable (the channel's longest
#: reconnect backoff, peers.CHANNEL_OPTIONS) before it counts it out.
RECONNECT_SECONDS = 2.5
#: Pull rounds MergeNow runs before it gives up on changes that keep waiting (a local write
#: to the same file each time).
MERGE_NOW_ROUNDS = 3
READ_SIZE = 1 << 20

MODE_NAMES = {pb.SYNCHRONOUS: "Synchronous", pb.ASYNCHRONOUS: "Asynchronous",
              pb.SCHEDULED: "Scheduled"}
_HEX = set(string.hexdigits.lower())
#: Errors that mean "something of another kind is where this path must go" (a directory where a
#: file must be, a file where a directory must be): not retried, since no round would change it.
_BLOCKING_ERRNOS = (20, 21, 39, 40)  # ENOTDIR, EISDIR, ENOTEMPTY, ELOOP


class Host(Protocol):
    """What the volume engine gives the merge loop."""

    node: str
    volume_id: str
    spec: pb.VolumeSpec
    peers: PeerPool

    epoch: int
    primary: str

    def audit(self, kind: AuditKind, **details: str | int | float | bool) -> None: ...

    def follow_coordinator(self, epoch: int, primary: str) -> None:
        """A peer knows a newer epoch: take its coordinator (no data moves)."""
        ...

    def pace(self, nbytes: int) -> Awaitable[None]: ...

    def writing(self, path: str) -> bool:
        """Whether a pod here has the file at ``path`` open for writing (called from worker
        threads)."""
        ...


async def _finished(work: Awaitable[T]) -> T:
    """Await work done in a worker thread; if cancelled meanwhile, still wait for the thread
    to finish (it holds a transaction and files half-applied) before giving up the lock."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


# -- wire format --------------------------------------------------------------------------------


def change_message(record: Record) -> pb.FileChange:
    message = pb.FileChange(
        path=record.path, seq=record.seq, vector=dict(record.vector.counters),
        digest="" if record.deleted or record.is_directory else record.digest,
        size=record.size, mode=record.mode,
        mtime_ns=record.mtime_ns, deleted=record.deleted, writer=record.writer,
        uid=record.uid, gid=record.gid)
    if record.conflict is not None:
        note = record.conflict
        message.conflict.CopyFrom(pb.ConflictNote(
            id=note.id, path=note.path, resolution=note.resolution,
            winner_node=note.winner_node, winner_digest=note.winner_digest,
            loser_node=note.loser_node, loser_digest=note.loser_digest, kept_as=note.kept_as))
    return message


def record_of(message: pb.FileChange) -> Record:
    """A peer's change as a record, or InvalidArgument when it cannot be one of ours."""
    path = check_path(message.path)
    vector = VersionVector.of(dict(message.vector))
    if not message.writer or not vector:
        raise InvalidArgument(f"change of {path!r} names no writer or has an empty vector")
    mtime_ns = message.mtime_ns
    if message.deleted:
        digest, mode, size = TOMBSTONE, 0, 0
    elif stat_module.S_ISDIR(message.mode):
        digest, mode, size, mtime_ns = DIRECTORY, message.mode, 0, 0
    else:
        if len(message.digest) != 64 or not set(message.digest) <= _HEX:
            raise InvalidArgument(f"change of {path!r} has no BLAKE3 digest")
        if not is_tracked_mode(message.mode):
            raise InvalidArgument(f"change of {path!r} is not a file, symlink or directory")
        digest, mode, size = message.digest, message.mode, message.size
    note = None
    if message.HasField("conflict"):
        c = message.conflict
        note = ConflictNote(id=c.id[:64], path=c.path[:4096], resolution=c.resolution[:32],
                            winner_node=c.winner_node, winner_digest=c.winner_digest,
                            loser_node=c.loser_node, loser_digest=c.loser_digest,
                            kept_as=c.kept_as)
    return Record(path=path, vector=vector, digest=digest, size=size, mode=mode,
                  mtime_ns=mtime_ns, writer=message.writer, uid=message.uid,
                  gid=message.gid, seq=message.seq, conflict=note)


# -- the loop -----------------------------------------------------------------------------------


@dataclass
class PeerView:
    """How current this replica is with one peer's writes."""

    node: str
    since_wall: float = field(default_factory=time.time)  # when this node began pulling it
    caught_up_wall: float = 0.0  # wall time at which the last complete pull round started
    caught_up_ns: int = 0
    unreachable_since: float | None = None
    failures: int = 0
    behind: bool = True  # the last round left changes for later (or never completed)
    message: str = ""


@dataclass
class _Batch:
    """The outcome of merging one answer of PullChanges."""

    cursor: int
    deferred: bool
    applied: int = 0
    #: Some changes were left for a next batch only to bound its size (space, request size),
    #: not because they wait for anything: the round goes on while the cursor moves.
    truncated: bool = False
    notes: list[tuple[ConflictNote, bool]] = field(default_factory=list)  # (note, resolved here)


class _Fetched:
    """Content fetched from a peer for one merge: (path, digest) -> temporary file."""

    def __init__(self) -> None:
        self.ready: dict[tuple[str, str], Incoming] = {}
        self.blocked: set[tuple[str, str]] = set()
        self.error: Exception | None = None

    def discard(self) -> None:
        for incoming in self.ready.values():
            incoming.discard()
        self.ready.clear()


class _Puller:
    """Pulls one peer's changes into this replica, a round at a time, on request."""

    def __init__(self, owner: MultiWriter, node: str) -> None:
        self.owner = owner
        self.view = PeerView(node)
        self._requested = 0
        self._done = 0
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @property
    def node(self) -> str:
        return self.view.node

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"pull-{self.node}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def kick(self) -> int:
        """Ask for one more round; returns the ticket :meth:`wait` takes."""
        self._requested += 1
        self._wake.set()
        return self._requested

    async def wait(self, ticket: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self._done >= ticket)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            target = self._requested
            try:
                await self.owner.pull_from(self.view)
                self.view.failures = 0
                self.view.unreachable_since = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried next round
                self._failed(exc)
                async with self._changed:
                    self._done = target
                    self._changed.notify_all()
                await asyncio.sleep(min(MAX_BACKOFF_SECONDS, 0.2 * 2 ** self.view.failures))
                continue
            async with self._changed:
                self._done = target
                self._changed.notify_all()

    def _failed(self, exc: Exception) -> None:
        view = self.view
        view.failures += 1
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        view.message = f"{type(exc).__name__}: {detail}"[:500]
        reason = code.name.lower() if code is not None else type(exc).__name__
        metrics.SYNC_ERRORS.labels(self.owner.volume_id, reason).inc()
        unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                               grpc.StatusCode.CANCELLED) or isinstance(exc, KeyError)
        if unreachable and view.unreachable_since is None:
            view.unreachable_since = time.monotonic()
        log.warning("pull failed", volume_id=self.owner.volume_id, peer=self.node,
                    error=view.message, failures=view.failures)


class MultiWriter:
    """One node's replica of one multi-writer volume: scan, pull, merge, serve."""

    def __init__(self, host: Host, live: Path, db_path: Path, *,
                 watch_changes: bool = False) -> None:
        self.host = host
        self.node = host.node
        self.volume_id = host.volume_id
        self.tree = LiveTree(live)
        self.db_path = db_path
        self.db: ManifestDB | None = None
        self.records: dict[str, Record] = {}
        self.head = 0
        #: The join of the dropped tombstones' vectors: a path without a record starts here.
        self.floor = VersionVector()
        #: Peer -> the sequence of this replica's change log it says it merged (this run).
        self.merged_by: dict[str, int] = {}
        #: When this run recorded its changes: how long each peer has left them unmerged.
        self.change_ages = ChangeAges()
        self.known_conflicts: set[str] = set()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_change_ns = 0
        #: Durations of the pull rounds that brought changes (status: sync P50/P90/P99).
        self.latencies: deque[float] = deque(maxlen=1024)
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._pullers: dict[str, _Puller] = {}
        self._task: asyncio.Task[None] | None = None
        self._first_scan = True
        self._scanned_hint: int | None = None
        #: Versions whose delta did not rebuild them: fetched whole from then on.
        self._whole: set[tuple[str, str]] = set()
        #: Without btrfs (the ext4 fallback store) inotify tells whether a walk is needed.
        self._watch_changes = watch_changes
        self._watch: ChangeWatch | None = None
        #: The tree's listing at the last scan, kept up to date from inotify between walks.
        self._listing: Listing | None = None
        #: Files that were being written at the last scan: looked at again at the next one.
        self._recheck: set[str] = set()
        #: When the tree was last walked whole.
        self._last_walk = 0.0
        self._last_collect = time.monotonic()
        #: Peers whose last MergeNow failed: a commit waits for them only to make its quorum.
        self.suspects: set[str] = set()
        self._calls: set[asyncio.Task[bool]] = set()
        self._probes: dict[str, asyncio.Task[bool]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the database, take stock of the tree, then start pulling."""
        self.db = await asyncio.to_thread(ManifestDB, self.db_path)
        self.records = await asyncio.to_thread(self.db.records)
        self.head = await asyncio.to_thread(self.db.head)
        self.floor = await asyncio.to_thread(self.db.floor)
        self.known_conflicts = await asyncio.to_thread(self.db.known_conflicts)
        if self._watch_changes:
            self._watch = await asyncio.to_thread(ChangeWatch, self.tree.root)
        await self.scan(force=True)
        self.sync_peers()
        self._task = asyncio.create_task(self._loop(), name=f"multiwriter-{self.volume_id}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        for call in list(self._calls):
            await cancel_and_wait(call)
        for puller in list(self._pullers.values()):
            await puller.stop()
        self._pullers.clear()
        async with self._lock:
            if self.db is not None:
                await asyncio.to_thread(self.db.close)
                self.db = None
            if self._watch is not None:
                self._watch.close()
                self._watch = None

    def remove_state(self) -> None:
        """Delete the database (the replica itself is removed by the engine)."""
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db_path}{suffix}").unlink(missing_ok=True)

    def peer_nodes(self) -> list[str]:
        """The spec's other replicas, by name."""
        return sorted(n for n in self.host.spec.replica_nodes if n != self.node)

    def sync_peers(self) -> None:
        """One puller per other replica of the spec (called again when the spec changes)."""
        wanted = set(self.peer_nodes())
        for node in set(self._pullers) - wanted:
            puller = self._pullers.pop(node)
            asyncio.ensure_future(puller.stop())  # noqa: RUF006 - cancellation only
        for node in sorted(wanted - set(self._pullers)):
            puller = _Puller(self, node)
            self._pullers[node] = puller
            puller.start()
            puller.kick()

    def wake(self) -> None:
        self._wake.set()

    @property
    def conflicts(self) -> int:
        return len(self.known_conflicts)

    def _policy(self) -> ConflictPolicy:
        return ConflictPolicy.KEEP_BOTH \
            if self.host.spec.policy.conflict_resolution == pb.KEEP_BOTH \
            else ConflictPolicy.LAST_WRITER_WINS

    def interval(self) -> float:
        policy = self.host.spec.policy
        return exchange_interval(MODE_NAMES.get(policy.mode, "Asynchronous"),
                                 policy.max_lag_seconds)

    async def _loop(self) -> None:
        while True:
            woken = await wait_event(self._wake, self.interval())
            self._wake.clear()
            if self.host.spec.policy.paused and not woken:
                continue
            try:
                await self.scan()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scan failed", volume_id=self.volume_id)
                await asyncio.sleep(1)
            for puller in self._pullers.values():
                puller.kick()

    async def sync_now(self) -> list[str]:
        """One scan and one pull round from every reachable peer; returns the peers that could
        not be reached (or whose round failed)."""
        await self.scan(force=True)
        pullers = list(self._pullers.values())
        reachable = [p for p in pullers if p.view.unreachable_since is None]
        tickets = [(p, p.kick()) for p in pullers]
        waits = [p.wait(ticket) for p, ticket in tickets if p in reachable]
        async with asyncio.timeout(SYNC_NOW_WAIT_SECONDS):
            await asyncio.gather(*waits)
        missed = [p.node for p in pullers if p not in reachable or p.view.failures > 0]
        self.host.audit(AuditKind.SYNC, trigger="sync-now", multi_writer=True,
                        unreachable=",".join(missed))
        return missed

    # -- Synchronous commits ---------------------------------------------------------------

    async def commit(self) -> None:
        """Synchronous mode: return once ``writeQuorum`` replicas, this one included, merged
        everything written here (an fsync, fdatasync or close of a written file waits on this).

        Every trusted peer is waited for too, so that pods on every reachable node read what
        was fsync'd here when the fsync returns; who is asked and waited for is
        :mod:`sharedsync.core.commit_quorum`'s decision.
        """
        await self.scan()
        db = self.db
        if db is None:
            raise Unavailable(f"volume {self.volume_id} is stopping")
        incarnation, seq = db.incarnation, self.head
        spec = self.host.spec
        need = write_quorum(spec.policy.write_quorum, len(spec.replica_nodes)) - 1
        peers = self.peer_nodes()
        probing = {n for n, call in self._probes.items() if not call.done()}
        plan = plan_commit(peers, self.suspects, probing, need)
        if not plan.ask:
            return
        started = time.monotonic()
        calls = {node: self._merge_on(node, incarnation, seq,
                                      wait=node in plan.wait_for_ready)
                 for node in sorted(plan.ask)}
        acked, pending = 0, set(calls.values())
        deadline = started + COMMIT_TIMEOUT_SECONDS
        while pending:
            trusted_pending = sum(1 for node, call in calls.items()
                                  if call in pending and node not in self.suspects)
            if commit_settled(acked=acked, need=need, trusted_pending=trusted_pending):
                break
            done, pending = await asyncio.wait(pending, timeout=deadline - time.monotonic(),
                                               return_when=asyncio.FIRST_COMPLETED)
            if not done:
                break
            acked += sum(1 for call in done if call.result())
        if acked < need:
            raise Unavailable(f"only {acked} of the {need} peers the write quorum needs merged "
                              f"the change within {COMMIT_TIMEOUT_SECONDS:.0f} s")
        metrics.SYNC_SECONDS.labels(self.volume_id, "Synchronous").observe(
            time.monotonic() - started)

    def _merge_on(self, node: str, incarnation: str, seq: int, *,
                  wait: bool) -> asyncio.Task[bool]:
        """Ask ``node`` to merge this replica's change log up to ``seq``; True once it did.

        A peer that is not reachable fails fast, after retrying for a reconnect's worth of
        time (or, with ``wait``, waits for it to come up within the commit's timeout). The call
        runs to its end even when the commit stops waiting for it: it says whether the peer is
        back.
        """
        async def call() -> bool:
            give_up = time.monotonic() + (0.0 if node in self.suspects else RECONNECT_SECONDS)
            while True:
                try:
                    stub = self.host.peers.stub(node)
                    await stub.MergeNow(pb.MergeNowRequest(
                        volume_id=self.volume_id, from_node=self.node, incarnation=incarnation,
                        seq=seq), timeout=COMMIT_TIMEOUT_SECONDS, wait_for_ready=wait)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.UNAVAILABLE \
                            and time.monotonic() < give_up:
                        await asyncio.sleep(0.2)
                        continue
                    self._suspect(node, str(exc.details()))
                    return False
                except KeyError as exc:
                    self._suspect(node, str(exc))
                    return False
                self.suspects.discard(node)
                if self.db is not None and incarnation == self.db.incarnation:
                    self._merged(node, max(seq, self.merged_by.get(node, 0)))
                return True

        task = asyncio.create_task(call(), name=f"merge-now-{node}")
        self._probes[node] = task
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        return task

    def _suspect(self, node: str, why: str) -> None:
        if node not in self.suspects:
            log.warning("a peer did not merge a Synchronous commit; it is waited for only "
                        "while the write quorum needs it", volume_id=self.volume_id, peer=node,
                        error=why[:300])
        self.suspects.add(node)

    async def merge_now(self, peer: str, incarnation: str, seq: int) -> int:
        """Merge ``peer``'s change log up to ``seq`` now (its Synchronous commit waits for
        this); returns the sequence merged up to.

        This replica is scanned first: a local write not recorded yet would make the merge of
        the same file wait for the next round (see :meth:`_apply`).
        """
        puller = self._pullers.get(peer)
        if puller is None:
            raise FailedPrecondition(f"{peer!r} is not a peer of volume {self.volume_id} on "
                                     f"{self.node}")
        merged = 0
        for _ in range(MERGE_NOW_ROUNDS):
            await self.scan()
            await puller.wait(puller.kick())
            if puller.view.failures:
                raise Unavailable(f"{self.node} could not pull from {peer}: "
                                  f"{puller.view.message}")
            db = self.db
            if db is None:
                raise Unavailable(f"volume {self.volume_id} is stopping")
            known, merged = await asyncio.to_thread(db.cursor, peer)
            if known != incarnation:
                raise FailedPrecondition(f"{peer}'s change log {incarnation!r} is not the one "
                                         f"{self.node} merges ({known!r})")
            if merged >= seq:
                return merged
        raise Aborted(f"{self.node} merged {peer}'s changes up to {merged} of {seq}: the rest "
                      "waits behind local writes to the same files")

    # -- scanning ----------------------------------------------------------------------------

    async def scan(self, force: bool = False) -> int:
        """Record what changed in the tree since the last scan; returns how many records."""
        async with self._lock:
            return await _finished(asyncio.to_thread(self._scan, force))

    def _change_hint(self) -> int | None:
        """The live subvolume's ctransid after committing the page cache, or on ext4 the
        inotify generation (None: unknown, walk)."""
        if self._watch is not None:
            return self._watch.generation()
        try:
            syncfs(self.tree.root)
            return btrfs.subvolume_info(self.tree.root).ctransid
        except OSError:
            return None

    def _scan(self, force: bool) -> int:
        db = self.db
        if db is None:
            return 0
        hint = self._change_hint()
        if hint is not None and hint == self._scanned_hint and not self._walk_due(force):
            return 0
        now = time.time_ns()
        observed = self._observe(force)
        hashed = {}
        unstable = 0
        for path, key in observed.items():
            if needs_hash(self.records.get(path), key):
                found = self.tree.hash_file(path, key)
                if found is None:
                    unstable += 1
                    self._recheck.add(path)
                else:
                    hashed[path] = found
        pending = db.pending() if self._first_scan else {}
        result = plan_scan(self.records, observed, hashed, node=self.node, now_ns=now,
                           next_seq=self.head + 1, pending=pending, floor=self.floor)
        touched = [*result.changed, *result.refreshed]
        if touched or pending:
            db.commit(records=touched, head=result.next_seq - 1, clear_pending=True)
            for record in touched:
                self.records[record.path] = record
            self.head = result.next_seq - 1
        if result.changed:
            self.last_change_ns = now
            self.change_ages.note(self.head, now / 1e9)
            log.debug("scan recorded changes", volume_id=self.volume_id,
                      changed=len(result.changed), unstable=unstable)
        self._first_scan = False
        self._collect(db, force)
        # files being written are retried at the next cycle even if nothing else changes
        self._scanned_hint = hint if unstable == 0 else None
        return len(result.changed)

    def _observe(self, force: bool) -> dict[str, StatKey]:
        """The tree's listing now: the last one re-read where inotify says the tree changed
        (the cost of the change, not of the tree: an ``fsync`` of a Synchronous volume waits
        on this), or a walk of the whole tree on the first scan, on sync-now, once every
        ``FULL_SCAN_EVERY_SECONDS`` (inotify does not see writes through a shared mmap) and
        whenever inotify lost track."""
        places = self._watch.take_places() if self._watch is not None else None
        recheck, self._recheck = self._recheck, set()
        listing, self._listing = self._listing, None  # half updated if a refresh raises
        if places is not None and listing is not None and not self._walk_due(force):
            linked = listing.linked

            def walk_below(directory: str,
                           descend: Callable[[str, StatKey], bool]) -> dict[str, StatKey] | None:
                return self.tree.walk_below(directory, descend, linked=linked)

            refresh(listing, directories=places.directories, trees=places.trees,
                    recheck=recheck, walk_below=walk_below, lstat=self.tree.lstat)
        else:
            self._last_walk = time.monotonic()
            linked = set()
            listing = Listing.of(self.tree.walk(sweep=self._first_scan, linked=linked), linked)
        self._listing = listing
        return listing.entries

    def _walk_due(self, force: bool) -> bool:
        """Whether the next scan walks the whole tree whatever changed: sync-now, or once every
        ``FULL_SCAN_EVERY_SECONDS`` (inotify does not see writes through a shared mmap)."""
        return force or time.monotonic() - self._last_walk >= FULL_SCAN_EVERY_SECONDS

    def _collect(self, db: ManifestDB, force: bool) -> None:
        """Drop the tombstones every current peer merged (at most once a minute, and on
        every forced scan: sync-now)."""
        if not force and time.monotonic() - self._last_collect < COLLECT_EVERY_SECONDS:
            return
        self._last_collect = time.monotonic()
        dropped = collectable_tombstones(self.records, self.merged_by, self.peer_nodes())
        if not dropped:
            return
        floor = raised_floor(self.floor, dropped)
        db.drop_tombstones(dropped, floor)
        for record in dropped:
            del self.records[record.path]
        self.floor = floor
        log.debug("dropped tombstones every peer merged", volume_id=self.volume_id,
                  dropped=len(dropped))

    # -- pulling -----------------------------------------------------------------------------

    async def pull_from(self, view: PeerView) -> None:
        """Merge everything the peer recorded since the last round (one round)."""
        db = self.db
        if db is None:
            return
        started_wall, started_ns = time.time(), time.time_ns()
        started = time.monotonic()
        stub = self.host.peers.stub(view.node)
        incarnation, cursor = await asyncio.to_thread(db.cursor, view.node)
        first_cursor = cursor
        applied = 0
        while True:
            header, changes, last_seq = await self._read_changes(stub, incarnation, cursor)
            if header.epoch > self.host.epoch and header.primary_node:
                self.host.follow_coordinator(header.epoch, header.primary_node)
            if incarnation and header.incarnation != incarnation:
                log.info("peer change log started over; pulling it from the beginning",
                         volume_id=self.volume_id, peer=view.node)
                incarnation, cursor = header.incarnation, 0
                await self._save_cursor(view.node, incarnation, 0)
                continue
            incarnation = header.incarnation
            complete = last_seq is None or last_seq >= header.head_seq
            end = max(header.head_seq, cursor) if complete else (last_seq or cursor)
            if not changes and end == cursor:
                batch = _Batch(cursor=cursor, deferred=False)  # nothing new: nothing to write
            else:
                batch = await self._merge(view.node, incarnation, changes, end)
            applied += batch.applied
            self._report(view.node, batch)
            moved, cursor = batch.cursor > cursor, batch.cursor
            if batch.deferred and not (batch.truncated and moved):
                break  # what is left waits (behind local writes), or nothing moved
            if complete and not batch.deferred:
                break
        if cursor > first_cursor:
            # tell the peer now what this round merged (its view of our lag behind it, and its
            # Throttle, count on it); it would learn it only with the next round's request
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._read_changes(stub, incarnation, cursor, limit=1)
        view.behind = batch.deferred
        if not batch.deferred:
            view.caught_up_wall, view.caught_up_ns = started_wall, started_ns
        view.message = "some changes wait for the next round" if batch.deferred else ""
        if applied:
            seconds = time.monotonic() - started
            self.latencies.append(seconds)
            metrics.SYNC_SECONDS.labels(
                self.volume_id, MODE_NAMES.get(self.host.spec.policy.mode, "")).observe(seconds)
            self.host.audit(AuditKind.SYNC, peer=view.node, multi_writer=True,
                            applied=applied, cursor=cursor, seconds=round(seconds, 6))
        metrics.LAG.labels(self.volume_id, view.node).set(self.lag_of(view))

    async def _save_cursor(self, peer: str, incarnation: str, seq: int) -> None:
        db = self.db
        if db is not None:
            async with self._lock:
                await asyncio.to_thread(db.commit, records=(), head=self.head,
                                        cursor=(peer, incarnation, seq))

    async def _read_changes(self, stub: ReplicationAsyncStub, incarnation: str, since: int,
                            limit: int = CHANGES_PER_PULL,
                            ) -> tuple[pb.PullChangesHeader, list[Record], int | None]:
        """One PullChanges answer: header, valid changes, last sequence number seen."""
        call = stub.PullChanges(pb.PullChangesRequest(
            volume_id=self.volume_id, since_seq=since, from_node=self.node,
            max_changes=limit, incarnation=incarnation),
            timeout=PULL_TIMEOUT_SECONDS)
        header: pb.PullChangesHeader | None = None
        changes: list[Record] = []
        last: int | None = None
        async for message in call:
            if message.WhichOneof("body") == "header":
                header = message.header
                continue
            last = message.change.seq
            try:
                changes.append(record_of(message.change))
            except InvalidArgument as exc:
                log.warning("ignored an invalid change from a peer", volume_id=self.volume_id,
                            error=str(exc)[:300])
        if header is None:
            raise InvalidArgument("a PullChanges answer starts with its header")
        return header, changes, last

    async def _merge(self, peer: str, incarnation: str, changes: list[Record],
                     end: int) -> _Batch:
        """Plan, fetch what is missing (without holding the lock), then plan again and apply
        under the lock: whatever changed in between (a scan, another peer's merge) is seen."""
        wanted: dict[tuple[str, str], tuple[str, bool]] = {}
        truncated = False
        if changes:
            async with self._lock:
                wanted, truncated = await asyncio.to_thread(self._content_wanted, changes)
        fetched = await self._fetch(peer, wanted) if wanted else _Fetched()
        try:
            async with self._lock:
                batch = await _finished(asyncio.to_thread(
                    self._apply, peer, incarnation, changes, end, fetched))
        finally:
            await asyncio.to_thread(fetched.discard)
        if fetched.error is not None:
            raise fetched.error
        return replace(batch, truncated=truncated)

    def _content_wanted(self, changes: list[Record],
                        ) -> tuple[dict[tuple[str, str], tuple[str, bool]], bool]:
        """(peer path, digest) -> (where it goes here, is it a symlink) for every step whose
        content must come from the peer, for as many changes as one batch takes; and whether
        some were left for the next batch.

        A batch holds all its new versions beside the old ones until it installs them, so it
        takes only what fits in the replica's free space (at least one change: one that cannot
        fit fails with ENOSPC, and says so), and what one request can name.
        """
        policy = self._policy()
        wanted: dict[tuple[str, str], tuple[str, bool]] = {}
        path_bytes = content_bytes = 0
        room = self.tree.free_bytes() - FETCH_SPACE_MARGIN_BYTES
        for change in changes:
            try:
                plan = plan_merge(self.records, change, policy)
            except InvalidArgument:
                continue
            needed = {(s.source.path, s.record.digest): (s.path, s.record)
                      for s in plan.steps if s.write is Write.CONTENT and s.source is not None
                      and not s.source.local}
            size = sum(record.size for _, record in needed.values())
            if wanted and (content_bytes + size > room or len(wanted) >= MAX_FILES_PER_FETCH
                           or path_bytes >= MAX_PATH_BYTES_PER_FETCH):
                return wanted, True  # the rest goes in the next batch
            for key, (path, record) in needed.items():
                wanted.setdefault(key, (path, stat_module.S_ISLNK(record.mode)))
                path_bytes += len(key[0].encode()) + 80
            content_bytes += size
        return wanted, False

    async def _fetch(self, peer: str,
                     wanted: dict[tuple[str, str], tuple[str, bool]]) -> _Fetched:
        """Fetch the wanted contents into temporary files beside their destinations; each
        one is kept only if its frames verified and its digest is the one asked for."""
        fetched = _Fetched()
        current: tuple[tuple[str, str], Incoming, FrameDecoder] | None = None
        rebuild: Rebuild | None = None
        bases = await asyncio.to_thread(self._bases, wanted)
        request = pb.FetchContentsRequest(
            volume_id=self.volume_id, from_node=self.node,
            files=[pb.ContentWanted(path=path, digest=digest,
                                    base=bases[path, digest][0] if (path, digest) in bases
                                    else b"")
                   for path, digest in wanted])

        async def drop() -> None:
            nonlocal current, rebuild
            if current is not None:
                await asyncio.to_thread(current[1].discard)
            if rebuild is not None:
                rebuild.close()
            current = rebuild = None

        try:
            call = self.host.peers.stub(peer).FetchContents(request,
                                                           timeout=FETCH_TIMEOUT_SECONDS)
            async for message in call:
                if message.WhichOneof("body") == "header":
                    await drop()  # the previous file was cut short
                    header = message.header
                    key = (header.path, header.digest)
                    if not header.available or key not in wanted or key in fetched.ready:
                        continue
                    if header.delta and key not in bases:
                        log.warning("a delta was sent for a file asked for whole",
                                    volume_id=self.volume_id, peer=peer, path=key[0])
                        continue
                    destination, symlink = wanted[key]
                    try:
                        incoming = await asyncio.to_thread(self.tree.incoming, destination,
                                                           symlink)
                    except OSError as exc:
                        if exc.errno in _BLOCKING_ERRNOS:
                            fetched.blocked.add(key)
                        log.warning("cannot place incoming content", volume_id=self.volume_id,
                                    path=destination, error=str(exc))
                        continue
                    current = (key, incoming, FrameDecoder())
                    if header.delta:
                        rebuild = await asyncio.to_thread(
                            self._rebuild, incoming, key, bases[key], header.size)
                        if rebuild is None:  # the base changed here since it was digested
                            await drop()
                    continue
                if current is None:
                    continue  # frames of content we are not taking
                key, incoming, decoder = current
                try:
                    raw = decoder.accept(frame_of(message.frame))
                    if rebuild is not None:
                        await asyncio.to_thread(rebuild.feed, raw)
                    elif raw:
                        await asyncio.to_thread(incoming.write, raw)
                except (CorruptFrame, InvalidArgument) as exc:
                    log.warning("corrupt content frame", volume_id=self.volume_id, peer=peer,
                                path=key[0], error=str(exc))
                    self._whole.add(key)
                    await drop()
                    continue
                self.bytes_received += len(raw)
                metrics.BYTES.labels(self.volume_id, "received").inc(len(raw))
                if decoder.finished:
                    try:
                        whole = rebuild.finish(key[1]) if rebuild is not None \
                            else message.frame.stream_digest.hex() == key[1]
                    except InvalidArgument:
                        whole = False
                    if whole:
                        fetched.ready[key] = incoming
                        current = None
                    else:
                        log.info("content changed while it was read (or its delta did not "
                                 "rebuild it)", volume_id=self.volume_id, peer=peer,
                                 path=key[0], delta=rebuild is not None)
                        if rebuild is not None:
                            self._whole.add(key)  # next time, the whole content
                    await drop()
        except grpc.aio.AioRpcError as exc:
            fetched.error = exc  # apply what arrived whole; the rest waits for the next round
        except BaseException:
            await asyncio.to_thread(fetched.discard)
            raise
        finally:
            await drop()
        return fetched

    def _bases(self, wanted: dict[tuple[str, str], tuple[str, bool]],
               ) -> dict[tuple[str, str], tuple[bytes, StatKey]]:
        """Chunk digests of the local versions worth a delta (worker thread), within a budget
        per request so that the request stays small."""
        bases: dict[tuple[str, str], tuple[bytes, StatKey]] = {}
        budget = MAX_BASE_BYTES_PER_FETCH
        for key, (_, symlink) in wanted.items():
            if symlink or key in self._whole:
                continue
            record = self.records.get(key[0])
            if record is None or chunk_count(record.size) * DIGEST_BYTES > budget:
                continue
            found = base_of(self.tree, record)
            if found is not None:
                bases[key] = found
                budget -= len(found[0])
        return bases

    def _rebuild(self, incoming: Incoming, key: tuple[str, str], base: tuple[bytes, StatKey],
                 size: int) -> Rebuild | None:
        reader = self.tree.open_version(key[0], base[1])
        if reader is None:
            return None
        return Rebuild(incoming, reader, size, len(base[0]) // DIGEST_BYTES)

    def _apply(self, peer: str, incarnation: str, changes: list[Record], end: int,
               fetched: _Fetched) -> _Batch:
        """Merge a batch (worker thread, under the lock): one transaction at the end."""
        db = self.db
        if db is None:
            return _Batch(cursor=0, deferred=True)
        policy = self._policy()
        deferred: list[int] = []
        todo: list[tuple[Record, MergePlan]] = []
        touched: set[str] = set()
        for change in changes:
            try:
                plan = plan_merge(self.records, change, policy)
            except InvalidArgument as exc:
                log.warning("change not applicable", volume_id=self.volume_id, peer=peer,
                            error=str(exc)[:300])
                continue
            if plan.skip:
                continue
            paths = {step.path for step in plan.steps}
            if paths & touched or any(self._under_a_writer(step) for step in plan.steps):
                deferred.append(change.seq)  # one change per path per batch; see above
                continue
            missing = [step for step in plan.steps if step.write is Write.CONTENT
                       and step.source is not None and not step.source.local
                       and self._fetched_for(step, fetched) is None]
            if missing:
                if all((s.source.path, s.record.digest) in fetched.blocked for s in missing
                       if s.source is not None):
                    self._blocked(peer, change, "a file or directory of another kind is "
                                                "in the way")
                    continue
                deferred.append(change.seq)
                continue
            touched |= paths
            todo.append((change, plan))
        if todo:
            db.set_pending(step.record for _, plan in todo for step in plan.steps)
        head = self.head
        written: list[Record] = []
        notes: list[tuple[ConflictNote, bool]] = []
        applied = 0
        now = time.time_ns()
        for change, plan in todo:
            outcome = "done"
            for step in plan.steps:
                try:
                    done = self._carry_out(step, fetched)
                except OSError as exc:
                    if exc.errno in _BLOCKING_ERRNOS:
                        self._blocked(peer, change, str(exc))
                        outcome = "blocked"
                    else:
                        log.warning("could not apply a change", volume_id=self.volume_id,
                                    path=step.path, error=str(exc))
                        outcome = "deferred"
                    break
                if done is None:
                    outcome = "deferred"
                    break
                head += 1
                record = replace(done, seq=head)
                self.records[record.path] = record
                written.append(record)
            if outcome == "done":
                applied += 1
                notes += [(n, True) for n in plan.resolved] + [(n, False) for n in plan.learned]
            elif outcome == "deferred":
                deferred.append(change.seq)
        fresh: list[tuple[ConflictNote, bool]] = []
        for note, here in notes:
            if note.id not in self.known_conflicts:
                self.known_conflicts.add(note.id)
                fresh.append((note, here))
        cursor = min(deferred) - 1 if deferred else end
        db.commit(records=written, head=head, cursor=(peer, incarnation, cursor),
                  conflicts=[(note, now) for note, _ in fresh], clear_pending=bool(todo))
        self.head = head
        if written:
            self.last_change_ns = now
        return _Batch(cursor=cursor, deferred=bool(deferred), applied=applied, notes=fresh)

    def _blocked(self, peer: str, change: Record, why: str) -> None:
        log.warning("a peer's version cannot be placed here; skipped", volume_id=self.volume_id,
                    peer=peer, path=change.path, reason=why)
        self.host.audit(AuditKind.CONFLICT, action="skipped", path=change.path[:500], peer=peer,
                        digest="" if change.deleted else change.digest, reason=why[:200])

    @staticmethod
    def _fetched_for(step: Step, fetched: _Fetched) -> Incoming | None:
        source = step.source
        if source is None:
            return None
        incoming = fetched.ready.get((source.path, step.record.digest))
        return incoming if incoming is not None and incoming.rel == step.path else None

    def _on_disk_as(self, path: str, expect: Record | None) -> bool:
        """Whether the file at ``path`` is still the version ``expect`` (None or a tombstone:
        nothing there). A stat that cannot be trusted is confirmed by rehashing."""
        current = self.tree.lstat(path)
        if expect is None or expect.deleted:
            if current is not None and not is_tracked_mode(current.mode):
                raise OSError(errno.EISDIR, f"{path} is a device, FIFO or socket here")
            return current is None
        if current is None or expect.stat is None or current != expect.stat:
            return False
        if needs_hash(expect, current):
            rehashed = self.tree.hash_file(path, current)
            return rehashed is not None and rehashed.digest == expect.digest
        return True

    def _under_a_writer(self, step: Step) -> bool:
        """Whether ``step`` would replace or remove a file a pod here has open for writing.

        Its next writes would go to a file that is no longer there, lost without a trace; so
        the change waits until the pod closes the file, whose version is then recorded, and
        the two meet as a conflict like any other.
        """
        return step.write in (Write.CONTENT, Write.DELETE) and self.host.writing(step.path)

    def _carry_out(self, step: Step, fetched: _Fetched) -> Record | None:
        """Do one step; the record to store (stat filled in), or None to retry later."""
        if step.write is Write.DIRECTORY and (step.expect is None or step.expect.deleted):
            # a directory made here for files that arrived first is taken over
            current = self.tree.lstat(step.path)
            if current is not None and not stat_module.S_ISDIR(current.mode):
                return None  # a file not scanned yet: it is a conflict, seen next round
        elif not self._on_disk_as(step.path, step.expect):
            return None
        if self._under_a_writer(step):
            return None  # opened for writing since the batch was planned
        record = step.record
        now = time.time_ns()
        expect = step.expect
        if step.write is Write.NONE:
            if record.deleted:
                return replace(record, stat=None, hashed_at_ns=now)
            if expect is None or expect.stat is None:
                return None
            return replace(record, stat=expect.stat, hashed_at_ns=expect.hashed_at_ns)
        if step.write is Write.METADATA:
            return replace(record, stat=self.tree.set_metadata(step.path, record),
                           hashed_at_ns=now)
        if step.write is Write.DELETE:
            if expect is not None and expect.is_directory:
                # not empty: written here meanwhile, so it stays, and the next scan records
                # it again (which brings it back on the peer)
                self.tree.remove_directory(step.path)
            else:
                self.tree.unlink(step.path)
            return replace(record, stat=None, hashed_at_ns=now)
        if step.write is Write.DIRECTORY:
            return replace(record, stat=self.tree.make_directory(step.path, record),
                           hashed_at_ns=now)
        source = step.source
        if source is None:
            return None
        if source.local:
            origin = self.records.get(source.path)
            if origin is None or origin.deleted or origin.stat is None \
                    or origin.digest != record.digest \
                    or not self._on_disk_as(source.path, origin):
                return None
            incoming = self.tree.copy_of(source.path, origin.stat, step.path)
        else:
            incoming = self._fetched_for(step, fetched)
            if incoming is not None:
                del fetched.ready[(source.path, record.digest)]
        if incoming is None:
            return None
        try:
            if expect is not None and expect.is_directory \
                    and not self.tree.remove_directory(step.path):
                raise OSError(errno.ENOTEMPTY,
                              f"{step.path} is a directory that is not empty here")
            key = incoming.finish(record)
            incoming.install()
        except BaseException:
            incoming.discard()
            raise
        return replace(record, stat=key, hashed_at_ns=now)

    def _report(self, peer: str, batch: _Batch) -> None:
        for note, here in batch.notes:
            metrics.CONFLICTS.labels(self.volume_id).inc()
            self.host.audit(
                AuditKind.CONFLICT, action="resolved" if here else "learned", peer=peer,
                id=note.id, path=note.path[:500], resolution=note.resolution,
                winner_node=note.winner_node, winner_digest=note.winner_digest,
                loser_node=note.loser_node, loser_digest=note.loser_digest,
                kept_as=note.kept_as[:500])
            log.info("conflict", volume_id=self.volume_id, path=note.path, how="resolved"
                     if here else "learned", winner=note.winner_node, loser=note.loser_node,
                     kept_as=note.kept_as)

    # -- serving -----------------------------------------------------------------------------

    def _merged(self, peer: str, seq: int) -> None:
        """``peer`` said it merged this replica's change log up to ``seq`` (a peer that starts
        over, its replica rebuilt, says less than before)."""
        self.merged_by[peer] = seq
        self.change_ages.forget_merged(self.merged_by.get(n, 0) for n in self.peer_nodes())

    async def serve_changes(self, request: pb.PullChangesRequest,
                            ) -> AsyncIterator[pb.PullChangesMessage]:
        db = self.db
        if db is None:
            raise InvalidArgument(f"volume {self.volume_id} is stopping")
        limit = min(request.max_changes or CHANGES_PER_PULL, 10 * CHANGES_PER_PULL)
        head, records = await asyncio.to_thread(db.changes_after, request.since_seq, limit)
        if request.incarnation == db.incarnation and request.since_seq <= head:
            self._merged(request.from_node, request.since_seq)
        yield pb.PullChangesMessage(header=pb.PullChangesHeader(
            incarnation=db.incarnation, head_seq=head, epoch=self.host.epoch,
            primary_node=self.host.primary))
        for record in records:
            yield pb.PullChangesMessage(change=change_message(record))

    async def serve_contents(self, request: pb.FetchContentsRequest,
                             ) -> AsyncIterator[pb.ContentMessage]:
        if len(request.files) > MAX_FILES_PER_FETCH:
            raise InvalidArgument(f"at most {MAX_FILES_PER_FETCH} files per FetchContents")
        for wanted in request.files:
            record = self.records.get(wanted.path)
            reader = None
            if record is not None and not record.deleted and record.stat is not None \
                    and record.digest == wanted.digest:
                reader = await asyncio.to_thread(self.tree.open_version, wanted.path,
                                                 record.stat)
            if record is None or reader is None:
                yield pb.ContentMessage(header=pb.ContentHeader(
                    path=wanted.path, digest=wanted.digest, available=False))
                continue
            base = split_base(wanted.base) if wanted.base else None
            with reader:
                yield pb.ContentMessage(header=pb.ContentHeader(
                    path=wanted.path, digest=wanted.digest, available=True, size=record.size,
                    delta=base is not None))
                encoder = FrameEncoder()
                if base is None:
                    while chunk := await asyncio.to_thread(reader.read, READ_SIZE):
                        for frame in encoder.feed(chunk):
                            yield await self._sent(frame_message(frame).frame)
                else:
                    index, end = 0, chunk_count(record.size)
                    while index < end:
                        items, after = await asyncio.to_thread(encode_chunks, reader, base,
                                                               index, end)
                        if after == index:
                            break  # shorter than recorded: the caller refuses what it got
                        index = after
                        for frame in encoder.feed(items):
                            yield await self._sent(frame_message(frame).frame)
                yield await self._sent(frame_message(encoder.finish()).frame)

    async def _sent(self, frame: pb.Frame) -> pb.ContentMessage:
        await self.host.pace(len(frame.payload))
        self.bytes_sent += len(frame.payload)
        metrics.BYTES.labels(self.volume_id, "sent").inc(len(frame.payload))
        return pb.ContentMessage(frame=frame)

    # -- repair ------------------------------------------------------------------------------

    async def verify(self) -> list[str]:
        """Files whose content no longer matches the digest recorded for them although their
        stat says they were not written since (or that cannot be read back at all)."""
        async with self._lock:
            return await _finished(asyncio.to_thread(self._verify))

    def _verify(self) -> list[str]:
        damaged = []
        for path, key in self.tree.walk().items():
            record = self.records.get(path)
            if record is None or not verifiable(record, key):
                continue  # missing, a tombstone, not a file, or written since: not judgeable
            try:
                found = self.tree.hash_file(path, key)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    damaged.append(path)
                continue
            if found is not None and found.digest != record.digest:
                damaged.append(path)
        if damaged:
            log.warning("files no longer match their recorded digests", volume_id=self.volume_id,
                        files=damaged[:20], count=len(damaged))
        return damaged

    async def repair(self, damaged: Iterable[str]) -> list[str]:
        """Replace unreadable files with a peer's copy of the same version."""
        repaired = []
        for path in damaged:
            record = self.records.get(path)
            if record is None or record.deleted:
                continue
            key = (path, record.digest)
            for puller in list(self._pullers.values()):
                fetched = await self._fetch(puller.node, {
                    key: (path, stat_module.S_ISLNK(record.mode))})
                incoming = fetched.ready.pop(key, None)
                await asyncio.to_thread(fetched.discard)
                if incoming is None:
                    continue
                async with self._lock:
                    current = self.records.get(path)
                    if current is None or current.digest != record.digest:
                        await asyncio.to_thread(incoming.discard)
                        break  # it changed meanwhile: nothing left to repair
                    stat = await asyncio.to_thread(incoming.finish, current)
                    await asyncio.to_thread(incoming.install)
                    fixed = replace(current, stat=stat, hashed_at_ns=time.time_ns())
                    self.records[path] = fixed
                    if self.db is not None:
                        await asyncio.to_thread(self.db.commit, records=[fixed], head=self.head)
                repaired.append(path)
                break
        return repaired

    # -- status ------------------------------------------------------------------------------

    def lag_of(self, view: PeerView) -> float:
        """How far this replica and the peer are apart, either way: the age of the oldest
        change of the peer's not merged here (bounded by the time since the start of the last
        round that merged everything it had), or of this replica's the peer has not merged."""
        pulled = max(0.0, time.time() - (view.caught_up_wall or view.since_wall))
        return max(pulled, self.behind_by(view.node))

    def behind_by(self, peer: str) -> float:
        """Seconds the oldest change recorded here that ``peer`` has not merged has waited."""
        return self.change_ages.age(self.merged_by.get(peer, 0), time.time())

    async def hold_writer(self, limit: float) -> None:
        """``onLagExceeded: Throttle``: hold a writer (its fsync or close) while a reachable
        peer has left a change of this replica unmerged for longer than maxLag.

        What was written so far is recorded first, so that it counts; the writer is released
        once no reachable peer lags so, or after ``limit`` seconds. A writer that outpaces
        replication is thereby slowed to its pace.
        """
        await self.scan()
        await hold_writer(self.volume_id, lambda: any(
            puller.view.unreachable_since is None and self.behind_by(node) > self.max_lag()
            for node, puller in self._pullers.items()), limit)

    def max_lag(self) -> float:
        policy = self.host.spec.policy
        if policy.mode == pb.ASYNCHRONOUS:
            return max(policy.max_lag_seconds or 5.0, 2 * self.interval())
        return 3 * self.interval()

    def peer_statuses(self) -> list[pb.ReplicaStatus]:
        statuses = []
        coordinator = self.host.spec.primary_node
        for node in sorted(self._pullers):
            view = self._pullers[node].view
            lag = self.lag_of(view)
            if view.unreachable_since is not None and \
                    time.monotonic() - view.unreachable_since > STALE_AFTER_SECONDS:
                state = pb.STALE
            elif view.behind or view.failures or lag > self.max_lag() or node in self.suspects:
                state = pb.LAGGING
            else:
                state = pb.IN_SYNC
            message = view.message or ("its last merge of a Synchronous commit from here "
                                       "failed: fsync waits for it only while the write "
                                       "quorum needs it" if node in self.suspects else "")
            statuses.append(pb.ReplicaStatus(
                node=node, role="primary" if node == coordinator else "replica", state=state,
                lag_seconds=lag, last_sync_unix_ns=view.caught_up_ns, message=message))
        return statuses

