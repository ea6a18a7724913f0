"""The operator for real: a real API server, real agents in network namespaces, real failures.

One cluster (three agents a, b, c in zones z1, z1, z2, the operator) serves the whole module;
each test uses its own objects. Tests that kill something restore it before they end. Nothing
here asserts a timing: waits are bounded and what is checked is where data and replicas end up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from replication_agent.proto import agent_pb2 as pb
from tests.controlplane.controlplane import ControlPlane, free_port
from tests.controlplane.operator_harness import (
    OperatorCluster,
    OperatorProcess,
    policy,
    started_cluster,
    volume,
)
from tests.integration.agent_harness import errno_of, tree_digest, wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

ZONE = "topology.kubernetes.io/zone"


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorCluster]:
    with started_cluster(control_plane, tmp_path_factory, "operator",
                         zones={"a": "z1", "b": "z1", "c": "z2"}) as cluster:
        yield cluster


def write(root: Path, name: str, size: int = 256 << 10, seed: int = 0) -> None:
    with open(root / name, "wb") as out:
        out.write(random.Random(seed).randbytes(size))
        out.flush()
        os.fsync(out.fileno())


def ready_volume(cluster: OperatorCluster, name: str, policy_name: str,
                 **spec: Any) -> dict[str, Any]:
    """Volume ``name`` on a new SyncPolicy ``policy_name`` (``spec``): its status once Ready."""
    cluster.apply(policy(policy_name, **spec))
    cluster.apply(volume(name, policy_name))
    cluster.wait_condition("sv", name, "Ready")
    status: dict[str, Any] = cluster.get("sv", name)["status"]
    return status


def replica_nodes(cluster: OperatorCluster, name: str) -> list[str]:
    status = cluster.get("sv", name).get("status") or {}
    return [r["node"] for r in status.get("replicas") or ()]


def test_volume_is_placed_replicated_and_ready(cluster: OperatorCluster) -> None:
    cluster.apply(policy("async-2", mode="Asynchronous", replicas=2, maxLag="1s",
                         placement={"topologyKey": ZONE}))
    cluster.wait_condition("sp", "async-2", "Ready")
    name = "vol-" + "01" * 12
    cluster.apply(volume(name, "async-2"))
    out = cluster.cp.kubectl("wait", "--for=condition=Ready", f"sv/{name}", "--timeout=120s",
                             check=False, timeout=130)
    assert out.returncode == 0, f"{out.stdout}{out.stderr}\n{cluster.operator.log_tail()}"
    status = cluster.get("sv", name)["status"]
    nodes = replica_nodes(cluster, name)
    # spread over zones: one replica in z2 (c), one in z1 (a or b)
    assert len(nodes) == 2, nodes
    assert "c" in nodes, nodes
    assert status["epoch"] == 1
    assert status["primary"] in nodes
    assert cluster.holders(name) == set(nodes)
    primary = status["primary"]
    [other] = [n for n in nodes if n != primary]
    live = cluster.agents.agents[primary].live(name)
    write(live, "data.bin", seed=1)
    cluster.apply({**volume(name, "async-2"), "metadata": {
        "name": name, "annotations": {"sharedsync.io/sync-now": "first"}}})
    wait_until(lambda: (cluster.get("sv", name)["status"].get("lastSyncNow") == "first"),
               timeout=120, what="sync-now handled")
    assert "sharedsync.io/sync-now" not in cluster.get("sv", name)["metadata"].get(
        "annotations", {})
    peer = cluster.agents.agents[other]
    wait_until(lambda: any((s / "data.bin").exists() for s in peer.sync_dir(name).iterdir()
                           if s.name.startswith("e")), timeout=60, what="data on the replica")
    printed = cluster.cp.kubectl("get", "sv", name).stdout
    assert "async-2" in printed, printed
    assert "2/2" in printed, printed
    # the policy's summary counts its volume (refreshed every few seconds)
    wait_until(lambda: (cluster.get("sp", "async-2").get("status") or {}).get("volumes", 0) >= 1,
               timeout=60, what="the policy counts its volume")
    # the operator's Prometheus endpoint reports its reconciles
    with urllib.request.urlopen(
            f"http://127.0.0.1:{cluster.operator.metrics_port}/metrics", timeout=10) as page:
        metrics = page.read().decode()
    assert 'sharedsync_operator_reconcile_duration_seconds_count{handler="volume_timer"}' \
        in metrics
    assert "sharedsync_operator_leader 1.0" in metrics


def test_policy_edits_reach_volumes_live(cluster: OperatorCluster) -> None:
    cluster.apply(policy("live-edit", mode="Asynchronous", replicas=2, maxLag="1s"))
    name = "vol-" + "02" * 12
    cluster.apply(volume(name, "live-edit"))
    cluster.wait_condition("sv", name, "Ready")
    # more replicas: a third appears and catches up
    cluster.apply(policy("live-edit", mode="Asynchronous", replicas=3, maxLag="1s"))
    wait_until(lambda: cluster.holders(name) == {"a", "b", "c"}, timeout=120,
               what="a third replica")
    cluster.wait_condition("sv", name, "Ready")
    # a mode change reaches every agent without remount
    cluster.apply(policy("live-edit", mode="Synchronous", replicas=3, writeQuorum=2))

    def synchronous_everywhere() -> bool:
        return all(cluster.agents.agents[n].volume(name).mode == pb.SYNCHRONOUS
                   for n in ("a", "b", "c"))
    wait_until(synchronous_everywhere, timeout=120, what="Synchronous on every agent")
    generation = cluster.get("sv", name)["metadata"]["generation"]
    assert cluster.get("sv", name)["status"]["observedGeneration"] == generation
    # fewer replicas: one goes away, never the primary
    primary = cluster.get("sv", name)["status"]["primary"]
    cluster.apply(policy("live-edit", mode="Synchronous", replicas=2, writeQuorum=2))
    wait_until(lambda: len(cluster.holders(name)) == 2, timeout=120, what="back to 2 replicas")
    assert primary in cluster.holders(name)


def test_bad_policies_are_reported_and_touch_nothing(cluster: OperatorCluster) -> None:
    cluster.apply(policy("bad-cron", mode="Scheduled", replicas=2, schedule="61 * * * *"))
    ready = cluster.wait_condition("sp", "bad-cron", "Ready", status="False")
    assert ready["reason"] == "InvalidSpec", ready
    assert "schedule" in ready["message"], ready
    cluster.apply(policy("no-nodes", replicas=2, placement={"nodeSelector": {"disk": "nvme"}}))
    ready = cluster.wait_condition("sp", "no-nodes", "Ready", status="False")
    assert ready["reason"] == "InsufficientNodes", ready
    cluster.apply(policy("too-many", replicas=4))
    ready = cluster.wait_condition("sp", "too-many", "Ready", status="False")
    assert ready["reason"] == "InsufficientNodes", ready
    # a volume of an unplaceable policy gets no replica anywhere, and says why
    name = "vol-" + "03" * 12
    cluster.apply(volume(name, "too-many"))
    ready = cluster.wait_condition("sv", name, "Ready", status="False")
    assert ready["reason"] == "InsufficientNodes", ready
    assert cluster.holders(name) == set()
    reasons = {e["reason"] for e in cluster.events("no-nodes")}
    assert "InsufficientNodes" in reasons, reasons


def test_switchover_moves_the_primary_with_nothing_lost(cluster: OperatorCluster) -> None:
    name = "vol-" + "04" * 12
    status = ready_volume(cluster, name, "switch", mode="Asynchronous", replicas=2, maxLag="1s")
    old, epoch = status["primary"], status["epoch"]
    [target] = [n for n in replica_nodes(cluster, name) if n != old]
    write(cluster.agents.agents[old].live(name), "before-switch.bin", seed=4)
    expected = tree_digest(cluster.agents.agents[old].live(name))
    cluster.cp.kubectl("annotate", "sv", name, f"sharedsync.io/switchover={target}")
    wait_until(lambda: cluster.get("sv", name)["status"]["primary"] == target, timeout=120,
               what="the primary moved")
    wait_until(lambda: cluster.agents.agents[target].volume(name).role == "primary",
               timeout=120, what="the target serves")
    assert cluster.get("sv", name)["status"]["epoch"] > epoch
    assert tree_digest(cluster.agents.agents[target].live(name)) == expected
    cluster.wait_condition("sv", name, "Ready")
    assert "sharedsync.io/switchover" not in (
        cluster.get("sv", name)["metadata"].get("annotations") or {})


def test_the_primary_follows_a_waiting_pod_once_none_uses_it_where_it_is(
        cluster: OperatorCluster) -> None:
    """A pod rescheduled onto another replica's node asks there (Attach is refused, which says
    a pod waits); the primary moves there only once no pod on its own node uses the volume."""
    cluster.apply(policy("follow", mode="Asynchronous", replicas=2, maxLag="1s"))
    name = "vol-" + "0f" * 12
    cluster.apply(volume(name, "follow"))
    cluster.wait_condition("sv", name, "Ready")
    old = cluster.get("sv", name)["status"]["primary"]
    [waiting] = [n for n in replica_nodes(cluster, name) if n != old]
    attach = pb.AttachRequest(volume_id=name)
    cluster.agents.agents[old].call("Attach", attach)  # a pod on the primary's node uses it
    with pytest.raises(grpc.RpcError) as refused:
        cluster.agents.agents[waiting].call("Attach", attach)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_until(lambda: any(r.get("node") == waiting for r in
                           cluster.get("sv", name)["status"].get("replicas") or ())
               and cluster.agents.agents[waiting].volume(name).attach_wanted, timeout=60,
               what="the waiting pod seen")
    # the operator polls every few seconds: give it several rounds to (wrongly) move
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert cluster.get("sv", name)["status"]["primary"] == old, "moved while in use"
        time.sleep(1)
    assert cluster.agents.agents[old].volume(name).attached
    cluster.agents.agents[old].call("Detach", pb.DetachRequest(volume_id=name))
    wait_until(lambda: cluster.get("sv", name)["status"]["primary"] == waiting, timeout=120,
               what="the primary moved to the waiting pod's node")
    wait_until(lambda: cluster.agents.agents[waiting].volume(name).role == "primary",
               timeout=120, what="the new primary serves")
    served = cluster.agents.agents[waiting].call("Attach", attach)  # kubelet's next retry
    assert os.path.ismount(served.path)
    cluster.agents.agents[waiting].call("Detach", pb.DetachRequest(volume_id=name))
    reasons = {e["reason"] for e in cluster.events(name)}
    assert {"FollowingConsumer", "Switchover"} <= reasons
    cluster.cp.kubectl("delete", "sv", name, "--wait=true", timeout=300)


def test_deleting_a_volume_removes_every_replica(cluster: OperatorCluster) -> None:
    cluster.apply(policy("deletable", replicas=3))
    name = "vol-" + "05" * 12
    cluster.apply(volume(name, "deletable"))
    cluster.wait_condition("sv", name, "Ready")
    assert cluster.holders(name) == {"a", "b", "c"}
    # a policy in use cannot go
    cluster.cp.kubectl("delete", "sp", "deletable", "--wait=false")
    ready = cluster.wait_condition("sp", "deletable", "Ready", status="False")
    assert ready["reason"] == "InUse", ready
    assert name in ready["message"], ready
    assert cluster.exists("sp", "deletable")
    cluster.cp.kubectl("delete", "sv", name, "--timeout=120s", timeout=130)
    assert cluster.holders(name) == set()
    wait_until(lambda: not cluster.exists("sp", "deletable"), timeout=60,
               what="the unused policy goes")


def test_operator_killed_mid_reconcile_converges_without_duplicates(
        cluster: OperatorCluster) -> None:
    cluster.apply(policy("crashy", mode="Asynchronous", replicas=2, maxLag="2s"))
    names = [f"vol-{i:02d}" + "6" * 22 for i in range(6)]
    for name in names:
        cluster.apply(volume(name, "crashy"))
    # kill as soon as the first volume has a layout: others are mid-reconcile
    wait_until(lambda: any(replica_nodes(cluster, n) for n in names), timeout=120,
               interval=0.05, what="a first placement")
    cluster.operator.kill()
    cluster.operator.start()
    for name in names:
        cluster.wait_condition("sv", name, "Ready", timeout=180)
    for name in names:
        nodes = replica_nodes(cluster, name)
        assert len(nodes) == 2, nodes
        assert len(set(nodes)) == 2, nodes
        assert cluster.holders(name) == set(nodes), (name, nodes, cluster.holders(name))
        primaries = [n for n in nodes
                     if cluster.agents.agents[n].volume(name).role == "primary"]
        assert len(primaries) == 1, (name, primaries)


def leader(cluster: OperatorCluster) -> str | None:
    done = cluster.cp.kubectl("get", "lease", "-n", "sharedsync-system", "sharedsync-operator",
                              "-o", "json", check=False)
    if done.returncode != 0:
        return None
    holder = json.loads(done.stdout)["spec"].get("holderIdentity")
    return str(holder) if holder else None


def test_two_operators_one_leader_and_takeover(cluster: OperatorCluster) -> None:
    wait_until(lambda: leader(cluster) == "op-1", timeout=60, what="op-1 leads")
    standby = OperatorProcess(cluster.workdir, cluster.operator_kubeconfig,
                              cluster.agents.client_tls["operator"], identity="op-2",
                              health_port=free_port()).start()

    def health() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{standby.health_port}/healthz",
                                    timeout=5) as page:
            return str(page.read().decode().strip())
    try:
        # a standby is alive while it waits: the kubelet must not restart it for waiting
        wait_until(lambda: health() == "standby", timeout=60, what="the standby's /healthz")
        assert leader(cluster) == "op-1"
        cluster.operator.kill()
        wait_until(lambda: leader(cluster) == "op-2", timeout=60, what="the standby takes over")
        wait_until(lambda: health() == "leader", timeout=60, what="the new leader's /healthz")
        cluster.apply(policy("after-takeover", replicas=2))
        name = "vol-" + "07" * 12
        cluster.apply(volume(name, "after-takeover"))
        cluster.wait_condition("sv", name, "Ready")
    finally:
        standby.stop()
        cluster.operator.start()


#: Events that say the operator moved or recreated a replica, or could not read the volume's
#: policy: none of them may follow a restart in which nothing about the cluster changed.
DISRUPTIVE_REASONS = {"ReplicaRemoved", "RebuildStarted", "Placed", "PolicyNotFound",
                      "Failover", "Switchover"}


def disruptive_events(cluster: OperatorCluster, names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        for event in cluster.events(name):
            if event["reason"] in DISRUPTIVE_REASONS:
                key = f"{name} {event['reason']}: {event['message']}"
                counts[key] = counts.get(key, 0) + int(event.get("count") or 1)
    return counts


def volume_timer_rounds(cluster: OperatorCluster) -> float:
    with urllib.request.urlopen(
            f"http://127.0.0.1:{cluster.operator.metrics_port}/metrics", timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith('sharedsync_operator_reconcile_duration_seconds_count'
                               '{handler="volume_timer"}'):
                return float(line.split()[-1])
    return 0.0


def test_a_restarted_operator_leaves_every_replica_where_it_is(
        cluster: OperatorCluster) -> None:
    # A new leader (a restart, or a standby taking over) starts with an empty view: nodes,
    # agent leases, policies and agent reports arrive on watches and polls of their own. A
    # volume reconciled before its replicas' nodes were known had those replicas dropped
    # from its layout and placed again as new ones, rebuilt from scratch; one whose policy
    # was not seen yet went NotReady. Nothing about the cluster changes across these
    # restarts, so nothing about any volume may either.
    cluster.apply(policy("steady-a", mode="Asynchronous", replicas=2, maxLag="2s"))
    cluster.apply(policy("steady-s", mode="Synchronous", replicas=3, writeQuorum=2))
    names = [f"vol-{i:02d}" + "5" * 22 for i in range(6)]
    for i, name in enumerate(names):
        cluster.apply(volume(name, "steady-a" if i % 2 else "steady-s"))
    for name in names:
        cluster.wait_condition("sv", name, "Ready", timeout=180)

    def layouts() -> dict[str, tuple[str, int, tuple[str, ...]]]:
        found = {}
        for name in names:
            status = cluster.get("sv", name)["status"]
            found[name] = (str(status["primary"]), int(status["epoch"]),
                           tuple(replica_nodes(cluster, name)))
        return found
    before, events_before = layouts(), disruptive_events(cluster, names)
    for _ in range(3):
        cluster.operator.kill()
        cluster.operator.start()
        # every volume's timer has run a few times in the new process
        wait_until(lambda: volume_timer_rounds(cluster) >= 3 * len(names), timeout=120,
                   interval=0.5, what="the restarted operator reconciles every volume")
        for name in names:
            assert cluster.condition("sv", name, "Ready").get("status") == "True", \
                (name, cluster.get("sv", name)["status"], cluster.operator.log_tail())
    assert layouts() == before
    assert disruptive_events(cluster, names) == events_before
    for name in names:
        assert cluster.holders(name) == set(before[name][2]), name


def test_primary_agent_killed_fails_over_and_old_primary_rejoins_fenced(
        cluster: OperatorCluster) -> None:
    name = "vol-" + "08" * 12
    status = ready_volume(cluster, name, "failover", mode="Asynchronous", replicas=3,
                          maxLag="1s", failover={"staleReplicaTimeout": "10m"})
    old, epoch = status["primary"], status["epoch"]
    write(cluster.agents.agents[old].live(name), "kept.bin", seed=8)
    cluster.cp.kubectl("annotate", "sv", name, "sharedsync.io/sync-now=before-kill")
    wait_until(lambda: cluster.get("sv", name)["status"].get("lastSyncNow") == "before-kill",
               timeout=120, what="synced before the kill")
    cluster.agents.agents[old].kill()
    try:
        wait_until(lambda: cluster.get("sv", name)["status"]["primary"] != old, timeout=120,
                   what="failover")
        status = cluster.get("sv", name)["status"]
        new = status["primary"]
        assert status["epoch"] > epoch
        wait_until(lambda: cluster.agents.agents[new].volume(name).role == "primary",
                   timeout=120, what="the new primary serves")
        assert (cluster.agents.agents[new].live(name) / "kept.bin").exists()
        states = {r["node"]: r["state"] for r in status["replicas"]}
        wait_until(lambda: {r["node"]: r["state"] for r in
                            cluster.get("sv", name)["status"]["replicas"]}[old] == "Stale",
                   timeout=60, what=f"the old primary Stale (was {states})")
        reasons = {e["reason"] for e in cluster.events(name)}
        assert "Failover" in reasons, reasons
    finally:
        cluster.agents.agents[old].start()
    # the old primary learns the newer epoch and rejoins as a replica
    wait_until(lambda: cluster.agents.agents[old].volume(name).role == "replica"
               and cluster.agents.agents[old].volume(name).epoch
               == cluster.get("sv", name)["status"]["epoch"], timeout=120,
               what="the old primary rejoins as a replica")
    cluster.wait_condition("sv", name, "Ready", timeout=180)


def appended_and_synced(fd: int) -> int | None:
    """Append a line to ``fd`` and fsync it: None when acknowledged, else the errno."""
    def append() -> None:
        os.write(fd, b"a line\n")
        os.fsync(fd)
    return errno_of(append)


@contextlib.contextmanager
def attached_file(cluster: OperatorCluster, node: str, name: str) -> Iterator[tuple[Path, int]]:
    """The volume served on ``node`` (as to a pod there) and a file held open in it."""
    agent = cluster.agents.agents[node]
    mount = Path(agent.call("Attach", pb.AttachRequest(volume_id=name)).path)
    fd = os.open(mount / "app.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        yield mount, fd
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        agent.call("Detach", pb.DetachRequest(volume_id=name))


def audit_times(cluster: OperatorCluster, node: str, name: str, kind: str,
                **details: object) -> list[int]:
    """When ``node``'s audit log recorded ``kind`` decisions about volume ``name``."""
    from replication_agent.audit import read_records
    files = [p for p in cluster.agents.audit_files(node) if p.exists()]
    return [r.time_ns for r in read_records(files) if r.volume == name and r.kind == kind
            and all(r.detail_map.get(k) == v for k, v in details.items())]


