"""The clusters the e2e scenarios run on: one interface, two providers.

The scenarios see a :class:`Cluster`: a kubeconfig, kubectl and helm bound to it, the values
file and workload image that suit it, a way to run a command on a node, and four fault verbs
(kill, restart, partition, heal a node). ``local`` is the cluster of real nodes on this machine
(``scripts/cluster``, the default and what CI runs); ``kind`` is a kind cluster where Docker and
kind exist. A provider that cannot run here raises :class:`UnavailableError`, which skips the
session with its reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from sharedsync import __version__

from . import hostcheck

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_BIN = Path(os.environ.get("SHAREDSYNC_TOOLS_BIN",
                                Path.home() / ".cache" / "sharedsync" / "bin"))
CLUSTER_SCRIPT = REPO_ROOT / "scripts" / "cluster"
E2E_DIR = Path(__file__).resolve().parent
WORKDIR = REPO_ROOT / "build" / "e2e"
#: The env var that says: the cluster is up already, and must stay up after the session.
KEEP_ENV = "SHAREDSYNC_E2E_KEEP_CLUSTER"
PROVIDER_ENV = "SHAREDSYNC_E2E_PROVIDER"
PROVIDERS = ("local", "kind")


class UnavailableError(Exception):
    """This provider cannot run on this machine; the message says why."""


class ClusterError(AssertionError):
    """A cluster command failed; the message carries its output."""


def keep_cluster() -> bool:
    return os.environ.get(KEEP_ENV, "") not in ("", "0", "false", "no")


def run(argv: list[str], *, timeout: float, check: bool = True, input: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)
    if check and done.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} exited {done.returncode}:\n"
                           f"{_clip(done.stderr)}\n{_clip(done.stdout)}")
    return done


def _clip(text: str, head: int = 2000, tail: int = 3000) -> str:
    """The start (where a failing step names itself) and the end of a long output."""
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters ...]\n{text[-tail:]}"


def run_logged(argv: list[str], log: Path, *, timeout: float) -> None:
    """A long step (cluster up, image build) with its output in a file, named on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise ClusterError(f"{' '.join(argv)} exited {done.returncode}; log {log}:\n{tail}")


