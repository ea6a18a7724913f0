"""The plugin's Prometheus endpoint carries csi-lib-utils' operation histogram."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver.proto import csi_pb2

from .conftest import (
    DRIVER_NAME,
    RPC_TIMEOUT,
    Plugin,
    create_request,
    create_volume,
    delete_volume,
    expect_code,
    mount_cap,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

METRIC = "csi_plugin_operations_seconds"


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def _counts(text: str) -> dict[tuple[str, str], float]:
    """``{(method_name, grpc_status_code): count}`` of the operations histogram."""
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            if sample.name != f"{METRIC}_count":
                continue
            assert sample.labels["driver_name"] == DRIVER_NAME
            counts[(sample.labels["method_name"], sample.labels["grpc_status_code"])] = (
                sample.value)
    return counts


async def test_operation_metrics(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-metrics")
    await create_volume(plugin, "pvc-metrics")  # idempotent repeat: a second OK
    await expect_code(plugin.controller.CreateVolume(
        create_request("pvc-metrics-bad", cap=mount_cap(fs_type="ext4")), timeout=RPC_TIMEOUT),
        grpc.StatusCode.INVALID_ARGUMENT)
    await expect_code(plugin.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id="snap-" + "0" * 24), timeout=RPC_TIMEOUT),
        grpc.StatusCode.NOT_FOUND)
    await plugin.identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_TIMEOUT)
    await delete_volume(plugin, volume.volume_id)

    text = await asyncio.to_thread(_fetch, plugin.metrics_url)
    counts = _counts(text)
    assert counts[("/csi.v1.Controller/CreateVolume", "OK")] == 2
    assert counts[("/csi.v1.Controller/CreateVolume", "InvalidArgument")] == 1
    assert counts[("/csi.v1.Controller/GetSnapshot", "NotFound")] == 1
    assert counts[("/csi.v1.Controller/DeleteVolume", "OK")] == 1
    assert counts[("/csi.v1.Identity/Probe", "OK")] >= 1

    # the exposition line the community dashboards query (label order aside)
    line = next(line for line in text.splitlines()
                if line.startswith(f"{METRIC}_count{{")
                and 'method_name="/csi.v1.Controller/CreateVolume"' in line
                and 'grpc_status_code="OK"' in line)
    assert f'driver_name="{DRIVER_NAME}"' in line
    assert line.endswith(" 2.0")
