"""sharedsync.core.commit_quorum: who a multi-writer Synchronous commit asks and waits for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.commit_quorum import (
    STREAM_RATE_SHARE,
    STREAM_STALL_SECONDS,
    CommitCalls,
    commit_settled,
    plan_commit,
    stream_now,
    streams_well,
    write_quorum,
)
from sharedsync.core.errors import Unavailable

PEERS = ["b", "c", "d", "e"]


def test_every_trusted_peer_is_asked_without_waiting_for_it_to_come_up() -> None:
    assert plan_commit(["b", "c"], suspects=[], probing=[], need=1) == \
        CommitCalls(frozenset({"b", "c"}), frozenset())


def test_a_suspect_the_quorum_does_not_need_is_probed_once_at_a_time() -> None:
    assert plan_commit(["b", "c"], suspects=["c"], probing=[], need=1) == \
        CommitCalls(frozenset({"b", "c"}), frozenset())
    assert plan_commit(["b", "c"], suspects=["c"], probing=["c"], need=1) == \
        CommitCalls(frozenset({"b"}), frozenset())


def test_suspects_the_quorum_needs_are_all_asked_and_waited_for() -> None:
    # c is probed already, but b alone cannot make a quorum of 3: c is asked again, and both
    # suspects may take until the timeout to come up
    assert plan_commit(["b", "c", "d"], suspects=["c", "d"], probing=["c"], need=2) == \
        CommitCalls(frozenset({"b", "c", "d"}), frozenset({"c", "d"}))


def test_a_quorum_of_one_still_asks_the_trusted_peers() -> None:
    # the fsync waits for them so that their pods read it, though the quorum is this node alone
    assert plan_commit(["b"], suspects=[], probing=[], need=0).ask == {"b"}
    assert plan_commit(["b"], suspects=["b"], probing=["b"], need=0).ask == frozenset()
    assert plan_commit([], suspects=[], probing=[], need=0).ask == frozenset()


def test_a_quorum_larger_than_the_volume_is_refused() -> None:
    with pytest.raises(Unavailable, match="write quorum 3 needs more replicas than the 2"):
        plan_commit(["b"], suspects=[], probing=[], need=2)


def test_the_write_quorum_is_the_policy_s_or_a_majority() -> None:
    assert [write_quorum(0, n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert write_quorum(3, 3) == 3
    assert write_quorum(1, 5) == 1


def test_settled_once_the_quorum_merged_and_no_trusted_peer_is_left() -> None:
    assert not commit_settled(acked=0, need=1, trusted_pending=0)
    assert not commit_settled(acked=1, need=1, trusted_pending=1)
    assert commit_settled(acked=1, need=1, trusted_pending=0)
    assert commit_settled(acked=0, need=0, trusted_pending=0)


@given(st.sets(st.sampled_from(PEERS)), st.sets(st.sampled_from(PEERS)),
       st.sets(st.sampled_from(PEERS)), st.integers(min_value=0, max_value=len(PEERS)))
def test_the_plan_can_always_make_the_quorum_and_never_waits_needlessly(
        peers: set[str], suspects: set[str], probing: set[str], need: int) -> None:
    suspects &= peers
    probing &= suspects
    if need > len(peers):
        with pytest.raises(Unavailable):
            plan_commit(sorted(peers), suspects, probing, need)
        return
    plan = plan_commit(sorted(peers), suspects, probing, need)
    trusted = peers - suspects
    assert plan.ask <= peers
    assert trusted <= plan.ask  # every trusted peer hears of every commit
    assert len(plan.ask) >= need  # if they all merge, the quorum is made
    assert plan.wait_for_ready <= plan.ask & suspects  # only suspects may be waited up for
    if len(trusted) >= need:
        assert not plan.wait_for_ready
        assert plan.ask == trusted | (suspects - probing)  # one probe per suspect at a time
    else:
        assert plan.ask == peers
        assert plan.wait_for_ready == suspects


@given(need=st.integers(1, 6), held=st.integers(0, 6), ahead=st.integers(0, 6))
def test_a_peer_beyond_the_quorum_waits_only_while_the_others_can_make_it(
        need: int, held: int, ahead: int) -> None:
    now = stream_now(need, held, ahead)
    if held >= need:
        assert now  # the quorum holds it: ship it in the background
    elif held + ahead < need:
        assert now  # the quorum needs this peer too
    else:
        assert not now


def test_stream_now_examples() -> None:
    # writeQuorum 2 of 3: one peer needed; the other streams it: wait until it holds it
    assert not stream_now(need=1, held=0, ahead=1)
    assert stream_now(need=1, held=1, ahead=0)
    assert stream_now(need=1, held=0, ahead=0)  # the other stalled or failed
    # writeQuorum 3 of 3: every peer is needed, none waits
    assert stream_now(need=2, held=0, ahead=1)


RATES = st.sampled_from([0.0, 1e3, 5e7, 1e8, 2e8, 1e9])


@given(idle=st.floats(0, 10), rate=RATES, own=RATES)
def test_a_stream_goes_well_while_it_moves_and_is_not_much_slower_than_ours(
        idle: float, rate: float, own: float) -> None:
    well = streams_well(idle_seconds=idle, rate=rate, own_rate=own)
    if idle >= STREAM_STALL_SECONDS:
        assert not well  # stalled: maybe partitioned; the waiting peer streams now
    elif rate and own:
        assert well == (rate >= STREAM_RATE_SHARE * own)
    else:
        assert well  # a rate not measured yet is not a slow link


def test_streams_well_examples() -> None:
    assert streams_well(idle_seconds=0.01, rate=0.0, own_rate=0.0)
    # the link whose pushes were all small commits, against one measured by its rebuild
    assert streams_well(idle_seconds=0.01, rate=0.0, own_rate=63e6)
    assert not streams_well(idle_seconds=0.01, rate=10e6, own_rate=63e6)
    assert streams_well(idle_seconds=0.01, rate=40e6, own_rate=63e6)
    assert not streams_well(idle_seconds=1.0, rate=40e6, own_rate=63e6)
