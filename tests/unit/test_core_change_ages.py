"""sharedsync.core.change_ages: the age of the oldest change a peer has not merged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.change_ages import ChangeAges
from sharedsync.core.errors import InvalidArgument


def true_age(notes: list[tuple[int, float]], merged: int, now: float) -> float:
    """What a log that forgets nothing says: the first scan whose changes the peer lacks."""
    for seq, at in notes:
        if seq > merged:
            return max(0.0, now - at)
    return 0.0


# scans as (new changes recorded, seconds since the previous scan)
scans = st.lists(st.tuples(st.integers(0, 5), st.floats(0, 10)), max_size=60)


def replay(ages: ChangeAges, steps: list[tuple[int, float]]) -> list[tuple[int, float]]:
    notes, seq, now = [], 0, 0.0
    for recorded, elapsed in steps:
        seq, now = seq + recorded, now + elapsed
        if recorded:
            notes.append((seq, now))
        ages.note(seq, now)  # a scan that recorded nothing notes the same sequence again
    return notes


def test_a_peer_that_merged_everything_waits_for_nothing() -> None:
    ages = ChangeAges()
    ages.note(3, 10.0)
    ages.note(7, 12.0)
    assert ages.age(merged=7, now=20.0) == 0.0
    assert ages.age(merged=5, now=20.0) == 8.0  # changes 6 and 7 were recorded at 12
    assert ages.age(merged=0, now=20.0) == 10.0
    ages.forget_merged([5, 7])
    assert len(ages) == 1
    assert ages.age(merged=5, now=20.0) == 8.0
    ages.forget_merged([7, 7])
    assert len(ages) == 0


def test_a_peer_never_heard_from_holds_everything() -> None:
    ages = ChangeAges()
    ages.note(2, 1.0)
    ages.forget_merged([])
    assert ages.age(merged=0, now=5.0) == 4.0


@given(scans, st.integers(0, 400), st.floats(0, 1000))
def test_without_compaction_ages_are_exact(steps: list[tuple[int, float]], merged: int,
                                           later: float) -> None:
    ages = ChangeAges(limit=10_000)
    notes = replay(ages, steps)
    now = (notes[-1][1] if notes else 0.0) + later
    assert ages.age(merged, now) == true_age(notes, merged, now)


@given(scans, st.integers(2, 6), st.integers(0, 400), st.lists(st.integers(0, 400), max_size=3))
def test_compaction_and_forgetting_never_understate_an_age(
        steps: list[tuple[int, float]], limit: int, merged: int, peers: list[int]) -> None:
    ages = ChangeAges(limit=limit)
    notes = replay(ages, steps)
    ages.forget_merged(peers)
    assert len(ages) <= limit
    now = (notes[-1][1] if notes else 0.0) + 1.0
    floor = min(peers, default=0)
    # what was forgotten was merged by every peer: a peer at or past the floor sees the truth
    # or more, never less
    for candidate in {merged, floor, *peers}:
        if candidate >= floor:
            assert ages.age(candidate, now) >= true_age(notes, candidate, now)
    # and a peer that merged everything waits for nothing
    assert ages.age(notes[-1][0] if notes else 0, now) == 0.0


def test_a_limit_below_two_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        ChangeAges(limit=1)
