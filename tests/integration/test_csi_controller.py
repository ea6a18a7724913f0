"""Every Controller RPC against a real plugin process with real replicas (loop + btrfs)."""

from __future__ import annotations

import asyncio
import contextlib
import os

import grpc
import pytest

from csi_driver.proto import csi_pb2

from .conftest import (
    MIN_VOLUME_BYTES,
    NODE_ID,
    RPC_TIMEOUT,
    SMALL,
    TOPOLOGY_KEY,
    AccessMode,
    Plugin,
    attached,
    block_cap,
    create_request,
    create_volume,
    delete_volume,
    expect_code,
    list_volume_ids,
    mount_cap,
    replica_dirs,
    rwx_cap,
    write_file,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

MiB = 1 << 20
Code = grpc.StatusCode


# -- CreateVolume --------------------------------------------------------------------------------


async def test_create_is_idempotent_by_name(plugin: Plugin) -> None:
    first = await create_volume(plugin, "pvc-idem")
    second = await create_volume(plugin, "pvc-idem")
    assert first.volume_id == second.volume_id
    assert first.capacity_bytes == second.capacity_bytes == MIN_VOLUME_BYTES
    assert await list_volume_ids(plugin) == [first.volume_id]
    assert replica_dirs(plugin) == [first.volume_id]
    await delete_volume(plugin, first.volume_id)


async def test_capacity_range_is_honoured(plugin: Plugin) -> None:
    exact = await create_volume(plugin, "pvc-exact", required=300 * MiB, limit=300 * MiB)
    assert exact.capacity_bytes == 300 * MiB
    rounded = await create_volume(plugin, "pvc-round", required=300 * MiB + 1)
    assert rounded.capacity_bytes == 301 * MiB
    within = await create_volume(plugin, "pvc-limit", required=0, limit=400 * MiB)
    assert MIN_VOLUME_BYTES <= within.capacity_bytes <= 400 * MiB
    await expect_code(plugin.controller.CreateVolume(
        create_request("pvc-too-small", required=0, limit=SMALL), timeout=RPC_TIMEOUT),
        Code.OUT_OF_RANGE)
    await expect_code(plugin.controller.CreateVolume(
        create_request("pvc-inverted", required=400 * MiB, limit=300 * MiB),
        timeout=RPC_TIMEOUT), Code.OUT_OF_RANGE)
    assert sorted(await list_volume_ids(plugin)) == sorted(
        v.volume_id for v in (exact, rounded, within))
    for volume in (exact, rounded, within):
        await delete_volume(plugin, volume.volume_id)
    assert replica_dirs(plugin) == []


async def test_same_name_other_size_already_exists(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-size")
    error = await expect_code(plugin.controller.CreateVolume(
        create_request("pvc-size", required=2 * MIN_VOLUME_BYTES), timeout=RPC_TIMEOUT),
        Code.ALREADY_EXISTS)
    assert "pvc-size" in (error.details() or "")
    await expect_code(plugin.controller.CreateVolume(
        create_request("pvc-size", cap=block_cap()), timeout=RPC_TIMEOUT), Code.ALREADY_EXISTS)
    assert await list_volume_ids(plugin) == [volume.volume_id]
    await delete_volume(plugin, volume.volume_id)


async def test_unknown_parameter_is_named(plugin: Plugin) -> None:
    error = await expect_code(plugin.controller.CreateVolume(
        create_request("pvc-typo", parameters={"syncPolicy": "fast", "replicaCount": "3"}),
        timeout=RPC_TIMEOUT), Code.INVALID_ARGUMENT)
    assert "replicaCount" in (error.details() or "")
    assert await list_volume_ids(plugin) == []
    assert replica_dirs(plugin) == []


async def test_kubernetes_parameters_ignored_and_policy_echoed(plugin: Plugin) -> None:
    parameters = {
        "syncPolicy": "gold",
        "csi.storage.k8s.io/pvc/name": "data-db-0",
        "csi.storage.k8s.io/pvc/namespace": "default",
        "csi.storage.k8s.io/pv/name": "pvc-1234",
    }
    volume = await create_volume(plugin, "pvc-params", parameters=parameters)
    assert volume.volume_context["syncPolicy"] == "gold"
    assert not any(k.startswith("csi.storage.k8s.io/") for k in volume.volume_context)
    assert [dict(t.segments) for t in volume.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]
    await delete_volume(plugin, volume.volume_id)


async def test_requisite_topology_elsewhere_is_exhausted(plugin: Plugin) -> None:
    request = create_request("pvc-elsewhere")
    request.accessibility_requirements.requisite.append(
        csi_pb2.Topology(segments={TOPOLOGY_KEY: "another-node"}))
    await expect_code(plugin.controller.CreateVolume(request, timeout=RPC_TIMEOUT),
                      Code.RESOURCE_EXHAUSTED)
    ours = create_request("pvc-here")
    ours.accessibility_requirements.requisite.extend([
        csi_pb2.Topology(segments={TOPOLOGY_KEY: "another-node"}),
        csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID})])
    ours.accessibility_requirements.preferred.append(
        csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID}))
    volume = (await plugin.controller.CreateVolume(ours, timeout=RPC_TIMEOUT)).volume
    assert await list_volume_ids(plugin) == [volume.volume_id]
    await delete_volume(plugin, volume.volume_id)


