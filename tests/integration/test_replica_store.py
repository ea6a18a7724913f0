"""ReplicaStore on real btrfs and real ext4 in real loop images, with real mounts and SIGKILLs.

Each test gets its own store under ``tmp_path`` and is checked for leaks at teardown: no loop
device may stay attached to a file under ``tmp_path`` and nothing may stay mounted under it.
The ``store`` fixture runs every test on a btrfs store and on an ext4 store; what only one of
them can do (btrfs checksums and send streams, ext4's error counter) is tested on that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from replication_agent.proto import agent_pb2 as pb
from replication_agent.transfer import snapshot_ref
from sharedsync.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from sharedsync.core.ids import snapshot_id_for, volume_id_for
from sharedsync.core.sizes import MIN_VOLUME_BYTES, MiB
from sharedsync.storage import btrfs, ext4, loop, mounts
from sharedsync.storage.leftovers import leftovers_under
from sharedsync.storage.replicas import (
    BLOCK_FILE,
    LIVE,
    PARTIAL_PREFIX,
    ReplicaMeta,
    ReplicaStore,
    Source,
    StoreFilesystem,
    VolumeKind,
    image_size,
)
from tests.leaks import force_cleanup


def _kernel_has(filesystem: str) -> bool:
    return (filesystem in Path("/proc/filesystems").read_text().split()
            or Path(f"/sys/module/{filesystem}").exists())


pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts"),
]

NEEDS_BTRFS = [
    pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="btrfs-progs is not installed"),
    pytest.mark.skipif(not _kernel_has("btrfs"), reason="the kernel has no btrfs"),
]
NEEDS_EXT4 = [
    pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="e2fsprogs is not installed"),
    pytest.mark.skipif(not _kernel_has("ext4"), reason="the kernel has no ext4"),
]

REPO = Path(__file__).resolve().parents[2]
SIZE = MIN_VOLUME_BYTES  # 256 MiB, sparse
CAP_SYS_RESOURCE = 24  # linux/capability.h


# -- leak check (self-contained: the integration conftest belongs to someone else) --------------


@contextlib.contextmanager
def leak_checked(tmp_path: Path) -> Iterator[None]:
    """Fail the test if it leaves a mount or a loop device under tmp_path (then clean up)."""
    yield
    leaked = leftovers_under(tmp_path)
    if leaked:
        force_cleanup(tmp_path)
    assert not leaked, f"leaked: {leaked}"


@pytest.fixture(params=[
    pytest.param(StoreFilesystem.BTRFS, marks=NEEDS_BTRFS, id="btrfs"),
    pytest.param(StoreFilesystem.EXT4, marks=NEEDS_EXT4, id="ext4"),
])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplicaStore]:
    """An empty store under tmp_path making replicas of one filesystem, checked for leaks."""
    s = ReplicaStore(tmp_path / "store", request.param)
    s.ensure_layout()
    with leak_checked(tmp_path):
        yield s


@pytest.fixture(params=[pytest.param(None, marks=[*NEEDS_BTRFS, *NEEDS_EXT4], id="mixed")])
def mixed(tmp_path: Path) -> Iterator[dict[StoreFilesystem, ReplicaStore]]:
    """Two views of one store root: one makes btrfs replicas, the other ext4 ones."""
    stores = {fs: ReplicaStore(tmp_path / "store", fs) for fs in StoreFilesystem}
    stores[StoreFilesystem.BTRFS].ensure_layout()
    with leak_checked(tmp_path):
        yield stores


def on_ext4(store: ReplicaStore) -> bool:
    return store.filesystem is StoreFilesystem.EXT4


def only_btrfs(store: ReplicaStore, why: str) -> None:
    if on_ext4(store):
        pytest.skip(f"btrfs only: {why}")


def has_capability(bit: int) -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def needs_online_resize(store: ReplicaStore) -> None:
    """ext4 grows a mounted filesystem only for a process with CAP_SYS_RESOURCE (containers
    often drop it); offline growth, at the next open, needs no capability and is tested."""
    if on_ext4(store) and not has_capability(CAP_SYS_RESOURCE):
        pytest.skip("online ext4 resizing (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE, which "
                    "this test process lacks")


def expected_meta(store: ReplicaStore, volume_id: str, size: int,
                  kind: VolumeKind = VolumeKind.FILESYSTEM) -> ReplicaMeta:
    """The meta of a complete replica that ``store`` made."""
    return ReplicaMeta(volume_id, size, kind, complete=True, filesystem=store.filesystem)


def mounted_fs_type(store: ReplicaStore, volume_id: str) -> str:
    return mounts.mounts_at(store.mount_point(volume_id))[-1].fs_type


def fs_slack(store: ReplicaStore, volume_id: str) -> int:
    """What the open replica's filesystem could still grow into."""
    if store.filesystem_of(volume_id) is StoreFilesystem.EXT4:
        return ext4.slack(mounts.mounts_at(store.mount_point(volume_id))[-1].source)
    return btrfs.device_slack(store.mount_point(volume_id))


# -- helpers -------------------------------------------------------------------------------------


def vid(name: str) -> str:
    return volume_id_for(name)


def sid(name: str) -> str:
    return snapshot_id_for(name)


