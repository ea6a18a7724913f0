"""Small helpers over kubectl for the scenarios: read objects, wait, exec, scrape metrics.

Every wait has a generous bound that only stops a hung run; none is a timing assertion.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.integration.agent_harness import wait_until

from .providers import Cluster, ClusterError
from .workloads import VERIFY_SCRIPT, WRITE_SCRIPT

Obj = dict[str, Any]

RELEASE = "sharedsync"
NAMESPACE = "sharedsync"
DRIVER = "csi.sharedsync.io"


def wait_for(what: str, predicate: Callable[[], Any], timeout: float) -> None:
    """Poll ``predicate`` (kubectl errors count as "not yet") until it is truthy."""
    wait_until(predicate, timeout=timeout, interval=2.0, what=what)


def get(cluster: Cluster, kind: str, name: str, namespace: str | None = None) -> Obj | None:
    """The object, or None when it does not exist."""
    args = ["get", kind, name, "-o", "json", "--ignore-not-found"]
    if namespace:
        args += ["-n", namespace]
    out = cluster.kubectl(*args).stdout.strip()
    if not out:
        return None
    obj: Obj = json.loads(out)
    return obj


def must_get(cluster: Cluster, kind: str, name: str, namespace: str | None = None) -> Obj:
    obj = get(cluster, kind, name, namespace)
    assert obj is not None, f"{kind}/{name} does not exist"
    return obj


def items(cluster: Cluster, kind: str, *selectors: str, namespace: str | None = None) -> list[Obj]:
    args = ["get", kind, *selectors]
    args += ["-n", namespace] if namespace else ["--all-namespaces"]
    found: list[Obj] = cluster.kubectl_json(*args)["items"]
    return found


def condition(obj: Obj, kind: str) -> str | None:
    """The status ("True", "False", "Unknown") of the condition ``kind``, if present."""
    for cond in obj.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == kind:
            return str(cond.get("status"))
    return None


def pod_ready(pod: Obj | None) -> bool:
    return (pod is not None and pod.get("status", {}).get("phase") == "Running"
            and condition(pod, "Ready") == "True"
            and pod["metadata"].get("deletionTimestamp") is None)


def node_ready(cluster: Cluster, node: str) -> bool:
    return condition(must_get(cluster, "node", node), "Ready") == "True"


def wait_pod_ready(cluster: Cluster, namespace: str, name: str, timeout: float = 300,
                   other_than: str | None = None) -> Obj:
    """Wait for the pod to be Running and Ready (a new one, when ``other_than`` names the uid
    of the pod it replaces); return it."""
    found: list[Obj] = []

    def ready() -> bool:
        pod = get(cluster, "pod", name, namespace)
        if pod is None or not pod_ready(pod):
            return False
        if other_than is not None and pod["metadata"]["uid"] == other_than:
            return False
        found.append(pod)
        return True

    try:
        wait_for(f"pod {namespace}/{name} Ready", ready, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{describe(cluster, 'pod', name, namespace)}") from None
    return found[-1]


def describe(cluster: Cluster, kind: str, name: str, namespace: str | None = None) -> str:
    """`kubectl describe`, for failure messages (never raises)."""
    args = ["describe", kind, name] + (["-n", namespace] if namespace else [])
    try:
        return cluster.kubectl(*args, check=False, timeout=60).stdout[-6000:]
    except subprocess.TimeoutExpired:
        return f"(kubectl describe {kind}/{name} timed out)"


def volume_of_claim(cluster: Cluster, namespace: str, claim: str) -> str:
    """The CSI volume id (= the SharedVolume's name) bound to a PVC."""
    pvc = must_get(cluster, "pvc", claim, namespace)
    pv_name = pvc["spec"].get("volumeName")
    assert pv_name, f"pvc {namespace}/{claim} is not bound"
    pv = must_get(cluster, "pv", pv_name)
    return str(pv["spec"]["csi"]["volumeHandle"])


def shared_volume(cluster: Cluster, volume: str) -> Obj:
    return must_get(cluster, "sharedvolumes.sharedsync.io", volume)


def all_in_sync(sv: Obj, replicas: int | None = None) -> bool:
    """Ready, with every desired replica present and InSync."""
    status = sv.get("status", {})
    desired = replicas if replicas is not None else status.get("desiredReplicas")
    states = [r.get("state") for r in status.get("replicas", []) or []]
    return (status.get("phase") == "Ready" and condition(sv, "Ready") == "True"
            and desired is not None and len(states) == desired
            and all(s == "InSync" for s in states)
            and status.get("readyReplicas") == desired)


def operator_leader_node(cluster: Cluster) -> str:
    """The node of the operator replica that holds the leader Lease."""
    lease = must_get(cluster, "lease", "sharedsync-operator", NAMESPACE)
    holder = lease["spec"]["holderIdentity"]
    return str(must_get(cluster, "pod", holder, NAMESPACE)["spec"]["nodeName"])


def node_pod(cluster: Cluster, node: str) -> str:
    """The name of the chart's node pod (CSI node plugin + agent) on ``node``."""
    pods = [p for p in items(cluster, "pods", "-l", f"app.kubernetes.io/instance={RELEASE},"
                             "app.kubernetes.io/component=node", namespace=NAMESPACE)
            if p["spec"].get("nodeName") == node and pod_ready(p)]
    assert pods, f"no Ready sharedsync node pod on {node}"
    return str(pods[0]["metadata"]["name"])


# -- inside pods -----------------------------------------------------------------------------


def exec_sh(cluster: Cluster, namespace: str, pod: str, script: str, *args: str,
            container: str | None = None, timeout: float = 180, check: bool = True) -> str:
    """Run a shell script in a pod's container (``args`` are its $1...); its stdout."""
    argv = ["exec", "-n", namespace, pod]
    if container:
        argv += ["-c", container]
    done = cluster.kubectl(*argv, "--", "sh", "-c", script, "sh", *args, timeout=timeout,
                           check=False)
    if check and done.returncode != 0:
        raise ClusterError(f"exec in {namespace}/{pod} exited {done.returncode}:\n"
                           f"{done.stderr[-3000:]}{done.stdout[-3000:]}")
    return done.stdout


@dataclass
class Verified:
    """What the in-pod verifier found in a records file."""

    ok: set[str] = field(default_factory=set)
    bad: list[str] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)
    missing_file: bool = False

    def assert_holds(self, acked: set[str], where: str) -> None:
        """Every acknowledged record is there with its checksum; nothing is corrupt. A torn
        line is allowed only as the unacknowledged tail of a writer that was cut off."""
        assert not self.missing_file, f"{where}: the records file is gone"
        lost = acked - self.ok
        assert not lost, f"{where}: {len(lost)} acknowledged records missing: {sorted(lost)[:20]}"
        assert not self.bad, f"{where}: records failing their checksum: {self.bad[:20]}"
        assert len(self.torn) <= 1, f"{where}: torn records: {self.torn[:20]}"


