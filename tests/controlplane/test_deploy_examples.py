"""Every manifest in deploy/ applied to a real kube-apiserver, in the order deploy/README.md gives.

Applying is a server-side apply with strict field validation, so a field the schema does not
know (a typo, a field of another API version) fails here instead of being dropped in a user's
cluster, and the CRDs' CEL rules judge the SyncPolicies. There is no kubelet and no scheduler in
this tier: workloads never run, but the controllers that turn them into claims and pods do, so
the StatefulSet's claim template and the Deployment's pods are checked as they come out.

Namespaced objects go into a namespace of this module's own; the cluster-scoped ones (CSIDriver,
SyncPolicies, StorageClasses, the VolumeSnapshotClass, the snapshot CRDs) are deleted at the end
unless they existed before. The snapshot CRDs (``config/crd/snapshot.storage.k8s.io_*.yaml``)
come from the external-snapshotter client module that ``scripts/build-tools`` downloads; without
it only the snapshot file is skipped (a failure in CI).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .controlplane import FIELD_MANAGER, REPO_ROOT, ControlPlane
from .snapshot_crds import SNAPSHOT_GROUP
from .snapshot_crds import install_snapshot_crds as shared_install_snapshot_crds

pytestmark = pytest.mark.timeout(900)

DEPLOY = REPO_ROOT / "deploy"
#: deploy/README.md's order; every deploy/*.yaml must be here (checked below).
ORDER = (
    "csidriver.yaml",
    "syncpolicies.yaml",
    "syncpolicy.yaml",
    "storageclass-synchronous.yaml",
    "storageclass-asynchronous.yaml",
    "storageclass-scheduled.yaml",
    "statefulset.yaml",
    "rwx-deployment.yaml",
    "snapshot.yaml",
    "restore-and-clone.yaml",
)
WAIT_TIMEOUT = 120.0
#: A CRD's deletion once took more than two minutes here, on a busy machine.
CRD_DELETE_TIMEOUT = 300.0

Obj = dict[str, Any]


def documents(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = WAIT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


class Deployment:
    """One namespace for the examples, and a record of the cluster-scoped objects made."""

    def __init__(self, cp: ControlPlane, namespace: str, workdir: Path) -> None:
        self.cp = cp
        self.namespace = namespace
        self.workdir = workdir
        #: resource/name of the cluster-scoped objects this module created, oldest first
        self.created: list[str] = []

    def _get_file(self, path: Path, *extra: str) -> list[Obj]:
        got = json.loads(self.cp.kubectl("get", "-n", self.namespace, "-f", str(path),
                                         "-o", "json", *extra).stdout or '{"items": []}')
        items: list[Obj] = got.get("items", [got])
        return items

    def apply_file(self, path: Path) -> list[Obj]:
        """Server-side apply, strictly validated; returns the objects as the server holds them."""
        docs = documents(path)
        before = {ref(item) for item in self._get_file(path, "--ignore-not-found")}
        self.cp.kubectl("apply", "--server-side", f"--field-manager={FIELD_MANAGER}",
                        "--validate=strict", "-n", self.namespace, "-f", str(path))
        items = self._get_file(path)
        self.created += [ref(i) for i in items
                         if "namespace" not in i["metadata"] and ref(i) not in before]
        assert [(i["kind"], i["metadata"]["name"]) for i in items] == \
            [(d["kind"], d["metadata"]["name"]) for d in docs]
        for item, doc in zip(items, docs, strict=True):
            assert item["metadata"].get("namespace", self.namespace) == self.namespace
            assert_holds(item, doc, f"{path.name}: {doc['kind']}/{doc['metadata']['name']}")
        return items

    def exists(self, resource: str, name: str) -> bool:
        return self.cp.kubectl("get", resource, name, "-n", self.namespace, "-o", "name",
                               check=False).returncode == 0

    def get(self, resource: str, name: str) -> Obj:
        found: Obj = json.loads(self.cp.kubectl("get", resource, name, "-n", self.namespace,
                                                "-o", "json").stdout)
        return found

    def list(self, resource: str, *selector: str) -> list[Obj]:
        out = self.cp.kubectl("get", resource, "-n", self.namespace, *selector, "-o", "json")
        items: list[Obj] = json.loads(out.stdout)["items"]
        return items


def ref(item: Obj) -> str:
    """kind.group/name, what kubectl delete takes for any object."""
    group = item["apiVersion"].rpartition("/")[0]
    kind = item["kind"].lower()
    return f"{kind}.{group}/{item['metadata']['name']}" if group else \
        f"{kind}/{item['metadata']['name']}"


def assert_holds(stored: Any, written: Any, where: str) -> None:
    """Everything written came back (nothing pruned or dropped); the server may add defaults.
    Quantities come back as written here (the examples use canonical forms)."""
    if isinstance(written, dict):
        assert isinstance(stored, dict), where
        for key, value in written.items():
            assert key in stored, f"{where}: {key} was dropped"
            assert_holds(stored[key], value, f"{where}.{key}")
    elif isinstance(written, list):
        assert isinstance(stored, list), where
        assert len(stored) == len(written), where
        for n, (a, b) in enumerate(zip(stored, written, strict=True)):
            assert_holds(a, b, f"{where}[{n}]")
    else:
        assert stored == written, f"{where}: {stored!r} != {written!r}"


@pytest.fixture(scope="module")
def deployment(control_plane: ControlPlane,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    cp = control_plane
    namespace = f"deploy-examples-{secrets.token_hex(3)}"
    cp.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    deployment = Deployment(cp, namespace, tmp_path_factory.mktemp("deploy-examples"))
    try:
        yield deployment
    finally:
        # the namespace first: its claims and snapshots go before their classes and CRDs
        cp.kubectl("delete", "namespace", namespace, "--wait=true",
                   f"--timeout={WAIT_TIMEOUT:.0f}s", timeout=WAIT_TIMEOUT + 30)
        for made in reversed(deployment.created):
            # waited for, CRDs too, so that a module after this one does not find them
            # terminating (a CRD goes once the API server has removed its objects)
            cp.kubectl("delete", made, "--ignore-not-found", "--wait=true",
                       f"--timeout={CRD_DELETE_TIMEOUT:.0f}s", timeout=CRD_DELETE_TIMEOUT + 30)


def test_every_deploy_manifest_is_applied_here() -> None:
    assert sorted(ORDER) == sorted(p.name for p in DEPLOY.glob("*.yaml"))
    readme = (DEPLOY / "README.md").read_text()
    positions = [readme.index(f"`{name}`", readme.index("## Order")) for name in ORDER
                 if name != "csidriver.yaml"]
    assert positions == sorted(positions), "deploy/README.md lists another order"


@pytest.mark.parametrize("name", ORDER)
def test_manifest_applies(deployment: Deployment, name: str) -> None:
    path = DEPLOY / name
    kinds = {doc["kind"] for doc in documents(path)}
    if {"VolumeSnapshot", "VolumeSnapshotClass"} & kinds:
        install_snapshot_crds(deployment)
    items = deployment.apply_file(path)
    check = CHECKS.get(name)
    if check is not None:
        check(deployment, items)


def install_snapshot_crds(deployment: Deployment) -> None:
    created = shared_install_snapshot_crds(deployment.cp, FIELD_MANAGER)
    deployment.created[:0] = [f"crd/{name}" for name in created]  # deleted last


# -- what the controllers make of the objects ---------------------------------------------------


def check_policies(deployment: Deployment, items: list[Obj]) -> None:
    """The schema defaults filled in what the examples leave out, and no default of another
    mode crept in (a default writeQuorum on an Asynchronous policy would be refused)."""
    del deployment
    for policy in items:
        spec = policy["spec"]
        assert spec["failover"]["staleReplicaTimeout"]
        assert spec["integrity"]["scrubInterval"]
        assert spec["qos"]["priority"] >= 1
        if spec["mode"] != "Synchronous":
            assert "writeQuorum" not in spec
        if spec["mode"] != "Scheduled":
            assert "schedule" not in spec


def check_statefulset(deployment: Deployment, items: list[Obj]) -> None:
    """The StatefulSet controller makes pod 0's claim from the template, on the Synchronous
    class; it stays Pending (WaitForFirstConsumer: no pod is ever scheduled here)."""
    (sts,) = (i for i in items if i["kind"] == "StatefulSet")
    claim = f"data-{sts['metadata']['name']}-0"
    wait_for(f"PVC {claim}", lambda: deployment.exists("pvc", claim))
    pvc = deployment.get("pvc", claim)
    assert pvc["spec"]["storageClassName"] == "sync"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert pvc["status"].get("phase") == "Pending"


def check_rwx(deployment: Deployment, items: list[Obj]) -> None:
    """Three pods come out of the Deployment, all mounting the one ReadWriteMany claim."""
    (dep,) = (i for i in items if i["kind"] == "Deployment")
    selector = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())

    def pods() -> list[Obj]:
        return deployment.list("pods", "-l", selector)

    wait_for("the Deployment's 3 pods", lambda: len(pods()) == 3)
    for pod in pods():
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"shared-data"}
    pvc = deployment.get("pvc", "shared-data")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def check_restore_and_clone(deployment: Deployment, items: list[Obj]) -> None:
    """The data sources survived admission (a PVC loses an unsupported one silently)."""
    del deployment
    sources = {i["metadata"]["name"]: {k: v for k, v in i["spec"]["dataSourceRef"].items()
                                       if v is not None}  # the core group comes back as null
               for i in items}
    assert sources["shared-data-restored"] == {"apiGroup": SNAPSHOT_GROUP,
                                               "kind": "VolumeSnapshot",
                                               "name": "shared-data-snap"}
    assert sources["shared-data-clone"] == {"kind": "PersistentVolumeClaim",
                                            "name": "shared-data"}


CHECKS: dict[str, Callable[[Deployment, list[Obj]], None]] = {
    "syncpolicies.yaml": check_policies,
    "syncpolicy.yaml": check_policies,
    "statefulset.yaml": check_statefulset,
    "rwx-deployment.yaml": check_rwx,
    "restore-and-clone.yaml": check_restore_and_clone,
}
