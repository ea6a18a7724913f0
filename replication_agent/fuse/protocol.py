"""The Linux FUSE kernel protocol: constants and struct layouts, pure (no I/O).

Layouts follow ``include/uapi/linux/fuse.h`` (little-endian, naturally aligned, every struct
padded to 8 bytes). The header installed on Debian bookworm is protocol 7.38; the newer fields
this daemon needs (7.40: passthrough) are declared here from the upstream header:

- ``FUSE_INIT_EXT`` (1 << 30 in ``flags``) makes the kernel read ``flags2``, the upper 32 bits
  of the 64-bit capability mask; ``FUSE_PASSTHROUGH`` is 1 << 37 (0x20 in ``flags2``);
- ``fuse_init_out`` gains ``max_stack_depth`` (u32) right after ``flags2``, then
  ``request_timeout`` (u16, 7.43); the struct stays 64 bytes;
- ``fuse_open_out`` is ``{u64 fh; u32 open_flags; s32 backing_id}`` and ``FOPEN_PASSTHROUGH``
  is 1 << 7;
- ``FUSE_DEV_IOC_BACKING_OPEN`` = ``_IOW(229, 1, struct fuse_backing_map)`` = 0x4010E501 with
  ``{s32 fd; u32 flags; u64 padding}`` returns a backing id; ``FUSE_DEV_IOC_BACKING_CLOSE`` =
  ``_IOW(229, 2, u32)`` = 0x4004E502 releases it.

Every layout is a frozen dataclass with ``pack()`` and ``parse(buffer, offset=0)``; variable
parts (names, directory entries) have helpers of their own.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import ClassVar, Self

# -- versions and ids --------------------------------------------------------------------------

KERNEL_VERSION = 7
#: The highest minor version this implementation speaks (the kernel here offers 7.45).
KERNEL_MINOR_VERSION = 45
#: The first minor version with passthrough (FUSE_PASSTHROUGH, max_stack_depth, backing ids).
PASSTHROUGH_MINOR_VERSION = 40
#: Older kernels lack the structure sizes we rely on (fuse_init_in with flags2 is 7.36).
MIN_KERNEL_MINOR_VERSION = 31
ROOT_ID = 1
#: The kernel refuses to read requests into a buffer smaller than this.
MIN_READ_BUFFER = 8192


class Opcode(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52


def opcode_name(opcode: int) -> str:
    """``"WRITE"`` for 16; ``"OP_123"`` for an opcode this module does not know."""
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"OP_{opcode}"


# -- INIT capability flags (64 bits: flags | flags2 << 32) --------------------------------------

FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_CREATE_SUPP_GROUP = 1 << 34
FUSE_HAS_EXPIRE_ONLY = 1 << 35
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36
FUSE_PASSTHROUGH = 1 << 37
FUSE_NO_EXPORT_SUPPORT = 1 << 38
FUSE_HAS_RESEND = 1 << 39

#: The kernel limit on stacking (FILESYSTEM_MAX_STACK_DEPTH).
FILESYSTEM_MAX_STACK_DEPTH = 2

# -- open flags (fuse_open_out.open_flags) -----------------------------------------------------

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# -- setattr valid bits ------------------------------------------------------------------------

FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# -- misc request flags ------------------------------------------------------------------------

FUSE_GETATTR_FH = 1 << 0
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_READ_LOCKOWNER = 1 << 1
FUSE_FSYNC_FDATASYNC = 1 << 0
FUSE_OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in/fuse_create_in.open_flags

# renameat2(2) flags as FUSE_RENAME2 carries them
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# -- device ioctls -----------------------------------------------------------------------------

FUSE_DEV_IOC_MAGIC = 229
FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501  # _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)

# -- layouts -----------------------------------------------------------------------------------


class _Layout:
    """A fixed-size struct: subclasses are dataclasses whose fields match ``STRUCT`` in order."""

    STRUCT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        return self.STRUCT.pack(*(getattr(self, f.name) for f in fields(self)))  # type: ignore[arg-type]

    @classmethod
    def parse(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        """Decode from ``buffer`` at ``offset``; raises ``struct.error`` if it is too short."""
        make: Callable[..., Self] = cls
        return make(*cls.STRUCT.unpack_from(buffer, offset))


@dataclass(frozen=True, slots=True)
class InHeader(_Layout):
    """``struct fuse_in_header``: precedes every request."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQIIIHH")
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int = 0
    padding: int = 0


