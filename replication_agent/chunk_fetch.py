"""The I/O of chunk deltas in FetchContents (the format is ``sharedsync.core.chunk_delta``).

Asking side: :func:`base_of` digests this replica's version of a file chunk by chunk, so the
peer can leave out what is already here; :class:`Rebuild` turns the peer's delta back into the
new version, in a temporary file beside the destination, from the base's chunks and the literal
ones, and hashes what it writes: the result counts only if that hash is the version's BLAKE3
content digest (the base may have changed meanwhile, or two chunks collided in 64 bits).

Answering side: :func:`encode_chunks` reads the version asked for and encodes it against the
caller's base, a few chunks per call so that it runs in a worker thread.

All functions here block (file reads and writes): call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import stat
from typing import BinaryIO

import blake3

from sharedsync.core.chunk_delta import (
    CHUNK_BYTES,
    MIN_DELTA_FILE_BYTES,
    Copy,
    DeltaDecoder,
    chunk_digest,
    chunk_length,
    encode_chunk,
)
from sharedsync.core.errors import InvalidArgument
from sharedsync.core.file_merge import Record, StatKey

from .livetree import Incoming, LiveTree

#: Chunks read and encoded per worker-thread call on the answering side (1 MiB).
CHUNKS_PER_CALL = 16


def base_of(tree: LiveTree, record: Record | None) -> tuple[bytes, StatKey] | None:
    """The chunk digests of this replica's version of ``record.path``, and the stat they
    belong to; None when there is nothing worth a delta (no regular file, a small one, or one
    being written: its stat is no longer the recorded one)."""
    if record is None or record.deleted or record.stat is None \
            or not stat.S_ISREG(record.mode) or record.size < MIN_DELTA_FILE_BYTES:
        return None
    reader = tree.open_version(record.path, record.stat)
    if reader is None:
        return None
    digests = bytearray()
    with reader:
        while chunk := read_exactly(reader, CHUNK_BYTES):
            digests += chunk_digest(chunk)
    return bytes(digests), record.stat


def read_exactly(reader: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes: fewer only at the end of the file (raw reads may return less)."""
    data = bytearray()
    while len(data) < size:
        piece = reader.read(size - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)


def encode_chunks(reader: BinaryIO, base: list[bytes], first: int, end: int) -> tuple[bytes, int]:
    """Delta items for chunks ``first`` up to ``end`` (the version's chunk count), at most
    :data:`CHUNKS_PER_CALL` of them; returns the items and the next chunk index."""
    items = bytearray()
    index = first
    while index < end and index < first + CHUNKS_PER_CALL:
        chunk = read_exactly(reader, CHUNK_BYTES)
        if not chunk:
            break  # the file shrank while read: the caller's digest check will refuse it
        items += encode_chunk(index, chunk, base)
        index += 1
    return bytes(items), index


class Rebuild:
    """One file being rebuilt from a delta: base reader, decoder, destination, running hash."""

    def __init__(self, incoming: Incoming, base: BinaryIO, size: int, base_chunks: int) -> None:
        self.incoming = incoming
        self.base = base
        self.decoder = DeltaDecoder(size, base_chunks)
        self.hasher = blake3.blake3()
        #: Bytes that came literally (the rest was copied from the base).
        self.literal_bytes = 0

    def feed(self, data: bytes) -> None:
        """Apply delta bytes (``InvalidArgument`` for a malformed delta)."""
        for item in self.decoder.feed(data):
            if isinstance(item, Copy):
                chunk = os.pread(self.base.fileno(), CHUNK_BYTES, item.index * CHUNK_BYTES)
                if len(chunk) != chunk_length(self.decoder.size, item.index):
                    raise InvalidArgument(f"the base is shorter than its chunk {item.index}")
            else:
                chunk = item.data
                self.literal_bytes += len(chunk)
            self.incoming.write(chunk)
            self.hasher.update(chunk)

    def finish(self, digest: str) -> bool:
        """Whether the rebuilt file is the version ``digest`` names (the delta must be whole)."""
        self.decoder.finish()
        return self.hasher.hexdigest() == digest

    def close(self) -> None:
        self.base.close()
