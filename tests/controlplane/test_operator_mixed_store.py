"""The operator on a cluster whose nodes keep replicas on different stores.

Node c's agent stores on the ext4 fallback (a kernel without btrfs); a and b store on btrfs.
Each agent says which in its Lease; the operator places a volume on btrfs nodes when enough of
them can hold it (it then ships btrfs snapshots) and makes a volume that needs c replicate file
by file everywhere (operator/API.md, "Mixed stores"). Real API server, operator and agents.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controlplane.controlplane import ControlPlane
from tests.controlplane.operator_harness import (
    NAMESPACE,
    OperatorCluster,
    policy,
    started_cluster,
    volume,
)
from tests.integration.agent_harness import tree_digest, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

STORES = {"a": "btrfs", "b": "btrfs", "c": "ext4"}


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorCluster]:
    with started_cluster(control_plane, tmp_path_factory, "mixedstore", node_config={
            node: {"storeFilesystem": fs} for node, fs in STORES.items()}) as cluster:
        yield cluster


def ready(cluster: OperatorCluster, name: str) -> dict[str, object]:
    out = cluster.cp.kubectl("wait", "--for=condition=Ready", f"sv/{name}", "--timeout=180s",
                             check=False, timeout=190)
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n{cluster.operator.log_tail()}"
    status: dict[str, object] = cluster.get("sv", name)["status"]
    return status


def write(root: Path, name: str, seed: int) -> None:
    with open(root / name, "wb") as out:
        out.write(random.Random(seed).randbytes(128 << 10))
        out.flush()
        os.fsync(out.fileno())


def test_agents_announce_their_store(cluster: OperatorCluster) -> None:
    for node, filesystem in STORES.items():
        lease = json.loads(cluster.cp.kubectl(
            "get", "lease", f"sharedsync-agent-{node}", "-n", NAMESPACE, "-o", "json").stdout)
        assert lease["metadata"]["annotations"]["sharedsync.io/store-filesystem"] == filesystem


def test_a_volume_that_fits_on_btrfs_nodes_ships_snapshots(cluster: OperatorCluster) -> None:
    cluster.apply(policy("two", mode="Asynchronous", replicas=2, maxLag="1s"))
    cluster.wait_condition("sp", "two", "Ready")
    name = "vol-" + "b7" * 12
    cluster.apply(volume(name, "two", consumerNode="c"))
    status = ready(cluster, name)
    assert status["replication"] == "Snapshots"
    # a pod on c would have had the first replica (dataLocality), but c cannot receive btrfs
    # streams, and two btrfs nodes can hold the volume
    assert sorted(r["node"] for r in status["replicas"]) == ["a", "b"]  # type: ignore[attr-defined]


def test_a_volume_that_needs_the_ext4_node_replicates_file_by_file(
        cluster: OperatorCluster) -> None:
    cluster.apply(policy("three", mode="Asynchronous", replicas=3, maxLag="1s"))
    cluster.wait_condition("sp", "three", "Ready")
    name = "vol-" + "e7" * 12
    cluster.apply(volume(name, "three"))
    status = ready(cluster, name)
    assert status["replication"] == "Files"
    wide = cluster.cp.kubectl("get", "sv", name, "-o", "wide").stdout
    assert "REPLICATION" in wide, wide
    assert "Files" in wide, wide
    primary = str(status["primary"])
    agents = cluster.agents.agents
    for node in STORES:
        assert agents[node].volume(name).store_filesystem == STORES[node]
    write(agents[primary].live(name), "data.bin", seed=3)
    expected = tree_digest(agents[primary].live(name))
    wait_until(lambda: all(tree_digest(agents[n].live(name)) == expected for n in STORES),
               timeout=120, what="every replica holds the primary's files")
    wait_until(lambda: all(r["state"] == "InSync" for r in cluster.get("sv", name)["status"][
        "replicas"]), timeout=120, what="every replica InSync")
