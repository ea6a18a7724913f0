"""The chart installed, upgraded and uninstalled by the real helm on a real kube-apiserver.

There is no kubelet in this tier, so no pod runs and nothing here waits for one (no --wait):
what is checked is what the API server and helm decide: every object the chart renders is
accepted (the SyncPolicies by the CRD's schema and CEL rules, RBAC by the escalation check),
the bindings give each ServiceAccount the rights its component needs, `lookup` keeps the
generated certificates across upgrades, a changed value rolls the pod templates it feeds, and
uninstall leaves the CRDs and nothing else.

The control plane is the session's, shared with other modules: this module uses a release and
namespace of its own, prefixes the cluster-scoped objects it names (SyncPolicies,
StorageClasses, VolumeSnapshotClass) with that namespace, and removes what it made, including
the VolumeSnapshot CRDs when it was the one to install them.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from replication_agent.tls import PEER_SERVER_NAME

from .controlplane import REPO_ROOT, TOOLS_BIN, ControlPlane
from .operator_harness import OperatorProcess
from .snapshot_crds import SNAPSHOT_CRDS, snapshot_crd_files

pytestmark = pytest.mark.timeout(600)

CHART = REPO_ROOT / "charts"
RELEASE = "helmtest"
FULLNAME = f"{RELEASE}-sharedsync"
INSTANCE = f"app.kubernetes.io/instance={RELEASE}"
WAIT_TIMEOUT = 120.0

Obj = dict[str, Any]


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


@dataclass
class Release:
    """The release under test and the helm that manages it."""

    cp: ControlPlane
    namespace: str
    workdir: Path
    #: values every helm call passes (cluster-scoped names kept apart from other modules')
    base_values: list[str] = field(default_factory=list)
    snapshot_api: bool = False

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "HELM_CACHE_HOME": str(self.workdir / "cache"),
               "HELM_CONFIG_HOME": str(self.workdir / "config"),
               "HELM_DATA_HOME": str(self.workdir / "data"),
               "KUBECONFIG": str(self.cp.kubeconfig)}
        argv = [str(TOOLS_BIN / "helm"), "--kubeconfig", str(self.cp.kubeconfig),
                "--namespace", self.namespace, *args]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300,
                              check=False)
        if check:
            assert done.returncode == 0, f"helm {' '.join(args)}:\n{done.stderr}{done.stdout}"
        return done

    def set_flags(self, *extra: str) -> list[str]:
        flags = []
        for value in [*self.base_values, *extra]:
            flags += ["--set", value]
        return flags

    def get(self, *args: str) -> Obj:
        done = self.cp.kubectl("get", *args, "-o", "json")
        got: Obj = json.loads(done.stdout)
        return got

    def exists(self, *args: str) -> bool:
        done = self.cp.kubectl("get", *args, "-o", "name", "--ignore-not-found", check=False)
        return done.returncode == 0 and bool(done.stdout.strip())

    def manifest(self) -> list[Obj]:
        text = self.helm("get", "manifest", RELEASE).stdout
        return [d for d in yaml.safe_load_all(text) if d]

    def labelled(self) -> list[str]:
        """Every object of every listable type that carries the release's instance label."""
        kinds = self.cp.kubectl("api-resources", "--verbs=list", "-o", "name").stdout.split()
        # Events are never labelled; the legacy and new names of one type are listed once
        kinds = [k for k in kinds if k not in ("events", "events.events.k8s.io",
                                               "componentstatuses")]
        done = self.cp.kubectl("get", ",".join(kinds), "-A", "-l", INSTANCE, "-o",
                               "custom-columns=KIND:.kind,NS:.metadata.namespace,"
                               "NAME:.metadata.name", "--no-headers")
        return sorted(line.strip() for line in done.stdout.splitlines() if line.strip())