def test_a_primary_cut_off_from_everything_suspends_writes_until_it_is_back(
        cluster: OperatorCluster) -> None:
    """Its Lease lapses and no peer answers: it acknowledges no write (EROFS), across a
    restart of its agent too, until the API server and a peer at its epoch are back, then
    takes writes again, still primary. The operator is stopped, so nothing fails the volume
    over meanwhile."""
    name = "vol-" + "0d" * 12
    status = ready_volume(cluster, name, "isolated", mode="Asynchronous", replicas=2, maxLag="1s")
    primary, epoch = status["primary"], status["epoch"]
    agent = cluster.agents.agents[primary]
    cluster.operator.stop()
    try:
        with attached_file(cluster, primary, name) as (mount, fd):
            assert appended_and_synced(fd) is None
            with cluster.cut_off(primary):
                wait_until(lambda: appended_and_synced(fd) == errno.EROFS, timeout=60,
                           interval=0.2, what="writes suspended")
                assert agent.volume(name).replicas[0].message.startswith("writes suspended")
                assert errno_of(lambda: (mount / "new.bin").write_bytes(b"y")) == errno.EROFS
                # a restart keeps the suspension from its first moment (the state file)
                agent.stop()
                agent.start()
                assert agent.volume(name).replicas[0].message.startswith("writes suspended")
                mount = Path(agent.call("Attach", pb.AttachRequest(volume_id=name)).path)
                assert errno_of(lambda: (mount / "new.bin").write_bytes(b"y")) == errno.EROFS
            wait_until(lambda: errno_of(lambda: (mount / "new.bin").write_bytes(b"y")) is None,
                       timeout=60, interval=0.2, what="writes resumed")
            status_now = agent.volume(name)
            assert (status_now.role, status_now.epoch, status_now.fenced) == \
                ("primary", epoch, False)
            assert not status_now.replicas[0].message
    finally:
        cluster.operator.start()
    assert audit_times(cluster, primary, name, "suspend", suspended=True)
    assert audit_times(cluster, primary, name, "suspend", suspended=False)


