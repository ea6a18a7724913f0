"""When a Scheduled sync runs next, and how long a Kubernetes duration is.

A SyncPolicy in ``Scheduled`` mode ships changes on a cron schedule, and ``maxLag`` and
``integrity.scrubInterval`` are Kubernetes durations ("5s", "1m30s"). Users write these by hand,
so a mistake must fail when the policy is applied, with a message that points at the bad part,
not at the first missed sync. The cron dialect is the standard five fields as documented in
crontab(5) and accepted by Kubernetes CronJobs: ``*``, lists, ranges, steps, month and weekday
names, ``?`` for "any" in the day fields, and the ``@hourly``-style shorthands. Times are UTC.

When both day-of-month and day-of-week are restricted, a day matching *either* runs (crontab(5):
"If both fields are restricted (i.e., do not start with *), the command will be run when either
field matches the current time"); a field that starts with ``*`` (``*/2`` included) counts as
unrestricted, as in Vixie cron.
"""

from __future__ import annotations

import bisect
import calendar
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import overload

from .errors import InvalidArgument

MONTH_NAMES = {name: i for i, name in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}
DAY_NAMES = {name: i for i, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])}

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: How far ahead next_after looks; any satisfiable schedule fires well within it (the rarest,
#: a leap day that is also a given weekday, recurs within a few decades).
SEARCH_YEARS = 100


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    low: int
    high: int
    names: Mapping[str, int]
    any_mark: bool = False  # whether "?" may stand for "*"


_FIELDS = (
    _FieldSpec("minute", 0, 59, {}),
    _FieldSpec("hour", 0, 23, {}),
    _FieldSpec("day-of-month", 1, 31, {}, any_mark=True),
    _FieldSpec("month", 1, 12, MONTH_NAMES),
    _FieldSpec("day-of-week", 0, 7, DAY_NAMES, any_mark=True),  # 7 is Sunday too
)


def _field_error(spec: _FieldSpec, text: str, why: str) -> InvalidArgument:
    return InvalidArgument(f"schedule: invalid {spec.name} field {text!r}: {why}")


def _value(spec: _FieldSpec, text: str, whole: str) -> int:
    lowered = text.lower()
    if lowered in spec.names:
        return spec.names[lowered]
    if not text.isascii() or not text.isdigit():
        known = f" or a name ({', '.join(spec.names)})" if spec.names else ""
        raise _field_error(spec, whole, f"{text!r} is not a number{known}")
    number = int(text)
    if not spec.low <= number <= spec.high:
        raise _field_error(spec, whole, f"{number} is outside {spec.low}-{spec.high}")
    return number


def _item(spec: _FieldSpec, item: str, whole: str) -> set[int]:
    base, slash, step_text = item.partition("/")
    step = 1
    if slash:
        if not step_text.isascii() or not step_text.isdigit() or int(step_text) < 1:
            raise _field_error(spec, whole, f"step {step_text!r} must be a positive integer")
        step = int(step_text)
    if base == "*" or (spec.any_mark and base == "?"):
        start, end = spec.low, spec.high
    elif "-" in base:
        first, _, last = base.partition("-")
        start, end = _value(spec, first, whole), _value(spec, last, whole)
        if start > end:
            raise _field_error(spec, whole, f"range {base!r} runs backwards")
    else:
        start = _value(spec, base, whole)
        end = spec.high if slash else start  # "5/15" means "5-<max>/15"
    return set(range(start, end + 1, step))


def _parse_field(spec: _FieldSpec, text: str) -> frozenset[int]:
    if not text:
        raise _field_error(spec, text, "empty")
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise _field_error(spec, text, "empty list item")
        values |= _item(spec, item, text)
    if spec.name == "day-of-week" and 7 in values:
        values = (values - {7}) | {0}
    return frozenset(values)


def _is_star(text: str) -> bool:
    return text.startswith(("*", "?"))


@dataclass(frozen=True, slots=True)
class CronSchedule:
    """A parsed five-field cron expression."""

    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days_of_month: frozenset[int]
    months: frozenset[int]
    days_of_week: frozenset[int]  # 0 = Sunday
    dom_restricted: bool
    dow_restricted: bool

    @property
    def _minutes_of_day(self) -> list[int]:
        return sorted(h * 60 + m for h in self.hours for m in self.minutes)

    def day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days_of_month
        dow = day.isoweekday() % 7 in self.days_of_week
        if self.dom_restricted and self.dow_restricted:
            return dom or dow
        return dom and dow

    def matches(self, moment: datetime) -> bool:
        """Whether the schedule fires in the minute of ``moment`` (UTC)."""
        moment = _utc(moment)
        return (self.day_matches(moment.date()) and moment.hour in self.hours
                and moment.minute in self.minutes)

    def next_after(self, after: datetime) -> datetime:
        """The first minute strictly after ``after`` at which the schedule fires (UTC)."""
        after = _utc(after)
        minutes = self._minutes_of_day
        try:
            start = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
            day = start.date()
            while day.year <= start.year + SEARCH_YEARS:
                if day.month not in self.months:
                    day = _first_of_next_month(day)
                    continue
                if self.day_matches(day):
                    floor = start.hour * 60 + start.minute if day == start.date() else 0
                    i = bisect.bisect_left(minutes, floor)
                    if i < len(minutes):
                        hour, minute = divmod(minutes[i], 60)
                        return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)
                day += timedelta(days=1)
        except (OverflowError, ValueError):  # past year 9999
            pass
        raise InvalidArgument(f"schedule {self.expression!r} never runs after {after.isoformat()}")


