"""A node of the local cluster: its configuration files, its start, its death.

Everything a node needs is written under its directory before it starts (containerd's config,
the CNI conflist and plugins, kubelet's and kube-proxy's configs and certificates); then
``node-init.sh`` runs as the node's first process inside its namespaces. That process's pid is
the node's handle: ``exec`` enters its namespaces with ``nsenter``.

Killing a node (``kill``) must take everything with it at once, as a power cut would: kubelet,
containerd, the shims and every container. SIGKILL of kubelet and containerd alone leaves the
containers running, so the node's cgroup subtree is frozen, every process in it killed, thawed
and removed (stale cgroups slow the next start). With no process left, the node's mount
namespace and every mount in it disappear with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import yaml

from localcluster.controlplane import SERVER, write_kubeconfig
from localcluster.layout import CLUSTER_CIDR, NODE_DIRS, TOOLS_BIN, NodeLayout
from localcluster.pki import Pki
from localcluster.processes import StepError, alive, run, spawn, wait_for

NODE_INIT = Path(__file__).resolve().parent / "node-init.sh"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
START_TIMEOUT = 120.0
KILL_TIMEOUT = 30.0
SANDBOX_IMAGE = "localhost/pause:3.10"


def containerd_config() -> str:
    runc = TOOLS_BIN / "runc"
    return f"""\
# containerd of one local-cluster node (written by localcluster/node.py)
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.cri.v1.runtime"]
  # root here lacks CAP_SYS_RESOURCE: without this every sandbox fails on oom_score_adj
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["/opt/cni/bin"]
    conf_dir = "/etc/cni/net.d"

[plugins."io.containerd.cri.v1.images"]
  # no registry: images are imported; a pinned sandbox image is never garbage-collected
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{SANDBOX_IMAGE}"
"""


def cni_conflist(node: NodeLayout) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "sharedsync-local",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
             "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": node.pod_cidr}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(node: NodeLayout) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # the host has cgroup v1 (hybrid): kubelet 1.37 refuses it unless told
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        # each node's pods under its own cgroup, so that nodes do not collide
        "cgroupRoot": f"/{node.cgroup}",
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "address": node.address,
        "port": 10250,
        "tlsCertFile": "/etc/kubernetes/pki/kubelet.crt",
        "tlsPrivateKeyFile": "/etc/kubernetes/pki/kubelet.key",
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": "/etc/kubernetes/pki/ca.crt"}},
        "authorization": {"mode": "Webhook"},
        "podCIDR": node.pod_cidr,
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        "failSwapOn": False,
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "serializeImagePulls": False,
        # images cannot be pulled again: never garbage-collect or evict them
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "imagefs.available": "1%", "nodefs.inodesFree": "1%"},
        "protectKernelDefaults": False,
        "shutdownGracePeriod": "0s",
        "nodeStatusUpdateFrequency": "4s",
    }


def kube_proxy_config(node: NodeLayout) -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": "/etc/kubernetes/kube-proxy.kubeconfig"},
        "mode": "iptables",
        "clusterCIDR": CLUSTER_CIDR,
        "hostnameOverride": node.name,
        "bindAddress": node.address,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # conntrack sysctls are the host's, not the node's: leave them alone
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
        # route_localnet is not needed: NodePorts on 127.0.0.1 are not offered
        "iptables": {"localhostNodePorts": False},
    }


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def prepare(node: NodeLayout, pki: Pki) -> None:
    """Write the node's directories, configs and certificates (idempotent)."""
    for relative in NODE_DIRS:
        (node.root / relative).mkdir(parents=True, exist_ok=True)
    node.logs.mkdir(parents=True, exist_ok=True)
    _write(node.root / ".node-dirs", "".join(f"{d}\n" for d in NODE_DIRS))
    etc = node.root / "etc"
    _write(etc / "containerd" / "config.toml", containerd_config())
    _write(etc / "cni" / "net.d" / "10-sharedsync.conflist",
           json.dumps(cni_conflist(node), indent=2))
    cni_bin = node.root / "opt" / "cni" / "bin"
    cni_bin.mkdir(parents=True, exist_ok=True)
    for plugin in CNI_PLUGINS:
        link = cni_bin / plugin
        if not link.is_symlink():
            link.symlink_to(TOOLS_BIN / "cni" / plugin)
    kube = etc / "kubernetes"
    pki_dir = kube / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True)
    _write(pki_dir / "ca.crt", pki.ca_file.read_text())
    if not (pki_dir / "kubelet.crt").exists():
        cert, key = pki.serving_cert(f"kubelet-{node.name}", [node.name], [node.address])
        _write(pki_dir / "kubelet.crt", cert.read_text())
        _write(pki_dir / "kubelet.key", key.read_text(), 0o600)
    if not (kube / "kubelet.kubeconfig").exists():
        cert, key = pki.client_cert(f"kubelet-client-{node.name}", f"system:node:{node.name}",
                                    ["system:nodes"])
        write_kubeconfig(kube / "kubelet.kubeconfig", pki, f"system:node:{node.name}", cert, key,
                         SERVER)
    if not (kube / "kube-proxy.kubeconfig").exists():
        cert, key = pki.client_cert(f"kube-proxy-{node.name}", "system:kube-proxy")
        write_kubeconfig(kube / "kube-proxy.kubeconfig", pki, "system:kube-proxy", cert, key,
                         SERVER)
    _write(kube / "kubelet.yaml", yaml.safe_dump(kubelet_config(node), sort_keys=False))
    _write(kube / "kube-proxy.yaml", yaml.safe_dump(kube_proxy_config(node), sort_keys=False))
    _write(kube / "node-labels", f"topology.kubernetes.io/zone={node.zone}")


