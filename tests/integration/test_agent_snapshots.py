"""CSI snapshots, restores and clones on real agents (three nodes, mutual TLS, real btrfs).

The primary syncs and snapshots the acknowledged sync point; each replica snapshots its own
copy of that point; a new volume whose primary holds the source starts as a copy of it and its
other replicas receive it from that primary. What is checked is data: file digests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from replication_agent.proto import agent_pb2 as pb
from tests.integration.agent_harness import (
    AgentCluster,
    started_cluster,
    tree_digest,
    volume_spec,
    wait_until,
)
from tests.integration.test_agent_replication import write_files

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

SOURCE = "vol-" + "b2" * 12
RESTORED = "vol-" + "c3" * 12
CLONE = "vol-" + "d4" * 12
SNAPSHOT = "snap-" + "e5" * 12
NODES = ["a", "b", "c"]


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentCluster]:
    yield from started_cluster(tmp_path_factory, "agents")


def snapshot_dir(cluster: AgentCluster, node: str, volume_id: str) -> Path:
    return cluster.agents[node].live(volume_id).parent / "snapshots" / SNAPSHOT


def held(cluster: AgentCluster, node: str, volume_id: str) -> list[str]:
    return [s.snapshot_id for s in cluster.agents[node].volume(volume_id).snapshots]


def replicas_hold(cluster: AgentCluster, volume_id: str, primary: str,
                  expected: dict[str, str]) -> bool:
    """Every replica's newest complete sync point has exactly ``expected``'s files."""
    for node in NODES:
        if node == primary:
            continue
        sync_dir = cluster.agents[node].sync_dir(volume_id)
        names = sorted(p.name for p in sync_dir.iterdir() if p.name.startswith("e")) \
            if sync_dir.is_dir() else []
        if not names or tree_digest(sync_dir / names[-1]) != expected:
            return False
    return True


def test_snapshot_restore_and_clone(cluster: AgentCluster) -> None:
    cluster.apply(volume_spec(SOURCE, NODES, "a"))
    live = cluster.agents["a"].live(SOURCE)
    write_files(live, 8, 32 << 10, seed=7)
    expected = tree_digest(live)

    made = cluster.agents["a"].call("CreateSnapshot", pb.CreateSnapshotRequest(
        volume_id=SOURCE, snapshot_id=SNAPSHOT))
    assert made.HasField("source")
    assert made.size_bytes > 0
    again = cluster.agents["a"].call("CreateSnapshot", pb.CreateSnapshotRequest(
        volume_id=SOURCE, snapshot_id=SNAPSHOT))
    assert again == made, "a retried CreateSnapshot must answer with the same snapshot"
    for node in ("b", "c"):
        reply = cluster.agents[node].call("CreateSnapshot", pb.CreateSnapshotRequest(
            volume_id=SOURCE, snapshot_id=SNAPSHOT, source=made.source))
        assert reply.source == made.source
    for node in NODES:
        assert tree_digest(snapshot_dir(cluster, node, SOURCE)) == expected, node
        assert held(cluster, node, SOURCE) == [SNAPSHOT]

    # writes after the snapshot, and enough sync cycles for pruning, leave it as it was
    write_files(live, 8, 32 << 10, seed=8)
    for _ in range(4):
        (live / "more").write_bytes(b"x" * 4096 + bytes([_]))
        cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=SOURCE))
    after = tree_digest(live)
    assert after != expected
    for node in NODES:
        assert tree_digest(snapshot_dir(cluster, node, SOURCE)) == expected, node

    # a replica asked for a sync point it does not hold refuses (never a different content)
    with pytest.raises(grpc.RpcError) as missing:
        cluster.agents["b"].call("CreateSnapshot", pb.CreateSnapshotRequest(
            volume_id=SOURCE, snapshot_id="snap-" + "f6" * 12,
            source=pb.SnapshotRef(epoch=1, seq=999)))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    # restore on node b (the primary there holds the snapshot); the others receive it
    restore = volume_spec(RESTORED, ["b", "a", "c"], "b")
    restore.content_source.CopyFrom(pb.ContentSource(volume_id=SOURCE, snapshot_id=SNAPSHOT))
    cluster.apply(restore)
    assert tree_digest(cluster.agents["b"].live(RESTORED)) == expected
    wait_until(lambda: replicas_hold(cluster, RESTORED, "b", expected), timeout=120,
               what="the restored volume on its replicas")

    # clone on node c (a replica of the source): its newest complete sync point
    clone = volume_spec(CLONE, ["c", "b"], "c")
    clone.content_source.CopyFrom(pb.ContentSource(volume_id=SOURCE))
    cluster.apply(clone)
    assert tree_digest(cluster.agents["c"].live(CLONE)) == after

    # a primary that does not hold the source refuses instead of serving an empty volume
    elsewhere = volume_spec("vol-" + "a7" * 12, ["a"], "a")
    elsewhere.content_source.CopyFrom(pb.ContentSource(volume_id=CLONE))
    with pytest.raises(grpc.RpcError) as refused:
        cluster.apply(elsewhere)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # the source volume goes first: its snapshot outlives it, and goes with DeleteSnapshot
    for node in NODES:
        cluster.agents[node].call("RemoveVolume", pb.RemoveVolumeRequest(volume_id=SOURCE))
    for node in NODES:
        for _ in range(2):
            cluster.agents[node].call("DeleteSnapshot", pb.DeleteSnapshotRequest(
                volume_id=SOURCE, snapshot_id=SNAPSHOT))
        assert not (cluster.agents[node].data_dir / "replicas" / "volumes" / SOURCE).exists()
    for volume_id, nodes in ((RESTORED, ["a", "b", "c"]), (CLONE, ["b", "c"])):
        for node in nodes:
            cluster.agents[node].call("RemoveVolume", pb.RemoveVolumeRequest(volume_id=volume_id))