def tree_digest(root: Path) -> str:
    """One hash over every path, type and file content under ``root``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        h.update(f"D {rel}\n".encode())
        for name in sorted(filenames):
            path = Path(dirpath, name)
            h.update(f"F {rel}/{name} {path.stat().st_mode & 0o7777:o}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def fill(root: Path, seed: str) -> None:
    """A small tree with nested directories, an empty file, a sparse file and random data."""
    (root / "dir" / "sub").mkdir(parents=True, exist_ok=True)
    (root / "empty").touch()
    (root / "dir" / "seed").write_text(seed)
    (root / "dir" / "sub" / "random").write_bytes(os.urandom(3 * MiB + 17))
    with open(root / "sparse", "wb") as f:
        f.seek(20 * MiB)
        f.write(b"tail")
    os.chmod(root / "dir" / "seed", 0o640)
    os.sync()


def fill_until_full(path: Path) -> None:
    """Write twice the volume's size into one file; the filesystem must refuse before that."""
    chunk = b"\xa5" * MiB
    with open(path, "wb") as f:
        for _ in range(2 * SIZE // MiB):
            f.write(chunk)
            f.flush()
        os.fsync(f.fileno())


def fs_total(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def assert_restores(store: ReplicaStore, restored: str, source: Source, digest: str) -> None:
    """A new filesystem volume made from ``source`` holds exactly the tree ``digest`` names."""
    store.create(restored, SIZE, VolumeKind.FILESYSTEM, source)
    store.open(restored)
    try:
        assert tree_digest(store.live_path(restored)) == digest
    finally:
        store.close(restored)


async def parsed(messages: AsyncIterator[pb.PushMessage | bytes]
                 ) -> AsyncIterator[pb.PushMessage]:
    """A sender's Push stream as the receiving server sees it (frames come encoded)."""
    async for message in messages:
        yield pb.PushMessage.FromString(message) if isinstance(message, bytes) else message


def volume_dir(store: ReplicaStore, volume_id: str) -> Path:
    return store.root / "volumes" / volume_id


# -- create ------------------------------------------------------------------------------------


def test_create_filesystem_volume(store: ReplicaStore) -> None:
    v = vid("fs")
    meta = store.create(v, SIZE, VolumeKind.FILESYSTEM)
    assert meta == expected_meta(store, v, SIZE)
    assert store.meta(v) == meta
    assert store.filesystem_of(v) is store.filesystem
    assert not store.is_open(v)  # create leaves the replica closed
    assert store.devices(v) == []
    image = volume_dir(store, v) / "image"
    assert image.stat().st_size == SIZE
    assert image.stat().st_blocks * 512 < SIZE // 2  # sparse
    mount_point = store.open(v)
    try:
        assert mount_point == store.mount_point(v)
        assert store.live_path(v).is_dir()
        assert mounted_fs_type(store, v) == store.filesystem
        if on_ext4(store):
            assert store.live_path(v).stat().st_mode & 0o7777 == 0o755
        else:
            assert btrfs.is_subvolume(store.live_path(v))
        total = fs_total(store.live_path(v))
        assert SIZE * 0.9 <= total <= SIZE  # the size is enforced by the filesystem itself
        assert store.snapshots(v) == []
        assert list(store.live_path(v).iterdir()) == []
    finally:
        store.close(v)


def test_size_is_enforced(store: ReplicaStore) -> None:
    v = vid("full")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    try:
        with pytest.raises(OSError, match="No space left") as info:
            fill_until_full(store.live_path(v) / "big")
        assert info.value.errno == errno.ENOSPC
        (store.live_path(v) / "big").unlink()
    finally:
        store.close(v)


def test_create_is_idempotent(store: ReplicaStore) -> None:
    v = vid("idem")
    first = store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    (store.live_path(v) / "keep").write_text("data")
    store.close(v)
    again = store.create(v, SIZE, VolumeKind.FILESYSTEM)
    assert again == first
    # A retry with other properties returns the existing replica unchanged (callers compare).
    assert store.create(v, 2 * SIZE, VolumeKind.BLOCK) == first
    store.open(v)
    try:
        assert (store.live_path(v) / "keep").read_text() == "data"
    finally:
        store.close(v)


def test_concurrent_creates_of_one_volume_agree(store: ReplicaStore) -> None:
    v = vid("race")
    results: list[ReplicaMeta] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(store.create(v, SIZE, VolumeKind.FILESYSTEM))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 4
    assert len(set(results)) == 1
    assert results[0].complete


def test_create_block_volume(store: ReplicaStore) -> None:
    v = vid("blk")
    meta = store.create(v, SIZE, VolumeKind.BLOCK)
    assert meta.kind is VolumeKind.BLOCK
    assert meta.size_bytes == SIZE
    assert (volume_dir(store, v) / "image").stat().st_size == image_size(SIZE, VolumeKind.BLOCK)
    store.open(v)
    try:
        disk = store.block_file(v)
        assert disk == store.live_path(v) / BLOCK_FILE
        assert disk.stat().st_size == SIZE  # exact, not rounded
        device = loop.attach(disk)
        try:
            assert loop.size_of(device) == SIZE
            with open(device, "r+b") as dev:
                dev.write(b"block data")
                os.fsync(dev.fileno())
            assert loop.devices_for(disk) == [device]
        finally:
            loop.detach_all(disk)
        with open(disk, "rb") as f:
            assert f.read(10) == b"block data"
    finally:
        store.close(v)


@pytest.mark.parametrize("size", [0, MiB, MIN_VOLUME_BYTES - 1])
def test_create_too_small_refused(store: ReplicaStore, size: int) -> None:
    with pytest.raises(InvalidArgument, match="at least"):
        store.create(vid("small"), size, VolumeKind.FILESYSTEM)
    assert store.meta(vid("small")) is None


@pytest.mark.parametrize("bad", ["", "..", "../etc", "vol-", "x/y", "vol-" + "0" * 24 + "\n",
                                 sid("looks-like-a-snapshot")])
def test_foreign_ids_refused(store: ReplicaStore, bad: str) -> None:
    for call in (lambda: store.create(bad, SIZE, VolumeKind.FILESYSTEM),
                 lambda: store.open(bad), lambda: store.close(bad), lambda: store.delete(bad),
                 lambda: store.expand(bad, 2 * SIZE), lambda: store.snapshot(bad, sid("s"))):
        with pytest.raises(InvalidArgument):
            call()
    assert list((store.root / "volumes").iterdir()) == []


# -- open / close ------------------------------------------------------------------------------


def test_open_close_idempotent(store: ReplicaStore) -> None:
    v = vid("oc")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    first = store.open(v)
    assert store.open(v) == first
    assert store.is_open(v)
    assert len(mounts.mounts_at(first)) == 1  # a second open does not stack a second mount
    assert len(store.devices(v)) == 1
    store.close(v)
    assert not store.is_open(v)
    assert store.devices(v) == []
    store.close(v)
    assert not store.is_open(v)


def test_open_unknown_volume_not_found(store: ReplicaStore) -> None:
    with pytest.raises(NotFound):
        store.open(vid("nothing"))
    store.close(vid("nothing"))  # closing what does not exist is a no-op
    store.delete(vid("nothing"))  # and so is deleting it


def test_data_survives_close_and_reopen(store: ReplicaStore) -> None:
    v = vid("persist")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    fill(store.live_path(v), "persist")
    digest = tree_digest(store.live_path(v))
    store.close(v)
    store.open(v)
    try:
        assert tree_digest(store.live_path(v)) == digest
    finally:
        store.close(v)


def test_snapshot_operations_leave_an_open_replica_open(store: ReplicaStore) -> None:
    v = vid("stay-open")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    try:
        store.snapshot(v, sid("s"))
        assert store.has_snapshot(v, sid("s"))
        assert store.is_open(v)
        store.delete_snapshot(v, sid("s"))
        assert store.is_open(v)
    finally:
        store.close(v)


def test_snapshot_operations_leave_a_closed_replica_closed(store: ReplicaStore) -> None:
    v = vid("stay-closed")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    assert store.snapshot(v, sid("s")) == SIZE
    assert not store.is_open(v)
    assert store.has_snapshot(v, sid("s"))
    assert not store.is_open(v)
    store.delete_snapshot(v, sid("s"))
    assert not store.is_open(v)
    assert not store.has_snapshot(v, sid("s"))


# -- snapshots, restore, clone -------------------------------------------------------------------


def test_snapshot_and_restore_into_new_volume(store: ReplicaStore) -> None:
    src, dst, snap = vid("src"), vid("restored"), sid("snap")
    store.create(src, SIZE, VolumeKind.FILESYSTEM)
    store.open(src)
    try:
        fill(store.live_path(src), "at snapshot time")
        at_snapshot = tree_digest(store.live_path(src))
        assert store.snapshot(src, snap) == SIZE
        assert store.snapshot(src, snap) == SIZE  # idempotent
        assert store.snapshots(src) == [snap]
        if not on_ext4(store):
            assert btrfs.is_read_only(store.mount_point(src) / "snapshots" / snap)
        # Changes after the snapshot must not show up in the restore.
        (store.live_path(src) / "dir" / "seed").write_text("changed later")
        (store.live_path(src) / "later").write_text("x")
    finally:
        store.close(src)
    meta = store.create(dst, SIZE, VolumeKind.FILESYSTEM, Source(src, snap))
    assert meta == expected_meta(store, dst, SIZE)
    store.open(dst)
    try:
        assert tree_digest(store.live_path(dst)) == at_snapshot
        if not on_ext4(store):
            assert btrfs.is_subvolume(store.live_path(dst))
            assert not btrfs.is_read_only(store.live_path(dst))
        assert store.snapshots(dst) == []  # the source's snapshots are not copied along
        top = ["live", "snapshots", *(["lost+found"] if on_ext4(store) else [])]
        assert sorted(p.name for p in store.mount_point(dst).iterdir()) == sorted(top)
        (store.live_path(dst) / "writable").write_text("yes")
    finally:
        store.close(dst)
    # The restore is independent of its source.
    store.delete_snapshot(src, snap)
    store.delete(src)
    store.open(dst)
    try:
        assert (store.live_path(dst) / "writable").read_text() == "yes"
    finally:
        store.close(dst)


def test_clone_from_live_volume(store: ReplicaStore) -> None:
    src, clone, bigger = vid("live-src"), vid("clone"), vid("bigger-clone")
    store.create(src, SIZE, VolumeKind.FILESYSTEM)
    store.open(src)  # cloning an open (in-use) volume works
    try:
        fill(store.live_path(src), "clone me")
        digest = tree_digest(store.live_path(src))
        store.create(clone, SIZE, VolumeKind.FILESYSTEM, Source(src))
        store.create(bigger, 2 * SIZE, VolumeKind.FILESYSTEM, Source(src))
        assert store.is_open(src)
        assert store.snapshots(src) == []  # the temporary snapshot is gone
        assert not any(p.name.startswith(".clone")
                       for p in (store.mount_point(src) / "snapshots").iterdir())
    finally:
        store.close(src)
    for volume, size in ((clone, SIZE), (bigger, 2 * SIZE)):
        store.open(volume)
        try:
            assert tree_digest(store.live_path(volume)) == digest
            assert size * 0.9 <= fs_total(store.live_path(volume)) <= size
            (store.live_path(volume) / "dir" / "seed").write_text("diverged")
        finally:
            store.close(volume)
    store.open(src)
    try:
        assert tree_digest(store.live_path(src)) == digest  # clones share nothing with it
    finally:
        store.close(src)


def test_clone_block_volume(store: ReplicaStore) -> None:
    src, clone = vid("blk-src"), vid("blk-clone")
    store.create(src, SIZE, VolumeKind.BLOCK)
    store.open(src)
    try:
        with open(store.block_file(src), "r+b") as f:
            f.seek(SIZE - 4096)
            f.write(b"end of disk")
    finally:
        store.close(src)
    store.create(clone, 2 * SIZE, VolumeKind.BLOCK, Source(src))
    store.open(clone)
    try:
        disk = store.block_file(clone)
        assert disk.stat().st_size == 2 * SIZE  # grown to the requested size
        with open(disk, "rb") as f:
            f.seek(SIZE - 4096)
            assert f.read(11) == b"end of disk"
    finally:
        store.close(clone)


def test_restore_after_source_volume_deleted(store: ReplicaStore) -> None:
    src, snap1, snap2 = vid("doomed"), sid("keep-1"), sid("keep-2")
    store.create(src, SIZE, VolumeKind.FILESYSTEM)
    store.open(src)
    fill(store.live_path(src), "survivor")
    digest = tree_digest(store.live_path(src))
    store.close(src)
    store.snapshot(src, snap1)
    store.snapshot(src, snap2)
    store.delete(src)
    meta = store.meta(src)
    assert meta is not None
    assert meta.deleted
    assert (volume_dir(store, src) / "image").exists()
    assert not store.is_open(src)
    with pytest.raises(NotFound):
        store.open(src)
    with pytest.raises(NotFound):
        store.expand(src, 2 * SIZE)
    with pytest.raises(NotFound):
        store.snapshot(src, sid("new"))
    with pytest.raises(NotFound):  # a clone needs a live volume
        store.create(vid("from-deleted-live"), SIZE, VolumeKind.FILESYSTEM, Source(src))
    with pytest.raises(FailedPrecondition, match="snapshots"):  # would destroy the snapshots
        store.create(src, SIZE, VolumeKind.FILESYSTEM)
    assert store.health(src).abnormal
    store.delete(src)  # idempotent
    assert store.has_snapshot(src, snap1)

    restored = vid("restored-after-delete")
    assert_restores(store, restored, Source(src, snap1), digest)

    store.delete_snapshot(src, snap1)
    assert volume_dir(store, src).exists()  # one snapshot left
    store.delete_snapshot(src, snap1)  # idempotent
    store.delete_snapshot(src, snap2)
    assert not volume_dir(store, src).exists()  # the last snapshot freed the image
    assert store.meta(src) is None
    assert not store.has_snapshot(src, snap2)
    store.delete_snapshot(src, snap2)  # still a no-op
    # And now the name is free again.
    store.create(src, SIZE, VolumeKind.FILESYSTEM)
    assert store.meta(src) == expected_meta(store, src, SIZE)


def test_delete_of_open_volume_with_snapshots_closes_it(store: ReplicaStore) -> None:
    v, snap = vid("open-then-deleted"), sid("kept")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    store.snapshot(v, snap)
    store.delete(v)
    assert not store.is_open(v)
    assert store.has_snapshot(v, snap)
    store.delete_snapshot(v, snap)
    assert store.meta(v) is None


def test_create_from_missing_snapshot_not_found(store: ReplicaStore) -> None:
    src, dst = vid("has-no-such-snap"), vid("never")
    store.create(src, SIZE, VolumeKind.FILESYSTEM)
    with pytest.raises(NotFound, match="snapshot"):
        store.create(dst, SIZE, VolumeKind.FILESYSTEM, Source(src, sid("missing")))
    assert store.meta(dst) is None
    assert not volume_dir(store, dst).exists()  # nothing half-built left behind
    assert not store.is_open(src)
    with pytest.raises(NotFound):
        store.create(dst, SIZE, VolumeKind.FILESYSTEM, Source(vid("no-such-volume"), sid("s")))
    with pytest.raises(NotFound):
        store.create(dst, SIZE, VolumeKind.FILESYSTEM, Source(vid("no-such-volume")))
    with pytest.raises(InvalidArgument):
        store.create(dst, SIZE, VolumeKind.FILESYSTEM, Source(src, "../../etc"))
    with pytest.raises(InvalidArgument):
        store.create(dst, SIZE, VolumeKind.FILESYSTEM, Source("../x", sid("s")))
    assert not volume_dir(store, dst).exists()


def test_clone_into_smaller_size_out_of_range(store: ReplicaStore) -> None:
    src, dst = vid("big-src"), vid("small-dst")
    store.create(src, 2 * SIZE, VolumeKind.FILESYSTEM)
    with pytest.raises(OutOfRange, match="more than"):
        store.create(dst, SIZE, VolumeKind.FILESYSTEM, Source(src))
    assert store.meta(dst) is None
    assert not volume_dir(store, dst).exists()


def test_restore_needs_only_room_for_the_snapshot(store: ReplicaStore) -> None:
    """The volume grew after the snapshot: the snapshot still restores at its own size
    (the CSI controller holds the snapshot's size and refuses anything smaller)."""
    src, dst = vid("grown-src"), vid("restored-dst")
    store.create(src, SIZE, VolumeKind.FILESYSTEM)
    live = store.open(src) / LIVE
    (live / "payload").write_bytes(b"before growth")
    store.snapshot(src, sid("s"))
    store.close(src)
    store.expand(src, 2 * SIZE)
    store.create(dst, SIZE, VolumeKind.FILESYSTEM, Source(src, sid("s")))
    assert (store.open(dst) / LIVE / "payload").read_bytes() == b"before growth"
    store.close(dst)


def test_kind_mismatch_invalid(store: ReplicaStore) -> None:
    fs, blk = vid("fs-kind"), vid("blk-kind")
    store.create(fs, SIZE, VolumeKind.FILESYSTEM)
    store.create(blk, SIZE, VolumeKind.BLOCK)
    store.snapshot(fs, sid("fs-snap"))
    with pytest.raises(InvalidArgument, match="block"):
        store.create(vid("x1"), SIZE, VolumeKind.BLOCK, Source(fs))
    with pytest.raises(InvalidArgument, match="block"):
        store.create(vid("x2"), SIZE, VolumeKind.BLOCK, Source(fs, sid("fs-snap")))
    with pytest.raises(InvalidArgument, match="filesystem"):
        store.create(vid("x3"), SIZE, VolumeKind.FILESYSTEM, Source(blk))
    for name in ("x1", "x2", "x3"):
        assert not volume_dir(store, vid(name)).exists()


def test_snapshot_of_unknown_volume(store: ReplicaStore) -> None:
    with pytest.raises(NotFound):
        store.snapshot(vid("ghost"), sid("s"))
    assert not store.has_snapshot(vid("ghost"), sid("s"))
    store.delete_snapshot(vid("ghost"), sid("s"))


def test_snapshot_id_is_checked(store: ReplicaStore) -> None:
    v = vid("snap-ids")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    for bad in ("..", "../../x", "live", vid("not-a-snapshot"), ".clone-" + v + "/.."):
        with pytest.raises(InvalidArgument):
            store.snapshot(v, bad)
    assert not store.is_open(v)


# -- expand --------------------------------------------------------------------------------------


def test_expand_offline_filesystem(store: ReplicaStore) -> None:
    v = vid("grow-offline")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    before = fs_total(store.live_path(v))
    (store.live_path(v) / "keep").write_text("kept")
    store.close(v)
    grown = store.expand(v, 2 * SIZE)
    assert grown == expected_meta(store, v, 2 * SIZE)
    assert store.meta(v) == grown
    assert not store.is_open(v)
    assert (volume_dir(store, v) / "image").stat().st_size == 2 * SIZE
    store.open(v)  # the filesystem catches up with its image on open
    try:
        after = fs_total(store.live_path(v))
        assert after > before
        assert 2 * SIZE * 0.9 <= after <= 2 * SIZE
        assert (store.live_path(v) / "keep").read_text() == "kept"
        assert fs_slack(store, v) == 0
    finally:
        store.close(v)


def test_expand_online_filesystem(store: ReplicaStore) -> None:
    needs_online_resize(store)
    v = vid("grow-online")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    try:
        before = fs_total(store.live_path(v))
        grown = store.expand(v, 3 * SIZE)
        assert grown.size_bytes == 3 * SIZE
        after = fs_total(store.live_path(v))
        assert after > before
        assert 3 * SIZE * 0.9 <= after <= 3 * SIZE
        assert store.grow_online(v) == grown  # NodeExpandVolume after the fact: a no-op
        assert fs_total(store.live_path(v)) == after
    finally:
        store.close(v)


def test_expand_never_shrinks(store: ReplicaStore) -> None:
    v = vid("no-shrink")
    first = store.create(v, 2 * SIZE, VolumeKind.FILESYSTEM)
    assert store.expand(v, SIZE) == first
    assert store.expand(v, 2 * SIZE) == first
    assert (volume_dir(store, v) / "image").stat().st_size == 2 * SIZE


def test_expand_block_offline(store: ReplicaStore) -> None:
    v = vid("blk-grow-offline")
    store.create(v, SIZE, VolumeKind.BLOCK)
    store.expand(v, 2 * SIZE)
    assert (volume_dir(store, v) / "image").stat().st_size == image_size(2 * SIZE,
                                                                          VolumeKind.BLOCK)
    store.open(v)
    try:
        assert store.block_file(v).stat().st_size == 2 * SIZE
    finally:
        store.close(v)


def test_expand_block_online_while_attached(store: ReplicaStore) -> None:
    needs_online_resize(store)
    v = vid("blk-grow-online")
    store.create(v, SIZE, VolumeKind.BLOCK)
    store.open(v)
    disk = store.block_file(v)
    device = loop.attach(disk)  # what NodePublish does for a block volume
    try:
        assert loop.size_of(device) == SIZE
        store.expand(v, 2 * SIZE)
        assert disk.stat().st_size == 2 * SIZE
        assert loop.size_of(device) == 2 * SIZE  # the consumer's device sees the growth
        with pytest.raises(FailedPrecondition, match="block device"):
            store.close(v)
        with pytest.raises(FailedPrecondition, match="block device"):
            store.delete(v)
    finally:
        loop.detach_all(disk)
    store.close(v)


# -- delete --------------------------------------------------------------------------------------


def test_delete_refuses_while_bind_mounted(store: ReplicaStore, tmp_path: Path) -> None:
    v = vid("in-use")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    pod = tmp_path / "pod" / "volume"
    pod.mkdir(parents=True)
    mounts.bind(store.live_path(v), pod)
    try:
        (pod / "from-pod").write_text("x")
        with pytest.raises(FailedPrecondition, match=str(pod)):
            store.delete(v)
        with pytest.raises(FailedPrecondition, match=str(pod)):
            store.close(v)
        assert store.foreign_mounts(v) == [str(pod)]
        assert store.meta(v) is not None
        assert store.is_open(v)
    finally:
        mounts.unmount(pod)
    assert store.foreign_mounts(v) == []
    store.delete(v)
    assert store.meta(v) is None
    assert not volume_dir(store, v).exists()
    assert not store.mount_point(v).exists()
    store.delete(v)  # idempotent


def test_delete_frees_everything(store: ReplicaStore) -> None:
    v = vid("gone")
    store.create(v, SIZE, VolumeKind.BLOCK)
    store.open(v)
    store.close(v)
    store.delete(v)
    assert not volume_dir(store, v).exists()
    assert list((store.root / "volumes").iterdir()) == []
    assert list((store.root / "mnt").iterdir()) == []


# -- health --------------------------------------------------------------------------------------


def test_health_normal(store: ReplicaStore) -> None:
    v = vid("healthy")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    assert not store.health(v).abnormal  # closed
    store.open(v)
    try:
        health = store.health(v)
        assert not health.abnormal
        assert health.message == "replica is healthy"
    finally:
        store.close(v)
    assert store.health(vid("unknown")).abnormal


def test_health_abnormal_when_read_only(store: ReplicaStore) -> None:
    v = vid("went-ro")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    mount_point = store.open(v)
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        health = store.health(v)
        assert health.abnormal
        assert "read-only" in health.message
        subprocess.run(["mount", "-o", "remount,rw", str(mount_point)], check=True)
        assert not store.health(v).abnormal
    finally:
        store.close(v)


def _find_all(haystack: mmap.mmap, needle: bytes) -> list[int]:
    found, start = [], 0
    while (at := haystack.find(needle, start)) != -1:
        found.append(at)
        start = at + 1
    return found


def test_health_abnormal_after_real_corruption(store: ReplicaStore) -> None:
    only_btrfs(store, "needs btrfs data checksums to detect damaged file data (ext4 has none; "
                      "see test_health_abnormal_after_ext4_error)")
    v = vid("corrupt")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    mount_point = store.open(v)
    pattern = os.urandom(64 * 1024)
    victim = store.live_path(v) / "victim"
    with open(victim, "wb") as out:
        out.write(pattern)
        os.fsync(out.fileno())
    btrfs.sync(mount_point)
    store.close(v)

    # Find every on-disk copy of every 4 KiB block of the file and damage it.
    image = volume_dir(store, v) / "image"
    damaged = 0
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as mem:
        for block in range(0, len(pattern), 4096):
            for at in _find_all(mem, pattern[block:block + 4096]):
                mem[at + 100:at + 108] = bytes(b ^ 0xFF for b in mem[at + 100:at + 108])
                damaged += 1
        mem.flush()
    assert damaged >= len(pattern) // 4096, "the file's data was not found in the image"
    os.sync()

    store.open(v)
    try:
        assert not store.health(v).abnormal  # nothing has read the damage yet
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        with pytest.raises(OSError, match="Input/output error") as info:
            victim.read_bytes()
        assert info.value.errno == errno.EIO
        assert btrfs.has_device_errors(mount_point)
        health = store.health(v)
        assert health.abnormal
        assert "checksum" in health.message
    finally:
        store.close(v)
    # The error counters are persistent: the replica stays abnormal across a reopen.
    store.open(v)
    try:
        assert store.health(v).abnormal
    finally:
        store.close(v)


# -- ext4 ----------------------------------------------------------------------------------------


@pytest.fixture(params=[pytest.param(StoreFilesystem.EXT4, marks=NEEDS_EXT4, id="ext4")])
def ext4_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplicaStore]:
    """An empty store making ext4 replicas, checked for leaks."""
    s = ReplicaStore(tmp_path / "store", request.param)
    s.ensure_layout()
    with leak_checked(tmp_path):
        yield s


def mount_line(mount_point: Path) -> list[str]:
    """The /proc/self/mounts fields of what is mounted at ``mount_point`` (read directly)."""
    lines = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    found = [fields for fields in lines if fields[1] == str(mount_point)]
    assert len(found) == 1, found
    return found[0]


def test_ext4_store_makes_ext4_replicas(ext4_store: ReplicaStore) -> None:
    store = ext4_store
    fs, blk = vid("ext4-fs"), vid("ext4-blk")
    assert store.create(fs, SIZE, VolumeKind.FILESYSTEM).filesystem is StoreFilesystem.EXT4
    assert store.create(blk, SIZE, VolumeKind.BLOCK).filesystem is StoreFilesystem.EXT4
    for volume in (fs, blk):
        assert store.filesystem_of(volume) is StoreFilesystem.EXT4
        raw = json.loads((volume_dir(store, volume) / "meta.json").read_bytes())
        assert raw["filesystem"] == "ext4"
    mount_point = store.open(fs)
    try:
        _, point, fs_type, options, *_ = mount_line(mount_point)
        assert (point, fs_type) == (str(mount_point), "ext4")
        assert "noatime" in options.split(",")
        assert sorted(p.name for p in mount_point.iterdir()) == ["live", "lost+found",
                                                                  "snapshots"]
        assert store.live_path(fs).stat().st_mode & 0o7777 == 0o755
        device = mounts.mounts_at(mount_point)[-1].source
        superblock = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True,
                                    check=True).stdout
        assert "Reserved block count:     0\n" in superblock  # mkfs -m 0: none kept for root
        assert fs_slack(store, fs) == 0
    finally:
        store.close(fs)
    assert not store.health(fs).abnormal
    with pytest.raises(NotFound):
        store.filesystem_of(vid("no-such-volume"))


