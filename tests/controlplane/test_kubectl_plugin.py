"""``kubectl sharedsync`` as a user runs it: the installed executable (and once through kubectl's
own plugin lookup) against a real kube-apiserver.

The operator does not run here. The test plays it: it creates SharedVolumes, binds them to
claims the way the external-provisioner would (a PersistentVolume whose csi.volumeHandle is the
volume, a claim bound to it), and writes status and events the way the operator does, so that
every --wait is released by exactly the write the operator documents, and by nothing else. The
plugin prints a line when it has made its request (and when it saw a replica Rebuilding); the
test waits for those lines before it writes, which keeps every step ordered without a sleep.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sharedsync_operator import kube as operator_kube
from sharedsync_operator import volumes

from csi_driver.config import DRIVER_NAME
from sharedsync.kubectl_plugin import kube, render

from .controlplane import TOOLS_BIN, ControlPlane

pytestmark = pytest.mark.timeout(300)

PLUGIN = Path(sys.executable).parent / "kubectl-sharedsync"
#: Bound on one plugin run, and on what a --wait may take in these tests (the plugin's own
#: timeout is set above it, so a wait that never ends shows up as the plugin still running).
RUN_TIMEOUT = 60.0

Obj = dict[str, Any]


def stamp(offset: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def condition(kind: str, status: str, reason: str, message: str) -> Obj:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2030-01-01T00:00:00Z"}


def replica(node: str, role: str = "replica", state: str = "InSync", **extra: Any) -> Obj:
    return {"node": node, "role": role, "state": state, "lagSeconds": 0.0,
            "lastSyncTime": "2030-01-01T00:00:00Z", **extra}


def healthy_status() -> Obj:
    """What the operator writes for a Synchronous volume with one replica lagging."""
    return {
        "phase": "Degraded", "mode": "Synchronous", "primary": "node-a", "epoch": 4,
        "readyReplicas": 2, "desiredReplicas": 3, "replicasReady": "2/3",
        "lag": "7.2s", "lagSeconds": 7.2,
        "syncLatency": {"p50Seconds": 0.004, "p90Seconds": 0.011, "p99Seconds": 0.0213},
        "replicas": [replica("node-a", "primary"), replica("node-b"),
                     replica("node-c", state="Lagging", lagSeconds=7.2,
                             message="7.2s behind (maxLag 5s)")],
        "conditions": [condition("Ready", "True", "Serving", "the volume can be used"),
                       condition("Degraded", "True", "ReplicaLagging", "node-c is 7.2s behind"),
                       condition("Synced", "False", "Lagging", "node-c lacks changes")],
    }


class Scene:
    """The objects of one test: SharedVolumes, claims bound to them, events. Removed at the end."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.namespace = f"plugin-{secrets.token_hex(3)}"
        cp.apply({"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": self.namespace}})
        self.cluster_objects: list[str] = []
        self.plugins: list[Plugin] = []

    def start(self, *args: str) -> Plugin:
        """The plugin running in the background, with a wait bound far above the test's."""
        plugin = Plugin(argv(self.cp, *args, "--timeout=5m"))
        self.plugins.append(plugin)
        return plugin

    def volume(self, status: Obj | None = None, policy: str = "sync") -> str:
        name = f"vol-{secrets.token_hex(12)}"
        self.cp.apply({"apiVersion": "sharedsync.io/v1alpha1", "kind": "SharedVolume",
                       "metadata": {"name": name},
                       "spec": {"capacity": "1Gi", "policy": policy,
                                "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem",
                                "parameters": {"syncPolicy": policy}}})
        self.cluster_objects.append(f"sharedvolume.sharedsync.io/{name}")
        if status is not None:
            self.status(name, status)
        return name

    def status(self, name: str, status: Obj) -> None:
        """A status write, as the operator makes it (merge patch of the status subresource)."""
        self.cp.kubectl("patch", "sharedvolume", name, "--subresource=status", "--type=merge",
                        "-p", json.dumps({"status": status}))

    def annotate(self, name: str, key: str, value: str | None) -> None:
        self.cp.kubectl("patch", "sharedvolume", name, "--type=merge", "-p",
                        json.dumps({"metadata": {"annotations": {key: value}}}))

    def get(self, name: str) -> Obj:
        found: Obj = json.loads(self.cp.kubectl("get", "sharedvolume", name, "-o",
                                                "json").stdout)
        return found

    def annotations(self, name: str) -> dict[str, str]:
        return dict(self.get(name)["metadata"].get("annotations") or {})

    def bind(self, volume: str, claim: str, driver: str = kube.DRIVER_NAME) -> None:
        """A PersistentVolume for ``volume`` and the claim ``claim`` bound to it."""
        pv = f"pv-{secrets.token_hex(6)}"
        self.cp.apply({
            "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "csi": {"driver": driver, "volumeHandle": volume},
                     "claimRef": {"namespace": self.namespace, "name": claim}}})
        self.cluster_objects.append(f"persistentvolume/{pv}")
        self.cp.apply({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": self.namespace},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}}})

    def event(self, volume: str, reason: str, message: str, when: str | None = None) -> None:
        """An event about ``volume`` as kopf posts one for a cluster-scoped object (in the
        operator's namespace, here the test's)."""
        when = when or stamp()
        uid = self.get(volume)["metadata"]["uid"]
        self.cp.kubectl("create", "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": "kopf-event-", "namespace": self.namespace},
            "involvedObject": {"apiVersion": "sharedsync.io/v1alpha1", "kind": "SharedVolume",
                               "name": volume, "uid": uid, "namespace": self.namespace},
            "type": "Warning" if reason.endswith("Refused") else "Normal",
            "reason": reason, "message": message, "action": "Action?",
            "reportingComponent": "kopf", "reportingInstance": "dev",
            "source": {"component": "kopf"},
            "firstTimestamp": when, "lastTimestamp": when, "eventTime": when}))

    def close(self) -> None:
        for plugin in self.plugins:
            plugin.stop()
        self.cp.kubectl("delete", "namespace", self.namespace, "--wait=false")
        for ref in reversed(self.cluster_objects):
            self.cp.kubectl("delete", ref, "--ignore-not-found", "--wait=false")