def test_an_isolated_primary_stops_acknowledging_before_it_is_failed_over(
        cluster: OperatorCluster) -> None:
    """The operator fails over a primary whose Lease expired; that primary, cut off from the
    API server and its peer, suspended writes before: no write it acknowledged after the
    promotion is set aside when it rejoins (only those of the moments before its Lease
    lapsed can be). It then learns of the newer epoch and rejoins as a replica."""
    name = "vol-" + "0e" * 12
    status = ready_volume(cluster, name, "isolated-failover", mode="Asynchronous", replicas=2,
                          maxLag="1s", failover={"staleReplicaTimeout": "10m"})
    old, epoch = status["primary"], status["epoch"]
    with attached_file(cluster, old, name) as (_, fd):
        assert appended_and_synced(fd) is None
        with cluster.cut_off(old):
            wait_until(lambda: cluster.get("sv", name)["status"]["primary"] != old,
                       timeout=120, what="failover")
            assert appended_and_synced(fd) == errno.EROFS
        status = cluster.get("sv", name)["status"]
        new, new_epoch = status["primary"], status["epoch"]
        assert new_epoch > epoch
        [suspended_at] = audit_times(cluster, old, name, "suspend", suspended=True)
        promoted_at = min(audit_times(cluster, new, name, "promotion", epoch=new_epoch))
        assert suspended_at < promoted_at, "the old primary still took writes when promoted"
        wait_until(lambda: cluster.agents.agents[old].volume(name).role == "replica"
                   and cluster.agents.agents[old].volume(name).epoch == new_epoch,
                   timeout=120, what="the old primary rejoins as a replica")
        # a replica now: the volume is no longer served here (the mount is gone)
        assert appended_and_synced(fd) in (errno.EROFS, errno.ENOTCONN)
    cluster.wait_condition("sv", name, "Ready", timeout=180)


