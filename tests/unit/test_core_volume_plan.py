"""sharedsync.core.volume_plan: an example for every decision, then a simulated cluster.

The examples pin each rule of the module docstring. The simulator (``World``) is a cluster of
agents that carries out plans the way the real agents do (``replication_agent/volume.py``:
ApplyVolume creates or updates a replica and adopts a newer epoch, Promote refuses an epoch that
is not newer, a primary that meets a newer epoch is fenced, dead agents answer nothing) and the
way the operator runs them (``operator/sharedsync_operator/volumes.py``: the layout is persisted
before any agent call, a failed SyncNow stops the reconcile, a failed Promote stops the calls
after it, the operator may be killed halfway). Hypothesis drives it through random clusters,
deaths, returns, writes, policy changes and switchovers, and checks convergence and safety.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sharedsync.core.placement import NodeView
from sharedsync.core.policy import Mode, Policy, policy_from_spec
from sharedsync.core.replica_state import ReplicaState
from sharedsync.core.volume_plan import (
    Action,
    ActionKind,
    Event,
    Intent,
    Layout,
    Plan,
    Replication,
    Report,
    plan_volume,
    replica_states,
    spec_fingerprint,
)

GiB = 1 << 30
SIZE = 2 * GiB
ZONE = "topology.kubernetes.io/zone"

APPLY, PROMOTE, REMOVE, SYNC_NOW = (ActionKind.APPLY, ActionKind.PROMOTE, ActionKind.REMOVE,
                                    ActionKind.SYNC_NOW)
IN_SYNC, LAGGING, REBUILDING, STALE, FAILED = (
    ReplicaState.IN_SYNC, ReplicaState.LAGGING, ReplicaState.REBUILDING, ReplicaState.STALE,
    ReplicaState.FAILED)

ASYNC = policy_from_spec({"replicas": 3}, name="async")
SYNC = policy_from_spec({"mode": "Synchronous", "replicas": 3}, name="sync")  # writeQuorum 2
SYNC_CONTINUE = policy_from_spec({"mode": "Synchronous", "replicas": 3,
                                  "failover": {"onQuorumLoss": "Continue"}})


# -- helpers for the examples ----------------------------------------------------------------------


def fp(layout: Layout, quorum: int) -> str:
    """The spec revision the examples' caller sends for a layout (as the operator's does, it
    changes with every field an agent is given)."""
    return spec_fingerprint({"replicas": list(layout.replicas), "primary": layout.primary,
                             "epoch": layout.epoch, "quorum": quorum})


def cluster(*names: str, dead: Collection[str] = (), free: int = 10 * GiB) -> list[NodeView]:
    return [NodeView.of(name, available_bytes=free, agent_alive=name not in dead)
            for name in names]


def settled(layout: Layout, quorum: int = 0, *, nodes: Collection[str] | None = None,
            **changes: Any) -> dict[str, Report]:
    """Reports of replicas that hold exactly what ``layout`` says (``changes`` alter them)."""
    return {node: dataclasses.replace(
        Report(node=node, role="primary" if node == layout.primary else "replica",
               epoch=layout.epoch, primary=layout.primary, spec_hash=fp(layout, quorum)),
        **changes) for node in layout.replicas if nodes is None or node in nodes}


def intent(policy: Policy = ASYNC, desired: int | None = None, *, consumer: str | None = None,
           switchover: str | None = None) -> Intent:
    return Intent(volume_id="vol-1", size_bytes=SIZE, policy=policy,
                  desired_replicas=policy.replicas if desired is None else desired,
                  consumer=consumer, switchover_to=switchover)


def plan(i: Intent, layout: Layout, nodes: list[NodeView], reports: Mapping[str, Report],
         down_for: Mapping[str, float] | None = None,
         view: Mapping[str, ReplicaState] | None = None) -> Plan:
    return plan_volume(i, layout, nodes, reports, down_for or {}, last_primary_view=view,
                       fingerprint=fp)


def reasons(p: Plan) -> list[str]:
    return [event.reason for event in p.events]


ABC = Layout(replicas=("a", "b", "c"), primary="a", epoch=3)


# -- new volumes -----------------------------------------------------------------------------------


def test_new_volume_is_placed_whole_with_the_consumer_as_primary() -> None:
    p = plan(intent(consumer="c"), Layout(), cluster("a", "b", "c", "d"), {})
    assert p.layout == Layout(replicas=("a", "b", "c"), primary="c", epoch=1)
    # the primary's spec goes first: it creates the replica the others rebuild from
    assert p.actions == (Action(APPLY, "c", 1), Action(APPLY, "a", 1), Action(APPLY, "b", 1))
    assert p.events == (Event("Normal", "Placed", "replicas on a, b, c; primary c"),)
    assert (p.problem, p.problem_reason, p.write_quorum) == ("", "", 0)


@pytest.mark.parametrize(("consumer", "nodes"), [
    (None, cluster("a", "b", "c")),
    ("z", cluster("a", "b", "c")),  # the consumer has no agent (not in the cluster)
    ("c", [*cluster("a", "b"), NodeView.of("c", available_bytes=1)]),  # no room on it
])
def test_new_volume_primary_is_the_first_replica_when_the_consumer_holds_none(
        consumer: str | None, nodes: list[NodeView]) -> None:
    p = plan(intent(desired=2, consumer=consumer), Layout(), nodes, {})
    assert p.layout == Layout(replicas=("a", "b"), primary="a", epoch=1)
    assert [a.node for a in p.actions] == ["a", "b"]


def test_new_volume_consumer_is_primary_without_data_locality_too() -> None:
    policy = policy_from_spec({"replicas": 2, "placement": {"dataLocality": "Disabled"}})
    nodes = [NodeView.of("a", available_bytes=20 * GiB), NodeView.of("b", available_bytes=GiB * 9),
             NodeView.of("c", available_bytes=10 * GiB)]
    p = plan(intent(policy, consumer="c"), Layout(), nodes, {})
    assert p.layout == Layout(replicas=("a", "c"), primary="c", epoch=1)


@pytest.mark.parametrize(("desired", "nodes"), [
    (3, cluster("a", "b")),
    (3, cluster("a", "b", "c", dead=["c"])),
    (2, cluster("a", "b", free=GiB)),  # too small for a 2 GiB volume
    (1, []),
])
def test_new_volume_is_not_placed_at_all_when_short_of_nodes(desired: int,
                                                             nodes: list[NodeView]) -> None:
    p = plan(intent(desired=desired, consumer="a"), Layout(), nodes, {})
    assert p.layout == Layout()
    assert p.actions == ()
    assert p.problem_reason == "InsufficientNodes"
    assert f"wants {desired} replica" in p.problem
    assert p.events == (Event("Warning", "PlacementFailed", p.problem),)


def test_new_volume_removes_leftovers_only_once_its_primary_holds_it() -> None:
    # Agents that hold the volume from before (a status lost) keep it until the new primary
    # has a replica: removing it first could destroy the only copy.
    reports = {"d": Report(node="d", role="primary", epoch=1, primary="d")}
    nodes = [*cluster("a", "b"), NodeView.of("d", available_bytes=0)]  # d: no room for more
    p = plan(intent(desired=2, consumer="a"), Layout(), nodes, reports)
    assert p.layout == Layout(replicas=("a", "b"), primary="a", epoch=1)
    assert p.actions == (Action(APPLY, "a", 1), Action(APPLY, "b", 1))
    then = {**settled(p.layout), **reports}
    again = plan(intent(desired=2, consumer="a"), p.layout, nodes, then)
    assert again.actions == (Action(REMOVE, "d"),)


# -- steady state and out-of-date agents -----------------------------------------------------------


def test_settled_volume_needs_nothing() -> None:
    p = plan(intent(), ABC, cluster("a", "b", "c", "d"), settled(ABC))
    assert p == Plan(layout=ABC, actions=())


@pytest.mark.parametrize("change", [
    {"spec_hash": "old"}, {"epoch": 2}, {"primary": "c"}])
def test_replica_with_an_out_of_date_view_is_sent_the_spec_again(change: dict[str, Any]) -> None:
    reports = {**settled(ABC), "b": dataclasses.replace(settled(ABC)["b"], **change)}
    p = plan(intent(), ABC, cluster("a", "b", "c"), reports)
    assert p.layout == ABC
    assert p.actions == (Action(APPLY, "b", 3),)


def test_live_replica_that_holds_nothing_yet_is_sent_the_spec() -> None:
    p = plan(intent(), ABC, cluster("a", "b", "c"), settled(ABC, nodes=["a", "b"]))
    assert p.actions == (Action(APPLY, "c", 3),)


@pytest.mark.parametrize("change", [{"role": "replica"}, {"epoch": 2}, {"fenced": True}])
def test_primary_that_does_not_serve_the_epoch_is_promoted_first(change: dict[str, Any]) -> None:
    reports = {**settled(ABC), "a": dataclasses.replace(settled(ABC)["a"], **change)}
    p = plan(intent(), ABC, cluster("a", "b", "c"), reports)
    want = [Action(PROMOTE, "a", 3)]
    if "epoch" in change:
        want.append(Action(APPLY, "a", 3))
    assert list(p.actions) == want


def test_dead_agents_are_sent_nothing() -> None:
    p = plan(intent(), ABC, cluster("a", "b", "c", dead=["b"]),
             settled(ABC, nodes=["a", "c"], spec_hash="old"), {"b": 10.0})
    assert p.layout == ABC
    assert p.actions == (Action(APPLY, "a", 3), Action(APPLY, "c", 3))


def test_a_node_counts_as_dead_when_down_for_says_so() -> None:
    # the Lease is the truth: a NodeView saying alive does not outvote down_for
    p = plan(intent(), ABC, cluster("a", "b", "c"), settled(ABC, nodes=["a", "c"]), {"b": 1.0})
    assert p.actions == ()


# -- failover --------------------------------------------------------------------------------------


def test_failover_prefers_the_replica_the_primary_last_saw_in_sync() -> None:
    reports = {"b": settled(ABC)["b"], "c": settled(ABC)["c"]}
    reports["b"] = dataclasses.replace(reports["b"], last_received=(3, 9))
    reports["c"] = dataclasses.replace(reports["c"], last_received=(3, 5))
    p = plan(intent(), ABC, cluster("a", "b", "c", dead=["a"]), reports, {"a": 5.0},
             view={"b": LAGGING, "c": IN_SYNC})
    assert p.layout == Layout(replicas=("a", "b", "c"), primary="c", epoch=4)
    assert p.actions == (Action(PROMOTE, "c", 4), Action(APPLY, "c", 4), Action(APPLY, "b", 4))
    assert p.events == (Event("Warning", "Failover",
                              "primary a is gone; promoted c at epoch 4"),)


@pytest.mark.parametrize(("b", "c", "chosen"), [
    ((3, 9), (3, 5), "b"),
    ((2, 9), (3, 1), "c"),  # a newer epoch beats a higher sequence
    ((3, 5), (3, 5), "b"),  # a tie goes by name
])
def test_failover_without_an_in_sync_replica_takes_the_newest_snapshot(
        b: tuple[int, int], c: tuple[int, int], chosen: str) -> None:
    reports = {"b": Report(node="b", role="replica", epoch=3, primary="a", last_received=b),
               "c": Report(node="c", role="replica", epoch=3, primary="a", last_received=c)}
    for view in ({}, {"b": LAGGING, "c": LAGGING}):
        p = plan(intent(), ABC, cluster("a", "b", "c", dead=["a"]), reports, {"a": 5.0}, view)
        assert (p.layout.primary, p.layout.epoch) == (chosen, 4)
        assert p.actions[0] == Action(PROMOTE, chosen, 4)


def test_failover_epoch_is_one_more_than_any_epoch_seen() -> None:
    reports = {"b": Report(node="b", role="replica", epoch=6, primary="x"),
               "c": Report(node="c", role="replica", epoch=3, primary="a")}
    p = plan(intent(), ABC, cluster("a", "b", "c", dead=["a"]), reports, {"a": 5.0})
    assert p.layout.epoch == 7


def test_failover_skips_fenced_replicas() -> None:
    reports = {"b": Report(node="b", role="replica", epoch=3, primary="a", fenced=True,
                           last_received=(3, 9)),
               "c": Report(node="c", role="replica", epoch=3, primary="a")}
    p = plan(intent(), ABC, cluster("a", "b", "c", dead=["a"]), reports, {"a": 5.0})
    assert p.layout.primary == "c"


def test_failover_never_promotes_a_replica_the_primary_saw_rebuilding() -> None:
    """Its copy may be empty: promoting it could lose the volume, so failover waits."""
    reports = {"b": Report(node="b", role="replica", epoch=3, primary="a", last_received=(3, 9)),
               "c": Report(node="c", role="replica", epoch=3, primary="a", last_received=(0, 0))}
    nodes, down = cluster("a", "b", "c", dead=["a"]), {"a": 5.0}
    p = plan(intent(), ABC, nodes, reports, down, {"b": LAGGING, "c": REBUILDING})
    assert p.layout.primary == "b"
    blocked = plan(intent(), ABC, nodes, reports, down, {"b": REBUILDING, "c": REBUILDING})
    assert blocked.layout == ABC
    assert reasons(blocked) == ["FailoverBlocked"]


#: ABC after its primary acknowledged writes below writeQuorum (onQuorumLoss: Continue)
ABC_LOWERED = replace(ABC, quorum_lowered_epoch=ABC.epoch)


def test_synchronous_failover_after_quorum_loss_takes_only_a_replica_that_was_in_sync() -> None:
    reports = {"b": Report(node="b", role="replica", epoch=3, primary="a", last_received=(3, 9)),
               "c": Report(node="c", role="replica", epoch=3, primary="a", last_received=(3, 2))}
    nodes, down = cluster("a", "b", "c", dead=["a"]), {"a": 5.0}
    p = plan(intent(SYNC), ABC_LOWERED, nodes, reports, down, {"b": LAGGING, "c": IN_SYNC})
    assert (p.layout.primary, p.layout.epoch) == ("c", 4)

    # c died too: an acknowledged write may be on c alone (b was catching up), so b may lack it
    two_dead = cluster("a", "b", "c", dead=["a", "c"])
    blocked = plan(intent(SYNC), ABC, two_dead, {"b": reports["b"]}, {"a": 5.0, "c": 5.0},
                   {"b": LAGGING, "c": LAGGING})
    assert blocked.layout == ABC
    assert not any(a.kind is PROMOTE for a in blocked.actions)
    assert reasons(blocked) == ["FailoverBlocked"]
    assert blocked.events[0].type == "Warning"

    # without any view of the old primary there is nothing to refuse by: the newest wins
    unknown = plan(intent(SYNC), ABC, nodes, reports, down, {})
    assert unknown.layout.primary == "b"


@pytest.mark.parametrize("view", [
    {"b": STALE},  # its agent's Lease lapsed once, and the primary died before it saw b again
    {"b": LAGGING},
    {},
])
def test_synchronous_failover_never_below_quorum_ignores_an_old_view(
        view: dict[str, ReplicaState]) -> None:
    """Two replicas, writeQuorum 2, never lowered at this epoch: every acknowledged write is on
    b, whatever the primary's last view of b said."""
    ab = Layout(replicas=("a", "b"), primary="a", epoch=3)
    two = intent(policy_from_spec({"mode": "Synchronous", "replicas": 2, "writeQuorum": 2}))
    reports = {"b": Report(node="b", role="replica", epoch=3, primary="a", last_received=(3, 7))}
    nodes, down = cluster("a", "b", dead=["a"]), {"a": 5.0}
    p = plan(two, ab, nodes, reports, down, view)
    assert (p.layout.primary, p.layout.epoch) == ("b", 4)
    assert reasons(p)[0] == "Failover"
    # below the quorum at this epoch (Continue), a acknowledged alone while b was out: wait
    lowered = plan(two, replace(ab, quorum_lowered_epoch=3), nodes, reports, down,
                   {"b": STALE})
    assert lowered.layout.primary == "a"
    assert reasons(lowered)[0] == "FailoverBlocked"
    # a replica seen Rebuilding never acknowledged anything it holds, and one seen Failed
    # (a checksum error) is not served from before it is rebuilt
    for state in (REBUILDING, FAILED):
        assert plan(two, ab, nodes, reports, down, {"b": state}).layout.primary == "a"


