"""Chunk deltas on real files: digest a base, encode against it, rebuild, check the digest."""

from __future__ import annotations

import os
import random
from pathlib import Path

import blake3
import pytest

from replication_agent.chunk_fetch import Rebuild, base_of, encode_chunks
from replication_agent.livetree import LiveTree, stat_key
from sharedsync.core.chunk_delta import (
    CHUNK_BYTES,
    DIGEST_BYTES,
    MIN_DELTA_FILE_BYTES,
    chunk_count,
    split_base,
)
from sharedsync.core.errors import InvalidArgument
from sharedsync.core.file_merge import Record, StatKey
from sharedsync.core.version_vectors import VersionVector


def record_of(tree: LiveTree, rel: str) -> Record:
    st = os.lstat(tree.root / rel)
    data = (tree.root / rel).read_bytes()
    return Record(path=rel, vector=VersionVector(), digest=blake3.blake3(data).hexdigest(),
                  size=st.st_size, mode=st.st_mode, mtime_ns=st.st_mtime_ns, writer="a",
                  uid=st.st_uid, gid=st.st_gid, stat=stat_key(st), hashed_at_ns=0)


def delta_for(new: bytes, base: bytes) -> bytes:
    """What the answering side sends for ``new`` against ``base``."""
    digests, items, index, end = split_base(base), bytearray(), 0, chunk_count(len(new))
    source = Path(os.environ.get("TMPDIR", "/tmp"))
    path = source / f"delta-source-{os.getpid()}"
    path.write_bytes(new)
    try:
        with open(path, "rb", buffering=0) as reader:
            while index < end:
                piece, index = encode_chunks(reader, digests, index, end)
                items += piece
    finally:
        path.unlink()
    return bytes(items)


def rebuild(tree: LiveTree, rel: str, base: tuple[bytes, StatKey], new: bytes,
            delta: bytes) -> tuple[bool, bytes]:
    incoming = tree.incoming(rel, symlink=False)
    reader = tree.open_version(rel, base[1])
    assert reader is not None
    job = Rebuild(incoming, reader, len(new), len(base[0]) // DIGEST_BYTES)
    try:
        job.feed(delta)
        ok = job.finish(blake3.blake3(new).hexdigest())
    finally:
        job.close()
        incoming.close()
    data = (tree.root / incoming.temp).read_bytes()
    (tree.root / incoming.temp).unlink()
    return ok, data


def test_an_edited_file_is_rebuilt_from_its_base_and_the_changed_chunks(tmp_path: Path) -> None:
    tree = LiveTree(tmp_path)
    old = random.Random(1).randbytes(10 * CHUNK_BYTES + 123)
    (tmp_path / "db").write_bytes(old)
    base = base_of(tree, record_of(tree, "db"))
    assert base is not None
    new = bytearray(old)
    new[5 * CHUNK_BYTES + 7:5 * CHUNK_BYTES + 11] = b"EDIT"
    new += b"grown"
    delta = delta_for(bytes(new), base[0])
    assert len(delta) < 2 * CHUNK_BYTES + 20  # chunk 5 and the tail chunk travel, nothing else
    ok, data = rebuild(tree, "db", base, bytes(new), delta)
    assert ok
    assert data == new


def test_a_base_that_changed_meanwhile_fails_the_digest_check(tmp_path: Path) -> None:
    tree = LiveTree(tmp_path)
    old = bytes(4 * CHUNK_BYTES)
    (tmp_path / "db").write_bytes(old)
    base = base_of(tree, record_of(tree, "db"))
    assert base is not None
    new = old[:-1] + b"x"
    delta = delta_for(new, base[0])
    # same size and mtime kept, so the stat still matches, but chunk 0 is now different
    st = os.stat(tmp_path / "db")
    with open(tmp_path / "db", "r+b") as f:
        f.write(b"local write")
    os.utime(tmp_path / "db", ns=(st.st_atime_ns, st.st_mtime_ns))
    ok, _ = rebuild(tree, "db", base, new, delta)
    assert not ok


def test_small_files_symlinks_and_changed_files_get_no_base(tmp_path: Path) -> None:
    tree = LiveTree(tmp_path)
    (tmp_path / "small").write_bytes(b"x" * (MIN_DELTA_FILE_BYTES - 1))
    assert base_of(tree, record_of(tree, "small")) is None
    (tmp_path / "big-target").write_bytes(bytes(MIN_DELTA_FILE_BYTES))
    (tmp_path / "link").symlink_to("big-target")
    assert base_of(tree, record_of(tree, "link")) is None
    assert base_of(tree, None) is None
    (tmp_path / "big").write_bytes(bytes(MIN_DELTA_FILE_BYTES))
    recorded = record_of(tree, "big")
    (tmp_path / "big").write_bytes(bytes(MIN_DELTA_FILE_BYTES + 1))  # written since
    assert base_of(tree, recorded) is None


def test_a_delta_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    tree = LiveTree(tmp_path)
    (tmp_path / "db").write_bytes(bytes(2 * CHUNK_BYTES))
    base = base_of(tree, record_of(tree, "db"))
    assert base is not None
    incoming = tree.incoming("db", symlink=False)
    reader = tree.open_version("db", base[1])
    assert reader is not None
    job = Rebuild(incoming, reader, CHUNK_BYTES, 2)
    try:
        with pytest.raises(InvalidArgument):
            job.feed(bytes([0, 0]))
    finally:
        job.close()
        incoming.discard()
