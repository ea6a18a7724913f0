"""ext4 through e2fsprogs and coreutils: the replica store's fallback for kernels without btrfs.

ext4 has no subvolumes, no snapshots and no send stream, so what btrfs does with one ioctl is a
tree copy here (:func:`copy_tree`, also the way content crosses between a btrfs and an ext4
replica), and growth goes through ``resize2fs``. The kernel resizes a mounted ext4 itself
(EXT4_IOC_RESIZE_FS, which needs CAP_SYS_RESOURCE); an unmounted one is grown by ``resize2fs``
after a forced check, which needs no special capability.
"""

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from sharedsync.core.errors import Internal, ResourceExhausted

from ._run import CommandFailed, run

#: The e2fsprogs commands the ext4 store runs (the node image must have them: test_image).
TOOLS = ("mkfs.ext4", "dumpe2fs", "resize2fs", "e2fsck")
#: ext4 labels hold at most 16 bytes (``s_volume_name``); mkfs.ext4 refuses a longer one.
LABEL_MAX_BYTES = 16
#: Copying a whole volume, checking or resizing a large filesystem takes as long as it takes;
#: the bound only stops a tool stuck on a dead disk from holding a CSI call for ever.
LONG_TIMEOUT_SECONDS = 6 * 3600.0
#: Room resize2fs wants in a new last block group beyond its own metadata; a smaller last group
#: is left out (resize2fs ``adjust_fs_info``).
_LAST_GROUP_SPARE_BLOCKS = 50
#: e2fsck's exit status when it repaired something (anything higher needs a human).
_FSCK_CORRECTED = 1


def make_filesystem(device: str | os.PathLike[str], label: str) -> None:
    """Create an ext4 on ``device`` that a replica can use at once and grow later.

    - ``-m 0``: no blocks reserved for root; the volume's user gets all of the space asked for
      (the reserve protects a system disk's daemons, and nothing else writes here).
    - ``-T default -b 4096``: the same layout at every size (mke2fs would otherwise pick its
      "small" profile below 512 MiB: four times the inode tables, less room for data).
    - ``-e remount-ro``: metadata errors stop writes, as btrfs does, instead of letting a damaged
      filesystem be written on; the error is also counted (:func:`error_count`).
    - ``lazy_itable_init=0,lazy_journal_init=0``: everything is initialised now, so no kernel
      thread keeps writing into the image after the first mount.
    """
    name = os.fsencode(label)[:LABEL_MAX_BYTES].decode(errors="ignore")
    run(["mkfs.ext4", "-q", "-F", "-L", name, "-m", "0", "-T", "default", "-b", "4096",
         "-e", "remount-ro", "-E", "lazy_itable_init=0,lazy_journal_init=0",
         os.fspath(device)])


@dataclass(frozen=True, slots=True)
class Geometry:
    """The superblock fields that say how big an ext4 is and how it can grow."""

    block_count: int
    block_size: int
    blocks_per_group: int
    first_data_block: int
    inode_blocks_per_group: int
    reserved_gdt_blocks: int
    descriptor_size: int


def geometry(device: str | os.PathLike[str]) -> Geometry:
    """Read the superblock of the ext4 on ``device`` (``dumpe2fs -h``).

    Exact for a mounted filesystem too: the kernel keeps its superblock in the block device's
    page cache, which is what dumpe2fs reads, so an online resize shows at once.
    """
    fields: dict[str, str] = {}
    for line in run(["dumpe2fs", "-h", os.fspath(device)]).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()

    def number(key: str, default: int | None = None) -> int:
        if key not in fields:
            if default is None:
                raise Internal(f"dumpe2fs shows no {key!r} for {device}")
            return default
        return int(fields[key].split()[0])

    return Geometry(
        block_count=number("Block count"), block_size=number("Block size"),
        blocks_per_group=number("Blocks per group"), first_data_block=number("First block"),
        inode_blocks_per_group=number("Inode blocks per group"),
        reserved_gdt_blocks=number("Reserved GDT blocks", 0),
        descriptor_size=number("Group descriptor size", 32))


