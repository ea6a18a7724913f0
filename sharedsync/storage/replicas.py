"""The replica store: one filesystem in a loop image per volume, on this node's disk.

Layout under the store's root directory::

    volumes/<volume-id>/image      sparse image file holding the replica's filesystem
    volumes/<volume-id>/meta.json  size, kind, filesystem and lifecycle flags, written atomically
    volumes/<volume-id>/opened     present while a caller holds the replica open (open/close)
    mnt/<volume-id>/               where the image's filesystem is mounted while the replica is open
    locks/<volume-id>.lock         serialises every operation on one replica across processes

Each replica's filesystem is btrfs, or ext4 on nodes whose kernel has no btrfs
(:class:`StoreFilesystem`). A store makes new replicas with the filesystem it was given, and
every later operation on a replica follows the filesystem its ``meta.json`` records, so one
store can hold both (replicas made before ext4 existed record none: they are btrfs).

btrfs: ``live/`` is the subvolume users see (a filesystem volume's root, or the directory holding
``disk.img`` for a block volume) and ``snapshots/<id>`` are read-only snapshots of it: CSI
snapshots now, the replication agent's sync points later. A clone or a restore is a
``btrfs send | btrfs receive`` into a fresh filesystem, so a volume never shares blocks with
another volume's image. Growth is ``btrfs filesystem resize``, health the device error counters.

ext4 has none of that machinery. ``live/`` is a plain directory, and a CSI snapshot is a full copy
of it in ``snapshots/<id>``, inside the same image: it costs as much space as the data, at once
(there is no copy-on-write), and it appears only once complete (it is copied under a temporary
name first). A clone or a restore copies the tree, which is also how content crosses between a
btrfs and an ext4 replica. Growth is ``resize2fs``, health the error count ext4 keeps in its
superblock. ``lost+found`` sits next to ``live/`` at the top, where nobody sees it.

What differs between the two is in :mod:`sharedsync.storage._replica_fs` (one class each); the
store itself is written once.

Every operation is idempotent and recovers from a crash at any step: the store reads the kernel's
state (loop attachments, mounts, subvolumes) instead of trusting a record of it, a replica is
usable only once ``meta.json`` says ``complete``, and an incomplete one is discarded and rebuilt
on retry.
"""

import contextlib
import enum
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import structlog

from sharedsync import failpoints
from sharedsync.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
)
from sharedsync.core.ids import is_snapshot_id, is_volume_id
from sharedsync.core.sizes import MIN_VOLUME_BYTES, MiB

from . import btrfs, ext4, loop, mounts
from ._replica_fs import PARTIAL_PREFIX, StoreFilesystem, replica_filesystem
from .files import atomic_write, exclusive_lock, syncfs

__all__ = ["PARTIAL_PREFIX", "Health", "ReplicaMeta", "ReplicaStore", "Source", "StoreFilesystem",
           "VolumeKind", "image_size"]

log = structlog.get_logger(__name__)

LIVE = "live"
SNAPSHOTS = "snapshots"
BLOCK_FILE = "disk.img"
#: Temporary read-only snapshot of a clone's source, named after the clone.
CLONE_PREFIX = ".clone-"
#: A block volume's image leaves room for one full rewrite after a snapshot (copy-on-write)
#: plus btrfs metadata. Images are sparse, so the headroom costs nothing until used.
BLOCK_METADATA_HEADROOM = 256 * MiB


class VolumeKind(enum.StrEnum):
    """How a replica is presented: a mounted filesystem or a raw block device."""

    FILESYSTEM = "filesystem"
    BLOCK = "block"


@dataclass(frozen=True, slots=True)
class ReplicaMeta:
    """What ``meta.json`` records about a replica."""

    volume_id: str
    size_bytes: int
    kind: VolumeKind
    complete: bool = False
    deleted: bool = False  # the volume is gone; the image lives on for its snapshots
    #: What the image holds; chosen when the replica is made and never changed.
    filesystem: StoreFilesystem = StoreFilesystem.BTRFS

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ReplicaMeta":
        raw = json.loads(data)
        return cls(volume_id=str(raw["volume_id"]), size_bytes=int(raw["size_bytes"]),
                   kind=VolumeKind(raw["kind"]), complete=bool(raw["complete"]),
                   deleted=bool(raw.get("deleted", False)),
                   # replicas made before the ext4 store record no filesystem: all were btrfs
                   filesystem=StoreFilesystem(raw.get("filesystem", StoreFilesystem.BTRFS)))


