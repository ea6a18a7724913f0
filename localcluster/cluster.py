"""The verbs of ``scripts/cluster``: up, down, status, kill-node, restart-node, partition, heal.

Each verb prints its steps as it goes; a failing step raises :class:`StepError` naming itself and
the log file to read. ``up`` is idempotent: what runs is kept, what is missing is made.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from localcluster import hoststate, images, network, node
from localcluster.controlplane import ControlPlane
from localcluster.layout import (
    CGROUP_PARENT,
    REPO,
    TOOLS_BIN,
    NodeLayout,
    node_layout,
    state_dir,
)
from localcluster.processes import StepError, run, wait_for

TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl",
         "kubelet", "kube-proxy", "containerd", "containerd-shim-runc-v2", "ctr", "runc",
         "cni/bridge", "cni/host-local", "cni/loopback", "cni/portmap", "snapshot-controller",
         "csi-provisioner", "csi-resizer", "csi-snapshotter", "helm", "pause")
READY_TIMEOUT = 180.0


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _timed(text: str, action: Callable[[], object]) -> None:
    start = time.monotonic()
    step(text)
    action()
    print(f"    done in {time.monotonic() - start:.1f}s", flush=True)


def _nodes_file(state: Path) -> Path:
    return state / "nodes.json"


def known_nodes() -> list[NodeLayout]:
    """The nodes the cluster was brought up with (none when it is down)."""
    path = _nodes_file(state_dir())
    if not path.exists():
        return []
    return [node_layout(i) for i in range(1, json.loads(path.read_text())["nodes"] + 1)]


def kubectl(*args: str, check: bool = True, timeout: float = 60) -> str:
    return run([str(TOOLS_BIN / "kubectl"), f"--kubeconfig={state_dir() / 'kubeconfig'}",
                *args], check=check, timeout=timeout).stdout


def _require_root() -> None:
    if os.geteuid() != 0:
        raise StepError("the local cluster needs root (namespaces, mounts, cgroups)")


def _build_tools() -> None:
    missing = [t for t in TOOLS if not os.access(TOOLS_BIN / t, os.X_OK)]
    if missing:
        run([str(REPO / "scripts" / "build-tools"), *missing], timeout=7200)


def _ready_nodes() -> set[str]:
    out = kubectl("get", "nodes", "-o", "json", check=False)
    if not out:
        return set()
    ready = set()
    for item in json.loads(out)["items"]:
        conditions = {c["type"]: c["status"] for c in item["status"].get("conditions", [])}
        if conditions.get("Ready") == "True":
            ready.add(item["metadata"]["name"])
    return ready


def up(count: int) -> None:
    _require_root()
    state = state_dir()
    previous = known_nodes()
    if previous and len(previous) != count:
        raise StepError(f"the cluster in {state} has {len(previous)} nodes; "
                        "`scripts/cluster down` first to change that")
    nodes = [node_layout(i) for i in range(1, count + 1)]
    state.mkdir(parents=True, exist_ok=True)
    _timed("tools (scripts/build-tools, skipped when built)", _build_tools)
    built: dict[str, Path] = {}
    _timed("images (scripts/build-image, scripts/build-node-images)",
           lambda: built.update(images.build()))
    _timed("host: record settings, mount points", lambda: hoststate.record(state))
    _nodes_file(state).write_text(json.dumps({"nodes": count}) + "\n")

    def make_network() -> None:
        network.ensure_bridge()
        for each in nodes:
            network.ensure_node(each, nodes)

    _timed(f"network: bridge and {count} node namespaces", make_network)
    control = ControlPlane(state)
    _timed("control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, "
           "snapshot-controller", control.start)
    for each in nodes:
        def start_node(each: NodeLayout = each) -> None:
            node.prepare(each, control.pki)
            node.start(each)
            imported = node.import_images(each, built)
            if imported:
                print(f"    imported {', '.join(imported)}", flush=True)
        _timed(f"{each.name}: containerd, kubelet, kube-proxy; images", start_node)

    def all_ready() -> None:
        wait_for(f"{count} nodes Ready", lambda: _ready_nodes() >= {n.name for n in nodes},
                 timeout=READY_TIMEOUT, log_file=nodes[0].logs / "kubelet.log")

    _timed("nodes Ready", all_ready)
    print(kubectl("get", "nodes", "-o", "wide"))
    print(f"kubeconfig: {state / 'kubeconfig'}\n"
          f"  export KUBECONFIG={state / 'kubeconfig'} PATH={TOOLS_BIN}:$PATH\n"
          "  kubectl get nodes\n"
          "  scripts/cluster kill-node node-2 | restart-node node-2 | partition node-2 | "
          "heal node-2 | status | down")


def _loop_devices_under(root: Path) -> list[str]:
    """Loop devices whose backing file lies under ``root`` (found by inode: the path a loop
    device reports is the one seen from the node's mount namespace)."""
    files = set()
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, filename))
            except OSError:
                continue
            files.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    out = run(["losetup", "--list", "--json", "--output", "NAME,BACK-MAJ:MIN,BACK-INO"],
              check=False).stdout
    devices = []
    for device in json.loads(out or "{}").get("loopdevices", []):
        majmin = str(device.get("back-maj:min", "")).strip()
        if ":" not in majmin or device.get("back-ino") is None:
            continue
        major, minor = (int(x) for x in majmin.split(":"))
        if (major, minor, int(device["back-ino"])) in files:
            devices.append(str(device["name"]))
    return devices


