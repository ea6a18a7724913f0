"""The agent: every volume replica this node holds, and the two gRPC services over them.

``Replication`` is what peers call (Holdings, Push; PullChanges, FetchContents and MergeNow
for multi-writer volumes); ``Agent`` is what the operator, the CSI
node plugin and the CLI call (apply, remove, promote, sync now, attach, status). Both are thin:
they validate, find the volume's :class:`VolumeEngine`, and ask it.
"""

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

from sharedsync import __version__
from sharedsync.core.audit_chain import AuditKind
from sharedsync.core.errors import FailedPrecondition, InvalidArgument, NotFound
from sharedsync.core.framing import FrameEncoder
from sharedsync.core.ids import check_id, is_snapshot_id
from sharedsync.storage.replicas import ReplicaStore, Source, StoreFilesystem, VolumeKind
from sharedsync.storage.support import kernel_supports
from sharedsync.tasks import finish_first

from .audit import AuditLog
from .config import AgentConfig, VolumeConfig
from .fuse.mount import abort_connection, fuse_mounts, unmount
from .lineage import SYNC_DIR, SnapRef
from .multiwriter import MultiWriter
from .peers import PeerPool
from .proto import agent_pb2 as pb
from .proto import agent_pb2_grpc
from .qos import NodeBandwidth
from .snapshots import SnapshotRecord, SnapshotRecords
from .transfer import frame_message, ref_message, ref_of
from .volume import PersistedState, Role, VolumeEngine, load_state

log = structlog.get_logger(__name__)
T = TypeVar("T")

#: How long one volume may take to stop its loops before the agent moves on.
STOP_TIMEOUT_SECONDS = 5.0
#: How often primaries check whether they are cut off from the API server and their peers.
ISOLATION_CHECK_SECONDS = 0.5
#: Attempts at unmounting a busy replica at shutdown, half a second apart.
CLOSE_ATTEMPTS = 6
#: How long SyncNow and CreateSnapshot wait for every replica to acknowledge a sync point.
SYNC_WAIT_SECONDS = 300.0
#: Attempts at snapshotting a fresh sync point that a newer one replaced (and pruning removed)
#: between the acknowledgement and the snapshot.
SNAPSHOT_ATTEMPTS = 3
#: How much of a refused Push stream is read on before the refusal is answered (see
#: ``drain_refused``): about 512 MiB at the usual frame size.
REFUSED_DRAIN_SECONDS = 5.0
REFUSED_DRAIN_MESSAGES = 512
MODES = {"Synchronous": pb.SYNCHRONOUS, "Asynchronous": pb.ASYNCHRONOUS,
         "Scheduled": pb.SCHEDULED}


def spec_from_config(volume: VolumeConfig) -> pb.VolumeSpec:
    """The Agent API's VolumeSpec for a volume listed in a standalone config file."""
    p = volume.policy
    policy = pb.VolumePolicy(
        mode=MODES[p.mode], replicas=len(volume.replicas), write_quorum=p.write_quorum,
        max_lag_seconds=p.max_lag, on_lag_exceeded=pb.THROTTLE if p.on_lag_exceeded ==
        "Throttle" else pb.ALERT, schedule=p.schedule, manual_trigger=p.manual_trigger,
        paused=p.paused, bandwidth_bytes_per_second=p.bandwidth, priority=p.priority,
        rebuild_bandwidth_bytes_per_second=p.rebuild_bandwidth,
        conflict_resolution=pb.KEEP_BOTH if p.conflict_resolution == "KeepBoth"
        else pb.LAST_WRITER_WINS, scrub_interval_seconds=p.scrub_interval,
        auto_repair=p.auto_repair)
    return pb.VolumeSpec(volume_id=volume.volume_id, size_bytes=volume.size, kind=volume.kind,
                         policy=policy, replica_nodes=volume.replicas,
                         primary_node=volume.primary, epoch=volume.epoch,
                         multi_writer=volume.multi_writer, file_level=volume.file_level)