async def test_concurrent_create_same_name(plugin: Plugin) -> None:
    async def attempt() -> csi_pb2.Volume | grpc.StatusCode:
        try:
            return await create_volume(plugin, "pvc-race")
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    results = await asyncio.gather(attempt(), attempt())
    volumes = [r for r in results if isinstance(r, csi_pb2.Volume)]
    codes = [r for r in results if isinstance(r, grpc.StatusCode)]
    assert volumes, f"neither concurrent create succeeded: {results}"
    assert all(c is Code.ABORTED for c in codes), results
    assert len({v.volume_id for v in volumes}) == 1
    # the CO retries the aborted one: same volume
    again = await create_volume(plugin, "pvc-race")
    assert again.volume_id == volumes[0].volume_id
    assert await list_volume_ids(plugin) == [again.volume_id]
    assert replica_dirs(plugin) == [again.volume_id]
    await delete_volume(plugin, again.volume_id)
    assert replica_dirs(plugin) == []


# -- content sources -----------------------------------------------------------------------------


async def _write_payload(plugin: Plugin, volume: csi_pb2.Volume, payload: bytes) -> None:
    async with attached(plugin, volume, label="writer") as where:
        write_file(where.target / "data.bin", payload)
        (where.target / "dir").mkdir()
        write_file(where.target / "dir" / "small.txt", b"hello\n")


async def _read_payload(plugin: Plugin, volume: csi_pb2.Volume) -> tuple[bytes, bytes]:
    async with attached(plugin, volume, label="reader") as where:
        return ((where.target / "data.bin").read_bytes(),
                (where.target / "dir" / "small.txt").read_bytes())


async def test_restore_from_snapshot(plugin: Plugin) -> None:
    payload = os.urandom(3 * MiB + 17)
    source = await create_volume(plugin, "pvc-origin")
    await _write_payload(plugin, source, payload)
    snap = (await plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="snap-origin", source_volume_id=source.volume_id), timeout=RPC_TIMEOUT)).snapshot
    # change the source after the snapshot: the restore must not see it
    async with attached(plugin, source, label="overwrite") as where:
        write_file(where.target / "data.bin", b"changed after the snapshot")
    restored = await create_volume(plugin, "pvc-restored", snapshot_id=snap.snapshot_id)
    assert restored.content_source.snapshot.snapshot_id == snap.snapshot_id
    assert restored.capacity_bytes >= source.capacity_bytes
    assert await _read_payload(plugin, restored) == (payload, b"hello\n")
    await plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT)
    for volume in (restored, source):
        await delete_volume(plugin, volume.volume_id)
    assert replica_dirs(plugin) == []


async def test_clone_volume(plugin: Plugin) -> None:
    payload = os.urandom(2 * MiB + 5)
    source = await create_volume(plugin, "pvc-clone-src")
    await _write_payload(plugin, source, payload)
    clone = await create_volume(plugin, "pvc-clone", source_volume_id=source.volume_id)
    assert clone.content_source.volume.volume_id == source.volume_id
    assert clone.volume_id != source.volume_id
    assert await _read_payload(plugin, clone) == (payload, b"hello\n")
    # the clone is independent of its source
    async with attached(plugin, clone, label="clone-writer") as where:
        write_file(where.target / "data.bin", b"clone only")
    assert await _read_payload(plugin, source) == (payload, b"hello\n")
    for volume in (clone, source):
        await delete_volume(plugin, volume.volume_id)
    assert replica_dirs(plugin) == []


