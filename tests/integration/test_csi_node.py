"""The Node service of a real plugin process: real stage/publish mounts and loop devices."""

from __future__ import annotations

import errno
import os
import stat

import grpc
import pytest

from csi_driver.proto import csi_pb2

from .conftest import (
    MIN_VOLUME_BYTES,
    NODE_ID,
    RPC_TIMEOUT,
    TOPOLOGY_KEY,
    AccessMode,
    Plugin,
    attached,
    attachment_paths,
    block_cap,
    create_volume,
    delete_volume,
    expect_code,
    lingering_loops,
    loops_under,
    mount_cap,
    mount_options,
    mounts_under,
    publish,
    publish_request,
    stage,
    stage_and_publish,
    stage_request,
    unpublish,
    unstage,
    write_file,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1 << 20
Code = grpc.StatusCode


def _is_mount_point(plugin: Plugin, path: os.PathLike[str] | str) -> bool:
    return str(path) in mounts_under(plugin.workspace.root)


async def test_stage_publish_filesystem(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-fs")
    async with attached(plugin, volume) as where:
        assert _is_mount_point(plugin, where.staging)
        assert _is_mount_point(plugin, where.target)
        write_file(where.target / "hello.txt", b"through the target\n")
        assert (where.staging / "hello.txt").read_bytes() == b"through the target\n"
        (where.staging / "back.txt").write_bytes(b"through staging\n")
        assert (where.target / "back.txt").read_bytes() == b"through staging\n"
    assert not where.target.exists()
    # data outlives unstage: stage and publish again and find it
    async with attached(plugin, volume, label="second-pod") as again:
        assert (again.target / "hello.txt").read_bytes() == b"through the target\n"
    await delete_volume(plugin, volume.volume_id)


async def test_read_only_publish(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-ro")
    cap = mount_cap()
    staging, writer_target = attachment_paths(plugin, volume, "writer")
    _, reader_target = attachment_paths(plugin, volume, "reader")
    await stage(plugin, volume, staging, cap)
    await publish(plugin, volume, staging, writer_target, cap)
    write_file(writer_target / "file", b"written before\n")
    await publish(plugin, volume, staging, reader_target, cap, readonly=True)
    assert "ro" in mount_options(reader_target)
    assert (reader_target / "file").read_bytes() == b"written before\n"
    for attempt in (lambda: (reader_target / "new").write_bytes(b"x"),
                    lambda: (reader_target / "file").write_bytes(b"x"),
                    lambda: (reader_target / "dir").mkdir()):
        with pytest.raises(OSError, match="Read-only file system") as info:
            attempt()
        assert info.value.errno == errno.EROFS
    # the same target with another read-only setting is refused
    await expect_code(publish(plugin, volume, staging, reader_target, cap, readonly=False),
                      Code.ALREADY_EXISTS)
    # a reader-only access mode publishes read-only even without readonly=true
    ro_cap = mount_cap(AccessMode.SINGLE_NODE_READER_ONLY)
    _, mode_target = attachment_paths(plugin, volume, "mode-reader")
    await publish(plugin, volume, staging, mode_target, ro_cap)
    assert "ro" in mount_options(mode_target)
    for target in (writer_target, reader_target, mode_target):
        await unpublish(plugin, volume.volume_id, target)
    await unstage(plugin, volume.volume_id, staging)
    await delete_volume(plugin, volume.volume_id)


async def test_mount_flags(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-flags")
    cap = mount_cap(flags=("noexec", "nosuid", "nodev"))
    async with attached(plugin, volume, cap) as where:
        options = mount_options(where.target)
        assert {"noexec", "nosuid", "nodev"} <= options
        script = where.target / "run.sh"
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
        assert not os.access(script, os.X_OK)
    await delete_volume(plugin, volume.volume_id)


async def test_ro_mount_flag(plugin: Plugin) -> None:
    """A "ro" mount flag (a PV's mountOptions) publishes read-only, idempotently."""
    volume = await create_volume(plugin, "pvc-node-ro-flag")
    cap = mount_cap(flags=("ro",), group="4321")
    staging, target = attachment_paths(plugin, volume)
    await stage(plugin, volume, staging, mount_cap())
    await publish(plugin, volume, staging, target, cap)
    await publish(plugin, volume, staging, target, cap)
    assert "ro" in mount_options(target)
    with pytest.raises(OSError, match="Read-only file system"):
        (target / "new").write_bytes(b"x")
    await unpublish(plugin, volume.volume_id, target)
    await unstage(plugin, volume.volume_id, staging)
    await delete_volume(plugin, volume.volume_id)


async def test_volume_mount_group(plugin: Plugin) -> None:
    gid = 4321
    volume = await create_volume(plugin, "pvc-node-group")
    async with attached(plugin, volume, mount_cap(group=str(gid))) as where:
        info = where.target.stat()
        assert info.st_gid == gid
        assert info.st_mode & stat.S_ISGID
        assert info.st_mode & stat.S_IRWXG == stat.S_IRWXG
        (where.target / "child").mkdir()
        assert (where.target / "child").stat().st_gid == gid  # setgid: inherited
    await delete_volume(plugin, volume.volume_id)


async def test_every_rpc_is_idempotent(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-idem")
    cap = mount_cap()
    staging, target = attachment_paths(plugin, volume)
    for _ in range(2):
        await stage(plugin, volume, staging, cap)
    for _ in range(2):
        await publish(plugin, volume, staging, target, cap)
    assert mounts_under(plugin.workspace.root).count(str(staging)) == 1
    assert mounts_under(plugin.workspace.root).count(str(target)) == 1
    write_file(target / "f", b"once")
    for _ in range(2):
        await unpublish(plugin, volume.volume_id, target)
        assert not target.exists()
    for _ in range(2):
        await unstage(plugin, volume.volume_id, staging)
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []
    await delete_volume(plugin, volume.volume_id)


async def test_unstage_leaves_nothing(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-clean")
    assert mounts_under(plugin.workspace.root) == []  # a created volume is closed
    async with attached(plugin, volume) as where:
        assert len(mounts_under(plugin.workspace.root)) >= 3  # replica, staging, target
        assert loops_under(plugin.workspace.root)
    assert not where.target.exists()
    assert where.staging.is_dir()  # the CO's directory: it is the CO's to remove
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []
    await delete_volume(plugin, volume.volume_id)


async def test_block_volume(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-block", cap=block_cap())
    cap = block_cap()
    offset = 7 * MiB + 4096
    payload = os.urandom(MiB)
    staging, target = attachment_paths(plugin, volume)
    await stage(plugin, volume, staging, cap)
    await publish(plugin, volume, staging, target, cap)
    await publish(plugin, volume, staging, target, cap)  # idempotent
    assert stat.S_ISBLK(target.stat().st_mode), "the target is a bind of a block device"
    assert not target.is_dir()
    assert _is_mount_point(plugin, target)
    fd = os.open(target, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == volume.capacity_bytes
        assert os.pwrite(fd, payload, offset) == len(payload)
        os.fsync(fd)
        assert os.pread(fd, len(payload), offset) == payload
    finally:
        os.close(fd)
    stats = await plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=volume.volume_id, volume_path=str(target)), timeout=RPC_TIMEOUT)
    assert [u.total for u in stats.usage] == [volume.capacity_bytes]
    # the loop device is in use: unstage and delete refuse rather than pull it away
    await expect_code(unstage(plugin, volume.volume_id, staging), Code.FAILED_PRECONDITION)
    await expect_code(delete_volume(plugin, volume.volume_id), Code.FAILED_PRECONDITION)
    # online expansion reaches the published device
    grown = 2 * MIN_VOLUME_BYTES
    await plugin.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=grown),
        volume_capability=cap), timeout=RPC_TIMEOUT)
    expanded = await plugin.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=volume.volume_id, volume_path=str(target), staging_target_path=str(staging),
        capacity_range=csi_pb2.CapacityRange(required_bytes=grown), volume_capability=cap),
        timeout=RPC_TIMEOUT)
    assert expanded.capacity_bytes == grown
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == grown
        assert os.pread(fd, len(payload), offset) == payload
    finally:
        os.close(fd)
    await unpublish(plugin, volume.volume_id, target)
    assert not target.exists()
    await unstage(plugin, volume.volume_id, staging)
    assert await lingering_loops(plugin.workspace.root) == []
    assert mounts_under(plugin.workspace.root) == []
    # the bytes are on the replica: attach again and read them back
    await stage(plugin, volume, staging, cap)
    await publish(plugin, volume, staging, target, cap)
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.pread(fd, len(payload), offset) == payload
    finally:
        os.close(fd)
    await unpublish(plugin, volume.volume_id, target)
    await unstage(plugin, volume.volume_id, staging)
    await delete_volume(plugin, volume.volume_id)


async def test_volume_stats(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-stats")
    assert volume.capacity_bytes == MIN_VOLUME_BYTES
    async with attached(plugin, volume) as where:
        write_file(where.target / "blob", os.urandom(4 * MiB))
        os.sync()  # btrfs counts the blocks at its next transaction commit
        stats = await plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume.volume_id, volume_path=str(where.target)), timeout=RPC_TIMEOUT)
        usage = next(u for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES)
        assert 0.8 * volume.capacity_bytes <= usage.total <= volume.capacity_bytes
        assert usage.used >= 4 * MiB
        assert 0 < usage.available < usage.total
        await expect_code(plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume.volume_id, volume_path=str(plugin.kubelet / "nowhere")),
            timeout=RPC_TIMEOUT), Code.NOT_FOUND)
    await delete_volume(plugin, volume.volume_id)