def validate_spec(spec: pb.VolumeSpec, node: str) -> None:
    """Refuse a spec that cannot be served, naming the field."""
    check_id(spec.volume_id, "volume_id")
    if spec.size_bytes <= 0:
        raise InvalidArgument("size_bytes must be positive")
    if spec.kind not in ("", "filesystem", "block"):
        raise InvalidArgument(f"kind must be filesystem or block, got {spec.kind!r}")
    if node not in spec.replica_nodes:
        raise InvalidArgument(f"replica_nodes does not include this node ({node})")
    if spec.primary_node not in spec.replica_nodes:
        raise InvalidArgument(f"primary_node {spec.primary_node!r} is not in replica_nodes")
    for peer, address in spec.peer_addresses.items():
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise InvalidArgument(f"peer_addresses[{peer}] must be host:port, got {address!r}")
    if len(set(spec.replica_nodes)) != len(spec.replica_nodes):
        raise InvalidArgument("replica_nodes lists a node twice")
    policy = spec.policy
    if policy.mode == pb.MODE_UNSPECIFIED:
        raise InvalidArgument("policy.mode is required")
    if policy.write_quorum > len(spec.replica_nodes):
        raise InvalidArgument(f"policy.write_quorum {policy.write_quorum} exceeds the "
                              f"{len(spec.replica_nodes)} replicas")
    if spec.file_level and spec.kind == "block":
        raise InvalidArgument("file_level needs a filesystem volume: files are replicated one "
                              "by one, and a block device has no files")
    if spec.multi_writer and spec.kind == "block":
        raise InvalidArgument("multi_writer needs a filesystem volume: concurrent writers on "
                              "several nodes are merged file by file, and a block device has "
                              "no files")
    if policy.mode == pb.SYNCHRONOUS and spec.kind == "block":
        raise InvalidArgument("Synchronous mode needs a filesystem volume: the agent cannot "
                              "see fsync on a raw block device")
    if policy.mode == pb.SCHEDULED and not policy.schedule:
        raise InvalidArgument("policy.schedule is required in Scheduled mode")
    if policy.schedule:
        from sharedsync.core.schedule import parse_cron
        parse_cron(policy.schedule)


def store_filesystem(setting: str) -> StoreFilesystem:
    """The filesystem of new replicas: as configured, or for ``auto`` btrfs when the kernel
    has it and the ext4 fallback otherwise."""
    if setting != "auto":
        return StoreFilesystem(setting)
    if kernel_supports("btrfs"):
        return StoreFilesystem.BTRFS
    log.warning("this kernel has no btrfs: new replicas use the ext4 fallback store "
                "(files replicated one by one)")
    return StoreFilesystem.EXT4