def bound_pod_of(cluster: OperatorCluster, namespace: str, selector: str,
                 node: str) -> dict[str, Any]:
    """The one pod matching ``selector`` once its controller made it, bound to ``node`` as
    the scheduler would and Running as its kubelet would say (there is no scheduler nor
    kubelet here: pods are API objects)."""
    def pods() -> list[dict[str, Any]]:
        out = cluster.cp.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
        items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
        return items
    wait_until(lambda: len(pods()) == 1, timeout=120, what=f"the pod of {selector}")
    [pod] = pods()
    name = pod["metadata"]["name"]
    binding = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
               "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
    cluster.cp.kubectl("create", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/binding",
                       "-f", "-", input=json.dumps(binding))
    cluster.cp.kubectl("patch", "pod", name, "-n", namespace, "--subresource=status",
                       "--type=merge", "-p", json.dumps({"status": {"phase": "Running"}}))
    [pod] = pods()
    assert pod["spec"]["nodeName"] == node
    return pod


@contextlib.contextmanager
def workloads_on(cluster: OperatorCluster, ns: str, volume_id: str,
                 node: str) -> Iterator[dict[str, dict[str, Any]]]:
    """In a new namespace ``ns``: a PersistentVolume and claim for ``volume_id``, and a
    StatefulSet ("db") and a Deployment ("web") whose one pod each mounts it, both bound to
    ``node``; yields those pods by app. Everything is deleted on leaving."""
    template = {"spec": {
        "containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}],
        "automountServiceAccountToken": False,
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}

    def workload(kind: str, app: str) -> dict[str, Any]:
        return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": app, "namespace": ns},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": app}},
                         "template": {"metadata": {"labels": {"app": app}}, **template},
                         **({"serviceName": app} if kind == "StatefulSet" else {})}}
    cluster.cp.kubectl("create", "namespace", ns)
    try:
        cluster.apply({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"pv-{ns}"},
             "spec": {"capacity": {"storage": "256Mi"}, "accessModes": ["ReadWriteOnce"],
                      "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                      "claimRef": {"namespace": ns, "name": "data"},
                      "csi": {"driver": "csi.sharedsync.io", "volumeHandle": volume_id}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
             "metadata": {"name": "data", "namespace": ns},
             "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                      "volumeName": f"pv-{ns}", "resources": {"requests": {"storage": "256Mi"}}}},
            workload("StatefulSet", "db"), workload("Deployment", "web")]})
        yield {app: bound_pod_of(cluster, ns, f"app={app}", node) for app in ("db", "web")}
    finally:
        for kind in ("statefulset/db", "deployment/web"):
            cluster.cp.kubectl("delete", kind, "-n", ns, "--wait=false", check=False)
        # no kubelet will ever confirm a graceful deletion
        cluster.cp.kubectl("delete", "pods", "--all", "-n", ns, "--force", "--grace-period=0",
                           check=False)
        cluster.cp.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        cluster.cp.kubectl("delete", "pv", f"pv-{ns}", "--wait=false", check=False)


