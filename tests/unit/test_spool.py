"""replication_agent.spool: the spool writer's thread, on real files and pipes."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from pathlib import Path

import pytest

from replication_agent import spool as spool_module
from replication_agent.lineage import SnapRef
from replication_agent.spool import Spool, SpoolWriter


def _pieces(count: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(1, 200_000)) for _ in range(count)]


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_kept_spool_holds_every_byte_in_order_and_its_descriptor_is_closed(
        tmp_path: Path) -> None:
    path = tmp_path / "s.stream"
    pieces = _pieces(60)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def run() -> None:
        writer = SpoolWriter(fd)
        for piece in pieces:
            await writer.append(piece)
        await writer.keep()

    asyncio.run(run())
    assert path.read_bytes() == b"".join(pieces)
    assert _closed(fd)


def test_a_dropped_spool_stops_and_closes(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "s.stream", os.O_WRONLY | os.O_CREAT, 0o600)

    async def run() -> None:
        writer = SpoolWriter(fd)
        await writer.append(b"x" * 1000)
        writer.drop()

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while not _closed(fd) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _closed(fd)


def test_a_write_error_reaches_the_stream(tmp_path: Path) -> None:
    (tmp_path / "ro").write_bytes(b"")
    fd = os.open(tmp_path / "ro", os.O_RDONLY)  # every write fails with EBADF

    async def run() -> None:
        writer = SpoolWriter(fd)
        await writer.append(b"first")
        async with asyncio.timeout(10):
            while True:  # the thread fails the first write; a later append says so
                await writer.append(b"more")
                await asyncio.sleep(0.01)

    with pytest.raises(OSError, match=os.strerror(errno.EBADF)):
        asyncio.run(run())


def test_the_stream_waits_while_the_writer_is_too_far_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Back-pressure, with a pipe nobody reads as the spool: the writer thread blocks on it,
    appends stop returning at the limit, and go on once the pipe is drained."""
    monkeypatch.setattr(spool_module, "QUEUED_BYTES_LIMIT", 256 * 1024)
    read_fd, write_fd = os.pipe()
    piece = b"p" * 65536

    async def run() -> None:
        writer = SpoolWriter(write_fd)
        appended = 0

        async def fill() -> None:
            nonlocal appended
            for _ in range(64):
                await writer.append(piece)
                appended += 1

        filling = asyncio.ensure_future(fill())
        await asyncio.sleep(0.5)
        # the pipe (64 KiB) holds one piece, the thread blocks on the next, and the queue
        # takes up to the limit: far from the 64 pieces
        assert not filling.done()
        assert appended <= 8
        drained = 0
        async with asyncio.timeout(20):
            while not filling.done() or drained < 64 * len(piece):
                drained += len(await asyncio.to_thread(os.read, read_fd, 1 << 20))
        await writer.keep()
        assert drained == 64 * len(piece)

    try:
        asyncio.run(run())
    finally:
        os.close(read_fd)


def test_spool_finds_and_clears_a_volumes_partial_stream(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "vol-1")
    assert spool.partial() is None
    spool.directory.mkdir()
    ref = SnapRef(2, 7)
    spool.path(ref).write_bytes(b"x" * 123)
    Spool(spool.directory, "vol-2").path(SnapRef(1, 1)).write_bytes(b"other")
    assert spool.partial() == (ref, 123)
    spool.clear()
    assert spool.partial() is None
    assert Spool(spool.directory, "vol-2").partial() == (SnapRef(1, 1), 5)
