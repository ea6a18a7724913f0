"""What the controller asks of the replicas, and the standalone implementation of it.

The controller decides *what* should exist (records in the state store); a backend makes the
replicas match. :class:`LocalBackend` serves standalone mode, where the plugin runs on the node
holding the replicas and drives the :class:`~sharedsync.storage.replicas.ReplicaStore`
directly. In a cluster, :class:`csi_driver.cluster_backend.ClusterBackend` waits for the operator
to place the SharedVolume the state store wrote; the controller does not change.

Storage calls block (they run mkfs, mount, btrfs), so they run in worker threads.
"""

import asyncio
import shutil
from dataclasses import dataclass
from typing import Protocol

from sharedsync.core.errors import Aborted
from sharedsync.core.parameters import VolumeParameters
from sharedsync.core.records import SourceKind
from sharedsync.storage.replicas import Health, ReplicaStore, Source, VolumeKind


class StillCreating(Aborted):
    """The backend accepted the volume but it is not ready yet (ABORTED, so the CO retries).

    Unlike any other failure of a create, this one keeps the controller's record: the work is
    under way, and the retry (idempotent by name) finds it and waits again.
    """


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What a create made: the size it holds and the nodes it can be used from."""

    size_bytes: int
    nodes: tuple[str, ...]


class VolumeBackend(Protocol):
    """Replica operations the controller needs; every one is idempotent.

    ``within`` is how long a call may wait for others (the operator, agents) before it gives
    up with a retryable error; None means the backend's own bound. Backends that do the work
    themselves ignore it.
    """

    #: Whether snapshots and clones are offered (the controller advertises them only then).
    supports_snapshots: bool

    def accessible_nodes(self) -> tuple[str, ...]:
        """Nodes every new volume will be accessible from; empty when placement decides it
        per volume (then :attr:`Provisioned.nodes` says where it went)."""
        ...

    async def ready(self) -> str | None: ...
    async def admit(self, parameters: VolumeParameters, source: SourceKind) -> None:
        """Refuse, before any record exists, a volume this backend could never create."""
        ...

    async def create_volume(self, volume_id: str, size_bytes: int, kind: VolumeKind,
                            source: Source | None, *,
                            within: float | None = None) -> Provisioned: ...
    async def delete_volume(self, volume_id: str, *, within: float | None = None) -> None: ...
    async def expand_volume(self, volume_id: str, size_bytes: int, *,
                            within: float | None = None) -> int: ...
    def node_expansion_required(self, kind: VolumeKind) -> bool:
        """Whether NodeExpandVolume still has work after ControllerExpandVolume."""
        ...

    async def create_snapshot(self, volume_id: str, snapshot_id: str) -> int: ...
    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> None: ...
    async def has_snapshot(self, volume_id: str, snapshot_id: str) -> bool: ...
    async def volume_health(self, volume_id: str) -> Health: ...
    async def available_bytes(self, node: str | None = None) -> int:
        """Free bytes for new volumes (on ``node`` when given; 0 for a node we cannot use)."""
        ...

    async def close(self) -> None: ...


REQUIRED_TOOLS = ("losetup", "mount", "umount", "mkfs.btrfs", "btrfs", "blockdev")


def missing_tools() -> list[str]:
    """Storage tools not on PATH (the plugin is not ready until there are none)."""
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


class LocalBackend:
    """Replicas on this node's disk, for standalone mode and tests."""

    supports_snapshots = True

    def __init__(self, store: ReplicaStore, node_id: str) -> None:
        self.store = store
        self.node_id = node_id

    def accessible_nodes(self) -> tuple[str, ...]:
        return (self.node_id,)

    async def ready(self) -> str | None:
        """None when usable, else why not."""
        missing = missing_tools()
        if missing:
            return f"storage tools missing: {', '.join(missing)} (run scripts/setup)"
        try:
            await asyncio.to_thread(self.store.ensure_layout)
        except OSError as exc:
            return f"replica directory {self.store.root} is not usable: {exc.strerror}"
        return None

    async def admit(self, parameters: VolumeParameters, source: SourceKind) -> None:
        return None  # anything valid can be made here

    async def create_volume(self, volume_id: str, size_bytes: int, kind: VolumeKind,
                            source: Source | None, *,
                            within: float | None = None) -> Provisioned:
        meta = await asyncio.to_thread(self.store.create, volume_id, size_bytes, kind, source)
        return Provisioned(size_bytes=meta.size_bytes, nodes=(self.node_id,))

    async def delete_volume(self, volume_id: str, *, within: float | None = None) -> None:
        await asyncio.to_thread(self.store.delete, volume_id)

    async def expand_volume(self, volume_id: str, size_bytes: int, *,
                            within: float | None = None) -> int:
        meta = await asyncio.to_thread(self.store.expand, volume_id, size_bytes)
        return meta.size_bytes

    def node_expansion_required(self, kind: VolumeKind) -> bool:
        return True  # the staged filesystem (or loop device) learns the new size on the node

    async def create_snapshot(self, volume_id: str, snapshot_id: str) -> int:
        return await asyncio.to_thread(self.store.snapshot, volume_id, snapshot_id)

    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> None:
        await asyncio.to_thread(self.store.delete_snapshot, volume_id, snapshot_id)

    async def has_snapshot(self, volume_id: str, snapshot_id: str) -> bool:
        return await asyncio.to_thread(self.store.has_snapshot, volume_id, snapshot_id)

    async def volume_health(self, volume_id: str) -> Health:
        return await asyncio.to_thread(self.store.health, volume_id)

    async def available_bytes(self, node: str | None = None) -> int:
        if node is not None and node != self.node_id:
            return 0
        return await asyncio.to_thread(self.store.available_bytes)

    async def close(self) -> None:
        return None
