"""What the controller asks of the replicas, and the standalone implementation of it.

The controller decides *what* should exist (records in the state store); a backend makes the
replicas match. :class:`LocalBackend` serves standalone mode, where the plugin runs on the node
holding the replicas and drives the :class:`~sharedsync.storage.replicas.ReplicaStore`
directly. With the operator, the SharedVolume-backed path asks the agents instead; the
controller does not change.

Storage calls block (they run mkfs, mount, btrfs), so they run in worker threads.
"""

import asyncio
import shutil
from typing import Protocol

from sharedsync.storage.replicas import Health, ReplicaStore, Source, VolumeKind


class VolumeBackend(Protocol):
    """Replica operations the controller needs; every one is idempotent."""

    def accessible_nodes(self) -> tuple[str, ...]: ...
    async def ready(self) -> str | None: ...
    async def create_volume(self, volume_id: str, size_bytes: int, kind: VolumeKind,
                            source: Source | None) -> int: ...
    async def delete_volume(self, volume_id: str) -> None: ...
    async def expand_volume(self, volume_id: str, size_bytes: int) -> int: ...
    async def create_snapshot(self, volume_id: str, snapshot_id: str) -> int: ...
    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> None: ...
    async def has_snapshot(self, volume_id: str, snapshot_id: str) -> bool: ...
    async def volume_health(self, volume_id: str) -> Health: ...
    async def available_bytes(self) -> int: ...


REQUIRED_TOOLS = ("losetup", "mount", "umount", "mkfs.btrfs", "btrfs", "blockdev")


def missing_tools() -> list[str]:
    """Storage tools not on PATH (the plugin is not ready until there are none)."""
    return [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]


class LocalBackend:
    """Replicas on this node's disk, for standalone mode and tests."""

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

    async def create_volume(self, volume_id: str, size_bytes: int, kind: VolumeKind,
                            source: Source | None) -> int:
        meta = await asyncio.to_thread(self.store.create, volume_id, size_bytes, kind, source)
        return meta.size_bytes

    async def delete_volume(self, volume_id: str) -> None:
        await asyncio.to_thread(self.store.delete, volume_id)

    async def expand_volume(self, volume_id: str, size_bytes: int) -> int:
        meta = await asyncio.to_thread(self.store.expand, volume_id, size_bytes)
        return meta.size_bytes

    async def create_snapshot(self, volume_id: str, snapshot_id: str) -> int:
        return await asyncio.to_thread(self.store.snapshot, volume_id, snapshot_id)

    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> None:
        await asyncio.to_thread(self.store.delete_snapshot, volume_id, snapshot_id)

    async def has_snapshot(self, volume_id: str, snapshot_id: str) -> bool:
        return await asyncio.to_thread(self.store.has_snapshot, volume_id, snapshot_id)

    async def volume_health(self, volume_id: str) -> Health:
        return await asyncio.to_thread(self.store.health, volume_id)

    async def available_bytes(self) -> int:
        return await asyncio.to_thread(self.store.available_bytes)
