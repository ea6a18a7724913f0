"""Hostile requests: each fails with the exact status code and changes nothing on disk.

"Nothing" is checked, not assumed: the mounts under the test directory, the loop devices backed
by files under it, and every path under the plugin's data dir and the kubelet dir are the same
after the call as before it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2

from .conftest import (
    RPC_TIMEOUT,
    SMALL,
    AccessMode,
    Plugin,
    StartPlugin,
    attached,
    attachment_paths,
    block_cap,
    create_request,
    create_volume,
    delete_volume,
    expect_code,
    files_under,
    loops_under,
    mount_cap,
    mounts_under,
    publish_request,
    rpc_error,
    stage_request,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

Code = grpc.StatusCode
SECRET = "hunter2-SECRET"
CAPACITY_KEY = "sharedsync.io/capacity-bytes"


@dataclass
class Scene:
    """What a hostile request can aim at: a real volume, real paths, a way outside."""

    plugin: Plugin
    volume: csi_pb2.Volume
    staging: Path
    target: Path
    outside: Path  # a directory outside every allowed root
    link: Path  # a directory symlink under kubelet pointing at ``outside``

    @property
    def kubelet(self) -> Path:
        return self.plugin.kubelet

    def stage(self, *, volume_id: str | None = None, staging: str | None = None,
              cap: csi_pb2.VolumeCapability | None = None, with_cap: bool = True,
              context: dict[str, str] | None = None) -> Awaitable[object]:
        request = stage_request(self.volume, self.staging, cap or mount_cap())
        if volume_id is not None:
            request.volume_id = volume_id
        if staging is not None:
            request.staging_target_path = staging
        if not with_cap:
            request.ClearField("volume_capability")
        if context is not None:
            request.volume_context.clear()
            request.volume_context.update(context)
        return self.plugin.node.NodeStageVolume(request, timeout=RPC_TIMEOUT)

    def publish(self, *, volume_id: str | None = None, target: str | None = None,
                cap: csi_pb2.VolumeCapability | None = None,
                with_cap: bool = True) -> Awaitable[object]:
        request = publish_request(self.volume, self.staging, self.target, cap or mount_cap())
        if volume_id is not None:
            request.volume_id = volume_id
        if target is not None:
            request.target_path = target
        if not with_cap:
            request.ClearField("volume_capability")
        return self.plugin.node.NodePublishVolume(request, timeout=RPC_TIMEOUT)

    def create(self, request: csi_pb2.CreateVolumeRequest) -> Awaitable[object]:
        return self.plugin.controller.CreateVolume(request, timeout=RPC_TIMEOUT)


@pytest.fixture
async def scene(plugin: Plugin) -> Scene:
    volume = await create_volume(plugin, "pvc-target")
    staging, target = attachment_paths(plugin, volume)
    outside = plugin.workspace.root / "outside"
    (outside / "staging").mkdir(parents=True)
    link = plugin.kubelet / "link"
    link.symlink_to(outside, target_is_directory=True)
    (plugin.kubelet / "staging-link").symlink_to(outside / "staging",
                                                 target_is_directory=True)
    return Scene(plugin, volume, staging, target, outside, link)


async def _disk_state(scene: Scene,
                      ) -> tuple[list[str], list[tuple[str, str]], set[str], set[str]]:
    root = scene.plugin.workspace.root
    loops = loops_under(root, detaching=False)  # a detach still settling is not a change
    return (mounts_under(root), loops, files_under(scene.plugin.data_dir),
            files_under(root) - files_under(scene.plugin.data_dir))


def _too_long(prefix: str = "vol-") -> str:
    return prefix + "a" * (129 - len(prefix))


Case = Callable[[Scene], Awaitable[object]]

CASES: list[tuple[str, Case, Code]] = [
    # paths
    ("stage-dotdot", lambda s: s.stage(staging=f"{s.kubelet}/../etc"), Code.INVALID_ARGUMENT),
    ("stage-dotdot-inside", lambda s: s.stage(staging=f"{s.staging}/../../../../etc"),
     Code.INVALID_ARGUMENT),
    ("stage-relative", lambda s: s.stage(staging="kubelet/plugins/staging"),
     Code.INVALID_ARGUMENT),
    ("stage-outside-root", lambda s: s.stage(staging="/etc/x"), Code.INVALID_ARGUMENT),
    ("stage-outside-root-prefix", lambda s: s.stage(staging=f"{s.kubelet}-evil/staging"),
     Code.INVALID_ARGUMENT),
    ("stage-the-root-itself", lambda s: s.stage(staging=str(s.kubelet)),
     Code.INVALID_ARGUMENT),
    ("stage-double-slash", lambda s: s.stage(staging=str(s.staging).replace("/", "//", 2)),
     Code.INVALID_ARGUMENT),
    ("stage-through-symlink", lambda s: s.stage(staging=f"{s.link}/staging"),
     Code.INVALID_ARGUMENT),
    ("stage-is-symlink", lambda s: s.stage(staging=f"{s.kubelet}/staging-link"),
     Code.INVALID_ARGUMENT),
    ("stage-nul-byte", lambda s: s.stage(staging=f"{s.staging}\0/../../etc"),
     Code.INVALID_ARGUMENT),
    ("stage-empty-path", lambda s: s.stage(staging=""), Code.INVALID_ARGUMENT),
    ("publish-outside-root", lambda s: s.publish(target="/etc/x"), Code.INVALID_ARGUMENT),
    ("publish-dotdot", lambda s: s.publish(target=f"{s.kubelet}/../x"),
     Code.INVALID_ARGUMENT),
    ("publish-through-symlink", lambda s: s.publish(target=f"{s.link}/mount"),
     Code.INVALID_ARGUMENT),
    ("publish-nul-byte", lambda s: s.publish(target=f"{s.target}\0"), Code.INVALID_ARGUMENT),
    ("stats-outside-root", lambda s: s.plugin.node.NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=s.volume.volume_id, volume_path="/etc"),
        timeout=RPC_TIMEOUT), Code.NOT_FOUND),
    ("expand-through-symlink", lambda s: s.plugin.node.NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(volume_id=s.volume.volume_id,
                                        volume_path=f"{s.link}/staging",
                                        capacity_range=csi_pb2.CapacityRange(
                                            required_bytes=1 << 30)),
        timeout=RPC_TIMEOUT), Code.NOT_FOUND),
    # ids and names
    ("stage-id-slash", lambda s: s.stage(volume_id="vol-a/../../etc"), Code.INVALID_ARGUMENT),
    ("stage-id-dotdot", lambda s: s.stage(volume_id=".."), Code.INVALID_ARGUMENT),
    ("stage-id-too-long", lambda s: s.stage(volume_id=_too_long()), Code.INVALID_ARGUMENT),
    ("stage-id-newline", lambda s: s.stage(volume_id=s.volume.volume_id + "\n"),
     Code.INVALID_ARGUMENT),
    ("publish-id-slash", lambda s: s.publish(volume_id="../" + s.volume.volume_id),
     Code.INVALID_ARGUMENT),
    ("delete-id-slash", lambda s: s.plugin.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id="vol-x/../../state"), timeout=RPC_TIMEOUT),
     Code.INVALID_ARGUMENT),
    ("delete-id-too-long", lambda s: s.plugin.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=_too_long()), timeout=RPC_TIMEOUT),
     Code.INVALID_ARGUMENT),
    ("snapshot-source-dotdot", lambda s: s.plugin.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="snap", source_volume_id=".."),
        timeout=RPC_TIMEOUT), Code.INVALID_ARGUMENT),
    ("create-name-too-long", lambda s: s.create(create_request("n" * 129)),
     Code.INVALID_ARGUMENT),
    ("create-name-nul", lambda s: s.create(create_request("pvc\0x")), Code.INVALID_ARGUMENT),
    ("snapshot-name-too-long", lambda s: s.plugin.controller.CreateSnapshot(
        csi_pb2.CreateSnapshotRequest(name="s" * 129, source_volume_id=s.volume.volume_id),
        timeout=RPC_TIMEOUT), Code.INVALID_ARGUMENT),
    # maps
    ("create-parameters-over-4k", lambda s: s.create(create_request(
        "pvc-big-params", parameters={"csi.storage.k8s.io/pvc/name": "p" * 4100})),
     Code.INVALID_ARGUMENT),
    ("stage-context-over-4k", lambda s: s.stage(context={"k": "v" * 4100}),
     Code.INVALID_ARGUMENT),
    ("stage-capacity-hint-not-ascii", lambda s: s.stage(
        volume_id="vol-" + "c" * 24, context={CAPACITY_KEY: "\u00b2"}),
     Code.INVALID_ARGUMENT),
    ("stage-capacity-hint-negative", lambda s: s.stage(
        volume_id="vol-" + "c" * 24, context={CAPACITY_KEY: "-1"}), Code.INVALID_ARGUMENT),
    ("stage-capacity-hint-absurd", lambda s: s.stage(
        volume_id="vol-" + "c" * 24, context={CAPACITY_KEY: str(1 << 62)}),
     Code.RESOURCE_EXHAUSTED),
    # capabilities
    ("stage-flag-remount", lambda s: s.stage(cap=mount_cap(flags=("remount",))),
     Code.INVALID_ARGUMENT),
    ("publish-flag-subvol", lambda s: s.publish(cap=mount_cap(flags=("subvol=..",))),
     Code.INVALID_ARGUMENT),
    ("publish-flag-remount-ro", lambda s: s.publish(cap=mount_cap(flags=("remount,rw",))),
     Code.INVALID_ARGUMENT),
    ("create-flag-remount", lambda s: s.create(create_request(
        "pvc-flags", cap=mount_cap(flags=("remount",)))), Code.INVALID_ARGUMENT),
    ("create-ext4", lambda s: s.create(create_request("pvc-ext4", cap=mount_cap(
        fs_type="ext4"))), Code.INVALID_ARGUMENT),
    ("stage-ext4", lambda s: s.stage(cap=mount_cap(fs_type="ext4")), Code.INVALID_ARGUMENT),
    ("stage-no-capability", lambda s: s.stage(with_cap=False), Code.INVALID_ARGUMENT),
    ("publish-no-capability", lambda s: s.publish(with_cap=False), Code.INVALID_ARGUMENT),
    ("create-no-capability", lambda s: s.plugin.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(name="pvc-nocap"), timeout=RPC_TIMEOUT),
     Code.INVALID_ARGUMENT),
    ("create-unknown-access-mode", lambda s: s.create(create_request(
        "pvc-unknown-mode", cap=mount_cap(AccessMode.UNKNOWN))), Code.INVALID_ARGUMENT),
    ("create-block-multi-writer", lambda s: s.create(create_request(
        "pvc-block-rwx", cap=block_cap(AccessMode.MULTI_NODE_MULTI_WRITER))),
     Code.INVALID_ARGUMENT),
    ("publish-group-not-numeric", lambda s: s.publish(cap=mount_cap(group="wheel")),
     Code.INVALID_ARGUMENT),
    ("publish-group-superscript", lambda s: s.publish(cap=mount_cap(group="\u00b2")),
     Code.INVALID_ARGUMENT),
    ("publish-group-overflow", lambda s: s.publish(cap=mount_cap(group=str(1 << 32))),
     Code.INVALID_ARGUMENT),
    # capacity
    ("create-negative-capacity", lambda s: s.create(create_request("pvc-neg", required=-1)),
     Code.OUT_OF_RANGE),
    ("create-negative-limit", lambda s: s.create(create_request("pvc-neg-limit", limit=-1)),
     Code.OUT_OF_RANGE),
    ("create-required-over-limit", lambda s: s.create(create_request(
        "pvc-inverted", required=2 * SMALL, limit=SMALL)), Code.OUT_OF_RANGE),
    ("create-absurd-capacity", lambda s: s.create(create_request(
        "pvc-absurd", required=(1 << 63) - 1)), Code.RESOURCE_EXHAUSTED),
    ("expand-required-over-limit", lambda s: s.plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=s.volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 << 30,
                                                 limit_bytes=1 << 30)),
        timeout=RPC_TIMEOUT), Code.OUT_OF_RANGE),
    ("expand-absurd", lambda s: s.plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=s.volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=(1 << 63) - 1)),
        timeout=RPC_TIMEOUT), Code.RESOURCE_EXHAUSTED),
    # size of the message itself
    ("five-mib-message", lambda s: s.create(create_request("x" * (5 << 20))),
     Code.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize(("case", "code"), [pytest.param(c, code, id=name)
                                            for name, c, code in CASES])
async def test_hostile_request(scene: Scene, case: Case, code: Code) -> None:
    before = await _disk_state(scene)
    error = await expect_code(case(scene), code)
    assert error.details()
    assert await _disk_state(scene) == before
    # and the plugin is still fine
    assert scene.plugin.process.poll() is None
    await delete_volume(scene.plugin, scene.volume.volume_id)


async def test_stage_over_another_volume(scene: Scene) -> None:
    """A staging path that holds another volume is refused before anything is opened."""
    plugin = scene.plugin
    await scene.stage()
    (scene.staging / "marker").write_text("the first volume")
    other = await create_volume(plugin, "pvc-intruder")
    before = await _disk_state(scene)
    for attempt in (stage_request(other, scene.staging, mount_cap()),
                    stage_request(csi_pb2.Volume(volume_id="vol-" + "d" * 24, volume_context={
                        CAPACITY_KEY: str(SMALL * 4)}), scene.staging, mount_cap())):
        await expect_code(plugin.node.NodeStageVolume(attempt, timeout=RPC_TIMEOUT),
                          Code.ALREADY_EXISTS)
        assert await _disk_state(scene) == before
    assert (scene.staging / "marker").read_text() == "the first volume"
    await scene.plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=scene.volume.volume_id, staging_target_path=str(scene.staging)),
        timeout=RPC_TIMEOUT)
    for volume in (scene.volume, other):
        await delete_volume(plugin, volume.volume_id)


async def test_publish_target_of_the_wrong_type(scene: Scene) -> None:
    plugin = scene.plugin
    await scene.stage()
    scene.target.write_text("a file where a directory belongs")
    block = await create_volume(plugin, "pvc-block-target", cap=block_cap())
    block_staging, block_target = attachment_paths(plugin, block, "block-pod")
    await plugin.node.NodeStageVolume(stage_request(block, block_staging, block_cap()),
                                      timeout=RPC_TIMEOUT)
    block_target.mkdir()
    before = await _disk_state(scene)
    await expect_code(scene.publish(), Code.INVALID_ARGUMENT)
    await expect_code(plugin.node.NodePublishVolume(
        publish_request(block, block_staging, block_target, block_cap()), timeout=RPC_TIMEOUT),
        Code.INVALID_ARGUMENT)
    assert await _disk_state(scene) == before
    assert scene.target.read_text() == "a file where a directory belongs"
    for volume, staging in ((scene.volume, scene.staging), (block, block_staging)):
        await plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=volume.volume_id, staging_target_path=str(staging)), timeout=RPC_TIMEOUT)
        await delete_volume(plugin, volume.volume_id)


async def test_node_expand_beyond_free_space(scene: Scene) -> None:
    """NodeExpandVolume cannot grow a replica past the node's free space (nor to absurd sizes)."""
    plugin = scene.plugin
    image = plugin.data_dir / "replicas" / "volumes" / scene.volume.volume_id / "image"
    async with attached(plugin, scene.volume) as where:
        state = await _disk_state(scene)
        before = (os.statvfs(where.target).f_blocks, image.stat().st_size, state)
        for size in (1 << 50, (1 << 63) - 1):
            await expect_code(plugin.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
                volume_id=scene.volume.volume_id, volume_path=str(where.target),
                capacity_range=csi_pb2.CapacityRange(required_bytes=size)),
                timeout=RPC_TIMEOUT), Code.RESOURCE_EXHAUSTED)
            assert (os.statvfs(where.target).f_blocks, image.stat().st_size,
                    await _disk_state(scene)) == before
    await delete_volume(plugin, scene.volume.volume_id)


