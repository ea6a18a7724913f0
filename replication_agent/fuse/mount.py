"""Mounting and unmounting a FUSE filesystem without libfuse or fusermount.

A FUSE mount is ``mount(2)`` of type ``fuse`` (here ``fuse.sharedsync``: the subtype shows in
/proc/self/mountinfo and lets us recognise our own mounts) with an open ``/dev/fuse`` file
descriptor in the options. We mount with:

- ``fd=N,rootmode=40000,user_id=0,group_id=0``: the connection, the root's type, the owner;
- ``allow_other``: pods run as any uid, not only as the agent's;
- ``default_permissions``: the kernel checks permissions from the attributes we return (mode,
  uid, gid) with the caller's credentials, exactly as a local filesystem would. The daemon runs
  as root and does every backing operation as root, so without this option any user could read
  any file. It also means ACCESS requests never reach the daemon;
- ``max_read``: the largest READ request (1 MiB);
- ``MS_NOSUID | MS_NODEV`` by default: a volume is data, not a way to gain privileges.

A daemon that dies (SIGKILL, crash) leaves its mount behind: the kernel aborts the connection
when the last ``/dev/fuse`` descriptor closes, and every access then fails with ENOTCONN
("Transport endpoint is not connected") until someone unmounts it: :func:`cleanup_stale`.
A daemon that is alive but stuck can be cut off with :func:`abort_connection`.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import _syscalls
from ._syscalls import MNT_DETACH, MS_NODEV, MS_NOSUID, UMOUNT_NOFOLLOW

SUBTYPE = "sharedsync"
FSTYPE = f"fuse.{SUBTYPE}"
SOURCE = "sharedsync"
FUSE_DEVICE = "/dev/fuse"
FUSECTL_DIR = Path("/sys/fs/fuse/connections")
DEFAULT_MOUNT_FLAGS = MS_NOSUID | MS_NODEV
#: Errors a stat of a mount whose daemon is gone fails with.
STALE_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})

_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class FuseMount:
    """A FUSE mount as /proc/self/mountinfo shows it."""

    mount_id: int
    major: int
    minor: int  # the connection's number under /sys/fs/fuse/connections
    mount_point: str
    fs_type: str
    source: str
    options: frozenset[str]

    @property
    def ours(self) -> bool:
        return self.fs_type == FSTYPE


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def fuse_mounts(under: str | os.PathLike[str] | None = None) -> list[FuseMount]:
    """FUSE mounts (any subtype) in this mount namespace, at or below ``under`` if given."""
    text = os.fsdecode(Path("/proc/self/mountinfo").read_bytes())
    prefix = None if under is None else os.path.abspath(under).rstrip("/")
    found: list[FuseMount] = []
    for line in text.split("\n"):
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split(" ")
        fs_type, source = ([*right.split(" ", 2), "", ""])[:2]
        if fs_type != "fuse" and not fs_type.startswith("fuse."):
            continue
        point = _unescape(fields[4])
        if prefix is not None and point != prefix and not point.startswith(prefix + "/"):
            continue
        major, minor = (int(x) for x in fields[2].split(":"))
        found.append(FuseMount(int(fields[0]), major, minor, point, _unescape(fs_type),
                               _unescape(source), frozenset(fields[5].split(","))))
    return found


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether a FUSE filesystem is mounted exactly at ``mountpoint`` (from mountinfo)."""
    point = os.path.abspath(mountpoint).rstrip("/") or "/"
    return any(m.mount_point == point for m in fuse_mounts())


def open_device() -> int:
    """A new FUSE connection: an open ``/dev/fuse`` (close-on-exec)."""
    return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)


def mount_options(fd: int, *, rootmode: int = 0o40000, user_id: int = 0, group_id: int = 0,
                  max_read: int = 1 << 20, allow_other: bool = True,
                  default_permissions: bool = True) -> str:
    """The data string of the fuse mount(2) call."""
    options = [f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={user_id}",
               f"group_id={group_id}"]
    if allow_other:
        options.append("allow_other")
    if default_permissions:
        options.append("default_permissions")
    if max_read:
        options.append(f"max_read={max_read}")
    return ",".join(options)


def mount(fd: int, mountpoint: str | os.PathLike[str], *, rootmode: int = 0o40000,
          max_read: int = 1 << 20, allow_other: bool = True, default_permissions: bool = True,
          flags: int = DEFAULT_MOUNT_FLAGS, source: str = SOURCE,
          fstype: str = FSTYPE) -> None:
    """Mount the connection ``fd`` at ``mountpoint`` (needs CAP_SYS_ADMIN).

    The kernel sends INIT on ``fd`` right after this returns; nothing on the mount answers
    until the daemon has replied to it.
    """
    data = mount_options(fd, rootmode=rootmode, max_read=max_read, allow_other=allow_other,
                         default_permissions=default_permissions)
    _syscalls.mount(source, os.fspath(mountpoint), fstype, flags, data)


def unmount(mountpoint: str | os.PathLike[str], *, lazy_fallback: bool = True) -> None:
    """Unmount ``mountpoint``; if it is busy and ``lazy_fallback``, detach it (MNT_DETACH).

    A mount whose daemon is dead unmounts normally unless files on it are still open; the lazy
    fallback covers that case too. Raises ``OSError`` (EINVAL) if nothing is mounted there.
    """
    path = os.fspath(mountpoint)
    try:
        _syscalls.umount2(path, UMOUNT_NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.EBUSY or not lazy_fallback:
            raise
        _syscalls.umount2(path, MNT_DETACH | UMOUNT_NOFOLLOW)


def is_stale(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether ``mountpoint`` is a FUSE mount whose daemon is gone (stat fails ENOTCONN).

    Do not call this on a mount whose daemon is alive but hung: the stat would wait for it.
    """
    if not is_mounted(mountpoint):
        return False
    try:
        os.stat(mountpoint)
    except OSError as exc:
        return exc.errno in STALE_ERRNOS
    return False


def cleanup_stale(mountpoint: str | os.PathLike[str]) -> bool:
    """Unmount a FUSE mount left behind by a dead daemon; returns whether one was removed.

    A live mount is left alone.
    """
    if not is_stale(mountpoint):
        return False
    try:
        unmount(mountpoint)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: someone unmounted it meanwhile
            raise
    return True


def cleanup_stale_under(root: str | os.PathLike[str]) -> list[str]:
    """:func:`cleanup_stale` for every FUSE mount at or below ``root``; the ones removed."""
    removed: list[str] = []
    for entry in reversed(fuse_mounts(root)):
        if cleanup_stale(entry.mount_point):
            removed.append(entry.mount_point)
    return removed


def _ensure_fusectl() -> None:
    if FUSECTL_DIR.is_dir() and any(FUSECTL_DIR.iterdir()):
        return
    try:
        _syscalls.mount("fusectl", str(FUSECTL_DIR), "fusectl", 0, "")
    except OSError as exc:
        if exc.errno != errno.EBUSY:  # EBUSY: already mounted (and no connection yet)
            raise


def abort_connection(mountpoint: str | os.PathLike[str]) -> bool:
    """Abort the FUSE connection behind ``mountpoint`` (fusectl ``abort``), without a stat.

    Every pending and future request then fails (ENOTCONN) and the daemon's reads end with
    ENODEV; the mount itself stays until unmounted. Returns False if no FUSE mount is there.
    """
    point = os.path.abspath(mountpoint).rstrip("/") or "/"
    entries = [m for m in fuse_mounts() if m.mount_point == point]
    if not entries:
        return False
    _ensure_fusectl()
    (FUSECTL_DIR / str(entries[-1].minor) / "abort").write_text("1")
    return True