def test_ext4_snapshot_is_a_frozen_full_copy(ext4_store: ReplicaStore) -> None:
    store = ext4_store
    v, snap, restored = vid("ext4-snap"), sid("ext4-snap"), vid("ext4-restored")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    try:
        live = store.live_path(v)
        fill(live, "as it was")
        os.link(live / "dir" / "seed", live / "seed-link")  # hard links stay hard links
        os.symlink("dir/seed", live / "seed-symlink")
        at_snapshot = tree_digest(live)
        free_before = os.statvfs(live).f_bfree * os.statvfs(live).f_frsize
        assert store.snapshot(v, snap) == SIZE
        free_after = os.statvfs(live).f_bfree * os.statvfs(live).f_frsize
        assert free_before - free_after >= 3 * MiB  # a full copy: no blocks are shared
        copy = store.mount_point(v) / "snapshots" / snap
        assert tree_digest(copy) == at_snapshot
        assert (copy / "seed-link").stat().st_ino == (copy / "dir" / "seed").stat().st_ino
        assert (copy / "seed-link").stat().st_ino != (live / "seed-link").stat().st_ino
        assert os.readlink(copy / "seed-symlink") == "dir/seed"
        assert (copy / "sparse").stat().st_blocks * 512 < MiB  # holes stay holes
        # Every kind of later change to live leaves the snapshot as it was.
        with open(live / "dir" / "sub" / "random", "r+b") as f:
            f.write(b"overwritten in place")
        (live / "dir" / "seed").write_text("changed later")
        (live / "empty").unlink()
        (live / "later").write_text("x")
        assert tree_digest(copy) == at_snapshot
        assert store.snapshot(v, snap) == SIZE  # idempotent: not copied again
        assert tree_digest(copy) == at_snapshot
        assert store.snapshots(v) == [snap]
    finally:
        store.close(v)
    assert_restores(store, restored, Source(v, snap), at_snapshot)


