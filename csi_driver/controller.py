"""The CSI Controller service: volumes and snapshots as records, replicas through a backend.

Each RPC validates its whole request first (nothing happens for a bad one), then takes the
per-object try-lock (ABORTED if busy), then acts. Creates write a CREATING record before touching
storage and flip it to READY after, so a crash at any point is finished by the CO's retry: ids are
derived from names, and every backend step is idempotent.
"""

import dataclasses
import time
from typing import Any

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from sharedsync import failpoints
from sharedsync.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unimplemented,
)
from sharedsync.core.ids import (
    check_id,
    check_name,
    is_snapshot_id,
    is_volume_id,
    snapshot_id_for,
    volume_id_for,
)
from sharedsync.core.paging import next_token, page_size, parse_token
from sharedsync.core.parameters import (
    RESERVED_PREFIX,
    VolumeParameters,
    check_map,
    parse_parameters,
)
from sharedsync.core.records import Phase, SnapshotRecord, SourceKind, VolumeRecord
from sharedsync.core.sizes import MIN_VOLUME_BYTES, CapacityRange, fits, resolve_capacity
from sharedsync.core.sizes import resolve_expansion as expansion_size
from sharedsync.storage.replicas import Source, VolumeKind

from .backend import StillCreating, VolumeBackend
from .config import TOPOLOGY_NODE_KEY
from .locks import KeyedTryLock
from .proto import csi_pb2, csi_pb2_grpc
from .state import StateStore
from .validation import capability_problem, parse_capabilities, parse_capability

RPC = csi_pb2.ControllerServiceCapability.RPC
log = structlog.get_logger(__name__)

#: volume_context key telling a node plugin the size of a replica it has to create.
CAPACITY_CONTEXT_KEY = "sharedsync.io/capacity-bytes"
KIND_CONTEXT_KEY = "sharedsync.io/kind"

CAPABILITIES = (
    RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY, RPC.CREATE_DELETE_SNAPSHOT,
    RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME, RPC.EXPAND_VOLUME, RPC.GET_VOLUME,
    RPC.SINGLE_NODE_MULTI_WRITER, RPC.GET_SNAPSHOT, RPC.GET_VOLUME_HEALTH,
    RPC.LIST_VOLUME_HEALTH,
)
#: Offered only by a backend that supports snapshots (and clones, made the same way).
SNAPSHOT_CAPABILITIES = frozenset({RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS,
                                   RPC.GET_SNAPSHOT, RPC.CLONE_VOLUME})
#: Of the time the CO gives a call, what a backend wait leaves over to answer in: the CO then
#: gets our retryable error and its message instead of its own DEADLINE_EXCEEDED.
DEADLINE_MARGIN_SECONDS = 1.0


def _capacity(message: csi_pb2.CapacityRange) -> CapacityRange:
    return CapacityRange(required=message.required_bytes, limit=message.limit_bytes)


def _wait_budget(context: Any) -> float | None:
    """How long a backend may wait within the caller's deadline (None: no deadline)."""
    remaining = getattr(context, "time_remaining", None)
    seconds = remaining() if callable(remaining) else None
    if not isinstance(seconds, (int, float)):
        return None
    return max(seconds - DEADLINE_MARGIN_SECONDS, 0.1)


def _preferred_node(requirement: csi_pb2.TopologyRequirement) -> str:
    """The node the CO would like the volume on: with WaitForFirstConsumer, the pod's."""
    for topology in requirement.preferred:
        node = topology.segments.get(TOPOLOGY_NODE_KEY)
        if node:
            return node
    return ""


def _check_snapshot_parameters(parameters: dict[str, str]) -> None:
    check_map(parameters, "parameters")
    unknown = sorted(k for k in parameters if not k.startswith(RESERVED_PREFIX))
    if unknown:
        raise InvalidArgument(f"invalid parameter {unknown[0]!r} in snapshot class; "
                              "sharedsync snapshots take no parameters")


