"""The CSI snapshots this agent made: which replication snapshot each was taken from, and when.

The snapshot itself is a read-only btrfs subvolume in the replica's ``snapshots/`` (see
``sharedsync.storage.replicas``), independent of the ``sync/`` lineage it was copied from, so
replication pruning never touches it. What btrfs does not record is kept here, one small JSON
file per snapshot: a retried CreateSnapshot must answer with the *same* source and time, not
with a newer sync point.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.ids import is_snapshot_id
from sharedsync.storage.files import atomic_write

from .lineage import SnapRef


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    snapshot_id: str
    volume_id: str
    source: SnapRef
    size_bytes: int
    created_unix_ns: int

    def to_json(self) -> bytes:
        return json.dumps({
            "snapshot_id": self.snapshot_id, "volume_id": self.volume_id,
            "epoch": self.source.epoch, "seq": self.source.seq, "size_bytes": self.size_bytes,
            "created_unix_ns": self.created_unix_ns}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "SnapshotRecord":
        raw = json.loads(data)
        return cls(snapshot_id=str(raw["snapshot_id"]), volume_id=str(raw["volume_id"]),
                   source=SnapRef(int(raw["epoch"]), int(raw["seq"])),
                   size_bytes=int(raw["size_bytes"]),
                   created_unix_ns=int(raw["created_unix_ns"]))


class SnapshotRecords:
    """One directory of records, named by snapshot id."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, snapshot_id: str) -> Path:
        if not is_snapshot_id(snapshot_id):
            raise InvalidArgument(f"{snapshot_id!r} is not a snapshot id")
        return self.directory / f"{snapshot_id}.json"

    def get(self, snapshot_id: str) -> SnapshotRecord | None:
        try:
            return SnapshotRecord.from_json(self._path(snapshot_id).read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError):
            return None  # torn by a crash: the caller makes it again

    def put(self, record: SnapshotRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self._path(record.snapshot_id), record.to_json())

    def delete(self, snapshot_id: str) -> None:
        self._path(snapshot_id).unlink(missing_ok=True)
