"""The Identity service of a real plugin process: who it is, what it offers, whether it is ready."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

import sharedsync
from csi_driver.backend import REQUIRED_TOOLS
from csi_driver.proto import csi_pb2

from .conftest import DRIVER_NAME, RPC_TIMEOUT, Plugin, StartPlugin

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

Cap = csi_pb2.PluginCapability


async def test_plugin_info(plugin: Plugin) -> None:
    info = await plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(),
                                               timeout=RPC_TIMEOUT)
    assert info.name == DRIVER_NAME
    assert info.vendor_version == sharedsync.__version__


async def test_plugin_capabilities(plugin: Plugin) -> None:
    response = await plugin.identity.GetPluginCapabilities(
        csi_pb2.GetPluginCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    services = {c.service.type for c in response.capabilities if c.HasField("service")}
    expansion = {c.volume_expansion.type for c in response.capabilities
                 if c.HasField("volume_expansion")}
    assert Cap.Service.CONTROLLER_SERVICE in services
    assert Cap.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS in services
    assert Cap.VolumeExpansion.ONLINE in expansion


async def test_probe_ready(plugin: Plugin) -> None:
    response = await plugin.identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_TIMEOUT)
    assert response.HasField("ready")
    assert response.ready.value is True


async def test_probe_not_ready_without_mkfs(start_plugin: StartPlugin, tmp_path: Path) -> None:
    """A missing storage tool makes Probe answer ready=false (not fail, not hang)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in REQUIRED_TOOLS:
        if tool == "mkfs.btrfs":
            continue
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent)])
    assert shutil.which("mkfs.btrfs", path=path) is None
    plugin = await start_plugin(env={"PATH": path})
    response = await plugin.identity.Probe(csi_pb2.ProbeRequest(), timeout=RPC_TIMEOUT)
    assert response.HasField("ready")
    assert response.ready.value is False
    # The plugin keeps answering: not-ready is a state, not a crash.
    info = await plugin.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(),
                                               timeout=RPC_TIMEOUT)
    assert info.name == DRIVER_NAME
    assert plugin.process.poll() is None
    assert "mkfs.btrfs" in plugin.log_text()