class ControllerService(csi_pb2_grpc.ControllerServicer):
    """Volumes and snapshots: lifecycle, listing, capacity, health."""

    def __init__(self, state: StateStore, backend: VolumeBackend) -> None:
        self.state = state
        self.backend = backend
        self.locks = KeyedTryLock()

    # -- helpers -----------------------------------------------------------------------------

    def _topology(self, record: VolumeRecord | SnapshotRecord) -> list[csi_pb2.Topology]:
        return [csi_pb2.Topology(segments={TOPOLOGY_NODE_KEY: node})
                for node in record.accessible_nodes]

    def _volume_message(self, record: VolumeRecord) -> csi_pb2.Volume:
        context = dict(record.parameters)
        context[CAPACITY_CONTEXT_KEY] = str(record.capacity_bytes)
        context[KIND_CONTEXT_KEY] = record.kind
        volume = csi_pb2.Volume(capacity_bytes=record.capacity_bytes,
                                volume_id=record.volume_id, volume_context=context,
                                accessible_topology=self._topology(record))
        if record.source_kind is SourceKind.SNAPSHOT:
            volume.content_source.snapshot.snapshot_id = record.source_id
        elif record.source_kind is SourceKind.VOLUME:
            volume.content_source.volume.volume_id = record.source_id
        return volume

    def _snapshot_message(self, record: SnapshotRecord) -> csi_pb2.Snapshot:
        created = Timestamp()
        created.FromNanoseconds(record.created_at_ns)
        return csi_pb2.Snapshot(size_bytes=record.size_bytes, snapshot_id=record.snapshot_id,
                                source_volume_id=record.source_volume_id,
                                creation_time=created, ready_to_use=True)

    async def _ready_volume(self, volume_id: str, field: str = "volume_id") -> VolumeRecord:
        check_id(volume_id, field)
        record = await self.state.get_volume(volume_id) if is_volume_id(volume_id) else None
        if record is None or record.phase is not Phase.READY:
            raise NotFound(f"volume {volume_id} does not exist")
        return record

    async def _ready_snapshot(self, snapshot_id: str, field: str) -> SnapshotRecord:
        check_id(snapshot_id, field)
        record = (await self.state.get_snapshot(snapshot_id)
                  if is_snapshot_id(snapshot_id) else None)
        if record is None or record.phase is not Phase.READY:
            raise NotFound(f"snapshot {snapshot_id} does not exist")
        return record

    def _check_topology(self, requirement: csi_pb2.TopologyRequirement) -> None:
        """Refuse a volume whose requisite topology excludes every node we can place on
        (a backend that places per volume has no fixed set of nodes to check against)."""
        ours = set(self.backend.accessible_nodes())
        if not requirement.requisite or not ours:
            return
        for topology in requirement.requisite:
            node = topology.segments.get(TOPOLOGY_NODE_KEY)
            if node is None or node in ours:
                return
        raise ResourceExhausted(
            "no node in accessibility_requirements.requisite can hold this volume "
            f"(this controller places replicas on: {', '.join(sorted(ours))})")

    # -- volumes -----------------------------------------------------------------------------

    async def CreateVolume(self, request: csi_pb2.CreateVolumeRequest,
                           context: Any) -> csi_pb2.CreateVolumeResponse:
        name = check_name(request.name, "name")
        caps = parse_capabilities(request.volume_capabilities)
        params = parse_parameters(request.parameters)
        if request.mutable_parameters:
            raise InvalidArgument("mutable_parameters are not supported by this driver")
        wish = _capacity(request.capacity_range)
        source_kind, source_id = SourceKind.NONE, ""
        if request.HasField("volume_content_source"):
            which = request.volume_content_source.WhichOneof("type")
            if which == "snapshot":
                source_kind = SourceKind.SNAPSHOT
                source_id = check_id(request.volume_content_source.snapshot.snapshot_id,
                                     "volume_content_source.snapshot.snapshot_id")
            elif which == "volume":
                source_kind = SourceKind.VOLUME
                source_id = check_id(request.volume_content_source.volume.volume_id,
                                     "volume_content_source.volume.volume_id")
            else:
                raise InvalidArgument("volume_content_source must name a snapshot or a volume")
        self._check_topology(request.accessibility_requirements)
        size = resolve_capacity(wish)
        kind = caps[0].kind
        volume_id = volume_id_for(name)

        async with self.locks.hold(volume_id):
            existing = await self.state.get_volume(volume_id)
            if existing is not None:
                self._check_same_volume(existing, wish, kind, params, source_kind, source_id)
                if existing.phase is Phase.READY:
                    return csi_pb2.CreateVolumeResponse(volume=self._volume_message(existing))
                if existing.phase is Phase.DELETING:
                    raise Aborted(f"volume {name!r} is being deleted; retry later")
                size = existing.capacity_bytes
            await self.backend.admit(params, source_kind)
            source = await self._resolve_source(source_kind, source_id)
            if source is not None:
                size = await self._fit_source(size, wish, source_kind, source_id)
            available = await self.backend.available_bytes()
            if size > available:
                raise ResourceExhausted(
                    f"{size} bytes requested but only {available} bytes are free")
            record = existing or VolumeRecord(
                volume_id=volume_id, name=name, capacity_bytes=size, kind=str(kind),
                access_modes=tuple(sorted(str(c.mode) for c in caps)),
                parameters=tuple(sorted(params.to_context().items())),
                source_kind=source_kind, source_id=source_id,
                accessible_nodes=self.backend.accessible_nodes(), created_at=time.time())
            record = await self.state.put_volume(
                record, consumer_node=_preferred_node(request.accessibility_requirements))
            failpoints.hit("controller.create_volume.after_record")
            try:
                made = await self.backend.create_volume(volume_id, size, kind, source,
                                                        within=_wait_budget(context))
            except StillCreating:
                raise  # under way: the record stays for the retry to find
            except Exception:
                # The backend discards what it built for a failed create: forget the attempt
                # too, or its size and source would make every later retry ALREADY_EXISTS.
                await self.state.delete_volume(volume_id)
                raise
            record = await self.state.put_volume(dataclasses.replace(
                record, capacity_bytes=made.size_bytes, accessible_nodes=made.nodes,
                phase=Phase.READY))
            log.info("volume created", volume_id=volume_id, name=name,
                     capacity_bytes=made.size_bytes, nodes=list(made.nodes),
                     source=f"{source_kind}:{source_id}" if source_id else "")
            return csi_pb2.CreateVolumeResponse(volume=self._volume_message(record))

    @staticmethod
    def _check_same_volume(existing: VolumeRecord, wish: CapacityRange, kind: VolumeKind,
                           params: VolumeParameters, source_kind: SourceKind,
                           source_id: str) -> None:
        """Idempotent create: the same name must come with a compatible request."""
        if not fits(existing.capacity_bytes, wish):
            raise AlreadyExists(
                f"volume {existing.name!r} exists with {existing.capacity_bytes} bytes, "
                "outside the requested capacity_range")
        if existing.kind != kind:
            raise AlreadyExists(f"volume {existing.name!r} exists as a {existing.kind} volume")
        if dict(existing.parameters) != params.to_context():
            raise AlreadyExists(f"volume {existing.name!r} exists with other parameters")
        if (existing.source_kind, existing.source_id) != (source_kind, source_id):
            raise AlreadyExists(f"volume {existing.name!r} exists with another content source")

    async def _resolve_source(self, kind: SourceKind, source_id: str) -> Source | None:
        if kind is SourceKind.SNAPSHOT:
            snap = await self._ready_snapshot(source_id, "volume_content_source.snapshot")
            return Source(volume_id=snap.source_volume_id, snapshot_id=snap.snapshot_id)
        if kind is SourceKind.VOLUME:
            vol = await self._ready_volume(source_id, "volume_content_source.volume")
            return Source(volume_id=vol.volume_id)
        return None

    async def _fit_source(self, size: int, wish: CapacityRange, kind: SourceKind,
                          source_id: str) -> int:
        """A volume made from a source is at least as large as the source."""
        if kind is SourceKind.SNAPSHOT:
            snap = await self.state.get_snapshot(source_id)
            source_size = snap.size_bytes if snap else 0
        else:
            vol = await self.state.get_volume(source_id)
            source_size = vol.capacity_bytes if vol else 0
        if wish.limit and source_size > wish.limit:
            raise OutOfRange(f"the source {source_id} holds {source_size} bytes, more than "
                             f"capacity_range.limit_bytes ({wish.limit})")
        return max(size, source_size)

    async def DeleteVolume(self, request: csi_pb2.DeleteVolumeRequest,
                           context: Any) -> csi_pb2.DeleteVolumeResponse:
        volume_id = check_id(request.volume_id, "volume_id")
        if not is_volume_id(volume_id):
            return csi_pb2.DeleteVolumeResponse()  # never ours: nothing to delete
        async with self.locks.hold(volume_id):
            record = await self.state.get_volume(volume_id)
            if record is not None and record.phase is not Phase.DELETING:
                record = await self.state.put_volume(
                    dataclasses.replace(record, phase=Phase.DELETING))
            try:
                await self.backend.delete_volume(volume_id, within=_wait_budget(context))
            except FailedPrecondition:
                if record is not None:
                    await self.state.put_volume(dataclasses.replace(record, phase=Phase.READY))
                raise
            failpoints.hit("controller.delete_volume.after_backend")
            await self.state.delete_volume(volume_id)
            log.info("volume deleted", volume_id=volume_id)
        return csi_pb2.DeleteVolumeResponse()

    async def ControllerExpandVolume(
        self, request: csi_pb2.ControllerExpandVolumeRequest, context: Any,
    ) -> csi_pb2.ControllerExpandVolumeResponse:
        check_id(request.volume_id, "volume_id")
        if not request.HasField("capacity_range"):
            raise InvalidArgument("capacity_range is required")
        wish = _capacity(request.capacity_range)
        if request.HasField("volume_capability"):
            parse_capability(request.volume_capability)
        async with self.locks.hold(request.volume_id):
            record = await self._ready_volume(request.volume_id)
            if request.HasField("volume_capability") and (
                    parse_capability(request.volume_capability).kind != record.kind):
                raise InvalidArgument(f"volume {record.volume_id} is a {record.kind} volume")
            size = expansion_size(record.capacity_bytes, wish)
            if size > record.capacity_bytes:
                grown = size - record.capacity_bytes
                available = await self.backend.available_bytes()
                if grown > available:
                    raise ResourceExhausted(f"{grown} more bytes needed, {available} free")
                size = await self.backend.expand_volume(record.volume_id, size,
                                                        within=_wait_budget(context))
                await self.state.put_volume(dataclasses.replace(record, capacity_bytes=size))
                log.info("volume expanded", volume_id=record.volume_id, capacity_bytes=size)
        return csi_pb2.ControllerExpandVolumeResponse(
            capacity_bytes=size,
            node_expansion_required=self.backend.node_expansion_required(VolumeKind(record.kind)))

    async def ValidateVolumeCapabilities(
        self, request: csi_pb2.ValidateVolumeCapabilitiesRequest, context: Any,
    ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        check_id(request.volume_id, "volume_id")
        if not request.volume_capabilities:
            raise InvalidArgument("volume_capabilities is required")
        record = await self._ready_volume(request.volume_id)
        problems = [p for c in request.volume_capabilities if (p := capability_problem(c))]
        problems += [f"the volume is a {record.kind} volume"
                     for c in request.volume_capabilities
                     if not capability_problem(c) and parse_capability(c).kind != record.kind]
        try:
            params = parse_parameters(request.parameters)
            if request.parameters and params.to_context() != dict(record.parameters):
                problems.append("parameters differ from those the volume was created with")
        except InvalidArgument as exc:
            problems.append(str(exc))
        if problems:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message="; ".join(problems))
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context,
            volume_capabilities=request.volume_capabilities,
            parameters=request.parameters, mutable_parameters=request.mutable_parameters)
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    async def ListVolumes(self, request: csi_pb2.ListVolumesRequest,
                          context: Any) -> csi_pb2.ListVolumesResponse:
        after = parse_token(request.starting_token, is_volume_id)
        limit = page_size(request.max_entries)
        ready: list[VolumeRecord] = []
        while len(ready) <= limit:
            batch = await self.state.list_volumes(after, limit + 1)
            ready += [r for r in batch if r.phase is Phase.READY]
            if len(batch) <= limit:
                break
            after = batch[-1].volume_id
        page = ready[: limit + 1]
        entries = [csi_pb2.ListVolumesResponse.Entry(volume=self._volume_message(r))
                   for r in page[:limit]]
        return csi_pb2.ListVolumesResponse(
            entries=entries, next_token=next_token(page, limit, lambda r: r.volume_id))

    async def ControllerGetVolume(self, request: csi_pb2.ControllerGetVolumeRequest,
                                  context: Any) -> csi_pb2.ControllerGetVolumeResponse:
        record = await self._ready_volume(request.volume_id)
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume_message(record),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus())

    async def GetCapacity(self, request: csi_pb2.GetCapacityRequest,
                          context: Any) -> csi_pb2.GetCapacityResponse:
        for cap in request.volume_capabilities:
            if capability_problem(cap):
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        if request.parameters:
            parse_parameters(request.parameters)
        node = None
        if request.HasField("accessible_topology"):
            node = request.accessible_topology.segments.get(TOPOLOGY_NODE_KEY)
        available = await self.backend.available_bytes(node)
        if node is not None and not available:
            return csi_pb2.GetCapacityResponse(available_capacity=0)  # not a node we can use
        response = csi_pb2.GetCapacityResponse(available_capacity=available)
        response.maximum_volume_size.value = available
        response.minimum_volume_size.value = MIN_VOLUME_BYTES
        return response

    async def ControllerGetCapabilities(
        self, request: csi_pb2.ControllerGetCapabilitiesRequest, context: Any,
    ) -> csi_pb2.ControllerGetCapabilitiesResponse:
        offered = [t for t in CAPABILITIES
                   if self.backend.supports_snapshots or t not in SNAPSHOT_CAPABILITIES]
        caps = [csi_pb2.ControllerServiceCapability(
            rpc=csi_pb2.ControllerServiceCapability.RPC(type=t)) for t in offered]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=caps)

    # -- not offered: there is no attach step, and no mutable parameters ----------------------

    async def ControllerPublishVolume(
        self, request: csi_pb2.ControllerPublishVolumeRequest, context: Any,
    ) -> csi_pb2.ControllerPublishVolumeResponse:
        raise Unimplemented("sharedsync volumes need no attach step (CSIDriver attachRequired "
                            "is false)")

    async def ControllerUnpublishVolume(
        self, request: csi_pb2.ControllerUnpublishVolumeRequest, context: Any,
    ) -> csi_pb2.ControllerUnpublishVolumeResponse:
        raise Unimplemented("sharedsync volumes need no detach step")

    async def ControllerModifyVolume(
        self, request: csi_pb2.ControllerModifyVolumeRequest, context: Any,
    ) -> csi_pb2.ControllerModifyVolumeResponse:
        raise Unimplemented("volume attributes classes are not supported; change the "
                            "volume's SyncPolicy instead")

    # -- health ------------------------------------------------------------------------------

    async def _health(self, volume_id: str) -> csi_pb2.VolumeHealth:
        health = await self.backend.volume_health(volume_id)
        statuses = []
        if health.abnormal:
            statuses.append(csi_pb2.VolumeHealth.VolumeHealthEntry(
                status=csi_pb2.DEGRADED, reason="ReplicaUnhealthy", message=health.message))
        return csi_pb2.VolumeHealth(volume_id=volume_id, health_statuses=statuses)

    async def ControllerGetVolumeHealth(
        self, request: csi_pb2.ControllerGetVolumeHealthRequest, context: Any,
    ) -> csi_pb2.ControllerGetVolumeHealthResponse:
        record = await self._ready_volume(request.volume_id)
        return csi_pb2.ControllerGetVolumeHealthResponse(
            volume_health=await self._health(record.volume_id))

    async def ControllerListVolumeHealth(
        self, request: csi_pb2.ControllerListVolumeHealthRequest, context: Any,
    ) -> csi_pb2.ControllerListVolumeHealthResponse:
        after = parse_token(request.starting_token, is_volume_id)
        limit = page_size(request.max_entries)
        page = await self.state.list_volumes(after, limit + 1)
        entries = [await self._health(r.volume_id) for r in page[:limit]
                   if r.phase is Phase.READY]
        return csi_pb2.ControllerListVolumeHealthResponse(
            entries=entries, next_token=next_token(page, limit, lambda r: r.volume_id))

    # -- snapshots ---------------------------------------------------------------------------

    async def CreateSnapshot(self, request: csi_pb2.CreateSnapshotRequest,
                             context: Any) -> csi_pb2.CreateSnapshotResponse:
        name = check_name(request.name, "name")
        source_id = check_id(request.source_volume_id, "source_volume_id")
        _check_snapshot_parameters(dict(request.parameters))
        if not self.backend.supports_snapshots:
            raise Unimplemented("this driver's backend does not support snapshots")
        snapshot_id = snapshot_id_for(name)
        async with self.locks.hold(snapshot_id, source_id):
            existing = await self.state.get_snapshot(snapshot_id)
            if existing is not None and existing.source_volume_id != source_id:
                raise AlreadyExists(f"snapshot {name!r} exists for volume "
                                    f"{existing.source_volume_id}")
            if existing is not None and existing.phase is Phase.READY:
                return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_message(existing))
            volume = await self._ready_volume(source_id, "source_volume_id")
            record = existing or SnapshotRecord(
                snapshot_id=snapshot_id, name=name, source_volume_id=source_id,
                size_bytes=volume.capacity_bytes, created_at_ns=time.time_ns(),
                accessible_nodes=volume.accessible_nodes)
            record = await self.state.put_snapshot(record)
            size = await self.backend.create_snapshot(source_id, snapshot_id)
            record = await self.state.put_snapshot(
                dataclasses.replace(record, size_bytes=size, phase=Phase.READY))
            log.info("snapshot created", snapshot_id=snapshot_id, volume_id=source_id)
            return csi_pb2.CreateSnapshotResponse(snapshot=self._snapshot_message(record))

    async def DeleteSnapshot(self, request: csi_pb2.DeleteSnapshotRequest,
                             context: Any) -> csi_pb2.DeleteSnapshotResponse:
        snapshot_id = check_id(request.snapshot_id, "snapshot_id")
        if not is_snapshot_id(snapshot_id):
            return csi_pb2.DeleteSnapshotResponse()
        async with self.locks.hold(snapshot_id):
            record = await self.state.get_snapshot(snapshot_id)
            if record is None:
                return csi_pb2.DeleteSnapshotResponse()
            if record.phase is not Phase.DELETING:
                record = await self.state.put_snapshot(
                    dataclasses.replace(record, phase=Phase.DELETING))
            await self.backend.delete_snapshot(record.source_volume_id, snapshot_id)
            await self.state.delete_snapshot(snapshot_id)
            log.info("snapshot deleted", snapshot_id=snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    async def ListSnapshots(self, request: csi_pb2.ListSnapshotsRequest,
                            context: Any) -> csi_pb2.ListSnapshotsResponse:
        if request.snapshot_id:
            found = (await self.state.get_snapshot(request.snapshot_id)
                     if is_snapshot_id(request.snapshot_id) else None)
            matches = [found] if found is not None and found.phase is Phase.READY and (
                not request.source_volume_id
                or found.source_volume_id == request.source_volume_id) else []
            return csi_pb2.ListSnapshotsResponse(entries=[
                csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot_message(r))
                for r in matches])
        if request.source_volume_id and not is_volume_id(request.source_volume_id):
            return csi_pb2.ListSnapshotsResponse()
        after = parse_token(request.starting_token, is_snapshot_id)
        limit = page_size(request.max_entries)
        page = await self.state.list_snapshots(after, limit + 1,
                                               request.source_volume_id or None)
        entries = [csi_pb2.ListSnapshotsResponse.Entry(snapshot=self._snapshot_message(r))
                   for r in page[:limit] if r.phase is Phase.READY]
        return csi_pb2.ListSnapshotsResponse(
            entries=entries, next_token=next_token(page, limit, lambda r: r.snapshot_id))

    async def GetSnapshot(self, request: csi_pb2.GetSnapshotRequest,
                          context: Any) -> csi_pb2.GetSnapshotResponse:
        record = await self._ready_snapshot(request.snapshot_id, "snapshot_id")
        return csi_pb2.GetSnapshotResponse(snapshot=self._snapshot_message(record))