@dataclass(frozen=True, slots=True)
class OutHeader(_Layout):
    """``struct fuse_out_header``: precedes every reply; ``error`` is 0 or a negative errno."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IiQ")
    len: int
    error: int
    unique: int


IN_HEADER_SIZE = InHeader.STRUCT.size
OUT_HEADER_SIZE = OutHeader.STRUCT.size


@dataclass(frozen=True, slots=True)
class InitIn:
    """``struct fuse_init_in``: 16 bytes before 7.36, 64 bytes (with ``flags2``) since."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    FULL_SIZE: ClassVar[int] = 64
    major: int
    minor: int
    max_readahead: int
    flags: int
    flags2: int = 0

    @property
    def capabilities(self) -> int:
        """The 64-bit capability mask (``flags2`` counts only with ``FUSE_INIT_EXT``)."""
        high = self.flags2 if self.flags & FUSE_INIT_EXT else 0
        return self.flags | high << 32

    def pack(self) -> bytes:
        return (self.STRUCT.pack(self.major, self.minor, self.max_readahead, self.flags)
                + struct.pack("<I", self.flags2) + bytes(44))

    @classmethod
    def parse(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> InitIn:
        major, minor, readahead, flags = cls.STRUCT.unpack_from(buffer, offset)
        flags2 = 0
        if len(buffer) - offset >= cls.STRUCT.size + 4:
            (flags2,) = struct.unpack_from("<I", buffer, offset + cls.STRUCT.size)
        return cls(major, minor, readahead, flags, flags2)


@dataclass(frozen=True, slots=True)
class InitOut(_Layout):
    """``struct fuse_init_out`` (upstream 7.45 layout, 64 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIIIHHIIHHIIH22x")
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int
    max_stack_depth: int
    request_timeout: int = 0

    @classmethod
    def with_capabilities(cls, capabilities: int, **fields: int) -> InitOut:
        """Split a 64-bit capability mask into ``flags``/``flags2`` (adds ``FUSE_INIT_EXT``)."""
        flags = (capabilities & 0xFFFFFFFF) | FUSE_INIT_EXT
        return cls(flags=flags, flags2=capabilities >> 32, **fields)

    @property
    def capabilities(self) -> int:
        high = self.flags2 if self.flags & FUSE_INIT_EXT else 0
        return self.flags | high << 32


@dataclass(frozen=True, slots=True)
class Attr(_Layout):
    """``struct fuse_attr``; times are signed seconds plus nanoseconds."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQqqqIIIIIIIIII")
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Attr:
        """The attributes of a backing file as the kernel wants them."""
        asec, ansec = divmod(st.st_atime_ns, 1_000_000_000)
        msec, mnsec = divmod(st.st_mtime_ns, 1_000_000_000)
        csec, cnsec = divmod(st.st_ctime_ns, 1_000_000_000)
        return cls(
            ino=st.st_ino, size=st.st_size, blocks=st.st_blocks, atime=asec, mtime=msec,
            ctime=csec, atimensec=ansec, mtimensec=mnsec, ctimensec=cnsec, mode=st.st_mode,
            nlink=min(st.st_nlink, 0xFFFFFFFF), uid=st.st_uid, gid=st.st_gid,
            rdev=encode_dev(st.st_rdev), blksize=st.st_blksize)

    def pack(self) -> bytes:
        return self.STRUCT.pack(
            self.ino, self.size, self.blocks, self.atime, self.mtime, self.ctime,
            self.atimensec, self.mtimensec, self.ctimensec, self.mode, self.nlink, self.uid,
            self.gid, self.rdev, self.blksize, self.flags)