def test_synchronous_failover_waits_for_a_replica_that_may_hold_writes_the_others_lack() -> None:
    """writeQuorum 2 of 3, never lowered: a write may be on a and c only; with c out of reach
    (even one its primary last saw Stale), b may lack it."""
    reports = {"b": Report(node="b", role="replica", epoch=3, primary="a", last_received=(3, 9))}
    two_dead = cluster("a", "b", "c", dead=["a", "c"])
    for view in ({"b": IN_SYNC, "c": STALE}, {"b": LAGGING, "c": FAILED}):
        blocked = plan(intent(SYNC), ABC, two_dead, reports, {"a": 5.0, "c": 5.0}, view)
        assert blocked.layout == ABC, view
        assert reasons(blocked) == ["FailoverBlocked"]
    # writeQuorum 3 of 3: every write is on b as well
    all_three = intent(policy_from_spec({"mode": "Synchronous", "replicas": 3,
                                         "writeQuorum": 3}))
    p = plan(all_three, ABC, two_dead, reports, {"a": 5.0, "c": 5.0}, {"b": STALE, "c": STALE})
    assert p.layout.primary == "b"


def test_synchronous_failover_takes_the_newest_even_against_an_old_view() -> None:
    """The status said b InSync, c Stale; since then c came back, caught up and took writes b
    never got (b's link broke): c holds them, whatever the view said."""
    reports = {"b": Report(node="b", role="replica", epoch=3, primary="a", last_received=(3, 5)),
               "c": Report(node="c", role="replica", epoch=3, primary="a", last_received=(3, 9))}
    p = plan(intent(SYNC), ABC, cluster("a", "b", "c", dead=["a"]), reports, {"a": 5.0},
             {"b": IN_SYNC, "c": STALE})
    assert p.layout.primary == "c"


