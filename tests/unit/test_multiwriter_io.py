"""The I/O pieces of multi-writer volumes on a real (temporary) directory and SQLite file:
the live tree never follows a symlink out of the volume, the manifest database keeps what it
was given across a reopen, and the wire format refuses what cannot be ours."""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from replication_agent.livetree import LiveTree, stat_key
from replication_agent.manifest_db import ManifestDB
from replication_agent.multiwriter import change_message, record_of
from replication_agent.proto import agent_pb2 as pb
from sharedsync.core.errors import InvalidArgument
from sharedsync.core.file_merge import (
    DIRECTORY,
    TEMP_PREFIX,
    TOMBSTONE,
    ConflictNote,
    Record,
    StatKey,
)
from sharedsync.core.version_vectors import VersionVector

REG = 0o100644


def record(path: str, seq: int, digest: str = "ab" * 32, **extra: object) -> Record:
    fields: dict[str, object] = {
        "path": path, "vector": VersionVector.of({"a": seq}), "digest": digest, "size": 3,
        "mode": REG, "mtime_ns": 5, "writer": "a", "seq": seq, **extra}
    return Record(**fields)  # type: ignore[arg-type]


# -- the tree -----------------------------------------------------------------------------------


def test_walk_lists_directories_files_and_symlinks_and_sweeps_temporaries(
        tmp_path: Path) -> None:
    live = tmp_path / "live"
    (live / "d" / "e").mkdir(parents=True)
    (live / "d" / "e" / "f").write_bytes(b"x")
    (live / "top").write_bytes(b"y")
    (live / "link").symlink_to("top")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host data")
    (live / "escape").symlink_to(outside)  # a symlink to a directory is not descended
    (live / "d" / f"{TEMP_PREFIX}left").write_bytes(b"leftover")
    tree = LiveTree(live)
    os.mkfifo(live / "fifo")  # meaningful only on this node: not replicated
    found = tree.walk()
    assert set(found) == {"d", "d/e", "d/e/f", "top", "link", "escape"}
    # a directory is versioned by type, mode and owner: its mtime and size are left out
    assert (found["d"].mtime_ns, found["d"].size) == (0, 0)
    assert (live / "d" / f"{TEMP_PREFIX}left").exists()
    tree.walk(sweep=True)
    assert not (live / "d" / f"{TEMP_PREFIX}left").exists()


