"""sharedsync.core.snapshot_plan: parents for incremental sends and safe snapshot deletion."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument, NotFound
from sharedsync.core.snapshot_plan import (
    RECLAIM_BELOW_FREE_SHARE,
    InFlight,
    Snapshot,
    SnapshotPlan,
    deletable,
    parent_for,
    reclaim_now,
)

S = [Snapshot(seq=i, name=f"s{i}") for i in range(6)]


def names(snapshots: tuple[Snapshot, ...]) -> list[str]:
    return [s.name for s in snapshots]


# -- table ---------------------------------------------------------------------------------------


def test_no_snapshots_means_full_sends_and_nothing_to_delete() -> None:
    plan = SnapshotPlan.build([], {"a": None, "b": "s1"})
    assert plan.newest is None
    assert plan.parent_for("a") is None
    assert plan.parent_for("b") is None
    assert not plan.up_to_date("a")
    assert plan.deletable() == ()


def test_parents_and_deletable() -> None:
    plan = SnapshotPlan.build(S[1:], {"a": "s2", "b": "s4", "c": None, "d": "elsewhere"})
    assert plan.parent_for("a") == S[2]
    assert plan.parent_for("b") == S[4]
    assert plan.parent_for("c") is None  # never received anything: full send
    assert plan.parent_for("d") is None  # we no longer have what it has: full send
    assert names(plan.deletable()) == ["s1", "s3"]
    assert plan.reasons() == {"s5": ("newest",), "s2": ("parent for a",),
                              "s4": ("parent for b",)}


def test_pinned_and_in_flight_snapshots_are_kept() -> None:
    plan = SnapshotPlan.build(
        S, {"a": "s3"}, pinned={"s0", "not-ours"},
        in_flight=[InFlight(peer="b", snapshot="s2", parent="s1"),
                   InFlight(peer="a", snapshot="s5", parent="s3")],
    )
    assert names(plan.deletable()) == ["s4"]
    assert plan.reasons()["s1"] == ("parent of the send to b",)
    assert plan.reasons()["s3"] == ("parent for a", "parent of the send to a")
    assert plan.reasons()["s5"] == ("newest", "being sent to a")


def test_up_to_date() -> None:
    plan = SnapshotPlan.build(S, {"a": "s5", "b": "s4"})
    assert plan.up_to_date("a")
    assert not plan.up_to_date("b")


def test_input_order_does_not_matter() -> None:
    plan = SnapshotPlan.build(reversed(S), {"a": "s1"})
    assert plan.snapshots == tuple(S)
    assert plan.newest == S[-1]


def test_unknown_peer() -> None:
    with pytest.raises(NotFound, match="'z'"):
        SnapshotPlan.build(S, {"a": "s1"}).parent_for("z")


@pytest.mark.parametrize(
    "snapshots",
    [[Snapshot(1, "x"), Snapshot(1, "y")], [Snapshot(1, "x"), Snapshot(2, "x")],
     [Snapshot(1, "")]],
)
def test_build_validation(snapshots: list[Snapshot]) -> None:
    with pytest.raises(InvalidArgument):
        SnapshotPlan.build(snapshots, {})


def test_module_functions() -> None:
    assert parent_for(S, "s2") == S[2]
    assert parent_for(S, None) is None
    assert parent_for(S, "gone") is None
    assert names(deletable(S, {"a": "s2"}, pinned={"s0"})) == ["s1", "s3", "s4"]


# -- properties ----------------------------------------------------------------------------------


@st.composite
def plans(draw: st.DrawFn) -> SnapshotPlan:
    seqs = draw(st.lists(st.integers(0, 30), unique=True, max_size=12))
    snapshots = [Snapshot(seq, f"s{seq}") for seq in seqs]
    choices = st.sampled_from([None, "foreign", *(s.name for s in snapshots)])
    peers = draw(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), choices, max_size=4))
    pinned = draw(st.sets(choices.filter(lambda n: n is not None), max_size=3))
    in_flight = draw(st.lists(
        st.builds(InFlight, peer=st.sampled_from(["a", "b", "x"]),
                  snapshot=choices.filter(lambda n: n is not None), parent=choices),
        max_size=2))
    return SnapshotPlan.build(draw(st.permutations(snapshots)), peers,
                              {p for p in pinned if p}, in_flight)


@given(plans())
def test_never_deletes_what_is_needed(plan: SnapshotPlan) -> None:
    doomed = {s.name for s in plan.deletable()}
    for peer, _ in plan.peers:
        parent = plan.parent_for(peer)
        assert parent is None or parent.name not in doomed
    if plan.newest is not None:
        assert plan.newest.name not in doomed
    assert not doomed & plan.pinned
    for send in plan.in_flight:
        assert send.snapshot not in doomed
        assert send.parent not in doomed


@given(plans())
def test_deletes_everything_else(plan: SnapshotPlan) -> None:
    doomed = {s.name for s in plan.deletable()}
    needed = plan.needed()
    assert doomed | needed == plan.names
    assert not doomed & needed
    if needed:
        oldest_needed = min(s.seq for s in plan.snapshots if s.name in needed)
        assert {s.name for s in plan.snapshots if s.seq < oldest_needed} <= doomed
    deleted = plan.deletable()
    assert list(deleted) == sorted(deleted, key=lambda s: s.seq)


@given(plans())
def test_deleting_changes_no_parent_and_is_idempotent(plan: SnapshotPlan) -> None:
    doomed = set(plan.deletable())
    after = SnapshotPlan.build([s for s in plan.snapshots if s not in doomed],
                               dict(plan.peers), plan.pinned, plan.in_flight)
    for peer, _ in plan.peers:
        assert after.parent_for(peer) == plan.parent_for(peer)
    assert after.newest == plan.newest
    assert after.deletable() == ()


@given(plans())
def test_parent_is_the_peers_last_snapshot_when_the_sender_has_it(plan: SnapshotPlan) -> None:
    for peer, last in plan.peers:
        parent = plan.parent_for(peer)
        if last in plan.names:
            assert parent is not None
            assert parent.name == last
        else:
            assert parent is None


def test_pruned_space_is_reclaimed_at_once_only_when_the_replica_is_short_of_it() -> None:
    gib = 1 << 30
    assert reclaim_now(gib // 4, gib)  # a quarter free: the old snapshot's space is wanted
    assert not reclaim_now(3 * gib // 4, gib)  # plenty free: the cleaner's own pace will do
    assert not reclaim_now(0, 0)  # no filesystem to speak of


@given(st.integers(min_value=1 << 20, max_value=1 << 50), st.floats(min_value=0, max_value=1))
def test_reclaiming_follows_the_free_share(total: int, share: float) -> None:
    free = int(total * share)
    if share > RECLAIM_BELOW_FREE_SHARE + 1e-3:
        assert not reclaim_now(free, total)
    if share < RECLAIM_BELOW_FREE_SHARE / 2:
        assert reclaim_now(free, total)
    # less free space never makes reclaiming less urgent
    if reclaim_now(free, total):
        assert reclaim_now(free // 2, total)
