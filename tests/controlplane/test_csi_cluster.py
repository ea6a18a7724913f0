"""The CSI plugin in cluster mode, driven by the real external-provisioner and external-resizer.

One module-wide cluster: a real control plane (session-wide), the real operator, three real
agents in network namespaces (operator_harness), our controller plugin process with
``--state-store kubernetes``, and the upstream sidecars built by scripts/build-tools talking to
it over its socket, exactly as in a pod. Kubernetes does the rest: kube-controller-manager binds
claims to the PVs the provisioner makes and releases them when claims go.

The controller runs as a ServiceAccount bound to exactly the rules the chart ships
(charts/rbac/csi-controller-*.yaml), so the test also proves those are enough.
The sidecars run as the admin. Node staging is driven over gRPC (there is no kubelet in this
tier) on node plugins pointed at an agent's control socket. Every object here has its own name;
the control plane is shared with other modules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.proto import csi_pb2, csi_pb2_grpc
from sharedsync.core.quantity import parse_bytes
from tests.controlplane.controlplane import TOOLS_BIN, ControlPlane
from tests.controlplane.operator_harness import (
    NAMESPACE,
    OperatorCluster,
    bind_component,
    policy,
    started_cluster,
)
from tests.controlplane.snapshot_crds import delete_snapshots, install_snapshot_crds
from tests.integration.agent_harness import wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

DRIVER = "csi.sharedsync.io"
TOPOLOGY_KEY = "topology.sharedsync.io/node"
#: Where this module's claims live (its own, so nothing else's events mix in).
CLAIMS = "csi-cluster"
SIDECARS = ("csi-provisioner", "csi-resizer", "csi-snapshotter", "snapshot-controller")
MiB = 1 << 20
Code = grpc.StatusCode
AccessMode = csi_pb2.VolumeCapability.AccessMode


def sidecar_binaries() -> dict[str, Path]:
    """The upstream sidecars; skip without them, except in CI, where that is a failure."""
    found = {name: TOOLS_BIN / name for name in SIDECARS}
    missing = [name for name, path in found.items() if not os.access(path, os.X_OK)]
    if missing:
        reason = f"{', '.join(missing)} not built in {TOOLS_BIN} (run scripts/build-tools)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must build them first")
        pytest.skip(reason)
    return found


# -- processes -------------------------------------------------------------------------------


@dataclass
class Process:
    """A child process with its output in a log file, in its own process group."""

    name: str
    log_path: Path
    popen: subprocess.Popen[bytes]

    @classmethod
    def start(cls, name: str, argv: list[str], log_path: Path) -> Process:
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return cls(name, log_path, popen)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = ["(no log)"]
        return f"--- {self.name} ({self.log_path}) ---\n" + "\n".join(text)

    def stop(self) -> None:
        if not self.alive():
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=20)


def _accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def start_plugin(name: str, workdir: Path, *args: str) -> tuple[Process, Path]:
    """``python -m csi_driver`` with ``args`` on a socket in ``workdir``; return once it serves."""
    workdir.mkdir(parents=True, exist_ok=True)
    sock = workdir / "csi.sock"
    process = Process.start(name, [
        sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{sock}",
        "--data-dir", str(workdir / "data"), "--log-format", "json", "--log-level", "DEBUG",
        *args], workdir / f"{name}.log")
    wait_until(lambda: _accepting(sock) or not process.alive(), timeout=60,
               what=f"{name} serving")
    assert process.alive(), process.tail()
    return process, sock


@dataclass
class Csi:
    """The controller plugin and the sidecars in front of it."""

    controller: Process
    socket: Path
    sidecars: list[Process]

    def logs(self) -> str:
        return "\n".join(p.tail() for p in [self.controller, *self.sidecars])


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(control_plane: ControlPlane,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorCluster]:
    sidecar_binaries()
    with started_cluster(control_plane, tmp_path_factory, "csi-cluster") as cluster:
        yield cluster


def controller_kubeconfig(cp: ControlPlane) -> Path:
    """The chart's csi-controller ServiceAccount with exactly the chart's rules
    (charts/rbac/csi-controller-*.yaml): the tests below prove they are enough."""
    return bind_component(cp, "csi-controller")


def sv_named(cluster: OperatorCluster, request_name: str) -> list[dict[str, Any]]:
    """SharedVolumes recording CSI request ``request_name`` (a PV name)."""
    items: list[dict[str, Any]] = json.loads(
        cluster.cp.kubectl("get", "sv", "-o", "json").stdout)["items"]
    return [sv for sv in items if (sv.get("spec") or {}).get("requestName") == request_name]


@contextlib.contextmanager
def registered_node_plugins(cluster: OperatorCluster) -> Iterator[None]:
    """What kubelet publishes when our node plugin registers on each node: a CSINode naming
    the driver and its topology key, and the node label with the node's value (the
    external-provisioner builds every volume's topology requirements from them)."""
    names = sorted(cluster.agents.agents)
    for name in names:
        cluster.apply({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
                       "metadata": {"name": name},
                       "spec": {"drivers": [{"name": DRIVER, "nodeID": name,
                                             "topologyKeys": [TOPOLOGY_KEY]}]}})
        cluster.cp.kubectl("label", "node", name, f"{TOPOLOGY_KEY}={name}", "--overwrite")
    try:
        yield
    finally:
        for name in names:
            cluster.cp.kubectl("delete", "csinode", name, "--ignore-not-found", check=False)
            cluster.cp.kubectl("label", "node", name, f"{TOPOLOGY_KEY}-", check=False)