def test_ext4_interrupted_snapshot_copy_is_not_listed_and_is_removed(
        ext4_store: ReplicaStore) -> None:
    store = ext4_store
    v, snap, other = vid("ext4-partial"), sid("interrupted"), sid("other")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    folder = store.open(v) / "snapshots"
    try:
        (store.live_path(v) / "data").write_text("complete")

        def interrupted_copy() -> Path:  # what a copy killed half-way leaves behind
            partial = folder / f"{PARTIAL_PREFIX}{snap}"
            (partial / "dir").mkdir(parents=True)
            (partial / "dir" / "half").write_bytes(b"half a file")
            return partial

        partial = interrupted_copy()
        assert store.snapshots(v) == []
        assert not store.has_snapshot(v, snap)
        # The next open removes it...
        store.close(v)
        store.open(v)
        assert not partial.exists()
        # ... and so does the next snapshot, of any id.
        partial = interrupted_copy()
        store.snapshot(v, other)
        assert not partial.exists()
        assert store.snapshots(v) == [other]
        # A snapshot of the interrupted id is taken from scratch.
        interrupted_copy()
        store.snapshot(v, snap)
        assert store.snapshots(v) == sorted([snap, other])
        assert sorted(p.name for p in (folder / snap).iterdir()) == ["data"]
        assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
        store.delete_snapshot(v, snap)
        store.delete_snapshot(v, snap)  # idempotent
        assert store.snapshots(v) == [other]
        assert sorted(p.name for p in folder.iterdir()) == [other]
    finally:
        store.close(v)


