"""Benchmark 7: the product inside pods, on the local cluster of real nodes (scripts/cluster).

Measured side by side in one run:

* sequential write throughput (1 MiB writes, fsync every 64 MiB) and fsync latency P50/P99
  (4 KiB write + fsync) inside a pod, on a Synchronous sharedsync volume (3 replicas, write
  quorum 2) and on an emptyDir of the same pod on the same node (goal >= 0.8x throughput);
* PVC created -> pod Running, against a pod with an emptyDir created the same way
  (goal <= 10 s);
* node killed -> the volume writable again on another node (goal <= 30 s; users of a leading
  RWX solution report about 90 s): the node running the writer and holding the primary is
  killed, the dead pod is force-deleted (what a platform team or a node-fencing controller
  does) and a pod on a surviving replica's node writes and fsyncs.

The cluster and the chart are used as found, or brought up / installed (and then removed again)
when absent. Runs as root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Figure, NotAvailable, Result, log, main, median, percentile, ratio

NAME = "cluster"
TITLE = "Pods on a local cluster of real nodes: Synchronous volume vs emptyDir, failover"
NAMESPACE = "sharedsync-bench"
STORAGE_CLASS = "sharedsync-sync"
IMAGE = "localhost/sharedsync:0.1.0"
BUSYBOX = "localhost/busybox:1.35"
TIMEOUT = 300.0

#: Runs inside the pod (python3 of our image): the same workload on each directory in turn.
WORKLOAD = r"""
import json, os, sys, time
total, fsyncs = int(sys.argv[1]), int(sys.argv[2])
chunk = os.urandom(1 << 20)
out = {}
for name in sys.argv[3:]:
    path = os.path.join(name, "bench.dat")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = time.perf_counter()
    for i in range(total):
        os.write(fd, chunk)
        if (i + 1) % 64 == 0:
            os.fsync(fd)
    os.fsync(fd)
    seconds = time.perf_counter() - start
    os.close(fd)
    os.unlink(path)
    block = os.urandom(4096)
    fd = os.open(os.path.join(name, "fsync.dat"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    latencies = []
    for _ in range(fsyncs):
        os.write(fd, block)
        t = time.perf_counter()
        os.fsync(fd)
        latencies.append(time.perf_counter() - t)
    os.close(fd)
    out[name] = {"mib_per_s": total / seconds, "fsync_seconds": latencies}
print("RESULT " + json.dumps(out))
"""


class Kube:
    def __init__(self) -> None:
        from localcluster.layout import TOOLS_BIN, state_dir
        self.kubectl_bin = str(TOOLS_BIN / "kubectl")
        self.helm_bin = str(TOOLS_BIN / "helm")
        self.kubeconfig = str(state_dir() / "kubeconfig")

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 timeout: float = 120) -> str:
        done = subprocess.run([self.kubectl_bin, f"--kubeconfig={self.kubeconfig}", *args],
                              input=input, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and done.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def apply(self, *docs: dict[str, Any]) -> None:
        self("apply", "-n", NAMESPACE, "-f", "-",
             input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))

    def get(self, *args: str) -> Any:
        return json.loads(self("get", "-n", NAMESPACE, *args, "-o", "json"))

    def wait_until(self, what: str, predicate: Any, timeout: float = TIMEOUT) -> float:
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"{what}: not after {timeout:.0f}s")
            time.sleep(0.2)
        return time.monotonic() - start


def pvc(name: str, size: str = "1Gi") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": STORAGE_CLASS,
                     "resources": {"requests": {"storage": size}}}}


def pod(name: str, command: list[str], *, claim: str | None, node: str | None = None,
        image: str = BUSYBOX) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [{"name": "scratch", "emptyDir": {}}]
    mounts = [{"name": "scratch", "mountPath": "/scratch"}]
    if claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "data", "mountPath": "/data"})
    spec: dict[str, Any] = {
        "restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
        "securityContext": {"runAsUser": 0},
        "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                        "command": command, "volumeMounts": mounts}],
        "volumes": volumes}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def phase(kube: Kube, name: str) -> str:
    out = kube("get", "-n", NAMESPACE, "pod", name, "-o", "jsonpath={.status.phase}",
               check=False)
    return out.strip()


def ensure_cluster(result: Result) -> tuple[bool, bool]:
    """(brought up, installed): what this run made and must remove."""
    from localcluster import cluster
    from localcluster.processes import StepError

    brought_up = installed = False
    if not cluster.known_nodes():
        log("no local cluster: scripts/cluster up")
        try:
            cluster.up(3)
        except StepError as exc:
            raise NotAvailable(f"scripts/cluster up failed: {exc}") from exc
        brought_up = True
    kube = Kube()
    if "sharedsync" not in kube("get", "ns", "-o", "name", check=False):
        log("installing the chart")
        from localcluster import demo
        demo.install()
        installed = True
    result.params.update(nodes=len(cluster.known_nodes()))
    return brought_up, installed


def throughput(kube: Kube, quick: bool, result: Result) -> None:
    total, fsyncs = (64, 50) if quick else (256, 200)
    kube.apply(pvc("tput"), pod("tput", ["python3", "-c", WORKLOAD, str(total), str(fsyncs),
                                         "/scratch", "/data"], claim="tput", image=IMAGE))
    kube.wait_until("throughput pod done",
                    lambda: phase(kube, "tput") in ("Succeeded", "Failed"), timeout=900)
    logs = kube("logs", "-n", NAMESPACE, "tput")
    if phase(kube, "tput") != "Succeeded" or "RESULT " not in logs:
        raise RuntimeError(f"throughput pod failed:\n{logs[-2000:]}")
    data = json.loads(logs.split("RESULT ", 1)[1])
    local, ours = data["/scratch"], data["/data"]
    result.params.update(write_mib=total, fsync_samples=fsyncs)
    result.add(Figure("sequential write in a pod, Synchronous volume", ours["mib_per_s"],
                      "MiB/s", baseline="emptyDir on the same node",
                      baseline_value=local["mib_per_s"],
                      ratio=ratio(ours["mib_per_s"], local["mib_per_s"]), goal=">= 0.8x",
                      met=(ratio(ours["mib_per_s"], local["mib_per_s"]) or 0) >= 0.8,
                      note="1 MiB writes, fsync every 64 MiB, 3 replicas, write quorum 2"))
    for q in (50, 99):
        value = percentile(ours["fsync_seconds"], q / 100)
        base = percentile(local["fsync_seconds"], q / 100)
        result.add(Figure(f"fsync latency P{q} in a pod", (value or 0) * 1000, "ms",
                          baseline="emptyDir", baseline_value=(base or 0) * 1000,
                          ratio=ratio(value, base), note="4 KiB write + fsync"))
    kube("delete", "-n", NAMESPACE, "pod", "tput", "--wait=true", timeout=TIMEOUT)
    kube("delete", "-n", NAMESPACE, "pvc", "tput", "--wait=true", timeout=TIMEOUT)


def startup(kube: Kube, quick: bool, result: Result) -> None:
    rounds = 2 if quick else 5
    ours: list[float] = []
    base: list[float] = []
    for i in range(rounds):
        for claim, samples in ((None, base), (f"start-{i}", ours)):
            name = f"start-{i}-{'pvc' if claim else 'empty'}"
            docs = [pod(name, ["sleep", "3600"], claim=claim)]
            if claim:
                docs.insert(0, pvc(claim))
            began = time.monotonic()
            kube.apply(*docs)
            kube.wait_until(f"{name} Running", lambda name=name: phase(kube, name) == "Running")
            samples.append(time.monotonic() - began)
    kube("delete", "-n", NAMESPACE, "pod", "--all", "--wait=true", timeout=TIMEOUT)
    kube("delete", "-n", NAMESPACE, "pvc", "--all", "--wait=true", timeout=TIMEOUT)
    result.add(Figure("PVC created -> pod Running (median)", median(ours), "s",
                      baseline="pod with an emptyDir", baseline_value=median(base),
                      ratio=ratio(median(ours), median(base)), goal="<= 10 s",
                      met=(median(ours) or 99) <= 10,
                      note=f"{rounds} rounds, max {max(ours):.1f} s"))


def failover(kube: Kube, result: Result) -> None:
    from localcluster import cluster

    kube.apply(pvc("fo"), pod("fo-writer", ["sh", "-c", "while true; do date >> /data/log; "
                                            "sync /data/log; sleep 0.2; done"], claim="fo"))
    kube.wait_until("writer Running", lambda: phase(kube, "fo-writer") == "Running")
    volume = kube.get("pvc", "fo")["spec"]["volumeName"]
    sv_name = kube("get", "pv", volume, "-o", "jsonpath={.spec.csi.volumeHandle}").strip()
    writer_node = kube.get("pod", "fo-writer")["spec"]["nodeName"]

    def sv() -> Any:
        return json.loads(kube("get", "sv", sv_name, "-o", "json"))

    kube.wait_until("volume Ready with every replica", lambda: any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in sv().get("status", {}).get("conditions", [])))
    status = sv()["status"]
    primary = status.get("primary")
    replicas = [r.get("node") for r in status.get("replicas", [])]
    target = next(n for n in replicas if n and n != writer_node)
    log(f"writer on {writer_node}, primary {primary}, replicas {replicas}; killing "
        f"{writer_node}")
    killed_at = time.monotonic()
    cluster.kill_node(writer_node)
    kube("delete", "-n", NAMESPACE, "pod", "fo-writer", "--force", "--grace-period=0",
         check=False)
    kube.apply(pod("fo-after", ["sh", "-c", "date >> /data/log && sync /data/log && "
                                "echo WRITABLE && sleep 3600"], claim="fo", node=target))
    kube.wait_until("writable on another node", lambda: "WRITABLE" in kube(
        "logs", "-n", NAMESPACE, "fo-after", check=False))
    seconds = time.monotonic() - killed_at
    result.add(Figure("node killed -> volume writable on another node", seconds, "s",
                      baseline="reported by users of a leading RWX solution",
                      baseline_value=90.0, ratio=ratio(seconds, 90.0), goal="<= 30 s",
                      met=seconds <= 30, note=f"killed {writer_node}, wrote on {target}"))
    cluster.restart_node(writer_node)
    back = time.monotonic()
    kube.wait_until("all replicas InSync again", lambda: all(
        r.get("state") == "InSync" for r in sv().get("status", {}).get("replicas", [])),
        timeout=600)
    result.details.update(rejoin_seconds=time.monotonic() - back)
    kube("delete", "-n", NAMESPACE, "pod", "--all", "--wait=true", timeout=TIMEOUT)
    kube("delete", "-n", NAMESPACE, "pvc", "--all", "--wait=true", timeout=TIMEOUT)


#: A policy like the chart's Synchronous one, on two replicas so the moved pod has exactly one
#: node to go to, with the operator deleting the pod stranded on a lost node.
MOVER_POLICY = "sharedsync-bench-mover"


def statefulset_moves(kube: Kube, result: Result) -> None:
    """The application's view of node loss: a StatefulSet's pod on the killed node runs and
    writes again on another node, with nobody deleting anything by hand
    (``failover.strandedPodDeletion: StatefulSet``)."""
    from localcluster import cluster

    kube("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "sharedsync.io/v1alpha1", "kind": "SyncPolicy",
         "metadata": {"name": MOVER_POLICY},
         "spec": {"mode": "Synchronous", "replicas": 2, "writeQuorum": 2,
                  "failover": {"onQuorumLoss": "Continue",
                               "strandedPodDeletion": "StatefulSet"}}},
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": MOVER_POLICY}, "provisioner": "csi.sharedsync.io",
         "parameters": {"syncPolicy": MOVER_POLICY}, "reclaimPolicy": "Delete",
         "volumeBindingMode": "WaitForFirstConsumer"}]}))
    template = pod("unused", ["sh", "-c", "date >> /data/boots && sync /data/boots && "
                              "echo BOOTED && while true; do date >> /data/log; "
                              "sync /data/log; sleep 0.2; done"], claim="data")["spec"]
    template["restartPolicy"] = "Always"
    template["volumes"] = [v for v in template["volumes"] if v["name"] != "data"]
    claim = pvc("data")
    claim["spec"]["storageClassName"] = MOVER_POLICY
    kube.apply({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "mover"},
                "spec": {"replicas": 1, "serviceName": "mover",
                         "selector": {"matchLabels": {"app": "mover"}},
                         "template": {"metadata": {"labels": {"app": "mover"}},
                                      "spec": template},
                         "volumeClaimTemplates": [{"metadata": claim["metadata"],
                                                   "spec": claim["spec"]}]}})
    try:
        kube.wait_until("mover-0 Running", lambda: phase(kube, "mover-0") == "Running")
        first = kube.get("pod", "mover-0")
        node = first["spec"]["nodeName"]
        sv_name = kube("get", "pv", kube.get("pvc", "data-mover-0")["spec"]["volumeName"],
                       "-o", "jsonpath={.spec.csi.volumeHandle}").strip()
        kube.wait_until("its volume Ready", lambda: any(
            c["type"] == "Ready" and c["status"] == "True" for c in json.loads(kube(
                "get", "sv", sv_name, "-o", "json")).get("status", {}).get("conditions", [])))
        log(f"mover-0 on {node}; killing {node}")
        killed_at = time.monotonic()
        cluster.kill_node(node)

        def moved() -> bool:
            now = kube("get", "-n", NAMESPACE, "pod", "mover-0", "-o", "json", check=False)
            return bool(now) and json.loads(now)["metadata"]["uid"] != first["metadata"]["uid"] \
                and "BOOTED" in kube("logs", "-n", NAMESPACE, "mover-0", check=False)
        kube.wait_until("mover-0 writing on another node", moved, timeout=600)
        seconds = time.monotonic() - killed_at
        moved_to = kube.get("pod", "mover-0")["spec"]["nodeName"]
        result.add(Figure("node killed -> StatefulSet pod writing on another node", seconds,
                          "s", baseline="Kubernetes alone (never: the pod waits for the dead "
                          "node)", note=f"strandedPodDeletion StatefulSet; killed {node}, "
                          f"moved to {moved_to}; includes the node's NotReady grace period"))
        cluster.restart_node(node)
    finally:
        kube("delete", "-n", NAMESPACE, "statefulset", "mover", "--wait=true", check=False,
             timeout=TIMEOUT)
        kube("delete", "-n", NAMESPACE, "pvc", "data-mover-0", "--wait=true", check=False,
             timeout=TIMEOUT)
        kube("delete", "storageclass", MOVER_POLICY, check=False)
        kube("delete", "syncpolicy", MOVER_POLICY, "--wait=false", check=False)


def body(quick: bool, workdir: Path, result: Result) -> None:
    if os.geteuid() != 0:
        raise NotAvailable("needs root (the local cluster)")
    brought_up, installed = ensure_cluster(result)
    kube = Kube()
    try:
        kube("create", "namespace", NAMESPACE, check=False)
        startup(kube, quick, result)
        throughput(kube, quick, result)
        failover(kube, result)
        statefulset_moves(kube, result)
    finally:
        kube("delete", "namespace", NAMESPACE, "--wait=true", check=False, timeout=TIMEOUT)
        if installed:
            from localcluster import demo
            demo._helm("uninstall", demo.RELEASE, "-n", demo.RELEASE_NAMESPACE, "--wait")
        if brought_up:
            from localcluster import cluster
            cluster.down()


if __name__ == "__main__":
    sys.exit(main(NAME, TITLE, body))