@pytest.fixture(scope="module")
def csi(cluster: OperatorCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Csi]:
    binaries = sidecar_binaries()
    cp = cluster.cp
    workdir = Path(tmp_path_factory.mktemp("csi-controller"))
    tls = cluster.agents.client_tls["operator"]  # a client certificate of the agents' CA
    controller, sock = start_plugin(
        "controller", workdir, "--role", "controller", "--state-store", "kubernetes",
        "--kubeconfig", str(controller_kubeconfig(cp)), "--namespace", NAMESPACE,
        "--node-id", "csi-controller", "--agent-ca", str(tls.ca), "--agent-cert", str(tls.cert),
        "--agent-key", str(tls.key))
    common = [f"--kubeconfig={cp.kubeconfig}", f"--csi-address={sock}",
              "--leader-election=false", "--v=4",
              # a test's waits stay bounded: failed calls are retried at most 10 s apart
              "--retry-interval-max=10s"]
    sidecars = [
        Process.start("csi-provisioner", [str(binaries["csi-provisioner"]), *common,
                                          "--feature-gates=Topology=true",
                                          "--extra-create-metadata"],
                      workdir / "csi-provisioner.log"),
        Process.start("csi-resizer", [str(binaries["csi-resizer"]), *common],
                      workdir / "csi-resizer.log"),
        Process.start("csi-snapshotter", [str(binaries["csi-snapshotter"]), *common],
                      workdir / "csi-snapshotter.log"),
        # the cluster-wide half of the snapshot machinery (binds VolumeSnapshots to contents)
        Process.start("snapshot-controller", [
            str(binaries["snapshot-controller"]), f"--kubeconfig={cp.kubeconfig}",
            "--leader-election=false", "--v=4"],
            workdir / "snapshot-controller.log"),
    ]
    cp.kubectl("create", "namespace", CLAIMS, check=False)
    created_crds = install_snapshot_crds(cp)
    csi = Csi(controller, sock, sidecars)
    try:
        with registered_node_plugins(cluster):
            yield csi
    finally:
        delete_snapshots(cp, CLAIMS)  # what a failed test left, while its controllers run
        for process in [*sidecars, controller]:
            process.stop()
        if created_crds:
            cp.kubectl("delete", "crd", *created_crds, "--ignore-not-found", "--timeout=300s",
                       check=False, timeout=330)


