"""sharedsync.core.sizes: capacity ranges to allocated sizes, expansion, idempotent-create fit."""

from __future__ import annotations

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from sharedsync.core.errors import OutOfRange
from sharedsync.core.sizes import (
    ALIGNMENT_BYTES,
    DEFAULT_VOLUME_BYTES,
    MIN_VOLUME_BYTES,
    CapacityRange,
    GiB,
    MiB,
    align_down,
    align_up,
    fits,
    resolve_capacity,
    resolve_expansion,
)

# Sizes around the interesting boundaries (minimum, default, alignment) are far more likely to
# find an off-by-one than uniformly random 64-bit integers.
_BOUNDARIES = [0, 1, MiB - 1, MiB, MiB + 1, MIN_VOLUME_BYTES - 1, MIN_VOLUME_BYTES,
               MIN_VOLUME_BYTES + 1, DEFAULT_VOLUME_BYTES - 1, DEFAULT_VOLUME_BYTES,
               DEFAULT_VOLUME_BYTES + 1, 10 * GiB, 1 << 40]
sizes = st.one_of(
    st.sampled_from(_BOUNDARIES),
    st.integers(min_value=0, max_value=4 * GiB),
    st.integers(min_value=0, max_value=1 << 50),
    st.builds(lambda n, d: max(0, n * MiB + d), st.integers(0, 4096), st.integers(-2, 2)),
)
ranges = st.builds(CapacityRange, required=sizes, limit=sizes)


def _no_aligned_size_fits(wish: CapacityRange, minimum: int) -> bool:
    """The reference answer: no multiple of the alignment lies in [max(required, min), limit]."""
    if not wish.limit:
        return False
    return align_up(max(wish.required, minimum)) > wish.limit


# -- align ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "up", "down"),
    [(0, 0, 0), (1, MiB, 0), (MiB - 1, MiB, 0), (MiB, MiB, MiB), (MiB + 1, 2 * MiB, MiB),
     (5 * MiB, 5 * MiB, 5 * MiB)],
)
def test_align_table(value: int, up: int, down: int) -> None:
    assert align_up(value) == up
    assert align_down(value) == down


@given(st.integers(min_value=0, max_value=1 << 60), st.integers(min_value=1, max_value=1 << 30))
def test_align_properties(value: int, unit: int) -> None:
    up, down = align_up(value, unit), align_down(value, unit)
    assert up % unit == 0
    assert down % unit == 0
    assert down <= value <= up
    assert up - value < unit
    assert value - down < unit


# -- resolve_capacity: table -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wish", "expected"),
    [
        pytest.param(CapacityRange(), DEFAULT_VOLUME_BYTES, id="nothing-asked-gets-default"),
        pytest.param(CapacityRange(required=1), MIN_VOLUME_BYTES, id="tiny-gets-minimum"),
        pytest.param(CapacityRange(required=MIN_VOLUME_BYTES), MIN_VOLUME_BYTES, id="exact-min"),
        pytest.param(CapacityRange(required=MIN_VOLUME_BYTES + 1),
                     MIN_VOLUME_BYTES + MiB, id="rounded-up-to-MiB"),
        pytest.param(CapacityRange(required=5 * GiB), 5 * GiB, id="aligned-kept"),
        pytest.param(CapacityRange(required=5 * GiB, limit=5 * GiB), 5 * GiB, id="exact-range"),
        pytest.param(CapacityRange(limit=512 * MiB), 512 * MiB, id="limit-below-default"),
        pytest.param(CapacityRange(limit=10 * GiB), DEFAULT_VOLUME_BYTES, id="limit-above-default"),
        pytest.param(CapacityRange(limit=512 * MiB + 1), 512 * MiB,
                     id="unaligned-limit-rounds-down"),
        pytest.param(CapacityRange(limit=MIN_VOLUME_BYTES + MiB - 1), MIN_VOLUME_BYTES,
                     id="unaligned-limit-just-above-minimum"),
        pytest.param(CapacityRange(required=1, limit=MIN_VOLUME_BYTES), MIN_VOLUME_BYTES,
                     id="tiny-required-limit-at-minimum"),
        pytest.param(CapacityRange(required=3 * MiB + 7, limit=2 * GiB), MIN_VOLUME_BYTES,
                     id="smallest-not-default-when-required"),
    ],
)
def test_resolve_capacity_table(wish: CapacityRange, expected: int) -> None:
    assert resolve_capacity(wish) == expected


@pytest.mark.parametrize(
    ("wish", "fragment"),
    [
        pytest.param(CapacityRange(required=-1), "negative", id="negative-required"),
        pytest.param(CapacityRange(limit=-1), "negative", id="negative-limit"),
        pytest.param(CapacityRange(required=2 * GiB, limit=GiB), "exceeds", id="required>limit"),
        pytest.param(CapacityRange(limit=MIN_VOLUME_BYTES - 1), "limit_bytes",
                     id="limit-below-minimum"),
        pytest.param(CapacityRange(required=GiB + 1, limit=GiB + 2), "limit_bytes",
                     id="no-aligned-size-in-range"),
    ],
)
def test_resolve_capacity_refusals(wish: CapacityRange, fragment: str) -> None:
    with pytest.raises(OutOfRange, match=fragment):
        resolve_capacity(wish)


def test_resolve_capacity_custom_minimum_and_default() -> None:
    assert resolve_capacity(CapacityRange(), minimum=MiB, default=3 * MiB) == 3 * MiB
    assert resolve_capacity(CapacityRange(), minimum=5 * MiB, default=3 * MiB) == 5 * MiB
    assert resolve_capacity(CapacityRange(), minimum=MiB + 1, default=0) == 2 * MiB
    assert resolve_capacity(CapacityRange(limit=4 * MiB), minimum=MiB, default=10 * MiB) == 4 * MiB