def test_nothing_is_read_or_written_through_a_symlinked_directory(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"host data")
    (live / "escape").symlink_to(outside)
    tree = LiveTree(live)
    seen = stat_key((outside / "secret").stat())
    assert tree.hash_file("escape/secret", seen) is None
    assert tree.open_version("escape/secret", seen) is None
    assert tree.lstat("escape/secret") is None
    with pytest.raises(OSError, match=r"Too many levels|Not a directory"):
        tree.incoming("escape/planted", symlink=False)
    tree.unlink("escape/secret")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_a_file_changed_while_hashed_is_not_taken(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    (live / "f").write_bytes(b"old")
    tree = LiveTree(live)
    seen = stat_key((live / "f").stat())
    hashed = tree.hash_file("f", seen)
    assert hashed is not None
    assert hashed.digest == blake3.blake3(b"old").hexdigest()
    (live / "f").write_bytes(b"new content")
    assert tree.hash_file("f", seen) is None  # the listing's stat no longer holds


def test_incoming_replaces_atomically_with_metadata(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    (live / "f").write_bytes(b"old")
    tree = LiveTree(live)
    incoming = tree.incoming("new/dir/f", symlink=False)
    incoming.write(b"hello")
    target = record("new/dir/f", 1, mode=0o100640, mtime_ns=1_000_000_000_000,
                    uid=os.getuid(), gid=os.getgid())
    key = incoming.finish(target)
    assert not (live / "new" / "dir" / "f").exists()
    incoming.install()
    path = live / "new" / "dir" / "f"
    assert path.read_bytes() == b"hello"
    assert stat_key(path.stat()) == key
    assert path.stat().st_mode == 0o100640
    assert path.stat().st_mtime_ns == 1_000_000_000_000
    assert not [p for p in path.parent.iterdir() if p.name.startswith(TEMP_PREFIX)]
    link = tree.incoming("l", symlink=True)
    link.write(b"new/dir/f")
    link.finish(record("l", 2, mode=0o120777, uid=os.getuid(), gid=os.getgid()))
    link.install()
    assert os.readlink(live / "l") == "new/dir/f"


# -- the database -------------------------------------------------------------------------------


def test_manifest_database_survives_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "db" / "vol.sqlite"
    db = ManifestDB(path)
    incarnation = db.incarnation
    note = ConflictNote(id="n1", path="b", resolution="KeepBoth", winner_node="a",
                        winner_digest="cd" * 32, loser_node="b", loser_digest="ef" * 32,
                        kept_as="b.conflict-b-efefefefefef")
    a = record("a", 1, stat=StatKey(3, 5, 77, REG), hashed_at_ns=9)
    b = record("b", 2, conflict=note)
    gone = record("gone", 3, digest=TOMBSTONE, size=0, mode=0)
    db.commit(records=[a, b, gone], head=3, cursor=("peer", "inc-1", 41),
              conflicts=[(note, 123)])
    db.set_pending([record("p", 0)])
    # a record moved to a new sequence number frees its old one
    db.commit(records=[record("a", 4, digest="12" * 32)], head=4)
    db.close()
    db = ManifestDB(path)
    assert db.incarnation == incarnation
    assert db.head() == 4
    records = db.records()
    assert records["b"] == b
    assert records["gone"].deleted
    assert records["a"].seq == 4
    head, after = db.changes_after(1, 10)
    assert head == 4
    assert [r.path for r in after] == ["b", "gone", "a"]
    assert [r.path for r in db.changes_after(0, 2)[1]] == ["b", "gone"]
    assert db.cursor("peer") == ("inc-1", 41)
    assert db.cursor("nobody") == ("", 0)
    assert db.known_conflicts() == {"n1"}
    assert db.conflict_count() == 1
    assert set(db.pending()) == {"p"}
    db.commit(records=[], head=4, clear_pending=True)
    assert db.pending() == {}
    db.close()
    assert ManifestDB(tmp_path / "other.sqlite").incarnation != incarnation


# -- the wire format ------------------------------------------------------------------------------


def test_changes_round_trip_and_bad_ones_are_refused() -> None:
    note = ConflictNote(id="n", path="f", resolution="LastWriterWins", winner_node="a",
                        winner_digest="ab" * 32, loser_node="b", loser_digest="")
    original = record("dir/f", 7, conflict=note, uid=1000, gid=1000)
    back = record_of(change_message(original))
    assert back == original
    tombstone = record("dir/g", 8, digest=TOMBSTONE, size=0, mode=0)
    assert record_of(change_message(tombstone)).deleted
    directory = record("dir", 9, digest=DIRECTORY, size=0, mode=0o040750, mtime_ns=0)
    assert change_message(directory).digest == ""
    assert record_of(change_message(directory)) == directory
    # a peer's directory mtime and size are not taken
    sent = change_message(directory)
    sent.mtime_ns, sent.size = 77, 4096
    assert record_of(sent) == directory
    for bad in (pb.FileChange(path="../x", vector={"a": 1}, digest="ab" * 32, mode=REG,
                              writer="a"),
                pb.FileChange(path="x", vector={"a": 1}, digest="nothex", mode=REG, writer="a"),
                pb.FileChange(path="x", vector={"a": 1}, digest="ab" * 32, mode=0o010644,
                              writer="a"),  # a FIFO
                pb.FileChange(path="x", vector={}, digest="ab" * 32, mode=REG, writer="a"),
                pb.FileChange(path="x", vector={"a": 1}, digest="ab" * 32, mode=REG)):
        with pytest.raises(InvalidArgument):
            record_of(bad)


def test_dropped_tombstones_are_gone_and_the_floor_stays_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "vol.sqlite"
    db = ManifestDB(path)
    assert db.floor() == VersionVector()
    old = record("old", 1, digest=TOMBSTONE, size=0, mode=0, vector=VersionVector.of({"b": 4}))
    again = record("again", 2, digest=TOMBSTONE, size=0, mode=0)
    db.commit(records=[old, again, record("kept", 3)], head=3)
    # "again" was written anew meanwhile (a new sequence number): it is not dropped
    db.commit(records=[record("again", 4)], head=4)
    db.drop_tombstones([old, again], VersionVector.of({"a": 2, "b": 4}))
    db.close()
    db = ManifestDB(path)
    assert set(db.records()) == {"again", "kept"}
    assert db.floor() == VersionVector.of({"a": 2, "b": 4})
    assert db.head() == 4  # the log's numbering goes on
    db.close()
