"""Changed chunks only: a new version of a file described against a base the receiver holds.

File-level replication (multi-writer volumes, and every volume on the ext4 fallback store) moves
whole versions of files. When the receiver still holds an older version of a file, most of a
large file is usually the same: a database page rewritten, a log appended to. The receiver then
sends, with its request, the xxh3-64 digest of each :data:`CHUNK_BYTES` chunk of its version
(the *base*); the sender compares each chunk of the new version with the base chunk at the same
index and sends a one-byte tag for a chunk the receiver already has, or the tag and the chunk's
bytes for one it lacks.

The delta stream is a sequence of items, one per chunk of the new version, in order::

    SAME                      the base's chunk at this index is the new chunk
    LITERAL <chunk bytes>     the new chunk (CHUNK_BYTES long, the last one shorter)

Nothing here is trusted for integrity: a 64-bit chunk digest can collide, and the base may
change under the receiver. The receiver hashes the file it rebuilt with the version's BLAKE3
content digest and keeps it only if that matches (the caller's job), as for a whole transfer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import xxhash

from .errors import InvalidArgument
from .sizes import MiB

#: Chunk size of bases and deltas: small enough that a scattered 40 KiB write costs about
#: 56 KiB on the wire (rsync's blocks for a 16 MiB file are 4 KiB, plus checksums of every
#: block), large enough that a 1 GiB file's base is 512 KiB of digests.
CHUNK_BYTES = MiB // 64  # 16 KiB
#: Bytes of one chunk digest in a base (xxh3-64, big-endian).
DIGEST_BYTES = 8
#: Files smaller than this travel whole: a delta would save almost nothing.
MIN_DELTA_FILE_BYTES = 2 * CHUNK_BYTES
SAME = 0
LITERAL = 1


def chunk_digest(chunk: bytes | memoryview) -> bytes:
    return xxhash.xxh3_64_digest(chunk)


def chunk_count(size: int) -> int:
    return -(-size // CHUNK_BYTES)


def chunk_length(size: int, index: int) -> int:
    """Length of chunk ``index`` of a ``size``-byte file."""
    return max(0, min(CHUNK_BYTES, size - index * CHUNK_BYTES))


def split_base(base: bytes) -> list[bytes]:
    """The chunk digests of a base as it travels (concatenated); refuses a malformed one."""
    if len(base) % DIGEST_BYTES:
        raise InvalidArgument(f"a base is a whole number of {DIGEST_BYTES}-byte digests, "
                              f"got {len(base)} bytes")
    return [base[i:i + DIGEST_BYTES] for i in range(0, len(base), DIGEST_BYTES)]


def encode_chunk(index: int, chunk: bytes, base: list[bytes]) -> bytes:
    """The delta item for chunk ``index`` of the new version."""
    if index < len(base) and chunk_digest(chunk) == base[index]:
        return bytes((SAME,))
    return bytes((LITERAL,)) + chunk


@dataclass(frozen=True, slots=True)
class Copy:
    """Take chunk ``index`` from the base."""

    index: int


@dataclass(frozen=True, slots=True)
class Literal:
    """Chunk ``index`` is ``data``."""

    index: int
    data: bytes


class DeltaDecoder:
    """Turns delta stream bytes, split anywhere, back into per-chunk instructions.

    ``size`` is the new version's length and ``base_chunks`` how many chunks the base has; an
    item that refers to a chunk the base lacks, an unknown tag, or bytes past the last chunk is
    a protocol error (``InvalidArgument``), as is a stream that ends early (:meth:`finish`).
    """

    def __init__(self, size: int, base_chunks: int) -> None:
        if size < 0:
            raise InvalidArgument(f"a file size cannot be negative, got {size}")
        self.size = size
        self.base_chunks = base_chunks
        self.chunks = chunk_count(size)
        self.index = 0
        self._pending = bytearray()

    @property
    def done(self) -> bool:
        return self.index >= self.chunks

    def feed(self, data: bytes) -> Iterator[Copy | Literal]:
        self._pending += data
        while self._pending:
            if self.done:
                raise InvalidArgument("the delta goes on past the last chunk of the file")
            tag = self._pending[0]
            if tag == SAME:
                if self.index >= self.base_chunks:
                    raise InvalidArgument(f"the delta copies chunk {self.index}, which the "
                                          f"base ({self.base_chunks} chunks) does not have")
                del self._pending[:1]
                yield Copy(self.index)
            elif tag == LITERAL:
                length = chunk_length(self.size, self.index)
                if len(self._pending) < 1 + length:
                    return  # the rest of this chunk is in the next piece
                data_bytes = bytes(self._pending[1:1 + length])
                del self._pending[:1 + length]
                yield Literal(self.index, data_bytes)
            else:
                raise InvalidArgument(f"unknown delta tag {tag} at chunk {self.index}")
            self.index += 1

    def finish(self) -> None:
        if self._pending or not self.done:
            raise InvalidArgument(f"the delta ended at chunk {self.index} of {self.chunks}")