def test_while_failover_waits_no_replica_leaves_for_being_out_of_reach() -> None:
    """The primary a is gone and b, the replica holding the data, looks gone too (its Lease
    renewal late): b stays in the layout, even past staleReplicaTimeout, and no replacement
    is placed to rebuild from the missing primary."""
    ab = Layout(replicas=("a", "b"), primary="a", epoch=2)
    two = intent(SYNC, desired=2)
    nodes = cluster("a", "b", "c", dead=["a", "b"])
    for b_gone in (3.0, 3600.0):
        p = plan(two, ab, nodes, {}, {"a": 5.0, "b": b_gone}, {"b": IN_SYNC})
        assert p.layout == ab, b_gone
        assert "RebuildStarted" not in reasons(p)
        assert "ReplicaReplaced" not in reasons(p)
        assert reasons(p)[0] == "FailoverBlocked"


def test_continue_below_quorum_marks_the_epoch() -> None:
    """The plan that lowers the quorum records it in the layout (kept in the status)."""
    reports = settled(ABC)
    p = plan(intent(SYNC_CONTINUE), ABC, cluster("a", "b", "c", dead=["b", "c"]),
             {"a": reports["a"]}, {"b": 5.0, "c": 5.0})
    assert p.write_quorum == 1
    assert p.layout.quorum_lowered_epoch == ABC.epoch
    frozen = plan(intent(SYNC), ABC, cluster("a", "b", "c", dead=["b", "c"]),
                  {"a": reports["a"]}, {"b": 5.0, "c": 5.0})
    assert frozen.layout.quorum_lowered_epoch == 0


def test_synchronous_failover_by_quorum_when_no_replica_was_seen_in_sync() -> None:
    """The primary died mid-write, its last view showing the others catching up. Every
    acknowledged write is on writeQuorum (2) replicas, the primary included: with every
    replica that may have acknowledged within reach, the newest one holds them all."""
    reports = {"b": Report(node="b", role="replica", epoch=3, primary="a", last_received=(3, 9)),
               "c": Report(node="c", role="replica", epoch=3, primary="a", last_received=(3, 8))}
    nodes, down = cluster("a", "b", "c", dead=["a"]), {"a": 5.0}
    both = plan(intent(SYNC), ABC, nodes, reports, down, {"b": LAGGING, "c": LAGGING})
    assert (both.layout.primary, both.layout.epoch) == ("b", 4)
    # a replica seen Rebuilding cannot have acknowledged: the one catching up holds every write
    one = plan(intent(SYNC), ABC, nodes, reports, down, {"b": LAGGING, "c": REBUILDING})
    assert one.layout.primary == "b"
    # and a Rebuilding one is never promoted, even the only one left
    alone = plan(intent(SYNC), ABC, nodes, reports, down, {"b": REBUILDING, "c": REBUILDING})
    assert alone.layout == ABC
    assert reasons(alone) == ["FailoverBlocked"]


@pytest.mark.parametrize("reports", [
    {},  # the live replicas hold nothing (not created yet)
    {"b": Report(node="b", role="replica", epoch=3, primary="a", fenced=True)},
])
def test_failover_is_blocked_without_a_candidate(reports: dict[str, Report]) -> None:
    p = plan(intent(), ABC, cluster("a", "b", "c", dead=["a", "c"]), reports,
             {"a": 5.0, "c": 5.0})
    assert p.layout == ABC
    assert reasons(p) == ["FailoverBlocked"]
    assert not any(a.kind in (PROMOTE, REMOVE) for a in p.actions)


def test_no_failover_when_no_replica_is_alive_and_the_wait_is_said() -> None:
    p = plan(intent(), ABC, cluster("a", "b", "c", dead=["a", "b", "c"]), {},
             {"a": 5.0, "b": 5.0, "c": 5.0})
    assert p.layout == ABC
    assert p.actions == ()
    assert reasons(p) == ["FailoverBlocked"]
    assert "no other replica's agent is alive (b, c)" in p.events[0].message


def test_old_primary_that_returns_is_demoted_not_promoted() -> None:
    after = Layout(replicas=("a", "b", "c"), primary="c", epoch=4)
    reports = {**settled(after), "a": Report(node="a", role="primary", epoch=3, primary="a",
                                             spec_hash=fp(ABC, 0))}
    p = plan(intent(), after, cluster("a", "b", "c"), reports)
    assert p.layout == after
    assert p.actions == (Action(APPLY, "a", 4),)


# -- planned switchover ----------------------------------------------------------------------------


def test_switchover_syncs_the_old_primary_then_promotes_the_target() -> None:
    reports = settled(ABC)
    reports["b"] = dataclasses.replace(reports["b"], epoch=3)
    p = plan(intent(switchover="c"), ABC, cluster("a", "b", "c"), reports)
    assert p.layout == Layout(replicas=("a", "b", "c"), primary="c", epoch=4)
    assert p.actions == (Action(SYNC_NOW, "a"), Action(PROMOTE, "c", 4), Action(APPLY, "c", 4),
                         Action(APPLY, "a", 4), Action(APPLY, "b", 4))
    assert p.events == (Event("Normal", "Switchover", "primary moves from a to c at epoch 4"),)


def test_switchover_epoch_is_one_more_than_any_epoch_seen() -> None:
    reports = {**settled(ABC), "b": dataclasses.replace(settled(ABC)["b"], epoch=8)}
    p = plan(intent(switchover="c"), ABC, cluster("a", "b", "c"), reports)
    assert (p.layout.primary, p.layout.epoch) == ("c", 9)


@pytest.mark.parametrize(("target", "nodes", "reports", "down"), [
    ("d", cluster("a", "b", "c", "d"), settled(ABC), {}),  # not a replica
    ("c", cluster("a", "b", "c", dead=["c"]), settled(ABC, nodes=["a", "b"]), {"c": 1.0}),
    ("c", cluster("a", "b", "c"), settled(ABC, nodes=["a", "b"]), {}),  # holds nothing yet
    ("zz", cluster("a", "b", "c"), settled(ABC), {}),  # no such node
])
def test_switchover_to_anything_but_a_live_replica_is_refused(
        target: str, nodes: list[NodeView], reports: dict[str, Report],
        down: dict[str, float]) -> None:
    p = plan(intent(switchover=target), ABC, nodes, reports, down)
    assert p.layout == ABC
    assert not any(a.kind in (SYNC_NOW, PROMOTE) for a in p.actions)
    assert p.events == (Event("Warning", "SwitchoverRefused",
                              f"switchover target {target} is not a live replica of vol-1"),)


def test_switchover_to_the_primary_is_nothing_to_do() -> None:
    p = plan(intent(switchover="a"), ABC, cluster("a", "b", "c"), settled(ABC))
    assert p == Plan(layout=ABC, actions=())


def test_switchover_waits_while_the_primary_fails_over() -> None:
    """A failover and a switchover in one plan would sync a replica that is not primary yet
    (the operator calls SyncNow on the old, dead, primary and stops: the failover would never
    happen while the annotation stays), and would promote the target without the sync that
    makes it hold every write. The failover goes first; the switchover follows once the new
    primary serves."""
    reports = {"b": settled(ABC)["b"], "c": settled(ABC)["c"]}
    p = plan(intent(SYNC, switchover="c"), ABC, cluster("a", "b", "c", dead=["a"]), reports,
             {"a": 5.0}, {"b": IN_SYNC, "c": LAGGING})
    assert (p.layout.primary, p.layout.epoch) == ("b", 4)
    assert p.actions[0] == Action(PROMOTE, "b", 4)
    assert SYNC_NOW not in {a.kind for a in p.actions}
    assert reasons(p) == ["Failover", "SwitchoverWaiting"]

    served = {**settled(p.layout, 2, nodes=["b", "c"])}
    then = plan(intent(SYNC, switchover="c"), p.layout, cluster("a", "b", "c", dead=["a"]),
                served, {"a": 6.0})
    assert (then.layout.primary, then.layout.epoch) == ("c", 5)
    assert then.actions[:2] == (Action(SYNC_NOW, "b"), Action(PROMOTE, "c", 5))


@pytest.mark.parametrize("change", [{"role": "replica"}, {"epoch": 2}, {"fenced": True}])
def test_switchover_waits_until_the_primary_serves(change: dict[str, Any]) -> None:
    # SyncNow needs a serving primary; asking one that is not would fail the whole reconcile
    # (the operator stops at a failed SyncNow), so its promotion would never be retried
    reports = {**settled(ABC), "a": dataclasses.replace(settled(ABC)["a"], **change)}
    p = plan(intent(switchover="c"), ABC, cluster("a", "b", "c"), reports)
    assert p.layout == ABC
    assert p.actions[0] == Action(PROMOTE, "a", 3)
    assert SYNC_NOW not in {a.kind for a in p.actions}
    assert reasons(p) == ["SwitchoverWaiting"]


# -- stale replicas --------------------------------------------------------------------------------


