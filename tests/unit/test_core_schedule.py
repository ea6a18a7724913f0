"""sharedsync.core.schedule: cron parsing, next run time, Kubernetes durations."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.schedule import (
    CronSchedule,
    next_after,
    parse_cron,
    parse_duration,
)

T0 = datetime(2024, 1, 1, 12, 30, 15, tzinfo=UTC)  # a Monday


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
       second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# -- parsing -------------------------------------------------------------------------------------


def test_fields_are_expanded() -> None:
    s = parse_cron("0,30 */6 1-5,20 jan-mar/2 MON,fri")
    assert s.minutes == {0, 30}
    assert s.hours == {0, 6, 12, 18}
    assert s.days_of_month == {1, 2, 3, 4, 5, 20}
    assert s.months == {1, 3}
    assert s.days_of_week == {1, 5}
    assert s.dom_restricted
    assert s.dow_restricted


@pytest.mark.parametrize(
    ("field", "values"),
    [("5/20", {5, 25, 45}), ("7", {0}), ("5-7", {0, 5, 6}), ("0-7", set(range(7))),
     ("sun-sat", set(range(7))), ("*/3", {0, 3, 6}), ("?", set(range(7)))],
)
def test_day_of_week_forms(field: str, values: set[int]) -> None:
    if field == "5/20":
        assert parse_cron(f"{field} * * * *").minutes == values
    else:
        assert parse_cron(f"* * * * {field}").days_of_week == values


@pytest.mark.parametrize(
    ("expression", "field", "detail"),
    [
        ("60 * * * *", "minute", "outside 0-59"),
        ("* 24 * * *", "hour", "outside 0-23"),
        ("* * 0 * *", "day-of-month", "outside 1-31"),
        ("* * 32 * *", "day-of-month", "outside 1-31"),
        ("* * * 13 *", "month", "outside 1-12"),
        ("* * * foo *", "month", "not a number or a name"),
        ("* * * * 8", "day-of-week", "outside 0-7"),
        ("* * * * monday", "day-of-week", "not a number"),
        ("*/0 * * * *", "minute", "step"),
        ("*/x * * * *", "minute", "step"),
        ("5-1 * * * *", "minute", "backwards"),
        ("* * * * fri-mon", "day-of-week", "backwards"),
        (",5 * * * *", "minute", "empty list item"),
        ("? * * * *", "minute", "not a number"),
        ("1-2-3 * * * *", "minute", "not a number"),
        ("* -1 * * *", "hour", "not a number"),
        ("* * * * \N{FULLWIDTH DIGIT FIVE}", "day-of-week", "not a number"),
    ],
)
def test_errors_name_the_field(expression: str, field: str, detail: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_cron(expression)
    assert f"invalid {field} field" in str(info.value)
    assert detail in str(info.value)


@pytest.mark.parametrize(
    ("expression", "match"),
    [
        ("* * * *", "must have 5 fields"),
        ("* * * * * *", "must have 5 fields"),
        ("", "must have 5 fields"),
        ("@reboot", "unknown shorthand"),
        ("@every 5m", "unknown shorthand"),
        ("TZ=UTC 0 * * * *", "time zone"),
        ("CRON_TZ=Europe/Paris 0 * * * *", "time zone"),
        ("0 0 30 2 *", "never run"),
        ("0 0 31 4,6,9,11 *", "never run"),
        ("0 0 30-31 feb *", "never run"),
    ],
)
def test_expression_errors(expression: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_cron(expression)


def test_a_restricted_weekday_rescues_an_impossible_day() -> None:
    # Either field matching is enough, so Feb 30 *or* any Monday in February is fine.
    assert next_after("0 0 30 2 mon", T0) == at(2024, 2, 5, 0, 0)


# -- next run ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("* * * * *", T0, at(2024, 1, 1, 12, 31)),
        ("* * * * *", at(2024, 1, 1, 12, 30), at(2024, 1, 1, 12, 31)),  # strictly after
        ("*/15 * * * *", T0, at(2024, 1, 1, 12, 45)),
        ("0 * * * *", T0, at(2024, 1, 1, 13, 0)),
        ("@hourly", T0, at(2024, 1, 1, 13, 0)),
        ("@daily", T0, at(2024, 1, 2, 0, 0)),
        ("@midnight", T0, at(2024, 1, 2, 0, 0)),
        ("@weekly", T0, at(2024, 1, 7, 0, 0)),  # Sunday
        ("@monthly", T0, at(2024, 2, 1, 0, 0)),
        ("@yearly", T0, at(2025, 1, 1, 0, 0)),
        ("@ANNUALLY", T0, at(2025, 1, 1, 0, 0)),
        ("30 2 * * *", T0, at(2024, 1, 2, 2, 30)),
        ("0 9 * * mon-fri", at(2024, 1, 5, 10, 0), at(2024, 1, 8, 9, 0)),  # Fri -> Mon
        ("0 0 * * 7", T0, at(2024, 1, 7, 0, 0)),  # 7 is Sunday
        ("0 0 * * SUN", T0, at(2024, 1, 7, 0, 0)),
        ("0 0 29 2 *", T0, at(2024, 2, 29, 0, 0)),  # leap day
        ("0 0 29 2 *", at(2024, 3, 1), at(2028, 2, 29, 0, 0)),
        ("0 0 31 * *", at(2024, 4, 1), at(2024, 5, 31, 0, 0)),  # April has 30 days
        ("59 23 31 12 *", T0, at(2024, 12, 31, 23, 59)),
        ("0 0 1 1 *", at(2024, 12, 31, 23, 59, 59), at(2025, 1, 1, 0, 0)),  # year wrap
        # Both day fields restricted: either one matching is enough.
        ("0 0 13 * fri", T0, at(2024, 1, 5, 0, 0)),  # the first Friday
        ("0 0 13 * fri", at(2024, 1, 12, 1), at(2024, 1, 13, 0, 0)),  # the 13th, a Saturday
        # A field starting with "*" counts as unrestricted: both must match.
        ("0 0 */2 * fri", T0, at(2024, 1, 5, 0, 0)),  # Jan 5: odd day and Friday
        ("0 0 */2 * mon", T0, at(2024, 1, 15, 0, 0)),  # Jan 1 is past, Jan 8 even
        ("0 0 ? * mon", T0, at(2024, 1, 8, 0, 0)),
        ("0 12 1 * ?", T0, at(2024, 2, 1, 12, 0)),
        ("0 0 * jan,feb/5 *", at(2024, 2, 28), at(2024, 2, 29, 0, 0)),
    ],
)
def test_next_after_table(expression: str, after: datetime, expected: datetime) -> None:
    assert next_after(expression, after) == expected


def test_next_after_accepts_any_aware_timezone() -> None:
    paris = timezone(timedelta(hours=1))
    local = datetime(2024, 1, 1, 13, 30, 15, tzinfo=paris)  # == T0
    assert next_after("0 * * * *", local) == at(2024, 1, 1, 13, 0)
    assert next_after("0 * * * *", local).tzinfo is UTC


def test_next_after_in_posix_seconds() -> None:
    due = next_after("0 * * * *", T0.timestamp())
    assert isinstance(due, float)
    assert due == at(2024, 1, 1, 13, 0).timestamp()
    for bad in (float("nan"), float("inf"), 1e300):
        with pytest.raises(InvalidArgument, match="POSIX time"):
            next_after("* * * * *", bad)


def test_naive_times_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        next_after("* * * * *", datetime(2024, 1, 1))


def test_near_the_end_of_time() -> None:
    with pytest.raises(InvalidArgument, match="never runs after"):
        next_after("0 0 1 1 *", at(9999, 6, 1))
    with pytest.raises(InvalidArgument, match="never runs after"):
        next_after("* * * * *", datetime.max.replace(tzinfo=UTC))


# -- next run: properties ------------------------------------------------------------------------


def _items(low: int, high: int) -> st.SearchStrategy[str]:
    value = st.integers(low, high)
    return st.one_of(
        st.just("*"),
        st.integers(1, high - low + 1).map(lambda k: f"*/{k}"),
        value.map(str),
        st.tuples(value, value).map(lambda ab: f"{min(ab)}-{max(ab)}"),
        st.tuples(value, value, st.integers(1, 5)).map(
            lambda abk: f"{min(abk[:2])}-{max(abk[:2])}/{abk[2]}"),
    )


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    return st.lists(_items(low, high), min_size=1, max_size=3).map(",".join)


expressions = st.tuples(_field(0, 59), _field(0, 23), _field(1, 31), _field(1, 12),
                        _field(0, 7)).map(" ".join)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                       timezones=st.just(UTC))
#: How many minutes the brute-force reference scans.
SCAN = 2 * 24 * 60


def _schedule(expression: str) -> CronSchedule | None:
    try:
        return parse_cron(expression)
    except InvalidArgument:
        return None  # an impossible day such as "31 2"


@settings(max_examples=150)
@given(expressions, moments)
def test_next_after_is_the_first_matching_minute(expression: str, after: datetime) -> None:
    schedule = _schedule(expression)
    if schedule is None:
        return
    result = next_after(schedule, after)
    assert result > after
    assert result.second == 0
    assert result.microsecond == 0
    assert result.tzinfo is UTC
    assert schedule.matches(result)
    # No minute in between matches (checked by brute force over the first two days).
    minute = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(SCAN):
        if minute >= result:
            break
        assert not schedule.matches(minute), minute
        minute += timedelta(minutes=1)


@given(expressions, moments, st.integers(1, 60))
def test_next_after_is_stable_within_the_preceding_minute(expression: str, after: datetime,
                                                          seconds: int) -> None:
    schedule = _schedule(expression)
    if schedule is None:
        return
    result = next_after(schedule, after)
    assert next_after(schedule, result - timedelta(seconds=seconds)) == result


@given(expressions, moments, moments)
def test_next_after_is_monotonic(expression: str, a: datetime, b: datetime) -> None:
    schedule = _schedule(expression)
    if schedule is None:
        return
    early, late = sorted((a, b))
    assert next_after(schedule, early) <= next_after(schedule, late)


# -- durations -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0), ("0s", 0.0), ("5s", 5.0), ("1m30s", 90.0), ("500ms", 0.5), ("2h", 7200.0),
        ("1.5h", 5400.0), (".5s", 0.5), ("5.s", 5.0), ("1h1m1s", 3661.0), ("250us", 250e-6),
        ("3µs", 3e-6), ("7ns", 7e-9), ("+5s", 5.0), ("1s500ms", 1.5), ("0.1s", 0.1),
        ("24h", 86400.0), ("2562047h", 2562047 * 3600.0),
    ],
)
def test_parse_duration_table(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-15)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("+", "empty"),
        ("5", "missing unit"),
        ("1m30", "missing unit"),
        ("1d", "days are not a unit"),
        ("5 s", "missing unit"),
        ("1h 30m", "expected a number"),
        ("5S", "unknown unit 'S'"),
        ("5sec", "unknown unit 'sec'"),
        ("s", "expected a number"),
        ("-5s", "must not be negative"),
        ("1e3s", "unknown unit"),
        ("2562048h", "too long"),
        ("five seconds", "expected a number"),
    ],
)
def test_parse_duration_errors(text: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_duration(text)


@given(st.integers(0, 100), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_parse_duration_adds_up_its_terms(h: int, m: int, s: int, ms: int) -> None:
    text = f"{h}h{m}m{s}s{ms}ms"
    assert parse_duration(text) == pytest.approx(h * 3600 + m * 60 + s + ms / 1000, rel=1e-12)
    assert parse_duration(f"{h * 3600 + m * 60 + s}s") == h * 3600 + m * 60 + s