class Agent(agent_pb2_grpc.AgentServicer, agent_pb2_grpc.ReplicationServicer):
    """All replicas on this node."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.node = config.node
        data = config.data_dir
        self.store = ReplicaStore(data / "replicas", store_filesystem(config.store_filesystem))
        self.state_dir = data / "agent" / "volumes"
        self.spool_dir = data / "agent" / "spool"
        self.audit_log = AuditLog(data / "agent" / "audit", config.node,
                                  max_bytes=config.audit_max_bytes, keep=config.audit_keep)
        self.peers = PeerPool(config.peers, config.tls)
        self.node_bandwidth = NodeBandwidth(config.node_bandwidth)
        self.snapshot_records = SnapshotRecords(data / "agent" / "snapshots")
        self.engines: dict[str, VolumeEngine] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._in_flight: set[asyncio.Future[Any]] = set()

    def _lock(self, volume_id: str) -> asyncio.Lock:
        return self._locks.setdefault(volume_id, asyncio.Lock())

    async def _to_completion(self, work: Coroutine[Any, Any, T]) -> T:
        """Run a change of many steps to its end even if its caller stops waiting.

        gRPC cancels a handler when its client goes away (an operator killed mid-reconcile, a
        deadline that expired). Cancelled between its steps, ApplyVolume would leave a replica
        mounted with no engine to serve or close it, RemoveVolume a replica half removed. The
        calls run this way are idempotent, so the caller's retry finds the work done, or waits
        for it behind the volume's lock; a shutdown waits for them too.
        """
        task = asyncio.ensure_future(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return await finish_first(task)

    # -- startup -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume every volume persisted by a previous run, then apply the config's volumes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fuse_root = self.state_dir.parent / "fuse"
        for stale in await asyncio.to_thread(reclaim_fuse_mounts, fuse_root):
            log.warning("removed a FUSE mount left by a previous run", mountpoint=stale)
        for path in sorted(self.state_dir.glob("*.json")):
            state = await asyncio.to_thread(load_state, path)
            await self.learn_peers(state.spec.peer_addresses)
            await self._start_engine(state.spec, state)
        for volume in self.config.volumes:
            await self.apply(spec_from_config(volume))

    async def guard_isolation(self, lapsed: Callable[[], bool], probe_seconds: float) -> None:
        """Until cancelled: every few seconds, each primary cut off from the API server (our
        Lease ``lapsed``) and from all its peers suspends writes, and resumes them once both
        are back (VolumeEngine.check_isolation). Volumes are checked side by side: an
        isolated node's probes all wait out their timeout."""
        while True:
            await asyncio.sleep(ISOLATION_CHECK_SECONDS)
            now_lapsed = lapsed()
            engines = list(self.engines.values())
            results = await asyncio.gather(
                *(e.check_isolation(now_lapsed, probe_seconds) for e in engines),
                return_exceptions=True)
            for engine, result in zip(engines, results, strict=True):
                if isinstance(result, Exception):
                    log.error("isolation check failed", volume_id=engine.volume_id,
                              exc_info=result)

    async def stop(self) -> None:
        """Stop syncing and unmount every replica nothing else uses (the host is left clean;
        the next start opens them again)."""
        if self._in_flight:
            # changes under way (their callers may have left): let them finish rather than
            # stop half done; only one that waits on peers for long (a snapshot's sync) is cut
            _, late = await asyncio.wait(set(self._in_flight), timeout=STOP_TIMEOUT_SECONDS)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=STOP_TIMEOUT_SECONDS)
        # volumes stop side by side: a node with hundreds of replicas must still finish
        # within the pod's termination grace period
        limit = asyncio.Semaphore(8)

        async def stop_one(engine: VolumeEngine) -> None:
            async with limit:
                try:
                    async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
                        await engine.stop()
                except TimeoutError:
                    log.warning("volume did not stop in time", volume_id=engine.volume_id)
                await close(engine.volume_id)

        async def close(volume_id: str) -> None:
            for attempt in range(CLOSE_ATTEMPTS):
                try:
                    await asyncio.to_thread(self.store.close, volume_id)
                    return
                except FailedPrecondition as exc:
                    # a pod's mount keeps it (the next start serves it again); a busy mount
                    # is work that outlived its volume's stop timeout, soon done
                    users = await asyncio.to_thread(self.store.foreign_mounts, volume_id)
                    if users or attempt + 1 == CLOSE_ATTEMPTS:
                        log.info("replica stays mounted", volume_id=volume_id, reason=str(exc))
                        return
                await asyncio.sleep(0.5)

        await asyncio.gather(*(stop_one(engine) for engine in self.engines.values()))
        # a replica open with no engine (one whose start failed half way) is closed as well
        strays = set(await asyncio.to_thread(self.store.open_replicas)) - set(self.engines)
        await asyncio.gather(*(close(volume_id) for volume_id in sorted(strays)))
        await self.peers.close()
        log.info("agent stopped", volumes=len(self.engines))

    async def _start_engine(self, spec: pb.VolumeSpec,
                            state: PersistedState | None = None) -> VolumeEngine:
        engine = VolumeEngine(
            node=self.node, spec=spec, store=self.store, peers=self.peers,
            state_dir=self.state_dir, spool_dir=self.spool_dir, audit=self.audit_log,
            node_bandwidth=self.node_bandwidth,
            epoch=state.epoch if state else None, role=state.role if state else None,
            fenced=state.fenced if state else False,
            awaiting_copy=state.awaiting_copy if state else (),
            failed=state.failed if state else (),
            # without a Lease nothing would resume a suspension (sharedsync.core.isolation)
            suspended=state.suspended if state and self.config.kubernetes else "",
            stranded_ns=state.stranded_ns if state else 0)
        if state is not None:
            engine.primary = state.primary
        await engine.start()
        self.engines[spec.volume_id] = engine
        log.info("volume started", volume_id=spec.volume_id, role=str(engine.role),
                 epoch=engine.epoch)
        return engine

    def engine(self, volume_id: str) -> VolumeEngine:
        check_id(volume_id, "volume_id")
        engine = self.engines.get(volume_id)
        if engine is None:
            raise NotFound(f"volume {volume_id} has no replica on {self.node}")
        return engine

    async def apply(self, spec: pb.VolumeSpec) -> VolumeEngine:
        validate_spec(spec, self.node)
        await self.learn_peers(spec.peer_addresses)
        async with self._lock(spec.volume_id):
            engine = self.engines.get(spec.volume_id)
            if engine is None:
                if spec.kind == "block" and self.store.filesystem is StoreFilesystem.EXT4 and \
                        await asyncio.to_thread(self.store.meta, spec.volume_id) is None:
                    raise InvalidArgument(
                        "a block volume needs the btrfs replica store: this node's is the ext4 "
                        "fallback, which replicates files, and a raw block device has none")
                await self._populate(spec)
                return await self._start_engine(spec)
            await engine.apply(spec)
            return engine

    async def _populate(self, spec: pb.VolumeSpec) -> None:
        """A new volume with a content source: the primary's replica starts as a copy of it.

        Only the primary copies: the other replicas receive a full stream from it anyway (they
        share no replication snapshot with it), so a local copy would be thrown away. The
        operator places the primary on a node that holds the source; if this one does not, it
        refuses rather than serve an empty volume as the restored one.
        """
        if not spec.HasField("content_source") or spec.primary_node != self.node:
            return
        if await asyncio.to_thread(self.store.meta, spec.volume_id) is not None:
            return  # made before (a retried apply, or a restart)
        content = spec.content_source
        check_id(content.volume_id, "content_source.volume_id")
        if content.snapshot_id:
            if not is_snapshot_id(content.snapshot_id):
                raise InvalidArgument(f"content_source.snapshot_id {content.snapshot_id!r} is "
                                      "not a snapshot id")
            if not await asyncio.to_thread(self.store.has_snapshot, content.volume_id,
                                           content.snapshot_id):
                raise FailedPrecondition(f"snapshot {content.snapshot_id} of "
                                         f"{content.volume_id} is not held on {self.node}")
            source = Source(volume_id=content.volume_id, snapshot_id=content.snapshot_id)
        else:
            origin = self.engines.get(content.volume_id)
            if origin is None:
                raise FailedPrecondition(f"volume {content.volume_id} has no replica on "
                                         f"{self.node} to clone")
            if origin.multiwriter is not None:
                # no replication snapshots: clone the live data, merged with the peers first
                await origin.multiwriter.sync_now()
                source = Source(volume_id=content.volume_id)
                await asyncio.to_thread(self.store.ensure_layout)
                await asyncio.to_thread(self.store.create, spec.volume_id, spec.size_bytes,
                                        VolumeKind(spec.kind or "filesystem"), source)
                return
            if origin.role is Role.PRIMARY and not origin.fenced:
                point = await origin.cycle()  # everything written until now
            else:
                point = await asyncio.to_thread(origin.lineage.newest)
            if point is None:
                raise FailedPrecondition(f"the replica of {content.volume_id} on {self.node} "
                                         "holds no complete snapshot yet")
            source = Source(volume_id=content.volume_id, subvolume=f"{SYNC_DIR}/{point.name}")
        await asyncio.to_thread(self.store.ensure_layout)
        await asyncio.to_thread(self.store.create, spec.volume_id, spec.size_bytes,
                                VolumeKind(spec.kind or "filesystem"), source)
        log.info("volume made from its content source", volume_id=spec.volume_id,
                 source_volume=content.volume_id, snapshot_id=content.snapshot_id)

    async def learn_peers(self, addresses: Mapping[str, str]) -> None:
        """Take peer addresses the operator read from the agents' Leases.

        An agent restarted on another port or address announces it in its Lease; the operator
        passes it on with every ApplyVolume, so links follow it without a restart here. Our own
        entry is ignored (we never dial ourselves).
        """
        merged = dict(self.peers.addresses)
        merged.update((node, address) for node, address in addresses.items()
                      if node != self.node and address)
        if merged != self.peers.addresses:
            await self.peers.update(merged)

    # -- Agent service -----------------------------------------------------------------------

    async def ApplyVolume(self, request: pb.ApplyVolumeRequest, context: Any) -> pb.VolumeStatus:
        engine = await self._to_completion(self.apply(request.spec))
        return await asyncio.to_thread(engine.status)

    async def RemoveVolume(self, request: pb.RemoveVolumeRequest,
                           context: Any) -> pb.RemoveVolumeResponse:
        check_id(request.volume_id, "volume_id")
        await self._to_completion(self._remove(request.volume_id))
        return pb.RemoveVolumeResponse()

    async def _remove(self, volume_id: str) -> None:
        async with self._lock(volume_id):
            engine = self.engines.pop(volume_id, None)
            if engine is not None:
                await engine.remove()

    async def Promote(self, request: pb.PromoteRequest, context: Any) -> pb.VolumeStatus:
        engine = self.engine(request.volume_id)
        await self._to_completion(self._promote(engine, request.epoch))
        return await asyncio.to_thread(engine.status)

    async def _promote(self, engine: VolumeEngine, epoch: int) -> None:
        async with self._lock(engine.volume_id):
            await engine.promote(epoch)

    async def _sync(self, engine: VolumeEngine, trigger: str,
                    only: str = "") -> SnapRef | None:
        """One sync cycle, returned once every replica (``only``: that one) acknowledged it."""
        if engine.multiwriter is not None:
            await engine.multiwriter.sync_now()  # audited there
            return None
        if engine.role is not Role.PRIMARY:
            raise FailedPrecondition(f"{self.node} is not the primary of {engine.volume_id}")
        links = list(engine.links.values())
        if only:
            links = [link for link in links if link.node == only]
            if not links:
                raise FailedPrecondition(f"{only} holds no replica of {engine.volume_id} "
                                         "that this primary ships to")
        target = await engine.cycle()
        if target is not None:
            async with asyncio.timeout(SYNC_WAIT_SECONDS):
                await asyncio.gather(*(link.wait_for(target) for link in links))
        engine.audit(AuditKind.SYNC, trigger=trigger, snapshot=target.name if target else "")
        return target

    async def SyncNow(self, request: pb.SyncNowRequest, context: Any) -> pb.VolumeStatus:
        engine = self.engine(request.volume_id)
        handover = request.handover and engine.multiwriter is None
        if handover:
            engine.begin_handover()
        try:
            await self._sync(engine, "handover" if handover else "sync-now",
                             only=request.handover_to if handover else "")
        except BaseException:
            engine.handover_until = None  # no move follows a failed sync: pods here may attach
            raise
        return await asyncio.to_thread(engine.status)

    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest,
                             context: Any) -> pb.SnapshotStatus:
        check_id(request.volume_id, "volume_id")
        if not is_snapshot_id(request.snapshot_id):
            raise InvalidArgument(f"snapshot_id {request.snapshot_id!r} is not a snapshot id")
        return await self._to_completion(self._create_snapshot(request))

    async def _create_snapshot(self, request: pb.CreateSnapshotRequest) -> pb.SnapshotStatus:
        async with self._lock(request.snapshot_id):
            record = await asyncio.to_thread(self.snapshot_records.get, request.snapshot_id)
            if record is not None and record.volume_id != request.volume_id:
                raise FailedPrecondition(f"snapshot {request.snapshot_id} is of volume "
                                         f"{record.volume_id}, not {request.volume_id}")
            if record is not None and await asyncio.to_thread(
                    self.store.has_snapshot, request.volume_id, request.snapshot_id):
                return snapshot_status(record)
            engine = self.engine(request.volume_id)
            point, size = await self._snapshot_sync_point(engine, request)
            record = SnapshotRecord(snapshot_id=request.snapshot_id,
                                    volume_id=request.volume_id, source=point,
                                    size_bytes=size, created_unix_ns=time.time_ns())
            await asyncio.to_thread(self.snapshot_records.put, record)
            engine.audit(AuditKind.VOLUME, action="snapshot", snapshot_id=request.snapshot_id,
                         source=point.name)
            return snapshot_status(record)

    async def _snapshot_sync_point(self, engine: VolumeEngine,
                                   request: pb.CreateSnapshotRequest) -> tuple[SnapRef, int]:
        """Snapshot the requested sync point, or (primary) a fresh one every replica holds.

        A multi-writer replica has no sync point shared with its peers: each node merges
        with its peers first, then snapshots its own live data (``source`` is ignored, and the
        answer names the empty SnapshotRef).
        """
        if engine.multiwriter is not None:
            await engine.multiwriter.sync_now()
            size = await asyncio.to_thread(self.store.snapshot, request.volume_id,
                                           request.snapshot_id)
            return SnapRef(0, 0), size
        attempt = 0
        while True:
            attempt += 1
            point = ref_of(request.source) if request.HasField("source") \
                else await self._sync(engine, "snapshot")
            if point is None:
                raise FailedPrecondition(f"volume {request.volume_id} has no sync point")
            try:
                size = await asyncio.to_thread(self.store.snapshot, request.volume_id,
                                               request.snapshot_id, f"{SYNC_DIR}/{point.name}")
            except NotFound:
                if request.HasField("source") or attempt >= SNAPSHOT_ATTEMPTS:
                    raise
                continue  # replaced and pruned meanwhile: sync again
            return point, size

    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest,
                             context: Any) -> pb.DeleteSnapshotResponse:
        check_id(request.volume_id, "volume_id")
        if not is_snapshot_id(request.snapshot_id):
            return pb.DeleteSnapshotResponse()  # never ours
        await self._to_completion(self._delete_snapshot(request.volume_id, request.snapshot_id))
        return pb.DeleteSnapshotResponse()

    async def _delete_snapshot(self, volume_id: str, snapshot_id: str) -> None:
        async with self._lock(snapshot_id):
            # also for a removed volume: its image lives on while snapshots remain in it
            await asyncio.to_thread(self.store.delete_snapshot, volume_id, snapshot_id)
            await asyncio.to_thread(self.snapshot_records.delete, snapshot_id)

    def _snapshots_of(self, volume_id: str) -> list[pb.SnapshotStatus]:
        found = []
        for snapshot_id in self.store.snapshots(volume_id):
            record = self.snapshot_records.get(snapshot_id)
            found.append(snapshot_status(record) if record is not None
                         else pb.SnapshotStatus(snapshot_id=snapshot_id))
        return found

    async def Attach(self, request: pb.AttachRequest, context: Any) -> pb.AttachResponse:
        engine = self.engine(request.volume_id)
        if not engine.spec.multi_writer and (engine.role is not Role.PRIMARY or engine.fenced):
            # a pod here wants it: status says so, and the operator moves the primary here
            # (switchover) once that is safe; kubelet's next retry then succeeds
            engine.want_attach()
            raise FailedPrecondition(
                f"volume {request.volume_id} is served by {engine.primary}, not {self.node} "
                "(only multi-writer volumes are served by every replica); the operator moves "
                "it here once that is safe")
        if engine.handing_over():
            raise FailedPrecondition(
                f"volume {request.volume_id} is moving its primary from {self.node} to a node "
                "where a pod waits for it; retry once that is done")
        return pb.AttachResponse(path=str(await self._to_completion(engine.attach())))

    async def Detach(self, request: pb.DetachRequest, context: Any) -> pb.DetachResponse:
        engine = self.engine(request.volume_id)
        await self._to_completion(engine.detach())
        engine.consumers_released()
        return pb.DetachResponse()

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.AgentStatus:
        ids = list(request.volume_ids) or sorted(self.engines)
        volumes = [await asyncio.to_thread(self.engine(v).status) for v in ids]
        for volume in volumes:
            volume.snapshots.extend(await asyncio.to_thread(self._snapshots_of,
                                                            volume.volume_id))
        root = self.store.root
        root.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(root)
        return pb.AgentStatus(node=self.node, version=__version__, capacity_bytes=usage.total,
                              available_bytes=usage.free, volumes=volumes)

    async def Scrub(self, request: pb.ScrubRequest, context: Any) -> pb.ScrubResponse:
        return await self.engine(request.volume_id).scrub()

    # -- Replication service -----------------------------------------------------------------

    async def Resync(self, request: pb.ResyncRequest, context: Any) -> pb.ResyncResponse:
        engine = self.engine(request.volume_id)
        if engine.role is not Role.PRIMARY:
            raise FailedPrecondition(f"{self.node} is not the primary of {request.volume_id}")
        engine.resync(request.node, request.reason)
        return pb.ResyncResponse()

    async def FetchFile(self, request: pb.FetchFileRequest,
                        context: Any) -> AsyncIterator[pb.Frame]:
        engine = self.engine(request.volume_id)
        path = engine.open_snapshot_file(ref_of(request.snapshot), request.path)
        encoder = FrameEncoder()
        with open(path, "rb") as source:  # noqa: ASYNC230 - a local read, chunk by chunk
            while chunk := await asyncio.to_thread(source.read, 1 << 20):
                for frame in encoder.feed(chunk):
                    yield frame_message(frame).frame
        yield frame_message(encoder.finish()).frame

    def _multiwriter(self, volume_id: str, from_node: str) -> MultiWriter:
        engine = self.engine(volume_id)
        if engine.multiwriter is None:
            raise FailedPrecondition(f"volume {volume_id} is not multi-writer on {self.node}")
        if from_node not in engine.spec.replica_nodes:
            raise FailedPrecondition(f"{from_node!r} is not a replica of {volume_id}")
        return engine.multiwriter

    async def PullChanges(self, request: pb.PullChangesRequest,
                          context: Any) -> AsyncIterator[pb.PullChangesMessage]:
        writer = self._multiwriter(request.volume_id, request.from_node)
        async for message in writer.serve_changes(request):
            yield message

    async def FetchContents(self, request: pb.FetchContentsRequest,
                            context: Any) -> AsyncIterator[pb.ContentMessage]:
        writer = self._multiwriter(request.volume_id, request.from_node)
        async for message in writer.serve_contents(request):
            yield message

    async def MergeNow(self, request: pb.MergeNowRequest, context: Any) -> pb.MergeNowResponse:
        writer = self._multiwriter(request.volume_id, request.from_node)
        merged = await writer.merge_now(request.from_node, request.incarnation, request.seq)
        return pb.MergeNowResponse(merged_seq=merged)

    async def Holdings(self, request: pb.HoldingsRequest, context: Any) -> pb.HoldingsResponse:
        engine = self.engine(request.volume_id)
        return await asyncio.to_thread(engine.holdings)

    async def Journal(self, request_iterator: AsyncIterator[pb.JournalRecord],
                      context: Any) -> AsyncIterator[pb.JournalAck]:
        async for record in request_iterator:
            try:
                engine = self.engine(record.volume_id)
            except Exception as exc:  # noqa: BLE001 - an unknown volume is a refusal
                yield pb.JournalAck(seq=record.seq, refused=str(exc)[:300])
                continue
            yield await engine.journal_append(record)

    async def Push(self, request_iterator: AsyncIterator[pb.PushMessage],
                   context: Any) -> pb.PushResult:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("body") != "header":
            raise InvalidArgument("a replication stream starts with its header")
        header = first.header
        try:
            engine = self.engine(header.volume_id)
            if header.sender_node not in engine.spec.replica_nodes:
                raise FailedPrecondition(
                    f"{header.sender_node} is not a replica of {header.volume_id}")
            return await engine.receive(header, request_iterator)
        except Exception:
            await drain_refused(request_iterator)
            raise


