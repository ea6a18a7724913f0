"""Synchronous volumes: the fsync journal, from the primary's writer to the peers' logs.

A Synchronous fsync used to wait for a snapshot, its ``btrfs send`` and the peers' ``btrfs
receive`` (tens of milliseconds, several btrfs transaction commits). When the fsynced files
only changed data since the primary's newest snapshot (no create, rename, unlink, truncate,
chmod, ...: the FUSE daemon counts those, :attr:`FuseServer.mutations`), the fsync ships a
*journal record* instead: the byte ranges those files changed, found in the btrfs extent tree
(:mod:`sharedsync.core.journal_delta`), read back from the fsynced file. Each peer appends the
record to a log beside that snapshot and fdatasyncs it before acknowledging; the fsync returns
when the write quorum did. Anything else (a namespace change, a record too large, a peer that
lacks the snapshot, a timeout) falls back to the snapshot commit, which is always correct.

The log's rules (what makes replaying it safe):

- records belong to one base snapshot and one session of the primary's writer (random; a new
  one whenever numbering starts again), numbered 1, 2, ...; a peer appends only the next
  number of the session it logs, so a log is never missing a record in the middle;
- a peer takes records only on top of the newest snapshot it holds; once it holds a newer one,
  the older log is obsolete (that snapshot was taken after the records' data was written) and
  records for an older base are acknowledged as covered;
- a promoted replica writes its log's records, in order, into ``live`` restored from that
  snapshot, before it serves anything. A record torn by a crash was never acknowledged, and
  replay stops at it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import struct
import threading
import time
from collections.abc import Iterator, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from sharedsync.core.framing import checksum
from sharedsync.core.journal_delta import FileExtent, newer_extents, ranges_to_ship
from sharedsync.storage import btrfs

from .lineage import SnapRef
from .proto import agent_pb2 as pb

log = structlog.get_logger(__name__)

LOG_DIR = "journal"
#: A record carries at most this much data; a larger change commits through a snapshot, whose
#: stream is made for bulk (and a gRPC message stays far below its 64 MiB limit).
MAX_RECORD_BYTES = 4 * 1024 * 1024
#: While records carry the fsyncs, the primary's periodic snapshot (which trims the peers' logs
#: and bounds what a promotion replays) waits until the base is this old or this much was
#: journaled on it: each snapshot commits a btrfs transaction that fsyncs wait behind.
SNAPSHOT_AFTER_SECONDS = 10.0
SNAPSHOT_AFTER_BYTES = 64 * 1024 * 1024
_LENGTH = struct.Struct("<I")


def seal(record: pb.JournalRecord) -> None:
    """Set the record's checksum (xxh3-128 of its deterministic encoding without it)."""
    record.ClearField("checksum")
    record.checksum = checksum(record.SerializeToString(deterministic=True))


def sealed(record: pb.JournalRecord) -> bool:
    """Whether the record's checksum matches its content."""
    expected = record.checksum
    record.ClearField("checksum")
    try:
        return checksum(record.SerializeToString(deterministic=True)) == expected
    finally:
        record.checksum = expected


def check_relative(rel: str) -> str:
    """``rel`` if it names something inside a volume; ValueError otherwise."""
    if not rel or rel.startswith("/") or "\0" in rel or ".." in rel.split("/"):
        raise ValueError(f"path {rel[:200]!r} must be relative, without '..'")
    return rel


def _log_name(base: SnapRef, session: int) -> str:
    return f"{base.name}.{session:016x}.log"


def _parse_log_name(name: str) -> tuple[SnapRef, int] | None:
    stem, dot, suffix = name.rpartition(".log")
    base_name, _, session = stem.rpartition(".")
    ref = SnapRef.parse(base_name)
    if not dot or suffix or ref is None:
        return None
    try:
        return ref, int(session, 16)
    except ValueError:
        return None


# -- a peer's log ------------------------------------------------------------------------------