EMPTY_ATTR = Attr(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def split_timeout(seconds: float) -> tuple[int, int]:
    """A cache timeout as (seconds, nanoseconds); negative becomes 0."""
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, min(round((seconds - whole) * 1e9), 999_999_999)


@dataclass(frozen=True, slots=True)
class EntryOut:
    """``struct fuse_entry_out`` (128 bytes): the reply to LOOKUP, MKNOD, MKDIR, SYMLINK, LINK."""

    HEAD: ClassVar[struct.Struct] = struct.Struct("<QQQQII")
    SIZE: ClassVar[int] = 40 + 88
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr = field(default=EMPTY_ATTR)

    def pack(self) -> bytes:
        return (self.HEAD.pack(self.nodeid, self.generation, self.entry_valid, self.attr_valid,
                               self.entry_valid_nsec, self.attr_valid_nsec) + self.attr.pack())

    @classmethod
    def parse(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> EntryOut:
        nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec = (
            cls.HEAD.unpack_from(buffer, offset))
        return cls(nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec,
                   Attr.parse(buffer, offset + cls.HEAD.size))


@dataclass(frozen=True, slots=True)
class AttrOut:
    """``struct fuse_attr_out`` (104 bytes): the reply to GETATTR and SETATTR."""

    HEAD: ClassVar[struct.Struct] = struct.Struct("<QII")
    SIZE: ClassVar[int] = 16 + 88
    attr_valid: int
    attr_valid_nsec: int
    attr: Attr
    dummy: int = 0

    def pack(self) -> bytes:
        return self.HEAD.pack(self.attr_valid, self.attr_valid_nsec, self.dummy) + self.attr.pack()

    @classmethod
    def parse(cls, buffer: bytes | bytearray | memoryview, offset: int = 0) -> AttrOut:
        valid, nsec, dummy = cls.HEAD.unpack_from(buffer, offset)
        return cls(valid, nsec, Attr.parse(buffer, offset + cls.HEAD.size), dummy)


@dataclass(frozen=True, slots=True)
class OpenOut(_Layout):
    """``struct fuse_open_out``: ``backing_id`` counts only with ``FOPEN_PASSTHROUGH``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QIi")
    fh: int
    open_flags: int = 0
    backing_id: int = 0


@dataclass(frozen=True, slots=True)
class GetattrIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQ")
    getattr_flags: int
    dummy: int
    fh: int


@dataclass(frozen=True, slots=True)
class SetattrIn(_Layout):
    """``struct fuse_setattr_in`` (88 bytes); ``valid`` says which fields count (FATTR_*)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIQQQqqqIIIIIIII")
    valid: int
    padding: int
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    unused4: int
    uid: int
    gid: int
    unused5: int


@dataclass(frozen=True, slots=True)
class OpenIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    flags: int
    open_flags: int = 0


@dataclass(frozen=True, slots=True)
class CreateIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    flags: int
    mode: int
    umask: int
    open_flags: int = 0


@dataclass(frozen=True, slots=True)
class MknodIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<IIII")
    mode: int
    rdev: int
    umask: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class MkdirIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    mode: int
    umask: int


@dataclass(frozen=True, slots=True)
class RenameIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    newdir: int


@dataclass(frozen=True, slots=True)
class Rename2In(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII")
    newdir: int
    flags: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class LinkIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    oldnodeid: int


@dataclass(frozen=True, slots=True)
class ReadIn(_Layout):
    """``struct fuse_read_in``; also the argument of READDIR and READDIRPLUS."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQIIQII")
    fh: int
    offset: int
    size: int
    read_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    padding: int = 0


@dataclass(frozen=True, slots=True)
class WriteIn(_Layout):
    """``struct fuse_write_in``; the data follows it in the request."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQIIQII")
    fh: int
    offset: int
    size: int
    write_flags: int = 0
    lock_owner: int = 0
    flags: int = 0
    padding: int = 0


@dataclass(frozen=True, slots=True)
class WriteOut(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    size: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class ReleaseIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QIIQ")
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


@dataclass(frozen=True, slots=True)
class FlushIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QIIQ")
    fh: int
    unused: int
    padding: int
    lock_owner: int


@dataclass(frozen=True, slots=True)
class FsyncIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QII")
    fh: int
    fsync_flags: int
    padding: int = 0

    @property
    def datasync(self) -> bool:
        return bool(self.fsync_flags & FUSE_FSYNC_FDATASYNC)


@dataclass(frozen=True, slots=True)
class ForgetIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    nlookup: int


@dataclass(frozen=True, slots=True)
class BatchForgetIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    count: int
    dummy: int = 0


@dataclass(frozen=True, slots=True)
class ForgetOne(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQ")
    nodeid: int
    nlookup: int


def parse_batch_forget(body: bytes | bytearray | memoryview) -> list[ForgetOne]:
    """The (nodeid, nlookup) pairs of a BATCH_FORGET body (truncated input yields fewer)."""
    head = BatchForgetIn.parse(body)
    step = ForgetOne.STRUCT.size
    available = (len(body) - BatchForgetIn.STRUCT.size) // step
    return [ForgetOne.parse(body, BatchForgetIn.STRUCT.size + i * step)
            for i in range(min(head.count, available))]


def pack_batch_forget(items: Sequence[ForgetOne]) -> bytes:
    return BatchForgetIn(len(items)).pack() + b"".join(item.pack() for item in items)


@dataclass(frozen=True, slots=True)
class InterruptIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    unique: int


@dataclass(frozen=True, slots=True)
class KStatfs(_Layout):
    """``struct fuse_kstatfs`` (80 bytes), the whole of ``fuse_statfs_out``."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQQQIIII24x")
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int
    padding: int = 0

    @classmethod
    def from_statvfs(cls, st: os.statvfs_result) -> KStatfs:
        return cls(blocks=st.f_blocks, bfree=st.f_bfree, bavail=st.f_bavail, files=st.f_files,
                   ffree=st.f_ffree, bsize=st.f_bsize, namelen=st.f_namemax, frsize=st.f_frsize)


@dataclass(frozen=True, slots=True)
class SetxattrIn(_Layout):
    """The 8-byte (compat) ``fuse_setxattr_in``: we do not negotiate FUSE_SETXATTR_EXT."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class GetxattrIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    size: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class GetxattrOut(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    size: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class AccessIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<II")
    mask: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class FallocateIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQQII")
    fh: int
    offset: int
    length: int
    mode: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class LseekIn(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<QQII")
    fh: int
    offset: int
    whence: int
    padding: int = 0


@dataclass(frozen=True, slots=True)
class LseekOut(_Layout):
    STRUCT: ClassVar[struct.Struct] = struct.Struct("<Q")
    offset: int


@dataclass(frozen=True, slots=True)
class BackingMap(_Layout):
    """``struct fuse_backing_map``, the argument of FUSE_DEV_IOC_BACKING_OPEN."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<iIQ")
    fd: int
    flags: int = 0
    padding: int = 0


# -- names -------------------------------------------------------------------------------------


def split_names(body: bytes | bytearray | memoryview, count: int,
                offset: int = 0) -> list[bytes]:
    """``count`` NUL-terminated names from ``body`` at ``offset``.

    Raises ``ValueError`` if a terminator is missing: the kernel always sends one, so a missing
    one is a malformed request (answered EINVAL).
    """
    data = bytes(body[offset:])
    names: list[bytes] = []
    start = 0
    for _ in range(count):
        end = data.find(b"\0", start)
        if end < 0:
            raise ValueError("name without NUL terminator")
        names.append(data[start:end])
        start = end + 1
    return names


def pack_names(*names: bytes) -> bytes:
    return b"".join(name + b"\0" for name in names)


# -- directory entries -------------------------------------------------------------------------

DIRENT_HEAD = struct.Struct("<QQII")
DIRENT_HEAD_SIZE = DIRENT_HEAD.size  # FUSE_NAME_OFFSET (24)


def align8(n: int) -> int:
    """FUSE_REC_ALIGN: round up to a multiple of 8."""
    return (n + 7) & ~7


def dirent_size(namelen: int) -> int:
    """FUSE_DIRENT_SIZE for a name of ``namelen`` bytes."""
    return align8(DIRENT_HEAD_SIZE + namelen)


def direntplus_size(namelen: int) -> int:
    """FUSE_DIRENTPLUS_SIZE for a name of ``namelen`` bytes."""
    return align8(EntryOut.SIZE + DIRENT_HEAD_SIZE + namelen)


def mode_to_dtype(mode: int) -> int:
    """The DT_* value (``d_type``) of a file mode: the file-type bits shifted down by 12."""
    return (stat.S_IFMT(mode) >> 12) & 0xF


@dataclass(frozen=True, slots=True)
class Dirent:
    """``struct fuse_dirent``; ``off`` is the offset the next READDIR continues from."""

    ino: int
    off: int
    type: int
    name: bytes

    def pack(self) -> bytes:
        record = DIRENT_HEAD.pack(self.ino, self.off, len(self.name), self.type) + self.name
        return record + bytes(dirent_size(len(self.name)) - len(record))


def parse_dirents(buffer: bytes | bytearray | memoryview) -> list[Dirent]:
    """Decode a READDIR reply (the inverse of concatenated :meth:`Dirent.pack`)."""
    out: list[Dirent] = []
    pos = 0
    while pos + DIRENT_HEAD_SIZE <= len(buffer):
        ino, off, namelen, dtype = DIRENT_HEAD.unpack_from(buffer, pos)
        start = pos + DIRENT_HEAD_SIZE
        out.append(Dirent(ino, off, dtype, bytes(buffer[start:start + namelen])))
        pos += dirent_size(namelen)
    return out


@dataclass(frozen=True, slots=True)
class DirentPlus:
    """``struct fuse_direntplus``: an entry plus its lookup (``entry.nodeid`` 0: no lookup)."""

    entry: EntryOut
    dirent: Dirent

    def pack(self) -> bytes:
        d = self.dirent
        record = (self.entry.pack() + DIRENT_HEAD.pack(d.ino, d.off, len(d.name), d.type)
                  + d.name)
        return record + bytes(direntplus_size(len(d.name)) - len(record))


def parse_direntplus(buffer: bytes | bytearray | memoryview) -> list[DirentPlus]:
    out: list[DirentPlus] = []
    pos = 0
    head = EntryOut.SIZE + DIRENT_HEAD_SIZE
    while pos + head <= len(buffer):
        entry = EntryOut.parse(buffer, pos)
        ino, off, namelen, dtype = DIRENT_HEAD.unpack_from(buffer, pos + EntryOut.SIZE)
        start = pos + head
        out.append(DirentPlus(entry, Dirent(ino, off, dtype, bytes(buffer[start:start + namelen]))))
        pos += direntplus_size(namelen)
    return out


# -- device numbers ----------------------------------------------------------------------------


def encode_dev(dev: int) -> int:
    """A ``dev_t`` as the kernel's 32-bit ``new_encode_dev`` (fuse_attr.rdev, mknod_in.rdev)."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(value: int) -> int:
    """The inverse of :func:`encode_dev` (``new_decode_dev``), as a ``dev_t``."""
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)


# -- replies -----------------------------------------------------------------------------------


def reply_header(unique: int, error: int, payload_len: int) -> bytes:
    """The out header of a reply; ``error`` is a positive errno or 0 (it is sent negated)."""
    if error:
        return OutHeader(OUT_HEADER_SIZE, -abs(error), unique).pack()
    return OutHeader(OUT_HEADER_SIZE + payload_len, 0, unique).pack()
