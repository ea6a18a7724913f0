"""Nodes with btrfs and nodes on the ext4 fallback, sharing volumes.

A cluster may mix nodes whose kernel has btrfs with nodes whose kernel has not (the default
``storeFilesystem: auto`` picks per node). ext4 has no snapshots to send, so a volume with a
replica on an ext4 node replicates file by file everywhere: the operator sets
``VolumeSpec.file_level`` when it places such a volume, and btrfs replicas then run the
file-level engine too. test_agent_synchronous.py runs its whole suite on such a cluster; this
module checks the stores each node made, and what is refused, with the reason.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from replication_agent.proto import agent_pb2 as pb
from sharedsync.storage import mounts
from tests.integration.agent_harness import (
    AgentCluster,
    started_cluster,
    tree_digest,
    volume_spec,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

VOLUME = "vol-" + "3f" * 12
STORES = {"a": "btrfs", "b": "btrfs", "c": "ext4"}


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentCluster]:
    yield from started_cluster(tmp_path_factory, "mixedstore", STORES)


def live(cluster: AgentCluster, node: str) -> Path:
    return cluster.agents[node].live(VOLUME)


def replica_filesystem(cluster: AgentCluster, node: str) -> str:
    found = mounts.mounts_at(cluster.agents[node].data_dir / "replicas" / "mnt" / VOLUME)
    assert found, f"{node}: the replica is not mounted"
    return found[-1].fs_type


def test_a_file_level_volume_is_shared_by_btrfs_and_ext4_nodes(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, list(STORES), "a", mode=pb.SYNCHRONOUS, write_quorum=3)
    spec.file_level = True
    cluster.apply(spec)
    for node, filesystem in STORES.items():
        assert replica_filesystem(cluster, node) == filesystem
        assert cluster.agents[node].volume(VOLUME).store_filesystem == filesystem
    # Synchronous with a quorum of all three: once fsync returns, every node holds the data
    mount = Path(cluster.agents["a"].call("Attach", pb.AttachRequest(volume_id=VOLUME)).path)
    rng = random.Random(5)
    written = {f"file-{i}.bin": rng.randbytes(40 << 10) for i in range(6)}
    for name, data in written.items():
        with open(mount / name, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        for node in ("b", "c"):
            assert (live(cluster, node) / name).read_bytes() == data, f"{node}: {name}"
    # deletions and renames travel file by file too; no replica ships a snapshot stream
    (mount / "file-0.bin").unlink()
    (mount / "file-1.bin").rename(mount / "renamed.bin")
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=120)
    expected = tree_digest(live(cluster, "a"))
    wait_until(lambda: all(tree_digest(live(cluster, n)) == expected for n in ("b", "c")),
               timeout=60, what="b and c hold a's tree")
    assert not [p for n in STORES for p in cluster.agents[n].sync_dir(VOLUME).glob("e*")]
    wait_until(lambda: all(r.state == pb.IN_SYNC
                           for r in cluster.agents["a"].volume(VOLUME).replicas),
               timeout=60, what="every replica InSync in a's status")
    cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))


def test_a_snapshot_volume_with_an_ext4_replica_says_why_it_cannot_sync(
        cluster: AgentCluster) -> None:
    """What the operator's placement prevents, seen from the agents: a volume that ships
    btrfs snapshots cannot have a replica on ext4, and a's status says so."""
    cluster.apply(volume_spec(VOLUME, ["a", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    (live(cluster, "a") / "data").write_bytes(b"x" * 4096)

    def refused() -> bool:
        peer = next(r for r in cluster.agents["a"].volume(VOLUME).replicas if r.node == "c")
        return "same store filesystem" in peer.message

    wait_until(refused, timeout=60, what="a reports c's refusal")


def test_how_a_volume_replicates_is_fixed_when_it_is_made(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    spec.file_level = True
    with pytest.raises(grpc.RpcError) as changed:
        cluster.agents["a"].call("ApplyVolume", pb.ApplyVolumeRequest(spec=spec))
    assert changed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "file_level" in (changed.value.details() or "")
    block = volume_spec("vol-" + "3e" * 12, ["a", "b"], "a", mode=pb.ASYNCHRONOUS)
    block.kind, block.file_level = "block", True
    with pytest.raises(grpc.RpcError) as refused:
        cluster.agents["a"].call("ApplyVolume", pb.ApplyVolumeRequest(spec=block))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "file_level" in (refused.value.details() or "")
