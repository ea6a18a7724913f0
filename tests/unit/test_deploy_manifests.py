"""The plain manifests in deploy/ must agree with what the driver actually does."""

from pathlib import Path
from typing import Any

import yaml

from csi_driver.config import DRIVER_NAME
from csi_driver.controller import CAPABILITIES
from csi_driver.proto import csi_pb2
from sharedsync.core.parameters import parse_parameters

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text())
    return document


def test_storage_class_names_our_driver_and_valid_parameters() -> None:
    sc = load("storageclass.yaml")
    assert sc["kind"] == "StorageClass"
    assert sc["provisioner"] == DRIVER_NAME
    parse_parameters(sc["parameters"])  # raises on a parameter the driver would refuse
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"  # replicas are node-local
    assert sc["allowVolumeExpansion"] is True


def test_csidriver_matches_the_capabilities_claimed() -> None:
    driver = load("csidriver.yaml")
    assert driver["metadata"]["name"] == DRIVER_NAME
    publishes = csi_pb2.ControllerServiceCapability.RPC.PUBLISH_UNPUBLISH_VOLUME in CAPABILITIES
    assert driver["spec"]["attachRequired"] is publishes
    assert driver["spec"]["fsGroupPolicy"] == "File"