@pytest.fixture(scope="module")
def release(control_plane: ControlPlane,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    if not os.access(TOOLS_BIN / "helm", os.X_OK):
        reason = f"helm not built in {TOOLS_BIN} (run scripts/build-tools)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must build it first")
        pytest.skip(reason)
    namespace = f"helmtest-{secrets.token_hex(3)}"
    rel = Release(control_plane, namespace, tmp_path_factory.mktemp("helm"))
    rel.base_values = [f"syncPolicies.namePrefix={namespace}-",
                       f"snapshots.volumeSnapshotClass.name={namespace}"]
    installed_crds: list[str] = []
    files, why = snapshot_crd_files()
    if files:
        for path in files:
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            if not rel.exists("crd", name):
                control_plane.kubectl("apply", "--server-side", "-f", str(path))
                installed_crds.append(name)
        control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                              *(f"crd/{n}.snapshot.storage.k8s.io" for n in SNAPSHOT_CRDS),
                              timeout=90)
        wait_for("discovery of snapshot.storage.k8s.io/v1", lambda: "volumesnapshotclasses"
                 in control_plane.kubectl("api-resources", "--api-group=snapshot.storage.k8s.io",
                                          "-o", "name", check=False).stdout)
        rel.snapshot_api = True
    elif os.environ.get("CI"):
        pytest.fail(f"the VolumeSnapshot CRDs are needed in CI: {why}")
    try:
        yield rel
    finally:
        if rel.helm("status", RELEASE, check=False).returncode == 0:
            rel.helm("uninstall", RELEASE, check=False)
        control_plane.kubectl("delete", "namespace", namespace, "--ignore-not-found",
                              "--wait=false", check=False)
        if installed_crds:
            # waited for, so that a module after this one does not find them terminating
            control_plane.kubectl("delete", "crd", *installed_crds, "--ignore-not-found",
                                  "--wait=true", "--timeout=120s", check=False, timeout=150)


def _tls_data(rel: Release) -> dict[str, Obj]:
    return {name: rel.get("secret", name, "-n", rel.namespace)["data"]
            for name in (f"{FULLNAME}-agent-ca", f"{FULLNAME}-agent-tls",
                         f"{FULLNAME}-operator-tls")}