class Plugin:
    """A running ``kubectl-sharedsync``, its output read line by line as it comes."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        self._readers = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_out(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.process.stderr is not None
        with self.process.stderr:
            self.errors += self.process.stderr

    def stop(self) -> None:
        """Kill it if still running (a test that failed half-way), and collect it."""
        if self.running():
            self.process.kill()
        self.process.wait()
        for reader in self._readers:
            reader.join(RUN_TIMEOUT)

    def expect(self, text: str) -> str:
        """The next stdout line containing ``text`` (fails if the plugin ends first)."""
        while True:
            try:
                line = self.lines.get(timeout=RUN_TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} yet; got {self.seen}") from None
            if line is None:
                raise AssertionError(f"the plugin ended without printing {text!r}: "
                                     f"{self.seen} {self.finish()}")
            self.seen.append(line)
            if text in line:
                return line

    def running(self) -> bool:
        return self.process.poll() is None

    def finish(self) -> tuple[int, str, str]:
        """(exit status, all of stdout, stderr) once it ends."""
        try:
            self.process.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the plugin did not end; said {self.seen}") from None
        for reader in self._readers:
            reader.join(RUN_TIMEOUT)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.seen.append(line)
        return self.process.returncode, "\n".join(self.seen), "".join(self.errors)


@pytest.fixture
def cp(control_plane: ControlPlane) -> ControlPlane:
    if not os.access(PLUGIN, os.X_OK):
        pytest.fail(f"{PLUGIN} is not installed: run scripts/setup (pyproject.toml changed)")
    return control_plane


@pytest.fixture
def scene(cp: ControlPlane) -> Iterator[Scene]:
    made = Scene(cp)
    try:
        yield made
    finally:
        made.close()


def argv(cp: ControlPlane, *args: str) -> list[str]:
    return [str(PLUGIN), *args, f"--kubeconfig={cp.kubeconfig}"]


def run(cp: ControlPlane, *args: str, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv(cp, *args), capture_output=True, text=True, env=env,
                          timeout=RUN_TIMEOUT, check=False)


def rows(text: str, header: str) -> list[dict[str, str]]:
    """The rows of the table whose header line starts with ``header``, as {COLUMN: cell}
    (the last column takes the rest of the line: messages have spaces)."""
    lines = text.splitlines()
    start_at = next(n for n, line in enumerate(lines) if line.strip().startswith(header))
    columns = lines[start_at].split()
    found = []
    for line in lines[start_at + 1:]:
        first = line.split()[0] if line.strip() else ""
        if not first or first.endswith(":") or "=" in first or first == "pending":
            break  # the end of the table: a blank line, a condition, a pending request
        found.append(dict(zip(columns, line.split(maxsplit=len(columns) - 1), strict=True)))
    return found


# -- the contract with the operator --------------------------------------------------------------


def test_the_plugin_uses_the_operators_and_drivers_names() -> None:
    assert (render.SYNC_NOW, render.SWITCHOVER, render.REBUILD) == \
        (volumes.SYNC_NOW, volumes.SWITCHOVER, volumes.REBUILD)
    assert kube.DRIVER_NAME == DRIVER_NAME
    assert (kube.GROUP, kube.VERSION, kube.SHARED_VOLUMES) == \
        (operator_kube.GROUP, operator_kube.VERSION, operator_kube.SHARED_VOLUMES)


# -- status --------------------------------------------------------------------------------------


def test_status_shows_what_the_operator_wrote_for_a_volume_and_its_claim(scene: Scene,
                                                                          cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    scene.bind(name, "data")
    for target in (name, f"sv/{name}", "pvc/data", "data"):
        done = run(cp, "status", target, "-n", scene.namespace)
        assert done.returncode == 0, done.stderr
        (row,) = rows(done.stdout, "NAME")
        assert row == {"NAME": name, "PVC": f"{scene.namespace}/data", "POLICY": "sync",
                       "MODE": "Synchronous", "REPLICAS": "2/3", "PRIMARY": "node-a",
                       "EPOCH": "4", "LAG": "7.2s", "SYNC-P99": "21.3ms",
                       "CONDITIONS": "Ready=True,Degraded=True,Synced=False"}, target
        replicas = rows(done.stdout, "NODE")
        assert [(r["NODE"], r["ROLE"], r["STATE"], r["LAG"]) for r in replicas] == [
            ("node-a", "primary", "InSync", "0.0s"), ("node-b", "replica", "InSync", "0.0s"),
            ("node-c", "replica", "Lagging", "7.2s")]
        assert replicas[2]["MESSAGE"] == "7.2s behind (maxLag 5s)"
        # the conditions not in their healthy state, with the operator's words
        assert "Degraded=True ReplicaLagging: node-c is 7.2s behind" in done.stdout
        assert "Synced=False Lagging: node-c lacks changes" in done.stdout


def test_status_json_and_pending_requests(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    scene.bind(name, "db")
    scene.annotate(name, render.SWITCHOVER, "node-b")
    done = run(cp, "status", "pvc/db", f"--namespace={scene.namespace}", "-o", "json")
    assert done.returncode == 0, done.stderr
    (view,) = json.loads(done.stdout)
    assert view["name"] == name
    assert view["pvc"] == {"namespace": scene.namespace, "name": "db"}
    assert (view["mode"], view["primary"], view["epoch"]) == ("Synchronous", "node-a", 4)
    assert (view["readyReplicas"], view["desiredReplicas"]) == (2, 3)
    assert view["syncP99Seconds"] == pytest.approx(0.0213)
    assert [c["type"] for c in view["conditions"]] == ["Ready", "Degraded", "Synced"]
    assert [r["node"] for r in view["replicas"]] == ["node-a", "node-b", "node-c"]
    assert view["pending"] == {"switchover": "node-b"}


def test_status_of_a_namespace_lists_only_the_volumes_of_its_claims(scene: Scene,
                                                                     cp: ControlPlane) -> None:
    mine, other, unclaimed = (scene.volume(healthy_status()) for _ in range(3))
    scene.bind(mine, "mine")
    foreign = Scene(cp)
    try:
        foreign.bind(other, "theirs")
        done = run(cp, "status", "-n", scene.namespace)
        assert done.returncode == 0, done.stderr
        assert [r["NAME"] for r in rows(done.stdout, "NAME")] == [mine]
        everything = run(cp, "status", "-o", "json")
        assert everything.returncode == 0, everything.stderr
        listed = {v["name"]: v["pvc"] for v in json.loads(everything.stdout)}
        assert {mine, other, unclaimed} <= set(listed)
        assert listed[unclaimed] is None
        assert listed[other] == {"namespace": foreign.namespace, "name": "theirs"}
    finally:
        foreign.close()


def test_a_volume_the_operator_has_not_handled_yet(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume()
    done = run(cp, "status", name)
    assert done.returncode == 0, done.stderr
    (row,) = rows(done.stdout, "NAME")
    assert row["REPLICAS"] == row["PRIMARY"] == row["CONDITIONS"] == "-"
    assert "no replicas reported yet" in done.stdout


def test_kubectl_finds_the_plugin_on_path(scene: Scene, cp: ControlPlane) -> None:
    """`kubectl sharedsync ...` runs kubectl-sharedsync from PATH with the arguments after the
    plugin's name (kubectl refuses its own flags before it)."""
    name = scene.volume(healthy_status())
    env = {**os.environ, "PATH": f"{PLUGIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([str(TOOLS_BIN / "kubectl"), "sharedsync", "status", name,
                           f"--kubeconfig={cp.kubeconfig}"], env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    assert rows(done.stdout, "NAME")[0]["NAME"] == name