async def test_volume_health(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-health")
    async with attached(plugin, volume) as where:
        healthy = await plugin.node.NodeGetVolumeHealth(csi_pb2.NodeGetVolumeHealthRequest(
            volume_id=volume.volume_id, volume_publish_path=str(where.target),
            staging_target_path=str(where.staging)), timeout=RPC_TIMEOUT)
        assert healthy.volume_health.volume_id == volume.volume_id
        assert list(healthy.volume_health.health_statuses) == []
        elsewhere = plugin.kubelet / "pods" / "other" / "empty"
        elsewhere.mkdir(parents=True)
        lost = await plugin.node.NodeGetVolumeHealth(csi_pb2.NodeGetVolumeHealthRequest(
            volume_id=volume.volume_id, volume_publish_path=str(elsewhere)),
            timeout=RPC_TIMEOUT)
        statuses = list(lost.volume_health.health_statuses)
        assert [s.status for s in statuses] == [csi_pb2.INACCESSIBLE]
        assert str(elsewhere) in statuses[0].message
    await delete_volume(plugin, volume.volume_id)


async def test_node_info_and_capabilities(plugin: Plugin) -> None:
    info = await plugin.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=RPC_TIMEOUT)
    assert info.node_id == NODE_ID
    assert dict(info.accessible_topology.segments) == {TOPOLOGY_KEY: NODE_ID}
    caps = await plugin.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(),
                                                 timeout=RPC_TIMEOUT)
    rpc = csi_pb2.NodeServiceCapability.RPC
    offered = {c.rpc.type for c in caps.capabilities}
    assert {rpc.STAGE_UNSTAGE_VOLUME, rpc.GET_VOLUME_STATS, rpc.EXPAND_VOLUME,
            rpc.VOLUME_MOUNT_GROUP, rpc.SINGLE_NODE_MULTI_WRITER,
            rpc.GET_VOLUME_HEALTH} <= offered


