"""The ext4 fallback store: three real agents whose replicas are ext4 filesystems.

Nodes whose kernel has no btrfs make their replicas ext4 (``storeFilesystem: ext4``, or
``auto``), and every filesystem volume there replicates file by file (the multi-writer engine:
inotify says when to scan, content digests say what changed). The file-level suites
(test_agent_multiwriter.py, test_agent_synchronous.py) run on both stores; this module checks
what is particular to the fallback: single-writer volumes, partitions, the digest scrub that
stands in for btrfs checksums, CSI snapshots as copies, and what it refuses.
"""

from __future__ import annotations

import random
import time
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
from tests.integration.test_agent_replication import _damage

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

VOLUME = "vol-" + "e4" * 12
NODES = ["a", "b", "c"]


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentCluster]:
    yield from started_cluster(tmp_path_factory, "ext4store", "ext4")


def live(cluster: AgentCluster, node: str) -> Path:
    return cluster.agents[node].live(VOLUME)


def write_files(root: Path, count: int, size: int, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    (root / "dir").mkdir(exist_ok=True)
    written = {}
    for i in range(count):
        rel = f"dir/file-{seed}-{i:03d}.bin"
        written[rel] = rng.randbytes(size)
        (root / rel).write_bytes(written[rel])
    return written


def same_as(cluster: AgentCluster, source: str, peers: list[str]) -> bool:
    expected = tree_digest(live(cluster, source))
    return all(tree_digest(live(cluster, p)) == expected for p in peers)


def test_replicas_are_ext4_and_a_single_writer_volume_replicates_file_by_file(
        cluster: AgentCluster) -> None:
    cluster.apply(volume_spec(VOLUME, NODES, "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    for node in NODES:
        mount_point = cluster.agents[node].data_dir / "replicas" / "mnt" / VOLUME
        found = mounts.mounts_at(mount_point)
        assert found, f"{node}: the replica is not mounted"
        assert found[-1].fs_type == "ext4", f"{node}: {found}"
    written = write_files(live(cluster, "a"), 12, 48 << 10, seed=1)
    wait_until(lambda: same_as(cluster, "a", ["b", "c"]), timeout=60,
               what="b and c hold a's files")
    for rel, data in written.items():
        assert (live(cluster, "c") / rel).read_bytes() == data
    # changes and deletions travel too, with no snapshot anywhere
    (live(cluster, "a") / "dir" / "file-1-000.bin").unlink()
    (live(cluster, "a") / "dir" / "file-1-001.bin").write_bytes(b"rewritten")
    wait_until(lambda: same_as(cluster, "a", ["b", "c"]), timeout=60, what="the second round")
    assert not [p for n in NODES for p in cluster.agents[n].sync_dir(VOLUME).glob("e*")]
    status = cluster.agents["a"].volume(VOLUME)
    assert status.role == "primary"
    assert status.store_filesystem == "ext4"
    assert not status.multi_writer  # replicated file by file, still served by one node
    wait_until(lambda: all(r.state == pb.IN_SYNC
                           for r in cluster.agents["a"].volume(VOLUME).replicas),
               timeout=60, what="every replica InSync in a's status")
    # only the primary serves a single-writer volume
    with pytest.raises(grpc.RpcError) as refused:
        cluster.agents["b"].call("Attach", pb.AttachRequest(volume_id=VOLUME))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_partitioned_replica_catches_up_after_heal(cluster: AgentCluster) -> None:
    cluster.apply(volume_spec(VOLUME, NODES, "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    write_files(live(cluster, "a"), 4, 32 << 10, seed=3)
    wait_until(lambda: same_as(cluster, "a", ["b", "c"]), timeout=60, what="initial sync")
    cluster.partition("c")
    write_files(live(cluster, "a"), 8, 32 << 10, seed=4)
    wait_until(lambda: same_as(cluster, "a", ["b"]), timeout=60, what="b has the new writes")
    assert not same_as(cluster, "a", ["c"])
    cluster.heal("c")
    wait_until(lambda: same_as(cluster, "a", ["b", "c"]), timeout=120, what="c caught up")


def test_scrub_finds_silent_corruption_by_digest_and_repairs_it_from_a_peer(
        cluster: AgentCluster) -> None:
    """ext4 checksums no data: a flipped byte on disk reads back without an error. The scrub
    re-reads every file whose stat says unchanged and compares its digest with the recorded one."""
    cluster.apply(volume_spec(VOLUME, NODES, "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    pattern = random.Random(16).randbytes(64 << 10)
    (live(cluster, "a") / "victim").write_bytes(pattern)
    (live(cluster, "a") / "bystander").write_bytes(b"untouched")
    wait_until(lambda: same_as(cluster, "a", ["b", "c"]), timeout=60, what="sync")
    # a stat is trusted only once the file is older than the racy window after its last hash
    time.sleep(2.5)
    cluster.agents["b"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=120)
    assert cluster.agents["b"].call("Scrub", pb.ScrubRequest(volume_id=VOLUME)).errors == 0
    image = cluster.agents["b"].data_dir / "replicas" / "volumes" / VOLUME / "image"
    assert _damage(image, pattern) >= 16
    assert (live(cluster, "b") / "victim").read_bytes() != pattern  # read back, no EIO
    result = cluster.agents["b"].call("Scrub", pb.ScrubRequest(volume_id=VOLUME))
    assert result.errors == 1
    assert list(result.repaired_files) == ["victim"]
    assert (live(cluster, "b") / "victim").read_bytes() == pattern
    assert (live(cluster, "b") / "bystander").read_bytes() == b"untouched"
    assert cluster.agents["b"].call("Scrub", pb.ScrubRequest(volume_id=VOLUME)).errors == 0
    # the damage never travelled: the peers still hold the good copy
    for node in ("a", "c"):
        assert (live(cluster, node) / "victim").read_bytes() == pattern


def test_a_csi_snapshot_is_a_copy_of_the_data_as_it_was(cluster: AgentCluster) -> None:
    cluster.apply(volume_spec(VOLUME, NODES, "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    written = write_files(live(cluster, "a"), 3, 16 << 10, seed=7)
    snapshot_id = "snap-" + "e4" * 12
    cluster.agents["a"].call("CreateSnapshot", pb.CreateSnapshotRequest(
        volume_id=VOLUME, snapshot_id=snapshot_id), timeout=120)
    (live(cluster, "a") / "dir" / "file-7-000.bin").write_bytes(b"after the snapshot")
    folder = cluster.agents["a"].data_dir / "replicas" / "mnt" / VOLUME / "snapshots" / snapshot_id
    for rel, data in written.items():
        assert (folder / rel).read_bytes() == data
    listed = [s.snapshot_id for s in cluster.agents["a"].volume(VOLUME).snapshots]
    assert snapshot_id in listed
    cluster.agents["a"].call("DeleteSnapshot", pb.DeleteSnapshotRequest(
        volume_id=VOLUME, snapshot_id=snapshot_id))
    assert not folder.exists()


def test_what_the_fallback_refuses_says_why(cluster: AgentCluster) -> None:
    block = volume_spec("vol-" + "e5" * 12, ["a"], "a")
    block.kind = "block"
    with pytest.raises(grpc.RpcError) as refused:
        cluster.agents["a"].call("ApplyVolume", pb.ApplyVolumeRequest(spec=block))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "btrfs" in (refused.value.details() or "")


def test_writes_through_the_pod_mount_are_noticed_without_a_full_walk(
        cluster: AgentCluster) -> None:
    """Pods write through the FUSE mount (kernel passthrough: the writes never reach the
    daemon); inotify on the replica must still see them, well before the once-a-minute walk."""
    cluster.apply(volume_spec(VOLUME, NODES, "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    mount = Path(cluster.agents["a"].call("Attach", pb.AttachRequest(volume_id=VOLUME)).path)
    first = random.Random(21).randbytes(200 << 10)
    with open(mount / "written-by-a-pod", "wb") as out:
        out.write(first)
    wait_until(lambda: same_as(cluster, "a", ["b", "c"]), timeout=20, what="the new file")
    # an in-place write to a file kept open: no create, no close in between
    with open(mount / "written-by-a-pod", "r+b") as out:
        out.seek(1000)
        out.write(b"in place")
        out.flush()
        expected = first[:1000] + b"in place" + first[1008:]
        wait_until(lambda: (live(cluster, "b") / "written-by-a-pod").read_bytes() == expected,
                   timeout=20, what="the in-place write, with the file still open")
    cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))
