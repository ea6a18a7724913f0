"""The plain manifests in deploy/ must agree with what the driver and the operator actually do.

The API server checks each object's own schema (tests/controlplane/test_deploy_examples.py);
these checks are the ones it cannot make: the references between objects (StorageClass ->
SyncPolicy, PVC -> StorageClass, restore -> snapshot), the StorageClass parameters the driver
accepts, the policies as the operator reads them, and the promises the comments make.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from csi_driver.config import DRIVER_NAME
from csi_driver.controller import CAPABILITIES
from csi_driver.proto import csi_pb2
from sharedsync.core.parameters import parse_parameters
from sharedsync.core.policy import Mode, policy_from_spec

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MODE_FILES = {"synchronous": Mode.SYNCHRONOUS, "asynchronous": Mode.ASYNCHRONOUS,
              "scheduled": Mode.SCHEDULED}

Obj = dict[str, Any]


def documents(name: str) -> list[Obj]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
    assert docs, f"{name} holds no object"
    return docs


def load(name: str) -> Obj:
    (document,) = documents(name)
    return document


def every_object() -> Iterator[tuple[str, Obj]]:
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in documents(path.name):
            yield path.name, doc


def of_kind(kind: str) -> list[Obj]:
    return [doc for _, doc in every_object() if doc["kind"] == kind]


def by_name(kind: str) -> dict[str, Obj]:
    return {doc["metadata"]["name"]: doc for doc in of_kind(kind)}


def claim_specs() -> dict[str, Obj]:
    """Every PVC spec a namespace gets from deploy/, by claim name (StatefulSet templates too,
    named as the StatefulSet controller names them for pod 0)."""
    claims = {name: doc["spec"] for name, doc in by_name("PersistentVolumeClaim").items()}
    for sts in of_kind("StatefulSet"):
        for template in sts["spec"]["volumeClaimTemplates"]:
            claim = f"{template['metadata']['name']}-{sts['metadata']['name']}-0"
            claims[claim] = template["spec"]
    return claims


def test_every_object_parses_and_namespaced_ones_leave_the_namespace_to_kubectl() -> None:
    for name, doc in every_object():
        assert doc.get("apiVersion"), name
        assert doc.get("kind"), name
        assert doc["metadata"]["name"], name
        assert "namespace" not in doc["metadata"], f"{name}: use kubectl apply -n instead"


def test_every_file_is_described_in_the_deploy_readme() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in DEPLOY.glob("*.yaml"):
        assert f"`{path.name}`" in readme, path.name


def test_syncpolicies_hold_one_valid_policy_per_mode() -> None:
    policies = {doc["metadata"]["name"]: doc for doc in documents("syncpolicies.yaml")}
    assert sorted(policies) == ["async", "scheduled", "sync"]
    modes = {name: policy_from_spec(doc["spec"], name=name).mode
             for name, doc in policies.items()}
    assert modes == {"sync": Mode.SYNCHRONOUS, "async": Mode.ASYNCHRONOUS,
                     "scheduled": Mode.SCHEDULED}
    for doc in policies.values():
        assert doc["kind"] == "SyncPolicy"


def test_the_commented_production_policy_is_what_it_says() -> None:
    doc = load("syncpolicy.yaml")
    policy = policy_from_spec(doc["spec"], name=doc["metadata"]["name"])
    assert policy.mode is Mode.SYNCHRONOUS
    assert (policy.replicas, policy.write_quorum) == (3, 2)
    assert policy.topology_key == "topology.kubernetes.io/zone"
    for section in ("qos", "placement", "failover", "integrity"):
        assert section in doc["spec"], section


def test_every_field_of_the_production_policy_has_a_comment() -> None:
    """Each `key:` line of the spec is commented on its line or on the line above."""
    lines = (DEPLOY / "syncpolicy.yaml").read_text().splitlines()
    start = lines.index("spec:")
    uncommented = []
    for number in range(start + 1, len(lines)):
        line = lines[number]
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # a comment, or a section whose fields carry the comments
        if "#" not in line and not lines[number - 1].strip().startswith("#"):
            uncommented.append(stripped)
    assert not uncommented


@pytest.mark.parametrize("suffix", sorted(MODE_FILES))
def test_one_storage_class_per_mode_naming_a_deployed_policy(suffix: str) -> None:
    sc = load(f"storageclass-{suffix}.yaml")
    assert sc["kind"] == "StorageClass"
    policy_name = sc["parameters"]["syncPolicy"]
    assert sc["metadata"]["name"] == policy_name  # named like its policy, as the chart's are
    policies = {doc["metadata"]["name"]: doc for doc in documents("syncpolicies.yaml")}
    assert policy_name in policies
    assert policy_from_spec(policies[policy_name]["spec"]).mode is MODE_FILES[suffix]


def test_every_storage_class_names_our_driver_and_parameters_it_accepts() -> None:
    policies = {doc["metadata"]["name"] for doc in documents("syncpolicies.yaml")}
    classes = of_kind("StorageClass")
    assert len(classes) == len(MODE_FILES)
    for sc in classes:
        assert sc["provisioner"] == DRIVER_NAME
        parse_parameters(sc["parameters"])  # raises on a parameter the driver would refuse
        assert sc["parameters"]["syncPolicy"] in policies
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"  # replicas are node-local
        assert sc["allowVolumeExpansion"] is True


def test_every_claim_uses_a_deployed_storage_class() -> None:
    classes = by_name("StorageClass")
    claims = claim_specs()
    assert claims
    for name, spec in claims.items():
        assert spec["storageClassName"] in classes, name


def test_the_statefulset_claims_synchronous_volumes() -> None:
    (sts,) = of_kind("StatefulSet")
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["spec"]["storageClassName"] == "sync"
    mounted = {m["name"] for c in sts["spec"]["template"]["spec"]["containers"]
               for m in c.get("volumeMounts", [])}
    assert template["metadata"]["name"] in mounted
    services = by_name("Service")
    assert sts["spec"]["serviceName"] in services


def test_the_deployment_shares_one_read_write_many_claim() -> None:
    (deployment,) = of_kind("Deployment")
    assert deployment["spec"]["replicas"] == 3
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    claim = claim_specs()[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["accessModes"] == ["ReadWriteMany"]


def test_snapshot_restore_and_clone_reference_each_other() -> None:
    (snapshot_class,) = of_kind("VolumeSnapshotClass")
    assert snapshot_class["driver"] == DRIVER_NAME
    snapshots = by_name("VolumeSnapshot")
    (snapshot,) = snapshots.values()
    assert snapshot["spec"]["volumeSnapshotClassName"] == snapshot_class["metadata"]["name"]
    claims = claim_specs()
    source = claims[snapshot["spec"]["source"]["persistentVolumeClaimName"]]
    sources = {doc["spec"]["dataSource"]["kind"]: doc["spec"]
               for doc in documents("restore-and-clone.yaml")}
    assert sorted(sources) == ["PersistentVolumeClaim", "VolumeSnapshot"]
    restored = sources["VolumeSnapshot"]
    assert restored["dataSource"]["apiGroup"] == "snapshot.storage.k8s.io"
    assert restored["dataSource"]["name"] in snapshots
    clone = sources["PersistentVolumeClaim"]
    cloned = claims[clone["dataSource"]["name"]]
    # Kubernetes clones only within one storage class, never into a smaller volume
    assert clone["storageClassName"] == cloned["storageClassName"]
    for made, origin in ((restored, source), (clone, cloned)):
        size = made["resources"]["requests"]["storage"]
        assert size == origin["resources"]["requests"]["storage"]


def test_csidriver_matches_the_capabilities_claimed() -> None:
    driver = load("csidriver.yaml")
    assert driver["metadata"]["name"] == DRIVER_NAME
    publishes = csi_pb2.ControllerServiceCapability.RPC.PUBLISH_UNPUBLISH_VOLUME in CAPABILITIES
    assert driver["spec"]["attachRequired"] is publishes
    assert driver["spec"]["fsGroupPolicy"] == "File"
