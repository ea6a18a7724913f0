"""Cluster mode on a node: volumes come from this node's replication agent.

In a cluster the agents hold the replicas, and only the primary's agent may serve a volume: its
data path (the FUSE daemon in front of the replica) is what makes fsync wait for the replicas in
Synchronous mode. So Stage asks the local agent to ``Attach`` the volume and binds what it
names at the staging path: a directory for a filesystem volume, or a file (attached to a loop
device here) or device for a block volume. An agent that is not the primary refuses with
FAILED_PRECONDITION and its own message, which reaches the CO as is. The exception is a
multi-writer volume (ReadWriteMany on several nodes, ``VolumeSpec.multi_writer``): every agent
holding a replica serves it, ``Attach`` answering with that replica's live directory, so a pod
can be staged on any replica node (and each node's writes are merged by the agents); health
then does not report a non-primary replica as degraded. Unstage unmounts and ``Detach``es.
Publish, Unpublish, stats and health work on the staged mount as in standalone mode
(:class:`csi_driver.node.NodeServiceBase`).

What Attach returned is kept in a small file per staged volume under the plugin's data
directory: it is how later calls (and a restarted plugin) recognise the volume's mounts, from
the mount table alone, without touching the FUSE filesystem (a stat through it would hang while
its agent is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from sharedsync.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SharedsyncError,
)
from sharedsync.core.sizes import CapacityRange
from sharedsync.storage import loop, mounts
from sharedsync.storage.replicas import VolumeKind

from .agent_client import AgentClient
from .controller import KIND_CONTEXT_KEY
from .node import (
    LOW_SPACE_RATIO,
    HealthEntry,
    NodeServiceBase,
    StorageBackendHealth,
    filesystem_usage,
)
from .proto import csi_pb2
from .validation import Capability, mode_of

log = structlog.get_logger(__name__)

#: Replica states (agent.proto ReplicaState) that mean a copy is missing, not just behind.
_LOST_STATES = {4: "Stale", 5: "Failed"}


@dataclass(frozen=True, slots=True)
class Staged:
    """A volume staged here: its kind and the path the agent's Attach returned."""

    volume_id: str
    kind: VolumeKind
    source: str