# -- Kubernetes objects ----------------------------------------------------------------------


def storage_class(name: str, parameters: dict[str, str],
                  binding: str = "Immediate") -> dict[str, Any]:
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name}, "provisioner": DRIVER, "parameters": parameters,
            "reclaimPolicy": "Delete", "volumeBindingMode": binding,
            "allowVolumeExpansion": True}


def claim(name: str, storage_class_name: str, size: str = "256Mi",
          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": CLAIMS, "annotations": annotations or {}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": storage_class_name,
                     "resources": {"requests": {"storage": size}}}}


def get(cluster: OperatorCluster, kind: str, name: str,
        namespace: str | None = None) -> dict[str, Any] | None:
    where = ["-n", namespace] if namespace else []
    out = cluster.cp.kubectl("get", kind, name, *where, "-o", "json", check=False)
    if out.returncode != 0:
        if "NotFound" in out.stderr:
            return None
        raise AssertionError(out.stderr)
    found: dict[str, Any] = json.loads(out.stdout)
    return found


def bound_volume(cluster: OperatorCluster, csi: Csi, name: str,
                 timeout: float = 240) -> dict[str, Any]:
    """Wait for claim ``name`` to be Bound; return its PV."""
    def bound() -> bool:
        pvc = get(cluster, "pvc", name, CLAIMS)
        return pvc is not None and pvc["status"].get("phase") == "Bound"
    wait_until(bound, timeout=timeout, interval=1,
               what=f"claim {name} Bound\n{csi.logs()}\n{cluster.operator.log_tail()}")
    pvc = get(cluster, "pvc", name, CLAIMS)
    assert pvc is not None
    pv = get(cluster, "pv", pvc["spec"]["volumeName"])
    assert pv is not None
    return pv


def events(cluster: OperatorCluster, name: str) -> list[dict[str, Any]]:
    out = cluster.cp.kubectl("get", "events", "-n", CLAIMS, "-o", "json",
                             "--field-selector", f"involvedObject.name={name}")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def affinity_nodes(pv: dict[str, Any]) -> set[str]:
    """The nodes a PV's node affinity allows (one term per node, as CSI topology maps)."""
    nodes = set()
    for term in pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]:
        [expression] = term["matchExpressions"]
        assert expression["key"] == TOPOLOGY_KEY, expression
        assert expression["operator"] == "In", expression
        nodes.update(expression["values"])
    return nodes


def replica_nodes(sv: dict[str, Any]) -> set[str]:
    return {r["node"] for r in (sv.get("status") or {}).get("replicas") or ()}


def ready(sv: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True"
               for c in (sv.get("status") or {}).get("conditions") or ())


def delete_claim(cluster: OperatorCluster, name: str) -> None:
    cluster.cp.kubectl("delete", "pvc", name, "-n", CLAIMS, "--wait=false", check=False)


# -- the tests -------------------------------------------------------------------------------