def _first_of_next_month(day: date) -> date:
    return date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidArgument("schedule times must be timezone-aware (UTC)")
    return moment.astimezone(UTC)


def _check_satisfiable(schedule: CronSchedule, dom_text: str) -> None:
    if schedule.dom_restricted and schedule.dow_restricted:
        return  # any listed weekday comes round every week
    # Leap years give February 29 days.
    possible = any(day <= calendar.monthrange(2000, month)[1]
                   for month in schedule.months for day in schedule.days_of_month)
    if not possible:
        months = ", ".join(str(m) for m in sorted(schedule.months))
        raise InvalidArgument(f"schedule: invalid day-of-month field {dom_text!r}: no such day "
                              f"in month(s) {months}, so the schedule would never run")


def parse_cron(expression: str) -> CronSchedule:
    """Parse a cron expression; errors name the field at fault."""
    text = expression.strip()
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise InvalidArgument(f"schedule: unknown shorthand {text!r} (known: "
                                  f"{', '.join(MACROS)})")
        text = MACROS[text.lower()]
    if "=" in text.split(" ", 1)[0]:
        raise InvalidArgument("schedule: time zone prefixes (CRON_TZ=, TZ=) are not supported; "
                              "schedules are in UTC")
    parts = text.split()
    if len(parts) != len(_FIELDS):
        raise InvalidArgument(
            f"schedule {expression!r} must have 5 fields (minute hour day-of-month month "
            f"day-of-week), got {len(parts)}")
    minutes, hours, doms, months, dows = (
        _parse_field(spec, part) for spec, part in zip(_FIELDS, parts, strict=True))
    schedule = CronSchedule(expression=expression, minutes=minutes, hours=hours,
                            days_of_month=doms, months=months, days_of_week=dows,
                            dom_restricted=not _is_star(parts[2]),
                            dow_restricted=not _is_star(parts[4]))
    _check_satisfiable(schedule, parts[2])
    return schedule


@overload
def next_after(expression: str | CronSchedule, after: datetime) -> datetime: ...


@overload
def next_after(expression: str | CronSchedule, after: float) -> float: ...


def next_after(expression: str | CronSchedule, after: datetime | float) -> datetime | float:
    """The first minute strictly after ``after`` at which ``expression`` fires (UTC).

    ``after`` is an aware datetime (the answer is a UTC datetime) or POSIX seconds such as
    ``time.time()`` (the answer is POSIX seconds too).
    """
    schedule = expression if isinstance(expression, CronSchedule) else parse_cron(expression)
    if isinstance(after, datetime):
        return schedule.next_after(after)
    try:
        moment = datetime.fromtimestamp(after, UTC)
    except (OverflowError, ValueError, OSError):
        raise InvalidArgument(f"{after!r} is not a usable POSIX time") from None
    return schedule.next_after(moment).timestamp()


# -- durations -----------------------------------------------------------------------------------

_UNITS_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000,
             "s": 1_000_000_000, "m": 60_000_000_000, "h": 3_600_000_000_000}
_TERM = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zµμ]*)", re.IGNORECASE)
#: Go's time.Duration is an int64 of nanoseconds; Kubernetes refuses anything longer.
MAX_DURATION_NS = 2**63 - 1


def parse_duration(text: str) -> float:
    """Seconds in a Kubernetes (Go) duration such as "5s", "1m30s", "500ms", "1.5h" or "0"."""
    source = text
    if text.startswith("+"):
        text = text[1:]
    if text.startswith("-"):
        raise InvalidArgument(f"duration {source!r} must not be negative")
    if not text:
        raise InvalidArgument("duration is empty (examples: 30s, 1m30s, 500ms, 2h)")
    if text == "0":
        return 0.0
    total = Fraction(0)
    pos = 0
    while pos < len(text):
        match = _TERM.match(text, pos)
        if match is None:
            raise InvalidArgument(f"duration {source!r}: expected a number at {text[pos:]!r}")
        number, unit = match.groups()
        if not unit:
            raise InvalidArgument(f"duration {source!r}: missing unit after {number!r} "
                                  f"(units: ns, us, ms, s, m, h)")
        if unit not in _UNITS_NS:
            hint = "; days are not a unit, use hours (24h)" if unit.lower() == "d" else ""
            raise InvalidArgument(f"duration {source!r}: unknown unit {unit!r} "
                                  f"(units: ns, us, ms, s, m, h){hint}")
        total += Fraction(number) * _UNITS_NS[unit]
        pos = match.end()
    if total > MAX_DURATION_NS:
        raise InvalidArgument(f"duration {source!r} is too long (about 292 years at most)")
    return float(total / 1_000_000_000)