def test_dead_replica_is_kept_while_younger_than_the_stale_timeout() -> None:
    nodes = cluster("a", "b", "c", "d", dead=["b"])
    p = plan(intent(), ABC, nodes, settled(ABC, nodes=["a", "c"]), {"b": 299.0})
    assert p == Plan(layout=ABC, actions=())


def test_dead_replica_is_replaced_after_the_stale_timeout() -> None:
    nodes = cluster("a", "b", "c", "d", dead=["b"])
    p = plan(intent(), ABC, nodes, settled(ABC, nodes=["a", "c"]), {"b": 300.0})
    assert p.layout == Layout(replicas=("a", "c", "d"), primary="a", epoch=3)
    assert p.actions == (Action(APPLY, "a", 3), Action(APPLY, "c", 3), Action(APPLY, "d", 3))
    assert reasons(p) == ["ReplicaReplaced", "RebuildStarted"]
    assert p.events[0] == Event("Warning", "ReplicaReplaced",
                                "replica on b has been gone for 300s (staleReplicaTimeout "
                                "300s); placing a new one")
    assert p.events[1] == Event("Normal", "RebuildStarted",
                                "new replica on d, rebuilding from a")


def test_stale_timeout_comes_from_the_policy() -> None:
    policy = policy_from_spec({"replicas": 3, "failover": {"staleReplicaTimeout": "30s"}})
    nodes = cluster("a", "b", "c", "d", dead=["b"])
    young = plan(intent(policy), ABC, nodes, settled(ABC, nodes=["a", "c"]), {"b": 29.0})
    old = plan(intent(policy), ABC, nodes, settled(ABC, nodes=["a", "c"]), {"b": 31.0})
    assert young.layout == ABC
    assert old.layout.replicas == ("a", "c", "d")


def test_stale_replica_without_a_replacement_leaves_the_layout_short() -> None:
    nodes = cluster("a", "b", "c", dead=["b"])
    p = plan(intent(), ABC, nodes, settled(ABC, nodes=["a", "c"]), {"b": 1000.0})
    assert p.layout.replicas == ("a", "c")
    assert p.problem_reason == "InsufficientNodes"
    assert "wants 3 replicas" in p.problem


def test_replaced_replica_that_returns_is_removed() -> None:
    after = Layout(replicas=("a", "c", "d"), primary="a", epoch=3)
    reports = {**settled(after), "b": settled(ABC)["b"]}
    p = plan(intent(), after, cluster("a", "b", "c", "d"), reports)
    assert p.layout == after
    assert p.actions == (Action(REMOVE, "b"),)


def test_stale_primary_is_never_replaced() -> None:
    # a Synchronous volume whose primary is gone for good, no replica was in sync and a
    # replica that may hold the last acknowledged writes is gone too: the primary stays (it
    # holds the only complete copy known) and only its replicas move
    reports = settled(ABC, 2, nodes=["b"])
    nodes = cluster("a", "b", "c", "d", dead=["a", "c"])
    p = plan(intent(SYNC), ABC, nodes, reports, {"a": 10_000.0, "c": 10_000.0},
             {"b": LAGGING, "c": LAGGING})
    assert p.layout.primary == "a"
    assert p.layout.epoch == ABC.epoch
    assert "FailoverBlocked" in reasons(p)


# -- fewer or more replicas ------------------------------------------------------------------------


def test_lowering_replicas_never_removes_the_primary() -> None:
    # the primary c has the least space, which the excess rule would remove first
    layout = Layout(replicas=("a", "b", "c"), primary="c", epoch=2)
    nodes = [NodeView.of("a", available_bytes=30 * GiB), NodeView.of("b", available_bytes=20 * GiB),
             NodeView.of("c", available_bytes=3 * GiB)]
    p = plan(intent(desired=1), layout, nodes, settled(layout))
    assert p.layout == Layout(replicas=("c",), primary="c", epoch=2)
    assert p.actions == (Action(APPLY, "c", 2), Action(REMOVE, "a"), Action(REMOVE, "b"))
    assert reasons(p) == ["ReplicaRemoved", "ReplicaRemoved"]


def test_raising_replicas_adds_one_rebuilt_from_the_primary() -> None:
    layout = Layout(replicas=("a", "b"), primary="b", epoch=2)
    p = plan(intent(desired=3), layout, cluster("a", "b", "c"), settled(layout))
    assert p.layout == Layout(replicas=("a", "b", "c"), primary="b", epoch=2)
    assert p.actions == (Action(APPLY, "b", 2), Action(APPLY, "a", 2), Action(APPLY, "c", 2))
    assert p.events == (Event("Normal", "RebuildStarted", "new replica on c, rebuilding from b"),)


def test_lowering_replicas_keeps_the_data_while_the_primary_is_down() -> None:
    """With the primary gone and its failover blocked, the live replicas may hold the only
    copies anyone can reach: they leave the layout, but their data is removed only once a
    primary holds the volume again."""
    reports = settled(ABC, 1, nodes=["b", "c"])
    nodes, down = cluster("a", "b", "c", dead=["a"]), {"a": 5.0}
    one = dataclasses.replace(SYNC, replicas=1, write_quorum=1)
    p = plan(intent(one), ABC, nodes, reports, down, {"b": LAGGING, "c": LAGGING})
    assert p.layout == Layout(replicas=("a",), primary="a", epoch=3)
    assert REMOVE not in {a.kind for a in p.actions}

    back = {**reports, "a": settled(p.layout, 1)["a"]}
    then = plan(intent(one), p.layout, cluster("a", "b", "c"), back)
    assert then.actions == (Action(REMOVE, "b"), Action(REMOVE, "c"))


# -- removing --------------------------------------------------------------------------------------


def test_live_agents_holding_the_volume_outside_the_layout_are_told_to_remove_it() -> None:
    reports = {**settled(ABC), "y": settled(ABC)["b"], "x": settled(ABC)["c"],
               "z": settled(ABC)["c"]}
    p = plan(intent(), ABC, cluster("a", "b", "c", "x", "y", "z", dead=["z"]), reports,
             {"z": 3.0})
    # only live ones (a dead agent cannot be told), in name order, after everything else
    assert p.actions == (Action(REMOVE, "x"), Action(REMOVE, "y"))


# -- quorum ----------------------------------------------------------------------------------------


def test_synchronous_volume_gives_agents_the_write_quorum() -> None:
    p = plan(intent(SYNC), ABC, cluster("a", "b", "c"), settled(ABC, 2))
    assert p == Plan(layout=ABC, actions=(), write_quorum=2)


def test_quorum_loss_with_freeze_keeps_the_quorum_and_reports_it() -> None:
    nodes, down = cluster("a", "b", "c", dead=["b", "c"]), {"b": 5.0, "c": 5.0}
    p = plan(intent(SYNC), ABC, nodes, settled(ABC, 2, nodes=["a"]), down)
    assert p.write_quorum == 2
    assert p.actions == ()
    assert p.problem_reason == "QuorumLost"
    assert p.problem == ("only 1 of 3 replicas are live, below writeQuorum 2: writes are frozen "
                         "until one returns")


def test_quorum_loss_with_continue_lowers_the_quorum_to_the_live_replicas() -> None:
    nodes, down = cluster("a", "b", "c", dead=["b", "c"]), {"b": 5.0, "c": 5.0}
    p = plan(intent(SYNC_CONTINUE), ABC, nodes, settled(ABC, 2, nodes=["a"]), down)
    assert p.write_quorum == 1
    assert p.actions == (Action(APPLY, "a", 3),)  # the lowered quorum is a new spec
    assert p.problem_reason == "QuorumLost"
    assert p.problem.endswith("below writeQuorum 2: writes continue with the live ones")
    # once the agent has that spec, nothing more to do
    again = plan(intent(SYNC_CONTINUE), ABC, nodes, settled(ABC, 1, nodes=["a"]), down)
    assert again.actions == ()
    assert again.write_quorum == 1


def test_quorum_loss_with_continue_never_goes_below_one() -> None:
    dead = {"a": 5.0, "b": 5.0, "c": 5.0}
    p = plan(intent(SYNC_CONTINUE), ABC, cluster("a", "b", "c", dead=dead), {}, dead)
    assert p.write_quorum == 1
    assert p.problem_reason == "QuorumLost"


def test_asynchronous_volume_has_no_quorum_to_lose() -> None:
    nodes, down = cluster("a", "b", "c", dead=["b", "c"]), {"b": 5.0, "c": 5.0}
    p = plan(intent(), ABC, nodes, settled(ABC, nodes=["a"]), down)
    assert (p.write_quorum, p.problem, p.problem_reason) == (0, "", "")


def test_a_shortfall_is_the_reason_before_quorum_loss() -> None:
    nodes = cluster("a", "b", "c", dead=["c"])
    p = plan(intent(SYNC), ABC, nodes, settled(ABC, 2, nodes=["a", "b"]), {"c": 1000.0})
    assert p.problem_reason == "InsufficientNodes"


