"""A real operator process, real agents in network namespaces, a real API server.

The agents run in the netns cluster of the agent tests (tests/integration/agent_harness.py)
and announce themselves with Leases through the API server (reached from the namespaces at
the bridge address, which its serving certificate names). There is no kubelet in this tier, so
the harness registers each agent's node as a Node object. The operator runs on the host and
dials the agents over mutual TLS with a client certificate from the agents' CA.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.controlplane.controlplane import ControlPlane, free_port
from tests.integration.agent_harness import AgentCluster, wait_until

NAMESPACE = "sharedsync-system"
RBAC_DIR = Path(__file__).resolve().parents[2] / "charts" / "rbac"
#: Short enough that failover tests finish quickly, long enough for a loaded 2-core machine.
LEASE_SECONDS = 6


class OperatorProcess:
    """``python -m sharedsync_operator`` with the admin kubeconfig (or one given)."""

    def __init__(self, workdir: Path, kubeconfig: Path, tls: Any, identity: str = "op-1",
                 metrics_port: int = 0, lease_seconds: int = LEASE_SECONDS,
                 health_port: int = 0, namespace: str = NAMESPACE) -> None:
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.tls = tls
        self.identity = identity
        self.metrics_port = metrics_port
        self.lease_seconds = lease_seconds
        self.health_port = health_port
        self.namespace = namespace
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.identity}.log"

    def start(self) -> OperatorProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "sharedsync_operator", "--kubeconfig", str(self.kubeconfig),
                "--namespace", self.namespace, "--identity", self.identity,
                "--lease-duration", str(self.lease_seconds), "--log-format", "json"]
        if self.tls is not None:
            args += ["--agent-ca", str(self.tls.ca), "--agent-cert", str(self.tls.cert),
                     "--agent-key", str(self.tls.key)]
        if self.metrics_port:
            args += ["--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        if self.health_port:
            args += ["--health-address", f"127.0.0.1:{self.health_port}"]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log,
                                            env={**os.environ}, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


class OperatorCluster:
    """Three agents + Node objects + the operator, against one control plane."""

    def __init__(self, cp: ControlPlane, workdir: Path, names: tuple[str, ...] = ("a", "b", "c"),
                 zones: dict[str, str] | None = None, lease_seconds: int = LEASE_SECONDS,
                 node_config: dict[str, dict[str, Any]] | None = None) -> None:
        self.cp = cp
        self.workdir = workdir
        self.operator_kubeconfig = bind_component(cp, "operator")
        agent_kubeconfig = self._bridge_kubeconfig(bind_component(cp, "agent"))
        self.agents = AgentCluster(
            workdir / "agents", names, clients=("operator",),
            extra_config={"kubernetes": {"namespace": NAMESPACE,
                                         "leaseDurationSeconds": lease_seconds,
                                         "kubeconfig": str(agent_kubeconfig)}},
            node_config=node_config)
        self.zones = zones or {}
        for name in names:
            self.set_node_ready(name, True)
        self.operator = OperatorProcess(workdir, self.operator_kubeconfig,
                                        self.agents.client_tls["operator"],
                                        metrics_port=free_port(), lease_seconds=lease_seconds)

    def set_node_ready(self, node: str, ready: bool) -> None:
        """Write Node ``node``'s Ready condition as its kubelet would (False: as the node
        lifecycle controller does once a kubelet went silent), keeping its labels."""
        labels = {"kubernetes.io/hostname": node}
        if node in self.zones:
            labels["topology.kubernetes.io/zone"] = self.zones[node]
        self.cp.register_node(node, labels, ready=ready, address=self.agents.nodes[node].address)

    def _bridge_kubeconfig(self, kubeconfig: Path) -> Path:
        """``kubeconfig`` with the server at the bridge address the agents can reach."""
        config = yaml.safe_load(kubeconfig.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = self.cp.server_on(BRIDGE_ADDRESS)
        path = self.workdir / "agent-kubeconfig"
        self.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def start(self) -> OperatorCluster:
        self.agents.start()
        self.operator.start()
        return self

    def close(self) -> None:
        self.operator.stop()
        self.agents.close()

    # -- objects -------------------------------------------------------------------------------

    def apply(self, manifest: dict[str, Any]) -> None:
        self.cp.kubectl("apply", "-f", "-", input=json.dumps(manifest))

    def get(self, kind: str, name: str) -> dict[str, Any]:
        out = self.cp.kubectl("get", kind, name, "-o", "json")
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def exists(self, kind: str, name: str) -> bool:
        return self.cp.kubectl("get", kind, name, check=False).returncode == 0

    def condition(self, kind: str, name: str, type_: str) -> dict[str, Any]:
        for entry in (self.get(kind, name).get("status") or {}).get("conditions") or ():
            if entry["type"] == type_:
                return dict(entry)
        return {}

    def wait_condition(self, kind: str, name: str, type_: str, status: str = "True",
                       timeout: float = 120) -> dict[str, Any]:
        def check() -> bool:
            return self.condition(kind, name, type_).get("status") == status
        wait_until(check, timeout=timeout, interval=0.5,
                   what=f"{kind}/{name} {type_}={status}; operator log:\n"
                        f"{self.operator.log_tail()}")
        return self.condition(kind, name, type_)

    def holders(self, volume_id: str) -> set[str]:
        """Nodes whose agent (if running) holds a replica of ``volume_id``."""
        found = set()
        for name, agent in self.agents.agents.items():
            if agent.process is None or agent.process.poll() is not None:
                continue
            if any(v.volume_id == volume_id for v in agent.status().volumes):
                found.add(name)
        return found

    @contextlib.contextmanager
    def cut_off(self, node: str) -> Iterator[None]:
        """Node ``node`` loses the network, as behind a failed switch: in its own network
        namespace, what it sends to the bridge's subnet (the API server, the other agents,
        the operator's host side) is reset and what comes from there dropped. Its agent's
        node-local control socket still answers the test. All is restored on leaving. (The
        fault proxies do not carry these agents' links: the operator hands them the agents'
        own addresses.)"""
        from tests.cluster.netns import SUBNET
        rules = [["OUTPUT", "-d", SUBNET, "-p", "tcp", "-j", "REJECT",
                  "--reject-with", "tcp-reset"],
                 ["INPUT", "-s", SUBNET, "-j", "DROP"]]
        namespace = self.agents.nodes[node].namespace

        def iptables(*args: str) -> None:
            subprocess.run(["ip", "netns", "exec", namespace, "iptables", *args], check=True)
        for rule in rules:
            iptables("-I", *rule)
        try:
            yield
        finally:
            for rule in rules:
                iptables("-D", *rule)

    def events(self, name: str) -> list[dict[str, Any]]:
        out = self.cp.kubectl("get", "events", "-A", "-o", "json",
                              "--field-selector", f"involvedObject.name={name}")
        items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
        return items


BRIDGE_ADDRESS = "10.77.0.254"


@contextlib.contextmanager
def started_cluster(cp: ControlPlane, tmp_path_factory: Any, name: str,
                    zones: dict[str, str] | None = None,
                    node_config: dict[str, dict[str, Any]] | None = None
                    ) -> Iterator[OperatorCluster]:
    """A started OperatorCluster for a test module (skipped where network namespaces are not
    available), closed when the module is done."""
    from tests.cluster.netns import netns_unavailable

    reason = netns_unavailable()
    if reason:
        import pytest
        pytest.skip(reason)
    cluster = OperatorCluster(cp, Path(tmp_path_factory.mktemp(name)), zones=zones,
                              node_config=node_config)
    try:
        yield cluster.start()
    finally:
        cluster.close()


def bind_component(cp: ControlPlane, component: str, namespace: str = NAMESPACE) -> Path:
    """A kubeconfig for a ServiceAccount bound to exactly the rules the chart ships for
    ``component`` (charts/rbac/<component>-cluster.yaml and -namespace.yaml)."""
    account = f"sharedsync-{component}"
    cp.kubectl("create", "namespace", namespace, check=False)
    objects: list[dict[str, Any]] = []
    subject = [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    cluster_rules = RBAC_DIR / f"{component}-cluster.yaml"
    if cluster_rules.exists():
        objects += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": account}, "rules": yaml.safe_load(cluster_rules.read_text())},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": account}, "subjects": subject,
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": account}}]
    namespace_rules = RBAC_DIR / f"{component}-namespace.yaml"
    if namespace_rules.exists():
        objects += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": account, "namespace": namespace},
             "rules": yaml.safe_load(namespace_rules.read_text())},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": account, "namespace": namespace}, "subjects": subject,
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": account}}]
    path = cp.service_account_kubeconfig(namespace, account)
    cp.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                       "items": objects}))
    return path


def policy(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "sharedsync.io/v1alpha1", "kind": "SyncPolicy",
            "metadata": {"name": name}, "spec": spec}


def volume(name: str, policy_name: str, capacity: str = "256Mi", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "sharedsync.io/v1alpha1", "kind": "SharedVolume",
            "metadata": {"name": name},
            "spec": {"capacity": capacity, "policy": policy_name,
                     "accessModes": ["ReadWriteOnce"], "volumeMode": "Filesystem", **spec}}


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
