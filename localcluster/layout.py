"""Names, addresses and paths of the local cluster: one place, so every verb agrees.

Addresses are private and fixed (a second cluster on the same host is refused, not renumbered):
the host bridge ``sscl0`` is 10.78.0.254/24 and node ``i`` (1-based) is 10.78.0.i in network
namespace ``sscl-node-i``; its pods get 10.244.i.0/24. The test tiers' own network uses
10.77.0.0/24, so a cluster and the integration tests can coexist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS_BIN = Path(os.environ.get("SHAREDSYNC_TOOLS_BIN",
                                Path.home() / ".cache" / "sharedsync" / "bin"))

BRIDGE = "sscl0"
HOST_ADDRESS = "10.78.0.254"
NODE_SUBNET_PREFIX = "10.78.0"
PREFIX_LEN = 24
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
#: The ``kubernetes`` Service's ClusterIP (the first address of SERVICE_CIDR).
SERVICE_IP = "10.96.0.1"
APISERVER_PORT = 6443
ETCD_CLIENT_PORT = 32379
ETCD_PEER_PORT = 32380
CONTROLLER_MANAGER_PORT = 10257
SCHEDULER_PORT = 10259
#: Parent of every node's cgroups, in each cgroup v1 hierarchy (kill-node freezes one subtree).
CGROUP_PARENT = "sharedsync-cluster"
MAX_NODES = 200
DEFAULT_NODES = 3


def state_dir() -> Path:
    """Where the cluster keeps everything (``SHAREDSYNC_CLUSTER_DIR``, else build/cluster)."""
    return Path(os.environ.get("SHAREDSYNC_CLUSTER_DIR", REPO / "build" / "cluster")).resolve()


@dataclass(frozen=True)
class NodeLayout:
    """One node: its name, number, addresses, namespace and directories."""

    index: int
    state: Path

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def zone(self) -> str:
        return f"zone-{self.index}"

    @property
    def address(self) -> str:
        return f"{NODE_SUBNET_PREFIX}.{self.index}"

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def netns(self) -> str:
        return f"sscl-{self.name}"

    @property
    def host_veth(self) -> str:
        """The bridge-side end of the node's cable (down = partitioned)."""
        return f"sscl-v{self.index}"

    @property
    def peer_veth(self) -> str:
        """The node-side end before it moves into the namespace and becomes eth0."""
        return f"sscl-p{self.index}"

    @property
    def dir(self) -> Path:
        return self.state / "nodes" / self.name

    @property
    def root(self) -> Path:
        """The node's own copies of /var/lib/kubelet, /etc/cni, ... (bound over the real paths)."""
        return self.dir / "root"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def cgroup(self) -> str:
        """The node's cgroup, relative to each hierarchy's root (kubelet's cgroupRoot too)."""
        return f"{CGROUP_PARENT}/{self.name}"

    @property
    def pid_file(self) -> Path:
        return self.state / "run" / f"{self.name}.pid"


#: Directories every node has its own copy of, bound over the standard path inside the node.
#: These are what kubelet, containerd, the CNI plugins and kube-proxy use, plus the sharedsync
#: agent's data directory (hostPath in the chart), so no two nodes share state.
NODE_DIRS = (
    "etc/kubernetes", "etc/containerd", "etc/cni", "opt/cni", "opt/containerd",
    "var/lib/kubelet", "var/lib/containerd", "var/lib/cni", "var/lib/sharedsync",
    "var/log/pods", "var/log/containers",
)


def node_layout(index: int) -> NodeLayout:
    if not 1 <= index <= MAX_NODES:
        raise ValueError(f"node number {index} out of range 1..{MAX_NODES}")
    return NodeLayout(index, state_dir())


def parse_node(name: str) -> NodeLayout:
    """``node-2`` (or just ``2``) -> its layout; a clear error for anything else."""
    number = name.removeprefix("node-")
    if not number.isdigit():
        raise ValueError(f"no such node {name!r}: nodes are named node-1, node-2, ...")
    return node_layout(int(number))
