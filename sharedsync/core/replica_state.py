"""The life of one replica as its primary sees it: a small state machine written as a table.

``kubectl get sharedvolumes`` answers "is my data safe" from these states, so they must never
say more than is known: a replica is InSync only after an acknowledgement within ``maxLag``; a
finished rebuild is only Lagging until the first increment after it is acknowledged; a Failed
replica comes back only through a rebuild. Every (state, event) pair is in the table below, so
the behaviour is reviewable at a glance and the tests can cover every cell; a pair marked
illegal raises instead of guessing, because it means the agent's view of the replica is wrong.

Times are passed in by the caller (seconds, from one clock); nothing here reads a clock.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import ClassVar, Final

from .errors import FailedPrecondition, InvalidArgument


class ReplicaState(enum.StrEnum):
    """Replica states as shown in SharedVolume status."""

    IN_SYNC = "InSync"  # acknowledged within maxLag: a failover loses (at most) maxLag
    LAGGING = "Lagging"  # behind by more than maxLag, or not yet confirmed, but catching up
    REBUILDING = "Rebuilding"  # receiving a full copy
    STALE = "Stale"  # unreachable for longer than the stale timeout: a candidate for rebuild
    FAILED = "Failed"  # unusable until rebuilt


class EventKind(enum.StrEnum):
    ACK = "Ack"
    LAG_EXCEEDED = "LagExceeded"
    UNREACHABLE = "Unreachable"
    REBUILD_STARTED = "RebuildStarted"
    REBUILD_PROGRESS = "RebuildProgress"
    REBUILD_FINISHED = "RebuildFinished"
    STALE_TIMEOUT = "StaleTimeout"
    ERROR = "Error"


def _check_seconds(value: float, name: str) -> None:
    if not (value >= 0 and math.isfinite(value)):
        raise InvalidArgument(f"{name} must be a finite number of seconds >= 0, got {value}")


def classify_lag(lag_seconds: float, max_lag_seconds: float) -> ReplicaState:
    """InSync when the replica trails by at most ``max_lag_seconds``, else Lagging."""
    _check_seconds(lag_seconds, "lag")
    _check_seconds(max_lag_seconds, "maxLag")
    return ReplicaState.IN_SYNC if lag_seconds <= max_lag_seconds else ReplicaState.LAGGING


@dataclass(frozen=True, slots=True)
class AckReceived:
    """The peer acknowledged an increment; it now trails the primary by ``lag_seconds``."""

    kind: ClassVar[EventKind] = EventKind.ACK
    lag_seconds: float
    max_lag_seconds: float

    def __post_init__(self) -> None:
        _check_seconds(self.lag_seconds, "lag")
        _check_seconds(self.max_lag_seconds, "maxLag")


@dataclass(frozen=True, slots=True)
class LagExceeded:
    """No acknowledgement came in time: the replica trails by more than maxLag."""

    kind: ClassVar[EventKind] = EventKind.LAG_EXCEEDED
    lag_seconds: float

    def __post_init__(self) -> None:
        _check_seconds(self.lag_seconds, "lag")


@dataclass(frozen=True, slots=True)
class PeerUnreachable:
    """The peer has not answered since ``since`` (caller's clock, seconds)."""

    kind: ClassVar[EventKind] = EventKind.UNREACHABLE
    since: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.since):
            raise InvalidArgument(f"unreachable since must be a finite time, got {self.since}")


@dataclass(frozen=True, slots=True)
class RebuildStarted:
    kind: ClassVar[EventKind] = EventKind.REBUILD_STARTED


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    kind: ClassVar[EventKind] = EventKind.REBUILD_PROGRESS
    done_bytes: int
    total_bytes: int

    def __post_init__(self) -> None:
        if not 0 <= self.done_bytes <= self.total_bytes:
            raise InvalidArgument(f"rebuild progress {self.done_bytes}/{self.total_bytes} "
                                  "is impossible")


@dataclass(frozen=True, slots=True)
class RebuildFinished:
    kind: ClassVar[EventKind] = EventKind.REBUILD_FINISHED


@dataclass(frozen=True, slots=True)
class StaleTimeout:
    """The peer stayed unreachable past the stale timeout."""

    kind: ClassVar[EventKind] = EventKind.STALE_TIMEOUT


