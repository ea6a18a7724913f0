"""How the sender reads the kernel's send stream: replication_agent.transfer._pipe_chunks,
on a real pipe written by another thread, as ``btrfs.send`` writes it."""

from __future__ import annotations

import asyncio
import os
import random
import threading

from replication_agent.transfer import READ_SIZE, _pipe_chunks, widen_pipe
from sharedsync.core.framing import FrameEncoder, decode


def _write_in_pieces(fd: int, data: bytes, seed: int) -> threading.Thread:
    rng = random.Random(seed)

    def run() -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view[:rng.choice((1, 4096, 65536, 300_000, 3 << 20))])
                view = view[n:]
        finally:
            os.close(fd)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _through_pipe(data: bytes, seed: int, pause: float = 0.0) -> list[bytes]:
    """What ``_pipe_chunks`` yields for ``data`` written into a widened pipe by another
    thread; ``pause``: seconds the reader spends on each piece (a slow wire)."""

    async def run() -> list[bytes]:
        read_fd, write_fd = os.pipe()
        widen_pipe(read_fd)
        writer = _write_in_pieces(write_fd, data, seed=seed)
        chunks = []
        try:
            async for chunk in _pipe_chunks(read_fd):
                chunks.append(chunk)
                await asyncio.sleep(pause)
            return chunks
        finally:
            os.close(read_fd)
            writer.join()

    return asyncio.run(run())


def test_every_byte_comes_out_in_order_in_whole_chunks() -> None:
    data = random.Random(1).randbytes(9 * READ_SIZE + 12345)
    chunks = _through_pipe(data, seed=2)
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [READ_SIZE] * 9 + [12345]


def test_whole_chunks_are_framed_without_another_copy() -> None:
    """What the sender relies on: every piece is one frame's payload as it is."""
    data = random.Random(3).randbytes(4 * READ_SIZE + 7)
    chunks = _through_pipe(data, seed=4, pause=0.02)  # the writer fills the pipe meanwhile
    encoder = FrameEncoder()
    frames = [f for c in chunks for f in encoder.feed(c)]
    assert [f.payload for f in frames] == chunks[:4]
    assert all(f.payload is c for f, c in zip(frames, chunks, strict=False))
    assert decode([*frames, encoder.finish()]) == data


def test_the_reader_leaves_no_watch_on_the_loop_when_closed_early() -> None:
    async def run() -> None:
        read_fd, write_fd = os.pipe()
        chunks = _pipe_chunks(read_fd)
        waiting = asyncio.ensure_future(anext(chunks))
        await asyncio.sleep(0.05)  # nothing written: it waits for the descriptor
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        loop = asyncio.get_running_loop()
        assert not loop.remove_reader(read_fd)  # nothing was left registered
        await chunks.aclose()
        os.close(read_fd)
        os.close(write_fd)

    asyncio.run(run())