def pod_json(cluster: OperatorCluster, ns: str, name: str) -> dict[str, Any] | None:
    out = cluster.cp.kubectl("get", "pod", name, "-n", ns, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def pod_events(cluster: OperatorCluster, ns: str, name: str, reason: str) -> list[dict[str, Any]]:
    out = cluster.cp.kubectl("get", "events", "-n", ns, "-o", "json", "--field-selector",
                             f"involvedObject.name={name},reason={reason}")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def operator_metrics(cluster: OperatorCluster) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.operator.metrics_port}/metrics",
                                timeout=10) as page:
        text: str = page.read().decode()
    return text


def test_a_lost_nodes_statefulset_pod_is_deleted_for_its_controller_to_replace(
        cluster: OperatorCluster) -> None:
    """strandedPodDeletion: StatefulSet. The node of a StatefulSet's pod and of a
    Deployment's pod, both mounting the volume, is lost (NotReady, its agent gone): the
    operator fails the volume over and force-deletes the StatefulSet's pod, which its
    controller then recreates; the Deployment's pod, which the policy does not cover, stays."""
    name = "vol-" + "1a" * 12
    status = ready_volume(cluster, name, "pods-on-loss", mode="Asynchronous", replicas=2,
                          maxLag="1s", failover={"staleReplicaTimeout": "10m",
                                                 "strandedPodDeletion": "StatefulSet"})
    victim = status["primary"]
    ns = "stranded"
    with workloads_on(cluster, ns, name, victim) as pods:
        db, web = pods["db"], pods["web"]
        cluster.agents.agents[victim].kill()
        cluster.set_node_ready(victim, False)
        try:
            def db_replaced() -> bool:
                now = pod_json(cluster, ns, "db-0")
                return now is not None and now["metadata"]["uid"] != db["metadata"]["uid"]
            wait_until(db_replaced, timeout=180, what="db-0 deleted and recreated; operator "
                                                      f"log:\n{cluster.operator.log_tail()}")
            assert cluster.get("sv", name)["status"]["primary"] != victim
            [deleted] = pod_events(cluster, ns, "db-0", "PodDeletedOnNodeLoss")
            assert deleted["type"] == "Warning"
            assert victim in deleted["message"]
            assert "StatefulSet" in deleted["message"]
            # the Deployment's pod was judged in the same pass and kept
            web_now = pod_json(cluster, ns, web["metadata"]["name"])
            assert web_now is not None
            assert web_now["metadata"]["uid"] == web["metadata"]["uid"]
            assert not web_now["metadata"].get("deletionTimestamp")
            assert "stranded pod kept" in cluster.operator.log_tail(400)
            [kept] = pod_events(cluster, ns, web["metadata"]["name"], "PodStranded")
            assert "ReplicaSet" in kept["message"]
            metrics = operator_metrics(cluster)
            assert 'sharedsync_operator_stranded_pods_deleted_total{owner_kind="StatefulSet",' \
                'reason="PodDeletedOnNodeLoss"} 1.0' in metrics
            assert 'owner_kind="ReplicaSet"' not in metrics
        finally:
            cluster.set_node_ready(victim, True)
            cluster.agents.agents[victim].start()
    cluster.wait_condition("sv", name, "Ready", timeout=180)