def test_claim_is_provisioned_grown_and_deleted(cluster: OperatorCluster, csi: Csi) -> None:
    cluster.apply(policy("csi-async", mode="Asynchronous", replicas=2, maxLag="1s"))
    cluster.apply(storage_class("sharedsync-csi-async", {"syncPolicy": "csi-async"}))
    cluster.apply(claim("data-async", "sharedsync-csi-async"))

    # bound to a PV backed by a Ready SharedVolume, usable exactly where its replicas are
    pv = bound_volume(cluster, csi, "data-async")
    volume_id = pv["spec"]["csi"]["volumeHandle"]
    assert pv["spec"]["csi"]["driver"] == DRIVER
    sv = get(cluster, "sv", volume_id)
    assert sv is not None, volume_id
    assert ready(sv), sv.get("status")
    nodes = replica_nodes(sv)
    assert len(nodes) == 2, sv["status"]
    assert affinity_nodes(pv) == nodes
    assert set(sv["spec"]["accessibleNodes"]) == nodes
    assert sv["spec"]["policy"] == "csi-async"
    assert sv["spec"]["requestName"] == pv["metadata"]["name"]
    assert sv["spec"]["parameters"] == {"syncPolicy": "csi-async"}
    assert cluster.holders(volume_id) == nodes
    assert parse_bytes(pv["spec"]["capacity"]["storage"]) == 256 * MiB

    # expansion: the claim grows, so do the SharedVolume and every replica
    cluster.cp.kubectl("patch", "pvc", "data-async", "-n", CLAIMS, "--type=merge", "-p",
                       json.dumps({"spec": {"resources": {"requests": {"storage": "512Mi"}}}}))

    def grown() -> bool:
        pvc = get(cluster, "pvc", "data-async", CLAIMS)
        assert pvc is not None
        return parse_bytes(pvc["status"].get("capacity", {}).get("storage", "0")) == 512 * MiB
    wait_until(grown, timeout=240, interval=1,
               what=f"the claim grown to 512Mi\n{csi.logs()}\n{cluster.operator.log_tail()}")
    sv = get(cluster, "sv", volume_id)
    assert sv is not None
    assert parse_bytes(sv["spec"]["capacity"]) == 512 * MiB
    pv_name = pv["metadata"]["name"]
    grown_pv = get(cluster, "pv", pv_name)
    assert grown_pv is not None
    assert parse_bytes(grown_pv["spec"]["capacity"]["storage"]) == 512 * MiB
    for node in replica_nodes(sv):
        assert cluster.agents.agents[node].volume(volume_id).size_bytes == 512 * MiB, node

    # deletion: the PV, the SharedVolume and every replica go
    delete_claim(cluster, "data-async")
    wait_until(lambda: get(cluster, "pv", pv_name) is None, timeout=240,
               interval=1, what=f"the PV deleted\n{csi.logs()}")
    assert get(cluster, "sv", volume_id) is None
    assert cluster.holders(volume_id) == set()
    cluster.cp.kubectl("delete", "storageclass", "sharedsync-csi-async")


def test_bad_storage_class_parameters_fail_with_our_message(cluster: OperatorCluster,
                                                          csi: Csi) -> None:
    cluster.apply(policy("csi-bad", replicas=2))
    cases = {
        "bad-key": ({"syncPolicy": "csi-bad", "replicaCount": "3"},
                    "invalid parameter 'replicaCount' in storage class"),
        "bad-policy": ({"syncPolicy": "no-such-policy"},
                       "SyncPolicy 'no-such-policy' (StorageClass parameter 'syncPolicy') does "
                       "not exist"),
        "no-policy": ({}, "the StorageClass parameter 'syncPolicy' is required in cluster "
                          "mode"),
    }
    for case, (parameters, _) in cases.items():
        cluster.apply(storage_class(f"sharedsync-csi-{case}", parameters))
        cluster.apply(claim(f"data-{case}", f"sharedsync-csi-{case}"))
    for case, (_, message) in cases.items():
        def failed(case: str = case, message: str = message) -> bool:
            return any(e["reason"] == "ProvisioningFailed" and message in e["message"]
                       for e in events(cluster, f"data-{case}"))
        wait_until(failed, timeout=120, interval=1,
                   what=f"ProvisioningFailed saying {message!r}\n{csi.logs()}")
    for case in cases:
        pvc = get(cluster, "pvc", f"data-{case}", CLAIMS)
        assert pvc is not None
        assert pvc["status"]["phase"] == "Pending", pvc["status"]
        assert "volumeName" not in pvc["spec"], pvc["spec"]
    # nothing was created for them: no SharedVolume names their PV
    for case in cases:
        pvc = get(cluster, "pvc", f"data-{case}", CLAIMS)
        assert pvc is not None
        assert sv_named(cluster, f"pvc-{pvc['metadata']['uid']}") == []
    for case in cases:
        delete_claim(cluster, f"data-{case}")
        cluster.cp.kubectl("delete", "storageclass", f"sharedsync-csi-{case}")


