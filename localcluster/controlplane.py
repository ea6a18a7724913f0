"""The control plane on the host: etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and the VolumeSnapshot controller, each a detached process with a pid file and a log.

The apiserver listens on the bridge address only (10.78.0.254:6443), which nodes and pods reach
through their default route, and advertises it, so the ``kubernetes`` Service's endpoint is real
and kube-proxy on each node turns 10.96.0.1:443 into it. Every component authenticates with a
client certificate from the cluster's CA; the apiserver reaches kubelets (logs, exec, proxy) with
a client certificate of its own and checks their serving certificates against the same CA.
"""

from __future__ import annotations

import base64
from pathlib import Path

import yaml

from localcluster.layout import (
    APISERVER_PORT,
    CONTROLLER_MANAGER_PORT,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    HOST_ADDRESS,
    SCHEDULER_PORT,
    SERVICE_CIDR,
    SERVICE_IP,
    TOOLS_BIN,
)
from localcluster.pki import Pki, write_file
from localcluster.probe import http_get
from localcluster.processes import StepError, alive, run, spawn, stop, wait_for
from localcluster.snapshot_crds import snapshot_crd_files

SERVER = f"https://{HOST_ADDRESS}:{APISERVER_PORT}"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 180.0
#: How long a silent kubelet keeps its node Ready: short, so that killing a node shows within
#: seconds, as a cloud's node lifecycle controller would with aggressive settings.
NODE_MONITOR_GRACE = "20s"
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
              "snapshot-controller")


def write_kubeconfig(path: Path, pki: Pki, user: str, cert: Path, key: Path,
                     server: str = SERVER) -> Path:
    """A kubeconfig with everything embedded (it can be copied anywhere)."""
    def b64(file: Path) -> str:
        return base64.b64encode(file.read_bytes()).decode()

    config = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "sharedsync-local",
                      "cluster": {"server": server,
                                  "certificate-authority-data": b64(pki.ca_file)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert),
                                           "client-key-data": b64(key)}}],
        "contexts": [{"name": "sharedsync-local",
                      "context": {"cluster": "sharedsync-local", "user": user}}],
        "current-context": "sharedsync-local",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_file(path, yaml.safe_dump(config, sort_keys=False).encode())


