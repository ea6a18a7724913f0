"""The per-node audit log: every sync, promotion, rebuild, repair, conflict and policy change.

Records are JSON lines, each carrying the hash of the one before it (see
``sharedsync.core.audit_chain``), so an edited, removed or reordered line is detectable with
``sharedsync-agent audit verify``. The log rotates by size (``audit.log`` -> ``audit.log.1`` ->
...), and the chain continues across files: the first record of a new file points at the last
record of the previous one. Details are filtered so that secrets never reach the log.
"""

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sharedsync.core.audit_chain import AuditKind, AuditRecord, chain_next, verify_chain
from sharedsync.core.errors import InvalidArgument

Detail = str | int | float | bool
LOG_NAME = "audit.log"


class AuditLog:
    """Append-only, hash-chained, size-rotated JSON-lines log (thread-safe)."""

    def __init__(self, directory: Path, node: str, *, max_bytes: int = 16 << 20,
                 keep: int = 8) -> None:
        self.directory = directory
        self.node = node
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()
        self._last: AuditRecord | None = None
        self._loaded = False

    @property
    def path(self) -> Path:
        return self.directory / LOG_NAME

    def _load_last(self) -> None:
        """Find the chain's tail after a restart (the newest line of the newest file)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for path in [self.path, *self.rotated()]:
            if path.exists() and path.stat().st_size:
                lines = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)
                try:
                    self._last = AuditRecord.from_json(lines[-1].decode())
                except (InvalidArgument, UnicodeDecodeError):
                    # a torn last line from a crash mid-append: the chain resumes from the
                    # line before it, and verify reports the torn line.
                    self._last = AuditRecord.from_json(lines[0].rsplit(b"\n", 1)[-1].decode()) \
                        if len(lines) > 1 else None
                break
        self._loaded = True

    def rotated(self) -> list[Path]:
        """Rotated files, newest first."""
        return [self.directory / f"{LOG_NAME}.{i}" for i in range(1, self.keep + 1)
                if (self.directory / f"{LOG_NAME}.{i}").exists()]

    def append(self, kind: AuditKind, volume: str,
               details: Mapping[str, Detail]) -> AuditRecord:
        with self._lock:
            if not self._loaded:
                self._load_last()
            record = chain_next(self._last, time_ns=time.time_ns(), node=self.node, kind=kind,
                                volume=volume, details=details)
            line = record.to_json().encode() + b"\n"
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            self._last = record
            return record

    def _rotate(self) -> None:
        oldest = self.directory / f"{LOG_NAME}.{self.keep}"
        oldest.unlink(missing_ok=True)
        for i in range(self.keep - 1, 0, -1):
            src = self.directory / f"{LOG_NAME}.{i}"
            if src.exists():
                src.rename(self.directory / f"{LOG_NAME}.{i + 1}")
        self.path.rename(self.directory / f"{LOG_NAME}.1")


@dataclass(frozen=True, slots=True)
class FileVerdict:
    ok: bool
    message: str


def read_records(paths: Iterable[Path]) -> list[AuditRecord]:
    records = []
    for path in paths:
        for number, line in enumerate(path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(AuditRecord.from_json(line.decode()))
            except (InvalidArgument, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}:{number}: not an audit record ({exc})") from exc
    return records


def verify_files(paths: list[Path]) -> FileVerdict:
    """Verify log files given oldest first; a rotated-away head is allowed, a gap is not."""
    try:
        records = read_records(paths)
    except (OSError, ValueError) as exc:
        return FileVerdict(False, f"FAILED: {exc}")
    if not records:
        return FileVerdict(True, "ok: no records")
    result = verify_chain(records, records[0].prev_hash)
    summary = json.dumps({"records": len(records), "first_seq": records[0].seq,
                          "last_seq": records[-1].seq})
    if result.ok:
        return FileVerdict(True, f"ok: unbroken chain {summary}")
    return FileVerdict(False, f"FAILED: {result.message} {summary}")
