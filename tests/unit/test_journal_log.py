"""A replica's fsync journal log (replication_agent.journal.JournalLog): which records it
takes, what survives a torn write, and what a promotion replays. Plain files, no btrfs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from replication_agent.journal import JournalLog, check_relative, seal, sealed
from replication_agent.lineage import SnapRef
from replication_agent.proto import agent_pb2 as pb

BASE = SnapRef(2, 7)
NEWER = SnapRef(2, 8)


def record(seq: int, *, base: SnapRef = BASE, session: int = 1,
           files: tuple[tuple[str, int, list[tuple[int, bytes]]], ...] = ()) -> pb.JournalRecord:
    made = pb.JournalRecord(volume_id="vol-x", epoch=base.epoch, sender_node="a", seq=seq,
                            session=session)
    made.base.epoch, made.base.seq = base.epoch, base.seq
    for path, size, pieces in files:
        entry = made.files.add(path=path, size=size)
        for offset, data in pieces:
            entry.ranges.add(offset=offset, data=data)
    seal(made)
    return made


def test_a_record_is_sealed_by_its_checksum() -> None:
    made = record(1, files=(("f", 3, [(0, b"abc")]),))
    assert sealed(made)
    made.files[0].ranges[0].data = b"abd"
    assert not sealed(made)


def test_records_are_taken_in_order_without_gaps(tmp_path: Path) -> None:
    log = JournalLog(tmp_path)
    assert log.append(record(2), BASE).refused  # no record 1 before it
    for seq in (1, 2, 3):
        ack = log.append(record(seq), BASE)
        assert not ack.refused
        assert not ack.covered
        assert ack.seq == seq
    assert not log.append(record(2), BASE).refused  # sent again after a lost ack: durable
    assert log.last_seq == 3
    assert "after 3" in log.append(record(5), BASE).refused
    assert log.records_on(BASE) == 3
    assert log.records_on(NEWER) == 0


def test_a_record_needs_its_base_and_a_newer_snapshot_covers_it(tmp_path: Path) -> None:
    log = JournalLog(tmp_path)
    assert "not held" in log.append(record(1), SnapRef(2, 6)).refused
    assert "not held" in log.append(record(1), None).refused
    covered = log.append(record(1), NEWER)
    assert covered.covered
    assert not covered.refused
    assert log.last_seq == 0  # nothing written


def test_another_primary_session_never_replaces_records_of_the_same_base(
        tmp_path: Path) -> None:
    log = JournalLog(tmp_path)
    assert not log.append(record(1, session=1), BASE).refused
    assert "another primary session" in log.append(record(1, session=2), BASE).refused
    # a newer base starts a new log, and the old one goes
    assert not log.append(record(1, base=NEWER, session=2), NEWER).refused
    assert [p.name for p in (tmp_path / "journal").iterdir()] == \
        [f"{NEWER.name}.{2:016x}.log"]


def test_a_torn_tail_is_dropped_on_load_and_other_logs_deleted(tmp_path: Path) -> None:
    log = JournalLog(tmp_path)
    for seq in (1, 2):
        log.append(record(seq, files=(("f", 4, [(0, b"%04d" % seq)]),)), BASE)
    log.close()
    path = next((tmp_path / "journal").iterdir())
    whole = path.read_bytes()
    path.write_bytes(whole + whole[: len(whole) // 3])  # a third record, torn by a crash
    (tmp_path / "journal" / f"{SnapRef(1, 1).name}.{1:016x}.log").write_bytes(b"old")
    again = JournalLog(tmp_path)
    again.load(BASE)
    assert again.last_seq == 2
    assert path.read_bytes() == whole
    assert [p.name for p in (tmp_path / "journal").iterdir()] == [path.name]
    assert not again.append(record(3), BASE).refused
    other = JournalLog(tmp_path)
    other.load(NEWER)  # the log's snapshot is no longer the newest: it is obsolete
    assert other.base is None
    assert not list((tmp_path / "journal").iterdir())


def test_replay_writes_every_record_in_order(tmp_path: Path) -> None:
    live = tmp_path / "live"
    (live / "dir").mkdir(parents=True)
    (live / "dir" / "db").write_bytes(b"0" * 16)
    (live / "other").write_bytes(b"")
    (tmp_path / "replica").mkdir()
    log = JournalLog(tmp_path / "replica")
    log.append(record(1, files=(("dir/db", 16, [(0, b"AAAA"), (8, b"BBBB")]),)), BASE)
    log.append(record(2, files=(("dir/db", 20, [(2, b"CC"), (16, b"DDDD")]),
                                ("other", 3, [(0, b"xyz")]))), BASE)
    assert log.replay(live) == 2
    assert (live / "dir" / "db").read_bytes() == b"AACC0000BBBB0000DDDD"
    assert (live / "other").read_bytes() == b"xyz"


@pytest.mark.parametrize("path", ["../escape", "/etc/passwd", "a/../../b", "", "a\0b"])
def test_paths_outside_the_volume_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="must be relative"):
        check_relative(path)


def test_replay_never_follows_a_symlink_out_of_the_volume(tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target").write_bytes(b"keep")
    os.symlink(outside, live / "link")
    os.symlink(outside / "target", live / "file")
    for path in ("link/target", "file"):
        replica = tmp_path / f"replica-{path.replace('/', '-')}"
        replica.mkdir()
        log = JournalLog(replica)
        log.append(record(1, files=((path, 4, [(0, b"evil")]),)), BASE)
        with pytest.raises((ValueError, OSError)):
            log.replay(live)
    assert (outside / "target").read_bytes() == b"keep"


def test_a_record_the_disk_could_not_take_leaves_no_torn_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk mid-record: the append fails, and the log is exactly as before it, so the
    records that follow later are never hidden behind a torn one."""
    log = JournalLog(tmp_path)
    log.append(record(1, files=(("f", 4, [(0, b"good")]),)), BASE)
    path = next((tmp_path / "journal").iterdir())
    before = path.read_bytes()
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, data[: len(data) // 2])

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(OSError, match="short write"):
        log.append(record(2, files=(("f", 4, [(0, b"lost")]),)), BASE)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert log.last_seq == 1
    assert not log.append(record(2, files=(("f", 4, [(0, b"next")]),)), BASE).refused
    again = JournalLog(tmp_path)
    again.load(BASE)
    assert again.last_seq == 2