def _leftover_nodes() -> list[NodeLayout]:
    """Every node a cluster here may have left: recorded, or found as a namespace or a node
    directory (an ``up`` killed before it wrote its record)."""
    numbers = {n.index for n in known_nodes()}
    numbers |= {int(ns.removeprefix("sscl-node-")) for ns in network.namespaces()
                if ns.startswith("sscl-node-") and ns.removeprefix("sscl-node-").isdigit()}
    nodes_dir = state_dir() / "nodes"
    if nodes_dir.is_dir():
        numbers |= {int(d.name.removeprefix("node-")) for d in nodes_dir.iterdir()
                    if d.name.removeprefix("node-").isdigit()}
    return [node_layout(i) for i in sorted(numbers)]


def down() -> None:
    _require_root()
    state = state_dir()
    nodes = _leftover_nodes()
    for each in nodes:
        step(f"{each.name}: kill every process, cgroups")
        node.kill(each)
        for pid in network.netns_pids(each):  # e.g. a `scripts/cluster exec` still running
            os.kill(pid, 9)
    if (state / "nodes").exists():
        for device in _loop_devices_under(state / "nodes"):
            step(f"detach {device}")
            run(["losetup", "--detach", device], check=False)
    step("control plane: stop")
    ControlPlane(state).stop()
    step("network: remove")
    for each in nodes:
        network.remove_node(each)
    network.remove_bridge()
    step("host: restore settings, remove mount points and cgroups")
    for done in hoststate.restore(state):
        print(f"    {done}")
    for hierarchy in node._hierarchies():
        parent = hierarchy / CGROUP_PARENT
        if parent.is_dir():
            parent.rmdir()
    step(f"remove {state}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(state)], check=True)


def status() -> int:
    state = state_dir()
    nodes = known_nodes()
    if not nodes:
        print(f"no cluster in {state}")
        return 1
    healthy = True
    for name, pid in ControlPlane(state).running().items():
        print(f"{name:26} {'running, pid ' + str(pid) if pid else 'NOT RUNNING'}")
        healthy &= pid is not None
    for each in nodes:
        pid = node.pid(each)
        cut = network.partitioned(each)
        print(f"{each.name:26} {'running, pid ' + str(pid) if pid else 'KILLED'}"
              f"{', PARTITIONED' if cut else ''}  {each.address}  {each.zone}")
        healthy &= pid is not None and not cut
    print(kubectl("get", "nodes", "-o", "wide", check=False, timeout=15))
    return 0 if healthy else 1


def kill_node(name: str) -> None:
    _require_root()
    each = _known(name)
    count = node.kill(each)
    print(f"{each.name}: killed {count} processes (kubelet, containerd, shims, pods)")


def restart_node(name: str) -> None:
    _require_root()
    each = _known(name)
    node.start(each)
    wait_for(f"{each.name} Ready", lambda: each.name in _ready_nodes(), timeout=READY_TIMEOUT,
             log_file=each.logs / "kubelet.log")
    print(f"{each.name}: running and Ready")


def partition(name: str, cut: bool) -> None:
    _require_root()
    each = _known(name)
    network.set_partitioned(each, cut)
    print(f"{each.name}: {'partitioned from the others' if cut else 'connected again'}")


def exec_argv(name: str, argv: list[str]) -> list[str]:
    return node.nsenter(_known(name), argv or ["bash"])


def _known(name: str) -> NodeLayout:
    wanted = node_layout(int(name.removeprefix("node-"))) if name.removeprefix(
        "node-").isdigit() else None
    if wanted is None or wanted not in known_nodes():
        names = ", ".join(n.name for n in known_nodes()) or "none: the cluster is down"
        raise StepError(f"no node {name!r} (nodes: {names})")
    return wanted
