"""sharedsync.core.framing: chunking, checksums, compression policy and stream verification."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import blake3
import pytest
import zstandard
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sharedsync.core.errors import FailedPrecondition, InvalidArgument
from sharedsync.core.framing import (
    CHECKSUM_BYTES,
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    NEVER_COMPRESS,
    CompressionPolicy,
    CompressionState,
    CorruptFrame,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameFault,
    checksum,
    compression_pays,
    decode,
    encode,
)

#: A link slower than any compressor: every sample that shrinks is compressed.
SLOW = CompressionPolicy(link_bytes_per_second=1.0, reevaluate_every=3)


def _random(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _frame(seq: int, raw: bytes, *, last: bool = False, digest_of: bytes | None = None) -> Frame:
    digest = blake3.blake3(raw if digest_of is None else digest_of).digest() if last else b""
    return Frame(seq=seq, payload=raw, compressed=False, raw_length=len(raw),
                 checksum=checksum(raw), last=last, stream_digest=digest)


def _fault(frames: list[Frame], chunk_limit: int = DEFAULT_CHUNK_SIZE) -> FrameFault:
    with pytest.raises(CorruptFrame) as info:
        decode(frames, chunk_limit)
    return info.value.fault


# Data that is sometimes compressible (runs and repeats) and sometimes not (random bytes).
_pieces = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=8), st.integers(1, 400)),
)
streams = st.lists(_pieces, max_size=8).map(b"".join)
policies = st.sampled_from([NEVER_COMPRESS, SLOW,
                            CompressionPolicy(link_bytes_per_second=1e6, reevaluate_every=1)])


# -- round trip ----------------------------------------------------------------------------------


@settings(max_examples=200)
@given(data=streams, chunk_size=st.integers(1, 700), policy=policies,
       cuts=st.lists(st.integers(0, 4000), max_size=6))
def test_any_stream_split_any_way_round_trips(data: bytes, chunk_size: int,
                                              policy: CompressionPolicy, cuts: list[int]) -> None:
    encoder = FrameEncoder(chunk_size, policy)
    frames: list[Frame] = []
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in itertools.pairwise(bounds):
        frames += encoder.feed(data[a:b])
    frames.append(encoder.finish())

    assert [f.seq for f in frames] == list(range(len(frames)))
    assert [f.last for f in frames] == [False] * (len(frames) - 1) + [True]
    assert all(f.raw_length == chunk_size for f in frames[:-1])
    assert frames[-1].raw_length < chunk_size
    assert all(not f.compressed or len(f.payload) < f.raw_length for f in frames)
    assert frames[-1].stream_digest == blake3.blake3(data).digest()
    assert encoder.raw_bytes == len(data)
    assert encoder.wire_bytes == sum(len(f.payload) for f in frames)

    decoder = FrameDecoder(chunk_limit=chunk_size)
    assert decoder.accept_all(frames) == data
    assert decoder.finished
    assert decoder.raw_bytes == len(data)


@given(data=streams, chunk_size=st.integers(1, 700), policy=policies)
def test_encoding_is_deterministic_and_cut_independent(data: bytes, chunk_size: int,
                                                       policy: CompressionPolicy) -> None:
    one_go = encode(data, chunk_size, policy)
    encoder = FrameEncoder(chunk_size, policy)
    bytewise = [f for i in range(len(data)) for f in encoder.feed(data[i:i + 1])]
    assert one_go == [*bytewise, encoder.finish()]


@given(data=streams, chunk_size=st.integers(1, 700), policy=policies)
def test_whole_chunks_fed_as_bytes_frame_the_same_without_a_copy(
        data: bytes, chunk_size: int, policy: CompressionPolicy) -> None:
    """A full pipe read is one whole chunk in a bytes object: the encoder frames it as it is
    (the fast path), and the frames are the ones any other cut gives."""
    pieces = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]
    encoder = FrameEncoder(chunk_size, policy)
    frames = [f for piece in pieces for f in encoder.feed(piece)]
    assert [*frames, encoder.finish()] == encode(data, chunk_size, policy)
    for piece, frame in zip(pieces, frames, strict=False):
        if not frame.compressed:
            assert frame.payload is piece


def test_a_whole_chunk_after_a_partial_one_is_not_taken_as_is() -> None:
    encoder = FrameEncoder(4)
    assert encoder.feed(b"ab") == []
    frames = encoder.feed(b"cdef")  # completes "abcd"; "ef" waits for more
    assert [f.payload for f in frames] == [b"abcd"]
    assert encoder.finish().payload == b"ef"


def test_empty_stream_is_one_empty_last_frame() -> None:
    frames = encode(b"")
    assert frames == [_frame(0, b"", last=True)]
    assert decode(frames) == b""


def test_exact_multiple_ends_with_empty_last_frame() -> None:
    frames = encode(b"x" * 8, chunk_size=4)
    assert [(f.raw_length, f.last) for f in frames] == [(4, False), (4, False), (0, True)]


def test_feed_accepts_bytearray_and_memoryview() -> None:
    encoder = FrameEncoder(4)
    frames = [*encoder.feed(bytearray(b"abc")), *encoder.feed(memoryview(b"defgh")),
              encoder.finish()]
    assert decode(frames, 4) == b"abcdefgh"


def test_feed_consumes_even_if_result_ignored() -> None:
    encoder = FrameEncoder(2)
    encoder.feed(b"abc")  # result dropped on purpose
    assert encoder.finish().payload == b"c"


def test_encoder_refuses_use_after_finish() -> None:
    encoder = FrameEncoder()
    encoder.finish()
    assert encoder.finished
    with pytest.raises(FailedPrecondition):
        encoder.feed(b"x")
    with pytest.raises(FailedPrecondition):
        encoder.finish()


@pytest.mark.parametrize("size", [0, -1, MAX_CHUNK_SIZE + 1])
def test_chunk_size_bounds(size: int) -> None:
    with pytest.raises(InvalidArgument, match="chunk_size"):
        FrameEncoder(size)
    with pytest.raises(InvalidArgument, match="chunk_limit"):
        FrameDecoder(size)


def test_a_real_sized_chunk_compresses_and_round_trips() -> None:
    data = b"".join(b"line %08d of a text-like log file\n" % i for i in range(80_000))
    frames = encode(data, compress=SLOW)
    assert len(frames) == math.ceil(len(data) / DEFAULT_CHUNK_SIZE) + (
        1 if len(data) % DEFAULT_CHUNK_SIZE == 0 else 0)
    assert all(f.compressed for f in frames if f.raw_length)
    assert sum(len(f.payload) for f in frames) < len(data) // 2
    assert decode(frames) == data


# -- corruption is detected ----------------------------------------------------------------------


def _flip(data: bytes, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    return bytes(flipped)


@settings(max_examples=300)
@given(data=streams, chunk_size=st.integers(1, 500), policy=policies, pick=st.data())
def test_any_single_bit_flip_in_a_payload_is_caught(data: bytes, chunk_size: int,
                                                    policy: CompressionPolicy,
                                                    pick: st.DataObject) -> None:
    frames = encode(data, chunk_size, policy)
    candidates = [i for i, f in enumerate(frames) if f.payload]
    assume(candidates)
    i = pick.draw(st.sampled_from(candidates))
    bit = pick.draw(st.integers(0, 8 * len(frames[i].payload) - 1))
    frames[i] = dataclasses.replace(frames[i], payload=_flip(frames[i].payload, bit))
    if not frames[i].compressed:
        _fault(frames)
        return
    # A compressed payload is verified after decompression: a flip is refused unless it leaves
    # the decompressed bytes exactly as sent (for example a larger zstd window descriptor). The
    # receiver can never be handed different bytes.
    try:
        received = decode(frames, chunk_size)
    except CorruptFrame:
        return
    assert received == data


@given(data=streams, chunk_size=st.integers(1, 500), policy=policies, pick=st.data())
def test_any_single_bit_flip_in_a_checksum_or_digest_is_caught(
        data: bytes, chunk_size: int, policy: CompressionPolicy, pick: st.DataObject) -> None:
    frames = encode(data, chunk_size, policy)
    i = pick.draw(st.integers(0, len(frames) - 1))
    if pick.draw(st.booleans()):
        bit = pick.draw(st.integers(0, 8 * CHECKSUM_BYTES - 1))
        frames[i] = dataclasses.replace(frames[i], checksum=_flip(frames[i].checksum, bit))
        assert _fault(frames, chunk_size) == FrameFault.CHECKSUM
    else:
        last = frames[-1]
        bit = pick.draw(st.integers(0, 8 * len(last.stream_digest) - 1))
        frames[-1] = dataclasses.replace(last, stream_digest=_flip(last.stream_digest, bit))
        assert _fault(frames, chunk_size) == FrameFault.STREAM_DIGEST


@given(data=streams, chunk_size=st.integers(1, 500), policy=policies, pick=st.data())
def test_any_header_field_change_is_caught(data: bytes, chunk_size: int,
                                           policy: CompressionPolicy, pick: st.DataObject) -> None:
    frames = encode(data, chunk_size, policy)
    i = pick.draw(st.integers(0, len(frames) - 1))
    frame = frames[i]
    field = pick.draw(st.sampled_from(["seq", "raw_length", "compressed", "last"]))
    if field == "seq":
        seq = pick.draw(st.integers(0, len(frames) + 2).filter(lambda s: s != i))
        frames[i] = dataclasses.replace(frame, seq=seq)
    elif field == "raw_length":
        n = pick.draw(st.integers(0, chunk_size).filter(lambda n: n != frame.raw_length))
        frames[i] = dataclasses.replace(frame, raw_length=n)
    elif field == "compressed":
        frames[i] = dataclasses.replace(frame, compressed=not frame.compressed)
    else:
        frames[i] = dataclasses.replace(frame, last=not frame.last)
    _fault(frames, chunk_size)


#: A stream and a chunk size that cut it into at least two frames.
multi_frame = st.binary(min_size=1, max_size=400).flatmap(
    lambda d: st.tuples(st.just(d), st.integers(1, min(64, len(d)))))


@given(case=multi_frame, pick=st.data())
def test_reordering_is_caught(case: tuple[bytes, int], pick: st.DataObject) -> None:
    data, chunk_size = case
    frames = encode(data, chunk_size)
    order = pick.draw(st.permutations(range(len(frames))))
    if order == sorted(order):  # make sure something moved
        i = pick.draw(st.integers(0, len(frames) - 2))
        order[i], order[i + 1] = order[i + 1], order[i]
    assert _fault([frames[j] for j in order], chunk_size) in {
        FrameFault.OUT_OF_ORDER, FrameFault.DUPLICATE, FrameFault.AFTER_LAST}


@given(case=multi_frame, pick=st.data())
def test_dropping_any_frame_is_caught(case: tuple[bytes, int], pick: st.DataObject) -> None:
    data, chunk_size = case
    frames = encode(data, chunk_size)
    del frames[pick.draw(st.integers(0, len(frames) - 1))]
    assert _fault(frames, chunk_size) in {FrameFault.OUT_OF_ORDER, FrameFault.TRUNCATED}


@given(case=multi_frame, pick=st.data())
def test_duplicating_any_frame_is_caught(case: tuple[bytes, int], pick: st.DataObject) -> None:
    data, chunk_size = case
    frames = encode(data, chunk_size)
    copy = frames[pick.draw(st.integers(0, len(frames) - 1))]
    frames.insert(pick.draw(st.integers(0, len(frames))), copy)
    assert _fault(frames, chunk_size) in {
        FrameFault.DUPLICATE, FrameFault.OUT_OF_ORDER, FrameFault.AFTER_LAST}


@given(case=multi_frame, policy=policies, pick=st.data())
def test_truncation_leaves_decoder_unfinished(case: tuple[bytes, int], policy: CompressionPolicy,
                                              pick: st.DataObject) -> None:
    data, chunk_size = case
    frames = encode(data, chunk_size, policy)
    keep = pick.draw(st.integers(0, len(frames) - 1))
    decoder = FrameDecoder(chunk_size)
    received = decoder.accept_all(frames[:keep])
    assert not decoder.finished
    assert not decoder.failed
    assert data.startswith(received)
    assert _fault(frames[:keep], chunk_size) == FrameFault.TRUNCATED


# -- each fault, by hand -------------------------------------------------------------------------


def test_fault_table() -> None:
    a, b = _frame(0, b"ab"), _frame(1, b"cd", last=True, digest_of=b"abcd")
    assert decode([a, b]) == b"abcd"
    assert _fault([b]) == FrameFault.OUT_OF_ORDER
    assert _fault([a, a]) == FrameFault.DUPLICATE
    assert _fault([a, b, dataclasses.replace(b, seq=2)]) == FrameFault.AFTER_LAST
    assert _fault([a, dataclasses.replace(b, checksum=checksum(b"xx"))]) == FrameFault.CHECKSUM
    assert _fault([a, _frame(1, b"cd", last=True)]) == FrameFault.STREAM_DIGEST
    assert _fault([a, dataclasses.replace(b, stream_digest=b"")]) == FrameFault.STREAM_DIGEST
    assert _fault([dataclasses.replace(a, raw_length=3)]) == FrameFault.LENGTH
    assert _fault([dataclasses.replace(a, raw_length=-1)]) == FrameFault.MALFORMED
    assert _fault([dataclasses.replace(a, checksum=b"short")]) == FrameFault.MALFORMED
    assert _fault([dataclasses.replace(a, stream_digest=b"x" * 32)]) == FrameFault.MALFORMED
    assert _fault([a], chunk_limit=1) == FrameFault.TOO_LARGE
    assert _fault([a]) == FrameFault.TRUNCATED


def test_decoder_is_poisoned_after_a_fault() -> None:
    a, b = _frame(0, b"ab"), _frame(1, b"cd", last=True, digest_of=b"abcd")
    decoder = FrameDecoder()
    with pytest.raises(CorruptFrame):
        decoder.accept(dataclasses.replace(a, checksum=checksum(b"zz")))
    assert decoder.failed
    for frame in (a, b):
        with pytest.raises(CorruptFrame) as info:
            decoder.accept(frame)
        assert info.value.fault == FrameFault.FAILED
    assert not decoder.finished


def test_corrupt_frame_is_an_invalid_argument_with_context() -> None:
    with pytest.raises(InvalidArgument, match="frame 7"):
        decode([_frame(7, b"")])


def _compressed(raw: bytes, *, claimed: int | None = None, content_size: bool = True,
                seq: int = 0) -> Frame:
    payload = zstandard.ZstdCompressor(level=1, write_content_size=content_size).compress(raw)
    return Frame(seq=seq, payload=payload, compressed=True,
                 raw_length=len(raw) if claimed is None else claimed, checksum=checksum(raw))


def test_decompression_bomb_is_refused_before_inflating() -> None:
    bomb = b"\0" * (64 * DEFAULT_CHUNK_SIZE)
    # Honest about its size: above the receiver's limit.
    assert _fault([_compressed(bomb)]) == FrameFault.TOO_LARGE
    # Lying about its size: the zstd header gives it away before anything is allocated.
    assert _fault([_compressed(bomb, claimed=4096)]) == FrameFault.LENGTH
    # No size in the header at all: refused too (our encoder always writes it).
    assert _fault([_compressed(b"\0" * 4096, content_size=False)]) == FrameFault.LENGTH


def test_compressed_payload_faults() -> None:
    good = _compressed(b"\0" * 4096)
    assert FrameDecoder().accept(good) == b"\0" * 4096
    junk = dataclasses.replace(good, payload=good.payload + b"junk")
    assert _fault([junk]) == FrameFault.DECOMPRESS
    not_zstd = dataclasses.replace(good, payload=b"not a zstd frame")
    assert _fault([not_zstd]) == FrameFault.DECOMPRESS
    not_smaller = dataclasses.replace(good, payload=b"\0" * 4096)
    assert _fault([not_smaller]) == FrameFault.MALFORMED


# -- compression policy --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "link", "compressor", "pays"),
    [
        (0.5, 100e6, 400e6, True),  # slow link, compressible
        (0.95, 100e6, 400e6, False),  # barely compressible: not worth the CPU
        (0.9, 100e6, 400e6, False),  # the threshold itself does not pay
        (0.5, 1e9, 400e6, False),  # link faster than the compressor
        (0.5, 400e6, 400e6, False),  # equal speeds: no gain
        (0.1, math.inf, 400e6, False),
    ],
)
def test_compression_pays_table(ratio: float, link: float, compressor: float,
                                pays: bool) -> None:
    assert compression_pays(ratio, link, compressor) is pays


@pytest.mark.parametrize(
    "kwargs",
    [{"link_bytes_per_second": 0}, {"link_bytes_per_second": -1},
     {"link_bytes_per_second": math.nan}, {"compressor_bytes_per_second": 0},
     {"compressor_bytes_per_second": math.inf}, {"max_ratio": 0}, {"max_ratio": 1.5},
     {"reevaluate_every": 0}, {"level": 0}, {"level": 99}],
)
def test_policy_validation(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {"link_bytes_per_second": 1e6, **kwargs}
    with pytest.raises(InvalidArgument):
        CompressionPolicy(**args)  # type: ignore[arg-type]


def test_policy_state_machine() -> None:
    policy = CompressionPolicy(link_bytes_per_second=1e6, reevaluate_every=3)
    state = CompressionState()
    assert policy.wants_sample(state)
    state = policy.observe(state, 100, 50)  # sample pays
    assert state == CompressionState(compressing=True, chunks_left=2)
    state = policy.observe(state, 100, 95)
    state = policy.observe(state, 100, 95)
    assert state.chunks_left == 0
    assert state.compressing
    state = policy.observe(state, 100, 95)  # window ratio 0.95: stop
    assert state == CompressionState(compressing=False, chunks_left=2)
    assert not policy.wants_sample(state)
    state = policy.skip(policy.skip(state))
    assert policy.wants_sample(state)  # time for a fresh sample
    assert not NEVER_COMPRESS.wants_sample(CompressionState())


def test_fast_link_never_compresses() -> None:
    fast = CompressionPolicy(link_bytes_per_second=10e9)
    frames = encode(b"\0" * 10_000, chunk_size=100, compress=fast)
    assert not any(f.compressed for f in frames)


def test_incompressible_data_is_sent_raw() -> None:
    frames = encode(_random(20_000), chunk_size=1000, compress=SLOW)
    assert not any(f.compressed for f in frames)


def test_policy_notices_when_the_stream_turns_compressible() -> None:
    every, chunk = 4, 1024
    policy = CompressionPolicy(link_bytes_per_second=1e6, reevaluate_every=every)
    frames = encode(_random(8 * chunk) + b"\0" * (16 * chunk), chunk, policy)
    assert not any(f.compressed for f in frames[:8])
    assert all(f.compressed for f in frames[8 + every:-1])


def test_policy_stops_when_the_stream_turns_incompressible() -> None:
    every, chunk = 4, 1024
    policy = CompressionPolicy(link_bytes_per_second=1e6, reevaluate_every=every)
    frames = encode(b"\0" * (8 * chunk) + _random(16 * chunk), chunk, policy)
    assert all(f.compressed for f in frames[:8])
    assert not any(f.compressed for f in frames[8:])  # never sent larger than raw
