"""Where the CSI controller keeps its volume and snapshot records.

One interface, :class:`StateStore`, and two implementations, picked by ``--state-store``:
:class:`LocalStateStore` (SQLite on the plugin's own disk; the default, for standalone mode) and
:class:`KubernetesStateStore` (SharedVolume and SharedVolumeSnapshot objects, the operator's
desired state; imported only when used, so that a plugin without Kubernetes never loads its
client). Both honour the same contract, checked by one shared test suite
(``tests/state_store_contract.py``):

* ``put_*`` writes a record whose ``revision`` is the one the caller last read (0 for a new
  record) and returns it with a new, larger revision; if another record write came in between,
  it raises ``Aborted`` (someone else wrote first). Revisions are opaque beyond that: 1, 2, 3
  locally, resourceVersions in Kubernetes, where writes by others to what is not the record
  (the operator's status, finalizers) are not conflicts.
* ``list_*`` returns records in id order strictly after ``after``, at most ``limit`` of them.
* Deleting a missing record is a no-op. In Kubernetes a deleted volume may linger (the
  operator's finalizer) and reads back as ``DELETING`` until the operator lets it go.
"""

from typing import TYPE_CHECKING, Any, Protocol

from sharedsync.core.records import SnapshotRecord, VolumeRecord

from ..config import PluginConfig, StateStoreKind
from .local import LocalStateStore

if TYPE_CHECKING:
    from .kubernetes import KubernetesStateStore


class StateStore(Protocol):
    """Durable, concurrency-safe storage of CSI records."""

    async def get_volume(self, volume_id: str) -> VolumeRecord | None: ...
    async def put_volume(self, record: VolumeRecord, *,
                         consumer_node: str = "") -> VolumeRecord:
        """``consumer_node``, when given, is where the CO would like the volume used
        (dataLocality): stores whose records drive placement keep it, others ignore it."""
        ...

    async def delete_volume(self, volume_id: str) -> None: ...
    async def list_volumes(self, after: str | None, limit: int) -> list[VolumeRecord]: ...

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None: ...
    async def put_snapshot(self, record: SnapshotRecord) -> SnapshotRecord: ...
    async def delete_snapshot(self, snapshot_id: str) -> None: ...
    async def list_snapshots(self, after: str | None, limit: int,
                             source_volume_id: str | None = None) -> list[SnapshotRecord]: ...
    async def count_snapshots(self, source_volume_id: str) -> int: ...

    async def close(self) -> None: ...


async def open_state_store(config: PluginConfig) -> StateStore:
    """The store ``config`` asks for, ready to use (the caller closes it)."""
    if config.state_store is StateStoreKind.KUBERNETES:
        from .kubernetes import KubernetesStateStore

        return await KubernetesStateStore.connect(config.kubeconfig)
    return LocalStateStore(config.state_path)


def __getattr__(name: str) -> Any:
    """Import the Kubernetes store (and its client library) on first use only."""
    if name == "KubernetesStateStore":
        from .kubernetes import KubernetesStateStore

        return KubernetesStateStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["KubernetesStateStore", "LocalStateStore", "StateStore", "open_state_store"]
