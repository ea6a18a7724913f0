"""sharedsync.core.token_bucket: pacing with a fake clock, and weighted max-min fair shares."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.token_bucket import BucketState, TokenBucket, fair_shares, refill

#: Clock readings are absolute floats, so a wait of nanoseconds added to a clock at seconds loses
#: digits: compare pacing results to a relative precision of a millionth.
REL = 1e-6


def close(a: float, b: float, scale: float = 1.0) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=REL * max(1.0, scale))


# -- token bucket: table -------------------------------------------------------------------------


def test_a_full_bucket_sends_a_burst_at_once_then_paces() -> None:
    bucket = TokenBucket(rate_bytes_per_s=100, burst_bytes=50)
    assert bucket.take(50, now=0.0) == 0.0
    assert bucket.take(10, now=0.0) == pytest.approx(0.1)
    assert bucket.take(10, now=0.0) == pytest.approx(0.2)  # queued behind the first wait


def test_more_than_the_burst_goes_into_debt() -> None:
    bucket = TokenBucket(rate_bytes_per_s=100, burst_bytes=50)
    assert bucket.take(250, now=0.0) == pytest.approx(2.0)
    assert bucket.tokens(now=0.0) == pytest.approx(-200)
    assert bucket.tokens(now=2.0) == pytest.approx(0)
    assert bucket.take(0, now=2.0) == 0.0


def test_idle_time_refills_up_to_the_burst_only() -> None:
    bucket = TokenBucket(rate_bytes_per_s=100, burst_bytes=50, tokens=0)
    assert bucket.tokens(now=0.2) == pytest.approx(20)
    assert bucket.tokens(now=100.0) == 50
    assert bucket.take(60, now=100.0) == pytest.approx(0.1)


def test_set_rate_is_live_and_keeps_what_accrued() -> None:
    bucket = TokenBucket(rate_bytes_per_s=100, burst_bytes=100)
    assert bucket.take(300, now=0.0) == pytest.approx(2.0)
    bucket.set_rate(200, now=1.0)  # 100 bytes of debt repaid at the old rate, 100 left
    assert bucket.rate == 200
    assert bucket.take(0, now=1.0) == pytest.approx(0.5)
    assert bucket.take(100, now=1.5) == pytest.approx(0.5)


def test_set_burst_clips_the_level() -> None:
    bucket = TokenBucket(rate_bytes_per_s=100, burst_bytes=100)
    bucket.set_burst(10, now=0.0)
    assert bucket.burst == 10
    assert bucket.tokens(now=5.0) == 10


def test_unlimited_rate_never_waits() -> None:
    bucket = TokenBucket(rate_bytes_per_s=math.inf, burst_bytes=1)
    assert bucket.unlimited
    assert bucket.take(10**12, now=0.0) == 0.0
    assert bucket.tokens(now=0.0) == 1
    bucket.set_rate(100, now=3.0)  # from here on, paced, starting full
    assert bucket.take(101, now=3.0) == pytest.approx(1.0)
    bucket.set_rate(math.inf, now=3.5)
    assert bucket.take(10**12, now=3.5) == 0.0


def test_a_clock_stepping_back_neither_refills_nor_shortens_a_wait() -> None:
    bucket = TokenBucket(rate_bytes_per_s=100, burst_bytes=100, now=10.0, tokens=0)
    assert bucket.tokens(now=5.0) == 0
    assert bucket.take(100, now=5.0) == pytest.approx(5.0 + 1.0)
    assert refill(BucketState(tokens=1, at=10.0), 100, 100, 9.0) == BucketState(1, 10.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (math.nan, 1), (1, 0), (1, -1),
                                             (1, math.inf), (1, math.nan)])
def test_bucket_validation(rate: float, burst: float) -> None:
    with pytest.raises(InvalidArgument):
        TokenBucket(rate, burst)


@pytest.mark.parametrize("n", [-1, math.nan, math.inf])
def test_take_validation(n: float) -> None:
    with pytest.raises(InvalidArgument):
        TokenBucket(1, 1).take(n, now=0.0)


def test_set_rate_validation() -> None:
    with pytest.raises(InvalidArgument):
        TokenBucket(1, 1).set_rate(0, now=0.0)


# -- token bucket: properties --------------------------------------------------------------------

rates = st.floats(min_value=1.0, max_value=1e9)
bursts = st.floats(min_value=1.0, max_value=1e8)


@given(rates, bursts, st.lists(st.floats(min_value=0, max_value=1.0), min_size=1, max_size=200))
def test_a_greedy_sender_converges_to_the_rate(rate: float, burst: float,
                                               fractions: list[float]) -> None:
    # Frame sizes up to four bursts; the sender sends as soon as it is allowed to.
    sizes = [f * 4 * burst for f in fractions]
    bucket = TokenBucket(rate, burst)
    now = 0.0
    for n in sizes:
        now += bucket.take(n, now)
    total = math.fsum(sizes)
    # The first burst goes at once; everything after it at exactly the rate.
    assert close(rate * now, max(0.0, total - burst), scale=total)


@given(rates, bursts, st.lists(st.tuples(st.floats(0, 1.0), st.floats(0, 10.0)), min_size=1,
                               max_size=200))
def test_no_schedule_beats_rate_plus_burst(rate: float, burst: float,
                                           sends: list[tuple[float, float]]) -> None:
    bucket = TokenBucket(rate, burst)
    now, sent = 0.0, 0.0
    for fraction, idle in sends:
        n = fraction * 4 * burst
        now += bucket.take(n, now)
        sent += n
        assert sent <= burst + rate * now + REL * max(1.0, sent)
        now += idle * burst / rate  # the sender pauses for a while


@given(rates, bursts, st.floats(min_value=1.0, max_value=1e9), st.floats(0, 100))
def test_after_a_rate_change_the_new_rate_holds(rate: float, burst: float, new_rate: float,
                                                change_at: float) -> None:
    bucket = TokenBucket(rate, burst)
    bucket.set_rate(new_rate, now=change_at)
    start = change_at
    now = start
    for _ in range(50):
        now += bucket.take(burst, now)
    # 50 bursts from a full bucket: one goes at once, 49 at the new rate.
    assert close(new_rate * (now - start), 49 * burst, scale=50 * burst)


# -- fair shares: table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capacity", "demands", "expected"),
    [
        (100, {}, {}),
        (100, {"a": (1, math.inf), "b": (1, math.inf)}, {"a": 50, "b": 50}),
        (90, {"a": (2, math.inf), "b": (1, math.inf)}, {"a": 60, "b": 30}),
        (100, {"a": (1, 10), "b": (1, math.inf)}, {"a": 10, "b": 90}),  # redistributed
        (100, {"a": (1, 10), "b": (1, 20)}, {"a": 10, "b": 20}),  # everyone satisfied
        (100, {"a": (5, 30), "b": (1, 30), "c": (1, 60)}, {"a": 30, "b": 30, "c": 40}),
        (100, {"a": (1, 0), "b": (1, math.inf)}, {"a": 0, "b": 100}),
        (0, {"a": (1, 10)}, {"a": 0}),
        (math.inf, {"a": (1, 10), "b": (3, math.inf)}, {"a": 10, "b": math.inf}),
        (120, {"a": (3, math.inf), "b": (1, math.inf), "c": (2, 10)},
         {"a": 82.5, "b": 27.5, "c": 10}),
    ],
)
def test_fair_shares_table(capacity: float, demands: dict[str, tuple[float, float]],
                           expected: dict[str, float]) -> None:
    shares = fair_shares(capacity, demands)
    assert shares.keys() == expected.keys()
    for volume, share in expected.items():
        assert shares[volume] == pytest.approx(share)


@pytest.mark.parametrize(
    ("capacity", "demands"),
    [(-1, {}), (math.nan, {}), (10, {"a": (0, 1)}), (10, {"a": (-1, 1)}),
     (10, {"a": (math.inf, 1)}), (10, {"a": (1, -1)}), (10, {"a": (1, math.nan)})],
)
def test_fair_shares_validation(capacity: float, demands: dict[str, tuple[float, float]]) -> None:
    with pytest.raises(InvalidArgument):
        fair_shares(capacity, demands)


# -- fair shares: properties ---------------------------------------------------------------------

demand_maps = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.tuples(st.integers(1, 10).map(float),
              st.one_of(st.just(math.inf), st.floats(0, 1e6))),
    max_size=8,
)
capacities = st.floats(0, 2e6)


def _tol(capacity: float) -> float:
    return 1e-9 * max(1.0, capacity)


@given(capacities, demand_maps)
def test_shares_are_bounded_by_capacity_and_demand(
        capacity: float, demands: dict[str, tuple[float, float]]) -> None:
    shares = fair_shares(capacity, demands)
    assert shares.keys() == demands.keys()
    assert math.fsum(shares.values()) <= capacity + _tol(capacity)
    for volume, share in shares.items():
        assert 0 <= share <= demands[volume][1]


@given(capacities, demand_maps)
def test_unused_share_is_redistributed(capacity: float,
                                       demands: dict[str, tuple[float, float]]) -> None:
    shares = fair_shares(capacity, demands)
    wanted = math.fsum(d for _, d in demands.values())
    if wanted <= capacity:
        assert shares == {v: d for v, (_, d) in demands.items()}
    else:  # work conserving: nothing idle while someone wants more
        assert math.isclose(math.fsum(shares.values()), capacity, rel_tol=1e-9,
                            abs_tol=_tol(capacity))


@given(capacities, demand_maps)
def test_max_min_fairness_by_weight(capacity: float,
                                    demands: dict[str, tuple[float, float]]) -> None:
    shares = fair_shares(capacity, demands)
    per_weight = {v: shares[v] / w for v, (w, _) in demands.items()}
    short = [v for v, (_, d) in demands.items() if shares[v] < d - _tol(capacity)]
    for v in short:
        # A volume still short of its demand gets at least as much per unit of weight as anyone:
        # no one could be given more without taking from someone with as little or less.
        for other in demands:
            assert per_weight[v] >= per_weight[other] - _tol(capacity)


@given(capacities, demand_maps)
def test_higher_priority_never_gets_less(capacity: float,
                                         demands: dict[str, tuple[float, float]]) -> None:
    shares = fair_shares(capacity, demands)
    for a, (wa, da) in demands.items():
        for b, (wb, _) in demands.items():
            if wa >= wb:
                # Unless its demand is met, the higher-weight volume gets at least as much, and
                # at least as much per unit of weight.
                assert shares[a] >= min(da, shares[b]) - _tol(capacity)
                if shares[a] < da - _tol(capacity):
                    assert shares[a] / wa >= shares[b] / wb - _tol(capacity)


@given(capacities, demand_maps)
def test_fair_shares_ignore_mapping_order(capacity: float,
                                          demands: dict[str, tuple[float, float]]) -> None:
    reordered = dict(reversed(list(demands.items())))
    assert fair_shares(capacity, demands) == fair_shares(capacity, reordered)
