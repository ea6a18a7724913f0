"""The product on a cluster of real nodes: the eight scenarios of the local-cluster issue.

They run in order on one cluster (``cluster`` fixture, tests/e2e/conftest.py): scenario 1
installs the chart the others use, scenario 8 removes everything and checks the nodes. Each
scenario's workloads stay in the namespace ``sharedsync-e2e`` until scenario 8 deletes them
(that is part of what it checks), and a scenario depends on no other one's data, so a single
scenario runs alone with ``-k`` (the chart is installed for it).

Data is written and verified inside pods (tests/e2e/workloads.py: checksummed records, each
fsync'd before it is acknowledged). Waits are bounded generously to stop a hung run; nothing
asserts how long anything took. The bandwidth check of scenario 7 bounds a rate, which is what
a cap promises.
"""

from __future__ import annotations

import functools
import getpass
import json
import re
import secrets
import subprocess
import tempfile
import time
from typing import Any

import pytest

from . import workloads as w
from .kube import (
    DRIVER,
    NAMESPACE,
    RELEASE,
    RecordWriter,
    all_in_sync,
    condition,
    describe,
    exec_sh,
    get,
    items,
    metric,
    must_get,
    node_pod,
    node_ready,
    operator_leader_node,
    pod_ready,
    scrape,
    shared_volume,
    verify_records,
    volume_of_claim,
    wait_for,
    wait_pod_ready,
    write_records,
)
from .providers import REPO_ROOT, Cluster

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

NS = "sharedsync-e2e"
SYNC_CLASS = "sharedsync-sync"
SNAPSHOT_CLASS = "sharedsync"
DEFAULT_POLICIES = ("sharedsync-sync", "sharedsync-async", "sharedsync-scheduled")
#: SyncPolicies and StorageClasses the scenarios add (same name for both)
E2E_PREFIX = "e2e-"
RECORDS = "/data/records.log"
#: a run's record tags are unique, so records of an earlier run (kept cluster) never count
RUN = secrets.token_hex(2)
#: Where pytest keeps every run's temporary directories on this host (other tiers mount there).
PYTEST_TEMP_ROOT = f"{tempfile.gettempdir()}/pytest-of-{getpass.getuser()}/"

Obj = dict[str, Any]


# -- session fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def release(cluster: Cluster) -> str:
    """Scenario 1's install (or upgrade, on a kept cluster), waiting for every workload."""
    cluster.helm("upgrade", "--install", RELEASE, str(REPO_ROOT / "charts"), "--namespace",
                 NAMESPACE, "--create-namespace", "--values", str(cluster.values_file),
                 "--wait", "--timeout", "15m", timeout=1000)
    return RELEASE


@pytest.fixture(scope="session")
def ns(cluster: Cluster, release: str) -> str:
    """The workloads' namespace, fresh: what an earlier run on a kept cluster left is
    removed first (with the operator running, so its volumes go too)."""
    remove_workloads(cluster)
    cluster.kubectl("create", "namespace", NS)
    return NS


def remove_workloads(cluster: Cluster) -> None:
    """Delete the e2e namespace, wait for its volumes to go, then the e2e policies."""
    cluster.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=false")
    wait_for(f"namespace {NS} gone",
             lambda: get(cluster, "namespace", NS) is None, timeout=900)
    wait_for("every sharedsync PV gone", lambda: not [
        pv for pv in items(cluster, "pv")
        if pv["spec"].get("csi", {}).get("driver") == DRIVER], timeout=900)
    wait_for("every SharedVolume gone",
             lambda: not items(cluster, "sharedvolumes.sharedsync.io"), timeout=900)
    # kubelet unstages a volume (through our node plugin) a little after its pod is gone, and
    # independently of the PV's deletion: as the chart's README says, uninstall only after
    wait_for("every kubelet released our volumes", lambda: not volumes_in_use(cluster),
             timeout=600)
    wait_for("every SharedVolumeSnapshot gone",
             lambda: not items(cluster, "sharedvolumesnapshots.sharedsync.io"), timeout=900)
    for kind in ("storageclass", "syncpolicies.sharedsync.io"):
        names = [o["metadata"]["name"] for o in items(cluster, kind)
                 if o["metadata"]["name"].startswith(E2E_PREFIX)]
        if names:
            cluster.kubectl("delete", kind, *names, "--wait=true", timeout=300)