async def test_secrets_never_logged(start_plugin: StartPlugin) -> None:
    plugin = await start_plugin(log_level="DEBUG")
    secrets = {"password": SECRET, "token": SECRET + "-token"}
    volume = (await plugin.controller.CreateVolume(
        create_request("pvc-secret", secrets=secrets), timeout=RPC_TIMEOUT)).volume
    failed = await rpc_error(plugin.controller.CreateVolume(
        create_request("pvc-secret-bad", parameters={"bogus": "1"}, secrets=secrets),
        timeout=RPC_TIMEOUT))
    assert failed.code() == Code.INVALID_ARGUMENT
    assert SECRET not in (failed.details() or "")
    staging, target = attachment_paths(plugin, volume)
    await plugin.node.NodeStageVolume(stage_request(volume, staging, mount_cap(), secrets),
                                      timeout=RPC_TIMEOUT)
    publish = publish_request(volume, staging, target, mount_cap())
    publish.secrets.update(secrets)
    await plugin.node.NodePublishVolume(publish, timeout=RPC_TIMEOUT)
    bad_stage = stage_request(volume, staging, mount_cap(), secrets)
    bad_stage.staging_target_path = "/etc/elsewhere"
    await expect_code(plugin.node.NodeStageVolume(bad_stage, timeout=RPC_TIMEOUT),
                      Code.INVALID_ARGUMENT)
    snap = (await plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="snap-secret", source_volume_id=volume.volume_id, secrets=secrets),
        timeout=RPC_TIMEOUT)).snapshot
    await plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=volume.volume_id, target_path=str(target)), timeout=RPC_TIMEOUT)
    await plugin.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging)), timeout=RPC_TIMEOUT)
    await plugin.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(
        snapshot_id=snap.snapshot_id, secrets=secrets), timeout=RPC_TIMEOUT)
    await plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(
        volume_id=volume.volume_id, secrets=secrets), timeout=RPC_TIMEOUT)
    await plugin.stop()  # flush everything

    log = plugin.log_text()
    # the check means something only if the requests were logged
    assert "/csi.v1.Controller/CreateVolume" in log
    assert "/csi.v1.Node/NodeStageVolume" in log
    assert '"password"' in log  # keys are kept, values stripped
    assert SECRET not in log


async def test_plugin_survives_hostile_burst(plugin: Plugin) -> None:
    """A run of bad calls leaves the plugin answering and able to do real work."""
    for name, _case, _code in CASES[:5]:
        await expect_code(plugin.controller.CreateVolume(
            create_request(name, cap=mount_cap(fs_type="ext4")), timeout=RPC_TIMEOUT),
            Code.INVALID_ARGUMENT)
    volume = await create_volume(plugin, "pvc-after-burst")
    async with attached(plugin, volume) as where:
        (where.target / "ok").write_text("ok")
    await delete_volume(plugin, volume.volume_id)
