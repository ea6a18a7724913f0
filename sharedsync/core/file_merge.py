"""Multi-writer volumes: what a scan of the live tree means, and what a peer's version means.

A ReadWriteMany volume written on several nodes at once cannot ship btrfs increments (one
node's increment would overwrite the others' writes), so each node records its replica file by
file: a :class:`Record` per path with a version vector, a content digest and the sequence number
at which the record last changed in the node's change log. Peers pull each other's change logs
and merge version by version with :mod:`sharedsync.core.version_vectors`.

This module makes every decision of that loop and does no I/O, so that it can be property
tested on its own (the agent's ``replication_agent.multiwriter`` walks, hashes, persists and
applies what it decides):

* :func:`needs_hash` and :func:`plan_scan`: which files a scan must re-read, and which records
  its results change (a changed digest, mode or owner bumps this node's counter; a vanished file
  becomes a tombstone, a deletion with a version vector of its own);
* directories are versioned too (:data:`DIRECTORY`), by existence, mode and owner only: their
  mtime and size change with every entry and mean nothing to a peer. So an empty directory
  travels, and a directory removed on one node is removed on the others (after the files in it:
  a scan records deletions deepest first). A directory that is not empty here when a peer's
  deletion arrives stays: what is in it was written here, and the next scan records the
  directory again, which brings it back on the peer;
* :func:`plan_merge`: what one remote version does to the local replica (nothing, replace the
  file, delete it, or resolve a conflict and keep the loser under its conflict name), as steps
  the adapter carries out in order;
* :func:`collectable_tombstones`: which deletions no peer needs any more. A tombstone is kept
  until every peer has merged it; then it is dropped (the change log would otherwise grow with
  every file ever deleted), and its vector joins the replica's *floor*: a path that has no
  record starts its next version from the floor, so that version dominates any copy of the
  dropped tombstone a peer still holds;
* :func:`exchange_interval`: how often a node pulls from its peers.

Why a stat alone is not trusted right after a write: a write in the same clock tick as the
previous hash, leaving the size unchanged, leaves ``(size, mtime, inode, mode)`` unchanged too
("racy" entries, as git calls them). Files modified within :data:`RACY_NS` of their last hash
are therefore hashed again on the next scan, until they are old enough for the stat to be
trusted.
"""

from __future__ import annotations

import enum
import json
import math
import posixpath
import stat as stat_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import blake3

from .errors import InvalidArgument
from .version_vectors import (
    CONFLICT_MARK,
    ConflictPolicy,
    FileVersion,
    Ordering,
    VersionVector,
    compare,
    resolve,
)

#: The "digest" of a deleted file: version_vectors.FileVersion needs a non-empty digest, and two
#: deletions of one file are the same content (so concurrent deletions are not a conflict).
TOMBSTONE = "-"
#: The "digest" of a directory: its content is its entries, each a record of its own.
DIRECTORY = "/"
#: Prefix of the agent's own temporary files in the live tree: never scanned, never accepted
#: from a peer.
TEMP_PREFIX = ".sharedsync-mw-"
#: A file modified less than this before its last hash is hashed again (see the module doc).
RACY_NS = 2_000_000_000
#: Longest relative path accepted from a peer (Linux PATH_MAX), and longest name in it.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
#: How deep conflict copies of conflict copies are planned in one merge (a bound, not a limit
#: anyone reaches: it needs concurrent edits of a conflict copy itself).
MAX_COPY_DEPTH = 4

#: How often a node pulls from its peers, by mode. Asynchronous derives it from maxLag (a
#: quarter of it, so a change reaches every peer well within maxLag even when a round is
#: missed), within [MIN_INTERVAL, MAX_INTERVAL]; the other modes use a fixed second.
FIXED_INTERVAL_SECONDS: Mapping[str, float] = {"Synchronous": 1.0, "Scheduled": 1.0}
ASYNC_FRACTION_OF_MAX_LAG = 0.25
DEFAULT_MAX_LAG_SECONDS = 5.0
MIN_INTERVAL_SECONDS = 0.2
MAX_INTERVAL_SECONDS = 5.0


