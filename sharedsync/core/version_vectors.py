"""Version vectors and conflict resolution for files written on several nodes.

A ReadWriteMany volume may be mounted, and written, on several nodes at once. Timestamps alone
cannot tell "B saw A's write and overwrote it" from "A and B wrote without seeing each other":
clocks drift, and an older-looking write may be the newer one. A version vector (one counter
per writer node, bumped on every local write, merged on every sync) can: if one vector covers
the other, the newer version simply replaces the older; if neither does, the writes were
concurrent and the volume's ``conflictResolution`` decides. Whatever it decides, the result is
deterministic and the same on every node (so replicas converge without talking it over), and no
version disappears without the caller knowing: last-writer-wins reports the version it
discarded, keep-both keeps it under a conflict name.
"""

from __future__ import annotations

import enum
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .errors import InvalidArgument

#: Hex characters of the content digest that go into a conflict copy's name.
SHORT_DIGEST = 12
#: Longest file name most Linux filesystems accept, in bytes.
MAX_NAME_BYTES = 255
CONFLICT_MARK = ".conflict-"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class Ordering(enum.Enum):
    """How two version vectors relate."""

    BEFORE = "before"  # the first is an ancestor of the second
    AFTER = "after"  # the first descends from the second
    EQUAL = "equal"
    CONCURRENT = "concurrent"  # neither has seen the other: a conflict

    def reversed(self) -> Ordering:
        return _REVERSED[self]


_REVERSED = {Ordering.BEFORE: Ordering.AFTER, Ordering.AFTER: Ordering.BEFORE,
             Ordering.EQUAL: Ordering.EQUAL, Ordering.CONCURRENT: Ordering.CONCURRENT}


@dataclass(frozen=True, slots=True)
class VersionVector(Mapping[str, int]):
    """An immutable map node -> counter; absent nodes count as 0.

    Stored canonically (sorted by node, no zero counters), so equal vectors compare and hash
    equal. Build one with :meth:`of`; the constructor only checks the canonical form.
    """

    counters: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        nodes = [node for node, _ in self.counters]
        if nodes != sorted(set(nodes)):
            raise InvalidArgument("version vector nodes must be unique and sorted (use .of())")
        for node, count in self.counters:
            _check_node(node)
            if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
                raise InvalidArgument(
                    f"version vector counter for {node!r} must be a positive integer")

    @classmethod
    def of(cls, counters: Mapping[str, int] | None = None) -> VersionVector:
        """The vector with these counters (zero counters are dropped)."""
        items = dict(counters or {})
        for node, count in items.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise InvalidArgument(
                    f"version vector counter for {node!r} must be a non-negative integer")
        return cls(tuple(sorted((n, c) for n, c in items.items() if c)))

    # Mapping interface: only the nodes with a non-zero counter are keys.
    def __getitem__(self, node: str) -> int:
        for name, count in self.counters:
            if name == node:
                return count
        raise KeyError(node)

    def __iter__(self) -> Iterator[str]:
        return (node for node, _ in self.counters)

    def __len__(self) -> int:
        return len(self.counters)

    def counter(self, node: str) -> int:
        """The counter of ``node``, 0 when it never wrote."""
        return self.get(node, 0)

    def bump(self, node: str) -> VersionVector:
        """The vector after one more write on ``node``."""
        _check_node(node)
        return VersionVector.of({**dict(self.counters), node: self.counter(node) + 1})

    def merge(self, other: VersionVector) -> VersionVector:
        """The least vector that covers both: the pointwise maximum."""
        merged = dict(self.counters)
        for node, count in other.counters:
            merged[node] = max(count, merged.get(node, 0))
        return VersionVector.of(merged)

    def compare(self, other: VersionVector) -> Ordering:
        return compare(self, other)

    def dominates(self, other: VersionVector) -> bool:
        return dominates(self, other)

    def __str__(self) -> str:
        return "{" + ", ".join(f"{n}:{c}" for n, c in self.counters) + "}"


def _check_node(node: str) -> None:
    if not isinstance(node, str) or not node:
        raise InvalidArgument("a version vector node must be a non-empty string")


def compare(a: VersionVector, b: VersionVector) -> Ordering:
    """How ``a`` relates to ``b``."""
    nodes = set(a) | set(b)
    a_ahead = any(a.counter(n) > b.counter(n) for n in nodes)
    b_ahead = any(b.counter(n) > a.counter(n) for n in nodes)
    if a_ahead and b_ahead:
        return Ordering.CONCURRENT
    if a_ahead:
        return Ordering.AFTER
    if b_ahead:
        return Ordering.BEFORE
    return Ordering.EQUAL


def dominates(a: VersionVector, b: VersionVector) -> bool:
    """Whether ``a`` has seen every write ``b`` has (``a`` is after or equal to ``b``)."""
    return compare(a, b) in (Ordering.AFTER, Ordering.EQUAL)


# -- files and conflicts -------------------------------------------------------------------------