def volumes_in_use(cluster: Cluster) -> list[str]:
    """Our volumes some kubelet still has mounted (a node's status.volumesInUse)."""
    return [f"{node['metadata']['name']}: {volume}" for node in items(cluster, "nodes")
            for volume in node.get("status", {}).get("volumesInUse") or ()
            if f"/{DRIVER}^" in volume]


# -- helpers -------------------------------------------------------------------------------------


def policy_ready(cluster: Cluster, name: str) -> bool:
    return condition(must_get(cluster, "syncpolicies.sharedsync.io", name), "Ready") == "True"


def add_policy(cluster: Cluster, name: str, spec: Obj) -> str:
    """A SyncPolicy and its StorageClass (same name); returns once the policy is Ready."""
    assert name.startswith(E2E_PREFIX)
    cluster.apply([w.sync_policy(name, spec), w.storage_class(name, name)])
    wait_for(f"SyncPolicy {name} Ready", functools.partial(policy_ready, cluster, name),
             timeout=180)
    return name


def image(cluster: Cluster) -> w.Image:
    return w.Image(cluster.workload_image, cluster.workload_pull_policy)


def node_of(cluster: Cluster, pod: str) -> str:
    return str(must_get(cluster, "pod", pod, NS)["spec"]["nodeName"])


def wait_volume_in_sync(cluster: Cluster, volume: str, replicas: int | None = None,
                        timeout: float = 600) -> Obj:
    found: list[Obj] = []

    def synced() -> bool:
        sv = shared_volume(cluster, volume)
        found.append(sv)
        return all_in_sync(sv, replicas)

    try:
        wait_for(f"SharedVolume {volume} Ready with every replica InSync", synced, timeout)
    except AssertionError as exc:
        last = json.dumps(found[-1].get("status"), indent=1) if found else "(never read)"
        raise AssertionError(f"{exc}\nlast status: {last}") from None
    return found[-1]


def mount_of(cluster: Cluster, pod: str, path: str) -> str:
    """The pod's mountinfo line of ``path``: its mount id changes if it is remounted."""
    out = exec_sh(cluster, NS, pod, "grep \" $1 \" /proc/self/mountinfo", path)
    lines = out.splitlines()
    assert len(lines) == 1, f"{pod}: mounts at {path}: {lines}"
    return lines[0]


def df_bytes(cluster: Cluster, pod: str, path: str) -> int:
    """The size of the filesystem at ``path`` as the pod's df sees it."""
    out = exec_sh(cluster, NS, pod, "df -k \"$1\" | tail -n 1", path)
    return int(out.split()[1]) * 1024


def quantity_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text)
    assert match, text
    return int(match[1]) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[match[2]]


@pytest.fixture
def tag(request: pytest.FixtureRequest) -> str:
    """A record tag unique to this run and scenario ("<run>s<scenario>")."""
    return f"{RUN}s{request.node.name.split('_')[1]}"


# -- 1. install ----------------------------------------------------------------------------------


