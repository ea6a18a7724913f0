"""The node's replication bandwidth is shared by priority among the volumes sending."""

import math

import pytest

from replication_agent.qos import NodeBandwidth

MiB = 1 << 20


def test_unlimited_node_never_delays() -> None:
    node = NodeBandwidth(0)
    node.begin("v1", 1, 0)
    assert node.delay("v1", 64 * MiB) == 0.0
    assert math.isinf(node.share("v1"))


def test_shares_follow_priority_and_are_rebalanced() -> None:
    node = NodeBandwidth(8 * MiB)
    node.begin("high", 3, 0)
    assert node.share("high") == pytest.approx(8 * MiB)
    node.begin("low", 1, 0)
    assert node.share("high") == pytest.approx(6 * MiB)
    assert node.share("low") == pytest.approx(2 * MiB)
    node.end("high")
    assert node.share("low") == pytest.approx(8 * MiB)


def test_a_capped_volume_leaves_its_unused_share_to_others() -> None:
    node = NodeBandwidth(8 * MiB)
    node.begin("capped", 10, 1 * MiB)
    node.begin("other", 1, 0)
    assert node.share("capped") == pytest.approx(1 * MiB)
    assert node.share("other") == pytest.approx(7 * MiB)


def test_two_pushes_of_one_volume_count_once() -> None:
    node = NodeBandwidth(4 * MiB)
    node.begin("v", 1, 0)
    node.begin("v", 1, 0)
    node.begin("w", 1, 0)
    node.end("v")
    assert node.share("v") == pytest.approx(2 * MiB)  # one push of v still runs
    node.end("v")
    assert node.share("w") == pytest.approx(4 * MiB)


def test_sending_beyond_the_share_waits_in_proportion() -> None:
    node = NodeBandwidth(2 * MiB)
    node.begin("v", 1, 0)
    node.delay("v", 1 * MiB)  # the burst (a tenth of a second, at least 1 MiB) is spent
    waits = [node.delay("v", 1 * MiB) for _ in range(4)]
    assert waits == sorted(waits)  # debt accumulates: each frame waits longer
    assert waits[-1] == pytest.approx(2.0, abs=0.1)  # 4 MiB at 2 MiB/s
