"""Where the CSI controller keeps its volume and snapshot records.

One interface, :class:`StateStore`, and its implementations: :class:`LocalStateStore` (SQLite on
the plugin's own disk, the default for standalone mode) now, a Kubernetes-backed one (SharedVolume
objects) with the operator. Both honour the same contract, checked by one shared test suite:

* ``put_*`` writes a record whose ``revision`` must equal the stored one (0 for a new record) and
  returns it with the next revision; a mismatch raises ``Aborted`` (someone else wrote first).
* ``list_*`` returns records in id order strictly after ``after``, at most ``limit`` of them.
* Deleting a missing record is a no-op.
"""

from typing import Protocol

from sharedsync.core.records import SnapshotRecord, VolumeRecord

from .local import LocalStateStore


class StateStore(Protocol):
    """Durable, concurrency-safe storage of CSI records."""

    async def get_volume(self, volume_id: str) -> VolumeRecord | None: ...
    async def put_volume(self, record: VolumeRecord) -> VolumeRecord: ...
    async def delete_volume(self, volume_id: str) -> None: ...
    async def list_volumes(self, after: str | None, limit: int) -> list[VolumeRecord]: ...

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None: ...
    async def put_snapshot(self, record: SnapshotRecord) -> SnapshotRecord: ...
    async def delete_snapshot(self, snapshot_id: str) -> None: ...
    async def list_snapshots(self, after: str | None, limit: int,
                             source_volume_id: str | None = None) -> list[SnapshotRecord]: ...
    async def count_snapshots(self, source_volume_id: str) -> int: ...

    async def close(self) -> None: ...


__all__ = ["LocalStateStore", "StateStore"]