def test_claim_waits_for_placement_and_binds_once_possible(cluster: OperatorCluster,
                                                           csi: Csi) -> None:
    """A volume the operator cannot place yet: CreateVolume answers ABORTED with the
    operator's reason after a bounded wait, keeps its record, and the provisioner's retry
    binds the claim to that same volume once placement is possible."""
    cluster.apply(policy("csi-wide", mode="Asynchronous", replicas=4, maxLag="1s"))
    cluster.apply(storage_class("sharedsync-csi-wide", {"syncPolicy": "csi-wide"}))
    cluster.apply(claim("data-wide", "sharedsync-csi-wide"))

    def waiting() -> bool:
        return any(e["reason"] == "ProvisioningFailed" and "Aborted" in e["message"]
                   and "InsufficientNodes" in e["message"]
                   for e in events(cluster, "data-wide"))
    wait_until(waiting, timeout=180, interval=1,
               what=f"ProvisioningFailed: Aborted, InsufficientNodes\n{csi.logs()}")
    pvc = get(cluster, "pvc", "data-wide", CLAIMS)
    assert pvc is not None
    assert pvc["status"]["phase"] == "Pending"
    [pending] = sv_named(cluster, f"pvc-{pvc['metadata']['uid']}")
    assert pending["metadata"]["annotations"]["sharedsync.io/csi-phase"] == "Creating"
    # three nodes can hold it once the policy asks for two replicas
    cluster.apply(policy("csi-wide", mode="Asynchronous", replicas=2, maxLag="1s"))
    pv = bound_volume(cluster, csi, "data-wide")
    assert pv["spec"]["csi"]["volumeHandle"] == pending["metadata"]["name"]
    sv = get(cluster, "sv", pending["metadata"]["name"])
    assert sv is not None
    assert sv["metadata"]["annotations"]["sharedsync.io/csi-phase"] == "Ready"
    assert affinity_nodes(pv) == replica_nodes(sv)
    delete_claim(cluster, "data-wide")
    wait_until(lambda: get(cluster, "sv", pending["metadata"]["name"]) is None, timeout=240,
               interval=1, what=f"the SharedVolume deleted\n{csi.logs()}")
    cluster.cp.kubectl("delete", "storageclass", "sharedsync-csi-wide")


def test_late_binding_places_the_primary_on_the_consumer(cluster: OperatorCluster,
                                                         csi: Csi) -> None:
    cluster.apply(policy("csi-local", mode="Asynchronous", replicas=2, maxLag="1s",
                         placement={"dataLocality": "BestEffort"}))
    cluster.apply(storage_class("sharedsync-csi-local", {"syncPolicy": "csi-local"},
                                binding="WaitForFirstConsumer"))
    # the scheduler's decision, as it records it on the claim
    consumer = "c"
    cluster.apply(claim("data-local", "sharedsync-csi-local",
                        annotations={"volume.kubernetes.io/selected-node": consumer}))
    pv = bound_volume(cluster, csi, "data-local")
    volume_id = pv["spec"]["csi"]["volumeHandle"]
    sv = get(cluster, "sv", volume_id)
    assert sv is not None
    assert sv["spec"]["consumerNode"] == consumer
    assert sv["status"]["primary"] == consumer, sv["status"]
    assert consumer in affinity_nodes(pv)
    delete_claim(cluster, "data-local")
    wait_until(lambda: get(cluster, "sv", volume_id) is None, timeout=240, interval=1,
               what=f"the SharedVolume deleted\n{csi.logs()}")
    cluster.cp.kubectl("delete", "storageclass", "sharedsync-csi-local")


# -- the node plugin through the agent -------------------------------------------------------