# -- resolve_capacity: properties --------------------------------------------------------------


@given(ranges, st.sampled_from([MIN_VOLUME_BYTES, MiB, 16 * MiB + 3, 1]),
       st.sampled_from([DEFAULT_VOLUME_BYTES, 0, 100 * MiB + 5, 8 * GiB]))
@example(CapacityRange(limit=MIN_VOLUME_BYTES + 1), MIN_VOLUME_BYTES, DEFAULT_VOLUME_BYTES)
@example(CapacityRange(limit=GiB + 1), MIN_VOLUME_BYTES, DEFAULT_VOLUME_BYTES)
def test_resolve_capacity_properties(wish: CapacityRange, minimum: int, default: int) -> None:
    try:
        size = resolve_capacity(wish, minimum=minimum, default=default)
    except OutOfRange:
        # Raised exactly when nothing can be honoured.
        assert _no_aligned_size_fits(wish, minimum)
        return
    assert not _no_aligned_size_fits(wish, minimum)
    assert size % ALIGNMENT_BYTES == 0
    assert size >= minimum
    assert size >= wish.required
    if wish.limit:
        assert size <= wish.limit
    assert fits(size, wish)
    if wish.required:
        # The smallest aligned size that does the job: one alignment unit less would not.
        assert size - ALIGNMENT_BYTES < max(wish.required, minimum)
    else:
        assert size <= max(align_up(default), align_up(minimum))


@given(sizes, sizes)
def test_resolve_capacity_is_deterministic_and_monotonic_in_required(a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assume(lo > 0)
    assert resolve_capacity(CapacityRange(required=lo)) == resolve_capacity(
        CapacityRange(required=lo))
    assert resolve_capacity(CapacityRange(required=lo)) <= resolve_capacity(
        CapacityRange(required=hi))


@given(ranges)
def test_resolve_capacity_negative_always_refused(wish: CapacityRange) -> None:
    assume(wish.required > 0 or wish.limit > 0)
    with pytest.raises(OutOfRange):
        resolve_capacity(CapacityRange(required=-wish.required - 1, limit=wish.limit))
    with pytest.raises(OutOfRange):
        resolve_capacity(CapacityRange(required=wish.required, limit=-wish.limit - 1))


# -- fits --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "wish", "expected"),
    [
        (GiB, CapacityRange(), True),
        (GiB, CapacityRange(required=GiB), True),
        (GiB, CapacityRange(required=GiB + 1), False),
        (GiB, CapacityRange(limit=GiB), True),
        (GiB, CapacityRange(limit=GiB - 1), False),
        (GiB, CapacityRange(required=MiB, limit=2 * GiB), True),
    ],
)
def test_fits_table(size: int, wish: CapacityRange, expected: bool) -> None:
    assert fits(size, wish) is expected


@given(sizes, ranges)
def test_fits_matches_definition(size: int, wish: CapacityRange) -> None:
    expected = (not wish.required or size >= wish.required) and (
        not wish.limit or size <= wish.limit)
    assert fits(size, wish) is expected


# -- resolve_expansion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "wish", "expected"),
    [
        pytest.param(GiB, CapacityRange(required=2 * GiB), 2 * GiB, id="grow"),
        pytest.param(GiB, CapacityRange(required=GiB), GiB, id="same-size"),
        pytest.param(GiB, CapacityRange(required=MiB), GiB, id="never-shrinks"),
        pytest.param(GiB, CapacityRange(required=GiB + 1), GiB + MiB, id="rounded-up"),
        pytest.param(GiB, CapacityRange(required=GiB + 1, limit=GiB + MiB), GiB + MiB,
                     id="rounded-up-to-limit"),
        pytest.param(2 * GiB, CapacityRange(required=GiB, limit=GiB), 2 * GiB,
                     id="smaller-request-keeps-current"),
    ],
)
def test_resolve_expansion_table(current: int, wish: CapacityRange, expected: int) -> None:
    assert resolve_expansion(current, wish) == expected


@pytest.mark.parametrize(
    "wish",
    [
        pytest.param(CapacityRange(), id="nothing-required"),
        pytest.param(CapacityRange(required=-1), id="negative-required"),
        pytest.param(CapacityRange(required=2 * GiB, limit=-1), id="negative-limit"),
        pytest.param(CapacityRange(required=3 * GiB, limit=2 * GiB), id="required>limit"),
        pytest.param(CapacityRange(required=2 * GiB + 1, limit=2 * GiB + 2), id="alignment>limit"),
    ],
)
def test_resolve_expansion_refusals(wish: CapacityRange) -> None:
    with pytest.raises(OutOfRange):
        resolve_expansion(GiB, wish)


@given(st.integers(min_value=MIN_VOLUME_BYTES // MiB, max_value=1 << 20).map(lambda n: n * MiB),
       ranges)
def test_resolve_expansion_properties(current: int, wish: CapacityRange) -> None:
    try:
        size = resolve_expansion(current, wish)
    except OutOfRange:
        assert wish.required <= 0 or (wish.limit != 0 and (
            wish.required > wish.limit or align_up(wish.required) > wish.limit))
        return
    assert size >= current  # never shrinks
    assert size >= wish.required
    assert size % ALIGNMENT_BYTES == 0
    if wish.required > current:
        assert size == align_up(wish.required)
        if wish.limit:
            assert size <= wish.limit
    else:
        assert size == current