@pytest.mark.timeout(3600)  # the session's cluster start (a cold `scripts/cluster up`) is in it
def test_1_helm_install_every_pod_ready_every_node_registered(cluster: Cluster,
                                                              release: str) -> None:
    nodes = cluster.storage_nodes()
    assert len(nodes) >= 3, f"the scenarios need 3 nodes, the cluster has {nodes}"

    def pods_ready() -> bool:
        pods = items(cluster, "pods", "-l", f"app.kubernetes.io/instance={release}",
                     namespace=NAMESPACE)
        running = [p for p in pods  # not the `helm test` pod
                   if p["metadata"]["labels"].get("app.kubernetes.io/component") != "test"]
        return bool(running) and all(pod_ready(p) for p in running)
    wait_for("every sharedsync pod Ready", pods_ready, timeout=300)
    pods = items(cluster, "pods", "-l", f"app.kubernetes.io/instance={release}",
                 namespace=NAMESPACE)
    components = [p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods]
    assert sorted({p["spec"]["nodeName"] for p in pods
                   if p["metadata"]["labels"].get("app.kubernetes.io/component") == "node"}
                  ) == nodes
    assert components.count("operator") >= 1, components
    assert components.count("csi-controller") >= 1, components

    def registered(node: str) -> bool:
        csinode = get(cluster, "csinode", node)
        drivers = (csinode or {}).get("spec", {}).get("drivers") or []
        return any(d["name"] == DRIVER for d in drivers)
    for node in nodes:
        wait_for(f"CSINode {node} lists {DRIVER}", functools.partial(registered, node),
                 timeout=180)
    for policy in DEFAULT_POLICIES:
        wait_for(f"SyncPolicy {policy} Ready", functools.partial(policy_ready, cluster, policy),
                 timeout=180)

    # the chart's own smoke test: a pod writes and reads a fresh volume
    done = cluster.helm("test", release, "--namespace", NAMESPACE, "--timeout", "10m",
                        check=False, timeout=700)
    assert done.returncode == 0, done.stdout + done.stderr


# -- 2. StatefulSet ------------------------------------------------------------------------------


def test_2_statefulset_pods_spread_and_a_deleted_pod_keeps_its_data(
        cluster: Cluster, ns: str, tag: str) -> None:
    name = "journal"
    cluster.apply(w.statefulset(name, ns, SYNC_CLASS, replicas=3, image=image(cluster)))
    pods = [f"{name}-{i}" for i in range(3)]
    for pod in pods:
        wait_pod_ready(cluster, ns, pod, timeout=900)
    placed = {pod: node_of(cluster, pod) for pod in pods}
    assert len(set(placed.values())) == 3, f"pods share nodes: {placed}"

    acked = {pod: write_records(cluster, ns, pod, RECORDS, f"{tag}{pod}", 20) for pod in pods}
    for i, pod in enumerate(pods):
        sv = shared_volume(cluster, volume_of_claim(cluster, ns, f"data-{name}-{i}"))
        assert sv["status"].get("mode") == "Synchronous", sv["status"]
        # only the primary's agent serves a volume: the pod runs where its primary is
        assert sv["status"].get("primary") == placed[pod], (pod, placed[pod], sv["status"])

    victim = pods[1]
    old_uid = must_get(cluster, "pod", victim, ns)["metadata"]["uid"]
    cluster.kubectl("delete", "pod", victim, "-n", ns, "--wait=false")
    wait_pod_ready(cluster, ns, victim, timeout=600, other_than=old_uid)
    verify_records(cluster, ns, victim, RECORDS).assert_holds(acked[victim], victim)
    more = write_records(cluster, ns, victim, RECORDS, f"{tag}{victim}again", 5)
    verify_records(cluster, ns, victim, RECORDS).assert_holds(acked[victim] | more, victim)
    for pod in pods:
        if pod != victim:
            verify_records(cluster, ns, pod, RECORDS).assert_holds(acked[pod], pod)


# -- 3. ReadWriteMany ----------------------------------------------------------------------------