@contextlib.contextmanager
def node_plugin(workdir: Path, node: str,
                agent_socket: Path) -> Iterator[tuple[csi_pb2_grpc.NodeStub, Path]]:
    """A node-role plugin of ``node`` on ``agent_socket``; yields its stub and kubelet dir."""
    kubelet = workdir / "kubelet"
    kubelet.mkdir(parents=True, exist_ok=True)
    process, sock = start_plugin(f"node-{node}", workdir, "--role", "node", "--node-id", node,
                                 "--agent-socket", str(agent_socket),
                                 "--kubelet-dir", str(kubelet),
                                 "--allowed-path-root", str(kubelet))
    try:
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            yield csi_pb2_grpc.NodeStub(channel), kubelet
    finally:
        process.stop()
        # a test that failed half-way must not leave mounts behind: they outlive the temporary
        # directory, and every later check of this host's mounts would trip over them
        for point, _ in sorted(mounts_under(kubelet), reverse=True):
            subprocess.run(["umount", "--lazy", point], check=False)


def mount_capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=AccessMode(mode=AccessMode.SINGLE_NODE_WRITER))


def mounts_under(root: Path) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount below ``root``."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split(" ")[4].replace("\\040", " ")
        if point.startswith(prefix):
            found.append((point, right.split(" ")[0]))
    return found


def test_node_stages_through_the_primary_agent(cluster: OperatorCluster, csi: Csi,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    cluster.apply(policy("csi-node", mode="Asynchronous", replicas=2, maxLag="1s"))
    cluster.apply(storage_class("sharedsync-csi-node", {"syncPolicy": "csi-node"}))
    cluster.apply(claim("data-node", "sharedsync-csi-node"))
    pv = bound_volume(cluster, csi, "data-node")
    volume_id = pv["spec"]["csi"]["volumeHandle"]
    context = pv["spec"]["csi"].get("volumeAttributes") or {}
    sv = get(cluster, "sv", volume_id)
    assert sv is not None
    primary = sv["status"]["primary"]
    [other] = replica_nodes(sv) - {primary}
    workdir = Path(tmp_path_factory.mktemp("csi-node"))
    capability = mount_capability()

    # a node that holds only a replica is refused, with the agent's own reason
    with node_plugin(workdir / other, other, cluster.agents.agents[other].socket) as (
            stub, kubelet):
        staging = kubelet / "staging"
        staging.mkdir()
        with pytest.raises(grpc.RpcError) as refused:
            stub.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                volume_id=volume_id, staging_target_path=str(staging),
                volume_capability=capability, volume_context=context), timeout=60)
        assert refused.value.code() == Code.FAILED_PRECONDITION, refused.value
        assert f"served by {primary}, not {other}" in (refused.value.details() or "")
        assert mounts_under(kubelet) == []

    # the primary's agent serves it: stage, publish, write through the pod's path
    with node_plugin(workdir / primary, primary, cluster.agents.agents[primary].socket) as (
            stub, kubelet):
        staging, target = kubelet / "staging", kubelet / "pods" / "p1" / "volume"
        staging.mkdir()
        target.parent.mkdir(parents=True)
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging),
            volume_capability=capability, volume_context=context)
        stub.NodeStageVolume(stage, timeout=120)
        stub.NodeStageVolume(stage, timeout=120)  # idempotent
        publish = csi_pb2.NodePublishVolumeRequest(
            volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=capability, volume_context=context)
        stub.NodePublishVolume(publish, timeout=60)
        stub.NodePublishVolume(publish, timeout=60)
        payload = random.Random(21).randbytes(512 << 10)
        with open(target / "through-csi.bin", "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        # it is the agent's replica that holds it
        live = cluster.agents.agents[primary].live(volume_id) / "through-csi.bin"
        assert live.read_bytes() == payload
        stats = stub.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume_id, volume_path=str(target)), timeout=60)
        assert stats.usage[0].total > 0
        health = stub.NodeGetVolumeHealth(csi_pb2.NodeGetVolumeHealthRequest(
            volume_id=volume_id, volume_publish_path=str(target),
            staging_target_path=str(staging)), timeout=60)
        assert list(health.volume_health.health_statuses) == []

        # and the replica gets it
        cluster.cp.kubectl("annotate", "sv", volume_id, "sharedsync.io/sync-now=csi-node")
        wait_until(lambda: (get(cluster, "sv", volume_id) or {}).get("status", {}).get(
            "lastSyncNow") == "csi-node", timeout=120, what="sync-now handled")
        digest = hashlib.sha256(payload).hexdigest()
        peer = cluster.agents.agents[other]

        def replicated() -> bool:
            return any(hashlib.sha256((s / "through-csi.bin").read_bytes()).hexdigest()
                       == digest for s in peer.sync_dir(volume_id).iterdir()
                       if s.name.startswith("e") and (s / "through-csi.bin").exists())
        wait_until(replicated, timeout=60, what=f"the file in a snapshot on {other}")

        stub.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=volume_id, target_path=str(target)), timeout=60)
        unstage = csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id,
                                                   staging_target_path=str(staging))
        stub.NodeUnstageVolume(unstage, timeout=60)
        stub.NodeUnstageVolume(unstage, timeout=60)  # idempotent
        assert mounts_under(kubelet) == []
        served = [point for point, fs_type in
                  mounts_under(cluster.agents.agents[primary].data_dir)
                  if volume_id in point and fs_type.startswith("fuse")]
        assert served == [], "the agent still serves the volume after Detach"

    delete_claim(cluster, "data-node")
    wait_until(lambda: get(cluster, "sv", volume_id) is None, timeout=240, interval=1,
               what=f"the SharedVolume deleted\n{csi.logs()}")
    assert cluster.holders(volume_id) == set()
    cluster.cp.kubectl("delete", "storageclass", "sharedsync-csi-node")