async def drain_refused(messages: AsyncIterator[pb.PushMessage]) -> None:
    """Read a refused stream on to its end (within ``REFUSED_DRAIN_SECONDS`` and
    ``REFUSED_DRAIN_MESSAGES``) before the refusal is answered.

    A sender whose write is still under way when the call ends sees that write fail, and gRPC
    then reports the call as INTERNAL ("Internal error from Core") in place of the refusal's
    own status: a full replica's RESOURCE_EXHAUSTED, which must not count toward Failed, or a
    stale epoch's FAILED_PRECONDITION. A sender that has written everything waits for the
    answer and gets it as sent.
    """
    with contextlib.suppress(Exception):  # TimeoutError included
        async with asyncio.timeout(REFUSED_DRAIN_SECONDS):
            count = 0
            async for _ in messages:
                count += 1
                if count >= REFUSED_DRAIN_MESSAGES:
                    break


def snapshot_status(record: SnapshotRecord) -> pb.SnapshotStatus:
    return pb.SnapshotStatus(snapshot_id=record.snapshot_id, size_bytes=record.size_bytes,
                             created_unix_ns=record.created_unix_ns,
                             source=ref_message(record.source))


def reclaim_fuse_mounts(root: Path) -> list[str]:
    """Abort and unmount every FUSE mount under ``root``: only this agent serves them.

    A daemon killed with passthrough files open leaves its connection hanging (a ``stat`` of
    the mount blocks rather than failing), so nothing is probed: the connection is aborted
    through fusectl first, which fails every waiting request, then the mount is removed.
    """
    removed = []
    for entry in reversed(fuse_mounts(root)):
        abort_connection(entry.mount_point)
        unmount(entry.mount_point)
        removed.append(entry.mount_point)
    return removed


def ensure_dirs(config: AgentConfig) -> None:
    for path in (config.data_dir, config.control_socket.parent):
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.umask(0o077)