class ConflictPolicy(enum.StrEnum):
    """What to do with two concurrent versions of one file (SyncPolicy ``conflictResolution``)."""

    LAST_WRITER_WINS = "LastWriterWins"
    KEEP_BOTH = "KeepBoth"


@dataclass(frozen=True, slots=True)
class FileVersion:
    """One node's version of one file."""

    path: str  # relative to the volume root, "/"-separated
    vector: VersionVector
    mtime_ns: int
    size: int
    digest: str  # hex digest of the content
    node: str  # the node that wrote this version

    def __post_init__(self) -> None:
        if not self.path or self.path.endswith("/") or posixpath.basename(self.path) in {".", ".."}:
            raise InvalidArgument(f"file path {self.path!r} does not name a file")
        if not self.digest:
            raise InvalidArgument(f"file {self.path!r} has no content digest")
        if self.size < 0:
            raise InvalidArgument(f"file {self.path!r} has a negative size")
        _check_node(self.node)

    def same_content(self, other: FileVersion) -> bool:
        return self.digest == other.digest and self.size == other.size


@dataclass(frozen=True, slots=True)
class Resolution:
    """The outcome of reconciling two versions of a file.

    ``winner`` keeps the path and ``vector`` is the vector it is stored under (covering both
    inputs, so the next sync sees them as settled). On a conflict, ``loser`` is the version that
    lost the path: under KEEP_BOTH it survives as ``kept`` (``loser`` with the path
    ``conflict_copy``); under LAST_WRITER_WINS it is discarded, and reported here so that the
    caller can write it to the audit log.
    """

    winner: FileVersion
    vector: VersionVector
    conflict: bool
    loser: FileVersion | None = None
    conflict_copy: str | None = None

    @property
    def kept(self) -> FileVersion | None:
        """The loser as preserved under its conflict name, if it was preserved."""
        if self.loser is None or self.conflict_copy is None:
            return None
        return FileVersion(path=self.conflict_copy, vector=self.loser.vector,
                           mtime_ns=self.loser.mtime_ns, size=self.loser.size,
                           digest=self.loser.digest, node=self.loser.node)


def _precedence(v: FileVersion) -> tuple[int, str, str, int, tuple[tuple[str, int], ...]]:
    # Later mtime wins; equal mtimes go to the greater node name; the remaining fields only make
    # the order total, so the choice never depends on which side is "local".
    return (v.mtime_ns, v.node, v.digest, v.size, v.vector.counters)


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode()[:max(0, max_bytes)].decode(errors="ignore")


def conflict_name(path: str, node: str, digest: str) -> str:
    """Where the losing version of ``path`` is kept: ``<stem>.conflict-<node>-<digest><suffix>``.

    Deterministic (every node computes the same name), always different from ``path`` (the
    marker is inserted into the file name) and at most 255 bytes long (the stem is shortened
    when needed). Node and digest are reduced to ``[A-Za-z0-9._-]`` so the name stays in its
    directory.
    """
    directory, name = posixpath.split(path)
    stem, suffix = posixpath.splitext(name)
    tag = f"{CONFLICT_MARK}{_UNSAFE.sub('_', node)}-{_UNSAFE.sub('_', digest[:SHORT_DIGEST])}"
    budget = MAX_NAME_BYTES - len(tag.encode()) - len(suffix.encode())
    if budget < 1:  # absurdly long suffix: treat it as part of the stem
        stem, suffix = name, ""
        budget = MAX_NAME_BYTES - len(tag.encode())
    short = _truncate_utf8(stem, budget) or "_"
    if f"{short}{tag}{suffix}" == name:
        # Only a 255-byte name that already ends in this very tag gets here: change the last
        # character kept so the copy never lands on the path the winner keeps.
        short = short[:-1] + ("~" if short.endswith("_") else "_")
    return posixpath.join(directory, f"{short}{tag}{suffix}")


def resolve(local: FileVersion, remote: FileVersion, policy: ConflictPolicy) -> Resolution:
    """Reconcile two versions of one file; the answer does not depend on argument order."""
    if local.path != remote.path:
        raise InvalidArgument(f"cannot reconcile different files {local.path!r} and "
                              f"{remote.path!r}")
    merged = local.vector.merge(remote.vector)
    order = compare(local.vector, remote.vector)
    if order is Ordering.AFTER:
        return Resolution(winner=local, vector=merged, conflict=False)
    if order is Ordering.BEFORE:
        return Resolution(winner=remote, vector=merged, conflict=False)
    # Concurrent writes, or equal vectors that disagree about the content (which only a bug or a
    # lost counter can cause): the same treatment either way.
    winner, loser = sorted((local, remote), key=_precedence, reverse=True)
    if winner.same_content(loser):
        return Resolution(winner=winner, vector=merged, conflict=False)
    if policy is ConflictPolicy.LAST_WRITER_WINS:
        return Resolution(winner=winner, vector=merged, conflict=True, loser=loser)
    return Resolution(winner=winner, vector=merged, conflict=True, loser=loser,
                      conflict_copy=conflict_name(loser.path, loser.node, loser.digest))