def test_controller_reports_cluster_capabilities(csi: Csi) -> None:
    """Snapshots and clones are offered in cluster mode; capacity comes from the agents'
    Leases."""
    rpc = csi_pb2.ControllerServiceCapability.RPC
    with grpc.insecure_channel(f"unix://{csi.socket}") as channel:
        stub = csi_pb2_grpc.ControllerStub(channel)
        offered = {c.rpc.type for c in stub.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=30).capabilities}
        assert {rpc.CREATE_DELETE_VOLUME, rpc.EXPAND_VOLUME, rpc.GET_CAPACITY,
                rpc.CREATE_DELETE_SNAPSHOT, rpc.CLONE_VOLUME} <= offered
        with pytest.raises(grpc.RpcError) as refused:
            stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                name="snap-cluster", source_volume_id="vol-" + "ab" * 12), timeout=30)
        assert refused.value.code() == Code.NOT_FOUND, refused.value
        anywhere = stub.GetCapacity(csi_pb2.GetCapacityRequest(), timeout=30)
        assert anywhere.available_capacity > 0
        on_a = stub.GetCapacity(csi_pb2.GetCapacityRequest(
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: "a"})), timeout=30)
        assert 0 < on_a.available_capacity <= anywhere.available_capacity
        nowhere = stub.GetCapacity(csi_pb2.GetCapacityRequest(
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: "no-such-node"})),
            timeout=30)
        assert nowhere.available_capacity == 0


def snapshot(name: str, claim_name: str, class_name: str) -> dict[str, Any]:
    return {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": name, "namespace": CLAIMS},
            "spec": {"volumeSnapshotClassName": class_name,
                     "source": {"persistentVolumeClaimName": claim_name}}}


