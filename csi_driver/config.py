"""Settings of one CSI plugin process, from flags or environment (see ``csi_driver.cli``)."""

import enum
from dataclasses import dataclass, field
from pathlib import Path

DRIVER_NAME = "csi.sharedsync.io"
#: Topology key carried by every volume and node: replicas are node-local.
TOPOLOGY_NODE_KEY = "topology.sharedsync.io/node"
DEFAULT_KUBELET_DIR = Path("/var/lib/kubelet")
DEFAULT_DATA_DIR = Path("/var/lib/sharedsync")


class StateStoreKind(enum.StrEnum):
    """Where the controller keeps its records (see ``csi_driver.state``)."""

    LOCAL = "local"  # SQLite under --data-dir: standalone, one controller on one disk
    KUBERNETES = "kubernetes"  # SharedVolume objects: with the operator


class Role(enum.StrEnum):
    """Which CSI services this process serves (Identity is always served)."""

    CONTROLLER = "controller"
    NODE = "node"
    ALL = "all"


@dataclass(frozen=True, slots=True)
class PluginConfig:
    """Everything a plugin process needs to know about where it runs."""

    endpoint: str
    node_id: str
    role: Role = Role.ALL
    driver_name: str = DRIVER_NAME
    data_dir: Path = DEFAULT_DATA_DIR
    #: Directories under which the CO may ask us to stage or publish. kubelet only ever passes
    #: paths under its root dir; anything else is refused, so a hostile request cannot make the
    #: plugin mount over /etc.
    allowed_path_roots: tuple[Path, ...] = field(default=(DEFAULT_KUBELET_DIR,))
    metrics_address: str = ""
    state_store: StateStoreKind = StateStoreKind.LOCAL
    #: The Kubernetes store's credentials; None means the pod's service account (in-cluster).
    kubeconfig: Path | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    #: Cluster mode, node side: the local replication agent's control socket. When set, the
    #: node plugin stages volumes the agent attaches instead of replicas of its own.
    agent_socket: Path | None = None
    #: Cluster mode, controller side: the release namespace (where the agents' Leases are).
    namespace: str = "sharedsync"
    #: How long a controller call waits for the operator before answering ABORTED.
    operator_timeout: float = 60.0
    #: Client certificate for the agents' mutual-TLS API (CA, certificate, key): lets the
    #: controller confirm an expansion on every replica. Optional.
    agent_tls: tuple[Path, Path, Path] | None = None
    #: Node side: serve kubelet's plugin registration API ourselves (no registrar sidecar).
    kubelet_registration: bool = False
    #: kubelet's root directory; the registration socket goes in its ``plugins_registry/``.
    kubelet_dir: Path = DEFAULT_KUBELET_DIR
    #: The CSI socket's path as kubelet sees it (in the host's mount namespace), which is what
    #: registration reports; None: ``<kubelet_dir>/plugins/<driver_name>/csi.sock``.
    kubelet_endpoint: Path | None = None

    @property
    def cluster_controller(self) -> bool:
        """The controller drives SharedVolumes through the operator (``--state-store
        kubernetes``) instead of making replicas on this node."""
        return self.serves_controller and self.state_store is StateStoreKind.KUBERNETES

    @property
    def serves_controller(self) -> bool:
        return self.role in (Role.CONTROLLER, Role.ALL)

    @property
    def serves_node(self) -> bool:
        return self.role in (Role.NODE, Role.ALL)

    @property
    def registers_with_kubelet(self) -> bool:
        return self.kubelet_registration and self.serves_node

    @property
    def kubelet_csi_endpoint(self) -> Path:
        if self.kubelet_endpoint is not None:
            return self.kubelet_endpoint
        return self.kubelet_dir / "plugins" / self.driver_name / "csi.sock"

    @property
    def replica_root(self) -> Path:
        return self.data_dir / "replicas"

    @property
    def state_path(self) -> Path:
        """The local store's database (unused with the Kubernetes store)."""
        return self.data_dir / "state" / "controller.db"

    @property
    def staged_dir(self) -> Path:
        """Cluster mode, node side: what the agent attached for each staged volume."""
        return self.data_dir / "node" / "staged"
