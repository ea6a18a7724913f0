"""The agent's configuration: who it is, where its peers are, and (standalone) what to hold.

In a cluster the operator tells each agent which volumes to hold through the Agent API; without
Kubernetes the same volume specs come from the config file's ``volumes`` list. Both paths end in
the same ``ApplyVolume``. The file is YAML (JSON is YAML too); every field is validated with a
message that names it, so a typo stops the agent at start instead of doing something else.
"""

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.quantity import parse_bytes
from sharedsync.core.schedule import parse_duration

from .tls import CONTROLLER_NAME, TlsConfig

ModeName = Literal["Synchronous", "Asynchronous", "Scheduled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PolicyConfig(_Strict):
    """A volume's replication policy (the agent-side view of a SyncPolicy)."""

    mode: ModeName = "Asynchronous"
    write_quorum: int = Field(0, alias="writeQuorum", ge=0, le=5)
    max_lag: float = Field(5.0, alias="maxLag")
    on_lag_exceeded: Literal["Alert", "Throttle"] = Field("Alert", alias="onLagExceeded")
    schedule: str = ""
    manual_trigger: str = Field("", alias="manualTrigger")
    paused: bool = False
    bandwidth: int = 0
    priority: int = Field(1, ge=1, le=1000)
    rebuild_bandwidth: int = Field(0, alias="rebuildBandwidth")
    conflict_resolution: Literal["LastWriterWins", "KeepBoth"] = Field(
        "LastWriterWins", alias="conflictResolution")
    scrub_interval: float = Field(0.0, alias="scrubInterval")
    auto_repair: bool = Field(True, alias="autoRepair")

    @field_validator("max_lag", "scrub_interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value) if isinstance(value, str) else float(value)

    @field_validator("bandwidth", "rebuild_bandwidth", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        return parse_bytes(value) if isinstance(value, str) else int(value)


class VolumeConfig(_Strict):
    """One volume this node holds a replica of."""

    volume_id: str = Field(alias="id")
    size: int
    kind: Literal["filesystem", "block"] = "filesystem"
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    replicas: list[str]
    primary: str
    epoch: int = Field(1, ge=1)
    #: ReadWriteMany on several nodes: every replica writable, files merged by version vectors.
    multi_writer: bool = Field(False, alias="multiWriter")
    #: Replicated file by file although one node writes: needed when some replica's node
    #: stores on ext4 while others store on btrfs (ext4 nodes replicate file by file anyway).
    file_level: bool = Field(False, alias="fileLevel")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_bytes(value) if isinstance(value, str) else int(value)


class KubernetesConfig(_Strict):
    """Announce this agent to the operator through a coordination.k8s.io Lease.

    Absent in standalone mode. In a cluster the operator learns which agents are alive, where
    they listen and how much space they have from these Leases (operator/API.md, "Agent leases").
    """

    namespace: str
    lease_duration_seconds: int = Field(15, alias="leaseDurationSeconds", ge=3, le=300)
    #: host:port the operator and peers dial; defaults to ``listen``.
    advertise_address: str = Field("", alias="advertiseAddress")
    #: A kubeconfig file; empty means the pod's in-cluster service account.
    kubeconfig: Path | None = None


class AgentConfig(_Strict):
    """Everything one agent process needs."""

    node: str
    listen: str
    control_socket: Path = Field(Path("/run/sharedsync/agent.sock"), alias="controlSocket")
    data_dir: Path = Field(Path("/var/lib/sharedsync"), alias="dataDir")
    metrics_address: str = Field("", alias="metricsAddress")
    tls: TlsConfig | None = None
    #: Names (common name or DNS name) of the client certificates that may call the control
    #: API (the Agent service) over the network: the operator's and the CSI controller's.
    #: Agents' certificates may call only the replication protocol (sharedsync.core.rpc_roles).
    controller_names: list[str] = Field([CONTROLLER_NAME], alias="controllerNames")
    peers: dict[str, str] = {}
    node_bandwidth: int = Field(0, alias="nodeBandwidth")
    audit_max_bytes: int = Field(16 << 20, alias="auditMaxBytes")
    audit_keep: int = Field(8, alias="auditKeep", ge=1)
    #: The filesystem new replicas are made with: btrfs (snapshots shipped as increments), ext4
    #: (the fallback for kernels without btrfs: files replicated one by one), or auto (btrfs
    #: when the kernel has it). Existing replicas keep the filesystem they were made with.
    store_filesystem: Literal["auto", "btrfs", "ext4"] = Field("auto", alias="storeFilesystem")
    volumes: list[VolumeConfig] = []
    kubernetes: KubernetesConfig | None = None

    @property
    def advertise_address(self) -> str:
        """Where others reach this agent: the configured advertise address, else ``listen``."""
        if self.kubernetes is not None and self.kubernetes.advertise_address:
            return self.kubernetes.advertise_address
        return self.listen

    @field_validator("node_bandwidth", "audit_max_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        return parse_bytes(value) if isinstance(value, str) else int(value)

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"listen must be host:port, got {value!r}")
        return value

    @property
    def listen_is_loopback(self) -> bool:
        host = self.listen.rpartition(":")[0].strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_environment(value: Any, environ: Mapping[str, str], where: str = "") -> Any:
    """Replace ``${NAME}`` in every string of a parsed config with the environment variable.

    A DaemonSet shares one config among all nodes; what differs per node (``node:
    ${NODE_NAME}``, ``listen: ${POD_IP}:7400``) comes from the downward API. An unset
    variable is an error naming the field, never an empty string.
    """
    if isinstance(value, str):
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise InvalidArgument(f"{where or 'config'}: environment variable {name} is "
                                      "not set")
            return environ[name]
        return _VARIABLE.sub(substitute, value)
    if isinstance(value, dict):
        return {key: expand_environment(item, environ, f"{where}.{key}" if where else str(key))
                for key, item in value.items()}
    if isinstance(value, list):
        return [expand_environment(item, environ, f"{where}[{i}]")
                for i, item in enumerate(value)]
    return value


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate a config file; errors name the field at fault."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"cannot read agent config {path}: {exc}") from exc
    raw = expand_environment(raw, os.environ if environ is None else environ)
    try:
        config = AgentConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise InvalidArgument(f"invalid agent config {path}: {problems}") from exc
    if config.tls is None and not config.listen_is_loopback:
        raise InvalidArgument(
            f"agent config {path}: listen address {config.listen} is not loopback, so tls "
            "(ca, cert, key) is required; plaintext is only for loopback development")
    return config