class Cluster(ABC):
    """A running cluster the scenarios can drive and break."""

    #: provider name
    name: str
    kubeconfig: Path
    #: helm values for this cluster (images it has, registration mode, quick failover)
    values_file: Path
    #: a busybox image the nodes have, with sh, sha256sum, sync FILE, dd, df
    workload_image: str
    workload_pull_policy: str

    def __init__(self) -> None:
        self.workdir = WORKDIR / self.name
        self.workdir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle -------------------------------------------------------------------------------

    @abstractmethod
    def start(self) -> None:
        """Make the cluster exist and answer (raises :class:`UnavailableError`)."""

    @abstractmethod
    def stop(self) -> None:
        """Remove what :meth:`start` made (unless the cluster is to be kept)."""

    # -- tools -----------------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120,
                input: str | None = None) -> subprocess.CompletedProcess[str]:
        return run(self.kubectl_command(*args), timeout=timeout, check=check, input=input)

    def kubectl_command(self, *args: str) -> list[str]:
        """kubectl's command line, for one that runs in the background (a streaming exec);
        discovery is cached in the work directory, never in ~/.kube."""
        return [str(TOOLS_BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.workdir / 'kubectl-cache'}", *args]

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def apply(self, docs: list[dict[str, Any]]) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts",
                     "--field-manager=sharedsync-e2e", "-f", "-", input=json.dumps(
                         {"apiVersion": "v1", "kind": "List", "items": docs}))

    def helm(self, *args: str, check: bool = True,
             timeout: float = 900) -> subprocess.CompletedProcess[str]:
        scratch = self.workdir / "helm"
        env = {**os.environ, "HELM_CACHE_HOME": str(scratch / "cache"),
               "HELM_CONFIG_HOME": str(scratch / "config"),
               "HELM_DATA_HOME": str(scratch / "data"), "KUBECONFIG": str(self.kubeconfig)}
        return run([str(TOOLS_BIN / "helm"), "--kubeconfig", str(self.kubeconfig), *args],
                   timeout=timeout, check=check, env=env)

    # -- nodes and faults ------------------------------------------------------------------------

    @abstractmethod
    def node_exec(self, node: str, *argv: str,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command on a node, in its mount and network namespaces."""

    @abstractmethod
    def kill_node(self, node: str) -> None:
        """Every process of the node dies at once (kubelet, runtime, pods), as in a power cut."""

    @abstractmethod
    def restart_node(self, node: str) -> None:
        """Bring a killed node back (its disk, /var/lib/sharedsync included, is as it was)."""

    @abstractmethod
    def partition(self, node: str) -> None:
        """Cut the node off from the other nodes and the control plane; it keeps running."""

    @abstractmethod
    def heal(self, node: str) -> None:
        """Undo :meth:`partition`."""

    def storage_nodes(self) -> list[str]:
        """The nodes workloads and replicas may use: those without a NoSchedule taint."""
        nodes = self.kubectl_json("get", "nodes")["items"]
        return sorted(n["metadata"]["name"] for n in nodes
                      if not any(t.get("effect") == "NoSchedule"
                                 for t in n["spec"].get("taints", [])))


class LocalCluster(Cluster):
    """The cluster of real nodes on this machine: ``scripts/cluster`` (see its contract in
    tests/e2e/README.md). Needs root."""

    name = "local"
    values_file = REPO_ROOT / "charts" / "ci" / "local-values.yaml"
    workload_image = "localhost/busybox:1.35"
    workload_pull_policy = "Never"

    def __init__(self) -> None:
        super().__init__()
        self.state_dir = Path(os.environ.get("SHAREDSYNC_CLUSTER_DIR",
                                             REPO_ROOT / "build" / "cluster"))
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.host_before: hostcheck.Snapshot | None = None

    def script(self, *args: str, timeout: float = 300,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        return run([str(CLUSTER_SCRIPT), *args], timeout=timeout, check=check)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise UnavailableError("the local cluster needs root (network and mount namespaces)")
        if not os.access(CLUSTER_SCRIPT, os.X_OK):
            raise UnavailableError(f"{CLUSTER_SCRIPT} is missing")
        if not keep_cluster():
            # a cluster an earlier run left behind (killed by a timeout, or a session that
            # ended mid-run) is taken down first: `up` then starts clean, and the host that
            # `down` must give back (compared in stop()) is one without any cluster on it
            run_logged([str(CLUSTER_SCRIPT), "down"], self.workdir / "cluster-down-before.log",
                       timeout=600)
            self.host_before = hostcheck.snapshot()
            # idempotent; on a cold machine it builds the tools and images first
            run_logged([str(CLUSTER_SCRIPT), "up"], self.workdir / "cluster-up.log",
                       timeout=3600)
        if not self.kubeconfig.exists():
            raise ClusterError(f"no kubeconfig at {self.kubeconfig}: is the cluster up "
                               f"({KEEP_ENV}=1 says it is)?")
        self.kubectl("get", "nodes")

    def stop(self) -> None:
        if not keep_cluster():
            run_logged([str(CLUSTER_SCRIPT), "down"], self.workdir / "cluster-down.log",
                       timeout=600)
            if self.host_before is not None:
                # `down` puts the host back: no process, mount, loop device, namespace, link,
                # route, cgroup, iptables rule, directory or sysctl of the cluster is left
                left = hostcheck.differences(self.host_before, hostcheck.snapshot())
                if left:
                    raise ClusterError("scripts/cluster down left the host changed:\n"
                                       + "\n".join(left))

    def node_exec(self, node: str, *argv: str,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.script("exec", node, "--", *argv, timeout=120, check=check)

    def kill_node(self, node: str) -> None:
        self.script("kill-node", node)

    def restart_node(self, node: str) -> None:
        self.script("restart-node", node, timeout=600)

    def partition(self, node: str) -> None:
        self.script("partition", node)

    def heal(self, node: str) -> None:
        self.script("heal", node)


class KindCluster(Cluster):
    """A kind cluster (Docker): a control plane and three workers (tests/e2e/kind-config.yaml),
    our image built with Docker and loaded into every node. Nodes are containers, so a killed
    node is a killed container and a partition is a container off the kind network."""

    name = "kind"
    values_file = REPO_ROOT / "charts" / "ci" / "kind-values.yaml"
    workload_image = "docker.io/library/busybox:1.36"
    workload_pull_policy = "IfNotPresent"
    cluster_name = "sharedsync-e2e"
    network = "kind"

    def __init__(self) -> None:
        super().__init__()
        self.kubeconfig = self.workdir / "kubeconfig"
        self.created = False

    def start(self) -> None:
        for tool in ("docker", "kind"):
            if shutil.which(tool) is None:
                raise UnavailableError(f"the kind provider needs {tool}, which is not on PATH")
        info = run(["docker", "info"], timeout=60, check=False)
        if info.returncode != 0:
            raise UnavailableError(f"docker has no working daemon: {info.stderr.strip()[-300:]}")
        existing = run(["kind", "get", "clusters"], timeout=60).stdout.split()
        if self.cluster_name in existing:
            run(["kind", "export", "kubeconfig", "--name", self.cluster_name, "--kubeconfig",
                 str(self.kubeconfig)], timeout=60)
        else:
            run_logged(["kind", "create", "cluster", "--name", self.cluster_name, "--config",
                        str(E2E_DIR / "kind-config.yaml"), "--kubeconfig", str(self.kubeconfig),
                        "--wait", "5m"], self.workdir / "kind-create.log", timeout=900)
            self.created = True
        archive = REPO_ROOT / "build" / "image" / f"sharedsync-{__version__}.tar"
        run_logged([str(REPO_ROOT / "scripts" / "build-image"), "--engine", "docker",
                    "--output", str(archive)], self.workdir / "build-image.log", timeout=3600)
        run_logged(["kind", "load", "image-archive", str(archive), "--name", self.cluster_name],
                   self.workdir / "kind-load.log", timeout=900)
        self._install_snapshot_support()

    def _install_snapshot_support(self) -> None:
        """kind has no VolumeSnapshot API: the CRDs of the pinned external-snapshotter (from
        the Go module cache) and its snapshot-controller (pulled), before the chart, which
        renders its VolumeSnapshotClass only where the API is served."""
        from tests.controlplane.snapshot_crds import snapshot_crd_files

        files, reason = snapshot_crd_files()
        if not files:
            raise ClusterError(f"cannot install the VolumeSnapshot CRDs on kind: {reason}")
        self.kubectl("apply", "--server-side", *(f"--filename={f}" for f in files))
        self.kubectl("wait", "--for=condition=Established", "--timeout=120s",
                     *(f"crd/{f.name.split('_', 1)[1].removesuffix('.yaml')}"
                       f".snapshot.storage.k8s.io" for f in files), timeout=180)
        self.kubectl("apply", "--server-side", "-f",
                     str(E2E_DIR / "kind-snapshot-controller.yaml"))
        self.kubectl("rollout", "status", "-n", "kube-system", "deployment/snapshot-controller",
                     "--timeout=300s", timeout=330)

    def stop(self) -> None:
        if not keep_cluster():
            run(["kind", "delete", "cluster", "--name", self.cluster_name], timeout=600)

    def node_exec(self, node: str, *argv: str,
                  check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker", "exec", node, *argv], timeout=120, check=check)

    def kill_node(self, node: str) -> None:
        run(["docker", "kill", node], timeout=120)

    def restart_node(self, node: str) -> None:
        run(["docker", "start", node], timeout=300)

    def partition(self, node: str) -> None:
        run(["docker", "network", "disconnect", self.network, node], timeout=120)

    def heal(self, node: str) -> None:
        run(["docker", "network", "connect", self.network, node], timeout=120)


def make(provider: str) -> Cluster:
    if provider == "local":
        return LocalCluster()
    if provider == "kind":
        return KindCluster()
    raise ValueError(f"unknown e2e provider {provider!r} (one of {', '.join(PROVIDERS)})")