# -- errors --------------------------------------------------------------------------------------


def test_unknown_volumes_and_claims_exit_1_naming_them(scene: Scene, cp: ControlPlane) -> None:
    missing = f"vol-{secrets.token_hex(12)}"
    for args in (("status", missing), ("sync-now", missing), ("switchover", missing, "--to=a"),
                 ("rebuild", missing, "--node=a")):
        done = run(cp, *args)
        assert done.returncode == 1, args
        assert f"SharedVolume {missing} not found" in done.stderr, done.stderr
    done = run(cp, "sync-now", "pvc/nothing", "-n", scene.namespace)
    assert done.returncode == 1
    assert f"PersistentVolumeClaim {scene.namespace}/nothing not found" in done.stderr
    # a claim bound to another driver's volume is not ours to act on
    scene.bind("not-ours", "elsewhere", driver="other.csi.example.com")
    done = run(cp, "sync-now", "pvc/elsewhere", "-n", scene.namespace)
    assert done.returncode == 1
    assert "not a sharedsync volume" in done.stderr
    # status shows what it found and names what it did not
    name = scene.volume(healthy_status())
    done = run(cp, "status", name, missing)
    assert done.returncode == 1
    assert [r["NAME"] for r in rows(done.stdout, "NAME")] == [name]
    assert missing in done.stderr