def _blocks_after_resize(geo: Geometry, device_blocks: int) -> int:
    """The block count ``resize2fs`` gives the filesystem on a device of ``device_blocks``.

    resize2fs leaves out a last block group too small for its bitmaps, inode table and backups
    plus 50 blocks: growing a volume by a few MiB past a group boundary adds nothing. The
    overhead here assumes the last group carries a superblock backup, which only makes it
    larger: a remainder is counted only when resize2fs surely uses it (at worst a few MiB it
    could use are not), so "slack left" never means "resize2fs has nothing to do".
    """
    data = device_blocks - geo.first_data_block
    groups = -(-data // geo.blocks_per_group)
    remainder = data % geo.blocks_per_group
    descriptor_blocks = -(-groups * geo.descriptor_size // geo.block_size)
    overhead = 2 + geo.inode_blocks_per_group + 1 + descriptor_blocks + geo.reserved_gdt_blocks
    if groups > 1 and remainder and remainder < overhead + _LAST_GROUP_SPARE_BLOCKS:
        return device_blocks - remainder
    return device_blocks


def device_bytes(device: str | os.PathLike[str]) -> int:
    """Size of a block device (or an image file) in bytes."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def slack(device: str | os.PathLike[str]) -> int:
    """Bytes of ``device`` that the ext4 on it can still grow into (0 when it fills it).

    Non-zero after the device grew (an image expanded while the replica was closed) until
    :func:`grow_online` or :func:`grow_offline` runs. Whole blocks only, and only what resize2fs
    would really add (see :func:`_blocks_after_resize`): a tail it would leave unused does not
    count, so a replica never runs a pointless check and resize at every mount.
    """
    geo = geometry(device)
    target = _blocks_after_resize(geo, device_bytes(device) // geo.block_size)
    return max(0, target - geo.block_count) * geo.block_size


def grow_online(device: str | os.PathLike[str]) -> None:
    """Grow the mounted ext4 on ``device`` to fill the (already grown) device.

    The kernel does the work (EXT4_IOC_RESIZE_FS) and insists on CAP_SYS_RESOURCE: without it
    the error says so, and the replica can still be grown offline (closed, then opened).
    """
    try:
        run(["resize2fs", os.fspath(device)], timeout=LONG_TIMEOUT_SECONDS)
    except CommandFailed as exc:
        if "Permission denied" not in exc.stderr:
            raise
        raise CommandFailed(exc.argv, exc.returncode, exc.stderr + (
            "\nonline ext4 resizing needs CAP_SYS_RESOURCE; the replica grows offline when it "
            "is next opened")) from exc


def grow_offline(device: str | os.PathLike[str]) -> None:
    """Grow the unmounted ext4 on ``device`` to fill the device: check it, then resize.

    resize2fs refuses an unmounted filesystem that was not checked since it was last mounted,
    because resizing a damaged one can make things worse: ``e2fsck -f -p`` first (it also
    replays a journal left by a crash). A filesystem e2fsck cannot repair by itself is not
    grown and the error (e2fsck's own words) propagates.
    """
    check(device)
    run(["resize2fs", os.fspath(device)], timeout=LONG_TIMEOUT_SECONDS)


def check(device: str | os.PathLike[str]) -> None:
    """Check (and repair what is safe to repair) the unmounted ext4 on ``device``."""
    try:
        run(["e2fsck", "-f", "-p", os.fspath(device)], timeout=LONG_TIMEOUT_SECONDS)
    except CommandFailed as exc:
        if exc.returncode != _FSCK_CORRECTED:
            raise


def copy_tree(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy the directory ``src`` to ``dest``, which must be missing or an empty directory.

    ``cp --archive`` keeps owners, modes, timestamps, symlinks, hard links within the tree,
    special files and (where both sides support them) xattrs and ACLs; ``--sparse=always`` keeps
    holes as holes (a block volume's mostly empty disk image stays cheap); ``--reflink=auto``
    shares extents where the filesystem can. ``dest`` takes ``src``'s own owner, mode and
    times too, as a btrfs snapshot's root would. A copy that runs out of room raises
    ``ResourceExhausted``; whatever it wrote stays for the caller to remove.
    """
    try:
        run(["cp", "--archive", "--reflink=auto", "--sparse=always", "--no-target-directory",
             "--", os.fspath(src), os.fspath(dest)], timeout=LONG_TIMEOUT_SECONDS)
    except CommandFailed as exc:
        if "No space left on device" in exc.stderr:
            raise ResourceExhausted(
                f"no room to copy {src} to {dest}: ext4 has no copy-on-write, a copy needs "
                "as much free space as the data it copies") from exc
        raise


def error_count(mount_point: str | os.PathLike[str]) -> int:
    """How many errors the kernel recorded on the ext4 mounted at ``mount_point``.

    ext4 keeps the count in its superblock (``s_error_count``), so it survives an unmount and
    shows again at the next mount, until e2fsck clears it after a full check. Read from
    ``/sys/fs/ext4/<device>/errors_count``; 0 when the kernel does not publish it.
    """
    st = os.stat(mount_point)
    with contextlib.suppress(OSError, ValueError):
        device = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve()
        return int((Path("/sys/fs/ext4") / device.name / "errors_count").read_text())
    return 0
