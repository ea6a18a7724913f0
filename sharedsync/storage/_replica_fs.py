"""What differs between the filesystems a replica's image can hold: btrfs, or ext4.

The replica store (:mod:`sharedsync.storage.replicas`) is written once, against
:class:`ReplicaFilesystem`, and picks the implementation the replica's ``meta.json`` names.
Everything one filesystem does differently from the other lives here: how an image is
formatted, what the live tree and a snapshot are, how a snapshot is taken and removed, how the
filesystem grows into its image and how it reports damage. What involves two replicas (a clone
between btrfs replicas is a send stream, any other pair copies the tree) stays in the store.
"""

import enum
import shutil
from pathlib import Path
from typing import Protocol

import structlog

from sharedsync.core.errors import NotFound

from . import btrfs, ext4
from .files import fsync_dir, syncfs

log = structlog.get_logger(__name__)

#: ext4 only: a snapshot being copied (or being deleted) inside the snapshots folder. Never
#: listed as a snapshot; removed by the next snapshot or open of the replica.
PARTIAL_PREFIX = ".partial-"


class StoreFilesystem(enum.StrEnum):
    """The filesystem inside a replica's image (also the ``mount -t`` type)."""

    #: Subvolumes, cheap snapshots, send/receive, checksums: what replication is built on.
    BTRFS = "btrfs"
    #: The fallback for kernels without btrfs: snapshots and clones are full copies.
    EXT4 = "ext4"


class ReplicaFilesystem(Protocol):
    """One filesystem's way of doing what the replica store needs."""

    name: StoreFilesystem

    def make(self, device: str, image_bytes: int, label: str) -> None:
        """Format ``device`` (the replica's loop device, ``image_bytes`` long)."""

    def before_mount(self, device: str) -> None:
        """Prepare an unmounted filesystem for its mount (grow it into its image if it can)."""

    def after_mount(self, snapshots: Path) -> None:
        """Clean up what an interrupted operation left in the ``snapshots`` folder."""

    def before_unmount(self, mount_point: Path) -> None:
        """Save what the kernel counts only while mounted (best effort)."""

    def make_live(self, live: Path) -> None:
        """Create the empty live tree at ``live``."""

    def is_snapshot(self, path: Path) -> bool:
        """Whether ``path`` holds a complete snapshot."""

    def take_snapshot(self, origin: Path, dest: Path) -> None:
        """Make ``dest`` a read-only, point-in-time copy of ``origin`` (same filesystem)."""

    def remove(self, path: Path, snapshots: Path) -> None:
        """Remove a snapshot or the live tree at ``path`` (idempotent; ``snapshots`` is the
        replica's snapshots folder, where a slow removal may park it first)."""

    def inner(self, root: Path, relative: str, volume_id: str) -> Path:
        """The read-only tree ``relative`` inside the replica mounted at ``root``, or
        NotFound (the caller already refused paths that leave the replica)."""

    def slack(self, mount_point: Path, device: str) -> int:
        """Bytes of the image the mounted filesystem does not use yet."""

    def grow(self, mount_point: Path, device: str) -> None:
        """Grow the mounted filesystem to its device."""

    def damage(self, mount_point: Path) -> str | None:
        """Why the mounted filesystem cannot be trusted, or None."""


class Btrfs:
    """Subvolumes: ``live`` and every snapshot are one, and a snapshot costs one ioctl."""

    name = StoreFilesystem.BTRFS

    def make(self, device: str, image_bytes: int, label: str) -> None:
        btrfs.make_filesystem(device, image_bytes, label)

    def before_mount(self, device: str) -> None:
        return None  # btrfs grows while mounted, without special rights

    def after_mount(self, snapshots: Path) -> None:
        return None  # a snapshot is made in one ioctl: nothing is ever half-made

    def before_unmount(self, mount_point: Path) -> None:
        btrfs.persist_error_counters(mount_point)  # health stays honest across a reopen

    def make_live(self, live: Path) -> None:
        btrfs.create_subvolume(live)

    def is_snapshot(self, path: Path) -> bool:
        return btrfs.is_subvolume(path)

    def take_snapshot(self, origin: Path, dest: Path) -> None:
        btrfs.snapshot(origin, dest, read_only=True)

    def remove(self, path: Path, snapshots: Path) -> None:
        btrfs.delete_subvolume(path)

    def inner(self, root: Path, relative: str, volume_id: str) -> Path:
        path = root / relative
        if not btrfs.is_subvolume(path) or not btrfs.subvolume_info(path).read_only:
            raise NotFound(f"{relative} is not a complete snapshot of volume {volume_id}")
        return path

    def slack(self, mount_point: Path, device: str) -> int:
        return btrfs.device_slack(mount_point)

    def grow(self, mount_point: Path, device: str) -> None:
        btrfs.resize_to_device(mount_point)

    def damage(self, mount_point: Path) -> str | None:
        if btrfs.has_device_errors(mount_point):
            return "btrfs counted I/O or checksum errors on the replica"
        return None