async def test_missing_sources_not_found(plugin: Plugin) -> None:
    for request in (
        create_request("pvc-from-nothing", snapshot_id="snap-" + "0" * 24),
        create_request("pvc-from-foreign", snapshot_id="someone-elses-snapshot"),
        create_request("pvc-clone-nothing", source_volume_id="vol-" + "0" * 24),
        create_request("pvc-clone-foreign", source_volume_id="pv-elsewhere"),
    ):
        await expect_code(plugin.controller.CreateVolume(request, timeout=RPC_TIMEOUT),
                          Code.NOT_FOUND)
    assert await list_volume_ids(plugin) == []
    assert replica_dirs(plugin) == []


async def test_snapshot_survives_source_deletion(plugin: Plugin) -> None:
    payload = os.urandom(MiB)
    source = await create_volume(plugin, "pvc-doomed")
    await _write_payload(plugin, source, payload)
    snap = (await plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="snap-survivor", source_volume_id=source.volume_id), timeout=RPC_TIMEOUT)).snapshot
    await delete_volume(plugin, source.volume_id)
    assert source.volume_id not in await list_volume_ids(plugin)
    # re-using the deleted volume's name must not destroy the snapshot it left (it may be
    # refused until the snapshot is gone, or succeed with a new, empty volume)
    reborn: csi_pb2.Volume | None = None
    with contextlib.suppress(grpc.aio.AioRpcError):
        reborn = await create_volume(plugin, "pvc-doomed")
    got = await plugin.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT)
    assert got.snapshot.ready_to_use
    restored = await create_volume(plugin, "pvc-phoenix", snapshot_id=snap.snapshot_id)
    assert await _read_payload(plugin, restored) == (payload, b"hello\n")
    await plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT)
    if reborn is None:
        # the last snapshot of a deleted volume frees its image...
        assert replica_dirs(plugin) == [restored.volume_id]
        # ...and with it the name
        reborn = await create_volume(plugin, "pvc-doomed")
    assert reborn.volume_id == source.volume_id
    async with attached(plugin, reborn, label="reborn") as where:
        assert not (where.target / "data.bin").exists()
    for volume in (restored, reborn):
        await delete_volume(plugin, volume.volume_id)
    assert replica_dirs(plugin) == []


async def test_failed_create_does_not_poison_the_name(plugin: Plugin) -> None:
    """A create the backend refused leaves no record that would judge the next attempt."""
    source = await create_volume(plugin, "pvc-poison")
    snap = (await plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="snap-poison", source_volume_id=source.volume_id), timeout=RPC_TIMEOUT)).snapshot
    await delete_volume(plugin, source.volume_id)
    # the deleted volume's image still holds the snapshot, so its name may be refused for now
    refused = True
    try:
        reborn = await create_volume(plugin, "pvc-poison")
    except grpc.aio.AioRpcError:
        pass
    else:
        refused = False
        await delete_volume(plugin, reborn.volume_id)
    assert await list_volume_ids(plugin) == []
    await plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT)
    # now with another size: judged on its own, not against the refused attempt
    bigger = await create_volume(plugin, "pvc-poison", required=2 * MIN_VOLUME_BYTES)
    assert bigger.capacity_bytes == 2 * MIN_VOLUME_BYTES
    assert refused or bigger.volume_id == source.volume_id
    await delete_volume(plugin, bigger.volume_id)
    assert replica_dirs(plugin) == []


async def test_restore_snapshot_taken_before_expansion(plugin: Plugin) -> None:
    source = await create_volume(plugin, "pvc-grew")
    await _write_payload(plugin, source, b"before growth")
    snap = (await plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="snap-before-growth", source_volume_id=source.volume_id),
        timeout=RPC_TIMEOUT)).snapshot
    assert snap.size_bytes == MIN_VOLUME_BYTES
    await plugin.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=source.volume_id,
        capacity_range=csi_pb2.CapacityRange(required_bytes=3 * MIN_VOLUME_BYTES)),
        timeout=RPC_TIMEOUT)
    try:
        # Kubernetes lets a claim ask for exactly the snapshot's restoreSize
        restored = await create_volume(plugin, "pvc-grew-restored", snapshot_id=snap.snapshot_id,
                                       required=snap.size_bytes)
        assert restored.capacity_bytes == snap.size_bytes
        assert await _read_payload(plugin, restored) == (b"before growth", b"hello\n")
        await delete_volume(plugin, restored.volume_id)
    finally:
        await plugin.controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id), timeout=RPC_TIMEOUT)
        await delete_volume(plugin, source.volume_id)


# -- DeleteVolume --------------------------------------------------------------------------------


