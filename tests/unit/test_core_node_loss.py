"""Which pods on a lost node the operator deletes (sharedsync.core.node_loss)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.node_loss import (
    LOST_CONFIRM_SECONDS,
    OWNER_KINDS,
    NodeSignals,
    StrandedPod,
    confirm_lost,
    lost_volumes,
    verdict,
)
from sharedsync.core.policy import STRANDED_POD_DELETION

LOST = NodeSignals(ready=False, agent_known=True, agent_alive=False)


def pod(owner: str = "StatefulSet", volumes: tuple[str, ...] = ("vol-a",)) -> StrandedPod:
    return StrandedPod(namespace="db", name="pg-0", node="n1", owner_kind=owner,
                       volumes=volumes)


def test_a_node_is_lost_only_when_both_witnesses_agree() -> None:
    assert LOST.lost
    # the kubelet reports Ready: the agent alone being gone (a crash loop) is not node loss
    assert not NodeSignals(ready=True, agent_known=True, agent_alive=False).lost
    # the agent still renews its Lease: a kubelet problem, the node still serves its volumes
    assert not NodeSignals(ready=False, agent_known=True, agent_alive=True).lost
    # no agent ever ran there: no sharedsync volume was ever mounted there
    assert not NodeSignals(ready=False, agent_known=False, agent_alive=False).lost


def test_a_node_counts_as_lost_after_the_confirmation_time_and_starts_over_when_well() -> None:
    lost, since = confirm_lost({"n1": LOST, "n2": NodeSignals(True, True, True)}, {}, 100.0)
    assert lost == frozenset()
    assert since == {"n1": 100.0}
    lost, since = confirm_lost({"n1": LOST}, since, 100.0 + LOST_CONFIRM_SECONDS - 0.1)
    assert lost == frozenset()
    lost, since = confirm_lost({"n1": LOST}, since, 100.0 + LOST_CONFIRM_SECONDS)
    assert lost == {"n1"}
    # well for one look: the clock starts over
    _, since = confirm_lost({"n1": NodeSignals(True, True, True)}, since, 200.0)
    assert since == {}
    lost, since = confirm_lost({"n1": LOST}, since, 201.0)
    assert lost == frozenset()
    assert since == {"n1": 201.0}
    # a node that left the view is forgotten
    assert confirm_lost({}, since, 300.0) == (frozenset(), {})


def test_each_setting_covers_its_controllers() -> None:
    cases = {"Never": (), "StatefulSet": ("StatefulSet",), "Deployment": ("ReplicaSet",),
             "StatefulSetAndDeployment": ("StatefulSet", "ReplicaSet")}
    for setting, kinds in cases.items():
        for owner in ("StatefulSet", "ReplicaSet", "DaemonSet", "Job"):
            assert verdict(pod(owner), {"vol-a": setting}).delete == (owner in kinds), \
                (setting, owner)
    assert set(OWNER_KINDS) == set(STRANDED_POD_DELETION)


def test_the_reason_names_what_kept_the_pod() -> None:
    kept = verdict(pod("ReplicaSet"), {"vol-a": "StatefulSet"})
    assert not kept.delete
    assert "vol-a" in kept.reason
    assert "StatefulSet" in kept.reason
    assert "ReplicaSet" in kept.reason
    deleted = verdict(pod(), {"vol-a": "StatefulSet"})
    assert deleted.delete
    assert "vol-a (StatefulSet)" in deleted.reason


def test_pods_without_a_controller_or_a_sharedsync_volume_are_never_deleted() -> None:
    everything = {"vol-a": "StatefulSetAndDeployment"}
    assert not verdict(pod(""), everything).delete
    assert "no controller" in verdict(pod(""), everything).reason
    assert not verdict(pod(volumes=()), everything).delete


def test_a_volume_whose_policy_cannot_be_read_keeps_the_pod() -> None:
    assert not verdict(pod(), {"vol-a": None}).delete
    assert not verdict(pod(), {}).delete
    assert not verdict(pod(), {"vol-a": "Sometimes"}).delete  # unknown value: nothing allowed


_settings = st.sampled_from([*STRANDED_POD_DELETION, None])
_owners = st.sampled_from(["", "StatefulSet", "ReplicaSet", "DaemonSet", "Job"])
_volumes = st.lists(st.sampled_from(["vol-a", "vol-b", "vol-c"]), max_size=4).map(tuple)


@given(_owners, _volumes, st.dictionaries(st.sampled_from(["vol-a", "vol-b", "vol-c"]),
                                          _settings))
def test_a_pod_is_deleted_exactly_when_every_volume_allows_its_controller(
        owner: str, volumes: tuple[str, ...], settings: dict[str, str | None]) -> None:
    got = verdict(pod(owner, volumes), settings)
    expected = bool(volumes) and bool(owner) and all(
        settings.get(v) is not None and owner in OWNER_KINDS[str(settings[v])] for v in volumes)
    assert got.delete == expected
    assert got.reason
    # the verdict does not depend on how often or in what order a volume is listed
    assert verdict(pod(owner, tuple(reversed(volumes * 2))), settings) == got


@given(st.dictionaries(st.sampled_from(["n1", "n2", "n3"]),
                       st.builds(NodeSignals, st.booleans(), st.booleans(), st.booleans())),
       st.dictionaries(st.sampled_from(["n1", "n2", "n3"]),
                       st.floats(min_value=0, max_value=1000)),
       st.floats(min_value=1000, max_value=2000))
def test_only_nodes_lost_now_and_long_enough_are_confirmed(
        signals: dict[str, NodeSignals], since: dict[str, float], now: float) -> None:
    lost, after = confirm_lost(signals, since, now)
    assert set(after) == {n for n, s in signals.items() if s.lost}
    assert lost <= set(after)
    for node in after:
        assert after[node] == since.get(node, now)
        assert (node in lost) == (now - after[node] >= LOST_CONFIRM_SECONDS)


def test_a_running_pod_lost_the_volumes_the_node_stopped_serving_after_it_was_created() -> None:
    mounts = pod(volumes=("vol-a", "vol-b"))
    assert lost_volumes(mounts, True, 100, {"vol-a": 150}) == ("vol-a",)
    assert lost_volumes(mounts, True, 100, {"vol-a": 150, "vol-b": 120}) == ("vol-a", "vol-b")
    # created since: it is waiting for the volume to come to it, it lost nothing
    assert lost_volumes(mounts, True, 200, {"vol-a": 150}) == ()
    # not running: nothing to lose
    assert lost_volumes(mounts, False, 100, {"vol-a": 150}) == ()
    # another volume, or none stranded
    assert lost_volumes(mounts, True, 100, {"vol-c": 150}) == ()
    assert lost_volumes(mounts, True, 100, {}) == ()


@given(_volumes, st.booleans(), st.integers(min_value=0, max_value=10),
       st.dictionaries(st.sampled_from(["vol-a", "vol-b", "vol-c"]),
                       st.integers(min_value=0, max_value=10)))
def test_lost_volumes_are_mounted_stranded_and_after_creation(
        volumes: tuple[str, ...], running: bool, created: int,
        stranded: dict[str, int]) -> None:
    got = lost_volumes(pod(volumes=volumes), running, created, stranded)
    assert list(got) == sorted(set(got))
    assert set(got) == ({v for v in volumes if stranded.get(v, 0) > created}
                        if running else set())