def pid(node: NodeLayout) -> int | None:
    return alive(node.pid_file, node.state)


def start(node: NodeLayout) -> int:
    """Start the node's init process unless it runs; wait for containerd's socket."""
    running = pid(node)
    if running is None:
        spawn(["ip", "netns", "exec", node.netns, "unshare", "--mount", "--propagation",
               "private", "--", "bash", str(NODE_INIT), node.name, str(node.root),
               str(node.logs), str(TOOLS_BIN), node.cgroup],
              pid_file=node.pid_file, log_file=node.logs / "node-init.log")
    wait_for(f"{node.name}: containerd", lambda: _containerd_up(node), timeout=START_TIMEOUT,
             log_file=node.logs / "containerd.log", pid_file=node.pid_file, marker=node.state)
    found = pid(node)
    if found is None:
        raise StepError(f"{node.name}: node-init exited; see {node.logs / 'node-init.log'}")
    return found


def nsenter(node: NodeLayout, argv: list[str], found: int | None = None) -> list[str]:
    """``argv`` run inside the node (its network and mount namespaces); ``found``: the node's
    init pid when the caller just looked it up."""
    found = found if found is not None else pid(node)
    if found is None:
        raise StepError(f"{node.name} is not running (scripts/cluster restart-node {node.name})")
    return ["nsenter", "-t", str(found), "-m", "-n", "--", *argv]


def _containerd_up(node: NodeLayout) -> bool:
    found = pid(node)
    if found is None:
        return False  # not yet, or gone: wait_for tells the two apart
    argv = nsenter(node, [str(TOOLS_BIN / "ctr"), "version"], found)
    return run(argv, check=False, timeout=20).returncode == 0


def ctr(node: NodeLayout, *args: str, timeout: float = 600) -> str:
    return run(nsenter(node, [str(TOOLS_BIN / "ctr"), "-n", "k8s.io", *args]),
               timeout=timeout).stdout


def _tarball_digest(tarball: Path) -> str:
    """The manifest digest an image tarball holds (its OCI index.json)."""
    with tarfile.open(tarball) as archive:
        member = archive.extractfile("index.json")
        if member is None:
            raise StepError(f"{tarball}: no index.json (not an OCI image tarball)")
        digest: str = json.load(member)["manifests"][0]["digest"]
        return digest


def import_images(node: NodeLayout, images: dict[str, Path]) -> list[str]:
    """Import every image (reference -> tarball) the node lacks or holds in another version
    (a rebuilt image keeps its tag); the references imported."""
    present = {}
    for line in ctr(node, "images", "ls").splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            present[fields[0]] = fields[2]
    imported = []
    for reference, tarball in images.items():
        if present.get(reference) == _tarball_digest(tarball):
            continue
        ctr(node, "images", "import", str(tarball))
        imported.append(reference)
    return imported


# -- killing -----------------------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """Every cgroup hierarchy mounted on the host: each v1 one, and the unified (v2) one,
    where runc makes every container's cgroup too on a hybrid host (left there, they are
    the host changed after ``down``)."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [CGROUP_ROOT]  # cgroup v2 only
    return [h for h in sorted(CGROUP_ROOT.iterdir()) if (h / "cgroup.procs").exists()]


def _subtree(top: Path) -> list[Path]:
    """``top`` and every cgroup below it, deepest first (the order rmdir needs)."""
    if not top.is_dir():
        return []
    found = [Path(dirpath) for dirpath, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _procs(cgroups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for cgroup in cgroups:
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
    return pids


def kill(node: NodeLayout) -> int:
    """SIGKILL everything of the node at once; remove its cgroups. The number killed."""
    freezer = CGROUP_ROOT / "freezer" / node.cgroup
    killed: set[int] = set()
    frozen = freezer.is_dir()
    if frozen:
        (freezer / "freezer.state").write_text("FROZEN")
        deadline = time.monotonic() + KILL_TIMEOUT
        while (freezer / "freezer.state").read_text().strip() != "FROZEN":
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    # the freezer holds every process of the node; the other hierarchies too (stragglers)
    for hierarchy in _hierarchies():
        for process in _procs(_subtree(hierarchy / node.cgroup)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)
                killed.add(process)
    init = pid(node)
    if init is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
            killed.add(init)
    if frozen:
        (freezer / "freezer.state").write_text("THAWED")
    deadline = time.monotonic() + KILL_TIMEOUT
    for hierarchy in _hierarchies():
        for cgroup in _subtree(hierarchy / node.cgroup):
            while True:
                try:
                    cgroup.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise StepError(
                            f"{node.name}: cgroup {cgroup} busy after the kill") from None
                    time.sleep(0.1)
    node.pid_file.unlink(missing_ok=True)
    return len(killed)