async def test_delete_is_idempotent(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-delete")
    await delete_volume(plugin, volume.volume_id)
    await delete_volume(plugin, volume.volume_id)
    await delete_volume(plugin, "vol-" + "f" * 24)  # well-formed, never created
    await delete_volume(plugin, "some-foreign-volume")  # not even ours
    assert await list_volume_ids(plugin) == []
    assert replica_dirs(plugin) == []


# -- ValidateVolumeCapabilities ------------------------------------------------------------------


async def test_validate_volume_capabilities(plugin: Plugin) -> None:
    fs = await create_volume(plugin, "pvc-validate-fs")
    block = await create_volume(plugin, "pvc-validate-block", cap=block_cap())

    async def validate(volume: csi_pb2.Volume, *caps: csi_pb2.VolumeCapability,
                       ) -> csi_pb2.ValidateVolumeCapabilitiesResponse:
        return await plugin.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(
                volume_id=volume.volume_id, volume_capabilities=list(caps),
                volume_context=dict(volume.volume_context)), timeout=RPC_TIMEOUT)

    for volume, caps in ((fs, [mount_cap()]), (fs, [rwx_cap(), mount_cap(fs_type="btrfs")]),
                         (block, [block_cap()]),
                         (block, [block_cap(AccessMode.SINGLE_NODE_READER_ONLY)])):
        ok = await validate(volume, *caps)
        assert ok.HasField("confirmed"), ok.message
        assert list(ok.confirmed.volume_capabilities) == caps

    refused = [
        (block, [block_cap(AccessMode.MULTI_NODE_MULTI_WRITER)]),
        (fs, [mount_cap(fs_type="ext4")]),
        (fs, [block_cap()]),  # a filesystem volume cannot be used as a block device
        (block, [mount_cap()]),
        (fs, [mount_cap(), mount_cap(fs_type="ext4")]),  # one bad capability spoils the set
    ]
    for volume, caps in refused:
        response = await validate(volume, *caps)
        assert not response.HasField("confirmed"), caps
        assert response.message
    ext4 = await validate(fs, mount_cap(fs_type="ext4"))
    assert "ext4" in ext4.message

    await expect_code(validate(csi_pb2.Volume(volume_id="vol-" + "1" * 24), mount_cap()),
                      Code.NOT_FOUND)
    await expect_code(plugin.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=fs.volume_id),
        timeout=RPC_TIMEOUT), Code.INVALID_ARGUMENT)
    for volume in (fs, block):
        await delete_volume(plugin, volume.volume_id)


# -- ListVolumes ---------------------------------------------------------------------------------


async def test_list_volumes_pagination(plugin: Plugin) -> None:
    created = [await create_volume(plugin, f"pvc-list-{i}") for i in range(5)]
    seen: list[str] = []
    tokens: list[str] = []
    token = ""
    for _ in range(10):  # bounded: 5 entries in pages of 2 take 3 pages
        page = await plugin.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token),
            timeout=RPC_TIMEOUT)
        assert len(page.entries) <= 2
        seen += [e.volume.volume_id for e in page.entries]
        token = page.next_token
        if not token:
            break
        tokens.append(token)
    assert token == ""
    assert len(tokens) == 2
    assert sorted(seen) == sorted(v.volume_id for v in created)
    assert len(seen) == len(set(seen))
    everything = await plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(),
                                                     timeout=RPC_TIMEOUT)
    assert everything.next_token == ""
    assert len(everything.entries) == 5
    entry = next(e for e in everything.entries if e.volume.volume_id == created[0].volume_id)
    assert entry.volume.capacity_bytes == created[0].capacity_bytes

    await expect_code(plugin.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(max_entries=2, starting_token="not-a-token"),
        timeout=RPC_TIMEOUT), Code.ABORTED)
    for volume in created:
        await delete_volume(plugin, volume.volume_id)


# -- GetCapacity ---------------------------------------------------------------------------------


async def test_get_capacity(plugin: Plugin) -> None:
    here = await plugin.controller.GetCapacity(csi_pb2.GetCapacityRequest(
        volume_capabilities=[mount_cap()],
        accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID})),
        timeout=RPC_TIMEOUT)
    assert here.available_capacity > 0
    anywhere = await plugin.controller.GetCapacity(csi_pb2.GetCapacityRequest(),
                                                   timeout=RPC_TIMEOUT)
    assert anywhere.available_capacity > 0
    elsewhere = await plugin.controller.GetCapacity(csi_pb2.GetCapacityRequest(
        volume_capabilities=[mount_cap()],
        accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: "another-node"})),
        timeout=RPC_TIMEOUT)
    assert elsewhere.available_capacity == 0


