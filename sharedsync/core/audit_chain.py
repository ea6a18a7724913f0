"""A tamper-evident audit log: every record carries the hash of the one before it.

Promotions, rebuilds, repairs, conflict resolutions and policy changes decide what happens to a
user's data; when something goes wrong, the log of those decisions is the evidence. Chaining
each record to its predecessor by a blake3 hash makes that evidence tamper-evident: editing,
removing, inserting or reordering a record breaks the chain at that point, and
:func:`verify_chain` says where. Rotated log files stay one chain: the first record of a new
file links to the last record of the previous one.

Records are hashed in a canonical JSON form (sorted keys, no whitespace, ASCII only), so any
implementation can recompute a hash byte for byte. Details whose key names look like secrets
are dropped before a record is made, so a secret can never end up in the log.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import blake3

from .errors import InvalidArgument

DetailValue = str | int | float | bool
#: Substrings of detail keys that suggest a secret (matched case-insensitively, anywhere in the
#: key: "apiKey", "db_password" and "x-auth-token" all go). Over-matching ("keyspace") only
#: loses a detail; under-matching could leak a secret.
SECRET_MARKERS = ("password", "passwd", "secret", "token", "key", "credential", "cookie",
                  "authorization")
_SECRET = re.compile("|".join(SECRET_MARKERS), re.IGNORECASE)
HASH_HEX = 64
_HEX = re.compile(rf"[0-9a-f]{{{HASH_HEX}}}")


class MalformedAuditRecord(InvalidArgument, ValueError):  # noqa: N818 (like its base)
    """A line that is not an audit record (also a ValueError, as parsers conventionally raise)."""


class AuditKind(enum.StrEnum):
    """What kind of decision a record documents."""

    SYNC = "sync"
    PROMOTION = "promotion"
    REBUILD = "rebuild"
    REPAIR = "repair"
    CONFLICT = "conflict"
    POLICY = "policy"
    EPOCH = "epoch"  # this replica learned of (and follows) a newer epoch
    FENCE = "fence"  # this replica stopped accepting writes: a newer primary exists
    SUSPEND = "suspend"  # a primary cut off from the API server and its peers stopped, or resumed
    LAG = "lag"  # a peer's lag went over the policy's maxLag
    VOLUME = "volume"  # a replica was attached, detached or removed on this node


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of the log; ``hash`` covers every other field, ``prev_hash`` included."""

    seq: int
    time_ns: int
    node: str
    kind: AuditKind
    volume: str  # empty for events that concern no single volume
    details: tuple[tuple[str, DetailValue], ...]  # sorted by key
    prev_hash: str | None  # None only for the first record of a chain
    hash: str

    @property
    def detail_map(self) -> dict[str, DetailValue]:
        return dict(self.details)

    def body(self) -> dict[str, Any]:
        """The hashed content: every field but ``hash``."""
        return {
            "seq": self.seq,
            "time_ns": self.time_ns,
            "node": self.node,
            "kind": str(self.kind),
            "volume": self.volume,
            "details": dict(self.details),
            "prev_hash": self.prev_hash,
        }

    def to_json(self) -> str:
        """The record as one canonical JSON line (without the newline)."""
        return canonical_json({**self.body(), "hash": self.hash})

    @classmethod
    def from_json(cls, line: str) -> AuditRecord:
        """Parse a line written by :meth:`to_json`; the hash is *not* checked here."""
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise MalformedAuditRecord(f"audit record is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise MalformedAuditRecord("audit record must be a JSON object")
        expected = {f.name for f in fields(cls)}
        if set(raw) != expected:
            raise MalformedAuditRecord(f"audit record fields must be exactly {sorted(expected)}, "
                                  f"got {sorted(raw)}")
        details = raw["details"]
        if not isinstance(details, dict):
            raise MalformedAuditRecord("audit record details must be an object")
        try:
            kind = AuditKind(raw["kind"])
        except ValueError:
            raise MalformedAuditRecord(f"unknown audit record kind {raw['kind']!r}") from None
        try:
            record = cls(seq=raw["seq"], time_ns=raw["time_ns"], node=raw["node"], kind=kind,
                         volume=raw["volume"], details=_canonical_details(details),
                         prev_hash=raw["prev_hash"], hash=raw["hash"])
            _check_types(record)
        except InvalidArgument as exc:
            raise MalformedAuditRecord(str(exc)) from None
        return record


def canonical_json(value: Mapping[str, Any]) -> str:
    """Sorted keys, no whitespace, ASCII only, no NaN or infinity: one text per value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def encode_record(record: AuditRecord) -> bytes:
    """The record as one line of the log file (canonical JSON, ASCII, no newline)."""
    return record.to_json().encode("ascii")


def decode_record(line: bytes | str) -> AuditRecord:
    """Parse one line of the log file; raises :class:`MalformedAuditRecord` (a ValueError)."""
    if isinstance(line, bytes):
        try:
            line = line.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedAuditRecord("audit record is not ASCII JSON") from None
    return AuditRecord.from_json(line.strip())


def record_hash(record: AuditRecord) -> str:
    """The hash a record should carry: blake3 (hex) of its canonical body."""
    return blake3.blake3(canonical_json(record.body()).encode("ascii")).hexdigest()


def redact_details(details: Mapping[str, DetailValue]) -> dict[str, DetailValue]:
    """``details`` without any entry whose key suggests a secret."""
    return {k: v for k, v in details.items() if not _SECRET.search(k)}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_value(key: str, value: object) -> None:
    if not isinstance(value, str | int | float):  # bool is an int
        raise InvalidArgument(f"audit detail {key!r} must be a string, number or boolean, "
                              f"got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidArgument(f"audit detail {key!r} must be finite")


def _canonical_details(details: Mapping[str, object]) -> tuple[tuple[str, DetailValue], ...]:
    items: list[tuple[str, DetailValue]] = []
    for key, value in sorted(details.items()):
        if not isinstance(key, str):
            raise InvalidArgument("audit detail keys must be strings")
        _check_value(key, value)
        assert isinstance(value, str | int | float)
        items.append((key, value))
    return tuple(items)


def _check_types(record: AuditRecord) -> None:
    if not _is_int(record.seq) or record.seq < 0:
        raise InvalidArgument("audit record seq must be a non-negative integer")
    if not _is_int(record.time_ns):
        raise InvalidArgument("audit record time_ns must be an integer")
    if not isinstance(record.node, str) or not record.node:
        raise InvalidArgument("audit record node must be a non-empty string")
    if not isinstance(record.volume, str):
        raise InvalidArgument("audit record volume must be a string")
    for name, value in (("prev_hash", record.prev_hash), ("hash", record.hash)):
        if value is None and name == "prev_hash":
            continue
        if not isinstance(value, str) or not _HEX.fullmatch(value):
            raise InvalidArgument(f"audit record {name} must be {HASH_HEX} lowercase hex digits")


def _kind(kind: AuditKind | str) -> AuditKind:
    try:
        return AuditKind(kind)
    except ValueError:
        raise InvalidArgument(f"unknown audit record kind {kind!r} (known: "
                              f"{', '.join(AuditKind)})") from None


def chain_next(prev: AuditRecord | None, *, time_ns: int, node: str, kind: AuditKind | str,
               volume: str = "", details: Mapping[str, DetailValue] | None = None) -> AuditRecord:
    """The record that follows ``prev`` (``None``: the first record of a new chain).

    Secret-looking details are dropped (:func:`redact_details`) before anything is hashed.
    """
    draft = AuditRecord(
        seq=0 if prev is None else prev.seq + 1,
        time_ns=time_ns,
        node=node,
        kind=_kind(kind),
        volume=volume,
        details=_canonical_details(redact_details(dict(_canonical_details(details or {})))),
        prev_hash=None if prev is None else prev.hash,
        hash="0" * HASH_HEX,
    )
    _check_types(draft)
    return replace(draft, hash=record_hash(draft))


# -- verification --------------------------------------------------------------------------------


class ChainProblem(enum.StrEnum):
    """What :func:`verify_chain` found wrong, at the first record where it went wrong."""

    EDITED = "edited"  # the record's content does not match its hash
    BROKEN_LINK = "broken-link"  # prev_hash is not the previous record's hash
    GAP = "gap"  # sequence numbers jump forward: records are missing
    REORDERED = "reordered"  # sequence numbers go back or repeat
    TRUNCATED = "truncated"  # the chain stops short of the expected head


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of a verification.

    ``verified`` records passed (those before ``index`` when there is a problem);
    ``last_hash`` and ``last_seq`` describe the last good record, which is where the next
    rotated file must continue (``last_hash`` is its ``start_prev_hash``).
    """

    ok: bool
    verified: int
    last_hash: str | None
    last_seq: int | None
    problem: ChainProblem | None = None
    index: int | None = None  # position in the input of the first bad record
    message: str = ""


def _link_problem(record: AuditRecord, expected_prev: str | None,
                  prev_seq: int | None) -> tuple[ChainProblem, str] | None:
    expected_seq = 0 if prev_seq is None else prev_seq + 1
    seq_ok = record.seq == expected_seq or (prev_seq is None and expected_prev is not None)
    if record.prev_hash == expected_prev and seq_ok:
        return None
    if prev_seq is not None and record.seq <= prev_seq:
        return ChainProblem.REORDERED, f"seq {record.seq} after seq {prev_seq}"
    if not seq_ok:
        return ChainProblem.GAP, f"seq {record.seq} where {expected_seq} was expected"
    return ChainProblem.BROKEN_LINK, (
        f"seq {record.seq} links to {record.prev_hash!r}, not to {expected_prev!r}")


def _hash_matches(record: AuditRecord) -> bool:
    try:
        return record_hash(record) == record.hash
    except (TypeError, ValueError):  # a field no longer of a type JSON can carry
        return False


def verify_chain(records: Iterable[AuditRecord], start_prev_hash: str | None = None, *,
                 expected_head: str | None = None) -> VerifyResult:
    """Check that ``records`` form an unbroken chain.

    ``start_prev_hash`` is the hash of the record just before the first one (the last record
    of the previous rotated file), or ``None`` when ``records`` start the chain (then the first
    record must have seq 0 and no predecessor). Tail truncation cannot be seen from the records
    alone: pass ``expected_head`` (the hash of the newest record, kept elsewhere) to catch it.
    """
    expected_prev, prev_seq, verified = start_prev_hash, None, 0
    for index, record in enumerate(records):
        if not _hash_matches(record):
            return VerifyResult(False, verified, expected_prev, prev_seq, ChainProblem.EDITED,
                                index, f"record at position {index} (seq {record.seq}) does "
                                       f"not match its hash")
        problem = _link_problem(record, expected_prev, prev_seq)
        if problem is not None:
            kind, message = problem
            return VerifyResult(False, verified, expected_prev, prev_seq, kind, index,
                                f"record at position {index}: {message}")
        expected_prev, prev_seq, verified = record.hash, record.seq, verified + 1
    if expected_head is not None and expected_prev != expected_head:
        return VerifyResult(False, verified, expected_prev, prev_seq, ChainProblem.TRUNCATED,
                            verified, f"chain ends at {expected_prev!r}, expected head "
                                      f"{expected_head!r}")
    return VerifyResult(True, verified, expected_prev, prev_seq)
