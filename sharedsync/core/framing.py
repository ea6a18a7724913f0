"""Framing of a replication stream: chunks, checksums, optional zstd, and an end-to-end digest.

A replica is brought up to date by piping ``btrfs send -p parent snap`` on one node into
``btrfs receive`` on another. Between the two the bytes cross gRPC, a proxy or two and the
agent's own buffers, and ``btrfs receive`` trusts whatever it is fed. So the stream is cut into
frames that are each checked on arrival (a corrupt frame is refused before any of its bytes reach
``btrfs receive``) and the whole stream is checked once more at the end, so that a missing,
repeated or reordered frame can never pass as a complete increment:

* ``seq`` numbers frames 0, 1, 2, ... so gaps, duplicates and reordering are caught;
* ``checksum`` is the xxh3-128 digest of the frame's *uncompressed* bytes (xxh3 runs at tens of
  GB/s, so checking every frame costs nothing next to the network);
* the last frame carries ``stream_digest``, the blake3 digest of the whole uncompressed stream, a
  cryptographic check that what was received is exactly what was sent;
* a frame is zstd-compressed only when that makes the transfer faster (``CompressionPolicy``).

Everything here is a pure computation over bytes: the agent owns the sockets and the pipes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import blake3
import xxhash
import zstandard

from .errors import FailedPrecondition, InvalidArgument

MiB = 1 << 20
#: Raw bytes per frame unless configured otherwise: large enough that per-frame overhead is
#: negligible, small enough to stay well under gRPC's default 4 MiB message limit.
DEFAULT_CHUNK_SIZE = 1 * MiB
#: Largest chunk an encoder may be configured with (a transport carrying such frames must raise
#: gRPC's message limit a little above it).
MAX_CHUNK_SIZE = 4 * MiB
CHECKSUM_BYTES = 16  # xxh3-128
STREAM_DIGEST_BYTES = 32  # blake3 default output
#: zstd level 1: about 400 MiB/s per core at ratio ~2.2 on text-like data (DATA_PATH_FACTS.md).
DEFAULT_LEVEL = 1
DEFAULT_COMPRESSOR_BYTES_PER_SECOND = 400e6
#: A sample must shrink below this fraction of its size for compression to be worth doing.
DEFAULT_MAX_RATIO = 0.9
#: How many chunks a compression decision holds before it is re-evaluated.
DEFAULT_REEVALUATE_EVERY = 16
_MIN_ZSTD_WINDOW = 1 << 10


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """The per-frame checksum: xxh3-128 of the uncompressed bytes."""
    return xxhash.xxh3_128_digest(data)


class FrameFault(enum.StrEnum):
    """Why a frame was refused; lets callers and tests tell the failure modes apart."""

    MALFORMED = "malformed"  # a field is out of its domain
    CHECKSUM = "checksum"  # the payload does not match its checksum
    DUPLICATE = "duplicate"  # a sequence number seen before
    OUT_OF_ORDER = "out-of-order"  # a sequence number from the future: frames missing
    AFTER_LAST = "after-last"  # a frame after the one marked last
    STREAM_DIGEST = "stream-digest"  # every frame fine, but the whole is not what was sent
    LENGTH = "length"  # the payload's length disagrees with raw_length
    TOO_LARGE = "too-large"  # raw_length above the receiver's limit (decompression bomb)
    DECOMPRESS = "decompress"  # zstd refused the payload
    TRUNCATED = "truncated"  # the stream ended before its last frame
    FAILED = "failed"  # the stream already failed; it must be restarted from the beginning


class CorruptFrame(InvalidArgument):
    """A frame (or the stream it belongs to) failed verification; the stream must be redone."""

    def __init__(self, fault: FrameFault, seq: int, message: str) -> None:
        super().__init__(f"replication stream frame {seq}: {message}")
        self.fault = fault
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Frame:
    """One unit of the replication stream, as sent on the wire."""

    seq: int
    payload: bytes  # zstd-compressed when ``compressed``, else exactly the raw bytes
    compressed: bool
    raw_length: int
    checksum: bytes  # xxh3-128 of the uncompressed payload
    last: bool = False
    stream_digest: bytes = b""  # blake3 of the whole uncompressed stream; on the last frame only


# -- compression policy --------------------------------------------------------------------------


def compression_pays(ratio: float, link_bytes_per_second: float,
                     compressor_bytes_per_second: float,
                     max_ratio: float = DEFAULT_MAX_RATIO) -> bool:
    """Whether compressing at ``ratio`` (compressed / raw) makes a transfer faster.

    Compression runs alongside sending, so a compressed transfer moves raw bytes at
    ``min(compressor, link / ratio)``: faster than the link alone only when the compressor
    outruns the link and the data actually shrinks. ``max_ratio`` demands a real saving, so
    that CPU is not burned for a few percent.
    """
    return ratio < max_ratio and link_bytes_per_second < compressor_bytes_per_second


@dataclass(frozen=True, slots=True)
class CompressionState:
    """Where an encoder is in its compression decision (owned by the encoder, pure data)."""

    compressing: bool = False
    #: Chunks left before the decision is re-evaluated; 0 means "evaluate on the next chunk".
    chunks_left: int = 0
    window_raw: int = 0
    window_compressed: int = 0


@dataclass(frozen=True, slots=True)
class CompressionPolicy:
    """When the encoder compresses: decided on a sample, re-evaluated every few chunks.

    The first chunk is a sample: it is compressed, and the result says whether to keep
    compressing. While compressing, the observed ratio over each window of
    ``reevaluate_every`` chunks decides whether to go on; while not compressing, one chunk per
    window is compressed as a fresh sample, so a stream that turns compressible is noticed.
    A link at least as fast as the compressor never compresses (and never samples).
    """

    link_bytes_per_second: float
    compressor_bytes_per_second: float = DEFAULT_COMPRESSOR_BYTES_PER_SECOND
    max_ratio: float = DEFAULT_MAX_RATIO
    reevaluate_every: int = DEFAULT_REEVALUATE_EVERY
    level: int = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if not self.link_bytes_per_second > 0:  # also refuses NaN
            raise InvalidArgument("link_bytes_per_second must be positive (math.inf: no limit)")
        if not (self.compressor_bytes_per_second > 0
                and math.isfinite(self.compressor_bytes_per_second)):
            raise InvalidArgument("compressor_bytes_per_second must be positive and finite")
        if not 0 < self.max_ratio <= 1:
            raise InvalidArgument("max_ratio must be in (0, 1]")
        if self.reevaluate_every < 1:
            raise InvalidArgument("reevaluate_every must be at least 1")
        if not 1 <= self.level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise InvalidArgument(
                f"zstd level must be in 1..{zstandard.MAX_COMPRESSION_LEVEL}, got {self.level}"
            )

    @property
    def link_is_slower(self) -> bool:
        return self.link_bytes_per_second < self.compressor_bytes_per_second

    def wants_sample(self, state: CompressionState) -> bool:
        """Whether the next chunk should be run through the compressor."""
        return self.link_is_slower and (state.compressing or state.chunks_left == 0)

    def observe(self, state: CompressionState, raw: int, compressed: int) -> CompressionState:
        """Account for a chunk that was compressed from ``raw`` to ``compressed`` bytes."""
        window_raw = state.window_raw + raw
        window_compressed = state.window_compressed + compressed
        if state.chunks_left > 0:
            return replace(state, chunks_left=state.chunks_left - 1, window_raw=window_raw,
                           window_compressed=window_compressed)
        ratio = window_compressed / window_raw if window_raw else 1.0
        return CompressionState(
            compressing=compression_pays(ratio, self.link_bytes_per_second,
                                         self.compressor_bytes_per_second, self.max_ratio),
            chunks_left=self.reevaluate_every - 1,
        )

    def skip(self, state: CompressionState) -> CompressionState:
        """Account for a chunk that was sent without trying to compress it."""
        return replace(state, chunks_left=max(0, state.chunks_left - 1))


#: A policy that never compresses (an infinitely fast link).
NEVER_COMPRESS = CompressionPolicy(link_bytes_per_second=math.inf)


# -- encoder -------------------------------------------------------------------------------------


def _check_chunk_size(chunk_size: int, name: str) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise InvalidArgument(f"{name} must be in 1..{MAX_CHUNK_SIZE} bytes, got {chunk_size}")


class FrameEncoder:
    """Cuts a byte stream into verified frames.

    Feed it the output of ``btrfs send`` in pieces of any size; every full chunk comes back as a
    frame at once, and ``finish()`` returns the last frame (the tail, possibly empty, plus the
    digest of the whole stream). The encoder is stateful but deterministic and does no I/O.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 compress: CompressionPolicy = NEVER_COMPRESS) -> None:
        _check_chunk_size(chunk_size, "chunk_size")
        self._chunk_size = chunk_size
        self._policy = compress
        self._state = CompressionState()
        self._compressor = zstandard.ZstdCompressor(level=compress.level, write_content_size=True)
        self._buffer = bytearray()
        self._digest = blake3.blake3()
        self._seq = 0
        self._raw_bytes = 0
        self._wire_bytes = 0
        self._finished = False

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def raw_bytes(self) -> int:
        """Bytes fed so far."""
        return self._raw_bytes

    @property
    def wire_bytes(self) -> int:
        """Payload bytes of the frames produced so far (after compression)."""
        return self._wire_bytes

    @property
    def finished(self) -> bool:
        return self._finished

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Take more of the stream; return the frames it completes (possibly none).

        The data is consumed at once, whether or not the caller iterates the result.
        """
        if self._finished:
            raise FailedPrecondition("the replication stream was already finished")
        view = memoryview(data).cast("B")
        self._raw_bytes += len(view)
        frames: list[Frame] = []
        start = 0
        if self._buffer:
            start = min(len(view), self._chunk_size - len(self._buffer))
            self._buffer += view[:start]
            if len(self._buffer) < self._chunk_size:
                return frames
            frames.append(self._frame(bytes(self._buffer), last=False))
            self._buffer.clear()
        if start == 0 and len(view) == self._chunk_size and isinstance(data, bytes):
            # a whole chunk in an immutable object (a full pipe read): framed without a copy
            frames.append(self._frame(data, last=False))
            return frames
        while len(view) - start >= self._chunk_size:
            frames.append(self._frame(bytes(view[start:start + self._chunk_size]), last=False))
            start += self._chunk_size
        self._buffer += view[start:]
        return frames

    def finish(self) -> Frame:
        """The last frame: whatever is buffered, marked last, with the stream digest."""
        if self._finished:
            raise FailedPrecondition("the replication stream was already finished")
        frame = self._frame(bytes(self._buffer), last=True)
        self._buffer.clear()
        self._finished = True
        return frame

    def _frame(self, raw: bytes, *, last: bool) -> Frame:
        self._digest.update(raw)
        payload, compressed = raw, False
        if raw and self._policy.wants_sample(self._state):
            packed = self._compressor.compress(raw)
            self._state = self._policy.observe(self._state, len(raw), len(packed))
            # Once paid for, a smaller result is always worth sending; never a larger one.
            if len(packed) < len(raw):
                payload, compressed = packed, True
        elif raw:
            self._state = self._policy.skip(self._state)
        frame = Frame(seq=self._seq, payload=payload, compressed=compressed,
                      raw_length=len(raw), checksum=checksum(raw), last=last,
                      stream_digest=self._digest.digest() if last else b"")
        self._seq += 1
        self._wire_bytes += len(payload)
        return frame


def encode(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE,
           compress: CompressionPolicy = NEVER_COMPRESS) -> list[Frame]:
    """All frames of a stream held in memory (convenience for tests and small streams)."""
    encoder = FrameEncoder(chunk_size, compress)
    return [*encoder.feed(data), encoder.finish()]


# -- decoder -------------------------------------------------------------------------------------


def _window_limit(chunk_limit: int) -> int:
    return max(_MIN_ZSTD_WINDOW, 1 << (chunk_limit - 1).bit_length())


@dataclass(slots=True)
class _DecoderState:
    next_seq: int = 0
    raw_bytes: int = 0
    finished: bool = False
    failed: CorruptFrame | None = None
    digest: blake3.blake3 = field(default_factory=blake3.blake3)


class FrameDecoder:
    """Verifies frames in order and returns their raw bytes.

    Any fault raises :class:`CorruptFrame` and poisons the decoder: bytes already returned came
    from an increment that will now never complete, so the receiver must discard the partial
    ``btrfs receive`` and start over. A stream that simply stops (no last frame) leaves
    ``finished`` false, which the receiver must treat the same way.
    """

    def __init__(self, chunk_limit: int = DEFAULT_CHUNK_SIZE) -> None:
        _check_chunk_size(chunk_limit, "chunk_limit")
        self._limit = chunk_limit
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=_window_limit(chunk_limit))
        self._s = _DecoderState()

    @property
    def finished(self) -> bool:
        """True once the last frame arrived and the whole stream verified."""
        return self._s.finished

    @property
    def failed(self) -> bool:
        return self._s.failed is not None

    @property
    def next_seq(self) -> int:
        return self._s.next_seq

    @property
    def raw_bytes(self) -> int:
        """Verified bytes returned so far."""
        return self._s.raw_bytes

    def accept(self, frame: Frame) -> bytes:
        """Verify ``frame`` and return its raw bytes, or raise :class:`CorruptFrame`."""
        if self._s.failed is not None:
            raise CorruptFrame(FrameFault.FAILED, frame.seq,
                               f"the stream already failed ({self._s.failed.fault})")
        try:
            return self._take(frame)
        except CorruptFrame as exc:
            self._s.failed = exc
            raise

    def _take(self, frame: Frame) -> bytes:
        raw = self._verify(frame)
        self._s.next_seq += 1
        self._s.raw_bytes += len(raw)
        self._s.digest.update(raw)
        if frame.last:
            if self._s.digest.digest() != frame.stream_digest:
                raise CorruptFrame(FrameFault.STREAM_DIGEST, frame.seq,
                                   "the stream digest does not match the bytes received")
            self._s.finished = True
        return raw

    def accept_all(self, frames: Iterable[Frame]) -> bytes:
        """Accept every frame in turn and return all their bytes joined."""
        return b"".join(self.accept(f) for f in frames)

    def _verify(self, frame: Frame) -> bytes:
        seq = frame.seq
        if self._s.finished:
            raise CorruptFrame(FrameFault.AFTER_LAST, seq, "frame after the last frame")
        self._check_order(seq)
        self._check_shape(frame)
        raw = self._unpack(frame)
        if len(raw) != frame.raw_length:
            raise CorruptFrame(FrameFault.LENGTH, seq,
                               f"{len(raw)} bytes where raw_length says {frame.raw_length}")
        if checksum(raw) != frame.checksum:
            raise CorruptFrame(FrameFault.CHECKSUM, seq, "checksum mismatch")
        return raw

    def _check_order(self, seq: int) -> None:
        expected = self._s.next_seq
        if seq < expected:
            raise CorruptFrame(FrameFault.DUPLICATE, seq,
                               f"sequence number already received (expected {expected})")
        if seq > expected:
            raise CorruptFrame(FrameFault.OUT_OF_ORDER, seq,
                               f"frames missing or out of order (expected {expected})")

    def _check_shape(self, frame: Frame) -> None:
        seq = frame.seq
        if frame.raw_length < 0:
            raise CorruptFrame(FrameFault.MALFORMED, seq, "negative raw_length")
        if frame.raw_length > self._limit:
            raise CorruptFrame(FrameFault.TOO_LARGE, seq,
                               f"raw_length {frame.raw_length} above the limit of {self._limit}")
        if len(frame.checksum) != CHECKSUM_BYTES:
            raise CorruptFrame(FrameFault.MALFORMED, seq,
                               f"checksum is {len(frame.checksum)} bytes, not {CHECKSUM_BYTES}")
        if frame.last and len(frame.stream_digest) != STREAM_DIGEST_BYTES:
            raise CorruptFrame(FrameFault.STREAM_DIGEST, seq,
                               "the last frame has no valid stream digest")
        if not frame.last and frame.stream_digest:
            raise CorruptFrame(FrameFault.MALFORMED, seq, "stream digest on a frame not last")
        if frame.compressed and len(frame.payload) >= frame.raw_length:
            # Our encoder sends a chunk compressed only when that made it smaller.
            raise CorruptFrame(FrameFault.MALFORMED, seq,
                               "compressed payload not smaller than its raw length")
        if not frame.compressed and len(frame.payload) != frame.raw_length:
            raise CorruptFrame(FrameFault.LENGTH, seq,
                               f"{len(frame.payload)} bytes where raw_length says "
                               f"{frame.raw_length}")

    def _unpack(self, frame: Frame) -> bytes:
        if not frame.compressed:
            return frame.payload
        try:
            # The header's content size decides how much zstd allocates: check it first, so a
            # frame claiming gigabytes is refused before any memory is committed.
            content_size = zstandard.get_frame_parameters(frame.payload).content_size
            if content_size != frame.raw_length:
                raise CorruptFrame(FrameFault.LENGTH, frame.seq,
                                   "zstd content size disagrees with raw_length")
            return self._decompressor.decompress(frame.payload, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CorruptFrame(FrameFault.DECOMPRESS, frame.seq,
                               f"zstd could not decompress the payload: {exc}") from None


def decode(frames: Iterable[Frame], chunk_limit: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """Verify a whole stream held in memory; raise unless it is complete and intact."""
    decoder = FrameDecoder(chunk_limit)
    data = decoder.accept_all(frames)
    if not decoder.finished:
        raise CorruptFrame(FrameFault.TRUNCATED, decoder.next_seq,
                           "the stream ended without its last frame")
    return data
