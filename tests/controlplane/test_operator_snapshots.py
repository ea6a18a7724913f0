"""SharedVolumeSnapshots and content sources, driven through the real operator and agents.

The objects are written as the CSI controller's Kubernetes state store writes them (the CSI
path with the external-snapshotter is a separate test): a SharedVolumeSnapshot of a volume is
taken on every replica, a SharedVolume with ``spec.contentSource`` starts with the snapshot's
(or the source volume's) data on its primary, and deleting everything leaves nothing on any
agent. What is checked is data: file digests in the agents' replicas.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.controlplane import ControlPlane
from tests.controlplane.operator_harness import OperatorCluster, policy, started_cluster, volume
from tests.controlplane.test_operator import write
from tests.integration.agent_harness import tree_digest, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

SOURCE = "vol-" + "5a" * 12
RESTORED = "vol-" + "5b" * 12
CLONE = "vol-" + "5c" * 12
SNAPSHOT = "snap-" + "5d" * 12


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorCluster]:
    with started_cluster(control_plane, tmp_path_factory, "operator-snapshots") as cluster:
        yield cluster


def snapshot_object(name: str, source: str) -> dict[str, object]:
    return {"apiVersion": "sharedsync.io/v1alpha1", "kind": "SharedVolumeSnapshot",
            "metadata": {"name": name, "labels": {"sharedsync.io/csi-scope": "operator-snap"}},
            "spec": {"sourceVolume": source, "requestName": f"snapshot-{name}",
                     "sizeBytes": 256 << 20}}


def snapshot_copies(cluster: OperatorCluster) -> dict[str, Path]:
    found = {}
    for node, agent in cluster.agents.agents.items():
        path = agent.data_dir / "replicas" / "mnt" / SOURCE / "snapshots" / SNAPSHOT
        if path.is_dir():
            found[node] = path
    return found


def ready(cluster: OperatorCluster, name: str) -> None:
    out = cluster.cp.kubectl("wait", "--for=condition=Ready", f"sv/{name}", "--timeout=180s",
                             check=False, timeout=190)
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n{cluster.operator.log_tail()}"


def test_snapshot_restore_clone_and_delete(cluster: OperatorCluster) -> None:
    cluster.apply(policy("snap-2", mode="Asynchronous", replicas=2, maxLag="1s"))
    cluster.wait_condition("sp", "snap-2", "Ready")
    cluster.apply(volume(SOURCE, "snap-2"))
    ready(cluster, SOURCE)
    primary = cluster.get("sv", SOURCE)["status"]["primary"]
    live = cluster.agents.agents[primary].live(SOURCE)
    write(live, "before.bin", seed=11)
    expected = tree_digest(live)

    cluster.apply(snapshot_object(SNAPSHOT, SOURCE))
    wait_until(lambda: (cluster.get("svs", SNAPSHOT).get("status") or {}).get("readyToUse"),
               timeout=180, interval=0.5,
               what=f"the snapshot ready\n{cluster.operator.log_tail()}")
    status = cluster.get("svs", SNAPSHOT)["status"]
    assert status["nodes"][0] == primary
    assert set(status["nodes"]) == cluster.holders(SOURCE)
    assert status["sizeBytes"] > 0
    assert cluster.condition("svs", SNAPSHOT, "Ready")["status"] == "True"
    copies = snapshot_copies(cluster)
    assert set(copies) == set(status["nodes"])
    for node, path in copies.items():
        assert tree_digest(path) == expected, node

    # written after the snapshot: in the clone, not in the restore
    write(live, "after.bin", seed=12)
    later = tree_digest(live)

    cluster.apply(volume(RESTORED, "snap-2", contentSource={"kind": "Snapshot",
                                                           "name": SNAPSHOT}))
    ready(cluster, RESTORED)
    restored_primary = cluster.get("sv", RESTORED)["status"]["primary"]
    assert restored_primary in status["nodes"]
    assert tree_digest(cluster.agents.agents[restored_primary].live(RESTORED)) == expected

    cluster.apply(volume(CLONE, "snap-2", contentSource={"kind": "Volume", "name": SOURCE}))
    ready(cluster, CLONE)
    clone_primary = cluster.get("sv", CLONE)["status"]["primary"]
    assert clone_primary == primary
    assert tree_digest(cluster.agents.agents[clone_primary].live(CLONE)) == later

    # the source goes first: the snapshot outlives it, then goes with its object
    for name in (SOURCE, RESTORED, CLONE):
        cluster.cp.kubectl("delete", "sv", name, "--wait=false")
    for name in (SOURCE, RESTORED, CLONE):
        wait_until(lambda n=name: not cluster.exists("sv", n), timeout=180, interval=0.5,
                   what=f"{name} deleted")
    # (the source's images stay, unmounted, for the snapshot in them)
    kept = {node for node, agent in cluster.agents.agents.items()
            if (agent.data_dir / "replicas" / "volumes" / SOURCE / "image").exists()}
    assert kept == set(status["nodes"])
    cluster.cp.kubectl("delete", "svs", SNAPSHOT, "--wait=false")
    wait_until(lambda: not cluster.exists("svs", SNAPSHOT), timeout=120, interval=0.5,
               what=f"the snapshot deleted\n{cluster.operator.log_tail()}")
    for node, agent in cluster.agents.agents.items():
        left = sorted(p.name for p in (agent.data_dir / "replicas" / "volumes").glob("*")) \
            if (agent.data_dir / "replicas" / "volumes").is_dir() else []
        assert not set(left) & {SOURCE, RESTORED, CLONE}, (node, left)