def test_pods_that_lost_their_volume_on_a_node_that_came_back_are_deleted(
        cluster: OperatorCluster) -> None:
    """strandedPodDeletion: StatefulSetAndDeployment. The primary's node is cut off long
    enough for a failover, but stays Ready (as when the network blip is shorter than the node
    grace period): when it is back, its replica is demoted under the pods that used the volume
    there (their mount no longer works). Its agent says since when; the operator deletes
    those pods gracefully (their kubelet is there), and Detach, as kubelet's unmount after
    them, clears the report."""
    name = "vol-" + "1b" * 12
    status = ready_volume(cluster, name, "pods-volume-moved", mode="Asynchronous", replicas=2,
                          maxLag="1s", failover={"staleReplicaTimeout": "10m",
                                                 "strandedPodDeletion": "StatefulSetAndDeployment"})
    old = status["primary"]
    agent = cluster.agents.agents[old]
    ns = "moved"
    with workloads_on(cluster, ns, name, old) as pods, attached_file(cluster, old, name):
        assert agent.volume(name).consumers_stranded_unix_ns == 0
        with cluster.cut_off(old):
            wait_until(lambda: cluster.get("sv", name)["status"]["primary"] != old,
                       timeout=120, what="failover")
        wait_until(lambda: agent.volume(name).role == "replica", timeout=120,
                   what="the old primary rejoins as a replica")
        stranded_at = agent.volume(name).consumers_stranded_unix_ns
        assert stranded_at > 0

        def deleting(app: str) -> bool:
            now = pod_json(cluster, ns, pods[app]["metadata"]["name"])
            return now is None or bool(now["metadata"].get("deletionTimestamp"))
        wait_until(lambda: deleting("db") and deleting("web"), timeout=120,
                   what=f"both pods deleted; operator log:\n{cluster.operator.log_tail()}")
        for app in ("db", "web"):
            [event] = pod_events(cluster, ns, pods[app]["metadata"]["name"],
                                 "PodDeletedVolumeMoved")
            assert name in event["message"]
            assert old in event["message"]
        # gracefully: the pods stay Terminating until their kubelet confirms (none here)
        assert pod_json(cluster, ns, pods["web"]["metadata"]["name"]) is not None
        # the report stands until the volume is let go here
        assert agent.volume(name).consumers_stranded_unix_ns == stranded_at
    # attached_file's Detach is kubelet's unmount after the pods: the report is cleared
    assert agent.volume(name).consumers_stranded_unix_ns == 0
    assert 'reason="PodDeletedVolumeMoved"} 1.0' in operator_metrics(cluster)
    cluster.wait_condition("sv", name, "Ready", timeout=180)