class Ext4:
    """Plain directories: a snapshot is a full copy, made under a temporary name, inside the
    same image; ``lost+found`` sits next to ``live/`` at the top, where nobody sees it."""

    name = StoreFilesystem.EXT4

    def make(self, device: str, image_bytes: int, label: str) -> None:
        ext4.make_filesystem(device, label)  # mkfs.ext4 takes the device's size

    def before_mount(self, device: str) -> None:
        # offline growth needs no CAP_SYS_RESOURCE, unlike the kernel's online resize
        if ext4.slack(device) > 0:
            ext4.grow_offline(device)

    def after_mount(self, snapshots: Path) -> None:
        if not snapshots.is_dir():
            return
        for entry in snapshots.iterdir():
            if entry.name.startswith(PARTIAL_PREFIX):
                log.info("removing an interrupted snapshot copy", path=str(entry))
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def before_unmount(self, mount_point: Path) -> None:
        return None  # ext4 keeps its error count in the superblock by itself

    def make_live(self, live: Path) -> None:
        # what a new subvolume's root is (under the usual umask 022), whatever the umask
        live.mkdir()
        live.chmod(0o755)

    def is_snapshot(self, path: Path) -> bool:
        return path.is_dir() and not path.is_symlink()

    def take_snapshot(self, origin: Path, dest: Path) -> None:
        """Copy ``origin`` to ``dest``, which appears only once complete.

        The copy goes to a temporary name and is renamed only after everything is on disk
        (syncfs, then the rename made durable): an interrupted copy never looks like a
        snapshot, and the next snapshot or open removes it.
        """
        partial = dest.with_name(f"{PARTIAL_PREFIX}{dest.name}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            ext4.copy_tree(origin, partial)
            syncfs(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)  # give the space back now
            raise
        partial.rename(dest)
        fsync_dir(dest.parent)

    def remove(self, path: Path, snapshots: Path) -> None:
        """Remove the tree so that it is gone at once, durably: it is renamed into
        ``snapshots`` as a partial first (deleting a big tree takes a while, and one
        interrupted half-way must not pass for a damaged snapshot)."""
        if not path.exists():
            return
        snapshots.mkdir(exist_ok=True)
        doomed = snapshots / f"{PARTIAL_PREFIX}{path.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        path.rename(doomed)
        fsync_dir(snapshots)
        if path.parent != snapshots:
            fsync_dir(path.parent)
        shutil.rmtree(doomed)

    def inner(self, root: Path, relative: str, volume_id: str) -> Path:
        """Any directory inside the replica once symlinks are followed (no subvolumes)."""
        try:
            resolved = (root / relative).resolve(strict=True)
        except OSError:
            resolved = None
        if (resolved is None or not resolved.is_dir()
                or not resolved.is_relative_to(root.resolve())):
            raise NotFound(f"{relative} is not a directory inside volume {volume_id}")
        return resolved

    def slack(self, mount_point: Path, device: str) -> int:
        return ext4.slack(device)

    def grow(self, mount_point: Path, device: str) -> None:
        # only when behind: growing a block volume's disk file alone (the filesystem grew
        # offline at mount) then needs no CAP_SYS_RESOURCE
        if ext4.slack(device) > 0:
            ext4.grow_online(device)

    def damage(self, mount_point: Path) -> str | None:
        errors = ext4.error_count(mount_point)
        if errors:
            return (f"ext4 recorded {errors} filesystem error(s) on the replica (e2fsck clears "
                    "the count once the replica is repaired)")
        return None


_FILESYSTEMS: dict[StoreFilesystem, ReplicaFilesystem] = {
    StoreFilesystem.BTRFS: Btrfs(), StoreFilesystem.EXT4: Ext4()}


def replica_filesystem(name: StoreFilesystem | str) -> ReplicaFilesystem:
    """The implementation for ``name`` (a StoreFilesystem, or the mount table's type)."""
    return _FILESYSTEMS[StoreFilesystem(name)]