def exchange_interval(mode: str, max_lag_seconds: float) -> float:
    """Seconds between two pull rounds of a multi-writer volume in ``mode``."""
    fixed = FIXED_INTERVAL_SECONDS.get(mode)
    if fixed is not None:
        return fixed
    if mode != "Asynchronous":
        raise InvalidArgument(f"unknown mode {mode!r}")
    lag = max_lag_seconds if max_lag_seconds > 0 and math.isfinite(max_lag_seconds) \
        else DEFAULT_MAX_LAG_SECONDS
    return min(MAX_INTERVAL_SECONDS, max(MIN_INTERVAL_SECONDS, lag * ASYNC_FRACTION_OF_MAX_LAG))


def check_path(path: str) -> str:
    """``path`` if it is a safe relative file path inside a volume, else InvalidArgument.

    Peers send paths; one with ``..``, a leading ``/``, an empty or ``.`` component, a NUL or
    one of our temporary names must never reach the filesystem.
    """
    if not isinstance(path, str) or not path:
        raise InvalidArgument("a file path must be a non-empty string")
    if "\0" in path or path.startswith("/") or len(path.encode("utf-8", "surrogatepass")) \
            > MAX_PATH_BYTES:
        raise InvalidArgument(f"file path {path[:200]!r} must be relative, without NUL, at "
                              f"most {MAX_PATH_BYTES} bytes")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise InvalidArgument(f"file path {path[:200]!r} has an empty, '.' or '..' part")
        if part.startswith(TEMP_PREFIX):
            raise InvalidArgument(f"file path {path[:200]!r} names an agent temporary file")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise InvalidArgument(f"file path {path[:200]!r} has a name over "
                                  f"{MAX_NAME_BYTES} bytes")
    return path


def is_conflict_copy(path: str) -> bool:
    return CONFLICT_MARK in posixpath.basename(path)


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatKey:
    """What a file looked like when it was last hashed: a change in any field means rehash."""

    size: int
    mtime_ns: int
    inode: int
    mode: int
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True, slots=True)
class ConflictNote:
    """A conflict resolved between two concurrent versions of ``path`` (see agent.proto)."""

    id: str
    path: str
    resolution: str
    winner_node: str
    winner_digest: str
    loser_node: str
    loser_digest: str
    kept_as: str = ""


@dataclass(frozen=True, slots=True)
class Record:
    """One path of this node's replica: the version it holds and where it is in the log.

    ``stat`` and ``hashed_at_ns`` are local facts (what the file looked like when its digest
    was computed, and when); ``seq`` is the record's position in the local change log. None of
    them travels: two nodes hold the same version when :meth:`same_version` says so.
    """

    path: str
    vector: VersionVector
    digest: str  # BLAKE3 hex of the content, or TOMBSTONE
    size: int
    mode: int  # st_mode: type and permission bits (0 for a tombstone)
    mtime_ns: int
    writer: str  # the node whose write made this version
    uid: int = 0
    gid: int = 0
    seq: int = 0
    stat: StatKey | None = None
    hashed_at_ns: int = 0
    conflict: ConflictNote | None = None

    @property
    def deleted(self) -> bool:
        return self.digest == TOMBSTONE

    @property
    def is_directory(self) -> bool:
        return not self.deleted and stat_module.S_ISDIR(self.mode)

    def version(self) -> FileVersion:
        return FileVersion(path=self.path, vector=self.vector, mtime_ns=self.mtime_ns,
                           size=self.size, digest=self.digest, node=self.writer)

    def same_version(self, other: Record) -> bool:
        """Same path, vector, content and metadata (local bookkeeping aside)."""
        return (self.path, self.vector, self.digest, self.size, self.mode, self.mtime_ns,
                self.writer, self.uid, self.gid) == (
            other.path, other.vector, other.digest, other.size, other.mode, other.mtime_ns,
            other.writer, other.uid, other.gid)

    def same_owner_and_mode(self, key: StatKey) -> bool:
        return (self.mode, self.uid, self.gid) == (key.mode, key.uid, key.gid)

    def same_content(self, other: Record) -> bool:
        return self.digest == other.digest and self.size == other.size

    def traveling(self) -> Record:
        """This version as a peer receives it: without the local bookkeeping."""
        return replace(self, seq=0, stat=None, hashed_at_ns=0)


def tombstone(previous: Record, node: str, when_ns: int, seq: int) -> Record:
    """The deletion, on ``node``, of the version ``previous``."""
    return Record(path=previous.path, vector=previous.vector.bump(node), digest=TOMBSTONE,
                  size=0, mode=0, mtime_ns=when_ns, writer=node, seq=seq)


