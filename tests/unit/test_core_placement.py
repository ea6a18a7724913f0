"""sharedsync.core.placement: examples for every rule, and properties over random clusters."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.placement import (
    NodeView,
    Placement,
    domain_of,
    eligible,
    format_selector,
    human_bytes,
    place,
)
from sharedsync.core.policy import Policy, policy_from_spec

GiB = 1 << 30
MiB = 1 << 20
ZONE = "topology.kubernetes.io/zone"
HOST = "kubernetes.io/hostname"

DEFAULT = Policy()
SSD = policy_from_spec({"replicas": 3, "placement": {"nodeSelector": {"disk": "ssd"}}},
                       name="fast")
ZONED = policy_from_spec({"replicas": 3, "placement": {"topologyKey": ZONE}}, name="zoned")
NO_LOCALITY = policy_from_spec({"placement": {"dataLocality": "Disabled"}})


def node(name: str, free: int = 10 * GiB, **kwargs: Any) -> NodeView:
    labels = {key: value for key, value in kwargs.items() if isinstance(value, str)}
    flags: dict[str, Any] = {key: value for key, value in kwargs.items()
                             if isinstance(value, bool)}
    return NodeView.of(name, labels, available_bytes=free, **flags)


def ssd(name: str, free: int = 10 * GiB, **kwargs: Any) -> NodeView:
    return node(name, free, disk="ssd", **kwargs)


def hosted(name: str, hostname: str, disk: str | None = None) -> NodeView:
    """A node whose kubernetes.io/hostname label differs from its name."""
    labels = {HOST: hostname} | ({"disk": disk} if disk else {})
    return NodeView.of(name, labels, available_bytes=10 * GiB)


def zoned(name: str, zone: str, free: int = 10 * GiB, **kwargs: Any) -> NodeView:
    return NodeView.of(name, {ZONE: zone}, available_bytes=free, **kwargs)


# -- NodeView and helpers ------------------------------------------------------------------------


def test_nodeview_of_sorts_labels() -> None:
    n = NodeView.of("a", {"z": "1", "b": "2"}, ready=False, available_bytes=5)
    assert n == NodeView("a", (("b", "2"), ("z", "1")), ready=False, available_bytes=5)
    assert n.label("z") == "1"
    assert n.label("missing") is None
    assert NodeView.of("a") == NodeView("a")


def test_domains() -> None:
    assert domain_of(NodeView.of("a"), HOST) == "a"  # hostname falls back on the node name
    assert domain_of(NodeView.of("a", {HOST: "host-a"}), HOST) == "host-a"
    assert domain_of(NodeView.of("a"), ZONE) is None  # any other key: no label, no domain
    assert domain_of(NodeView.of("a", {ZONE: "z1"}), ZONE) == "z1"


@pytest.mark.parametrize(
    ("count", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (GiB, "1 GiB"),
     (3 * GiB // 2, "1.5 GiB"), (5 << 40, "5 TiB"), (1 << 60, "1 EiB")],
)
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


def test_format_selector() -> None:
    assert format_selector(()) == "{}"
    assert format_selector((("disk", "ssd"), ("tier", "gold"))) == "{disk: ssd, tier: gold}"


# -- eligible ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "policy", "why"),
    [
        (ssd("a"), SSD, ""),
        (ssd("a", free=GiB), SSD, ""),  # exactly enough
        (ssd("a", ready=False), SSD, "not Ready"),
        (ssd("a", schedulable=False), SSD, "cordoned"),
        (ssd("a", agent_alive=False), SSD, "agent is not alive"),
        (node("a"), SSD, "does not match nodeSelector {disk: ssd} (no label disk)"),
        (node("a", disk="hdd"), SSD, "does not match nodeSelector {disk: ssd} "
                                     "(label disk is 'hdd')"),
        (ssd("a", free=GiB - 1), SSD, "has 1024.0 MiB free, needs 1 GiB"),
        (ssd("a", free=0), SSD, "has 0 B free, needs 1 GiB"),
        (node("a"), ZONED, f"has no {ZONE} label"),
        (zoned("a", "z1"), ZONED, ""),
        (node("a"), DEFAULT, ""),
        # The first reason wins: readiness before labels before space.
        (node("a", ready=False, schedulable=False, free=0), SSD, "not Ready"),
        (node("a", schedulable=False, free=0), SSD, "cordoned"),
        (node("a", free=0), SSD, "nodeSelector"),
    ],
)
def test_eligible(n: NodeView, policy: Policy, why: str) -> None:
    answer = eligible(n, policy, GiB)
    assert (answer == "") == (why == "")
    assert why in answer


# -- placing new replicas ------------------------------------------------------------------------


def test_fresh_volume_goes_to_the_roomiest_nodes() -> None:
    nodes = [node("a", 5 * GiB), node("b", 9 * GiB), node("c", 7 * GiB), node("d", 7 * GiB)]
    p = place(DEFAULT, 3, GiB, nodes, [])
    assert p == Placement(nodes=("b", "c", "d"), added=("b", "c", "d"))
    assert p.satisfied
    # Ties on space are broken by name.
    assert place(DEFAULT, 2, GiB, nodes, []).nodes == ("b", "c")


def test_consumer_first_with_data_locality() -> None:
    nodes = [node("a", 1 * GiB), node("b", 9 * GiB), node("c", 7 * GiB)]
    assert place(DEFAULT, 2, GiB, nodes, [], consumer="a").nodes == ("a", "b")
    assert place(NO_LOCALITY, 2, GiB, nodes, [], consumer="a").nodes == ("b", "c")
    # An ineligible consumer gets nothing; an unknown one is ignored.
    assert place(DEFAULT, 2, 2 * GiB, nodes, [], consumer="a").nodes == ("b", "c")
    assert place(DEFAULT, 2, GiB, nodes, [], consumer="zz").nodes == ("b", "c")


def test_consumer_does_not_double_up_a_domain() -> None:
    nodes = [zoned("a1", "a", GiB), zoned("a2", "a"), zoned("b1", "b")]
    p = place(ZONED, 2, GiB, nodes, ["a2"], consumer="a1")
    assert p.nodes == ("a2", "b1")


def test_new_replicas_only_on_eligible_nodes() -> None:
    nodes = [ssd("ok"), ssd("notready", ready=False), ssd("cordoned", schedulable=False),
             ssd("noagent", agent_alive=False), node("hdd", disk="hdd"), ssd("small", GiB - 1)]
    p = place(SSD, 3, GiB, nodes, [])
    assert p.nodes == ("ok",)
    assert p.shortfall == 2
    assert p.reason == (
        "policy fast wants 3 replicas, one per kubernetes.io/hostname, but only 1 can be "
        "placed: of 6 nodes, 1 already holds one, 1 is not Ready, 1 is cordoned, 1 has no "
        "live agent, 1 does not match nodeSelector {disk: ssd}, 1 has less than 1 GiB free")


def test_reason_when_nodes_do_not_match_the_selector() -> None:
    nodes = [ssd("a"), ssd("b"), node("c"), node("d", disk="hdd")]
    p = place(SSD, 3, GiB, nodes, [])
    assert p.nodes == ("a", "b")
    assert (p.shortfall, p.reason) == (1, (
        "policy fast wants 3 replicas, one per kubernetes.io/hostname, but only 2 can be "
        "placed: of 4 nodes, 2 already hold one, 2 do not match nodeSelector {disk: ssd}"))


def test_reason_when_no_node_has_room() -> None:
    p = place(DEFAULT, 2, GiB, [node("a", 100 * MiB), node("b", 0)], [])
    assert p.nodes == ()
    assert p.shortfall == 2
    assert p.reason.endswith("but only 0 can be placed: of 2 nodes, 2 have less than 1 GiB "
                             "free")
    assert p.reason.startswith("the policy wants 2 replicas")  # no name given


def test_reason_without_nodes() -> None:
    p = place(DEFAULT, 1, 0, [], [])
    assert p == Placement(nodes=(), shortfall=1, reason=(
        "the policy wants 1 replica, one per kubernetes.io/hostname, but only 0 can be placed: "
        "there are no nodes"))


def test_spread_over_zones_never_doubles_up() -> None:
    nodes = [zoned("a1", "a"), zoned("a2", "a", 20 * GiB), zoned("b1", "b"), node("x")]
    p = place(ZONED, 3, GiB, nodes, [])
    assert p.nodes == ("a2", "b1")  # the roomier node of zone a
    assert p.shortfall == 1
    assert p.reason == (
        "policy zoned wants 3 replicas, one per topology.kubernetes.io/zone, but only 2 can be "
        "placed: of 4 nodes, 2 already hold one, 1 has no topology.kubernetes.io/zone label, "
        "1 shares its topology.kubernetes.io/zone with a replica")


def test_hostname_label_wins_over_the_node_name() -> None:
    # Two Node objects claiming one host (a renamed node, say) are one domain.
    nodes = [NodeView.of("a", {HOST: "h"}, available_bytes=GiB),
             NodeView.of("b", {HOST: "h"}, available_bytes=2 * GiB), node("c")]
    p = place(DEFAULT, 3, 0, nodes, [])
    assert p.nodes == ("b", "c")
    assert p.shortfall == 1


def test_desired_zero_removes_everything() -> None:
    p = place(DEFAULT, 0, GiB, [node("a"), node("b")], ["a", "b"])
    assert p == Placement(nodes=(), removed=("a", "b"))


# -- keeping what exists -------------------------------------------------------------------------


def test_existing_replicas_stay_even_when_others_are_roomier() -> None:
    nodes = [node("a", GiB), node("b", GiB), node("c", 90 * GiB)]
    assert place(DEFAULT, 2, GiB, nodes, ["a", "b"]) == Placement(nodes=("a", "b"))


def test_existing_replicas_stay_on_cordoned_unready_or_full_nodes() -> None:
    nodes = [node("a", schedulable=False), node("b", ready=False), node("c", free=0),
             node("d")]
    p = place(DEFAULT, 3, GiB, nodes, ["a", "b", "c"])
    assert p == Placement(nodes=("a", "b", "c"))


def test_a_dead_replica_is_replaced_unless_kept() -> None:
    nodes = [node("a"), node("b", agent_alive=False), node("c")]
    p = place(DEFAULT, 2, GiB, nodes, ["a", "b"])
    assert p == Placement(nodes=("a", "c"), added=("c",), removed=("b",))
    kept = place(DEFAULT, 2, GiB, nodes, ["a", "b"], keep=["b"])
    assert kept == Placement(nodes=("a", "b"))


def test_a_vanished_node_loses_its_replica_even_if_kept() -> None:
    p = place(DEFAULT, 2, GiB, [node("a"), node("c")], ["a", "gone"], keep=["gone"])
    assert p == Placement(nodes=("a", "c"), added=("c",), removed=("gone",))


def test_a_protected_replica_stays_even_if_its_node_is_gone_or_dead() -> None:
    p = place(DEFAULT, 2, GiB, [node("a"), node("c")], ["a", "gone"], protect=["gone"])
    assert p == Placement(nodes=("a", "gone"))
    dead = place(DEFAULT, 2, GiB, [node("a", agent_alive=False), node("c")], ["a"],
                 protect=["a"])
    assert dead == Placement(nodes=("a", "c"), added=("c",))


def test_keep_and_protect_ignore_nodes_without_replicas() -> None:
    nodes = [node("a"), node("b", agent_alive=False)]
    assert place(DEFAULT, 1, GiB, nodes, [], keep=["b"], protect=["b"]).nodes == ("a",)


# -- too many replicas ---------------------------------------------------------------------------


def test_excess_goes_dead_first_then_misplaced_then_away_from_consumer_then_smallest() -> None:
    nodes = [ssd("dead", agent_alive=False, free=99 * GiB), node("hdd", disk="hdd",
                                                                 free=99 * GiB),
             ssd("small", free=GiB), ssd("consumer", free=GiB), ssd("big", free=50 * GiB),
             ssd("x", free=20 * GiB), ssd("y", free=20 * GiB)]
    current = [n.name for n in nodes]
    order = []
    for desired in range(len(nodes) - 1, -1, -1):
        p = place(SSD, desired, GiB, nodes, current, keep=["dead"], consumer="consumer")
        assert len(p.nodes) == desired
        assert not p.added
        order.append(sorted(set(current) - set(p.nodes)))
    # Each step removes one more, in the documented order.
    removed_in_turn = [step[0] if i == 0 else sorted(set(step) - set(order[i - 1]))[0]
                       for i, step in enumerate(order)]
    assert removed_in_turn == ["dead", "hdd", "small", "x", "y", "big", "consumer"]


def test_without_data_locality_the_consumer_is_not_special_when_trimming() -> None:
    nodes = [node("consumer", free=GiB), node("b", free=2 * GiB)]
    p = place(NO_LOCALITY, 1, GiB, nodes, ["consumer", "b"], consumer="consumer")
    assert p.nodes == ("b",)
    p = place(DEFAULT, 1, GiB, nodes, ["consumer", "b"], consumer="consumer")
    assert p.nodes == ("consumer",)


def test_protect_is_honoured_when_trimming() -> None:
    nodes = [node("a", free=GiB), node("b"), node("c")]
    p = place(DEFAULT, 1, GiB, nodes, ["a", "b", "c"], protect=["a"])
    assert p == Placement(nodes=("a",), removed=("b", "c"))


def test_more_protected_than_desired_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="2 protected replicas"):
        place(DEFAULT, 1, GiB, [node("a"), node("b")], ["a", "b"], protect=["a", "b"])
    with pytest.raises(InvalidArgument, match="1 protected"):
        place(DEFAULT, 0, GiB, [node("a")], ["a"], protect=["a"])


# -- misplaced replicas --------------------------------------------------------------------------


def test_a_mismatched_replica_stays_without_a_replacement() -> None:
    nodes = [ssd("a"), node("b", disk="hdd"), ssd("c", free=0)]
    p = place(dataclasses.replace(SSD, replicas=2), 2, GiB, nodes, ["a", "b"])
    assert p == Placement(nodes=("a", "b"), misplaced=("b",))


def test_a_mismatched_replica_is_swapped_one_at_a_time() -> None:
    nodes = [ssd("a"), node("b", disk="hdd"), node("c", disk="hdd"), ssd("d"), ssd("e")]
    step1 = place(SSD, 3, GiB, nodes, ["a", "b", "c"])
    # b and c are both wrong: only one replacement is added, and nothing removed yet.
    assert step1 == Placement(nodes=("a", "b", "c", "d"), added=("d",), misplaced=("b", "c"))
    # The replacement is in: b goes, and the next swap starts in the same step.
    step2 = place(SSD, 3, GiB, nodes, step1.nodes)
    assert step2 == Placement(nodes=("a", "c", "d", "e"), added=("e",), removed=("b",),
                              misplaced=("c",))
    step3 = place(SSD, 3, GiB, nodes, step2.nodes)
    assert step3 == Placement(nodes=("a", "d", "e"), removed=("c",))
    assert place(SSD, 3, GiB, nodes, step3.nodes) == Placement(nodes=("a", "d", "e"))


def test_no_swap_while_short_of_replicas() -> None:
    # One eligible node: it fills the missing replica, the mismatched one stays.
    nodes = [ssd("a"), node("b", disk="hdd"), ssd("c")]
    p = place(SSD, 3, GiB, nodes, ["a", "b"])
    assert p == Placement(nodes=("a", "b", "c"), added=("c",), misplaced=("b",))


def test_no_swap_while_short_even_into_the_misplaced_replicas_own_zone() -> None:
    policy = policy_from_spec({"replicas": 3, "placement": {"topologyKey": ZONE,
                                                            "nodeSelector": {"disk": "ssd"}}})
    nodes = [NodeView.of("a1", {ZONE: "a", "disk": "ssd"}, available_bytes=GiB),
             NodeView.of("b1", {ZONE: "b", "disk": "hdd"}, available_bytes=GiB),
             NodeView.of("b2", {ZONE: "b", "disk": "ssd"}, available_bytes=GiB)]
    # b2 could replace b1, but b1 would then stay to make up the numbers: zone b doubled.
    p = place(policy, 3, GiB, nodes, ["a1", "b1"])
    assert p.nodes == ("a1", "b1")
    assert p.shortfall == 1
    assert p.misplaced == ("b1",)


def test_no_swap_while_a_replica_is_down() -> None:
    nodes = [ssd("a", agent_alive=False), node("b", disk="hdd"), ssd("c")]
    policy = dataclasses.replace(SSD, replicas=2)
    assert place(policy, 2, GiB, nodes, ["a", "b"], keep=["a"]) == Placement(
        nodes=("a", "b"), misplaced=("b",))
    # Once the agent is back, the swap starts.
    back = [dataclasses.replace(nodes[0], agent_alive=True), *nodes[1:]]
    assert place(policy, 2, GiB, back, ["a", "b"]).added == ("c",)


def test_a_protected_misplaced_replica_is_not_swapped() -> None:
    nodes = [ssd("a"), node("b", disk="hdd"), ssd("c")]
    p = place(SSD, 2, GiB, nodes, ["a", "b"], protect=["b"])
    assert p == Placement(nodes=("a", "b"), misplaced=("b",))


def test_a_replacement_may_take_the_misplaced_replicas_own_zone() -> None:
    policy = policy_from_spec({"placement": {"topologyKey": ZONE,
                                             "nodeSelector": {"disk": "ssd"}}})
    nodes = [NodeView.of("a1", {ZONE: "a", "disk": "ssd"}, available_bytes=GiB),
             NodeView.of("b1", {ZONE: "b", "disk": "hdd"}, available_bytes=GiB),
             NodeView.of("b2", {ZONE: "b", "disk": "ssd"}, available_bytes=GiB)]
    step1 = place(policy, 2, GiB, nodes, ["a1", "b1"])
    assert step1 == Placement(nodes=("a1", "b1", "b2"), added=("b2",), misplaced=("b1",))
    step2 = place(policy, 2, GiB, nodes, step1.nodes)
    assert step2 == Placement(nodes=("a1", "b2"), removed=("b1",))


def test_a_swap_into_the_victims_own_domain_removes_that_victim() -> None:
    # b has no replacement; c's replacement d shares c's host. Removing b instead of c
    # afterwards would leave c and d on one host for good.
    nodes = [hosted("b", "hb"),
             hosted("c", "hd"),
             hosted("d", "hd", "ssd")]
    policy = dataclasses.replace(SSD, replicas=2)
    step1 = place(policy, 2, GiB, nodes, ["b", "c"])
    assert step1 == Placement(nodes=("b", "c", "d"), added=("d",), misplaced=("b", "c"))
    step2 = place(policy, 2, GiB, nodes, step1.nodes)
    assert step2 == Placement(nodes=("b", "d"), removed=("c",), misplaced=("b",))


def test_no_swap_into_a_victims_own_domain_while_another_domain_is_doubled() -> None:
    # b shares host h1 with a; d could replace c on host h2, but then the excess rule could
    # not tell which doubled misplaced replica to drop.
    nodes = [hosted("a", "h1", "ssd"),
             hosted("b", "h1"),
             hosted("c", "h2"),
             hosted("d", "h2", "ssd")]
    p = place(SSD, 3, GiB, nodes, ["a", "b", "c"])
    assert p == Placement(nodes=("a", "b", "c"), misplaced=("b", "c"))
    # A replacement on a fresh host is fine, and goes for a doubled replica first.
    fresh = [*nodes, ssd("e")]
    step1 = place(SSD, 3, GiB, fresh, ["a", "b", "c"])
    assert step1 == Placement(nodes=("a", "b", "c", "e"), added=("e",), misplaced=("b", "c"))
    step2 = place(SSD, 3, GiB, fresh, step1.nodes)
    assert step2.removed == ("b",)


def test_a_node_that_lost_its_zone_label_is_misplaced() -> None:
    nodes = [zoned("a1", "a"), node("lost"), zoned("b1", "b")]
    p = place(ZONED, 2, GiB, nodes, ["a1", "lost"])
    assert p == Placement(nodes=("a1", "b1", "lost"), added=("b1",), misplaced=("lost",))


def test_two_replicas_in_one_zone_after_a_topology_change() -> None:
    # The policy went from hostname to zone spread: a1 and a2 now share zone a.
    nodes = [zoned("a1", "a", 5 * GiB), zoned("a2", "a", 9 * GiB), zoned("b1", "b")]
    step1 = place(ZONED, 2, GiB, nodes, ["a1", "a2"])
    assert step1 == Placement(nodes=("a1", "a2", "b1"), added=("b1",), misplaced=("a1",))
    step2 = place(ZONED, 2, GiB, nodes, step1.nodes)
    assert step2 == Placement(nodes=("a2", "b1"), removed=("a1",))
    # Without another zone, both stay.
    stuck = place(ZONED, 2, GiB, nodes[:2], ["a1", "a2"])
    assert stuck == Placement(nodes=("a1", "a2"), misplaced=("a1",))


def test_the_protected_replica_keeps_its_zone() -> None:
    nodes = [zoned("a1", "a", 5 * GiB), zoned("a2", "a", 9 * GiB)]
    p = place(ZONED, 2, GiB, nodes, ["a1", "a2"], protect=["a1"])
    assert p.misplaced == ("a2",)


# -- input checks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"desired": -1}, "desired"),
        ({"desired": True}, "desired"),
        ({"size_bytes": -1}, "size"),
        ({"nodes": [node("a"), node("a")]}, "nodes lists 'a' more than once"),
        ({"nodes": [node("")]}, "empty node name"),
        ({"current": ["a", "a"]}, "current lists 'a' more than once"),
        ({"current": [""]}, "empty node name"),
    ],
)
def test_inputs_are_checked(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"desired": 1, "size_bytes": 0, "nodes": [node("a")],
                            "current": [], **kwargs}
    with pytest.raises(InvalidArgument, match=match):
        place(DEFAULT, args["desired"], args["size_bytes"], args["nodes"], args["current"])


# -- properties ----------------------------------------------------------------------------------

NAMES = [f"n{i}" for i in range(7)]
POLICIES = [
    DEFAULT,
    NO_LOCALITY,
    SSD,
    ZONED,
    policy_from_spec({"placement": {"topologyKey": ZONE, "nodeSelector": {"disk": "ssd"},
                                    "dataLocality": "Disabled"}}),
]
_mostly_true = st.sampled_from([True, True, True, False])


@st.composite
def node_views(draw: st.DrawFn, name: str, healthy: bool) -> NodeView:
    """A node; ``healthy`` ones are all up with room, so that swaps and trims get exercised."""
    labels: dict[str, str] = {}
    for key, values in ((ZONE, ["a", "b", "c"]), ("disk", ["ssd", "ssd", "hdd"]),
                        (HOST, NAMES[:3])):
        if draw(st.booleans()) if key != HOST else draw(st.integers(0, 5)) == 0:
            labels[key] = draw(st.sampled_from(values))
    if healthy:
        return NodeView.of(name, labels, available_bytes=draw(st.sampled_from([GiB, 2 * GiB])))
    return NodeView.of(name, labels, ready=draw(_mostly_true), schedulable=draw(_mostly_true),
                       agent_alive=draw(_mostly_true),
                       available_bytes=draw(st.sampled_from([0, GiB // 2, GiB, 2 * GiB,
                                                             3 * GiB])))


@dataclasses.dataclass
class Scenario:
    policy: Policy
    desired: int
    size: int
    nodes: list[NodeView]
    current: list[str]
    keep: list[str]
    protect: list[str]
    consumer: str | None

    def run(self, current: Sequence[str] | None = None,
            nodes: Sequence[NodeView] | None = None, keep: Collection[str] | None = None,
            protect: Collection[str] | None = None) -> Placement:
        return place(self.policy, self.desired, self.size,
                     self.nodes if nodes is None else nodes,
                     self.current if current is None else current,
                     keep=self.keep if keep is None else keep, consumer=self.consumer,
                     protect=self.protect if protect is None else protect)

    @property
    def by_name(self) -> dict[str, NodeView]:
        return {n.name: n for n in self.nodes}

    def survivors(self) -> set[str]:
        """Current replicas that must not be dropped (computed here from the rules)."""
        by_name = self.by_name
        return {name for name in self.current
                if name in self.protect
                or (name in by_name and (by_name[name].agent_alive or name in self.keep))}

    def domain(self, name: str) -> str | None:
        n = self.by_name.get(name)
        if n is None:
            return None
        value = n.label(self.policy.topology_key)
        return name if value is None and self.policy.topology_key == HOST else value

    def fits(self, name: str) -> bool:
        n = self.by_name[name]
        return (all(n.label(k) == v for k, v in self.policy.node_selector)
                and self.domain(name) is not None)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    names = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    healthy = draw(st.booleans())
    nodes = [draw(node_views(name, healthy)) for name in names]
    desired = draw(st.integers(0, 5))
    current = draw(st.lists(st.sampled_from([*NAMES, "gone1", "gone2"]), unique=True,
                            max_size=6))
    keep = draw(st.lists(st.sampled_from(current), unique=True)) if current else []
    protect = draw(st.lists(st.sampled_from(current), unique=True,
                            max_size=min(desired, 2))) if current else []
    return Scenario(policy=draw(st.sampled_from(POLICIES)), desired=desired,
                    size=draw(st.sampled_from([0, GiB])), nodes=nodes, current=current,
                    keep=keep, protect=protect,
                    consumer=draw(st.sampled_from([None, *NAMES])))


@settings(max_examples=500)
@given(scenarios())
def test_placement_invariants(s: Scenario) -> None:
    p = s.run()
    nodes, current, protect = set(p.nodes), set(s.current), set(s.protect)
    by_name = s.by_name

    # Well-formed: sorted, no duplicates, consistent diff.
    for names in (p.nodes, p.added, p.removed, p.misplaced):
        assert list(names) == sorted(set(names))
    assert nodes == (current - set(p.removed)) | set(p.added)
    assert not set(p.added) & current
    assert set(p.removed) <= current
    assert set(p.misplaced) <= nodes

    # New replicas only on eligible nodes.
    for name in p.added:
        assert name in by_name
        assert eligible(by_name[name], s.policy, s.size) == ""

    # Never more than desired, except by one while a misplaced replica is being swapped.
    if len(nodes) > s.desired:
        assert len(nodes) == s.desired + 1
        assert p.added
        assert (set(p.misplaced) & current) - protect

    # Kept replicas survive; only the excess of them goes; the rest of current goes.
    survivors = s.survivors()
    assert protect <= nodes
    assert current - survivors <= set(p.removed)
    assert len(survivors - nodes) == max(0, len(survivors) - s.desired)
    assert len(nodes) >= min(s.desired, len(survivors))  # never below what exists

    # Shortfall and reason iff fewer than desired.
    assert p.shortfall == max(0, s.desired - len(nodes))
    assert bool(p.reason) == (p.shortfall > 0)
    if p.reason:
        assert f"wants {s.desired} replica" in p.reason
        assert f"only {len(nodes)} can be placed" in p.reason

    # Every replica the policy would not place there is reported misplaced.
    for name in nodes & set(by_name):
        if not s.fits(name):
            assert name in p.misplaced
    # Distinct topology domains: the well-placed replicas never share one, and a new replica
    # shares one at most with the misplaced replica it replaces.
    placed = [s.domain(name) for name in nodes - set(p.misplaced) if name in by_name]
    assert len(placed) == len(set(placed))
    domains = Counter(s.domain(name) for name in nodes)
    for name in p.added:
        assert domains[s.domain(name)] == 1 or (
            domains[s.domain(name)] == 2 and any(
                s.domain(other) == s.domain(name) for other in p.misplaced))

    # Nothing more could have been placed.
    if p.shortfall:
        for n in s.nodes:
            if n.name not in nodes and eligible(n, s.policy, s.size) == "":
                assert s.domain(n.name) in domains

    # The consumer gets a replica when it can and one is being added.
    c = s.consumer
    if (s.policy.data_locality and c in by_name and c not in current
            and eligible(by_name[c], s.policy, s.size) == ""
            and len(survivors) < s.desired
            and s.domain(c) not in {s.domain(name) for name in survivors}):
        assert c in p.added


@settings(max_examples=300)
@given(scenarios())
def test_idempotent_and_converges(s: Scenario) -> None:
    p = s.run()
    if len(p.nodes) <= s.desired:
        again = s.run(current=p.nodes)
        assert again == dataclasses.replace(p, added=(), removed=())
    # Swaps finish: asking again and again reaches a fixed point within two calls per swap.
    for _ in range(2 * len(NAMES) + 2):
        q = s.run(current=p.nodes)
        if q.nodes == p.nodes:
            break
        p = q
    assert q.nodes == p.nodes
    assert not q.added
    assert not q.removed
    assert len(q.nodes) <= s.desired
    # A domain may end up shared only by replicas that already shared it: whatever placement
    # added is alone in its domain once the swaps are done.
    domains = Counter(s.domain(name) for name in q.nodes)
    for name in set(q.nodes) - set(s.current):
        assert domains[s.domain(name)] == 1


@settings(max_examples=300)
@given(scenarios(), st.randoms(use_true_random=False))
def test_order_independent(s: Scenario, rnd: random.Random) -> None:
    p = s.run()
    nodes = rnd.sample(s.nodes, len(s.nodes))
    current = rnd.sample(s.current, len(s.current))
    keep = set(rnd.sample(s.keep, len(s.keep)))
    protect = tuple(rnd.sample(s.protect, len(s.protect)))
    assert s.run(current=current, nodes=nodes, keep=keep, protect=protect) == p


@given(scenarios())
def test_consumer_preferred_on_a_fresh_volume(s: Scenario) -> None:
    by_name = s.by_name
    c = s.consumer
    p = s.run(current=[], keep=(), protect=())
    if (s.desired and c in by_name and s.policy.data_locality
            and eligible(by_name[c], s.policy, s.size) == ""):
        assert c in p.nodes


@st.composite
def misplaced_scenarios(draw: st.DrawFn) -> Scenario:
    """Healthy clusters where some current replicas break the policy: swaps get exercised."""
    names = NAMES[:draw(st.integers(2, len(NAMES)))]
    nodes = [draw(node_views(name, healthy=True)) for name in names]
    current = draw(st.lists(st.sampled_from(names), unique=True, min_size=1, max_size=5))
    return Scenario(policy=draw(st.sampled_from(POLICIES)), desired=len(current), size=GiB,
                    nodes=nodes, current=current, keep=[], protect=[],
                    consumer=draw(st.sampled_from([None, *names])))


@settings(max_examples=300)
@given(misplaced_scenarios())
def test_swaps_go_one_at_a_time_and_fix_what_they_can(s: Scenario) -> None:
    p = s.run()
    for _ in range(2 * len(NAMES) + 2):
        assert len(p.nodes) in (s.desired, s.desired + 1)  # never below what exists
        assert len(p.added) <= 1
        assert len(p.removed) <= 1
        q = s.run(current=p.nodes)
        if q.nodes == p.nodes:
            break
        p = q
    assert q.nodes == p.nodes
    assert len(p.nodes) == s.desired
    domains = Counter(s.domain(name) for name in p.nodes)
    for name in set(p.nodes) - set(s.current):
        assert domains[s.domain(name)] == 1
    # At the fixed point, a replica is still misplaced only for want of a replacement.
    if p.misplaced:
        used = {s.domain(name) for name in p.nodes}
        for n in s.nodes:
            if n.name not in p.nodes and eligible(n, s.policy, s.size) == "":
                assert s.domain(n.name) in used


# -- nodes on the ext4 fallback store ----------------------------------------------------------


def test_a_volume_that_ships_snapshots_takes_new_replicas_on_btrfs_nodes_only() -> None:
    nodes = [node("a"), NodeView.of("b", available_bytes=50 * GiB, store_filesystem="ext4"),
             node("c")]
    result = place(DEFAULT, 2, GiB, nodes, [], snapshots_only=True)
    assert result.nodes == ("a", "c")  # b has the most room, but cannot receive btrfs streams
    refused = eligible(nodes[1], DEFAULT, GiB, snapshots_only=True)
    assert refused.startswith("keeps replicas on ext4")
    assert eligible(nodes[1], DEFAULT, GiB) == ""
    short = place(DEFAULT, 3, GiB, nodes, [], snapshots_only=True)
    assert short.shortfall == 1
    assert "1 keeps replicas on ext4 (this volume ships btrfs snapshots)" in short.reason
    # without the constraint (a volume replicated file by file) any store will do
    assert place(DEFAULT, 3, GiB, nodes, []).nodes == ("a", "b", "c")


def test_a_replica_already_on_ext4_is_kept_even_for_a_snapshot_volume() -> None:
    nodes = [node("a"), NodeView.of("b", available_bytes=10 * GiB, store_filesystem="ext4"),
             node("c")]
    result = place(DEFAULT, 2, GiB, nodes, ["a", "b"], snapshots_only=True)
    assert result.nodes == ("a", "b")
    assert not result.added
    assert not result.removed
