"""sharedsync.core.replica_state: every cell of the replica state machine."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.errors import FailedPrecondition, InvalidArgument
from sharedsync.core.replica_state import (
    TABLE,
    AckReceived,
    Event,
    EventKind,
    IllegalTransition,
    LagExceeded,
    PeerUnreachable,
    RebuildFinished,
    RebuildProgress,
    RebuildStarted,
    ReplicaError,
    ReplicaState,
    StaleTimeout,
    classify_lag,
    legal_events,
    transition,
)

IN, LAG, REB, STALE, FAIL = (ReplicaState.IN_SYNC, ReplicaState.LAGGING,
                             ReplicaState.REBUILDING, ReplicaState.STALE, ReplicaState.FAILED)
X = None  # illegal

ACK_OK = AckReceived(lag_seconds=1.0, max_lag_seconds=5.0)
ACK_LATE = AckReceived(lag_seconds=9.0, max_lag_seconds=5.0)
EVENTS: dict[str, Event] = {
    "ack ok": ACK_OK,
    "ack late": ACK_LATE,
    "lag exceeded": LagExceeded(lag_seconds=7.0),
    "unreachable": PeerUnreachable(since=100.0),
    "rebuild started": RebuildStarted(),
    "rebuild progress": RebuildProgress(done_bytes=10, total_bytes=100),
    "rebuild finished": RebuildFinished(),
    "stale timeout": StaleTimeout(),
    "error": ReplicaError(reason="receive failed"),
}

# The expected machine, written out independently of the module's table.
EXPECTED: dict[ReplicaState, dict[str, ReplicaState | None]] = {
    IN: {"ack ok": IN, "ack late": LAG, "lag exceeded": LAG, "unreachable": LAG,
         "rebuild started": REB, "rebuild progress": X, "rebuild finished": X,
         "stale timeout": STALE, "error": FAIL},
    LAG: {"ack ok": IN, "ack late": LAG, "lag exceeded": LAG, "unreachable": LAG,
          "rebuild started": REB, "rebuild progress": X, "rebuild finished": X,
          "stale timeout": STALE, "error": FAIL},
    REB: {"ack ok": REB, "ack late": REB, "lag exceeded": REB, "unreachable": REB,
          "rebuild started": REB, "rebuild progress": REB, "rebuild finished": LAG,
          "stale timeout": STALE, "error": FAIL},
    STALE: {"ack ok": IN, "ack late": LAG, "lag exceeded": STALE, "unreachable": STALE,
            "rebuild started": REB, "rebuild progress": X, "rebuild finished": X,
            "stale timeout": STALE, "error": FAIL},
    FAIL: {"ack ok": X, "ack late": X, "lag exceeded": X, "unreachable": FAIL,
           "rebuild started": REB, "rebuild progress": X, "rebuild finished": X,
           "stale timeout": FAIL, "error": FAIL},
}

CELLS = [(state, name, target) for state, row in EXPECTED.items() for name, target in row.items()]


@pytest.mark.parametrize(("state", "event", "target"), CELLS,
                         ids=[f"{s}-{e}" for s, e, _ in CELLS])
def test_transition_table(state: ReplicaState, event: str, target: ReplicaState | None) -> None:
    if target is None:
        with pytest.raises(IllegalTransition) as info:
            transition(state, EVENTS[event])
        assert info.value.state is state
        assert info.value.event == EVENTS[event]
        assert str(state) in str(info.value)
    else:
        assert transition(state, EVENTS[event]) is target


def test_the_table_covers_every_state_and_event() -> None:
    assert set(TABLE) == set(ReplicaState)
    for row in TABLE.values():
        assert set(row) == set(EventKind)
    assert {e.kind for e in EVENTS.values()} == set(EventKind)


def test_illegal_transition_is_a_failed_precondition() -> None:
    with pytest.raises(FailedPrecondition):
        transition(FAIL, ACK_OK)


def test_legal_events() -> None:
    assert legal_events(FAIL) == {EventKind.UNREACHABLE, EventKind.REBUILD_STARTED,
                                  EventKind.STALE_TIMEOUT, EventKind.ERROR}
    assert legal_events(REB) == set(EventKind)
    assert EventKind.REBUILD_FINISHED not in legal_events(IN)


@pytest.mark.parametrize(
    ("lag", "max_lag", "state"),
    [(0, 5, IN), (5, 5, IN), (5.001, 5, LAG), (0, 0, IN), (0.001, 0, LAG), (3600, 5, LAG)],
)
def test_classify_lag(lag: float, max_lag: float, state: ReplicaState) -> None:
    assert classify_lag(lag, max_lag) is state


@pytest.mark.parametrize(("lag", "max_lag"), [(-1, 5), (1, -5), (math.nan, 5), (1, math.nan),
                                              (math.inf, 5), (1, math.inf)])
def test_classify_lag_validation(lag: float, max_lag: float) -> None:
    with pytest.raises(InvalidArgument):
        classify_lag(lag, max_lag)


def test_event_validation() -> None:
    with pytest.raises(InvalidArgument):
        AckReceived(lag_seconds=-1, max_lag_seconds=5)
    with pytest.raises(InvalidArgument):
        LagExceeded(lag_seconds=math.nan)
    with pytest.raises(InvalidArgument):
        PeerUnreachable(since=math.inf)
    with pytest.raises(InvalidArgument):
        RebuildProgress(done_bytes=11, total_bytes=10)
    with pytest.raises(InvalidArgument):
        RebuildProgress(done_bytes=-1, total_bytes=10)


# -- properties over random event sequences ------------------------------------------------------

events = st.one_of(
    st.builds(AckReceived, lag_seconds=st.floats(0, 100), max_lag_seconds=st.floats(0, 100)),
    st.builds(LagExceeded, lag_seconds=st.floats(0, 100)),
    st.builds(PeerUnreachable, since=st.floats(0, 1e6)),
    st.just(RebuildStarted()),
    st.builds(RebuildProgress, done_bytes=st.just(0), total_bytes=st.integers(0, 10)),
    st.just(RebuildFinished()),
    st.just(StaleTimeout()),
    st.builds(ReplicaError, reason=st.text(max_size=5)),
)


@given(st.sampled_from(list(ReplicaState)), st.lists(events, max_size=30))
def test_only_a_timely_ack_makes_a_replica_in_sync(start: ReplicaState,
                                                   sequence: list[Event]) -> None:
    state = start
    for event in sequence:
        try:
            after = transition(state, event)
        except IllegalTransition:
            assert event.kind not in legal_events(state)
            continue
        if after is IN and state is not IN:
            assert isinstance(event, AckReceived)
            assert event.lag_seconds <= event.max_lag_seconds
        if state is FAIL and after is not FAIL:
            assert isinstance(event, RebuildStarted)  # only a rebuild leaves Failed
        if isinstance(event, ReplicaError):
            assert after is FAIL
        state = after
