"""Which ranges an fsync journal record ships (sharedsync.core.journal_delta)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.journal_delta import (
    INLINE,
    FileExtent,
    merge_ranges,
    newer_extents,
    ranges_to_ship,
)

BASE = 100


def test_only_extents_newer_than_the_base_and_not_shipped_count() -> None:
    old = FileExtent(0, 4096, BASE, 1 << 20)
    shipped = FileExtent(4096, 4096, BASE + 1, 2 << 20)
    fresh = FileExtent(8192, 4096, BASE + 1, 3 << 20)
    assert newer_extents([old, shipped, fresh], BASE, {shipped}) == [fresh]


def test_a_rewrite_of_a_shipped_range_is_new_even_at_the_same_address() -> None:
    """A freed disk address reused by a later transaction is a different extent."""
    shipped = FileExtent(0, 4096, BASE + 1, 1 << 20)
    again = FileExtent(0, 4096, BASE + 2, 1 << 20)
    assert newer_extents([again], BASE, {shipped}) == [again]


def test_inline_data_is_shipped_and_cut_at_the_file_size() -> None:
    inline = FileExtent(0, 5, BASE + 1, kind=INLINE)
    assert ranges_to_ship([inline], 5) == [(0, 5)]
    tail = FileExtent(0, 8192, BASE + 1, 1 << 20)
    assert ranges_to_ship([tail], 5000) == [(0, 5000)]
    assert ranges_to_ship([FileExtent(8192, 4096, BASE + 1, 1)], 5000) == []


def test_touching_ranges_are_joined() -> None:
    assert merge_ranges([(8, 12), (0, 4), (4, 8), (20, 30), (25, 26), (40, 40)]) == \
        [(0, 12), (20, 30)]


ranges = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)).map(
    lambda t: (t[0], t[0] + t[1])), max_size=30)


@given(ranges)
def test_merged_ranges_cover_exactly_the_same_bytes(pieces: list[tuple[int, int]]) -> None:
    merged = merge_ranges(pieces)
    covered = {b for start, end in pieces for b in range(start, end)}
    assert {b for start, end in merged for b in range(start, end)} == covered
    assert all(a[1] < b[0] for a, b in itertools.pairwise(merged))  # apart, sorted


extents = st.lists(st.builds(FileExtent, st.integers(0, 1 << 16), st.integers(0, 1 << 14),
                             st.integers(BASE - 3, BASE + 3), st.integers(0, 5),
                             st.integers(0, 4096)), max_size=20)


@given(extents, extents, st.integers(0, 1 << 17))
def test_every_byte_of_a_new_extent_inside_the_file_is_shipped(
        written: list[FileExtent], earlier: list[FileExtent], size: int) -> None:
    """Whatever was shipped before, a byte of an extent newer than the base that was not
    shipped, and inside the file, is in a shipped range; nothing outside the file is."""
    shipped = set(earlier)
    new = newer_extents(written + earlier, BASE, shipped)
    out = ranges_to_ship(new, size)
    for e in written:
        if e.generation > BASE and e not in shipped and e.length:
            for b in (e.offset, e.offset + e.length - 1):
                if b < size:
                    assert any(start <= b < end for start, end in out), (e, out)
    assert all(0 <= start < end <= size for start, end in out)
    assert all(e not in shipped and e.generation > BASE for e in new)