class StagedVolumes:
    """One small JSON file per staged volume (written atomically, before the mount)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, volume_id: str) -> Path:
        return self.root / f"{volume_id}.json"

    def get(self, volume_id: str) -> Staged | None:
        try:
            data = json.loads(self._path(volume_id).read_text())
            return Staged(volume_id=volume_id, kind=VolumeKind(data["kind"]),
                          source=str(data["source"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable staging record; ignored", volume_id=volume_id,
                        error=str(exc))
            return None

    def put(self, staged: Staged) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(staged.volume_id)
        temp = path.with_suffix(".tmp")
        with open(temp, "w") as out:
            json.dump({"kind": str(staged.kind), "source": staged.source}, out)
            out.flush()
            os.fsync(out.fileno())
        temp.replace(path)

    def remove(self, volume_id: str) -> None:
        self._path(volume_id).unlink(missing_ok=True)


def location(path: str, table: list[mounts.MountEntry]) -> tuple[str, str] | None:
    """(device, root within it) of what ``path`` shows, from the mount table alone: a bind
    mount of ``path`` elsewhere shows the same pair."""
    best: tuple[int, int, mounts.MountEntry] | None = None
    for index, entry in enumerate(table):
        point = entry.mount_point.rstrip("/") or "/"
        if path == point or path.startswith(point.rstrip("/") + "/"):
            rank = (len(point), index)
            if best is None or rank > best[:2]:
                best = (*rank, entry)
    if best is None:
        return None
    entry = best[2]
    point = entry.mount_point.rstrip("/") or "/"
    rest = os.path.relpath(path, point)
    root = entry.root if rest == "." else os.path.join(entry.root, rest)
    return entry.major_minor, os.path.normpath(root)


class AgentNodeService(NodeServiceBase):
    """The Node service of a cluster node: volumes are attached by the local agent."""

    def __init__(self, agent: AgentClient, state_dir: Path, node_id: str,
                 roots: tuple[Path, ...]) -> None:
        super().__init__(node_id, roots)
        self.agent = agent
        self.staged = StagedVolumes(state_dir)

    # -- what a volume's mounts look like ----------------------------------------------------

    def _require_staged(self, volume_id: str) -> Staged:
        staged = self.staged.get(volume_id)
        if staged is None:
            raise NotFound(f"volume {volume_id} is not staged on node {self.node_id}")
        return staged

    def _owns(self, entry: mounts.MountEntry, volume_id: str) -> bool:
        staged = self.staged.get(volume_id)
        if staged is None:
            return False
        if staged.kind is VolumeKind.BLOCK:
            return entry.root in {"/" + Path(d).name for d in self._block_devices(volume_id)}
        return (entry.major_minor, entry.root) == location(staged.source, mounts.mount_table())

    def _volume_kind(self, volume_id: str) -> VolumeKind:
        return self._require_staged(volume_id).kind

    def _block_devices(self, volume_id: str) -> list[str]:
        staged = self.staged.get(volume_id)
        if staged is None or staged.kind is not VolumeKind.BLOCK:
            return []
        source = Path(staged.source)
        try:
            mode = source.stat().st_mode
        except OSError:
            return []
        if stat.S_ISBLK(mode):
            return [staged.source]
        return loop.devices_for(source)

    def _foreign_mounts(self, volume_id: str) -> list[str]:
        staged = self.staged.get(volume_id)
        if staged is None or staged.kind is not VolumeKind.FILESYSTEM:
            return []
        table = mounts.mount_table()
        where = location(staged.source, table)
        return [m.mount_point for m in table
                if (m.major_minor, m.root) == where and m.mount_point != staged.source]

    def _block_size(self, volume_id: str) -> int:
        devices = self._block_devices(volume_id)
        if not devices:
            raise NotFound(f"volume {volume_id} is not staged on node {self.node_id}")
        return loop.size_of(devices[0])

    # -- stage -------------------------------------------------------------------------------

    async def _stage_volume(self, volume_id: str, staging: Path, cap: Capability,
                            context: Mapping[str, str], size_hint: int) -> None:
        kind = context.get(KIND_CONTEXT_KEY)
        if kind and kind != cap.kind:
            raise InvalidArgument(f"volume {volume_id} is a {kind} volume")
        # refuse an occupied staging path before the agent serves anything
        if cap.kind is VolumeKind.FILESYSTEM:
            present = await asyncio.to_thread(mounts.mounts_at, staging)
            if present and not await asyncio.to_thread(self._owns, present[-1], volume_id):
                raise AlreadyExists(f"{staging} already holds another mount")
        source = await self.agent.attach(volume_id)
        await asyncio.to_thread(self._stage_attached, volume_id, staging, cap, source)

    def _stage_attached(self, volume_id: str, staging: Path, cap: Capability,
                        source: str) -> None:
        is_dir = Path(source).is_dir()
        if is_dir != (cap.kind is VolumeKind.FILESYSTEM):
            raise InvalidArgument(f"volume {volume_id} is a "
                                  f"{'filesystem' if is_dir else 'block'} volume")
        self.staged.put(Staged(volume_id=volume_id, kind=cap.kind, source=source))
        if cap.kind is VolumeKind.BLOCK:
            if not stat.S_ISBLK(Path(source).stat().st_mode):
                loop.attach(source)
            log.info("volume staged", volume_id=volume_id, source=source)
            return
        if self._bind_staging(volume_id, source, staging):
            log.info("volume staged", volume_id=volume_id, staging_target_path=str(staging),
                     source=source)

    async def _unstage_volume(self, volume_id: str, staging: Path) -> None:
        await asyncio.to_thread(self._unstage_mounts, volume_id, staging)
        with contextlib.suppress(NotFound):  # the agent holds no replica: nothing is attached
            await self.agent.detach(volume_id)
        self.staged.remove(volume_id)
        log.info("volume unstaged", volume_id=volume_id, staging_target_path=str(staging))

    def _unstage_mounts(self, volume_id: str, staging: Path) -> None:
        published = self._publications(volume_id, exclude={staging})
        if published:
            raise FailedPrecondition(
                f"volume {volume_id} is still published at {', '.join(published)}")
        present = mounts.mounts_at(staging)
        if present and not self._owns(present[-1], volume_id):
            log.warning("unmounting a staging path that does not show this volume",
                        volume_id=volume_id, staging_target_path=str(staging))
        mounts.unmount(staging)
        staged = self.staged.get(volume_id)
        # a dead FUSE mount (the agent's, after it died) is no file rather than an error:
        # unstaging must clean it up
        mode = mode_of(staged.source, follow=True) if staged is not None else None
        if staged is not None and mode is not None and stat.S_ISREG(mode):
            loop.detach_all(staged.source)

    # -- expansion, health -------------------------------------------------------------------

    def _expand(self, volume_id: str, path: Path, wish: CapacityRange) -> int:
        """The agents grew the replica (and its filesystem) already; a loop device here only
        has to be told."""
        self._published_entry(volume_id, path)
        if self._volume_kind(volume_id) is VolumeKind.BLOCK:
            for device in self._block_devices(volume_id):
                loop.refresh_size(device)
            return self._block_size(volume_id)
        return filesystem_usage(path)[0].total

    async def _volume_problems(self, volume_id: str) -> list[HealthEntry]:
        self._require_staged(volume_id)
        try:
            status = await self.agent.status(volume_id)
        except NotFound as exc:
            return [HealthEntry(status=csi_pb2.INACCESSIBLE, reason="NoReplica", message=str(exc))]
        except SharedsyncError as exc:
            return [HealthEntry(status=csi_pb2.DEGRADED, reason="AgentUnavailable",
                                message=str(exc))]
        entries = []
        for volume in status.volumes:
            if volume.fenced:
                entries.append(HealthEntry(
                    status=csi_pb2.DEGRADED, reason="Fenced",
                    message=f"a newer primary exists ({volume.primary_node}); this copy "
                            "refuses writes"))
            elif volume.role != "primary" and not volume.multi_writer:
                entries.append(HealthEntry(
                    status=csi_pb2.DEGRADED, reason="NotPrimary",
                    message=f"volume {volume_id} is served by {volume.primary_node}, "
                            f"not {self.node_id}"))
            lost = [f"{r.node} {_LOST_STATES[r.state]}" for r in volume.replicas
                    if r.state in _LOST_STATES]
            if lost:
                entries.append(HealthEntry(status=csi_pb2.DEGRADED, reason="ReplicaLost",
                                           message="replicas out of service: "
                                                   + ", ".join(lost)))
        return entries

    async def _storage_problems(self) -> list[Any]:
        try:
            status = await self.agent.status()
        except SharedsyncError as exc:
            return [StorageBackendHealth(status=csi_pb2.STORAGE_UNREACHABLE,
                                         reason="AgentUnavailable", message=str(exc))]
        if status.capacity_bytes and status.available_bytes / status.capacity_bytes \
                < LOW_SPACE_RATIO:
            return [StorageBackendHealth(
                status=csi_pb2.STORAGE_DEGRADED, reason="LowSpace",
                message=f"only {status.available_bytes} bytes free for replicas")]
        return []

    async def ready(self) -> str | None:
        """None when the local agent answers, else why not."""
        try:
            await self.agent.status()
        except SharedsyncError as exc:
            return str(exc)
        return None