def test_install_creates_every_object(release: Release) -> None:
    rel = release
    installed = rel.helm("install", RELEASE, str(CHART), "--create-namespace", *rel.set_flags())
    # NOTES.txt tells what to run next, with this release's names
    assert "kubectl get sp,sv" in installed.stdout, installed.stdout
    assert f"storageClassName: {rel.namespace}-async" in installed.stdout, installed.stdout
    rendered = rel.manifest()
    kinds = {d["kind"] for d in rendered}
    assert {"CSIDriver", "Deployment", "DaemonSet", "SyncPolicy", "StorageClass", "Secret",
            "ConfigMap", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "ServiceAccount", "Service", "PodDisruptionBudget"} <= kinds
    assert ("VolumeSnapshotClass" in kinds) == rel.snapshot_api
    # every rendered object is in the cluster, as the release's
    for doc in rendered:
        where = ["-n", rel.namespace] if "namespace" in doc["metadata"] else []
        got = rel.get(_resource(doc), doc["metadata"]["name"], *where)
        assert got["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert got["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
    # the CRDs from crds/ are there (Helm installs them first, or finds them)
    for crd in ("syncpolicies", "sharedvolumes", "sharedvolumesnapshots"):
        assert rel.exists("crd", f"{crd}.sharedsync.io")
    # the SyncPolicies went through the CRD's schema: its defaults are filled in
    prefix = f"{rel.namespace}-"
    policies = {p["metadata"]["name"]: p["spec"] for p in
                rel.get("syncpolicies", "-l", INSTANCE)["items"]}
    assert set(policies) == {f"{prefix}sync", f"{prefix}async", f"{prefix}scheduled"}
    assert policies[f"{prefix}sync"]["writeQuorum"] == 2
    assert policies[f"{prefix}sync"]["placement"]["topologyKey"] == "kubernetes.io/hostname"
    assert policies[f"{prefix}scheduled"]["schedule"] == "*/15 * * * *"
    classes = {s["metadata"]["name"]: s for s in
               rel.get("storageclasses", "-l", INSTANCE)["items"]}
    assert set(classes) == set(policies)
    for name, sc in classes.items():
        assert sc["provisioner"] == "csi.sharedsync.io"
        assert sc["parameters"] == {"syncPolicy": name}
    driver = rel.get("csidriver", "csi.sharedsync.io")
    assert driver["spec"]["attachRequired"] is False
    assert driver["spec"]["fsGroupPolicy"] == "File"
    # the agent TLS material: a CA and two certificates signed by it
    tls = _tls_data(rel)
    ca = x509.load_pem_x509_certificate(base64.b64decode(tls[f"{FULLNAME}-agent-ca"]["tls.crt"]))
    for name in (f"{FULLNAME}-agent-tls", f"{FULLNAME}-operator-tls"):
        assert set(tls[name]) == {"ca.crt", "tls.crt", "tls.key"}
        cert = x509.load_pem_x509_certificate(base64.b64decode(tls[name]["tls.crt"]))
        cert.verify_directly_issued_by(ca)
    agent = x509.load_pem_x509_certificate(
        base64.b64decode(tls[f"{FULLNAME}-agent-tls"]["tls.crt"]))
    assert PEER_SERVER_NAME in agent.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    # workloads exist; their pods would run as the right ServiceAccounts
    for kind, name, account in [("deployment", f"{FULLNAME}-operator", f"{FULLNAME}-operator"),
                                ("deployment", f"{FULLNAME}-csi-controller",
                                 f"{FULLNAME}-csi-controller"),
                                ("daemonset", f"{FULLNAME}-node", f"{FULLNAME}-agent")]:
        spec = rel.get(kind, name, "-n", rel.namespace)["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == account


def _resource(doc: Obj) -> str:
    """kubectl's fully qualified name of a document's type (kind.version.group)."""
    group, _, version = str(doc["apiVersion"]).rpartition("/")
    return f"{doc['kind'].lower()}.{version}.{group}" if group else doc["kind"].lower()


@pytest.mark.parametrize(("account", "allowed", "refused"), [
    ("operator", ["patch", "sharedvolumes", "--subresource=status"], ["get", "secrets", "-A"]),
    ("operator", ["update", "leases", "-n", "{ns}"], ["delete", "nodes"]),
    ("agent", ["create", "leases", "-n", "{ns}"], ["get", "nodes"]),
    ("csi-controller", ["create", "sharedvolumes"],
     ["patch", "sharedvolumes", "--subresource=status"]),
    ("csi-controller", ["list", "leases", "-n", "{ns}"], ["list", "leases", "-n", "default"]),
    # the CSI sidecars, bound to the controller's ServiceAccount
    ("csi-controller", ["create", "persistentvolumes"], ["delete", "persistentvolumeclaims"]),
    ("csi-controller", ["patch", "persistentvolumeclaims", "--subresource=status", "-A"],
     ["create", "nodes"]),
    ("csi-controller", ["create", "leases", "-n", "{ns}"], ["create", "leases", "-n", "default"]),
    ("csi-controller", ["patch", "volumesnapshotcontents", "--subresource=status"],
     ["get", "secrets", "-A"]),
], ids=lambda v: "-".join(a.lstrip("-") for a in v if a != "{ns}") if isinstance(v, list)
   else v)
def test_service_accounts_have_their_components_rights(release: Release, account: str,
                                                       allowed: list[str],
                                                       refused: list[str]) -> None:
    rel = release
    if not rel.exists("deployment", f"{FULLNAME}-operator", "-n", rel.namespace):
        pytest.skip("the release is not installed (see test_install_creates_every_object)")
    user = f"system:serviceaccount:{rel.namespace}:{FULLNAME}-{account}"
    for verb_and_resource, want in ((allowed, "yes"), (refused, "no")):
        args = [a.replace("{ns}", rel.namespace) for a in verb_and_resource]
        done = rel.cp.kubectl("auth", "can-i", *args, "--as", user, check=False)
        assert done.stdout.strip() == want, (user, args, done.stdout, done.stderr)


def test_the_operator_runs_with_the_charts_service_account(release: Release) -> None:
    """The operator, as the ServiceAccount and RBAC the chart made, leads in the release's
    namespace and reconciles the chart's SyncPolicies (no agent runs in this tier, so they are
    valid but cannot be placed: Ready=False, InsufficientNodes, with a Warning event)."""
    rel = release
    if not rel.exists("deployment", f"{FULLNAME}-operator", "-n", rel.namespace):
        pytest.skip("needs the installed release (test_install_creates_every_object)")
    kubeconfig = rel.cp.service_account_kubeconfig(rel.namespace, f"{FULLNAME}-operator")
    operator = OperatorProcess(rel.workdir, kubeconfig, None, identity="chart-operator",
                               namespace=rel.namespace).start()
    try:
        def reconciled() -> bool:
            policy = rel.get("syncpolicy", f"{rel.namespace}-async")
            return any(c["type"] == "Ready" for c in
                       (policy.get("status") or {}).get("conditions") or ())
        wait_for(f"the chart's policy reconciled\n{operator.log_tail()}", reconciled)
        policy = rel.get("syncpolicy", f"{rel.namespace}-async")
        [ready] = [c for c in policy["status"]["conditions"] if c["type"] == "Ready"]
        assert ready["reason"] in ("InsufficientNodes", "Valid"), ready
        lease = rel.get("lease", "sharedsync-operator", "-n", rel.namespace)
        assert lease["spec"]["holderIdentity"] == "chart-operator"
        assert operator.alive(), operator.log_tail()
        assert "Forbidden" not in operator.log_path.read_text(), operator.log_tail()
    finally:
        operator.stop()


def test_upgrade_keeps_certificates_and_rolls_what_changed(release: Release) -> None:
    rel = release
    ns = ["-n", rel.namespace]
    before_tls = _tls_data(rel)
    operator = rel.get("deployment", f"{FULLNAME}-operator", *ns)
    controller = rel.get("deployment", f"{FULLNAME}-csi-controller", *ns)
    node = rel.get("daemonset", f"{FULLNAME}-node", *ns)

    rel.helm("upgrade", RELEASE, str(CHART),
             *rel.set_flags("operator.logLevel=DEBUG", "agent.leaseDurationSeconds=20"))

    assert _tls_data(rel) == before_tls, "an upgrade changed the generated certificates"
    operator_after = rel.get("deployment", f"{FULLNAME}-operator", *ns)
    assert operator_after["metadata"]["generation"] > operator["metadata"]["generation"]
    (container,) = operator_after["spec"]["template"]["spec"]["containers"]
    assert "--log-level=DEBUG" in container["args"]
    # the agents' config changed: its checksum rolls the node pods
    node_after = rel.get("daemonset", f"{FULLNAME}-node", *ns)
    checksum = "checksum/agent-config"
    assert (node_after["spec"]["template"]["metadata"]["annotations"][checksum]
            != node["spec"]["template"]["metadata"]["annotations"][checksum])
    config = rel.get("configmap", f"{FULLNAME}-agent", *ns)["data"]["agent.yaml"]
    assert yaml.safe_load(config)["kubernetes"]["leaseDurationSeconds"] == 20
    # nothing the controller uses changed: its pods are left alone
    controller_after = rel.get("deployment", f"{FULLNAME}-csi-controller", *ns)
    assert controller_after["metadata"]["generation"] == controller["metadata"]["generation"]

    # a lost client certificate is issued again from the kept CA
    rel.cp.kubectl("delete", "secret", f"{FULLNAME}-operator-tls", *ns)
    rel.helm("upgrade", RELEASE, str(CHART), "--reuse-values")
    again = _tls_data(rel)
    assert again[f"{FULLNAME}-agent-ca"] == before_tls[f"{FULLNAME}-agent-ca"]
    assert again[f"{FULLNAME}-agent-tls"] == before_tls[f"{FULLNAME}-agent-tls"]
    reissued = again[f"{FULLNAME}-operator-tls"]
    assert reissued["tls.crt"] != before_tls[f"{FULLNAME}-operator-tls"]["tls.crt"]
    ca = x509.load_pem_x509_certificate(
        base64.b64decode(again[f"{FULLNAME}-agent-ca"]["tls.crt"]))
    x509.load_pem_x509_certificate(base64.b64decode(reissued["tls.crt"])) \
        .verify_directly_issued_by(ca)


def test_uninstall_leaves_the_crds_and_nothing_else(release: Release) -> None:
    rel = release
    assert rel.labelled(), "nothing labelled with the release before uninstall"
    cluster_scoped = [(_resource(d), d["metadata"]["name"])
                      for d in rel.manifest() if "namespace" not in d["metadata"]]
    rel.helm("uninstall", RELEASE)
    # the garbage collector removes the ReplicaSets and pods the workloads made, in its time
    left: list[str] = []

    def nothing_left() -> bool:
        nonlocal left
        left = rel.labelled()
        return not left
    try:
        wait_for("every object labelled with the release to go", nothing_left)
    except AssertionError as error:
        raise AssertionError(f"{error}; still there: {left}") from None
    for resource, name in cluster_scoped:
        assert not rel.exists(resource, name), f"{resource}/{name} survived the uninstall"
    for crd in ("syncpolicies", "sharedvolumes", "sharedvolumesnapshots"):
        assert rel.exists("crd", f"{crd}.sharedsync.io"), f"uninstall removed the {crd} CRD"
    assert rel.helm("status", RELEASE, check=False).returncode != 0


def test_rendered_manifests_apply_on_a_real_api_server(control_plane: ControlPlane) -> None:
    """The plain manifests for users without helm pass the API server's validation (a
    server-side dry run, in their namespace, which must exist first)."""
    manifest = REPO_ROOT / "deploy" / "install" / "sharedsync.yaml"
    created = control_plane.kubectl("create", "namespace", "sharedsync", check=False)
    try:
        done = control_plane.kubectl("apply", "--server-side", "--dry-run=server",
                                     "--field-manager=sharedsync-tests", "--force-conflicts",
                                     "-f", str(manifest), check=False, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "CSIDriver" in done.stdout or "csidriver" in done.stdout, done.stdout
    finally:
        if created.returncode == 0:
            control_plane.kubectl("delete", "namespace", "sharedsync", "--wait=false",
                                  check=False)
