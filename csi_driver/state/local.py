"""The embedded state store: SQLite in WAL mode on the plugin's own disk.

SQLite gives us what a hand-rolled file store would have to re-invent: each write is one
transaction that is either entirely on disk or not at all (``synchronous=FULL`` fsyncs the WAL
before a commit returns), so a SIGKILL at any instant leaves the last committed state, and the
next open replays the WAL. Records are stored as JSON so that the schema can grow without
migrations.
"""

import asyncio
import dataclasses
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, TypeVar

from sharedsync.core.errors import Aborted
from sharedsync.core.records import Phase, SnapshotRecord, SourceKind, VolumeRecord

_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY, revision INTEGER NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY, source_volume_id TEXT NOT NULL, revision INTEGER NOT NULL,
    body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS snapshots_by_source ON snapshots (source_volume_id, id);
"""

R = TypeVar("R", VolumeRecord, SnapshotRecord)


def _encode(record: VolumeRecord | SnapshotRecord) -> str:
    return json.dumps(dataclasses.asdict(record), sort_keys=True)


def _volume(body: str) -> VolumeRecord:
    raw: dict[str, Any] = json.loads(body)
    return VolumeRecord(
        volume_id=raw["volume_id"], name=raw["name"], capacity_bytes=raw["capacity_bytes"],
        kind=raw["kind"], access_modes=tuple(raw["access_modes"]),
        parameters=tuple((k, v) for k, v in raw["parameters"]),
        source_kind=SourceKind(raw["source_kind"]), source_id=raw["source_id"],
        accessible_nodes=tuple(raw["accessible_nodes"]), phase=Phase(raw["phase"]),
        created_at=raw["created_at"], revision=raw["revision"],
    )


def _snapshot(body: str) -> SnapshotRecord:
    raw: dict[str, Any] = json.loads(body)
    return SnapshotRecord(
        snapshot_id=raw["snapshot_id"], name=raw["name"],
        source_volume_id=raw["source_volume_id"], size_bytes=raw["size_bytes"],
        created_at_ns=raw["created_at_ns"], phase=Phase(raw["phase"]),
        accessible_nodes=tuple(raw["accessible_nodes"]), revision=raw["revision"],
    )


class LocalStateStore:
    """A :class:`csi_driver.state.StateStore` in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def _call(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _put(self, table: str, record: R, record_id: str, extra: dict[str, str]) -> R:
        stored = dataclasses.replace(record, revision=record.revision + 1)
        columns = ["id", "revision", "body", *extra]
        values = [record_id, stored.revision, _encode(stored), *extra.values()]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    f"SELECT revision FROM {table} WHERE id = ?", (record_id,)).fetchone()  # noqa: S608 - table is ours
                current = row[0] if row else 0
                if current != record.revision:
                    raise Aborted(
                        f"{record_id} changed concurrently (revision {current}, "
                        f"expected {record.revision}); retry")
                self._db.execute(
                    f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) "  # noqa: S608
                    f"VALUES ({', '.join('?' for _ in columns)})", values)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored

    # -- volumes -----------------------------------------------------------------------------

    async def get_volume(self, volume_id: str) -> VolumeRecord | None:
        rows = await asyncio.to_thread(self._call, "SELECT body FROM volumes WHERE id = ?",
                                       (volume_id,))
        return _volume(rows[0][0]) if rows else None

    async def put_volume(self, record: VolumeRecord, *,
                         consumer_node: str = "") -> VolumeRecord:
        del consumer_node  # one node holds everything: nothing to place
        return await asyncio.to_thread(self._put, "volumes", record, record.volume_id, {})

    async def delete_volume(self, volume_id: str) -> None:
        await asyncio.to_thread(self._call, "DELETE FROM volumes WHERE id = ?", (volume_id,))

    async def list_volumes(self, after: str | None, limit: int) -> list[VolumeRecord]:
        rows = await asyncio.to_thread(
            self._call, "SELECT body FROM volumes WHERE id > ? ORDER BY id LIMIT ?",
            (after or "", limit))
        return [_volume(r[0]) for r in rows]

    # -- snapshots ---------------------------------------------------------------------------

    async def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        rows = await asyncio.to_thread(self._call, "SELECT body FROM snapshots WHERE id = ?",
                                       (snapshot_id,))
        return _snapshot(rows[0][0]) if rows else None

    async def put_snapshot(self, record: SnapshotRecord) -> SnapshotRecord:
        return await asyncio.to_thread(self._put, "snapshots", record, record.snapshot_id,
                                       {"source_volume_id": record.source_volume_id})

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await asyncio.to_thread(self._call, "DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    async def list_snapshots(self, after: str | None, limit: int,
                             source_volume_id: str | None = None) -> list[SnapshotRecord]:
        sql = "SELECT body FROM snapshots WHERE id > ? ORDER BY id LIMIT ?"
        args: tuple[object, ...] = (after or "", limit)
        if source_volume_id is not None:
            sql = ("SELECT body FROM snapshots WHERE source_volume_id = ? AND id > ? "
                   "ORDER BY id LIMIT ?")
            args = (source_volume_id, after or "", limit)
        rows = await asyncio.to_thread(self._call, sql, args)
        return [_snapshot(r[0]) for r in rows]

    async def count_snapshots(self, source_volume_id: str) -> int:
        rows = await asyncio.to_thread(
            self._call, "SELECT COUNT(*) FROM snapshots WHERE source_volume_id = ?",
            (source_volume_id,))
        return int(rows[0][0])

    async def close(self) -> None:
        with self._lock:
            self._db.close()