# -- expansion -----------------------------------------------------------------------------------


async def test_expand_volume_online(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-grow")
    async with attached(plugin, volume) as where:
        before = os.statvfs(where.target)
        before_total = before.f_blocks * before.f_frsize
        write_file(where.target / "keep.txt", b"still here\n")
        grown = await plugin.controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=2 * MIN_VOLUME_BYTES),
                volume_capability=where.cap), timeout=RPC_TIMEOUT)
        assert grown.capacity_bytes == 2 * MIN_VOLUME_BYTES
        assert grown.node_expansion_required
        node = await plugin.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=volume.volume_id, volume_path=str(where.target),
            staging_target_path=str(where.staging),
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 * MIN_VOLUME_BYTES),
            volume_capability=where.cap), timeout=RPC_TIMEOUT)
        assert node.capacity_bytes == 2 * MIN_VOLUME_BYTES
        after = os.statvfs(where.target)
        after_total = after.f_blocks * after.f_frsize
        assert after_total > before_total + MIN_VOLUME_BYTES // 2, (before_total, after_total)
        assert after_total <= 2 * MIN_VOLUME_BYTES
        assert (where.target / "keep.txt").read_bytes() == b"still here\n"
        stats = await plugin.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=volume.volume_id, volume_path=str(where.target)), timeout=RPC_TIMEOUT)
        total = next(u.total for u in stats.usage if u.unit == csi_pb2.VolumeUsage.BYTES)
        assert total == after_total
    # idempotent: asking for what it already has changes nothing
    again = await plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume.volume_id,
            capacity_range=csi_pb2.CapacityRange(required_bytes=2 * MIN_VOLUME_BYTES)),
        timeout=RPC_TIMEOUT)
    assert again.capacity_bytes == 2 * MIN_VOLUME_BYTES
    got = await plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=RPC_TIMEOUT)
    assert got.volume.capacity_bytes == 2 * MIN_VOLUME_BYTES
    await expect_code(plugin.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(volume_id="vol-" + "2" * 24,
                                              capacity_range=csi_pb2.CapacityRange(
                                                  required_bytes=2 * MIN_VOLUME_BYTES)),
        timeout=RPC_TIMEOUT), Code.NOT_FOUND)
    await delete_volume(plugin, volume.volume_id)


# -- snapshots -----------------------------------------------------------------------------------


async def test_snapshot_lifecycle(plugin: Plugin) -> None:
    first = await create_volume(plugin, "pvc-snap-a")
    second = await create_volume(plugin, "pvc-snap-b")

    async def snapshot(name: str, volume: csi_pb2.Volume) -> csi_pb2.Snapshot:
        response = await plugin.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=name, source_volume_id=volume.volume_id), timeout=RPC_TIMEOUT)
        return response.snapshot

    snaps_a = [await snapshot(f"snap-a-{i}", first) for i in range(3)]
    snaps_b = [await snapshot("snap-b-0", second)]
    again = await snapshot("snap-a-0", first)  # idempotent by name
    assert again.snapshot_id == snaps_a[0].snapshot_id
    assert again.creation_time == snaps_a[0].creation_time
    await expect_code(snapshot("snap-a-0", second), Code.ALREADY_EXISTS)
    for snap in snaps_a:
        assert snap.ready_to_use
        assert snap.source_volume_id == first.volume_id
        assert snap.size_bytes == first.capacity_bytes

    async def list_all(**fields: object) -> tuple[list[str], int]:
        ids: list[str] = []
        pages = 0
        token = ""
        while pages < 10:
            page = await plugin.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(
                starting_token=token, **fields), timeout=RPC_TIMEOUT)  # type: ignore[arg-type]
            pages += 1
            ids += [e.snapshot.snapshot_id for e in page.entries]
            token = page.next_token
            if not token:
                break
        return ids, pages

    every, _ = await list_all()
    assert sorted(every) == sorted(s.snapshot_id for s in snaps_a + snaps_b)
    paged, pages = await list_all(max_entries=2)
    assert sorted(paged) == sorted(every)
    assert pages == 2
    of_a, _ = await list_all(source_volume_id=first.volume_id)
    assert sorted(of_a) == sorted(s.snapshot_id for s in snaps_a)
    of_a_paged, pages = await list_all(source_volume_id=first.volume_id, max_entries=1)
    assert of_a_paged == sorted(of_a)
    assert pages == 3
    by_id, _ = await list_all(snapshot_id=snaps_b[0].snapshot_id)
    assert by_id == [snaps_b[0].snapshot_id]
    mismatch, _ = await list_all(snapshot_id=snaps_b[0].snapshot_id,
                                 source_volume_id=first.volume_id)
    assert mismatch == []
    unknown, _ = await list_all(snapshot_id="snap-" + "3" * 24)
    assert unknown == []
    await expect_code(plugin.controller.ListSnapshots(
        csi_pb2.ListSnapshotsRequest(starting_token="bogus"), timeout=RPC_TIMEOUT),
        Code.ABORTED)

    got = await plugin.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=snaps_a[1].snapshot_id), timeout=RPC_TIMEOUT)
    assert got.snapshot == snaps_a[1]
    await expect_code(plugin.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id="snap-" + "4" * 24), timeout=RPC_TIMEOUT),
        Code.NOT_FOUND)

    for snap in snaps_a + snaps_b:
        for _ in range(2):  # idempotent
            await plugin.controller.DeleteSnapshot(
                csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id),
                timeout=RPC_TIMEOUT)
    await plugin.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id="snap-" + "5" * 24), timeout=RPC_TIMEOUT)
    assert (await list_all())[0] == []
    await expect_code(plugin.controller.GetSnapshot(
        csi_pb2.GetSnapshotRequest(snapshot_id=snaps_a[0].snapshot_id), timeout=RPC_TIMEOUT),
        Code.NOT_FOUND)
    await expect_code(snapshot("snap-of-nothing", csi_pb2.Volume(volume_id="vol-" + "6" * 24)),
                      Code.NOT_FOUND)
    for volume in (first, second):
        await delete_volume(plugin, volume.volume_id)
    assert replica_dirs(plugin) == []