def claim_from(name: str, storage_class_name: str, kind: str, source: str,
               size: str = "256Mi") -> dict[str, Any]:
    made = claim(name, storage_class_name, size)
    made["spec"]["dataSource"] = (
        {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": source}
        if kind == "snapshot" else {"kind": "PersistentVolumeClaim", "name": source})
    return made


def test_snapshot_restore_and_clone_through_the_external_snapshotter(
        cluster: OperatorCluster, csi: Csi) -> None:
    """VolumeSnapshot -> ReadyToUse; a claim from it holds the data of the snapshot moment;
    a clone of the claim holds the data of the clone moment; everything reclaimed after."""
    cluster.apply(policy("csi-snap", mode="Asynchronous", replicas=2, maxLag="1s"))
    cluster.apply(storage_class("sharedsync-csi-snap", {"syncPolicy": "csi-snap"}))
    cluster.apply({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
                   "metadata": {"name": "sharedsync-csi-snap"}, "driver": DRIVER,
                   "deletionPolicy": "Delete"})
    cluster.apply(claim("origin", "sharedsync-csi-snap"))
    origin = bound_volume(cluster, csi, "origin")["spec"]["csi"]["volumeHandle"]
    sv = get(cluster, "sv", origin)
    assert sv is not None
    live = cluster.agents.agents[sv["status"]["primary"]].live(origin)
    first = random.Random(31).randbytes(256 << 10)
    (live / "state.bin").write_bytes(first)
    os.sync()

    cluster.apply(snapshot("origin-snap", "origin", "sharedsync-csi-snap"))

    def ready_to_use() -> bool:
        found = get(cluster, "volumesnapshot", "origin-snap", CLAIMS)
        return bool(found and (found.get("status") or {}).get("readyToUse"))
    wait_until(ready_to_use, timeout=240, interval=1,
               what=f"the VolumeSnapshot ReadyToUse\n{csi.logs()}")
    # written after the snapshot: the restore must not see it, the clone must
    second = random.Random(32).randbytes(256 << 10)
    (live / "state.bin").write_bytes(second)
    os.sync()

    cluster.apply(claim_from("restored", "sharedsync-csi-snap", "snapshot", "origin-snap"))
    restored = bound_volume(cluster, csi, "restored")["spec"]["csi"]["volumeHandle"]
    cluster.apply(claim_from("cloned", "sharedsync-csi-snap", "claim", "origin"))
    cloned = bound_volume(cluster, csi, "cloned")["spec"]["csi"]["volumeHandle"]
    for volume_id, expected in ((restored, first), (cloned, second)):
        found = get(cluster, "sv", volume_id)
        assert found is not None
        assert ready(found), found.get("status")
        data = cluster.agents.agents[found["status"]["primary"]].live(volume_id) / "state.bin"
        assert data.read_bytes() == expected, volume_id

    for name in ("restored", "cloned"):
        delete_claim(cluster, name)
    cluster.cp.kubectl("delete", "volumesnapshot", "origin-snap", "-n", CLAIMS,
                       "--timeout=240s", timeout=260)
    delete_claim(cluster, "origin")
    for volume_id in (restored, cloned, origin):
        wait_until(lambda v=volume_id: get(cluster, "sv", v) is None, timeout=240, interval=1,
                   what=f"SharedVolume {volume_id} deleted\n{csi.logs()}")
        assert cluster.holders(volume_id) == set()
    def snapshot_records() -> list[Any]:
        items = json.loads(cluster.cp.kubectl("get", "svs", "-o", "json").stdout)["items"]
        return [i for i in items if (i.get("spec") or {}).get("sourceVolume") == origin]
    wait_until(lambda: not snapshot_records(), timeout=120, what="no SharedVolumeSnapshot left")
    for agent in cluster.agents.agents.values():
        assert not [v for v in agent.status().volumes if v.volume_id in (origin, restored, cloned)]
    cluster.cp.kubectl("delete", "volumesnapshotclass", "sharedsync-csi-snap")
    cluster.cp.kubectl("delete", "storageclass", "sharedsync-csi-snap")