# -- scanning ---------------------------------------------------------------------------------


def is_tracked_mode(mode: int) -> bool:
    """Regular files, symlinks and directories are replicated (not devices, FIFOs or sockets:
    they mean something only on the node that made them)."""
    return stat_module.S_ISREG(mode) or stat_module.S_ISLNK(mode) or stat_module.S_ISDIR(mode)


def directory_key(key: StatKey) -> StatKey:
    """What of a directory's stat is versioned: type, permissions, owner and inode (its mtime
    and size move with every entry added or removed)."""
    return replace(key, size=0, mtime_ns=0) if stat_module.S_ISDIR(key.mode) else key


def needs_hash(record: Record | None, observed: StatKey) -> bool:
    """Whether a file seen with ``observed`` must be read again to know its content."""
    if record is None or record.deleted or record.stat is None:
        return True
    observed = directory_key(observed)
    if record.stat != observed:
        return True
    if stat_module.S_ISDIR(observed.mode):
        return False
    # racy: modified too close to the hash for an unchanged stat to prove unchanged content
    return observed.mtime_ns + RACY_NS >= record.hashed_at_ns


def verifiable(record: Record | None, observed: StatKey) -> bool:
    """Whether a file's content can be checked against ``record``'s digest.

    Only a regular file whose stat proves it unchanged since it was recorded (see
    :func:`needs_hash`) can be judged: a digest that differs then is damage done behind the
    filesystem's back, while any other difference is a write that the next scan records. A scrub
    on a filesystem without data checksums (ext4) finds corruption this way.
    """
    if record is None or record.deleted or not stat_module.S_ISREG(observed.mode):
        return False
    return not needs_hash(record, observed)


@dataclass(frozen=True, slots=True)
class Hashed:
    """A file the scanner read completely while its stat stayed the same."""

    stat: StatKey
    digest: str


@dataclass(frozen=True, slots=True)
class ScanResult:
    """What a scan changes: ``changed`` records took new sequence numbers (peers will pull
    them); ``refreshed`` ones only have a new stat or hash time (nothing to pull)."""

    changed: tuple[Record, ...]
    refreshed: tuple[Record, ...]
    next_seq: int


def plan_scan(records: Mapping[str, Record], observed: Mapping[str, StatKey],
              hashed: Mapping[str, Hashed], *, node: str, now_ns: int, next_seq: int,
              pending: Mapping[str, Record] | None = None,
              floor: VersionVector | None = None) -> ScanResult:
    """The records a scan produces.

    ``observed`` is every tracked file found (path -> stat), ``hashed`` the files among them
    whose content was read (a file that needed a hash but is absent from ``hashed`` was being
    written and is left for the next scan). ``pending`` holds versions this node was applying
    from peers when it last stopped: a file found with exactly such a version's content takes
    that version rather than counting as a new local write, and a file a pending deletion
    removed takes that tombstone. ``floor`` joins the vectors of the tombstones dropped so far
    (:func:`collectable_tombstones`): a path without a record starts from it.
    """
    pending = pending or {}
    floor = floor or VersionVector()
    changed: list[Record] = []
    refreshed: list[Record] = []
    seq = next_seq
    # Deletions first and deepest first, then the rest parents first: a peer applying the log
    # in order removes the files of a directory before the directory, and empties a directory
    # before a file takes its name (and makes a directory before what goes in it).
    for path in sorted(records, reverse=True):
        vanished = records[path]
        if vanished.deleted or path in observed:
            continue
        intent = pending.get(path)
        if intent is not None and intent.deleted:
            changed.append(replace(intent, seq=seq, stat=None, hashed_at_ns=now_ns))
        else:
            changed.append(tombstone(vanished, node, now_ns, seq))
        seq += 1
    for path in sorted(hashed):
        if path not in observed:
            raise InvalidArgument(f"{path!r} was hashed but not observed")
        found = hashed[path]
        key = directory_key(found.stat)
        digest = DIRECTORY if stat_module.S_ISDIR(key.mode) else found.digest
        previous = records.get(path)
        intent = pending.get(path)
        if previous is not None and not previous.deleted and previous.digest == digest \
                and previous.same_owner_and_mode(key):
            refreshed.append(replace(previous, stat=key, hashed_at_ns=now_ns))
            continue
        if intent is not None and not intent.deleted and intent.digest == digest \
                and intent.same_owner_and_mode(key):
            changed.append(replace(intent, seq=seq, stat=key, hashed_at_ns=now_ns))
        else:
            base = previous.vector if previous is not None else floor
            changed.append(Record(
                path=path, vector=base.bump(node), digest=digest, size=key.size,
                mode=key.mode, mtime_ns=key.mtime_ns, writer=node, uid=key.uid, gid=key.gid,
                seq=seq, stat=key, hashed_at_ns=now_ns))
        seq += 1
    return ScanResult(changed=tuple(changed), refreshed=tuple(refreshed), next_seq=seq)