class JournalLog:
    """The records a replica holds on top of its newest snapshot (one log file at a time).

    Not thread-safe: the engine calls it from one thread at a time (under its journal lock).
    """

    def __init__(self, root: Path) -> None:
        self.directory = root / LOG_DIR
        self.base: SnapRef | None = None
        self.session = 0
        self.last_seq = 0
        self._fd = -1

    def _path(self) -> Path:
        assert self.base is not None
        return self.directory / _log_name(self.base, self.session)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def load(self, newest: SnapRef | None) -> None:
        """Reopen the log of ``newest`` (dropping a torn tail), delete every other one."""
        self.close()
        self.base, self.session, self.last_seq = None, 0, 0
        if not self.directory.is_dir():
            return
        for entry in sorted(self.directory.iterdir()):
            parsed = _parse_log_name(entry.name)
            if parsed is None or parsed[0] != newest or self.base is not None:
                entry.unlink(missing_ok=True)
                continue
            self.base, self.session = parsed
            good, count = _scan(entry)
            with open(entry, "r+b") as handle:
                handle.truncate(good)
                os.fsync(handle.fileno())
            self.last_seq = count
            self._fd = os.open(entry, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def drop(self) -> None:
        """Forget the log (a newer snapshot made it obsolete, or it was replayed)."""
        self.close()
        if self.base is not None:
            self._path().unlink(missing_ok=True)
        self.base, self.session, self.last_seq = None, 0, 0

    def records_on(self, newest: SnapRef | None) -> int:
        """How many records this replica holds on top of ``newest`` (its newest snapshot)."""
        return self.last_seq if self.base is not None and self.base == newest else 0

    def append(self, record: pb.JournalRecord, newest: SnapRef | None) -> pb.JournalAck:
        """Take ``record`` durably, or say why not (see the module's rules)."""
        ack = pb.JournalAck(seq=record.seq)
        base = SnapRef(record.base.epoch, record.base.seq)
        if newest is not None and newest > base:
            ack.covered = True
            return ack
        if newest != base:
            ack.refused = f"base snapshot {base.name} is not held here"
            return ack
        if self.base != base or self.session != record.session:
            if record.seq != 1:
                ack.refused = (f"record {record.seq} of {base.name} without the ones before "
                               "it")
                return ack
            if self.base == base and self.last_seq:
                # another session of the primary on the same base: records of the old one may
                # hold data this one never ships again, so they must not be dropped
                ack.refused = f"log of {base.name} belongs to another primary session"
                return ack
            self.drop()
            self.directory.mkdir(mode=0o700, exist_ok=True)
            self.base, self.session = base, record.session
            self._fd = os.open(self._path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND
                               | os.O_CLOEXEC, 0o600)
        elif record.seq <= self.last_seq:
            return ack  # sent again after a lost ack: it is durable already
        elif record.seq != self.last_seq + 1:
            ack.refused = f"record {record.seq} of {base.name} after {self.last_seq}"
            return ack
        data = record.SerializeToString(deterministic=True)
        end = os.fstat(self._fd).st_size
        framed = _LENGTH.pack(len(data)) + data
        try:
            if os.write(self._fd, framed) != len(framed):
                raise OSError(errno.ENOSPC, "short write to the journal log")
            os.fdatasync(self._fd)
        except OSError:
            # a full disk, an I/O error: no torn record may stay in front of later ones
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, end)
            raise
        self.last_seq = record.seq
        return ack

    def replay(self, live: Path) -> int:
        """Write every record of the log into ``live`` (restored from the log's base), in
        order, and fsync what it touched; returns how many records were applied."""
        if self.base is None:
            return 0
        applied = 0
        touched: set[str] = set()
        for record in _records(self._path()):
            for entry in record.files:
                rel = check_relative(entry.path)
                _apply(live, rel, entry)
                touched.add(rel)
            applied += 1
        for rel in touched:
            fd = os.open(live / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return applied


def _apply(live: Path, rel: str, entry: pb.JournalFile) -> None:
    root = Path(os.path.realpath(live))
    parent = Path(os.path.realpath((live / rel).parent))
    if parent != root and root not in parent.parents:
        raise ValueError(f"journal path {rel!r} leaves the volume")
    fd = os.open(parent / Path(rel).name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"journal path {rel!r} is not a regular file")
        for piece in entry.ranges:
            os.pwrite(fd, piece.data, piece.offset)
        os.ftruncate(fd, entry.size)
    finally:
        os.close(fd)


def _records(path: Path) -> Iterator[pb.JournalRecord]:
    """The log's intact records, in order (stops at a torn or damaged one)."""
    with open(path, "rb") as handle:
        while True:
            head = handle.read(_LENGTH.size)
            if len(head) < _LENGTH.size:
                return
            (length,) = _LENGTH.unpack(head)
            data = handle.read(length)
            if len(data) < length:
                return
            record = pb.JournalRecord()
            try:
                record.ParseFromString(data)
            except Exception:  # noqa: BLE001 - a damaged record ends the log
                return
            if not sealed(record):
                return
            yield record


def _scan(path: Path) -> tuple[int, int]:
    """(bytes, records) of the log's intact prefix."""
    good = count = 0
    for record in _records(path):
        count += 1
        good += _LENGTH.size + record.ByteSize()
    return good, count


# -- the primary's writer ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class JournalBase:
    """A snapshot records can be made on: the newest, with the FUSE server's mutation count
    read before it was taken (or found unchanged)."""

    ref: SnapRef
    generation: int  # the snapshot's btrfs generation: extents newer than it changed since
    server: Any  # the FuseServer whose count this is (a remount starts a new count)
    mutations: int


@dataclass
class Prepared:
    record: pb.JournalRecord
    base: JournalBase
    shipped: dict[str, list[FileExtent]] = field(default_factory=dict)


class JournalWriter:
    """Makes the primary's records (called from the FUSE daemon's commit thread)."""

    def __init__(self, volume_id: str, node: str) -> None:
        self.volume_id = volume_id
        self.node = node
        self.session = _new_session()
        self._lock = threading.Lock()
        self._base: JournalBase | None = None
        self._seq = 0
        self._shipped: dict[str, set[FileExtent]] = {}
        self._based_at = 0.0
        self._journaled_bytes = 0

    def carrying(self) -> bool:
        """Whether records carry the fsyncs on a recent base, so that the periodic snapshot
        can wait (see ``SNAPSHOT_AFTER_SECONDS``)."""
        with self._lock:
            return self._base is not None and self._seq > 0 \
                and time.monotonic() - self._based_at < SNAPSHOT_AFTER_SECONDS \
                and self._journaled_bytes < SNAPSHOT_AFTER_BYTES

    def rebase(self, base: JournalBase | None) -> None:
        """Make records on ``base`` from now on (None: make none, a snapshot is being taken).

        The same snapshot again (a cycle that found nothing changed) keeps the numbering and
        what was shipped; any other starts afresh at record 1."""
        with self._lock:
            if base is not None and self._base is not None and base.ref == self._base.ref \
                    and base.server is self._base.server:
                return  # the same snapshot again: keep numbering on it
            # numbering starts again at 1: under a new session, so that no peer mistakes a
            # new record 1 of a snapshot for one it holds (it refuses: another session)
            self._base, self._seq, self._shipped = base, 0, {}
            self.session = _new_session()
            self._based_at, self._journaled_bytes = time.monotonic(), 0

    def stop_on(self, base: JournalBase) -> None:
        """A record of ``base`` did not reach the quorum: no more records in this session (a
        peer may miss one now); the next rebase starts a new one."""
        with self._lock:
            if self._base is base:
                self._base = None

    def prepare(self, live: Path, paths: list[str], server: Any,
                epoch: int) -> Prepared | None:
        """The record for an fsync group, or None when it must commit through a snapshot."""
        with self._lock:
            base = self._base
        if base is None or base.server is not server or server.mutations != base.mutations:
            return None
        record = pb.JournalRecord(volume_id=self.volume_id, epoch=epoch, sender_node=self.node)
        record.base.epoch, record.base.seq = base.ref.epoch, base.ref.seq
        prepared = Prepared(record, base)
        total = 0
        for rel in paths:
            try:
                fd = os.open(live / check_relative(rel),
                             os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except (OSError, ValueError):
                return None
            try:
                st = os.fstat(fd)
                if stat.S_ISDIR(st.st_mode):
                    continue  # no namespace change since the base: nothing in it changed
                if not stat.S_ISREG(st.st_mode):
                    return None
                with self._lock:
                    # no copy: only shipped(), on this same commit thread, adds to the set, and
                    # rebase() replaces the dict rather than changing a set in it
                    shipped: Set[FileExtent] = self._shipped.get(rel, frozenset())
                new = newer_extents(btrfs.file_extents(fd, min_generation=base.generation + 1),
                                    base.generation, shipped)
                entry = record.files.add(path=rel, size=st.st_size)
                for start, end in ranges_to_ship(new, st.st_size):
                    total += end - start
                    if total > MAX_RECORD_BYTES:
                        return None
                    entry.ranges.add(offset=start, data=os.pread(fd, end - start, start))
                prepared.shipped[rel] = new
            finally:
                os.close(fd)
        if server.mutations != base.mutations:
            return None  # something was renamed or truncated while we read
        with self._lock:
            if self._base is not base:
                return None
            self._seq += 1
            record.seq, record.session = self._seq, self.session
        seal(record)
        return prepared

    def shipped(self, prepared: Prepared) -> None:
        """The quorum holds ``prepared``: its extents are not shipped again on this base."""
        with self._lock:
            if self._base is not prepared.base:
                return
            for rel, extents in prepared.shipped.items():
                self._shipped.setdefault(rel, set()).update(extents)
            self._journaled_bytes += prepared.record.ByteSize()


def _new_session() -> int:
    return int.from_bytes(os.urandom(8), "little") or 1


# -- one peer's stream -------------------------------------------------------------------------

class JournalChannel:
    """The long-lived ``Journal`` stream to one peer: a record out, its ack back."""

    def __init__(self, stub_of: Any) -> None:
        self._stub_of = stub_of
        self._call: Any = None
        self._lock = asyncio.Lock()

    async def send(self, record: pb.JournalRecord) -> pb.JournalAck:
        async with self._lock:
            try:
                if self._call is None:
                    self._call = self._stub_of().Journal()
                await self._call.write(record)
                ack = await self._call.read()
            except BaseException:
                self.close()
                raise
            if not isinstance(ack, pb.JournalAck):
                self.close()
                raise ConnectionError("the peer ended the journal stream")
            return ack

    def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()