def verify_records(cluster: Cluster, namespace: str, pod: str, path: str) -> Verified:
    """Recompute every record's checksum inside the pod (tests/e2e/workloads.VERIFY_SCRIPT)."""
    out = exec_sh(cluster, namespace, pod, VERIFY_SCRIPT, path, timeout=600)
    found = Verified()
    lines = out.splitlines()
    assert lines, f"verifier in {pod} printed nothing"
    assert lines[-1] == "end", f"verifier in {pod} did not finish:\n{out[-2000:]}"
    for line in lines[:-1]:
        verdict, _, rest = line.partition(" ")
        if verdict == "ok":
            found.ok.add(rest)
        elif verdict == "bad":
            found.bad.append(rest)
        elif verdict == "torn":
            found.torn.append(rest)
        elif verdict == "missing":
            found.missing_file = True
    return found


def write_records(cluster: Cluster, namespace: str, pod: str, path: str, tag: str,
                  count: int) -> set[str]:
    """Append ``count`` records, each fsync'd; the ids the pod acknowledged (all of them)."""
    out = exec_sh(cluster, namespace, pod, WRITE_SCRIPT, path, tag, str(count), "0",
                  timeout=60 + 5 * count)
    acked = {line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("ack ")}
    assert len(acked) == count, f"{pod} acknowledged {len(acked)} of {count}:\n{out[-2000:]}"
    return acked


class RecordWriter:
    """A writer running in a pod (through a streaming ``kubectl exec``) while the test does
    something else: every record it acknowledged was fsync'd before the ack was printed."""

    def __init__(self, cluster: Cluster, namespace: str, pod: str, path: str, tag: str,
                 pause: str = "0") -> None:
        self.acked: set[str] = set()
        self.output: list[str] = []
        self._lock = threading.Lock()
        argv = cluster.kubectl_command("exec", "-n", namespace, pod, "--", "sh", "-c",
                                       WRITE_SCRIPT, "sh", path, tag, "0", pause)
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.rstrip("\n")
            with self._lock:
                self.output.append(line)
                if line.startswith("ack "):
                    self.acked.add(line.split(" ", 1)[1])

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def running(self) -> bool:
        return self._proc.poll() is None

    def wait_acks(self, at_least: int, timeout: float = 120) -> None:
        def enough() -> bool:
            if not self.running() and self.count() < at_least:
                raise AssertionError(f"the writer stopped: {self.tail()}")
            return self.count() >= at_least
        wait_until(enough, timeout=timeout, interval=0.5,
                   what=f"{at_least} acknowledged records")

    def tail(self) -> str:
        with self._lock:
            return "\n".join(self.output[-20:])

    def stop(self, grace: float = 10) -> set[str]:
        """End the stream (the remote loop dies on its next write to it); the acked ids."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._reader.join(timeout=grace)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        with self._lock:
            return set(self.acked)


# -- metrics ---------------------------------------------------------------------------------

_SCRAPE = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
           "'http://127.0.0.1:' + sys.argv[1] + '/metrics', timeout=30).read().decode())")
_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+'
                     r'(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(cluster: Cluster, pod: str, container: str, port: int) -> str:
    """A component's /metrics, fetched from inside its own container (our image has python):
    needs no route from the API server to pod addresses."""
    done = cluster.kubectl("exec", "-n", NAMESPACE, pod, "-c", container, "--", "python3",
                           "-c", _SCRAPE, str(port), timeout=60)
    return done.stdout


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name{labels...}`` (other labels ignored), or None."""
    total: float | None = None
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or match["name"] != name:
            continue
        have = dict(_LABEL.findall(match["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(match["value"])
    return total
