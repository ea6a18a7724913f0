"""SIGKILL in the middle of an operation, restart on the same data dir, retry: it must finish.

Each test arms one failpoint (``sharedsync.failpoints``: reaching it SIGKILLs the plugin), issues
the RPC that reaches it, sees the connection drop and the process die by SIGKILL, restarts the
plugin without failpoints on the same data dir and retries the same RPC the way a CO would. The
retry must succeed with the right result (one volume, the data written before the crash), and
after the full undo (unpublish, unstage, delete) the workspace's leak check must pass.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable

import grpc
import pytest

from csi_driver.proto import csi_pb2
from sharedsync.core.ids import volume_id_for

from .conftest import (
    RPC_TIMEOUT,
    Plugin,
    StartPlugin,
    attached,
    attachment_paths,
    block_cap,
    create_request,
    create_volume,
    delete_volume,
    expect_code,
    lingering_loops,
    list_volume_ids,
    mount_cap,
    mounts_under,
    publish,
    replica_dirs,
    rpc_error,
    stage,
    stage_and_publish,
    unpublish,
    unstage,
    write_file,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

MiB = 1 << 20
PAYLOAD = os.urandom(MiB + 123)


async def crash_and_restart(start_plugin: StartPlugin, failpoint: str,
                            call: Callable[[Plugin], Awaitable[object]]) -> Plugin:
    """Run ``call`` on a plugin armed with ``failpoint``; check it died; start a clean one."""
    armed = await start_plugin(failpoint)
    error = await rpc_error(call(armed))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())
    assert await armed.wait_exit() == -signal.SIGKILL
    await armed.channel.close()
    return await start_plugin()


async def _check_usable(plugin: Plugin, volume: csi_pb2.Volume,
                        expected: bytes | None = None) -> None:
    """Stage, publish, check (or write) the payload, unpublish and unstage."""
    async with attached(plugin, volume, label="check") as where:
        if expected is None:
            write_file(where.target / "payload", PAYLOAD)
        else:
            assert (where.target / "payload").read_bytes() == expected
        (where.target / "after-crash").write_bytes(b"writable")


async def _finish(plugin: Plugin, volume_id: str) -> None:
    await delete_volume(plugin, volume_id)
    assert await list_volume_ids(plugin) == []
    assert replica_dirs(plugin) == []


# -- CreateVolume --------------------------------------------------------------------------------


@pytest.mark.parametrize("failpoint", [
    "replica.create.after_image",
    "replica.create.before_commit",
    "replica.open.after_attach",
    "replica.close.after_unmount",
    "controller.create_volume.after_record",
])
async def test_crash_during_create(start_plugin: StartPlugin, failpoint: str) -> None:
    request = create_request("pvc-crash-create")
    plugin = await crash_and_restart(
        start_plugin, failpoint,
        lambda p: p.controller.CreateVolume(request, timeout=RPC_TIMEOUT))
    assert await list_volume_ids(plugin) == []  # not READY: not reported
    volume = (await plugin.controller.CreateVolume(request, timeout=RPC_TIMEOUT)).volume
    again = (await plugin.controller.CreateVolume(request, timeout=RPC_TIMEOUT)).volume
    assert again.volume_id == volume.volume_id
    assert again.capacity_bytes == volume.capacity_bytes
    assert await list_volume_ids(plugin) == [volume.volume_id]
    assert replica_dirs(plugin) == [volume.volume_id]
    # nothing of the interrupted attempt is left mounted or attached once it is closed
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []
    await _check_usable(plugin, volume)
    await _check_usable(plugin, volume, PAYLOAD)
    await _finish(plugin, volume.volume_id)


@pytest.mark.parametrize("failpoint", [
    "replica.create.after_image",
    "replica.create.before_commit",
    "replica.open.after_attach",
    "replica.close.after_unmount",
    "controller.create_volume.after_record",
])
async def test_crash_during_create_then_delete(start_plugin: StartPlugin,
                                               failpoint: str) -> None:
    """The CO may give up on a create (the claim was deleted): DeleteVolume cleans up."""
    request = create_request("pvc-crash-abandoned")
    plugin = await crash_and_restart(
        start_plugin, failpoint,
        lambda p: p.controller.CreateVolume(request, timeout=RPC_TIMEOUT))
    volume_id = volume_id_for(request.name)  # the id the CO never got to see
    await delete_volume(plugin, volume_id)
    await _finish(plugin, volume_id)
    # and the name can be used again
    volume = (await plugin.controller.CreateVolume(request, timeout=RPC_TIMEOUT)).volume
    await _check_usable(plugin, volume)
    await _finish(plugin, volume.volume_id)


@pytest.mark.parametrize("failpoint", [
    "replica.create.before_commit",
    "replica.open.after_attach",
])
async def test_crash_during_restore(start_plugin: StartPlugin, failpoint: str) -> None:
    clean = await start_plugin()
    source = await create_volume(clean, "pvc-crash-source")
    await _check_usable(clean, source)
    snap = (await clean.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="snap-crash", source_volume_id=source.volume_id), timeout=RPC_TIMEOUT)).snapshot
    await clean.stop()
    request = create_request("pvc-crash-restored", snapshot_id=snap.snapshot_id)
    plugin = await crash_and_restart(
        start_plugin, failpoint,
        lambda p: p.controller.CreateVolume(request, timeout=RPC_TIMEOUT))
    restored = (await plugin.controller.CreateVolume(request, timeout=RPC_TIMEOUT)).volume
    assert sorted(await list_volume_ids(plugin)) == sorted([source.volume_id,
                                                            restored.volume_id])
    await _check_usable(plugin, restored, PAYLOAD)
    await _check_usable(plugin, source, PAYLOAD)
    await plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT)
    await delete_volume(plugin, restored.volume_id)
    await _finish(plugin, source.volume_id)


# -- DeleteVolume --------------------------------------------------------------------------------


@pytest.mark.parametrize("with_snapshot", [False, True], ids=["plain", "with-snapshot"])
@pytest.mark.parametrize("failpoint", [
    "controller.delete_volume.after_backend",
    "replica.open.after_attach",  # the store opens a closed replica to look for snapshots
    "replica.close.after_unmount",
])
async def test_crash_during_delete(start_plugin: StartPlugin, failpoint: str,
                                   with_snapshot: bool) -> None:
    clean = await start_plugin()
    volume = await create_volume(clean, "pvc-crash-delete")
    await _check_usable(clean, volume)
    snap: csi_pb2.Snapshot | None = None
    if with_snapshot:
        snap = (await clean.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name="snap-crash-delete", source_volume_id=volume.volume_id),
            timeout=RPC_TIMEOUT)).snapshot
    await clean.stop()
    request = csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
    plugin = await crash_and_restart(
        start_plugin, failpoint,
        lambda p: p.controller.DeleteVolume(request, timeout=RPC_TIMEOUT))
    await plugin.controller.DeleteVolume(request, timeout=RPC_TIMEOUT)
    await plugin.controller.DeleteVolume(request, timeout=RPC_TIMEOUT)
    assert await list_volume_ids(plugin) == []
    if snap is not None:
        # the snapshot outlived its volume's interrupted delete, data and all
        restored = await create_volume(plugin, "pvc-crash-delete-restored",
                                       snapshot_id=snap.snapshot_id)
        await _check_usable(plugin, restored, PAYLOAD)
        await plugin.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT)
        await delete_volume(plugin, restored.volume_id)
    assert replica_dirs(plugin) == []
    # the name is free again, for a new and empty volume
    fresh = await create_volume(plugin, "pvc-crash-delete")
    assert fresh.volume_id == volume.volume_id
    async with attached(plugin, fresh) as where:
        assert not (where.target / "payload").exists()
    await _finish(plugin, fresh.volume_id)


# -- snapshots -----------------------------------------------------------------------------------


@pytest.mark.parametrize("failpoint", ["replica.open.after_attach",
                                       "replica.close.after_unmount"])
async def test_crash_during_snapshot(start_plugin: StartPlugin, failpoint: str) -> None:
    """CreateSnapshot and DeleteSnapshot open a closed replica; a crash there is retried."""
    clean = await start_plugin()
    volume = await create_volume(clean, "pvc-crash-snap")
    await _check_usable(clean, volume)
    await clean.stop()
    create = csi_pb2.CreateSnapshotRequest(name="snap-crash-snap",
                                           source_volume_id=volume.volume_id)
    plugin = await crash_and_restart(
        start_plugin, failpoint,
        lambda p: p.controller.CreateSnapshot(create, timeout=RPC_TIMEOUT))
    listed = await plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(),
                                                   timeout=RPC_TIMEOUT)
    assert list(listed.entries) == []  # unfinished: not reported
    snap = (await plugin.controller.CreateSnapshot(create, timeout=RPC_TIMEOUT)).snapshot
    assert snap.ready_to_use
    listed = await plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(),
                                                   timeout=RPC_TIMEOUT)
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snap.snapshot_id]
    assert mounts_under(plugin.workspace.root) == []
    restored = await create_volume(plugin, "pvc-crash-snap-restored",
                                   snapshot_id=snap.snapshot_id)
    await _check_usable(plugin, restored, PAYLOAD)
    await delete_volume(plugin, restored.volume_id)
    await plugin.stop()

    delete = csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)
    plugin = await crash_and_restart(
        start_plugin, failpoint,
        lambda p: p.controller.DeleteSnapshot(delete, timeout=RPC_TIMEOUT))
    await plugin.controller.DeleteSnapshot(delete, timeout=RPC_TIMEOUT)
    await plugin.controller.DeleteSnapshot(delete, timeout=RPC_TIMEOUT)
    await expect_code(plugin.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT),
        grpc.StatusCode.NOT_FOUND)
    await _check_usable(plugin, volume, PAYLOAD)
    await _finish(plugin, volume.volume_id)


# -- NodeStageVolume -----------------------------------------------------------------------------


@pytest.mark.parametrize("failpoint", ["replica.open.after_attach", "node.stage.after_open"])
async def test_crash_during_stage(start_plugin: StartPlugin, failpoint: str) -> None:
    clean = await start_plugin()
    volume = await create_volume(clean, "pvc-crash-stage")
    await _check_usable(clean, volume)
    await clean.stop()
    cap = mount_cap()
    staging, target = attachment_paths(clean, volume)
    plugin = await crash_and_restart(start_plugin, failpoint,
                                     lambda p: stage(p, volume, staging, cap))
    await stage(plugin, volume, staging, cap)
    await stage(plugin, volume, staging, cap)
    await publish(plugin, volume, staging, target, cap)
    assert (target / "payload").read_bytes() == PAYLOAD
    write_file(target / "more", b"more")
    await unpublish(plugin, volume.volume_id, target)
    await unstage(plugin, volume.volume_id, staging)
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []
    await _check_usable(plugin, volume, PAYLOAD)
    await _finish(plugin, volume.volume_id)


@pytest.mark.parametrize("failpoint", ["replica.open.after_attach", "node.stage.after_open"])
async def test_crash_during_stage_then_unstage(start_plugin: StartPlugin,
                                               failpoint: str) -> None:
    """The pod went away while the plugin was down: kubelet unstages instead of retrying."""
    clean = await start_plugin()
    volume = await create_volume(clean, "pvc-crash-stage-abandoned")
    await clean.stop()
    cap = mount_cap()
    staging, _ = attachment_paths(clean, volume)
    plugin = await crash_and_restart(start_plugin, failpoint,
                                     lambda p: stage(p, volume, staging, cap))
    await unstage(plugin, volume.volume_id, staging)
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []
    await _finish(plugin, volume.volume_id)


# -- NodePublishVolume ---------------------------------------------------------------------------


async def test_crash_during_publish(start_plugin: StartPlugin) -> None:
    clean = await start_plugin()
    volume = await create_volume(clean, "pvc-crash-publish")
    cap = mount_cap()
    staging, target = attachment_paths(clean, volume)
    await stage(clean, volume, staging, cap)
    write_file(staging / "payload", PAYLOAD)
    await clean.stop()
    plugin = await crash_and_restart(start_plugin, "node.publish.after_mkdir",
                                     lambda p: publish(p, volume, staging, target, cap))
    assert target.is_dir()  # the half-done publish: a directory, no mount yet
    await publish(plugin, volume, staging, target, cap)
    assert str(target) in mounts_under(plugin.workspace.root)
    assert (target / "payload").read_bytes() == PAYLOAD
    await unpublish(plugin, volume.volume_id, target)
    assert not target.exists()
    await unstage(plugin, volume.volume_id, staging)
    await _check_usable(plugin, volume, PAYLOAD)
    await _finish(plugin, volume.volume_id)


async def test_crash_during_publish_then_unpublish(start_plugin: StartPlugin) -> None:
    clean = await start_plugin()
    volume = await create_volume(clean, "pvc-crash-publish-abandoned")
    cap = mount_cap()
    staging, target = attachment_paths(clean, volume)
    await stage(clean, volume, staging, cap)
    await clean.stop()
    plugin = await crash_and_restart(start_plugin, "node.publish.after_mkdir",
                                     lambda p: publish(p, volume, staging, target, cap))
    await unpublish(plugin, volume.volume_id, target)
    assert not target.exists()
    await unstage(plugin, volume.volume_id, staging)
    await _finish(plugin, volume.volume_id)


# -- NodeUnstageVolume ---------------------------------------------------------------------------


@pytest.mark.parametrize("failpoint", ["node.unstage.after_unmount",
                                       "replica.close.after_unmount"])
async def test_crash_during_unstage(start_plugin: StartPlugin, failpoint: str) -> None:
    clean = await start_plugin()
    volume = await create_volume(clean, "pvc-crash-unstage")
    where = await stage_and_publish(clean, volume)
    write_file(where.target / "payload", PAYLOAD)
    await unpublish(clean, volume.volume_id, where.target)
    await clean.stop()
    plugin = await crash_and_restart(start_plugin, failpoint,
                                     lambda p: unstage(p, volume.volume_id, where.staging))
    await unstage(plugin, volume.volume_id, where.staging)
    await unstage(plugin, volume.volume_id, where.staging)
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []
    await _check_usable(plugin, volume, PAYLOAD)
    await _finish(plugin, volume.volume_id)


# -- a crash with no operation in flight ---------------------------------------------------------


@pytest.mark.parametrize("failpoint", ["replica.open.after_attach", "node.stage.after_open"])
async def test_crash_during_block_stage(start_plugin: StartPlugin, failpoint: str) -> None:
    clean = await start_plugin()
    cap = block_cap()
    volume = await create_volume(clean, "pvc-crash-block", cap=cap)
    await clean.stop()
    staging, target = attachment_paths(clean, volume)
    plugin = await crash_and_restart(start_plugin, failpoint,
                                     lambda p: stage(p, volume, staging, cap))
    await stage(plugin, volume, staging, cap)
    await stage(plugin, volume, staging, cap)
    await publish(plugin, volume, staging, target, cap)
    fd = os.open(target, os.O_RDWR)
    try:
        os.pwrite(fd, PAYLOAD, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    await unpublish(plugin, volume.volume_id, target)
    await unstage(plugin, volume.volume_id, staging)
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []  # no stray loop device
    await stage(plugin, volume, staging, cap)
    await publish(plugin, volume, staging, target, cap)
    fd = os.open(target, os.O_RDONLY)
    try:
        assert os.pread(fd, len(PAYLOAD), 3 * MiB) == PAYLOAD
    finally:
        os.close(fd)
    await unpublish(plugin, volume.volume_id, target)
    await unstage(plugin, volume.volume_id, staging)
    await _finish(plugin, volume.volume_id)


async def test_kill_while_published(start_plugin: StartPlugin) -> None:
    first = await start_plugin()
    volume = await create_volume(first, "pvc-crash-published")
    where = await stage_and_publish(first, volume)
    write_file(where.target / "payload", PAYLOAD)
    await first.kill()
    assert first.process.returncode == -signal.SIGKILL
    # the mounts are the kernel's: they outlive the plugin
    assert (where.target / "payload").read_bytes() == PAYLOAD
    plugin = await start_plugin()
    await unpublish(plugin, volume.volume_id, where.target)
    await unstage(plugin, volume.volume_id, where.staging)
    assert mounts_under(plugin.workspace.root) == []
    assert await lingering_loops(plugin.workspace.root) == []
    await _check_usable(plugin, volume, PAYLOAD)
    await _finish(plugin, volume.volume_id)