@dataclass(frozen=True, slots=True)
class ReplicaError:
    """Something broke on the replica (failed receive, scrub found corruption, full disk)."""

    kind: ClassVar[EventKind] = EventKind.ERROR
    reason: str


Event = (AckReceived | LagExceeded | PeerUnreachable | RebuildStarted | RebuildProgress
         | RebuildFinished | StaleTimeout | ReplicaError)


class _ByLag(enum.Enum):
    """Table marker: the target depends on the acknowledged lag (:func:`classify_lag`)."""

    BY_LAG = "by-lag"


BY_LAG: Final = _ByLag.BY_LAG
Target = ReplicaState | _ByLag | None  # None: illegal

_S, _E = ReplicaState, EventKind
_IN, _LAG, _REB, _STALE, _FAIL = (_S.IN_SYNC, _S.LAGGING, _S.REBUILDING, _S.STALE, _S.FAILED)

#: The whole machine. Rows are states, columns events, cells the next state.
TABLE: Final[dict[ReplicaState, dict[EventKind, Target]]] = {
    _IN: {
        _E.ACK: BY_LAG, _E.LAG_EXCEEDED: _LAG, _E.UNREACHABLE: _LAG,
        _E.REBUILD_STARTED: _REB, _E.REBUILD_PROGRESS: None, _E.REBUILD_FINISHED: None,
        _E.STALE_TIMEOUT: _STALE, _E.ERROR: _FAIL,
    },
    _LAG: {
        _E.ACK: BY_LAG, _E.LAG_EXCEEDED: _LAG, _E.UNREACHABLE: _LAG,
        _E.REBUILD_STARTED: _REB, _E.REBUILD_PROGRESS: None, _E.REBUILD_FINISHED: None,
        _E.STALE_TIMEOUT: _STALE, _E.ERROR: _FAIL,
    },
    # Acks and lag reports from the stream the rebuild replaced may still arrive: ignored.
    _REB: {
        _E.ACK: _REB, _E.LAG_EXCEEDED: _REB, _E.UNREACHABLE: _REB,
        _E.REBUILD_STARTED: _REB, _E.REBUILD_PROGRESS: _REB, _E.REBUILD_FINISHED: _LAG,
        _E.STALE_TIMEOUT: _STALE, _E.ERROR: _FAIL,
    },
    # A stale peer that answers again resumes from its last snapshot (if the sender still has
    # it; otherwise the agent starts a rebuild).
    _STALE: {
        _E.ACK: BY_LAG, _E.LAG_EXCEEDED: _STALE, _E.UNREACHABLE: _STALE,
        _E.REBUILD_STARTED: _REB, _E.REBUILD_PROGRESS: None, _E.REBUILD_FINISHED: None,
        _E.STALE_TIMEOUT: _STALE, _E.ERROR: _FAIL,
    },
    # Only a rebuild brings a failed replica back; nothing it reports is trusted until then.
    _FAIL: {
        _E.ACK: None, _E.LAG_EXCEEDED: None, _E.UNREACHABLE: _FAIL,
        _E.REBUILD_STARTED: _REB, _E.REBUILD_PROGRESS: None, _E.REBUILD_FINISHED: None,
        _E.STALE_TIMEOUT: _FAIL, _E.ERROR: _FAIL,
    },
}


class IllegalTransition(FailedPrecondition):
    """An event that cannot happen in the replica's current state."""

    def __init__(self, state: ReplicaState, event: Event) -> None:
        super().__init__(f"replica in state {state} cannot take event {event.kind}")
        self.state = state
        self.event = event


def transition(state: ReplicaState, event: Event) -> ReplicaState:
    """The state after ``event``, or :class:`IllegalTransition`."""
    target = TABLE[state][event.kind]
    if target is None:
        raise IllegalTransition(state, event)
    if target is BY_LAG:
        assert isinstance(event, AckReceived)
        return classify_lag(event.lag_seconds, event.max_lag_seconds)
    return target


def legal_events(state: ReplicaState) -> frozenset[EventKind]:
    """The events ``state`` accepts."""
    return frozenset(kind for kind, target in TABLE[state].items() if target is not None)