def test_ext4_snapshot_that_does_not_fit_leaves_nothing_behind(ext4_store: ReplicaStore) -> None:
    store = ext4_store
    v = vid("ext4-no-room")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    try:
        live = store.live_path(v)
        with open(live / "most-of-it", "wb") as f:  # not zeros: those would copy as holes
            for _ in range(SIZE * 6 // 10 // MiB):
                f.write(b"\x5a" * MiB)
            os.fsync(f.fileno())
        free = os.statvfs(live).f_bfree
        with pytest.raises(ResourceExhausted, match="no room"):
            store.snapshot(v, sid("too-big"))
        assert store.snapshots(v) == []
        assert list((store.mount_point(v) / "snapshots").iterdir()) == []
        assert os.statvfs(live).f_bfree >= free - 16  # the partial copy's space came back
    finally:
        store.close(v)


def test_health_abnormal_after_ext4_error(ext4_store: ReplicaStore) -> None:
    """ext4 counts the errors it meets in its superblock and stops writing (mkfs -e
    remount-ro): the replica reports abnormal, also after a close and reopen."""
    store = ext4_store
    v = vid("ext4-error")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    mount_point = store.open(v)
    try:
        device = Path(mounts.mounts_at(mount_point)[-1].source).name
        trigger = Path("/sys/fs/ext4") / device / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip("the kernel has no /sys/fs/ext4/<device>/trigger_fs_error")
        assert ext4.error_count(mount_point) == 0
        trigger.write_text("sharedsync test: simulated metadata error\n")
        assert ext4.error_count(mount_point) == 1
        health = store.health(v)
        assert health.abnormal
        assert "ext4" in health.message or "read-only" in health.message
        with pytest.raises(OSError, match="Read-only file system") as info:
            (store.live_path(v) / "after-error").write_text("x")
        assert info.value.errno == errno.EROFS
    finally:
        store.close(v)
    store.open(v)  # the error count lives in the superblock
    try:
        health = store.health(v)
        assert health.abnormal
        assert "ext4 recorded 1 filesystem error" in health.message
    finally:
        store.close(v)


def test_ext4_grows_offline_only_by_what_resize2fs_adds(ext4_store: ReplicaStore) -> None:
    """A growth too small for a new block group adds nothing (resize2fs leaves it out), and
    must not count as pending for ever (a check and a resize at every open); a real one is
    done offline, at the next open, to the block."""
    store = ext4_store
    v = vid("ext4-grow")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    before = fs_total(store.live_path(v))
    store.close(v)
    store.expand(v, SIZE + MiB)
    device = loop.attach(volume_dir(store, v) / "image")
    try:
        assert ext4.device_bytes(device) == SIZE + MiB
        assert ext4.slack(device) == 0
        assert ext4.geometry(device).block_count * 4096 == SIZE
    finally:
        loop.detach_all(volume_dir(store, v) / "image")
    store.open(v)
    try:
        assert fs_total(store.live_path(v)) == before
    finally:
        store.close(v)
    store.expand(v, 2 * SIZE)
    device = loop.attach(volume_dir(store, v) / "image")
    try:
        assert ext4.slack(device) == 2 * SIZE - SIZE
    finally:
        loop.detach_all(volume_dir(store, v) / "image")
    store.open(v)
    try:
        assert fs_slack(store, v) == 0
        device = mounts.mounts_at(store.mount_point(v))[-1].source
        assert ext4.geometry(device).block_count * 4096 == 2 * SIZE
        assert fs_total(store.live_path(v)) > before
    finally:
        store.close(v)


# -- btrfs and ext4 replicas in one store ----------------------------------------------------------


ACROSS = [pytest.param(StoreFilesystem.BTRFS, StoreFilesystem.EXT4, id="btrfs-to-ext4"),
          pytest.param(StoreFilesystem.EXT4, StoreFilesystem.BTRFS, id="ext4-to-btrfs")]


@pytest.mark.parametrize(("src_fs", "dst_fs"), ACROSS)
@pytest.mark.parametrize("restore", [False, True], ids=["clone", "restore"])
def test_copy_across_filesystems(mixed: dict[StoreFilesystem, ReplicaStore],
                                 src_fs: StoreFilesystem, dst_fs: StoreFilesystem,
                                 restore: bool) -> None:
    src, dst, snap = vid("across-src"), vid("across-dst"), sid("across")
    store = mixed[src_fs]
    store.create(src, SIZE, VolumeKind.FILESYSTEM)
    store.open(src)
    try:
        live = store.live_path(src)
        fill(live, "across filesystems")
        os.chmod(live, 0o750)
        os.chown(live / "dir" / "seed", 1234, 5678)
        digest = tree_digest(live)
        store.snapshot(src, snap)
        if restore:
            (live / "dir" / "seed").write_text("after the snapshot")
        source = Source(src, snap) if restore else Source(src)
        meta = mixed[dst_fs].create(dst, 2 * SIZE, VolumeKind.FILESYSTEM, source)
        assert store.is_open(src)
        assert store.snapshots(src) == [snap]
        assert [p.name for p in (store.mount_point(src) / "snapshots").iterdir()] == [snap]
    finally:
        store.close(src)
    assert meta.filesystem is dst_fs
    store.open(dst)  # a store opens every replica as what it is, whatever its own default
    try:
        assert mounted_fs_type(store, dst) == dst_fs
        live = store.live_path(dst)
        assert tree_digest(live) == digest
        assert live.stat().st_mode & 0o7777 == 0o750
        assert (live / "dir" / "seed").stat().st_uid == 1234
        assert (live / "dir" / "seed").stat().st_gid == 5678
        assert (live / "sparse").stat().st_blocks * 512 < MiB
        if dst_fs is StoreFilesystem.BTRFS:
            assert btrfs.is_subvolume(live)
            assert not btrfs.is_read_only(live)
        assert 2 * SIZE * 0.9 <= fs_total(live) <= 2 * SIZE
        (live / "writable").write_text("yes")
    finally:
        store.close(dst)


@pytest.mark.parametrize(("src_fs", "dst_fs"), ACROSS)
def test_block_clone_across_filesystems(mixed: dict[StoreFilesystem, ReplicaStore],
                                        src_fs: StoreFilesystem,
                                        dst_fs: StoreFilesystem) -> None:
    src, dst = vid("blk-across-src"), vid("blk-across-dst")
    mixed[src_fs].create(src, SIZE, VolumeKind.BLOCK)
    mixed[src_fs].open(src)
    try:
        with open(mixed[src_fs].block_file(src), "r+b") as f:
            f.seek(SIZE - 4096)
            f.write(b"end of disk")
    finally:
        mixed[src_fs].close(src)
    mixed[dst_fs].create(dst, 2 * SIZE, VolumeKind.BLOCK, Source(src))
    mixed[dst_fs].open(dst)
    try:
        disk = mixed[dst_fs].block_file(dst)
        assert disk.stat().st_size == 2 * SIZE
        assert disk.stat().st_blocks * 512 < MiB  # still sparse
        with open(disk, "rb") as f:
            f.seek(SIZE - 4096)
            assert f.read(11) == b"end of disk"
    finally:
        mixed[dst_fs].close(dst)


@pytest.mark.parametrize(("made_as", "default"), ACROSS)
def test_replica_keeps_its_filesystem_when_the_default_changes(
        mixed: dict[StoreFilesystem, ReplicaStore], made_as: StoreFilesystem,
        default: StoreFilesystem) -> None:
    store = ReplicaStore(mixed[made_as].root, made_as)
    old, new, snap = vid("made-before"), vid("made-after"), sid("of-old")
    store.create(old, SIZE, VolumeKind.FILESYSTEM)
    store.filesystem = default  # e.g. the node's kernel lost btrfs, or got it
    assert store.create(new, SIZE, VolumeKind.FILESYSTEM).filesystem is default
    assert store.filesystem_of(old) is made_as
    store.open(old)
    try:
        assert mounted_fs_type(store, old) == made_as
        (store.live_path(old) / "kept").write_text("kept")
        store.snapshot(old, snap)
        if made_as is StoreFilesystem.BTRFS:
            assert btrfs.is_read_only(store.mount_point(old) / "snapshots" / snap)
        assert not store.health(old).abnormal
    finally:
        store.close(old)
    store.expand(old, 2 * SIZE)
    store.open(old)
    try:
        assert fs_slack(store, old) == 0
        assert 2 * SIZE * 0.9 <= fs_total(store.live_path(old)) <= 2 * SIZE
        assert (store.live_path(old) / "kept").read_text() == "kept"
    finally:
        store.close(old)
    store.delete(old)  # keeps the image for the snapshot
    assert store.has_snapshot(old, snap)
    store.delete_snapshot(old, snap)
    assert store.meta(old) is None
    store.open(new)
    try:
        assert mounted_fs_type(store, new) == default
    finally:
        store.close(new)


def test_replica_from_before_ext4_opens_as_btrfs(
        mixed: dict[StoreFilesystem, ReplicaStore]) -> None:
    """A replica whose meta.json predates the filesystem key is btrfs, even to an ext4 store."""
    v = vid("from-before")
    mixed[StoreFilesystem.BTRFS].create(v, SIZE, VolumeKind.FILESYSTEM)
    meta_file = volume_dir(mixed[StoreFilesystem.BTRFS], v) / "meta.json"
    raw = json.loads(meta_file.read_bytes())
    del raw["filesystem"]
    meta_file.write_text(json.dumps(raw))
    store = mixed[StoreFilesystem.EXT4]
    assert store.filesystem_of(v) is StoreFilesystem.BTRFS
    store.open(v)
    try:
        assert mounted_fs_type(store, v) == "btrfs"
        assert btrfs.is_subvolume(store.live_path(v))
    finally:
        store.close(v)


def test_meta_without_filesystem_reads_as_btrfs() -> None:
    old = {"volume_id": vid("old"), "size_bytes": SIZE, "kind": "filesystem",
           "complete": True, "deleted": False}
    meta = ReplicaMeta.from_json(json.dumps(old).encode())
    assert meta.filesystem is StoreFilesystem.BTRFS
    assert meta == ReplicaMeta(vid("old"), SIZE, VolumeKind.FILESYSTEM, complete=True)
    new = ReplicaMeta(vid("new"), SIZE, VolumeKind.BLOCK, complete=True,
                      filesystem=StoreFilesystem.EXT4)
    assert json.loads(new.to_json())["filesystem"] == "ext4"
    assert ReplicaMeta.from_json(new.to_json()) == new


# -- crash recovery: SIGKILL at named points, then the same operation in this process ------------


_CRASHER = """
import sys
from sharedsync.storage.replicas import ReplicaStore, Source, StoreFilesystem, VolumeKind
root, filesystem, op, volume = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
size = int(sys.argv[5])
source = Source(sys.argv[6]) if len(sys.argv) > 6 else None
store = ReplicaStore(root, StoreFilesystem(filesystem))
if op == "create":
    store.create(volume, size, VolumeKind.FILESYSTEM, source)
elif op == "open":
    store.open(volume)
elif op == "close":
    store.close(volume)
elif op == "delete":
    store.delete(volume)
elif op == "expand":
    store.expand(volume, size)
else:
    raise SystemExit(f"unknown op {op}")
"""


def crash(store: ReplicaStore, failpoint: str, op: str, volume: str, size: int = SIZE,
          source: str | None = None) -> None:
    """Run ``op`` in a child process that SIGKILLs itself at ``failpoint``."""
    env = {**os.environ, "SHAREDSYNC_FAILPOINTS": f"unrelated.point,{failpoint}"}
    argv = [sys.executable, "-c", _CRASHER, str(store.root), store.filesystem, op, volume,
            str(size)]
    if source is not None:
        argv.append(source)
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == -signal.SIGKILL, (
        f"expected death at {failpoint}, got {done.returncode}: {done.stderr}")


@pytest.mark.parametrize("failpoint", [
    "replica.create.after_image",
    "replica.open.after_attach",  # inside create: the new image is attached, not mounted
    "replica.create.before_commit",  # mounted, fully populated, not marked complete
    "replica.close.after_unmount",  # unmounted, still attached, not marked complete
])
def test_create_recovers_from_crash(store: ReplicaStore, tmp_path: Path, failpoint: str) -> None:
    v = vid(f"crash-create-{failpoint}")
    crash(store, failpoint, "create", v)
    assert store.meta(v) is None  # an interrupted create is never mistaken for a replica
    meta = store.create(v, SIZE, VolumeKind.FILESYSTEM)
    assert meta.complete
    assert not store.is_open(v)
    assert leftovers_under(tmp_path) == []
    store.open(v)
    try:
        assert list(store.live_path(v).iterdir()) == []
        assert SIZE * 0.9 <= fs_total(store.live_path(v)) <= SIZE
    finally:
        store.close(v)


@pytest.mark.parametrize("failpoint", ["replica.create.after_image",
                                       "replica.create.before_commit"])
def test_delete_after_crashed_create(store: ReplicaStore, tmp_path: Path, failpoint: str) -> None:
    v = vid(f"crash-then-delete-{failpoint}")
    crash(store, failpoint, "create", v)
    store.delete(v)
    assert not volume_dir(store, v).exists()
    assert leftovers_under(tmp_path) == []


@pytest.mark.parametrize("failpoint", ["replica.open.after_attach",
                                       "replica.close.after_unmount"])
def test_clone_recovers_from_crash(store: ReplicaStore, tmp_path: Path, failpoint: str) -> None:
    src, clone = vid("clone-crash-src"), vid(f"clone-crash-{failpoint}")
    store.create(src, SIZE, VolumeKind.FILESYSTEM)
    store.open(src)
    fill(store.live_path(src), "clone after crash")
    digest = tree_digest(store.live_path(src))
    store.close(src)
    crash(store, failpoint, "create", clone, source=src)
    assert store.meta(clone) is None
    store.create(clone, SIZE, VolumeKind.FILESYSTEM, Source(src))
    assert not store.is_open(src)  # whatever the crash left mounted was cleaned up
    assert leftovers_under(tmp_path) == []
    store.open(clone)
    try:
        assert tree_digest(store.live_path(clone)) == digest
    finally:
        store.close(clone)
    store.open(src)
    try:
        assert not any(p.name.startswith(".clone")
                       for p in (store.mount_point(src) / "snapshots").iterdir())
    finally:
        store.close(src)


def test_open_recovers_from_crash(store: ReplicaStore, tmp_path: Path) -> None:
    v = vid("crash-open")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    crash(store, "replica.open.after_attach", "open", v)
    assert not store.is_open(v)
    assert len(store.devices(v)) == 1  # the crash left the image attached
    store.open(v)
    assert store.is_open(v)
    assert len(store.devices(v)) == 1  # re-used, not attached twice
    store.close(v)
    assert leftovers_under(tmp_path) == []


def test_close_recovers_from_crash(store: ReplicaStore, tmp_path: Path) -> None:
    v = vid("crash-close")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.open(v)
    (store.live_path(v) / "precious").write_text("still here")
    os.sync()
    crash(store, "replica.close.after_unmount", "close", v)
    assert not store.is_open(v)
    assert len(store.devices(v)) == 1
    store.close(v)
    assert store.devices(v) == []
    assert leftovers_under(tmp_path) == []
    store.open(v)
    try:
        assert (store.live_path(v) / "precious").read_text() == "still here"
    finally:
        store.close(v)


def test_delete_recovers_from_crash(store: ReplicaStore, tmp_path: Path) -> None:
    v = vid("crash-delete")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    crash(store, "replica.close.after_unmount", "delete", v)
    store.delete(v)
    assert store.meta(v) is None
    assert not volume_dir(store, v).exists()
    assert leftovers_under(tmp_path) == []


def test_expand_recovers_from_crash(store: ReplicaStore, tmp_path: Path) -> None:
    # An offline expansion, then a crash in open() right after the grown image is attached
    # (before the filesystem was resized): a retried expand is a no-op and the next open
    # still brings the filesystem up to the new size.
    v = vid("crash-expand")
    store.create(v, SIZE, VolumeKind.FILESYSTEM)
    store.expand(v, 2 * SIZE)
    crash(store, "replica.open.after_attach", "open", v)
    store.expand(v, 2 * SIZE)
    store.open(v)
    try:
        assert 2 * SIZE * 0.9 <= fs_total(store.live_path(v)) <= 2 * SIZE
    finally:
        store.close(v)
    assert leftovers_under(tmp_path) == []


def test_a_receive_that_fails_mid_stream_fails_the_stream_instead_of_stalling_it(
        store: ReplicaStore) -> None:
    """btrfs receive gives up in the middle (here: the receiving filesystem is full): the
    frames still arriving must not queue up behind it for ever, holding the sender's stream
    (and a Synchronous fsync waiting on it) until the connection dies."""
    only_btrfs(store, "replication sends btrfs send streams between btrfs replicas")
    from replication_agent.lineage import Lineage, SnapRef
    from replication_agent.spool import Spool
    from replication_agent.transfer import Outgoing, receive_snapshot, stream_snapshot

    source, target = vid("stall-source"), vid("stall-target")
    store.create(source, 1024 * MiB, VolumeKind.FILESYSTEM)
    store.create(target, MIN_VOLUME_BYTES, VolumeKind.FILESYSTEM)
    for volume in (source, target):
        store.open(volume)
    try:
        with open(store.live_path(source) / "big.bin", "wb") as out:
            for _ in range(2 * MIN_VOLUME_BYTES // MiB):  # twice what the target can hold
                out.write(os.urandom(MiB))
        sent, received = Lineage(store, source), Lineage(store, target)
        sent.ensure()
        ref = SnapRef(1, 1)
        sent.take(ref)
        header = pb.StreamHeader(volume_id=target, epoch=1, sender_node="a",
                                 snapshot=snapshot_ref(ref))

        async def receive() -> None:
            frames = parsed(stream_snapshot(Outgoing(sent, ref, None, header)))
            await anext(frames)  # the header: receive_snapshot takes the frames after it
            async with asyncio.timeout(120):
                await receive_snapshot(received, header, frames,
                                       Spool(store.root / "spool", target))

        # a full replica is told apart from a broken one: the sender resends, never rebuilds
        with pytest.raises(ResourceExhausted, match="No space left on device"):
            asyncio.run(receive())
        assert received.complete() == []  # and nothing half-received is left as a snapshot
    finally:
        for volume in (source, target):
            store.close(volume)


def test_a_long_stream_is_written_back_as_it_arrives_and_arrives_whole(
        store: ReplicaStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A receive writes the replica back every EARLY_WRITEBACK_BYTES of stream (here 4 MiB,
    so a 40 MiB stream does it several times, while btrfs receive writes); the snapshot it
    ends with is the sender's, file for file, whether the stream is full or incremental."""
    only_btrfs(store, "replication sends btrfs send streams between btrfs replicas")
    from replication_agent import transfer
    from replication_agent.lineage import Lineage, SnapRef
    from replication_agent.spool import Spool

    monkeypatch.setattr(transfer, "EARLY_WRITEBACK_BYTES", 4 * MiB)
    write_backs: list[Path] = []
    real_write_back = transfer._write_back

    def counted(directory: Path) -> None:
        write_backs.append(directory)
        real_write_back(directory)

    monkeypatch.setattr(transfer, "_write_back", counted)
    source, target = vid("wb-source"), vid("wb-target")
    for volume in (source, target):
        store.create(volume, 256 * MiB, VolumeKind.FILESYSTEM)
        store.open(volume)
    try:
        sent, received = Lineage(store, source), Lineage(store, target)
        sent.ensure()
        received.ensure()
        live = store.live_path(source)
        parent = None
        for seq, name in ((1, "first"), (2, "second")):
            (live / name).mkdir()
            for i in range(20):
                (live / name / f"{i}.bin").write_bytes(os.urandom(MiB + i))
            ref = SnapRef(1, seq)
            sent.take(ref)
            header = pb.StreamHeader(volume_id=target, epoch=1, sender_node="a",
                                     snapshot=snapshot_ref(ref))
            if parent is not None:
                header.parent.CopyFrom(snapshot_ref(parent))

            async def receive(out: transfer.Outgoing, header: pb.StreamHeader) -> None:
                frames = parsed(transfer.stream_snapshot(out))
                await anext(frames)
                await transfer.receive_snapshot(received, header, frames,
                                                Spool(store.root / "spool", target))

            before = len(write_backs)
            asyncio.run(receive(transfer.Outgoing(sent, ref, parent, header), header))
            assert len(write_backs) > before, "no write-back while the stream arrived"
            assert tree_digest(received.path(ref)) == tree_digest(sent.path(ref))
            parent = ref
    finally:
        for volume in (source, target):
            store.close(volume)
