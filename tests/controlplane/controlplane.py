"""A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager.

The CRD schemas (OpenAPI and CEL), RBAC, the TokenRequest API, strict field validation and
printer columns are implemented by the API server itself; a fake would only test our idea of
them. So this tier runs the real binaries (built by ``scripts/build-tools``) on loopback, with
free ports, in one directory that ``stop()`` removes. There is no kubelet: ``register_node``
writes Node objects and their status the way a kubelet would.

The apiserver listens on every address, not only loopback, because "nodes" of the network
namespace cluster (tests/cluster/netns.py) reach it at their bridge gateway, an address that
exists only while that network is up; its serving certificate names 127.0.0.1 and that gateway
(see :meth:`ControlPlane.server_on`). Everything except the health endpoints needs a token.

Every process is started in its own session (a Ctrl-C in the terminal does not half-kill the
control plane) and, when started from the main thread, with a parent-death signal, so that not
even a SIGKILLed pytest leaves an apiserver behind. ``start()`` stops whatever it started when it
fails part-way.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

from localcluster.pki import Pki, write_file
from localcluster.probe import http_get
from tests.cluster.netns import GATEWAY

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "charts" / "crds"
TOOLS_BIN = Path(os.environ.get("SHAREDSYNC_TOOLS_BIN",
                                Path.home() / ".cache" / "sharedsync" / "bin"))
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")

SERVICE_CIDR = "10.96.0.0/16"
#: The ``kubernetes`` Service's address (the first of SERVICE_CIDR); in the serving cert.
SERVICE_IP = "10.96.0.1"
#: Addresses clients may dial the apiserver at (the serving certificate names them).
SERVER_ADDRESSES = ("127.0.0.1", GATEWAY)
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "sharedsync-test-admin"
FIELD_MANAGER = "sharedsync-tests"
#: With no kubelet, nothing renews node leases. The node lifecycle controller still runs (it
#: turns Ready=False and unschedulable into taints, as in a real cluster) but must never decide
#: on its own that a registered node went silent, so its grace periods are a year.
NODE_GRACE_PERIOD = "8760h"

#: Bounds on waiting. The machine is shared and small: the apiserver alone takes ~10 s to be
#: ready when idle, several times that under load.
START_TIMEOUT = 240.0
STOP_GRACE = 5.0
CRD_TIMEOUT = 60.0
NODE_TIMEOUT = 60.0
START_ATTEMPTS = 3


class ControlPlaneError(RuntimeError):
    """The control plane could not be started or did not answer as expected."""


class KubectlError(subprocess.CalledProcessError):
    """A kubectl call failed; unlike CalledProcessError, str() shows what kubectl said."""

    def __str__(self) -> str:
        return (f"{' '.join(map(str, self.cmd[2:]))} exited with {self.returncode}:\n"
                f"{self.stderr or ''}{self.stdout or ''}")


def missing_binaries() -> list[str]:
    """The tools this fixture needs that are not built yet (run scripts/build-tools)."""
    return [name for name in BINARIES if not os.access(TOOLS_BIN / name, os.X_OK)]


# -- processes -----------------------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the thread that started us dies (pytest killed hard)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def tail(self, lines: int = 40) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {self.log_path.name} ---\n" + "\n".join(text)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: kube-apiserver can hang in shutdown for more than 30 s."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
        self.log.close()


def _spawn(name: str, argv: Sequence[str], log_path: Path) -> _Process:
    log = log_path.open("ab")
    try:
        main = threading.current_thread() is threading.main_thread()
        popen = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=_die_with_parent if main else None)
    except BaseException:
        log.close()
        raise
    return _Process(name, popen, log_path, log)


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (collisions are retried by start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- the control plane ---------------------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback, all state under ``workdir``.

    ``workdir`` belongs to the control plane: ``stop()`` removes it.
    """

    kubeconfig: Path
    server: str
    ca_file: Path
    workdir: Path

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubeconfig = workdir / "admin.kubeconfig"
        self.ca_file = workdir / "pki" / "ca.crt"
        self.server = ""
        self._admin_token = secrets.token_hex(24)
        self._processes: list[_Process] = []
        self._pki: Pki | None = None
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ControlPlane:
        """Start etcd, the apiserver and the controller manager; return once all are healthy."""
        missing = missing_binaries()
        if missing:
            raise ControlPlaneError(f"not built in {TOOLS_BIN}: {', '.join(missing)} "
                                    "(run scripts/build-tools)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._pki = Pki(self.workdir / "pki")
            self.ca_file = self._pki.ca_file
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
            self._write_kubeconfig(self.kubeconfig, ADMIN_USER, self._admin_token)
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (newest first) and remove the work directory. Idempotent."""
        while self._processes:
            self._processes.pop().stop()
        if not self._stopped:
            self._stopped = True
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _launch(self, name: str, argv_for: Callable[[], list[str]],
                ready: Callable[[], bool], what: str) -> _Process:
        """Start ``name`` until ``ready()``; a port taken meanwhile by someone else is retried
        with new ports (``argv_for`` picks them)."""
        for attempt in range(1, START_ATTEMPTS + 1):
            process = _spawn(name, argv_for(), self.workdir / f"{name}.log")
            self._processes.append(process)
            try:
                self._wait(what, ready)
                return process
            except ControlPlaneError:
                exited = process.popen.poll() is not None
                in_use = "address already in use" in process.log_path.read_text(errors="replace")
                if not (exited and in_use) or attempt == START_ATTEMPTS:
                    raise
                self._processes.remove(process)
                process.stop()
        raise AssertionError("unreachable")

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for process in self._processes:
                code = process.popen.poll()
                if code is not None:
                    raise ControlPlaneError(f"{process.name} exited with {code} while waiting "
                                            f"for {what}\n{process.tail()}")
            if ready():
                return
            if time.monotonic() > deadline:
                tails = "\n".join(p.tail() for p in self._processes)
                raise ControlPlaneError(f"timed out after {timeout:.0f}s waiting for {what}\n"
                                        f"{tails}")
            time.sleep(0.25)

    def _start_etcd(self) -> str:
        data = self.workdir / "etcd"
        ports: dict[str, int] = {}

        def argv() -> list[str]:
            shutil.rmtree(data, ignore_errors=True)
            ports["client"], ports["peer"] = free_port(), free_port()
            client = f"http://127.0.0.1:{ports['client']}"
            peer = f"http://127.0.0.1:{ports['peer']}"
            return [str(TOOLS_BIN / "etcd"), "--name=default", f"--data-dir={data}",
                    f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
                    f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=default={peer}", "--unsafe-no-fsync",
                    "--log-level=warn"]

        def ready() -> bool:
            status, body = http_get(f"http://127.0.0.1:{ports['client']}/health")
            return status == 200 and '"true"' in body

        self._launch("etcd", argv, ready, "etcd /health")
        return f"http://127.0.0.1:{ports['client']}"

    def _start_apiserver(self, etcd_url: str) -> None:
        assert self._pki is not None
        pki = self._pki
        cert, key = pki.serving_cert(
            "kube-apiserver",
            ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
             "kubernetes.default.svc.cluster.local"],
            [*SERVER_ADDRESSES, SERVICE_IP])
        tokens = write_file(self.workdir / "tokens.csv",
                        f'{self._admin_token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
                        .encode())
        cert_dir = self.workdir / "apiserver-certs"
        cert_dir.mkdir(exist_ok=True)

        def argv() -> list[str]:
            self.server = f"https://127.0.0.1:{free_port()}"
            port = self.server.rsplit(":", 1)[1]
            return [
                str(TOOLS_BIN / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                "--bind-address=0.0.0.0", f"--secure-port={port}",  # see the module doc
                "--advertise-address=127.0.0.1",
                # a loopback advertise address makes the endpoint reconciler refuse to start
                "--endpoint-reconciler-type=none",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cert-dir={cert_dir}",
                f"--tls-cert-file={cert}", f"--tls-private-key-file={key}",
                f"--client-ca-file={pki.ca_file}",
                f"--token-auth-file={tokens}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",  # the CSI node plugin is privileged
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki.sa_pub_file}",
                f"--service-account-signing-key-file={pki.sa_key_file}",
                "--profiling=false",
            ]

        def ready() -> bool:
            status, _ = http_get(f"{self.server}/readyz", ca_file=pki.ca_file,
                                  token=self._admin_token)
            return status == 200

        self._launch("kube-apiserver", argv, ready, "kube-apiserver /readyz")

    def _start_controller_manager(self) -> None:
        assert self._pki is not None
        pki = self._pki
        cert, key = pki.serving_cert("kube-controller-manager", ["localhost"], ["127.0.0.1"])
        port = 0

        def argv() -> list[str]:
            nonlocal port
            port = free_port()
            kubeconfig = str(self.kubeconfig)
            return [
                str(TOOLS_BIN / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1", f"--secure-port={port}",
                f"--tls-cert-file={cert}", f"--tls-private-key-file={key}",
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki.sa_key_file}",
                f"--root-ca-file={pki.ca_file}",
                f"--cluster-signing-cert-file={pki.ca_file}",
                f"--cluster-signing-key-file={pki.ca_key_file}",
                f"--node-monitor-grace-period={NODE_GRACE_PERIOD}",
                f"--node-startup-grace-period={NODE_GRACE_PERIOD}",
                "--profiling=false",
            ]

        def healthy() -> bool:
            status, _ = http_get(f"https://127.0.0.1:{port}/healthz", ca_file=pki.ca_file)
            return status == 200

        def default_service_account() -> bool:
            # the serviceaccount controller works: namespaces get their default ServiceAccount
            status, _ = http_get(
                f"{self.server}/api/v1/namespaces/default/serviceaccounts/default",
                ca_file=pki.ca_file, token=self._admin_token)
            return status == 200

        self._launch("kube-controller-manager", argv, healthy, "kube-controller-manager /healthz")
        self._wait("the default ServiceAccount in namespace default", default_service_account)

    def _write_kubeconfig(self, path: Path, user: str, token: str,
                          namespace: str = "default") -> Path:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        config = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "sharedsync-test",
                          "cluster": {"server": self.server,
                                      "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": "sharedsync-test", "user": user,
                                                    "namespace": namespace}}],
            "current-context": user,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_file(path, yaml.safe_dump(config, sort_keys=False).encode())

    # -- using it ----------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                kubeconfig: Path | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this control plane (as admin unless ``kubeconfig`` is given).

        Discovery is cached inside ``workdir``, never in ~/.kube, so that a CRD applied a moment
        ago is not hidden by another run's cache. ``check`` raises :class:`KubectlError`.
        """
        argv = self.kubectl_command(*args, kubeconfig=kubeconfig)
        done = subprocess.run(argv, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, argv, done.stdout, done.stderr)
        return done

    def server_on(self, address: str) -> str:
        """The apiserver's URL at ``address`` (one of SERVER_ADDRESSES, which its certificate
        names), e.g. the netns bridge gateway for processes inside the node namespaces."""
        if address not in SERVER_ADDRESSES:
            raise ValueError(f"the apiserver certificate names only {SERVER_ADDRESSES}, "
                             f"not {address!r}")
        return f"https://{address}:{self.server.rsplit(':', 1)[1]}"

    def kubectl_command(self, *args: str, kubeconfig: Path | None = None) -> list[str]:
        """The command line :meth:`kubectl` runs, for a kubectl to run in the background."""
        return [str(TOOLS_BIN / "kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}",
                f"--cache-dir={self.workdir / 'kubectl-cache'}", *args]

    def apply(self, manifest: str | dict[str, Any] | Sequence[dict[str, Any]]) -> None:
        """Server-side apply of objects (YAML text or dicts) as the admin."""
        if isinstance(manifest, dict):
            manifest = [manifest]
        text = manifest if isinstance(manifest, str) else yaml.safe_dump_all(list(manifest))
        self.kubectl("apply", "--server-side", "--force-conflicts",
                     f"--field-manager={FIELD_MANAGER}", "-f", "-", input=text)

    def apply_crds(self) -> None:
        """Apply charts/crds/*.yaml; return once they are Established and discoverable."""
        files = sorted(CRD_DIR.glob("*.yaml"))
        if not files:
            raise ControlPlaneError(f"no CRDs in {CRD_DIR}")
        crds = [yaml.safe_load(f.read_text()) for f in files]
        # server-side: a CRD is larger than the client-side last-applied annotation allows
        self.kubectl("apply", "--server-side", "--force-conflicts",
                     f"--field-manager={FIELD_MANAGER}", *(f"--filename={f}" for f in files))
        self.kubectl("wait", "--for=condition=Established", f"--timeout={CRD_TIMEOUT:.0f}s",
                     *(f"crd/{crd['metadata']['name']}" for crd in crds),
                     timeout=CRD_TIMEOUT + 30)
        wanted = {f"{crd['spec']['names']['plural']}.{crd['spec']['group']}" for crd in crds}

        def discoverable() -> bool:
            found = self.kubectl("api-resources", "-o", "name", check=False)
            return wanted <= set(found.stdout.split())

        self._wait(f"discovery of {', '.join(sorted(wanted))}", discoverable, CRD_TIMEOUT)

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig that acts as ServiceAccount ``namespace/name`` (created if missing),
        with a token from the TokenRequest API, as a pod would get one."""
        self.apply([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": name, "namespace": namespace}},
        ])
        token = self.kubectl("create", "token", name, f"--namespace={namespace}",
                             "--duration=24h").stdout.strip()
        path = self.workdir / "kubeconfigs" / f"{namespace}.{name}.kubeconfig"
        return self._write_kubeconfig(path, f"system:serviceaccount:{namespace}:{name}", token,
                                      namespace)

    def register_node(self, name: str, labels: dict[str, str] | None = None, *,
                      ready: bool = True, unschedulable: bool = False,
                      address: str = "127.0.0.1") -> None:
        """Create or update Node ``name`` and write its status as its kubelet would.

        Returns once the node lifecycle controller has caught up (its not-ready and
        unschedulable taints match), so that what follows sees a consistent node.
        """
        all_labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                      "kubernetes.io/arch": "amd64", **(labels or {})}
        self.apply({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": all_labels},
                    "spec": {"unschedulable": unschedulable}})
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        def condition(kind: str, status: bool, reason: str, message: str) -> dict[str, str]:
            return {"type": kind, "status": "True" if status else "False", "reason": reason,
                    "message": message, "lastHeartbeatTime": now, "lastTransitionTime": now}

        resources = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi"}
        status = {"status": {
            "conditions": [
                condition("MemoryPressure", False, "KubeletHasSufficientMemory",
                          "kubelet has sufficient memory available"),
                condition("DiskPressure", False, "KubeletHasNoDiskPressure",
                          "kubelet has no disk pressure"),
                condition("PIDPressure", False, "KubeletHasSufficientPID",
                          "kubelet has sufficient PID available"),
                condition("Ready", ready, "KubeletReady" if ready else "KubeletNotReady",
                          "kubelet is posting ready status" if ready
                          else "container runtime is down (set by the test)"),
            ],
            "addresses": [{"type": "InternalIP", "address": address},
                          {"type": "Hostname", "address": name}],
            "capacity": resources, "allocatable": resources,
            "nodeInfo": {"operatingSystem": "linux", "architecture": "amd64",
                         "kubeletVersion": "v0.0.0-no-kubelet"},
        }}
        self.kubectl("patch", "node", name, "--subresource=status", "--type=merge",
                     "-p", json.dumps(status))

        def settled() -> bool:
            got = self.kubectl("get", "node", name, "-o", "json", check=False)
            if got.returncode != 0:
                return False
            taints = {t["key"] for t in json.loads(got.stdout)["spec"].get("taints", [])}
            return (("node.kubernetes.io/not-ready" in taints) == (not ready)
                    and "node.kubernetes.io/unreachable" not in taints
                    and ("node.kubernetes.io/unschedulable" in taints) == unschedulable)

        self._wait(f"node {name} to settle (taints matching its status)", settled, NODE_TIMEOUT)