class ControlPlane:
    """The host-side components of the cluster whose state lives under ``state``."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.dir = state / "controlplane"
        self.pki = Pki(state / "pki")
        self.kubeconfig = state / "kubeconfig"

    def _pid(self, name: str) -> Path:
        return self.state / "run" / f"{name}.pid"

    def _log(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    def running(self) -> dict[str, int | None]:
        return {name: alive(self._pid(name), self.state) for name in COMPONENTS}

    def _start(self, name: str, argv: list[str], ready_url: str) -> None:
        if alive(self._pid(name), self.state) is None:
            spawn(argv, pid_file=self._pid(name), log_file=self._log(name))

        def ready() -> bool:
            status, _ = http_get(ready_url, ca_file=self.pki.ca_file)
            return status == 200

        wait_for(f"start {name}", ready, timeout=START_TIMEOUT, log_file=self._log(name),
                 pid_file=self._pid(name), marker=self.state)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        admin_cert, admin_key = self._cert_once("admin", "sharedsync-admin", ["system:masters"])
        write_kubeconfig(self.kubeconfig, self.pki, "sharedsync-admin", admin_cert, admin_key)
        self._start_etcd()
        self._start_apiserver()
        self._start_controller_manager()
        self._start_scheduler()
        self._install_snapshot_crds()
        self._start_snapshot_controller()

    def _cert_once(self, name: str, user: str, groups: list[str]) -> tuple[Path, Path]:
        cert, key = self.pki.dir / f"{name}.crt", self.pki.dir / f"{name}.key"
        if cert.exists() and key.exists():
            return cert, key
        return self.pki.client_cert(name, user, groups)

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{ETCD_CLIENT_PORT}"
        peer = f"http://127.0.0.1:{ETCD_PEER_PORT}"
        argv = [str(TOOLS_BIN / "etcd"), "--name=default", f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}", "--log-level=warn"]
        self._start("etcd", argv, f"{client}/health")

    def _start_apiserver(self) -> None:
        pki = self.pki
        serving = pki.dir / "kube-apiserver.crt"
        if not serving.exists():
            pki.serving_cert(
                "kube-apiserver",
                ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"],
                [HOST_ADDRESS, "127.0.0.1", SERVICE_IP])
        kubelet_cert, kubelet_key = self._cert_once(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ["system:masters"])
        argv = [
            str(TOOLS_BIN / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ETCD_CLIENT_PORT}",
            f"--bind-address={HOST_ADDRESS}", f"--secure-port={APISERVER_PORT}",
            f"--advertise-address={HOST_ADDRESS}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--cert-dir={self.dir / 'apiserver-certs'}",
            f"--tls-cert-file={serving}",
            f"--tls-private-key-file={pki.dir / 'kube-apiserver.key'}",
            f"--client-ca-file={pki.ca_file}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki.sa_pub_file}",
            f"--service-account-signing-key-file={pki.sa_key_file}",
            f"--kubelet-client-certificate={kubelet_cert}",
            f"--kubelet-client-key={kubelet_key}",
            f"--kubelet-certificate-authority={pki.ca_file}",
            "--kubelet-preferred-address-types=InternalIP",
            "--profiling=false",
        ]
        self._start("kube-apiserver", argv, f"{SERVER}/livez")
        wait_for("kube-apiserver ready", lambda: self._get("/readyz") == 200,
                 timeout=START_TIMEOUT, log_file=self._log("kube-apiserver"))

    def _get(self, path: str) -> int:
        status, _ = http_get(f"{SERVER}{path}", ca_file=self.pki.ca_file)
        return status

    def _component_kubeconfig(self, name: str, user: str) -> Path:
        cert, key = self._cert_once(name, user, [])
        return write_kubeconfig(self.dir / f"{name}.kubeconfig", self.pki, user, cert, key)

    def _serving_flags(self, name: str) -> list[str]:
        """A serving certificate from the cluster CA (so its /healthz can be probed verified)."""
        cert, key = self.pki.dir / f"{name}-serving.crt", self.pki.dir / f"{name}-serving.key"
        if not cert.exists():
            cert, key = self.pki.serving_cert(f"{name}-serving", ["localhost"], ["127.0.0.1"])
        return [f"--tls-cert-file={cert}", f"--tls-private-key-file={key}"]

    def _start_controller_manager(self) -> None:
        kubeconfig = str(self._component_kubeconfig(
            "kube-controller-manager", "system:kube-controller-manager"))
        argv = [
            str(TOOLS_BIN / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={CONTROLLER_MANAGER_PORT}",
            *self._serving_flags("kube-controller-manager"),
            "--controllers=*",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki.sa_key_file}",
            f"--root-ca-file={self.pki.ca_file}",
            f"--cluster-signing-cert-file={self.pki.ca_file}",
            f"--cluster-signing-key-file={self.pki.ca_key_file}",
            f"--node-monitor-grace-period={NODE_MONITOR_GRACE}",
            "--profiling=false",
        ]
        self._start("kube-controller-manager", argv,
                    f"https://127.0.0.1:{CONTROLLER_MANAGER_PORT}/healthz")

    def _start_scheduler(self) -> None:
        kubeconfig = str(self._component_kubeconfig("kube-scheduler", "system:kube-scheduler"))
        argv = [
            str(TOOLS_BIN / "kube-scheduler"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--secure-port={SCHEDULER_PORT}",
            *self._serving_flags("kube-scheduler"),
            "--profiling=false",
        ]
        self._start("kube-scheduler", argv,
                    f"https://127.0.0.1:{SCHEDULER_PORT}/healthz")

    def _install_snapshot_crds(self) -> None:
        """The VolumeSnapshot API (snapshot-controller and the chart's csi-snapshotter need it),
        from the snapshot client module pinned beside external-snapshotter."""
        files, reason = snapshot_crd_files()
        if not files:
            raise StepError(f"the VolumeSnapshot CRDs: {reason}")
        kubectl = [str(TOOLS_BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}"]
        for file in files:
            run([*kubectl, "apply", "--server-side", "--force-conflicts", "-f", str(file)])
        run([*kubectl, "wait", "--for=condition=Established", "--timeout=60s",
             *[f"crd/{f.name.removeprefix('snapshot.storage.k8s.io_').removesuffix('.yaml')}"
               ".snapshot.storage.k8s.io" for f in files]])

    def _start_snapshot_controller(self) -> None:
        name = "snapshot-controller"
        kubeconfig = str(self._component_kubeconfig(name, "sharedsync-snapshot-controller"))
        # its RBAC: the upstream role, bound to the certificate's user
        kubectl = [str(TOOLS_BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}"]
        binding = run([*kubectl, "create", "clusterrolebinding", "sharedsync-snapshot-controller",
                       "--clusterrole=cluster-admin", "--user=sharedsync-snapshot-controller",
                       "--dry-run=client", "-o", "yaml"]).stdout
        run([*kubectl, "apply", "-f", "-"], input=binding)
        if alive(self._pid(name), self.state) is None:
            spawn([str(TOOLS_BIN / name), f"--kubeconfig={kubeconfig}", "--leader-election=false",
                   "--v=2"], pid_file=self._pid(name), log_file=self._log(name))

    def stop(self) -> list[str]:
        """Stop every component, newest first; the names of those that were running."""
        return [name for name in reversed(COMPONENTS)
                if stop(self._pid(name), self.state)]