@dataclass(frozen=True, slots=True)
class Source:
    """Where a new replica's content comes from: a snapshot of a volume, or a volume itself.

    ``subvolume`` names a read-only subvolume inside the source's filesystem (relative to its
    root, e.g. the replication agent's ``sync/<name>``) to copy instead of the live data: a
    replica's ``live`` is not what it holds, its newest complete replication snapshot is.
    In an ext4 replica, which has no subvolumes, it names a directory.
    """

    volume_id: str
    snapshot_id: str | None = None
    subvolume: str | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """A replica's condition as CSI reports it: abnormal or not, and a sentence why."""

    abnormal: bool
    message: str


def image_size(size_bytes: int, kind: VolumeKind) -> int:
    """Bytes of the image file that backs a replica of ``size_bytes``.

    The same on ext4, which needs no copy-on-write headroom for a block volume but uses it for
    its one full-copy snapshot of the disk image; images are sparse either way.
    """
    if kind is VolumeKind.BLOCK:
        return 2 * size_bytes + BLOCK_METADATA_HEADROOM
    return size_bytes


class ReplicaStore:
    """The replicas held on this node, under one root directory.

    ``filesystem`` is what new replicas are made with; existing replicas keep theirs.
    """

    def __init__(self, root: str | os.PathLike[str],
                 filesystem: StoreFilesystem = StoreFilesystem.BTRFS) -> None:
        self.root = Path(root).absolute()
        self.filesystem = StoreFilesystem(filesystem)  # also accepts the plain string
        self._volumes = self.root / "volumes"
        self._mnt = self.root / "mnt"
        self._locks = self.root / "locks"

    def ensure_layout(self) -> None:
        """Create the store's directories (idempotent)."""
        for path in (self._volumes, self._mnt, self._locks):
            path.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- paths -------------------------------------------------------------------------------

    def _dir(self, volume_id: str) -> Path:
        if not is_volume_id(volume_id):
            raise InvalidArgument(f"{volume_id!r} is not a replica id")
        return self._volumes / volume_id

    def _image(self, volume_id: str) -> Path:
        return self._dir(volume_id) / "image"

    def _meta_path(self, volume_id: str) -> Path:
        return self._dir(volume_id) / "meta.json"

    def _opened_marker(self, volume_id: str) -> Path:
        return self._dir(volume_id) / "opened"

    def mount_point(self, volume_id: str) -> Path:
        """Where the replica's filesystem is mounted while it is open."""
        self._dir(volume_id)
        return self._mnt / volume_id

    def live_path(self, volume_id: str) -> Path:
        """The live subvolume: what a filesystem volume's users see."""
        return self.mount_point(volume_id) / LIVE

    def _snapshots_dir(self, volume_id: str) -> Path:
        """Where CSI snapshots (and, on ext4, partial copies) live inside the open replica."""
        return self.mount_point(volume_id) / SNAPSHOTS

    def block_file(self, volume_id: str) -> Path:
        """The file that a block volume's loop device is backed by."""
        return self.live_path(volume_id) / BLOCK_FILE

    def _snapshot_path(self, volume_id: str, snapshot_id: str) -> Path:
        """Where a CSI snapshot lives; only well-formed snapshot ids are accepted."""
        if not is_snapshot_id(snapshot_id):
            raise InvalidArgument(f"{snapshot_id!r} is not a snapshot id")
        return self._snapshots_dir(volume_id) / snapshot_id

    def _clone_point_path(self, volume_id: str, clone_id: str) -> Path:
        """Where the temporary snapshot for cloning ``volume_id`` into ``clone_id`` lives."""
        self._dir(clone_id)
        return self._snapshots_dir(volume_id) / f"{CLONE_PREFIX}{clone_id}"

    @contextlib.contextmanager
    def locked(self, volume_id: str) -> Iterator[None]:
        """Serialise operations on one replica (across threads and processes)."""
        self._dir(volume_id)
        with exclusive_lock(self._locks / f"{volume_id}.lock"):
            yield

    # -- queries -----------------------------------------------------------------------------

    def meta(self, volume_id: str) -> ReplicaMeta | None:
        """The replica's metadata, or None when there is no complete replica."""
        try:
            meta = ReplicaMeta.from_json(self._meta_path(volume_id).read_bytes())
        except FileNotFoundError:
            return None
        return meta if meta.complete else None

    def filesystem_of(self, volume_id: str) -> StoreFilesystem:
        """The filesystem the replica was made with (NotFound when there is no live replica)."""
        return self._require(volume_id).filesystem

    def _require(self, volume_id: str) -> ReplicaMeta:
        meta = self.meta(volume_id)
        if meta is None or meta.deleted:
            raise NotFound(f"volume {volume_id} has no replica on this node")
        return meta

    def is_open(self, volume_id: str) -> bool:
        return mounts.is_mounted(self.mount_point(volume_id))

    def open_replicas(self) -> list[str]:
        """Ids of the replicas mounted now, read from the mount table (not from who opened
        them): what a shutdown must close so that it leaves the host clean."""
        prefix = f"{self._mnt}/"
        names = (m.mount_point.removeprefix(prefix) for m in mounts.mount_table()
                 if m.mount_point.startswith(prefix))
        return sorted({name for name in names if is_volume_id(name)})

    def _devices(self, volume_id: str) -> list[str]:
        image = self._image(volume_id)
        return loop.devices_for(image) if image.exists() else []

    def foreign_mounts(self, volume_id: str) -> list[str]:
        """Mount points of this replica's filesystem other than the store's own mount."""
        devices = set(self._devices(volume_id))
        own = str(self.mount_point(volume_id))
        return sorted(m.mount_point for m in mounts.mount_table()
                      if m.source in devices and m.mount_point != own)

    def snapshots(self, volume_id: str) -> list[str]:
        """Ids of the CSI snapshots held in this replica (the replica must be open).

        An ext4 snapshot still being copied has a temporary name, so it is never listed.
        """
        folder = self._snapshots_dir(volume_id)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if is_snapshot_id(p.name))

    def available_bytes(self) -> int:
        """Free space for new replica images on the store's filesystem."""
        self.root.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    # -- lifecycle ---------------------------------------------------------------------------

    def create(self, volume_id: str, size_bytes: int, kind: VolumeKind,
               source: Source | None = None) -> ReplicaMeta:
        """Create the replica (empty, or with ``source``'s content); idempotent.

        An existing complete replica is returned unchanged: callers compare it with what they
        asked for. A partial one, left by a crash, is discarded and built again; one that fails
        for any other reason is discarded before the error propagates.

        The id of a deleted volume whose snapshots still live in its image is refused
        (``FailedPrecondition``) until those snapshots are deleted: building a new replica there
        would destroy them.

        The new replica gets the store's :attr:`filesystem`, whatever ``source``'s is.
        """
        if size_bytes < MIN_VOLUME_BYTES:
            raise InvalidArgument(
                f"a replica needs at least {MIN_VOLUME_BYTES} bytes, {size_bytes} requested")
        with self.locked(volume_id):
            meta = self.meta(volume_id)
            if meta is not None and not meta.deleted:
                return meta
            if meta is not None:
                raise FailedPrecondition(
                    f"volume {volume_id} was deleted but its snapshots still exist; delete them "
                    "before creating a volume with the same name")
            self._discard(volume_id)
            if source is not None:
                self._check_source(source, size_bytes, kind)
            filesystem = self.filesystem  # read once: the meta must name what _build made
            try:
                self._build(volume_id, size_bytes, kind, source, filesystem)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._discard(volume_id)
                raise
            meta = ReplicaMeta(volume_id, size_bytes, kind, complete=True, filesystem=filesystem)
            atomic_write(self._meta_path(volume_id), meta.to_json())
            return meta

    def _build(self, volume_id: str, size_bytes: int, kind: VolumeKind,
               source: Source | None, filesystem: StoreFilesystem) -> None:
        folder = self._dir(volume_id)
        folder.mkdir(parents=True, mode=0o700)
        atomic_write(self._meta_path(volume_id),
                     ReplicaMeta(volume_id, size_bytes, kind, filesystem=filesystem).to_json())
        with open(self._image(volume_id), "wb") as image:
            image.truncate(image_size(size_bytes, kind))
        failpoints.hit("replica.create.after_image")
        device = loop.attach(self._image(volume_id))
        replica_filesystem(filesystem).make(device, image_size(size_bytes, kind), volume_id)
        mount_point = self._open(volume_id, filesystem)
        try:
            if source is None:
                self._populate_empty(volume_id, size_bytes, kind, filesystem)
            else:
                self._populate_from(volume_id, size_bytes, kind, source, filesystem)
            self._snapshots_dir(volume_id).mkdir(exist_ok=True)
            syncfs(mount_point)
            failpoints.hit("replica.create.before_commit")
        finally:
            self._close(volume_id)

    def _check_source(self, source: Source, size_bytes: int, kind: VolumeKind) -> ReplicaMeta:
        """Refuse a source that is missing or cannot fit a new replica of ``kind``."""
        src_meta = self.meta(source.volume_id)
        if src_meta is None or (src_meta.deleted and source.snapshot_id is None):
            raise NotFound(f"source volume {source.volume_id} has no replica on this node")
        if source.snapshot_id is not None and not is_snapshot_id(source.snapshot_id):
            raise InvalidArgument(f"{source.snapshot_id!r} is not a snapshot id")
        if src_meta.kind is not kind:
            raise InvalidArgument(
                f"cannot create a {kind} volume from a {src_meta.kind} source")
        # A clone must hold the whole live volume. A restore needs only the snapshot's size,
        # which the caller (the CSI controller keeps it in the snapshot's record) checks: the
        # volume may have grown since the snapshot was taken.
        if source.snapshot_id is None and src_meta.size_bytes > size_bytes:
            raise OutOfRange(
                f"the source holds {src_meta.size_bytes} bytes, more than the "
                f"{size_bytes} bytes requested")
        return src_meta

    def _populate_empty(self, volume_id: str, size_bytes: int, kind: VolumeKind,
                        filesystem: StoreFilesystem) -> None:
        live = self.live_path(volume_id)
        replica_filesystem(filesystem).make_live(live)
        if kind is VolumeKind.BLOCK:
            with open(live / BLOCK_FILE, "wb") as disk:
                disk.truncate(size_bytes)

    def _populate_from(self, volume_id: str, size_bytes: int, kind: VolumeKind,
                       source: Source, filesystem: StoreFilesystem) -> None:
        """Fill a new replica from a snapshot or a live volume.

        Between two btrfs replicas through send/receive; when either side is ext4 by copying
        the tree (:meth:`_copy_from`), which works across every pair of filesystems. The new
        filesystem was made at its full size, so it needs no resize afterwards.
        """
        dest = self.mount_point(volume_id)
        snap: Path | None = None
        with self.locked(source.volume_id):
            # again, now that the source is locked
            src_meta = self._check_source(source, size_bytes, kind)
            with self._mounted(source.volume_id, src_meta.filesystem):
                if (filesystem is not StoreFilesystem.BTRFS
                        or src_meta.filesystem is not StoreFilesystem.BTRFS):
                    self._copy_from(source, volume_id, src_meta.filesystem, filesystem)
                elif source.subvolume is not None:
                    snap = self._inner_subvolume(source.volume_id, source.subvolume,
                                                 src_meta.filesystem)
                    btrfs.send_receive(snap, dest)
                elif source.snapshot_id is None:
                    with self._clone_point(source.volume_id, volume_id) as snap:
                        btrfs.send_receive(snap, dest)
                else:
                    snap = self._snapshot_path(source.volume_id, source.snapshot_id)
                    if not btrfs.is_subvolume(snap):
                        raise NotFound(f"snapshot {source.snapshot_id} not found in volume "
                                       f"{source.volume_id}")
                    btrfs.send_receive(snap, dest)
        if snap is not None:
            received = dest / snap.name
            btrfs.snapshot(received, self.live_path(volume_id), read_only=False)
            btrfs.delete_subvolume(received)
        if kind is VolumeKind.BLOCK:
            with open(self.block_file(volume_id), "r+b") as disk:
                disk.truncate(size_bytes)

    def _copy_from(self, source: Source, volume_id: str, src_fs: StoreFilesystem,
                   dest_fs: StoreFilesystem) -> None:
        """Copy ``source``'s content (the source is locked and mounted) into the new ``live``.

        A btrfs source is copied from a read-only snapshot taken for the purpose, so a clone of
        a volume in use is a point-in-time copy. An ext4 source has no such thing: its live
        tree is copied as it is, file after file, while its users may write to it.
        """
        live = self.live_path(volume_id)
        replica_filesystem(dest_fs).make_live(live)  # the copy fills it, with the source's mode
        if source.subvolume is not None:
            ext4.copy_tree(self._inner_subvolume(source.volume_id, source.subvolume, src_fs),
                           live)
        elif source.snapshot_id is not None:
            snap = self._snapshot_path(source.volume_id, source.snapshot_id)
            if not replica_filesystem(src_fs).is_snapshot(snap):
                raise NotFound(f"snapshot {source.snapshot_id} not found in volume "
                               f"{source.volume_id}")
            ext4.copy_tree(snap, live)
        elif src_fs is StoreFilesystem.BTRFS:
            with self._clone_point(source.volume_id, volume_id) as point:
                ext4.copy_tree(point, live)
        else:
            ext4.copy_tree(self.live_path(source.volume_id), live)

    @contextlib.contextmanager
    def _clone_point(self, source_id: str, clone_id: str) -> Iterator[Path]:
        """A read-only snapshot of a btrfs source's live data for one clone, removed after
        (a clone of a volume in use is then a point-in-time copy)."""
        point = self._clone_point_path(source_id, clone_id)
        btrfs.delete_subvolume(point)  # left by an interrupted clone
        btrfs.snapshot(self.live_path(source_id), point, read_only=True)
        try:
            yield point
        finally:
            btrfs.delete_subvolume(point)

    def _inner_subvolume(self, volume_id: str, relative: str,
                         filesystem: StoreFilesystem) -> Path:
        """A read-only subvolume inside an open replica, refusing any path that leaves it.

        ext4 has no subvolumes: there a directory is accepted, as long as it really is inside
        the replica once symlinks are followed.
        """
        parts = Path(relative).parts
        if not parts or relative.startswith("/") or ".." in parts or parts[0] == SNAPSHOTS:
            raise InvalidArgument(f"{relative!r} is not a subvolume path inside the replica")
        return replica_filesystem(filesystem).inner(self.mount_point(volume_id), relative,
                                                    volume_id)

    def delete(self, volume_id: str) -> None:
        """Delete the replica; its image outlives it while CSI snapshots still live in it."""
        with self.locked(volume_id):
            meta_file = self._meta_path(volume_id)
            if not meta_file.parent.exists():
                return
            meta = self.meta(volume_id)
            if meta is None:  # never finished: nothing of value inside
                self._discard(volume_id)
                return
            self._refuse_if_in_use(volume_id)
            with self._mounted(volume_id, meta.filesystem):
                remaining = self.snapshots(volume_id)
                if remaining:
                    replica_filesystem(meta.filesystem).remove(
                        self.live_path(volume_id), self._snapshots_dir(volume_id))
                    atomic_write(meta_file, replace(meta, deleted=True).to_json())
            if remaining:  # nobody may open a deleted volume: do not leave it mounted
                self._close(volume_id)
                self._opened_marker(volume_id).unlink(missing_ok=True)
            else:
                self._discard(volume_id)

    def _refuse_if_in_use(self, volume_id: str) -> None:
        users = self.foreign_mounts(volume_id)
        if users:
            raise FailedPrecondition(
                f"volume {volume_id} is still mounted at {', '.join(users)}")
        block = self.block_file(volume_id)
        if self.is_open(volume_id) and block.exists() and loop.devices_for(block):
            raise FailedPrecondition(f"volume {volume_id} is still attached as a block device")

    def _discard(self, volume_id: str) -> None:
        """Remove every trace of a replica: mounts, loop devices, files."""
        folder = self._dir(volume_id)
        if self.is_open(volume_id):
            self._close(volume_id)
        if folder.exists():
            loop.detach_all(self._image(volume_id))
            shutil.rmtree(folder)
        with contextlib.suppress(FileNotFoundError):
            self.mount_point(volume_id).rmdir()

    # -- open / close ------------------------------------------------------------------------

    def open(self, volume_id: str) -> Path:
        """Attach and mount the replica (idempotent) and return its mount point."""
        with self.locked(volume_id):
            meta = self._require(volume_id)
            mount_point = self._open(volume_id, meta.filesystem)
            self._grow_if_needed(volume_id, meta)  # the image may have grown while closed
            self._opened_marker(volume_id).touch()
            return mount_point

    def close(self, volume_id: str) -> None:
        """Unmount and detach the replica (idempotent); refuses while something still uses it."""
        with self.locked(volume_id):
            if not self._dir(volume_id).exists():
                return
            self._refuse_if_in_use(volume_id)
            self._close(volume_id)
            self._opened_marker(volume_id).unlink(missing_ok=True)

    def _open(self, volume_id: str, filesystem: StoreFilesystem) -> Path:
        """Attach and mount the image (idempotent), as the ``filesystem`` it holds.

        The filesystem prepares itself for the mount (an ext4 behind its grown image grows
        offline) and cleans up after interrupted snapshots once mounted (callers hold the
        replica's lock, so none is in progress).
        """
        fs = replica_filesystem(filesystem)
        image = self._image(volume_id)
        if not image.exists():
            raise NotFound(f"the image of volume {volume_id} is missing")
        device = loop.attach(image)
        failpoints.hit("replica.open.after_attach")
        if loop.size_of(device) < image.stat().st_size:
            loop.refresh_size(device)
        mount_point = self.mount_point(volume_id)
        if not self.is_open(volume_id):
            mount_point.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fs.before_mount(device)
                mounts.mount(device, mount_point, fs_type=filesystem.value, options=["noatime"])
            except BaseException:
                with contextlib.suppress(Exception):
                    if not self.is_open(volume_id):
                        loop.detach_all(image)
                raise
        fs.after_mount(self._snapshots_dir(volume_id))
        return mount_point

    def _close(self, volume_id: str) -> None:
        mount_point = self.mount_point(volume_id)
        block = self.block_file(volume_id)
        entries = mounts.mounts_at(mount_point)
        if entries:
            # Best effort (a filesystem that went read-only cannot commit): keep health honest
            # across a close and reopen. The mount table, not meta.json, names the filesystem:
            # a half-built replica being discarded may have no readable meta.
            with contextlib.suppress(Exception):
                replica_filesystem(entries[-1].fs_type).before_unmount(mount_point)
            if block.exists():
                loop.detach_all(block)
        mounts.unmount(mount_point)
        failpoints.hit("replica.close.after_unmount")
        if not loop.detach_all(self._image(volume_id)):
            log.warning("loop device still held open by another process; the kernel detaches "
                        "it when that process closes it", volume_id=volume_id)
        with contextlib.suppress(FileNotFoundError, OSError):
            mount_point.rmdir()

    @contextlib.contextmanager
    def _mounted(self, volume_id: str, filesystem: StoreFilesystem) -> Iterator[Path]:
        """Open the replica for the block's duration, then close it unless a caller opened it.

        Whether a caller holds the replica open is recorded by :meth:`open` (not read from the
        mount table), so that a mount left behind by a crashed operation is cleaned up here
        instead of being mistaken for a user's and kept forever.
        """
        mount_point = self._open(volume_id, filesystem)
        try:
            yield mount_point
        finally:
            if not self._opened_marker(volume_id).exists():
                self._close(volume_id)

    # -- resize ------------------------------------------------------------------------------

    def expand(self, volume_id: str, size_bytes: int, *,
               within_free_space: bool = False) -> ReplicaMeta:
        """Grow the replica to ``size_bytes`` (online when open); never shrinks.

        ``within_free_space`` refuses (ResourceExhausted) growth beyond the free space of the
        store's filesystem, for sizes asked on this node alone (NodeExpandVolume, a peer's
        stream): images are sparse, so nothing else stops a replica from promising more than
        the disk holds. The operator's sizes were checked against every node already.
        """
        with self.locked(volume_id):
            meta = self._require(volume_id)
            if size_bytes <= meta.size_bytes:
                return meta
            if within_free_space:
                more, available = size_bytes - meta.size_bytes, self.available_bytes()
                if more > available:
                    raise ResourceExhausted(f"{more} more bytes needed for {volume_id}, "
                                            f"{available} free")
            with open(self._image(volume_id), "r+b") as image:
                image.truncate(image_size(size_bytes, meta.kind))
            if self.is_open(volume_id):
                self._grow_open(volume_id, meta, size_bytes)
            grown = replace(meta, size_bytes=size_bytes)
            atomic_write(self._meta_path(volume_id), grown.to_json())
            return grown

    def grow_online(self, volume_id: str) -> ReplicaMeta:
        """Make an open replica's filesystem (or block file) fill its grown image."""
        with self.locked(volume_id):
            meta = self._require(volume_id)
            if self.is_open(volume_id):
                self._grow_open(volume_id, meta, meta.size_bytes)
            return meta

    def _grow_if_needed(self, volume_id: str, meta: ReplicaMeta) -> None:
        """Finish an expansion done while the replica was closed (or interrupted by a crash)."""
        block = self.block_file(volume_id)
        slack = replica_filesystem(meta.filesystem).slack(self.mount_point(volume_id),
                                                          self._mounted_device(volume_id))
        if (slack > 0
                or (meta.kind is VolumeKind.BLOCK and block.exists()
                    and block.stat().st_size < meta.size_bytes)):
            self._grow_open(volume_id, meta, meta.size_bytes)

    def _grow_open(self, volume_id: str, meta: ReplicaMeta, size_bytes: int) -> None:
        """Grow the open replica's filesystem to its image, then a block volume's disk file."""
        kind = meta.kind
        for device in self._devices(volume_id):
            loop.refresh_size(device)
        replica_filesystem(meta.filesystem).grow(self.mount_point(volume_id),
                                                 self._mounted_device(volume_id))
        if kind is VolumeKind.BLOCK:
            block = self.block_file(volume_id)
            with open(block, "r+b") as disk:
                if os.fstat(disk.fileno()).st_size < size_bytes:
                    disk.truncate(size_bytes)
            for device in loop.devices_for(block):
                loop.refresh_size(device)

    def _mounted_device(self, volume_id: str) -> str:
        """The block device the open replica's filesystem is mounted from."""
        entries = mounts.mounts_at(self.mount_point(volume_id))
        if not entries:
            raise FailedPrecondition(f"volume {volume_id} is not open")
        return entries[-1].source

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self, volume_id: str, snapshot_id: str, of: str | None = None) -> int:
        """Take a read-only snapshot (idempotent) of the live subvolume, or of the read-only
        subvolume ``of`` inside the replica (see :class:`Source`); returns its size.

        A btrfs snapshot is a subvolume of its own: deleting ``of`` later leaves it intact.

        An ext4 snapshot is a full copy (ext4 has no copy-on-write) inside the same image: it
        takes as much of the volume's space as the data it holds, at once, and fails with
        ``ResourceExhausted`` when that space is not free. Nothing but the store ever writes
        to it. ``of`` may be any directory inside the replica there.
        """
        with self.locked(volume_id):
            meta = self._require(volume_id)
            with self._mounted(volume_id, meta.filesystem):
                dest = self._snapshot_path(volume_id, snapshot_id)
                fs = replica_filesystem(meta.filesystem)
                if not fs.is_snapshot(dest):
                    origin = self.live_path(volume_id) if of is None else \
                        self._inner_subvolume(volume_id, of, meta.filesystem)
                    dest.parent.mkdir(exist_ok=True)
                    fs.take_snapshot(origin, dest)
            return meta.size_bytes

    def has_snapshot(self, volume_id: str, snapshot_id: str) -> bool:
        with self.locked(volume_id):
            meta = self.meta(volume_id)
            if meta is None:
                return False
            with self._mounted(volume_id, meta.filesystem):
                return replica_filesystem(meta.filesystem).is_snapshot(
                    self._snapshot_path(volume_id, snapshot_id))

    def delete_snapshot(self, volume_id: str, snapshot_id: str) -> None:
        """Delete a snapshot (idempotent); the last one of a deleted volume frees the image."""
        with self.locked(volume_id):
            meta = self.meta(volume_id)
            if meta is None:
                return
            with self._mounted(volume_id, meta.filesystem):
                replica_filesystem(meta.filesystem).remove(
                    self._snapshot_path(volume_id, snapshot_id), self._snapshots_dir(volume_id))
                remaining = self.snapshots(volume_id)
            if meta.deleted and not remaining:
                self._discard(volume_id)

    # -- health ------------------------------------------------------------------------------

    def health(self, volume_id: str) -> Health:
        """Whether the replica can be trusted, checked against the kernel's view of it."""
        meta = self.meta(volume_id)
        if meta is None or meta.deleted:
            return Health(True, f"volume {volume_id} has no replica on this node")
        if not self._image(volume_id).exists():
            return Health(True, "the replica's image file is missing")
        mount_point = self.mount_point(volume_id)
        entries = mounts.mounts_at(mount_point)
        if not entries:
            return Health(False, "replica is healthy (not mounted)")
        if entries[-1].read_only or entries[-1].fs_read_only:
            return Health(True, "the replica's filesystem went read-only after an I/O error")
        damage = replica_filesystem(meta.filesystem).damage(mount_point)
        if damage is not None:
            return Health(True, damage)
        return Health(False, "replica is healthy")

    def devices(self, volume_id: str) -> list[str]:
        """Loop devices the replica's image is attached to (empty when closed)."""
        return self._devices(volume_id)