def test_write_quorum_never_exceeds_the_replicas_the_volume_asks_for() -> None:
    """``spec.desiredReplicas`` may ask for fewer replicas than the policy's writeQuorum: the
    quorum the agents get is then every replica, not a number no write could ever reach."""
    policy = policy_from_spec({"mode": "Synchronous", "replicas": 3, "writeQuorum": 3})
    layout = Layout(replicas=("a",), primary="a", epoch=1)
    p = plan(intent(policy, desired=1), layout, cluster("a", "b", "c"), settled(layout, 1))
    assert p == Plan(layout=layout, actions=(), write_quorum=1)


# -- replica_states --------------------------------------------------------------------------------


def test_replica_states() -> None:
    layout = Layout(replicas=("a", "b", "c", "d", "e"), primary="a", epoch=2)
    reports = settled(layout, nodes=["a", "c", "d"])
    view = {"c": LAGGING, "b": IN_SYNC, "x": IN_SYNC}
    assert replica_states(layout, reports, {"b": 9.0}, view) == {
        "a": IN_SYNC, "b": STALE, "c": LAGGING, "d": REBUILDING, "e": REBUILDING}
    fenced = {**reports, "a": dataclasses.replace(reports["a"], fenced=True)}
    assert replica_states(layout, fenced, {}, view)["a"] == FAILED
    assert replica_states(layout, {}, {"a": 1.0}, view)["a"] == STALE
    assert replica_states(Layout(), reports, {}, view) == {}


# -- small pieces ----------------------------------------------------------------------------------


def test_spec_fingerprint_is_short_stable_and_order_independent() -> None:
    one = spec_fingerprint({"a": 1, "b": [1, 2], "c": {"x": "y"}})
    assert one == spec_fingerprint({"c": {"x": "y"}, "b": [1, 2], "a": 1})
    assert len(one) == 16
    int(one, 16)
    assert one != spec_fingerprint({"a": 2, "b": [1, 2], "c": {"x": "y"}})
    assert one != spec_fingerprint({"a": 1, "b": [2, 1], "c": {"x": "y"}})


def test_layout_is_placed_only_with_a_primary_among_its_replicas() -> None:
    assert not Layout().placed
    assert not Layout(replicas=("a",), primary="b").placed
    assert not Layout(replicas=(), primary="a").placed
    assert Layout(replicas=("a", "b"), primary="b").placed


# -- the simulator ---------------------------------------------------------------------------------


@dataclass
class Replica:
    """One agent's replica of the volume, as ``replication_agent.volume.VolumeEngine`` keeps it."""

    role: str
    epoch: int
    primary: str
    spec_hash: str
    members: tuple[str, ...]  # the spec's replica_nodes: whom a primary ships to
    fenced: bool = False
    newest: tuple[int, int] = (0, 0)  # newest complete snapshot (epoch, seq)


@dataclass
class Agent:
    node: NodeView
    alive: bool = True
    gone_at: float = 0.0
    replica: Replica | None = None
    #: The highest epoch this agent ever held the volume at (epochs never go down).
    highest: int = 0


class SafetyError(AssertionError):
    pass


@dataclass(repr=False)
class World:
    """A cluster of agents holding (or not) one volume, and the operator's persisted state."""

    agents: dict[str, Agent]
    intent: Intent
    layout: Layout = field(default_factory=Layout)
    view: dict[str, ReplicaState] = field(default_factory=dict)  # status.replicas[].state
    now: float = 0.0
    log: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # what a failing example shows: short enough to read
        nodes = ", ".join(f"{a.node.name}(zone={a.node.label(ZONE)}, ssd={a.node.label('disk')},"
                          f" free={a.node.available_bytes // GiB}G, ready={a.node.ready},"
                          f" schedulable={a.node.schedulable})" for a in self.agents.values())
        return f"World([{nodes}], {self.intent})"

    # -- what the operator sees ---------------------------------------------------------------

    def nodes(self) -> list[NodeView]:
        return [dataclasses.replace(a.node, agent_alive=a.alive) for a in self.agents.values()]

    def down_for(self) -> dict[str, float]:
        return {name: self.now - a.gone_at for name, a in self.agents.items() if not a.alive}

    def reports(self) -> dict[str, Report]:
        reports = {}
        for name, agent in self.agents.items():
            r = agent.replica
            if not agent.alive or r is None:
                continue
            peers = {peer: self.peer_state(r, peer) for peer in r.members if peer != name} \
                if r.role == "primary" else {}
            reports[name] = Report(node=name, role=r.role, epoch=r.epoch, primary=r.primary,
                                   fenced=r.fenced, spec_hash=r.spec_hash,
                                   last_received=r.newest, peer_states=peers)
        return reports

    def peer_state(self, primary: Replica, peer: str) -> ReplicaState:
        agent = self.agents[peer]
        r = agent.replica
        if not agent.alive:
            return LAGGING
        if r is None or (r.newest == (0, 0) and primary.newest != (0, 0)):
            return REBUILDING
        return IN_SYNC if r.newest == primary.newest else LAGGING

    def fingerprint(self, layout: Layout, quorum: int) -> str:
        return spec_fingerprint({"replicas": list(layout.replicas), "primary": layout.primary,
                                 "epoch": layout.epoch, "quorum": quorum,
                                 "policy": self.intent.policy, "size": self.intent.size_bytes})

    def plan(self) -> Plan:
        return plan_volume(self.intent, self.layout, self.nodes(), self.reports(),
                           self.down_for(), last_primary_view=self.view,
                           fingerprint=self.fingerprint)

    # -- the operator's reconcile (volumes.py) -------------------------------------------------

    def reconcile(self, killed_after: int | None = None) -> Plan:
        """Plan and carry the plan out; ``killed_after`` calls, the operator dies."""
        old, reports, down = self.layout, self.reports(), self.down_for()
        p = self.plan()
        self.log.append(f"plan {p.layout} {[(a.kind.value, a.node, a.epoch) for a in p.actions]}"
                        f" {[e.reason for e in p.events]}")
        check_plan(self, old, p, reports, down)
        if not p.layout.placed:
            return p
        switched = False
        calls = list(p.actions)
        if calls and calls[0].kind is SYNC_NOW:
            if not self.sync_now(calls.pop(0).node):
                return p  # nothing is persisted: the next reconcile starts over
            switched = True
        self.layout = p.layout  # persisted before any agent hears of it
        spec_hash = self.fingerprint(p.layout, p.write_quorum)
        for done, action in enumerate(calls):
            if killed_after is not None and done >= killed_after:
                return p
            if action.kind is PROMOTE:
                if not self.promote(action.node, action.epoch):
                    break
            elif action.kind is APPLY:
                self.apply(action.node, p.layout, spec_hash)
            elif action.kind is REMOVE:
                self.remove(action.node)
            else:
                raise AssertionError(f"unexpected {action}")
        if switched:
            self.intent = dataclasses.replace(self.intent, switchover_to=None)
        # the replica states written to status: the next plan's last_primary_view
        after = self.reports()
        view = dict(self.view)
        primary = after.get(p.layout.primary)
        if primary is not None and primary.role == "primary":
            view.update(primary.peer_states)
        self.view = replica_states(p.layout, after, self.down_for(), view)
        return p

    # -- the agents (replication_agent/volume.py) ----------------------------------------------

    def promote(self, node: str, epoch: int) -> bool:
        agent = self.agents[node]
        r = agent.replica
        if not agent.alive or r is None:
            return False
        if epoch <= r.epoch and not (r.role == "primary" and epoch == r.epoch):
            return False  # FailedPrecondition: promotion needs a newer epoch
        if not (r.role == "primary" and epoch == r.epoch and not r.fenced):
            # the newest complete snapshot goes live, and a marker snapshot opens the epoch
            r.role, r.epoch, r.primary, r.fenced = "primary", epoch, node, False
            r.newest = (epoch, r.newest[1] + 1)
        self.checked(f"promote {node} {epoch}")
        return True

    def apply(self, node: str, layout: Layout, spec_hash: str) -> bool:
        agent = self.agents[node]
        if not agent.alive:
            return False
        r = agent.replica
        if r is None:
            agent.replica = Replica(role="primary" if layout.primary == node else "replica",
                                    epoch=max(1, layout.epoch), primary=layout.primary,
                                    spec_hash=spec_hash, members=layout.replicas)
        else:
            if layout.epoch > r.epoch:  # adopt_epoch
                r.epoch, r.primary, r.fenced = layout.epoch, layout.primary, False
                if layout.primary != node:
                    r.role = "replica"
            r.spec_hash, r.members = spec_hash, layout.replicas
        self.checked(f"apply {node}")
        return True

    def remove(self, node: str) -> bool:
        agent = self.agents[node]
        if not agent.alive:
            return False
        holders = [n for n, a in self.agents.items() if a.alive and a.replica is not None]
        if holders == [node]:
            raise SafetyError(f"REMOVE takes the last live replica (on {node})")
        agent.replica = None
        self.checked(f"remove {node}")
        return True

    def sync_now(self, node: str) -> bool:
        agent = self.agents[node]
        r = agent.replica
        if not agent.alive or r is None or r.role != "primary" or r.fenced:
            return False
        self.ship_from(node)
        return True

    def ship_from(self, node: str, only: Collection[str] | None = None) -> None:
        """The primary's links push its newest snapshot (PeerLink._ship / receive)."""
        r = self.agents[node].replica
        assert r is not None
        for peer in r.members:
            target = self.agents[peer]
            theirs = target.replica
            if peer == node or not target.alive or theirs is None or r.fenced \
                    or (only is not None and peer not in only):
                continue
            if theirs.epoch > r.epoch or (theirs.epoch == r.epoch and theirs.role == "primary"):
                r.fenced = True  # the peer follows a newer primary: our writes no longer count
                self.checked(f"{node} fenced by {peer}")
                return
            if r.epoch > theirs.epoch:
                theirs.epoch, theirs.primary, theirs.role = r.epoch, node, "replica"
                theirs.fenced = False
            theirs.newest = r.newest
            self.checked(f"ship {node}->{peer}")

    def ship_all(self) -> None:
        for name in sorted(self.agents):
            agent = self.agents[name]
            if agent.alive and agent.replica is not None and agent.replica.role == "primary" \
                    and not agent.replica.fenced:
                self.ship_from(name)

    def write(self, reach: int) -> None:
        """The serving primary takes a snapshot; it reaches the peers in the bit mask."""
        agent = self.agents.get(self.layout.primary)
        if agent is None or not agent.alive or agent.replica is None:
            return
        r = agent.replica
        if r.role != "primary" or r.fenced:
            return
        r.newest = (r.epoch, r.newest[1] + 1)
        names = sorted(self.agents)
        self.ship_from(self.layout.primary,
                       only={n for i, n in enumerate(names) if reach >> i & 1})

    # -- the world changes ---------------------------------------------------------------------

    def kill(self, node: str) -> None:
        agent = self.agents[node]
        if agent.alive:
            agent.alive, agent.gone_at = False, self.now

    def revive(self, node: str) -> None:
        self.agents[node].alive = True

    def checked(self, what: str) -> None:
        """Safety after every change of an agent's state."""
        self.log.append(what)
        primaries = Counter(a.replica.epoch for a in self.agents.values()
                            if a.replica is not None and a.replica.role == "primary")
        twice = [epoch for epoch, count in primaries.items() if count > 1]
        if twice:
            raise SafetyError(f"two primaries at epoch {twice[0]} after {what}")
        for name, agent in self.agents.items():
            if agent.replica is None:
                continue
            if agent.replica.epoch < agent.highest:
                raise SafetyError(f"{name} went from epoch {agent.highest} to "
                                  f"{agent.replica.epoch} ({what})")
            agent.highest = agent.replica.epoch
            if agent.replica.epoch > self.layout.epoch:
                raise SafetyError(f"{name} is at epoch {agent.replica.epoch}, beyond the "
                                  f"persisted layout's {self.layout.epoch} ({what})")