async def test_single_node_single_writer_second_target(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-sw",
                                 cap=mount_cap(AccessMode.SINGLE_NODE_SINGLE_WRITER))
    cap = mount_cap(AccessMode.SINGLE_NODE_SINGLE_WRITER)
    staging, first = attachment_paths(plugin, volume, "first")
    _, second = attachment_paths(plugin, volume, "second")
    await stage(plugin, volume, staging, cap)
    await publish(plugin, volume, staging, first, cap)
    await publish(plugin, volume, staging, first, cap)  # the same target again is fine
    await expect_code(publish(plugin, volume, staging, second, cap), Code.FAILED_PRECONDITION)
    assert not _is_mount_point(plugin, second)
    await unpublish(plugin, volume.volume_id, first)
    await publish(plugin, volume, staging, second, cap)  # free again
    await unpublish(plugin, volume.volume_id, second)
    await unstage(plugin, volume.volume_id, staging)
    await delete_volume(plugin, volume.volume_id)


async def test_node_refusals(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-node-refuse")
    cap = mount_cap()
    staging, target = attachment_paths(plugin, volume)
    # publish before stage
    await expect_code(publish(plugin, volume, staging, target, cap), Code.FAILED_PRECONDITION)
    assert not target.exists() or not _is_mount_point(plugin, target)
    # stage of a volume that does not exist anywhere
    ghost = csi_pb2.Volume(volume_id="vol-" + "8" * 24)
    await expect_code(plugin.node.NodeStageVolume(stage_request(ghost, staging, cap),
                                                  timeout=RPC_TIMEOUT), Code.NOT_FOUND)
    # a staging directory the CO did not create
    await expect_code(plugin.node.NodeStageVolume(
        stage_request(volume, plugin.kubelet / "missing", cap), timeout=RPC_TIMEOUT),
        Code.NOT_FOUND)
    # the wrong kind
    await expect_code(plugin.node.NodeStageVolume(stage_request(volume, staging, block_cap()),
                                                  timeout=RPC_TIMEOUT), Code.INVALID_ARGUMENT)
    await expect_code(plugin.node.NodePublishVolume(
        publish_request(volume, staging, target, cap), timeout=RPC_TIMEOUT),
        Code.FAILED_PRECONDITION)
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []
    # unpublish and unstage of what was never there succeed
    await unpublish(plugin, volume.volume_id, target)
    await unstage(plugin, volume.volume_id, staging)
    where = await stage_and_publish(plugin, volume)
    await expect_code(delete_volume(plugin, volume.volume_id), Code.FAILED_PRECONDITION)
    await unpublish(plugin, volume.volume_id, where.target)
    await unstage(plugin, volume.volume_id, where.staging)
    await delete_volume(plugin, volume.volume_id)
