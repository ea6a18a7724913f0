"""Reconcile one SharedVolumeSnapshot: snapshot the source volume on every replica, report.

The primary goes first, with no source: it syncs (a replication snapshot every live replica
acknowledged) and snapshots that sync point. Each other live replica then snapshots its own
copy of the same point, so every holder has the same content and a restore can be placed on
any of them. A replica that no longer holds the point (pruned after a newer sync) is simply
not a holder. The snapshot is Ready once the primary's copy exists. Deleting it removes every
copy (kopf's finalizer holds the object until then).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from replication_agent.proto import agent_pb2 as pb

from . import conditions as cond
from .agents import Agents
from .kube import SHARED_VOLUME_SNAPSHOTS, Kube

log = structlog.get_logger(__name__)

EmitEvent = Callable[[str, str, str], None]


class NotYetError(Exception):
    """The snapshot cannot be taken now (its volume is not placed, its primary is down):
    the handler retries later."""


def holders(body: Mapping[str, Any]) -> list[str]:
    """The nodes the status says hold a copy."""
    return [str(n) for n in (body.get("status") or {}).get("nodes") or ()]


@dataclass
class SnapshotReconciler:
    kube: Kube
    agents: Agents
    #: The operator's view of the SharedVolumes (shared with the handlers' Runtime).
    volumes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    async def _not_ready(self, name: str, status: Mapping[str, Any], generation: int,
                         reason: str, message: str) -> None:
        conditions = cond.set_condition(status.get("conditions"), cond.READY, False,
                                        reason=reason, message=message, generation=generation)
        await self.kube.patch_status(SHARED_VOLUME_SNAPSHOTS, name, {
            "conditions": conditions, "readyToUse": False, "observedGeneration": generation})

    async def reconcile(self, body: Mapping[str, Any], emit: EmitEvent) -> None:
        metadata, spec = body["metadata"], body.get("spec") or {}
        status = body.get("status") or {}
        name = str(metadata["name"])
        generation = int(metadata.get("generation") or 0)
        if status.get("readyToUse"):
            return
        volume_id = str(spec.get("sourceVolume") or "")
        volume = self.volumes.get(volume_id)
        layout = (volume or {}).get("status") or {}
        primary = str(layout.get("primary") or "")
        if volume is None or not primary:
            await self._not_ready(name, status, generation, "SourceNotPlaced",
                                  f"SharedVolume {volume_id!r} is not placed (yet)")
            raise NotYetError(f"source volume {volume_id} is not placed")
        try:
            made = await self.agents.create_snapshot(primary, volume_id, name)
        except (grpc.aio.AioRpcError, LookupError) as exc:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            await self._not_ready(name, status, generation, "PrimaryFailed",
                                  f"CreateSnapshot on the primary {primary}: {detail}"[:1000])
            raise NotYetError(f"CreateSnapshot on {primary}: {detail}") from exc
        nodes = [primary]
        for node in sorted(self.agents.volume_reports(volume_id)):
            if node == primary:
                continue
            try:
                await self.agents.create_snapshot(node, volume_id, name, made.source)
            except (grpc.aio.AioRpcError, LookupError) as exc:
                log.warning("snapshot copy on a replica failed", snapshot=name, node=node,
                            error=str(exc)[:300])
                continue
            nodes.append(node)
        conditions = cond.set_condition(
            status.get("conditions"), cond.READY, True, reason="SnapshotTaken",
            message=f"held on {', '.join(nodes)}", generation=generation)
        await self.kube.patch_status(SHARED_VOLUME_SNAPSHOTS, name, {
            "conditions": conditions, "readyToUse": True, "sizeBytes": made.size_bytes,
            "nodes": nodes, "observedGeneration": generation,
            "syncPoint": {"epoch": made.source.epoch, "seq": made.source.seq}})
        emit("Normal", "SnapshotTaken", f"snapshot of {volume_id} held on {', '.join(nodes)}")

    async def delete(self, body: Mapping[str, Any]) -> list[str]:
        """Delete every copy a live agent holds; returns the nodes that could not be reached
        (the caller retries while there are any)."""
        name = str(body["metadata"]["name"])
        volume_id = str((body.get("spec") or {}).get("sourceVolume") or "")
        alive = self.agents.alive()
        nodes = set(holders(body)) | self.agents.snapshot_holders(name)
        failed = []
        for node in sorted(nodes):
            if node not in alive:
                log.warning("snapshot copy left on a node whose agent is down", snapshot=name,
                            node=node)
                continue
            try:
                await self.agents.delete_snapshot(node, volume_id, name)
            except (grpc.aio.AioRpcError, LookupError) as exc:
                log.warning("DeleteSnapshot failed", snapshot=name, node=node,
                            error=str(exc)[:300])
                failed.append(node)
        return failed


def content_source(spec: Mapping[str, Any], volumes: Mapping[str, Mapping[str, Any]],
                   snapshots: Mapping[str, Mapping[str, Any]],
                   alive: set[str]) -> tuple[pb.ContentSource | None, str | None, str | None]:
    """A SharedVolume's ``spec.contentSource`` as the Agent API's ContentSource, the live node
    that holds it (the new volume's primary), and why it cannot be used yet (or None)."""
    source = spec.get("contentSource") or {}
    kind, ident = source.get("kind"), str(source.get("name") or "")
    if not kind or not ident:
        return None, None, None
    if kind == "Snapshot":
        snapshot = snapshots.get(ident)
        if snapshot is None or not (snapshot.get("status") or {}).get("readyToUse"):
            return None, None, f"snapshot {ident} is not ready"
        volume_id = str((snapshot.get("spec") or {}).get("sourceVolume") or "")
        nodes = [n for n in holders(snapshot) if n in alive]
        message = pb.ContentSource(volume_id=volume_id, snapshot_id=ident)
        return message, (nodes[0] if nodes else None), (
            None if nodes else f"no live node holds snapshot {ident}")
    volume = volumes.get(ident)
    primary = str(((volume or {}).get("status") or {}).get("primary") or "")
    if not primary or primary not in alive:
        return None, None, f"the source volume {ident} has no live primary"
    return pb.ContentSource(volume_id=ident), primary, None