def check_plan(world: World, old: Layout, p: Plan, reports: Mapping[str, Report],
               down: Mapping[str, float]) -> None:
    """What every plan must satisfy, whatever the world looks like."""
    alive = {name for name, a in world.agents.items() if a.alive}
    layout = p.layout
    desired = world.intent.desired_replicas
    assert len(set(layout.replicas)) == len(layout.replicas), "duplicate replicas"
    assert list(layout.replicas) == sorted(layout.replicas)
    assert len(layout.replicas) <= desired, f"more than {desired} replicas: {layout}"
    assert layout.epoch >= old.epoch, "the epoch went down"
    if old.placed:
        assert layout.placed, "the primary left the layout"
        if layout.primary != old.primary:
            assert layout.epoch > max([old.epoch, *(r.epoch for r in reports.values())])
        else:
            assert layout.epoch == old.epoch
    elif layout != Layout():
        assert layout.placed
        assert layout.epoch == 1
        assert len(layout.replicas) == desired, "a new volume is placed whole"
    else:
        assert p.problem_reason == "InsufficientNodes"
        assert not p.actions
    if p.problem_reason == "InsufficientNodes":
        assert len(layout.replicas) < desired
    # a replica whose agent is gone is kept until staleReplicaTimeout (unless the count is
    # lowered), then replaced; the primary stays whatever happens to its agent; and while the
    # primary is gone with no replica promoted, none leaves for being out of reach
    timeout = world.intent.policy.stale_replica_timeout_seconds
    waiting = layout.primary in down
    for node in old.replicas:
        if node in down and (down[node] < timeout or waiting) \
                and len(old.replicas) <= desired:
            assert node in layout.replicas, f"{node} dropped {down[node]}s after it went"
        if node in down and down[node] >= timeout and node != layout.primary and not waiting:
            assert node not in layout.replicas, f"stale {node} kept"
    # the quorum agents are given: the policy's, at most every replica asked for, lowered to
    # the live replicas only on quorum loss with Continue
    policy = world.intent.policy
    if not layout.placed:
        pass  # nothing goes to any agent
    elif policy.mode is Mode.SYNCHRONOUS:
        quorum = min(policy.write_quorum, desired)
        live = len(alive & set(layout.replicas))
        if live < quorum and policy.on_quorum_loss == "Continue":
            assert p.write_quorum == max(1, live)
        else:
            assert p.write_quorum == quorum
        assert (live < quorum) == bool(p.problem) or p.problem_reason == "InsufficientNodes"
    else:
        assert p.write_quorum == 0
    kinds = [a.kind for a in p.actions]
    order = [SYNC_NOW, PROMOTE, APPLY, REMOVE]
    assert kinds == sorted(kinds, key=order.index), "actions out of order"
    assert kinds.count(SYNC_NOW) <= 1
    assert kinds.count(PROMOTE) <= 1
    applied = [a.node for a in p.actions if a.kind is APPLY]
    assert len(applied) == len(set(applied))
    for action in p.actions:
        assert action.node in alive, f"{action} to a dead agent"
        if action.kind is SYNC_NOW:
            # the operator syncs old_layout.primary: the action must name that node
            assert action.node == old.primary != layout.primary
            assert layout.primary == world.intent.switchover_to
        elif action.kind is PROMOTE:
            assert (action.node, action.epoch) == (layout.primary, layout.epoch)
            assert action.node in reports
        elif action.kind is APPLY:
            assert action.node in layout.replicas
            assert action.epoch == layout.epoch
        else:
            assert action.node not in layout.replicas
            assert action.node in reports
            # data leaves a node only while a live primary holds the volume
            assert layout.primary in reports
    # anything alive that is out of date gets a call
    for node in layout.replicas:
        if node in alive and node not in down:
            r = reports.get(node)
            if r is None or r.spec_hash != world.fingerprint(layout, p.write_quorum) \
                    or r.epoch < layout.epoch or r.primary != layout.primary:
                assert node in applied


# -- the properties --------------------------------------------------------------------------------

NAMES = ("n0", "n1", "n2", "n3", "n4", "n5", "n6")
#: Step kinds, repeated to weigh them. Some aim at the primary or the layout on purpose: a node
#: picked at random is rarely the one whose death or switchover matters.
KINDS = ("kill", "kill_primary", "revive", "revive", "wait", "write", "write", "reconcile",
         "reconcile", "reconcile", "reconcile", "settle", "desired", "policy", "switchover",
         "switchover_member", "consumer")
WAITS = (1.0, 20.0, 60.0, 400.0)
ROUNDS = 6


@st.composite
def node_view(draw: st.DrawFn, name: str) -> NodeView:
    """Mostly a healthy node; now and then one placement must avoid."""
    labels = {ZONE: draw(st.sampled_from("abcd"))}
    if draw(st.sampled_from([True, True, True, False])):
        labels["disk"] = "ssd"
    healthy = draw(st.sampled_from([True, True, True, False]))
    return NodeView.of(name, labels, ready=healthy or draw(st.booleans()),
                       schedulable=healthy or draw(st.booleans()),
                       available_bytes=16 * GiB if healthy else draw(
                           st.sampled_from([0, GiB, 4 * GiB, 16 * GiB])))


@st.composite
def mode_spec(draw: st.DrawFn) -> dict[str, Any]:
    mode = draw(st.sampled_from(["Synchronous", "Asynchronous", "Scheduled"]))
    replicas = draw(st.sampled_from([1, 2, 2, 3, 3, 4, 5]))
    spec: dict[str, Any] = {"mode": mode, "replicas": replicas, "failover": {
        "staleReplicaTimeout": draw(st.sampled_from(["30s", "5m"])),
        "onQuorumLoss": draw(st.sampled_from(["Freeze", "Continue"]))}}
    if mode == "Synchronous" and draw(st.booleans()):
        spec["writeQuorum"] = draw(st.integers(1, replicas))
    if mode == "Scheduled":
        spec["schedule"] = "*/5 * * * *"
    return spec