# -- get, health, unimplemented ------------------------------------------------------------------


async def test_controller_get_volume_and_health(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-get", parameters={"syncPolicy": "gold"})
    got = await plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=RPC_TIMEOUT)
    assert got.volume == volume
    health = await plugin.controller.ControllerGetVolumeHealth(
        csi_pb2.ControllerGetVolumeHealthRequest(volume_id=volume.volume_id),
        timeout=RPC_TIMEOUT)
    assert health.volume_health.volume_id == volume.volume_id
    assert list(health.volume_health.health_statuses) == []
    listed = await plugin.controller.ControllerListVolumeHealth(
        csi_pb2.ControllerListVolumeHealthRequest(), timeout=RPC_TIMEOUT)
    assert [e.volume_id for e in listed.entries] == [volume.volume_id]
    assert all(not e.health_statuses for e in listed.entries)
    for call in (
        plugin.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id="vol-" + "7" * 24),
            timeout=RPC_TIMEOUT),
        plugin.controller.ControllerGetVolumeHealth(
            csi_pb2.ControllerGetVolumeHealthRequest(volume_id="vol-" + "7" * 24),
            timeout=RPC_TIMEOUT),
    ):
        await expect_code(call, Code.NOT_FOUND)
    await delete_volume(plugin, volume.volume_id)
    await expect_code(plugin.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=RPC_TIMEOUT),
        Code.NOT_FOUND)


async def test_controller_capabilities(plugin: Plugin) -> None:
    response = await plugin.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), timeout=RPC_TIMEOUT)
    rpc = csi_pb2.ControllerServiceCapability.RPC
    offered = {c.rpc.type for c in response.capabilities}
    assert {rpc.CREATE_DELETE_VOLUME, rpc.CREATE_DELETE_SNAPSHOT, rpc.CLONE_VOLUME,
            rpc.EXPAND_VOLUME, rpc.LIST_VOLUMES, rpc.LIST_SNAPSHOTS, rpc.GET_CAPACITY,
            rpc.GET_VOLUME, rpc.GET_SNAPSHOT, rpc.GET_VOLUME_HEALTH} <= offered
    assert rpc.PUBLISH_UNPUBLISH_VOLUME not in offered


async def test_controller_publish_unimplemented(plugin: Plugin) -> None:
    volume = await create_volume(plugin, "pvc-attach")
    await expect_code(plugin.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(volume_id=volume.volume_id, node_id=NODE_ID,
                                               volume_capability=mount_cap()),
        timeout=RPC_TIMEOUT), Code.UNIMPLEMENTED)
    await expect_code(plugin.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id=NODE_ID),
        timeout=RPC_TIMEOUT), Code.UNIMPLEMENTED)
    await delete_volume(plugin, volume.volume_id)