def concurrent_write(cluster: Cluster, pods: dict[str, str], path: str) -> None:
    """Each pod writes its own version of one file at the same moment, and fsyncs it."""
    script = 'printf "%s\\n" "$2" > "$1" && sync "$1"'
    procs = [subprocess.Popen(
        cluster.kubectl_command("exec", "-n", NS, pod, "--", "sh", "-c", script, "sh", path,
                                version),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for pod, version in pods.items()]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out


def versions_seen(cluster: Cluster, pod: str, directory: str, stem: str) -> list[str]:
    """The contents of every file in ``directory`` whose name starts with ``stem`` (a
    KeepBoth copy has a name of its own), sorted."""
    out = exec_sh(cluster, NS, pod, 'for f in "$1"/"$2"*; do [ -f "$f" ] && cat "$f"; done; '
                  'true', directory, stem)
    return sorted(line for line in out.splitlines() if line)


def mount_refusals(cluster: Cluster, namespace: str, pod: str) -> list[str]:
    """The pod's FailedMount events in which an agent refused to serve a volume because
    another node holds its primary."""
    events = items(cluster, "events", "--field-selector",
                   f"involvedObject.kind=Pod,involvedObject.name={pod}", namespace=namespace)
    return [e.get("message", "") for e in events if e.get("reason") == "FailedMount"
            and "is served by" in e.get("message", "")]


def wait_second_node_mounts(cluster: Cluster, namespace: str, pod: str) -> None:
    """Wait for the second RWX pod; fail early, naming the cause, when the volumes' agents
    keep refusing to serve them on its node (only the primary's node can mount a volume)."""
    deadline = time.monotonic() + 900
    refused_since: float | None = None
    while not pod_ready(get(cluster, "pod", pod, namespace)):
        refusals = mount_refusals(cluster, namespace, pod)
        if refusals and refused_since is None:
            refused_since = time.monotonic()
        if refused_since is not None and time.monotonic() - refused_since > 120:
            raise AssertionError(
                f"{pod} on {node_of(cluster, pod)} cannot mount its ReadWriteMany volumes: "
                "their agents serve a volume only on its primary's node, so a second node "
                f"never mounts it:\n" + "\n".join(sorted(set(refusals))))
        assert time.monotonic() < deadline, describe(cluster, "pod", pod, namespace)
        time.sleep(2)


def holds_all(cluster: Cluster, pod: str, path: str, acked: set[str]) -> bool:
    return acked <= verify_records(cluster, NS, pod, path).ok


def test_3_read_write_many_across_nodes(cluster: Cluster, ns: str, tag: str) -> None:
    lww = add_policy(cluster, "e2e-rwx-lww", {"mode": "Asynchronous", "replicas": 3,
                                              "maxLag": "5s"})
    keep = add_policy(cluster, "e2e-rwx-keepboth", {
        "mode": "Asynchronous", "replicas": 3, "maxLag": "5s", "conflictResolution": "KeepBoth"})
    claims = {"/sync": ("rwx-sync", SYNC_CLASS), "/lww": ("rwx-lww", lww),
              "/keep": ("rwx-keep", keep)}
    cluster.apply([w.claim(c, ns, cls, access_mode="ReadWriteMany")
                   for c, cls in claims.values()])
    mounts = {path: c for path, (c, _) in claims.items()}
    # three replicas each: every node holds every volume, so the second pod may go anywhere
    # but the first one's node
    cluster.apply([w.pod("rwx-a", ns, mounts, app="rwx", anti_affinity_with="rwx",
                         image=image(cluster))])
    wait_pod_ready(cluster, ns, "rwx-a", timeout=900)
    cluster.apply([w.pod("rwx-b", ns, mounts, app="rwx", anti_affinity_with="rwx",
                         image=image(cluster))])
    wait_second_node_mounts(cluster, ns, "rwx-b")
    assert node_of(cluster, "rwx-a") != node_of(cluster, "rwx-b")

    # Each claim below is checked and recorded; the scenario fails at the end with the list of
    # those that do not hold, so one run shows the state of every one of them.
    problems: list[str] = []

    # Synchronous policy: what one node fsync'd, the other reads right away: an fsync on a
    # multi-writer volume returns once the write quorum, and every other reachable node, merged
    # it. Read at once, without waiting: a record missing here is a broken promise.
    for writer, reader in (("rwx-a", "rwx-b"), ("rwx-b", "rwx-a")):
        path = f"/sync/records-{writer}.log"
        acked = write_records(cluster, ns, writer, path, f"{tag}{writer}", 10)
        found = verify_records(cluster, ns, reader, path)
        try:
            found.assert_holds(acked, f"{reader}, right after {writer}'s fsyncs (Synchronous)")
        except AssertionError as exc:
            problems.append(str(exc))

    # Asynchronous: the other node reads it within maxLag (bounded generously: not a timing
    # assertion)
    acked = write_records(cluster, ns, "rwx-a", "/lww/records.log", f"{tag}a", 10)
    wait_for("rwx-b reads rwx-a's Asynchronous records",
             functools.partial(holds_all, cluster, "rwx-b", "/lww/records.log", acked),
             timeout=180)
    verify_records(cluster, ns, "rwx-b", "/lww/records.log").assert_holds(acked, "rwx-b")

    # one file, two writers at once
    versions = {"rwx-a": f"version-a-{tag}", "rwx-b": f"version-b-{tag}"}
    for directory in ("/sync", "/lww", "/keep"):
        concurrent_write(cluster, versions, f"{directory}/conflict.txt")

    def converged(directory: str) -> list[str] | None:
        # "conflict*": the file and, under KeepBoth, the loser's conflict copy
        seen = [versions_seen(cluster, pod, directory, "conflict") for pod in versions]
        return seen[0] if seen[0] == seen[1] and seen[0] else None

    everything = sorted(versions.values())
    seen: dict[str, list[str]] = {}

    def same_on_both(directory: str) -> bool:
        found = converged(directory)
        if found is not None:
            seen[directory] = found
        return found is not None
    for directory in ("/sync", "/lww", "/keep"):
        wait_for(f"both nodes see the same {directory}/conflict*",
                 functools.partial(same_on_both, directory), timeout=300)
    # LastWriterWins (the default, on /sync and /lww): one whole version wins everywhere
    for directory in ("/sync", "/lww"):
        if len(seen[directory]) != 1 or seen[directory][0] not in everything:
            problems.append(f"LastWriterWins {directory}: {seen[directory]}, not one of "
                            f"{everything}")
    # ... and the loss is not silent: the conflict is counted on the SharedVolume
    lww_volume = volume_of_claim(cluster, ns, "rwx-lww")

    def conflicts() -> int:
        status = shared_volume(cluster, lww_volume).get("status", {})
        return int(status.get("conflicts") or 0)
    try:
        wait_for("the LastWriterWins conflict counted on its SharedVolume",
                 lambda: conflicts() >= 1, timeout=180)
    except AssertionError:
        problems.append(f"LastWriterWins /lww: the overwritten version left no trace "
                        f"(status.conflicts {conflicts()})")
    # KeepBoth: both versions are there, on both nodes
    if seen["/keep"] != everything:
        problems.append(f"KeepBoth /keep: {seen['/keep']}, not both of {everything}")
    assert not problems, "\n".join(problems)


# -- 4. node loss --------------------------------------------------------------------------------


def test_4_node_loss_promotes_and_the_pod_moves_with_every_acknowledged_write(
        cluster: Cluster, ns: str, tag: str) -> None:
    # Two replicas, both needed for an fsync, so every acknowledged write is on the node that
    # survives; onQuorumLoss: Continue lets the survivor take writes alone. With two replicas
    # the volume's PV allows exactly the two replica nodes, so the replacement pod can only
    # land on the promoted one. strandedPodDeletion: StatefulSet has the operator delete the
    # pod stranded on the dead node, which nothing else in the cluster would.
    policy = add_policy(cluster, "e2e-failover", {
        "mode": "Synchronous", "replicas": 2, "writeQuorum": 2,
        "failover": {"onQuorumLoss": "Continue", "strandedPodDeletion": "StatefulSet"}})
    name = "failover"
    # The hardest case: the pod (so the primary, placed where its consumer is) starts on the
    # node of the operator's leader, so one power cut takes both, and the standby operator must
    # take the lead and fail the volume over.
    docs = w.statefulset(name, ns, policy, replicas=1, image=image(cluster))
    docs[-1]["spec"]["template"]["spec"].setdefault("affinity", {})["nodeAffinity"] = {
        "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {
            "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                                  "values": [operator_leader_node(cluster)]}]}}]}
    cluster.apply(docs)
    pod = f"{name}-0"
    wait_pod_ready(cluster, ns, pod, timeout=900)
    volume = volume_of_claim(cluster, ns, f"data-{pod}")
    sv = wait_volume_in_sync(cluster, volume, 2)
    victim = sv["status"]["primary"]
    assert victim == node_of(cluster, pod), sv["status"]
    acked = write_records(cluster, ns, pod, RECORDS, f"{tag}before", 20)
    # read before the kill: the operator may replace the pod before the test sees NotReady
    old_uid = must_get(cluster, "pod", pod, ns)["metadata"]["uid"]

    killed = False
    try:
        writer = RecordWriter(cluster, ns, pod, RECORDS, f"{tag}during")
        try:
            writer.wait_acks(5)
            cluster.kill_node(victim)
            killed = True
            wait_for(f"node {victim} NotReady", lambda: not node_ready(cluster, victim),
                     timeout=600)
        finally:
            acked |= writer.stop()

        # A pod on a dead node is never replaced by its StatefulSet on its own: the
        # controller waits for the kubelet to confirm it is gone, which a dead kubelet never
        # does (the StatefulSet's at-most-one guarantee). The policy has the operator delete
        # it once the node is lost (NotReady, its agent's Lease expired); nothing here does.

        def promoted() -> bool:
            status = shared_volume(cluster, volume).get("status", {})
            return bool(status.get("primary")) and status["primary"] != victim
        wait_for(f"{volume} promoted off {victim}", promoted, timeout=600)
        new_primary = shared_volume(cluster, volume)["status"]["primary"]
        wait_pod_ready(cluster, ns, pod, timeout=900, other_than=old_uid)
        assert node_of(cluster, pod) == new_primary
        deleted = items(cluster, "events", "--field-selector",
                        f"involvedObject.kind=Pod,involvedObject.name={pod},"
                        "reason=PodDeletedOnNodeLoss", namespace=ns)
        assert deleted, f"{pod} was replaced, but not by the operator's deletion"
        assert victim in deleted[0]["message"]
        verify_records(cluster, ns, pod, RECORDS).assert_holds(acked, f"{pod} on {new_primary}")
        after = write_records(cluster, ns, pod, RECORDS, f"{tag}after", 10)
    finally:
        if killed:  # the node comes back whatever happened: later scenarios need it
            cluster.restart_node(victim)

    wait_for(f"node {victim} Ready again", lambda: node_ready(cluster, victim), timeout=600)
    wait_volume_in_sync(cluster, volume, 2, timeout=900)
    verify_records(cluster, ns, pod, RECORDS).assert_holds(acked | after, pod)


# -- 5. live policy change -----------------------------------------------------------------------


def test_5_live_policy_change_without_remount(cluster: Cluster, ns: str, tag: str) -> None:
    policy = add_policy(cluster, "e2e-live", {"mode": "Asynchronous", "replicas": 2,
                                              "maxLag": "5s"})
    name = "live"
    cluster.apply(w.statefulset(name, ns, policy, replicas=1, image=image(cluster)))
    pod = f"{name}-0"
    before_pod = wait_pod_ready(cluster, ns, pod, timeout=900)
    volume = volume_of_claim(cluster, ns, f"data-{pod}")
    wait_volume_in_sync(cluster, volume, 2)
    mount_before = mount_of(cluster, pod, "/data")

    writer = RecordWriter(cluster, ns, pod, RECORDS, f"{tag}w")
    try:
        writer.wait_acks(10)
        cluster.kubectl("patch", "syncpolicies.sharedsync.io", policy, "--type=merge", "-p",
                        json.dumps({"spec": {"mode": "Synchronous", "replicas": 3,
                                             "writeQuorum": 2, "maxLag": None}}))

        def policy_converged() -> bool:
            sp = must_get(cluster, "syncpolicies.sharedsync.io", policy)
            return (sp.get("status", {}).get("observedGeneration")
                    == sp["metadata"]["generation"] and condition(sp, "Ready") == "True")
        wait_for(f"SyncPolicy {policy} status converged", policy_converged, timeout=300)
        sv = wait_volume_in_sync(cluster, volume, 3, timeout=900)
        assert sv["status"].get("mode") == "Synchronous", sv["status"]
        assert sv["status"].get("desiredReplicas") == 3, sv["status"]
        # the writer kept going through the change, and goes on after it
        converged_at = writer.count()
        writer.wait_acks(converged_at + 10)
        assert writer.running(), writer.tail()
    finally:
        acked = writer.stop()

    after_pod = must_get(cluster, "pod", pod, ns)
    assert after_pod["metadata"]["uid"] == before_pod["metadata"]["uid"]
    assert [c.get("restartCount") for c in after_pod["status"]["containerStatuses"]] == [0]
    assert mount_of(cluster, pod, "/data") == mount_before, "the volume was remounted"
    verify_records(cluster, ns, pod, RECORDS).assert_holds(acked, pod)


# -- 6. expansion and snapshot restore -----------------------------------------------------------


def test_6_expansion_inside_the_pod_and_a_restored_snapshot(cluster: Cluster, ns: str,
                                                            tag: str) -> None:
    cluster.apply([w.claim("grow", ns, SYNC_CLASS, size="1Gi"),
                   w.pod("grow", ns, {"/data": "grow"}, image=image(cluster))])
    wait_pod_ready(cluster, ns, "grow", timeout=900)
    acked = write_records(cluster, ns, "grow", RECORDS, f"{tag}g", 20)
    size_before = df_bytes(cluster, "grow", "/data")

    cluster.kubectl("patch", "pvc", "grow", "-n", ns, "--type=merge", "-p",
                    json.dumps({"spec": {"resources": {"requests": {"storage": "2Gi"}}}}))
    wait_for("pvc grow at 2Gi", lambda: quantity_bytes(must_get(cluster, "pvc", "grow", ns)[
        "status"].get("capacity", {}).get("storage", "0")) >= 2 << 30, timeout=600)
    # the pod sees the new size on its mounted filesystem (online btrfs resize); the
    # filesystem's own overhead is far below the half GiB allowed for here
    wait_for("the pod's df shows the grown volume",
             lambda: df_bytes(cluster, "grow", "/data") > size_before + (512 << 20),
             timeout=300)
    verify_records(cluster, ns, "grow", RECORDS).assert_holds(acked, "grow")

    digest = exec_sh(cluster, ns, "grow", 'sync "$1" && sha256sum "$1"', RECORDS).split()[0]
    cluster.apply([w.volume_snapshot("grow-snap", ns, "grow", SNAPSHOT_CLASS)])

    def snapshot_ready() -> bool:
        snap = must_get(cluster, "volumesnapshot", "grow-snap", ns)
        return bool(snap.get("status", {}).get("readyToUse"))
    try:
        wait_for("VolumeSnapshot grow-snap readyToUse", snapshot_ready, timeout=600)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, 'volumesnapshot', 'grow-snap', ns)}"
                             ) from None
    # written after the snapshot: must not be in the restored volume
    write_records(cluster, ns, "grow", RECORDS, f"{tag}late", 3)

    cluster.apply([w.claim("restored", ns, SYNC_CLASS, size="2Gi", snapshot="grow-snap"),
                   w.pod("restored", ns, {"/data": "restored"}, image=image(cluster))])
    wait_pod_ready(cluster, ns, "restored", timeout=900)
    found = verify_records(cluster, ns, "restored", RECORDS)
    found.assert_holds(acked, "restored")
    assert not {r for r in found.ok if r.startswith(f"{tag}late")}, "restored a later write"
    restored = exec_sh(cluster, ns, "restored", 'sha256sum "$1"', RECORDS).split()[0]
    assert restored == digest