@st.composite
def worlds(draw: st.DrawFn) -> tuple[World, list[Policy]]:
    count = draw(st.integers(3, 7))
    nodes = [draw(node_view(name)) for name in NAMES[:count]]
    placement: dict[str, Any] = {
        "topologyKey": draw(st.sampled_from(["kubernetes.io/hostname", ZONE])),
        "dataLocality": draw(st.sampled_from(["BestEffort", "Disabled"]))}
    if draw(st.booleans()):
        placement["nodeSelector"] = {"disk": "ssd"}
    # policies the run switches between; placement rules stay (changing them is placement's
    # swap business, tested with placement)
    policies = [policy_from_spec({**draw(mode_spec()), "placement": placement}, name=f"p{i}")
                for i in range(3)]
    desired = draw(st.just(policies[0].replicas) | st.integers(1, 5))
    consumer = draw(st.sampled_from([None, *NAMES[:count]]))
    world = World(agents={n.name: Agent(n) for n in nodes},
                  intent=Intent(volume_id="vol-sim", size_bytes=SIZE, policy=policies[0],
                                desired_replicas=desired, consumer=consumer))
    return world, policies


def run_step(world: World, policies: list[Policy], kind: str, arg: int) -> None:
    names = sorted(world.agents)
    node = names[arg % len(names)]
    members = world.layout.replicas
    if kind == "kill":
        world.kill(node)
    elif kind == "kill_primary":
        if world.layout.placed:
            world.kill(world.layout.primary)
    elif kind == "revive":
        world.revive(node)
    elif kind == "wait":
        world.now += WAITS[arg % len(WAITS)]
    elif kind == "write":
        world.write(arg)
    elif kind == "reconcile":
        world.reconcile(killed_after=None if arg % 3 else arg % 4)
    elif kind == "settle":
        check_fixed_point(world, settle(world))
    elif kind == "desired":
        world.intent = dataclasses.replace(world.intent, desired_replicas=arg % 5 + 1)
    elif kind == "policy":
        policy = policies[arg % len(policies)]
        world.intent = dataclasses.replace(world.intent, policy=policy,
                                           desired_replicas=policy.replicas)
    elif kind == "switchover":
        world.intent = dataclasses.replace(world.intent, switchover_to=node)
    elif kind == "switchover_member":
        if members:
            world.intent = dataclasses.replace(world.intent,
                                               switchover_to=members[arg % len(members)])
    elif kind == "consumer":
        world.intent = dataclasses.replace(world.intent, consumer=node)
    else:
        raise AssertionError(kind)


def settle(world: World) -> Plan:
    """Reconcile with nothing changing (time stands still) until a plan has nothing to do."""
    for _ in range(ROUNDS):
        world.ship_all()
        before = world.layout
        p = world.reconcile()
        if not p.actions and p.layout == before:
            return p
    raise AssertionError(f"no fixed point after {ROUNDS} rounds:\n" + "\n".join(world.log[-40:]))


def check_fixed_point(world: World, p: Plan) -> None:
    """Idempotent: planning again, twice, changes nothing and calls nobody."""
    world.ship_all()
    again, third = world.plan(), world.plan()
    assert again == third, "plan_volume is not deterministic"
    assert again.layout == world.layout == p.layout
    assert again.actions == ()
    assert again.write_quorum == p.write_quorum


def check_healthy(world: World, p: Plan) -> None:
    """With every agent alive and nothing left to do, the world is what the layout says."""
    layout = world.layout
    if not layout.placed:
        assert p.problem_reason == "InsufficientNodes"
        return
    spec_hash = world.fingerprint(layout, p.write_quorum)
    for name, agent in world.agents.items():
        r = agent.replica
        if name not in layout.replicas:
            assert r is None, f"{name} still holds the volume outside {layout}"
            continue
        assert r is not None, f"{name} holds nothing"
        assert (r.epoch, r.primary, r.spec_hash, r.fenced) == (
            layout.epoch, layout.primary, spec_hash, False), f"{name}: {r} vs {layout}"
        assert r.role == ("primary" if name == layout.primary else "replica")
    assert p.problem_reason != "QuorumLost", p.problem
    if not p.problem:
        assert len(layout.replicas) == world.intent.desired_replicas


STEPS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 255)), min_size=10,
                 max_size=60)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds(), STEPS)
def test_simulated_cluster_converges_and_stays_safe(
        start: tuple[World, list[Policy]], steps: list[tuple[str, int]]) -> None:
    world, policies = start
    for kind, arg in steps:
        run_step(world, policies, kind, arg)
    # nothing changes: a fixed point within a few rounds, and it stays one
    p = settle(world)
    check_fixed_point(world, p)
    # time passes: dead replicas go stale and are replaced, then it settles again
    world.now += 10_000.0
    p = settle(world)
    check_fixed_point(world, p)
    # everyone returns: the world ends up exactly as the layout says
    for name in world.agents:
        world.revive(name)
    p = settle(world)
    check_fixed_point(world, p)
    check_healthy(world, p)


@settings(max_examples=150, deadline=None)
@given(worlds(), STEPS, st.lists(st.integers(0, 255), min_size=1, max_size=4))
def test_a_plan_interrupted_halfway_is_finished_by_the_next(
        start: tuple[World, list[Policy]], steps: list[tuple[str, int]],
        kills: list[int]) -> None:
    world, policies = start
    for kind, arg in steps:
        run_step(world, policies, kind, arg)
    for arg in kills:  # the operator dies after a few calls, again and again
        world.ship_all()
        world.reconcile(killed_after=arg % 4)
    p = settle(world)
    check_fixed_point(world, p)


# -- the simulator's own scenarios (they pin what the properties rely on) --------------------------


def small_world(policy: Policy = ASYNC, *, count: int = 4, consumer: str | None = "n0") -> World:
    return World(agents={name: Agent(NodeView.of(name, available_bytes=16 * GiB))
                         for name in NAMES[:count]},
                 intent=Intent(volume_id="vol-sim", size_bytes=SIZE, policy=policy,
                               desired_replicas=policy.replicas, consumer=consumer))


def test_world_places_fails_over_and_demotes_the_old_primary() -> None:
    world = small_world()
    settle(world)
    assert world.layout == Layout(replicas=("n0", "n1", "n2"), primary="n0", epoch=1)
    world.write(0b110)
    world.kill("n0")
    p = settle(world)
    assert (world.layout.primary, world.layout.epoch) == ("n1", 2)
    assert reasons(p) == []  # the settling plan is quiet; the failover was the one before
    world.write(0b100)  # n1 writes at epoch 2 and ships to n2
    world.revive("n0")
    old = world.agents["n0"].replica
    assert old is not None
    assert (old.role, old.epoch) == ("primary", 1)
    world.ship_from("n0")  # the returning primary meets epoch 2 and is fenced before it is told
    assert old.fenced
    assert world.plan().actions == (Action(APPLY, "n0", 2),)
    settle(world)
    assert (old.role, old.epoch, old.primary, old.fenced) == ("replica", 2, "n1", False)


def test_world_switchover_moves_the_primary_after_syncing() -> None:
    world = small_world()
    settle(world)
    world.write(0)  # a write no replica has yet
    world.intent = dataclasses.replace(world.intent, switchover_to="n2")
    p = world.reconcile()
    assert p.actions[0] == Action(SYNC_NOW, "n0")
    n2 = world.agents["n2"].replica
    assert n2 is not None
    assert (n2.role, n2.epoch, n2.newest) == ("primary", 2, (2, 2))  # it got (1, 1) first
    assert world.intent.switchover_to is None
    settle(world)
    assert world.layout == Layout(replicas=("n0", "n1", "n2"), primary="n2", epoch=2)


def test_world_lowered_replicas_wait_for_the_primary_before_data_goes() -> None:
    world = small_world(SYNC)
    settle(world)
    world.kill("n0")
    for name in ("n1", "n2"):  # the primary last saw neither in sync
        world.view[name] = LAGGING
    world.intent = dataclasses.replace(world.intent, desired_replicas=1)
    p = world.reconcile()
    assert reasons(p) == ["FailoverBlocked", "ReplicaRemoved", "ReplicaRemoved"]
    assert p.actions == ()
    settle(world)
    assert world.layout.replicas == ("n0",)
    assert [world.agents[n].replica is not None for n in ("n1", "n2")] == [True, True]
    world.revive("n0")
    settle(world)
    assert [world.agents[n].replica for n in ("n1", "n2")] == [None, None]


def test_the_primary_follows_a_waiting_pod_unless_pods_use_it_where_it_is() -> None:
    from sharedsync.core.volume_plan import consumer_switchover

    base = settled(ABC)
    wanting = {**base, "c": dataclasses.replace(base["c"], attach_wanted=True)}
    assert consumer_switchover(ABC, base) is None
    assert consumer_switchover(ABC, wanting) == "c"
    # pods on the primary still use it: moving would fence them
    in_use = {**wanting, "a": dataclasses.replace(base["a"], attached=True)}
    assert consumer_switchover(ABC, in_use) is None
    # deterministic when two nodes ask; never a node without a replica, never the primary
    both = {**wanting, "b": dataclasses.replace(base["b"], attach_wanted=True)}
    assert consumer_switchover(ABC, both) == "b"
    outsider = {**base, "d": dataclasses.replace(base["c"], node="d", attach_wanted=True),
                "a": dataclasses.replace(base["a"], attach_wanted=True)}
    assert consumer_switchover(ABC, outsider) is None
    # and the plan carries it out as a switchover: the old primary syncs, the new one is
    # promoted at the next epoch
    p = plan(intent(switchover="c"), ABC, cluster("a", "b", "c"), wanting)
    assert [a.kind for a in p.actions][:2] == [ActionKind.SYNC_NOW, PROMOTE]
    assert (p.layout.primary, p.layout.epoch) == ("c", ABC.epoch + 1)


