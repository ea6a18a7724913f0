"""System calls the standard library lacks, through ctypes (Linux, glibc).

Each wrapper raises ``OSError`` with the C ``errno`` on failure, like the ``os`` module does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct

from .protocol import FUSE_DEV_IOC_BACKING_CLOSE, FUSE_DEV_IOC_BACKING_OPEN, BackingMap

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

# mount(2) flags
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
# umount2(2) flags
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_SYS_RENAMEAT2 = 316  # x86_64; used only when glibc lacks the wrapper


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


_mount = _libc.mount
_mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                   ctypes.c_char_p)
_mount.restype = ctypes.c_int
_umount2 = _libc.umount2
_umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_umount2.restype = ctypes.c_int
_utimensat = _libc.utimensat
_utimensat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int)
_utimensat.restype = ctypes.c_int
_futimens = _libc.futimens
_futimens.argtypes = (ctypes.c_int, ctypes.POINTER(_Timespec))
_futimens.restype = ctypes.c_int
_fallocate = _libc.fallocate64
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint)
    _renameat2.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _check(result: int, *paths: str | bytes) -> None:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), *[os.fsdecode(p) for p in paths[:1]])


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    _check(_mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                  os.fsencode(data)), target)


def umount2(target: str, flags: int = 0) -> None:
    _check(_umount2(os.fsencode(target), flags), target)


def renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2) on two paths (AT_FDCWD-relative)."""
    a, b = os.fsencode(src), os.fsencode(dst)
    if _renameat2 is not None:
        result = int(_renameat2(AT_FDCWD, a, AT_FDCWD, b, flags))
    else:  # pragma: no cover - glibc >= 2.28 has the wrapper
        result = int(_syscall(ctypes.c_long(_SYS_RENAMEAT2), ctypes.c_int(AT_FDCWD), a,
                              ctypes.c_int(AT_FDCWD), b, ctypes.c_uint(flags)))
    _check(result, src)


def _times(atime: tuple[int, int] | None, mtime: tuple[int, int] | None,
           atime_now: bool, mtime_now: bool) -> ctypes.Array[_Timespec]:
    def one(value: tuple[int, int] | None, now: bool) -> _Timespec:
        if now:
            return _Timespec(0, UTIME_NOW)
        if value is None:
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(value[0], value[1])

    return (_Timespec * 2)(one(atime, atime_now), one(mtime, mtime_now))


def utimens(path: str | None, fd: int | None, *, atime: tuple[int, int] | None = None,
            mtime: tuple[int, int] | None = None, atime_now: bool = False,
            mtime_now: bool = False) -> None:
    """Set (seconds, nanoseconds) times; a time left ``None`` (and not ``*_now``) is omitted.

    With ``fd`` the open file is changed (futimens); otherwise ``path``, never following a
    final symlink.
    """
    times = _times(atime, mtime, atime_now, mtime_now)
    if fd is not None:
        _check(_futimens(fd, times))
    else:
        assert path is not None
        _check(_utimensat(AT_FDCWD, os.fsencode(path), times, AT_SYMLINK_NOFOLLOW), path)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_fallocate(fd, mode, offset, length))


def backing_open(fuse_fd: int, fd: int) -> int:
    """FUSE_DEV_IOC_BACKING_OPEN: register ``fd`` for passthrough; returns the backing id."""
    buf = bytearray(BackingMap(fd).pack())
    backing_id = int(fcntl.ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_OPEN, buf, True))
    if backing_id <= 0:  # pragma: no cover - the ioctl raises on failure
        raise OSError(errno.EIO, f"FUSE_DEV_IOC_BACKING_OPEN returned {backing_id}")
    return backing_id


def backing_close(fuse_fd: int, backing_id: int) -> None:
    """FUSE_DEV_IOC_BACKING_CLOSE: drop a backing id (open files keep their backing file)."""
    buf = bytearray(struct.pack("<I", backing_id))
    fcntl.ioctl(fuse_fd, FUSE_DEV_IOC_BACKING_CLOSE, buf, True)