def test_lost_replica_is_replaced_after_the_stale_timeout(cluster: OperatorCluster) -> None:
    name = "vol-" + "09" * 12
    status = ready_volume(cluster, name, "replace", mode="Asynchronous", replicas=2,
                          maxLag="1s", failover={"staleReplicaTimeout": "5s"})
    [lost] = [n for n in replica_nodes(cluster, name) if n != status["primary"]]
    cluster.agents.agents[lost].kill()
    try:
        wait_until(lambda: lost not in replica_nodes(cluster, name)
                   and len(replica_nodes(cluster, name)) == 2, timeout=120,
                   what="a replacement replica")
        cluster.wait_condition("sv", name, "Ready", timeout=180)
        reasons = {e["reason"] for e in cluster.events(name)}
        assert "ReplicaReplaced" in reasons, reasons
    finally:
        cluster.agents.agents[lost].start()
    # the returning agent's leftover replica is removed (it is no longer in the layout)
    wait_until(lambda: lost not in cluster.holders(name), timeout=120,
               what="the stale copy removed")


def test_rebuild_annotation_recopies_a_replica(cluster: OperatorCluster) -> None:
    name = "vol-" + "0a" * 12
    status = ready_volume(cluster, name, "rebuildable", mode="Asynchronous", replicas=2,
                          maxLag="1s")
    primary = status["primary"]
    [replica] = [n for n in replica_nodes(cluster, name) if n != primary]
    write(cluster.agents.agents[primary].live(name), "precious.bin", seed=10)
    cluster.cp.kubectl("annotate", "sv", name, "sharedsync.io/sync-now=before-rebuild")
    wait_until(lambda: cluster.get("sv", name)["status"].get("lastSyncNow") == "before-rebuild",
               timeout=120, what="synced")
    received_before = cluster.agents.agents[replica].volume(name).bytes_received
    assert received_before > 0
    # the primary refuses to be rebuilt: switch over first
    cluster.cp.kubectl("annotate", "sv", name, f"sharedsync.io/rebuild={primary}")
    wait_until(lambda: "RebuildRefused" in {e["reason"] for e in cluster.events(name)},
               timeout=60, what="a refused rebuild of the primary")
    cluster.cp.kubectl("annotate", "sv", name, f"sharedsync.io/rebuild={replica}", "--overwrite")
    # the replica is recreated from nothing (its byte counter restarts) and copied afresh
    wait_until(lambda: "sharedsync.io/rebuild" not in (
        cluster.get("sv", name)["metadata"].get("annotations") or {}), timeout=120,
        what="the rebuild started")
    peer = cluster.agents.agents[replica]
    wait_until(lambda: any((s / "precious.bin").exists() for s in peer.sync_dir(name).iterdir()
                           if s.name.startswith("e")), timeout=120,
               what="the data copied afresh")
    cluster.wait_condition("sv", name, "Ready")
    reasons = {e["reason"] for e in cluster.events(name)}
    assert "RebuildStarted" in reasons, reasons