def collectable_tombstones(records: Mapping[str, Record], merged_by: Mapping[str, int],
                           peers: Iterable[str]) -> tuple[Record, ...]:
    """The tombstones every peer in ``peers`` has merged: those at or below the lowest sequence
    number of this replica's change log that each peer says it merged (``merged_by``: peer ->
    that number). Nothing while a peer has not said so (after a restart, or a new peer). The
    caller drops them and joins their vectors into its floor (see :func:`plan_scan`).
    """
    wanted = set(peers)
    if any(peer not in merged_by for peer in wanted):
        return ()
    horizon = min((merged_by[peer] for peer in wanted), default=None)
    return tuple(sorted((r for r in records.values()
                         if r.deleted and (horizon is None or r.seq <= horizon)),
                        key=lambda r: r.seq))


def raised_floor(floor: VersionVector, dropped: Iterable[Record]) -> VersionVector:
    """``floor`` joined with the vectors of the dropped tombstones."""
    for record in dropped:
        floor = floor.merge(record.vector)
    return floor


# -- merging --------------------------------------------------------------------------------


class Write(enum.StrEnum):
    """What a merge step does to the file at its path."""

    NONE = "none"  # the content and metadata there are already right; only the record changes
    CONTENT = "content"  # put the content named by the record's digest there
    METADATA = "metadata"  # the content is right; set mode, owner and mtime
    DELETE = "delete"  # remove the file (a directory: only if it is empty)
    DIRECTORY = "directory"  # make the directory (or take over the one there) with its mode


@dataclass(frozen=True, slots=True)
class Source:
    """Where a step's content comes from: the local file at ``path`` (as it is before the
    merge), or the peer's file at ``path``."""

    local: bool
    path: str


@dataclass(frozen=True, slots=True)
class Step:
    """One change to the local replica.

    ``expect`` is the local record the step was planned against (None: no record): the adapter
    checks that the file on disk still matches it right before writing, and leaves the step
    for a later round otherwise, so a local write made meanwhile is never overwritten unseen.
    """

    record: Record
    write: Write
    expect: Record | None
    source: Source | None = None

    @property
    def path(self) -> str:
        return self.record.path


@dataclass(frozen=True, slots=True)
class MergePlan:
    """What one remote version does here. ``steps`` run in order (a losing local version is
    saved under its conflict name before its path is overwritten); ``resolved`` lists the
    conflicts resolved here, ``learned`` those resolved elsewhere that arrived with a version
    taken from the peer."""

    steps: tuple[Step, ...] = ()
    resolved: tuple[ConflictNote, ...] = ()
    learned: tuple[ConflictNote, ...] = ()

    @property
    def skip(self) -> bool:
        return not self.steps


def conflict_note(winner: Record, loser: Record, policy: ConflictPolicy,
                  kept_as: str) -> ConflictNote:
    """The note of a conflict; its id is the same on every node that resolves it."""
    def describe(r: Record) -> list[object]:
        return [r.writer, r.digest, r.size, r.mtime_ns, [list(c) for c in r.vector.counters]]

    canonical = json.dumps([winner.path, str(policy), describe(winner), describe(loser)],
                           separators=(",", ":"))
    return ConflictNote(
        id=blake3.blake3(canonical.encode()).hexdigest()[:32], path=winner.path,
        resolution=str(policy), winner_node=winner.writer,
        winner_digest=_content_digest(winner), loser_node=loser.writer,
        loser_digest=_content_digest(loser), kept_as=kept_as)


def _content_digest(record: Record) -> str:
    """The digest a conflict note names: none for a deletion or a directory (no content)."""
    return "" if record.deleted or record.is_directory else record.digest