# -- 7. QoS bandwidth cap ------------------------------------------------------------------------


CAP = 1 << 20  # bytes/s
WINDOW = 10.0  # seconds between the two scrapes


def test_7_bandwidth_cap_bounds_the_replication_rate(cluster: Cluster, ns: str) -> None:
    policy = add_policy(cluster, "e2e-qos", {"mode": "Asynchronous", "replicas": 2,
                                             "maxLag": "5s", "qos": {"bandwidth": "1Mi"}})
    cluster.apply([w.claim("capped", ns, policy),
                   w.pod("capped", ns, {"/data": "capped"}, image=image(cluster))])
    wait_pod_ready(cluster, ns, "capped", timeout=900)
    volume = volume_of_claim(cluster, ns, "capped")
    primary = wait_volume_in_sync(cluster, volume, 2)["status"]["primary"]
    agent = node_pod(cluster, primary)
    port = 9810

    def sent() -> float:
        text = scrape(cluster, agent, "agent", port)
        return metric(text, "sharedsync_replication_bytes_total", volume=volume,
                      direction="sent") or 0.0

    base = sent()
    # 32 MiB of incompressible data: half a minute of shipping at the cap
    exec_sh(cluster, ns, "capped",
            'dd if=/dev/urandom of=/data/blob bs=1048576 count=32 2>/dev/null && sync /data/blob')
    wait_for("shipping under way", lambda: sent() > base + CAP, timeout=300)

    start = time.monotonic()
    first = sent()
    time.sleep(WINDOW)
    second = sent()
    elapsed = time.monotonic() - start  # includes both scrapes: never shorter than the span
    rate = (second - first) / elapsed
    assert rate > 0, "nothing shipped while 32 MiB waited"
    assert rate <= CAP * 1.5, f"shipped {rate / CAP:.2f} MiB/s under a 1 MiB/s cap"
    # the cap slows replication down, it does not stop it
    wait_volume_in_sync(cluster, volume, 2, timeout=600)