def test_api_errors_exit_1_with_the_servers_message(scene: Scene, cp: ControlPlane,
                                                    tmp_path: Path) -> None:
    nobody = cp.service_account_kubeconfig(scene.namespace, "nobody")
    done = subprocess.run([str(PLUGIN), "status", f"--kubeconfig={nobody}"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 1
    assert "403" in done.stderr
    assert "forbidden" in done.stderr
    assert "Traceback" not in done.stderr

    dead = tmp_path / "dead.kubeconfig"
    config = cp.kubeconfig.read_text().replace(cp.server, "https://127.0.0.1:1")
    dead.write_text(config)
    done = subprocess.run([str(PLUGIN), "status"], env={**os.environ, "KUBECONFIG": str(dead)},
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 1
    assert "cannot reach the API server" in done.stderr

    done = subprocess.run([str(PLUGIN), "status"],
                          env={**os.environ, "KUBECONFIG": str(tmp_path / "absent")},
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 1
    assert "no kubeconfig file" in done.stderr


# -- sync-now ------------------------------------------------------------------------------------


def test_sync_now_sets_a_fresh_timestamp(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    scene.bind(name, "data")
    values = []
    for target in (name, "pvc/data"):
        done = run(cp, "sync-now", target, "-n", scene.namespace)
        assert done.returncode == 0, done.stderr
        value = scene.annotations(name)[render.SYNC_NOW]
        assert f"{render.SYNC_NOW}={value}" in done.stdout
        datetime.datetime.fromisoformat(value)  # a timestamp
        values.append(value)
    assert values[0] != values[1]


def test_sync_now_wait_returns_once_the_operator_recorded_that_value(scene: Scene,
                                                                      cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    plugin = scene.start("sync-now", name, "--wait")
    plugin.expect("requested")
    value = scene.annotations(name)[render.SYNC_NOW]
    scene.status(name, {"lastSyncNow": "an earlier request"})
    assert plugin.running()  # another value is not ours
    # the operator: sync, record the value, drop the annotation
    scene.status(name, {"lastSyncNow": value})
    scene.annotate(name, render.SYNC_NOW, None)
    code, out, err = plugin.finish()
    assert code == 0, err
    assert "synced" in out


def test_a_wait_without_an_operator_times_out(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    done = subprocess.run([str(PLUGIN), "sync-now", name, "--wait", "--timeout=1s",
                           f"--kubeconfig={cp.kubeconfig}"],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    assert done.returncode == 1
    assert "timed out" in done.stderr
    assert "is the operator running?" in done.stderr


# -- switchover ----------------------------------------------------------------------------------


def test_switchover_refuses_a_node_without_a_replica(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    done = run(cp, "switchover", name, "--to", "node-z")
    assert done.returncode == 1
    assert "node node-z holds no replica" in done.stderr
    assert render.SWITCHOVER not in scene.annotations(name)
    done = run(cp, "switchover", name, "--to", "node-a")  # the primary already
    assert done.returncode == 0, done.stderr
    assert "node-a is the primary already" in done.stdout
    assert render.SWITCHOVER not in scene.annotations(name)


def test_switchover_wait_returns_once_the_primary_moved(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    plugin = scene.start("switchover", name, "--to", "node-b", "--wait")
    plugin.expect("switchover to node-b requested")
    assert scene.annotations(name)[render.SWITCHOVER] == "node-b"
    # the operator writes the new layout first, then promotes, then drops the annotation
    moved = healthy_status()
    moved.update(primary="node-b", epoch=5,
                 replicas=[replica("node-a"), replica("node-b", "primary"), replica("node-c")])
    scene.status(name, moved)
    assert plugin.running()  # the annotation is still there: not done yet
    scene.annotate(name, render.SWITCHOVER, None)
    code, out, err = plugin.finish()
    assert code == 0, err
    assert "primary is node-b (epoch 5)" in out


def test_switchover_wait_ends_with_the_operators_refusal(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    scene.event(name, "SwitchoverRefused", "an old refusal, before this request")
    plugin = scene.start("switchover", name, "--to", "node-c", "--wait")
    plugin.expect("requested")
    assert plugin.running()  # the old refusal is not about this request
    scene.event(name, "SwitchoverRefused", f"switchover target node-c is not a live replica "
                                           f"of {name}")
    code, _, err = plugin.finish()
    assert code == 1
    assert "the operator refused: SwitchoverRefused: switchover target node-c" in err


# -- rebuild -------------------------------------------------------------------------------------


def test_rebuild_refuses_the_primary_and_strangers(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    done = run(cp, "rebuild", name, "--node", "node-a")
    assert done.returncode == 1
    assert "holds the primary" in done.stderr
    assert "switchover" in done.stderr
    done = run(cp, "rebuild", name, "--node", "node-q")
    assert done.returncode == 1
    assert "node node-q holds no replica" in done.stderr
    assert render.REBUILD not in scene.annotations(name)
    done = run(cp, "rebuild", name, "--node", "node-c")
    assert done.returncode == 0, done.stderr
    assert scene.annotations(name)[render.REBUILD] == "node-c"


def test_rebuild_wait_needs_rebuilding_then_in_sync(scene: Scene, cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    plugin = scene.start("rebuild", name, "--node", "node-c", "--wait")
    plugin.expect("rebuild of the replica on node-c requested")
    assert scene.annotations(name)[render.REBUILD] == "node-c"

    def with_c(**c: Any) -> Obj:
        status = healthy_status()
        status["replicas"] = [replica("node-a", "primary"), replica("node-b"),
                              replica("node-c", **c)]
        return status

    # the operator drops the replica and starts copying it, then drops the annotation
    scene.status(name, with_c(state="Rebuilding", rebuildProgress=0.1, message="copying"))
    scene.annotate(name, render.REBUILD, None)
    plugin.expect("replica on node-c is Rebuilding")
    scene.status(name, with_c(state="Rebuilding", rebuildProgress=0.9, message="copying"))
    assert plugin.running()
    scene.status(name, with_c(state="InSync"))
    code, out, err = plugin.finish()
    assert code == 0, err
    assert "replica on node-c rebuilt and InSync" in out


def test_rebuild_wait_sees_a_rebuild_too_quick_for_status(scene: Scene, cp: ControlPlane) -> None:
    """A small replica can be copied between two status writes: then the operator's
    RebuildStarted event, and a last sync after it, say that it was rebuilt."""
    name = scene.volume(healthy_status())
    plugin = scene.start("rebuild", name, "--node", "node-c", "--wait")
    plugin.expect("requested")
    started = stamp()
    scene.event(name, "RebuildStarted", "replica on node-c dropped; rebuilding it from node-a",
                when=started)
    scene.annotate(name, render.REBUILD, None)
    # InSync, but from before the rebuild (a stale report): not done
    status = healthy_status()
    status["replicas"][2] = replica("node-c", lastSyncTime="2020-01-01T00:00:00Z")
    scene.status(name, status)
    assert plugin.running()
    status["replicas"][2] = replica("node-c", lastSyncTime=stamp(offset=1.0))
    scene.status(name, status)
    code, out, err = plugin.finish()
    assert code == 0, err
    assert "rebuilt and InSync" in out


def test_rebuild_wait_reports_a_failed_rebuild_and_a_refusal(scene: Scene,
                                                             cp: ControlPlane) -> None:
    name = scene.volume(healthy_status())
    plugin = scene.start("rebuild", name, "--node", "node-c", "--wait")
    plugin.expect("requested")
    status = healthy_status()
    status["replicas"][2] = replica("node-c", state="Rebuilding", rebuildProgress=0.5)
    scene.status(name, status)
    scene.annotate(name, render.REBUILD, None)
    plugin.expect("is Rebuilding")
    status["replicas"][2] = replica("node-c", state="Failed", message="btrfs receive: ENOSPC")
    scene.status(name, status)
    code, _, err = plugin.finish()
    assert code == 1
    assert "the rebuild of the replica on node-c failed: btrfs receive: ENOSPC" in err

    scene.status(name, healthy_status())
    plugin = scene.start("rebuild", name, "--node", "node-b", "--wait")
    plugin.expect("requested")
    scene.annotate(name, render.REBUILD, None)
    scene.event(name, "RebuildRefused", "rebuild node-b: only a live replica other than the "
                                        "primary (node-a) can be rebuilt")
    code, _, err = plugin.finish()
    assert code == 1
    assert "the operator refused: RebuildRefused: rebuild node-b" in err
