"""Chunk deltas: a new version described against the receiver's base, rebuilt exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedsync.core.chunk_delta import (
    CHUNK_BYTES,
    DIGEST_BYTES,
    LITERAL,
    SAME,
    Copy,
    DeltaDecoder,
    Literal,
    chunk_count,
    chunk_digest,
    chunk_length,
    encode_chunk,
    split_base,
)
from sharedsync.core.errors import InvalidArgument

SMALL = CHUNK_BYTES // 1024  # sizes in the properties are in units of this, to stay fast


def chunks(data: bytes) -> list[bytes]:
    return [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]


def base_of(data: bytes) -> bytes:
    return b"".join(chunk_digest(c) for c in chunks(data))


def encode(new: bytes, base: bytes) -> bytes:
    digests = split_base(base)
    return b"".join(encode_chunk(i, c, digests) for i, c in enumerate(chunks(new)))


def rebuild(old: bytes, delta: bytes, size: int, cuts: list[int]) -> bytes:
    decoder = DeltaDecoder(size, chunk_count(len(old)))
    out = bytearray()
    pieces, start = [], 0
    for cut in sorted(c % (len(delta) + 1) for c in cuts):
        pieces.append(delta[start:max(start, cut)])
        start = max(start, cut)
    pieces.append(delta[start:])
    for piece in pieces:
        for item in decoder.feed(piece):
            if isinstance(item, Copy):
                out += old[item.index * CHUNK_BYTES:(item.index + 1) * CHUNK_BYTES]
            else:
                out += item.data
    decoder.finish()
    return bytes(out)


def edited(old: bytes, edits: list[tuple[int, bytes]], new_size: int) -> bytes:
    data = bytearray(old[:new_size].ljust(new_size, b"\0"))
    for offset, patch in edits:
        at = offset % max(1, new_size)
        data[at:at + len(patch)] = patch
    return bytes(data[:new_size])


@settings(max_examples=60, deadline=None)
@given(old_units=st.integers(0, 6 * 1024), new_units=st.integers(0, 6 * 1024),
       edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.binary(min_size=1, max_size=64)),
                      max_size=5),
       cuts=st.lists(st.integers(0, 1 << 30), max_size=6), seed=st.integers(0, 255))
def test_any_edit_split_any_way_rebuilds_the_new_version(old_units: int, new_units: int,
                                                         edits: list[tuple[int, bytes]],
                                                         cuts: list[int], seed: int) -> None:
    old = bytes((i * 7 + seed) % 251 for i in range(old_units * SMALL))
    new = edited(old, edits, new_units * SMALL)
    delta = encode(new, base_of(old))
    assert rebuild(old, delta, len(new), cuts) == new
    # never more than the whole file plus one tag per chunk
    assert len(delta) <= len(new) + chunk_count(len(new))


def test_an_unchanged_file_costs_a_byte_per_chunk() -> None:
    data = bytes(range(256)) * (3 * CHUNK_BYTES // 256 + 7)
    delta = encode(data, base_of(data))
    assert delta == bytes([SAME]) * chunk_count(len(data))


def test_a_scattered_write_sends_only_its_chunk() -> None:
    old = bytes(5 * CHUNK_BYTES)
    new = edited(old, [(2 * CHUNK_BYTES + 100, b"changed")], len(old))
    delta = encode(new, base_of(old))
    assert len(delta) == 5 + CHUNK_BYTES
    assert delta[2] == LITERAL


def test_an_append_sends_the_tail_only() -> None:
    old = bytes(2 * CHUNK_BYTES)
    new = old + b"appended"
    delta = encode(new, base_of(old))
    assert delta == bytes([SAME, SAME, LITERAL]) + b"appended"


def test_chunk_lengths() -> None:
    assert chunk_count(0) == 0
    assert chunk_count(1) == 1
    assert chunk_count(CHUNK_BYTES) == 1
    assert chunk_length(CHUNK_BYTES + 5, 1) == 5
    assert chunk_length(CHUNK_BYTES + 5, 2) == 0


@pytest.mark.parametrize(("size", "base_chunks", "stream", "problem"), [
    (CHUNK_BYTES, 0, bytes([SAME]), "does not have"),  # copies what the base lacks
    (CHUNK_BYTES, 1, bytes([7]), "unknown delta tag"),
    (CHUNK_BYTES, 1, bytes([SAME, SAME]), "past the last chunk"),
    (0, 0, bytes([SAME]), "past the last chunk"),
])
def test_hostile_deltas_are_refused(size: int, base_chunks: int, stream: bytes,
                                    problem: str) -> None:
    decoder = DeltaDecoder(size, base_chunks)
    with pytest.raises(InvalidArgument, match=problem):
        list(decoder.feed(stream))


def test_a_delta_cut_short_is_refused() -> None:
    decoder = DeltaDecoder(2 * CHUNK_BYTES, 2)
    items = list(decoder.feed(bytes([SAME, LITERAL]) + b"x" * 10))
    assert items == [Copy(0)]
    with pytest.raises(InvalidArgument, match="ended at chunk 1"):
        decoder.finish()


def test_a_literal_arrives_whole_even_when_split() -> None:
    decoder = DeltaDecoder(3, 0)
    assert list(decoder.feed(bytes([LITERAL]) + b"a")) == []
    assert list(decoder.feed(b"bc")) == [Literal(0, b"abc")]
    decoder.finish()


def test_a_malformed_base_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        split_base(b"x" * (DIGEST_BYTES + 1))
    assert split_base(b"") == []


def test_negative_size_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        DeltaDecoder(-1, 0)
