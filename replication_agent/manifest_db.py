"""The persisted state of one multi-writer replica: manifest, change log, cursors, conflicts.

One SQLite database per volume (WAL, synchronous=FULL), written in one transaction per scan or
merge, so a SIGKILL or a power cut leaves it as it was before or after a cycle, never between:

* ``files``: one :class:`~sharedsync.core.file_merge.Record` per path (tombstones included,
  until every peer merged them; ``meta.floor`` joins the vectors of those dropped).
  Its ``seq`` column is the change log: a record takes the next sequence number whenever it
  changes, so "the changes after N" is a range query, and the log is compacted by construction
  (a path appears once, at its newest change);
* ``pending``: versions being applied from a peer, written before the first file is renamed
  into place and cleared with the commit that records them (see ``plan_scan``'s ``pending``);
* ``cursors``: per peer, the last sequence of its change log merged here, and the incarnation
  of that log (a peer whose replica was made again starts its numbering over);
* ``conflicts``: every conflict resolved here or learned from a peer, by its note's id, so each
  is counted once.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from sharedsync.core.file_merge import ConflictNote, Record, StatKey
from sharedsync.core.version_vectors import VersionVector

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, vector TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL,
    mode INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, writer TEXT NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, seq INTEGER NOT NULL UNIQUE,
    stat TEXT, hashed_at_ns INTEGER NOT NULL, conflict TEXT);
CREATE TABLE IF NOT EXISTS pending (path TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (
    peer TEXT PRIMARY KEY, incarnation TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS conflicts (
    id TEXT PRIMARY KEY, note TEXT NOT NULL, recorded_ns INTEGER NOT NULL);
"""
_COLUMNS = ("path, vector, digest, size, mode, mtime_ns, writer, uid, gid, seq, stat, "
            "hashed_at_ns, conflict")


def _vector_json(vector: VersionVector) -> str:
    return json.dumps(dict(vector.counters), sort_keys=True, separators=(",", ":"))


def _note_json(note: ConflictNote | None) -> str | None:
    return None if note is None else json.dumps(asdict(note), sort_keys=True)


def _note_of(text: str | None) -> ConflictNote | None:
    return None if text is None else ConflictNote(**json.loads(text))


def record_json(record: Record) -> str:
    return json.dumps({
        "path": record.path, "vector": dict(record.vector.counters), "digest": record.digest,
        "size": record.size, "mode": record.mode, "mtime_ns": record.mtime_ns,
        "writer": record.writer, "uid": record.uid, "gid": record.gid,
        "conflict": asdict(record.conflict) if record.conflict else None}, sort_keys=True)


def record_of_json(text: str) -> Record:
    raw = json.loads(text)
    note = raw.get("conflict")
    return Record(path=raw["path"], vector=VersionVector.of(raw["vector"]),
                  digest=raw["digest"], size=raw["size"], mode=raw["mode"],
                  mtime_ns=raw["mtime_ns"], writer=raw["writer"], uid=raw["uid"],
                  gid=raw["gid"], conflict=ConflictNote(**note) if note else None)


def _row(record: Record) -> tuple[object, ...]:
    return (record.path, _vector_json(record.vector), record.digest, record.size, record.mode,
            record.mtime_ns, record.writer, record.uid, record.gid, record.seq,
            json.dumps(asdict(record.stat)) if record.stat else None, record.hashed_at_ns,
            _note_json(record.conflict))


def _record(row: tuple[object, ...]) -> Record:
    (path, vector, digest, size, mode, mtime_ns, writer, uid, gid, seq, stat, hashed_at,
     conflict) = row
    return Record(
        path=str(path), vector=VersionVector.of(json.loads(str(vector))), digest=str(digest),
        size=int(str(size)), mode=int(str(mode)), mtime_ns=int(str(mtime_ns)),
        writer=str(writer), uid=int(str(uid)), gid=int(str(gid)), seq=int(str(seq)),
        stat=StatKey(**json.loads(str(stat))) if stat is not None else None,
        hashed_at_ns=int(str(hashed_at)),
        conflict=_note_of(str(conflict)) if conflict is not None else None)