# -- 8. cleanup ----------------------------------------------------------------------------------


def test_8_uninstall_leaves_nothing_on_the_nodes(cluster: Cluster, release: str) -> None:
    nodes = cluster.storage_nodes()
    remove_workloads(cluster)
    cluster.helm("uninstall", release, "--namespace", NAMESPACE, "--wait", "--timeout", "10m",
                 timeout=700)
    cluster.kubectl("delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true",
                    timeout=600)
    left: list[str] = []
    for node in nodes:
        left += [f"{node}: {what}" for what in leftovers_on(cluster, node)]
    assert not left, "\n".join(left)


def leftovers_on(cluster: Cluster, node: str) -> list[str]:
    """Our mounts under kubelet's and our data directory, loop devices backed by replica
    images, and replica files, as the node sees them."""
    found: list[str] = []
    mountinfo = cluster.node_exec(node, "cat", "/proc/self/mountinfo").stdout
    for line in mountinfo.splitlines():
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        fstype = fields[fields.index("-") + 1]
        ours = point.startswith(("/var/lib/sharedsync/",
                                 f"/var/lib/kubelet/plugins/kubernetes.io/csi/{DRIVER}/"))
        # a node of the local cluster sees the host's mounts too: those of other test tiers
        # (under pytest's temporary root) are not the cluster's
        elsewhere = point.startswith(PYTEST_TEMP_ROOT)
        if ours or "/volumes/kubernetes.io~csi/" in point or (
                fstype.startswith("fuse.sharedsync") and not elsewhere):
            found.append(f"mount {point} ({fstype})")
    loops = cluster.node_exec(node, "losetup", "--list", "--noheadings", "--output",
                              "NAME,BACK-FILE").stdout
    for line in loops.splitlines():
        name, _, back = line.strip().partition(" ")
        back = back.strip()
        if back.startswith("/var/lib/sharedsync/") or (
                "/nodes/" in back and "/var/lib/sharedsync/" in back):
            found.append(f"loop {name} -> {back}")
    replicas = cluster.node_exec(node, "sh", "-c", "find /var/lib/sharedsync -mindepth 3 "
                                 "-path '*/replicas/volumes/*' 2>/dev/null; true").stdout
    found += [f"replica data {path}" for path in replicas.splitlines() if path.strip()]
    return found
