"""When an isolated primary suspends and resumes writes (sharedsync.core.isolation)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.isolation import (
    LAPSE_MARGIN,
    Isolation,
    isolation_action,
    lease_lapsed,
    probe_seconds,
)


def test_the_lease_lapses_before_the_operator_can_see_it_expired() -> None:
    duration = 15.0
    assert not lease_lapsed(100.0, 0.0, duration, 100.0 + duration * (1 - LAPSE_MARGIN) - 0.01)
    assert lease_lapsed(100.0, 0.0, duration, 100.0 + duration * (1 - LAPSE_MARGIN))
    assert lease_lapsed(100.0, 0.0, duration, 100.0 + duration)  # long before it expires
    # never renewed since the agent started: counted from the start
    assert not lease_lapsed(None, 50.0, duration, 55.0)
    assert lease_lapsed(None, 50.0, duration, 50.0 + duration)


def test_cut_off_from_both_the_api_server_and_every_peer_suspends() -> None:
    assert isolation_action(suspended=False, lapsed=True, peers=2, answers=[],
                            epoch=3) is Isolation.SUSPEND


def test_either_loss_alone_suspends_nothing() -> None:
    # the API server is down everywhere, a peer answers: the operator can fail nothing over
    assert isolation_action(suspended=False, lapsed=True, peers=2, answers=[3],
                            epoch=3) is Isolation.KEEP
    # the peers are gone but the Lease is renewed: the operator knows we are alive
    assert isolation_action(suspended=False, lapsed=False, peers=2, answers=[],
                            epoch=3) is Isolation.KEEP


def test_resuming_needs_the_lease_back_and_a_peer_at_no_newer_epoch() -> None:
    assert isolation_action(suspended=True, lapsed=False, peers=2, answers=[3],
                            epoch=3) is Isolation.RESUME
    assert isolation_action(suspended=True, lapsed=True, peers=2, answers=[3, 3],
                            epoch=3) is Isolation.KEEP
    assert isolation_action(suspended=True, lapsed=False, peers=2, answers=[],
                            epoch=3) is Isolation.KEEP


def test_a_peer_at_a_newer_epoch_fences() -> None:
    for suspended in (False, True):
        assert isolation_action(suspended=suspended, lapsed=False, peers=2, answers=[3, 4],
                                epoch=3) is Isolation.FENCE


def test_a_volume_without_peers_is_never_suspended() -> None:
    assert isolation_action(suspended=False, lapsed=True, peers=0, answers=[],
                            epoch=1) is Isolation.KEEP
    assert isolation_action(suspended=True, lapsed=True, peers=0, answers=[],
                            epoch=1) is Isolation.RESUME


@given(suspended=st.booleans(), lapsed=st.booleans(), peers=st.integers(0, 5),
       answers=st.lists(st.integers(0, 6), max_size=5), epoch=st.integers(0, 6))
def test_the_rules_hold_for_every_input(suspended: bool, lapsed: bool, peers: int,
                                        answers: list[int], epoch: int) -> None:
    answers = answers[:peers]
    action = isolation_action(suspended=suspended, lapsed=lapsed, peers=peers, answers=answers,
                              epoch=epoch)
    newer = any(a > epoch for a in answers)
    assert (action is Isolation.FENCE) == newer
    if action is Isolation.SUSPEND:  # only cut off from everything, and only once
        assert lapsed
        assert not answers
        assert peers
        assert not suspended
    if action is Isolation.RESUME:  # never while the operator may be failing us over
        assert suspended
        assert peers == 0 or (not lapsed and answers)
    if not suspended:
        assert action is not Isolation.RESUME
    else:
        assert action is not Isolation.SUSPEND


def test_a_suspension_fits_before_the_lease_expires() -> None:
    """Lapse point, plus a check interval (0.5 s) and a probe, stays within the duration for
    every Lease duration the agent config allows (3-300 s)."""
    for duration in (3.0, 6.0, 15.0, 60.0, 300.0):
        assert duration * (1 - LAPSE_MARGIN) + 0.5 + probe_seconds(duration) < duration