def _taken(remote: Record, vector: VersionVector, local: Record | None,
           note: ConflictNote | None) -> Step:
    """Step that makes the path hold the remote version (under ``vector``)."""
    record = replace(remote.traveling(), vector=vector, conflict=note or remote.conflict)
    if remote.deleted:
        write = Write.NONE if local is None or local.deleted else Write.DELETE
        return Step(record=record, write=write, expect=local)
    if local is not None and local.same_content(remote) and not local.deleted:
        same_meta = (local.mode, local.mtime_ns, local.uid, local.gid) == \
            (remote.mode, remote.mtime_ns, remote.uid, remote.gid)
        return Step(record=record, write=Write.NONE if same_meta else Write.METADATA,
                    expect=local)
    if remote.is_directory:
        return Step(record=record, write=Write.DIRECTORY, expect=local)
    return Step(record=record, write=Write.CONTENT, expect=local,
                source=Source(local=False, path=remote.path))


def _carried(remote: Record) -> tuple[ConflictNote, ...]:
    return (remote.conflict,) if remote.conflict is not None else ()


def plan_merge(records: Mapping[str, Record], remote: Record, policy: ConflictPolicy,
               *, source: Source | None = None, depth: int = 0) -> MergePlan:
    """What the remote version ``remote`` (as pulled from a peer) does to this replica.

    ``records`` is the local state (path -> record). Remote dominates: take it. Local dominates
    or equal: nothing. Concurrent: :func:`version_vectors.resolve` picks the winner (the same on
    every node); the path takes the winner under the joined vector and a note of the conflict,
    and under KeepBoth the loser (unless it is a deletion) is kept at its conflict name, itself
    merged like any incoming version. ``source`` says where the remote content lives when it
    is not the peer's file at ``remote.path`` (used for conflict copies).
    """
    check_path(remote.path)
    local = records.get(remote.path)
    remote_source = source or Source(local=False, path=remote.path)
    if local is None:
        step = _taken(remote, remote.vector, None, None)
        if step.write is Write.CONTENT:
            step = replace(step, source=remote_source)
        return MergePlan(steps=(step,), learned=_carried(remote))
    resolution = resolve(local.version(), remote.version(), policy)
    order = compare(local.vector, remote.vector)
    if not resolution.conflict:
        if order in (Ordering.AFTER, Ordering.EQUAL) or (
                resolution.winner == local.version() and resolution.vector == local.vector):
            return MergePlan()  # we hold this version, or one that has seen it
        if resolution.winner == local.version():
            # concurrent, same content, our metadata wins: only the vector grows
            record = replace(local, vector=resolution.vector, seq=0)
            return MergePlan(steps=(Step(record=record, write=Write.NONE, expect=local),))
        step = _taken(remote, resolution.vector, local, None)
        if step.write is Write.CONTENT:
            step = replace(step, source=remote_source)
        return MergePlan(steps=(step,), learned=_carried(remote))
    # a conflict: concurrent versions with different content
    local_won = resolution.winner == local.version()
    winner, loser = (local, remote) if local_won else (remote, local)
    # a losing directory is not copied: what is in it are records of their own
    kept_path = resolution.conflict_copy if not (loser.deleted or loser.is_directory) else None
    note = conflict_note(winner, loser, policy, kept_path or "")
    steps: list[Step] = []
    resolved = [note]
    learned: list[ConflictNote] = []
    if kept_path is not None:
        if depth >= MAX_COPY_DEPTH:
            raise InvalidArgument(f"conflict copies of {remote.path!r} nest too deep")
        kept = replace(loser.traveling(), path=kept_path, conflict=None)
        copy_source = Source(local=True, path=local.path) if not local_won else remote_source
        nested = plan_merge(records, kept, policy, source=copy_source, depth=depth + 1)
        steps.extend(nested.steps)
        resolved.extend(nested.resolved)
        learned.extend(nested.learned)
    if local_won:
        record = replace(local, vector=resolution.vector, seq=0, conflict=note)
        steps.append(Step(record=record, write=Write.NONE, expect=local))
    else:
        step = _taken(remote, resolution.vector, local, note)
        if step.write is Write.CONTENT:
            step = replace(step, source=remote_source)
        steps.append(step)
    return MergePlan(steps=tuple(steps), resolved=tuple(resolved), learned=tuple(learned))