# -- failover never loses an acknowledged write (a model of the write path) ------------------------


@st.composite
def write_histories(draw: st.DrawFn) -> tuple[Policy, list[tuple[str, int]], frozenset[str]]:
    """A Synchronous volume on a, b[, c, d] (a primary), a history of steps, and the nodes
    whose agents are alive when a dies."""
    count = draw(st.integers(2, 4))
    quorum = draw(st.integers(1, count))
    policy = policy_from_spec({"mode": "Synchronous", "replicas": count, "writeQuorum": quorum,
                               "failover": {"onQuorumLoss": draw(
                                   st.sampled_from(["Freeze", "Continue"]))}})
    others = "bcd"[:count - 1]
    steps = draw(st.lists(st.tuples(st.sampled_from(["write", "cut", "join", "down", "up",
                                                     "catch_up", "reconcile"]),
                                    st.integers(0, count - 2)), max_size=12))
    alive_at_end = draw(st.frozensets(st.sampled_from(list(others))))
    return policy, steps, alive_at_end


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(write_histories(), st.data())
def test_synchronous_failover_never_promotes_a_replica_missing_an_acknowledged_write(
        history: tuple[Policy, list[tuple[str, int]], frozenset[str]],
        data: st.DataObject) -> None:
    """The primary acknowledges a write once the plan's write quorum of replicas (itself
    included) holds it; replicas receive snapshots in order while linked; the operator's view
    (the status) is what the primary reported at some earlier reconcile. When the primary dies,
    whichever replica the plan promotes holds every acknowledged write, or none is promoted."""
    policy, steps, alive_at_end = history
    nodes = ["a", *"bcd"[:policy.replicas - 1]]
    layout = Layout(replicas=tuple(nodes), primary="a", epoch=1)
    held = dict.fromkeys(nodes, 0)  # newest sequence each replica holds completely
    linked = set(nodes)  # replicas the primary's pushes reach
    agents = set(nodes)  # replicas whose agent holds its Lease
    seq = acknowledged = 0
    quorum = policy.write_quorum
    views: list[dict[str, ReplicaState]] = []

    def reports() -> dict[str, Report]:
        return {n: Report(node=n, role="primary" if n == "a" else "replica", epoch=1,
                          primary="a", last_received=(1, held[n])) for n in agents}

    def view() -> dict[str, ReplicaState]:
        return {n: (IN_SYNC if held[n] == seq else LAGGING) if n in linked else STALE
                for n in nodes if n != "a"}

    views.append({n: REBUILDING for n in nodes if n != "a"})  # as placed
    for kind, index in steps:
        node = nodes[1 + index]
        if kind == "write":
            seq += 1
            for n in linked:
                held[n] = seq if held[n] == seq - 1 else held[n]  # in order, or not at all
            if sum(1 for n in nodes if held[n] == seq) >= quorum:
                acknowledged = seq
        elif kind == "cut":
            linked.discard(node)
        elif kind == "join":
            linked.add(node)
        elif kind == "down":
            agents.discard(node)
            linked.discard(node)
        elif kind == "up":
            agents.add(node)
        elif kind == "catch_up" and node in linked:
            held[node] = seq
        elif kind == "reconcile":
            down = {n: 1.0 for n in nodes if n not in agents}
            p = plan(intent(policy), layout, cluster(*nodes, dead=sorted(down)), reports(),
                     down, view())
            layout, quorum = p.layout, p.write_quorum
            views.append(view())
    assert layout.primary == "a"  # nothing failed over while a lived

    # a dies; the status holds the view of some earlier reconcile
    agents = set(alive_at_end)
    down = {n: 5.0 for n in nodes if n not in agents}
    last_view = data.draw(st.sampled_from(views))
    if quorum < 2 or layout.quorum_lowered_epoch == layout.epoch:
        # below two, writes were acknowledged by the primary alone: only a view as of its
        # death can tell who holds them (the trade onQuorumLoss: Continue and writeQuorum 1
        # make: the writes of the last moments before a failover)
        last_view = view()
    p = plan(intent(policy), layout, cluster(*nodes, dead=sorted(down)), reports(), down,
             last_view)
    event("promoted" if p.layout.primary != "a" else "waits")
    if p.layout.primary != "a":
        promoted = p.layout.primary
        assert held[promoted] >= acknowledged, (promoted, held, acknowledged, last_view)


# -- how a volume replicates: btrfs snapshots, or file by file ----------------------------------


def stores(**filesystems: str) -> list[NodeView]:
    """Nodes keeping their replicas on the given stores (node name -> btrfs | ext4)."""
    return [NodeView.of(name, available_bytes=10 * GiB, store_filesystem=fs)
            for name, fs in filesystems.items()]


def test_a_new_volume_ships_snapshots_when_enough_nodes_keep_btrfs() -> None:
    nodes = stores(a="btrfs", b="ext4", c="btrfs", d="btrfs")
    p = plan(intent(), Layout(), nodes, {})
    assert p.layout.replication is Replication.SNAPSHOTS
    assert p.layout.replicas == ("a", "c", "d")  # b left out: it cannot receive the streams


def test_a_new_volume_that_needs_an_ext4_node_replicates_file_by_file() -> None:
    p = plan(intent(), Layout(), stores(a="btrfs", b="ext4", c="btrfs"), {})
    assert p.layout.replication is Replication.FILES
    assert p.layout.replicas == ("a", "b", "c")
    every_node_on_ext4 = plan(intent(), Layout(), stores(a="ext4", b="ext4", c="ext4"), {})
    assert every_node_on_ext4.layout.replication is Replication.FILES


def test_a_multi_writer_volume_replicates_file_by_file_on_any_store() -> None:
    many = dataclasses.replace(intent(), multi_writer=True)
    p = plan(many, Layout(), stores(a="btrfs", b="btrfs", c="btrfs"), {})
    assert p.layout.replication is Replication.FILES


def test_how_a_volume_replicates_never_changes_after_its_first_placement() -> None:
    snapshots = dataclasses.replace(ABC, replication=Replication.SNAPSHOTS)
    # c is gone for good; only an ext4 node could replace it: the volume stays short
    nodes = [*stores(a="btrfs", b="btrfs", d="ext4"),
             NodeView.of("c", available_bytes=10 * GiB, agent_alive=False)]
    p = plan(intent(), snapshots, nodes, settled(snapshots, nodes=["a", "b"]),
             down_for={"c": 10_000})
    assert p.layout.replication is Replication.SNAPSHOTS
    assert "d" not in p.layout.replicas
    assert "keeps replicas on ext4" in p.problem
    # a volume that replicates file by file takes the ext4 node
    files = dataclasses.replace(ABC, replication=Replication.FILES)
    p = plan(intent(), files, nodes, settled(files, nodes=["a", "b"]), down_for={"c": 10_000})
    assert p.layout.replication is Replication.FILES
    assert p.layout.replicas == ("a", "b", "d")


def test_a_clone_of_a_volume_held_on_an_ext4_node_replicates_file_by_file() -> None:
    """The node holding the content source must be the new volume's primary: when it stores
    on ext4, the volume cannot ship snapshots, however many btrfs nodes there are."""
    clone = dataclasses.replace(intent(desired=2), prefer="c")
    p = plan(clone, Layout(), stores(a="btrfs", b="btrfs", c="ext4"), {})
    assert p.layout.primary == "c"
    assert p.layout.replication is Replication.FILES
    on_btrfs = dataclasses.replace(intent(desired=2), prefer="b")
    p = plan(on_btrfs, Layout(), stores(a="btrfs", b="btrfs", c="ext4"), {})
    assert (p.layout.primary, p.layout.replication) == ("b", Replication.SNAPSHOTS)


@pytest.mark.parametrize(("b", "c", "promoted"), [
    (((3, 9), 2), ((3, 9), 5), "c"),  # same snapshot: the longer fsync journal on it wins
    (((3, 10), 0), ((3, 9), 5), "b"),  # a newer snapshot was taken after every record of 9
])
def test_synchronous_failover_counts_the_fsync_journal_on_the_newest_snapshot(
        b: tuple[tuple[int, int], int], c: tuple[tuple[int, int], int], promoted: str) -> None:
    """Journal records of one snapshot reach a replica in order and without gaps: of two
    replicas holding the same snapshot, the one with more records holds every acknowledged
    write the other holds."""
    reports = {n: Report(node=n, role="replica", epoch=3, primary="a", last_received=held,
                         journal_records=records)
               for n, (held, records) in (("b", b), ("c", c))}
    for view in ({"b": IN_SYNC, "c": IN_SYNC}, {"b": STALE, "c": IN_SYNC}, {}):
        p = plan(intent(SYNC), ABC, cluster("a", "b", "c", dead=["a"]), reports, {"a": 5.0},
                 view)
        assert p.layout.primary == promoted, view