class ManifestDB:
    """Thread-safe access to one replica's database (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.strip().split(";\n"):
                if statement.strip():
                    self._db.execute(statement)
            found = self._db.execute("SELECT value FROM meta WHERE key='incarnation'").fetchone()
            if found is None:
                self._db.execute("INSERT INTO meta VALUES ('incarnation', ?)",
                                 (secrets.token_hex(16),))
                self._db.execute("INSERT INTO meta VALUES ('head', '0')")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('floor', '{}')")
        self.incarnation = self._meta("incarnation")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _meta(self, key: str) -> str:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0])

    def head(self) -> int:
        return int(self._meta("head"))

    def floor(self) -> VersionVector:
        """The join of every dropped tombstone's vector (see ``file_merge.plan_scan``)."""
        return VersionVector.of(json.loads(self._meta("floor")))

    def drop_tombstones(self, dropped: Iterable[Record], floor: VersionVector) -> None:
        """Forget tombstones every peer merged, and raise the floor, in one transaction. A
        path whose record changed since (another sequence number) keeps it."""
        rows = [(r.path, r.seq) for r in dropped if r.deleted]
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM files WHERE path=? AND seq=? AND digest='-'",
                                 rows)
            self._db.execute("UPDATE meta SET value=? WHERE key='floor'",
                             (_vector_json(floor),))

    def records(self) -> dict[str, Record]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM files").fetchall()  # noqa: S608
        return {str(row[0]): _record(row) for row in rows}

    def changes_after(self, seq: int, limit: int) -> tuple[int, list[Record]]:
        """The change log's head and up to ``limit`` records changed after ``seq``, oldest
        first, read in one transaction (so the head matches the records)."""
        with self._lock, self._db:
            self._db.execute("BEGIN")
            head = int(self._db.execute("SELECT value FROM meta WHERE key='head'").fetchone()[0])
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM files WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (seq, limit)).fetchall()
        return head, [_record(row) for row in rows]

    def get(self, path: str) -> Record | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM files WHERE path=?",  # noqa: S608
                                   (path,)).fetchone()
        return _record(row) if row else None

    def pending(self) -> dict[str, Record]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM pending").fetchall()
        found = [record_of_json(str(row[0])) for row in rows]
        return {r.path: r for r in found}

    def set_pending(self, records: Iterable[Record]) -> None:
        """Remember versions about to be applied (durably, before any file is renamed)."""
        rows = [(r.path, record_json(r)) for r in records]
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO pending VALUES (?, ?)", rows)

    def cursor(self, peer: str) -> tuple[str, int]:
        """(incarnation, last merged sequence) of ``peer``'s change log; ("", 0) when new."""
        with self._lock:
            row = self._db.execute("SELECT incarnation, seq FROM cursors WHERE peer=?",
                                   (peer,)).fetchone()
        return (str(row[0]), int(row[1])) if row else ("", 0)

    def known_conflicts(self) -> set[str]:
        with self._lock:
            return {str(r[0]) for r in self._db.execute("SELECT id FROM conflicts")}

    def commit(self, *, records: Iterable[Record], head: int,
               cursor: tuple[str, str, int] | None = None,
               conflicts: Iterable[tuple[ConflictNote, int]] = (),
               clear_pending: bool = False) -> None:
        """Store a cycle's outcome at once: records (new or refreshed), the new head, a peer's
        cursor (peer, incarnation, seq), newly known conflicts (note, time)."""
        rows = [_row(r) for r in records]
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            # a record's old sequence number may be taken by another record in this batch:
            # free every touched path first
            self._db.executemany("DELETE FROM files WHERE path=?", [(row[0],) for row in rows])
            self._db.executemany(
                f"INSERT INTO files ({_COLUMNS}) VALUES ({', '.join('?' * 13)})",  # noqa: S608
                rows)
            self._db.execute("UPDATE meta SET value=? WHERE key='head'", (str(head),))
            if cursor is not None:
                self._db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?, ?)", cursor)
            self._db.executemany(
                "INSERT OR IGNORE INTO conflicts VALUES (?, ?, ?)",
                [(note.id, _note_json(note), at) for note, at in conflicts])
            if clear_pending:
                self._db.execute("DELETE FROM pending")

    def conflict_count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM conflicts").fetchone()[0])
