"""The Synchronous-mode data path: a FUSE daemon in pure Python over a backing directory.

:class:`FuseServer` speaks the kernel FUSE protocol itself on ``/dev/fuse`` (no libfuse) and
serves a backing directory (the replica's live btrfs subvolume) at a mountpoint.

Two write paths
---------------
- **Passthrough** (``passthrough=True``, the default, when the kernel offers it): every opened
  regular file is registered with ``FUSE_DEV_IOC_BACKING_OPEN`` (one backing id per inode,
  shared by all its opens and closed when the last one is released) and opened with
  ``FOPEN_PASSTHROUGH``. READ and WRITE then never reach the daemon: the kernel reads and writes
  the backing file at native speed, and the daemon does not see the written bytes or ranges.
  The replication layer finds the changes another way (the btrfs increment since the last
  acknowledged snapshot). Opens with ``O_SYNC``/``O_DSYNC`` are the exception: passthrough
  would sync them to the local disk only, so they are served as direct I/O by the daemon, which
  commits every such write before answering it (see below).
- **Python write path** (``passthrough=False``, or a kernel without passthrough): READ and WRITE
  are served here with ``pread``/``pwrite`` on the backing file, and every write is reported
  to ``hooks.on_write(path, offset, length)`` before it is answered, so that the replication
  layer can stream dirty ranges as they happen. Punched or zeroed ranges (FALLOCATE) are
  reported the same way (in both modes); size changes (truncate, ``O_TRUNC``) are not: the
  replication layer reads the size of every committed path.

Durability (the point of Synchronous mode)
------------------------------------------
FSYNC (``fsync`` and ``fdatasync``), FSYNCDIR, and FLUSH (``close``) of a handle that may have
written (with passthrough: any handle opened for writing, since its writes are invisible to
us; otherwise: a handle that wrote, truncated or fallocated since its last commit) are answered
only after (1) the daemon has fsynced its own backing descriptor (the kernel does not sync the
backing file for us) and (2) ``hooks.commit(paths, datasync)`` has returned, i.e. the change is
durable on enough replicas. If the backing fsync fails its errno is returned; if ``commit``
raises, the caller gets EIO (EROFS when it raised that: a fenced replica): the application
learns that its data is not safe.

Group commit: one reader thread reads requests and hands FSYNC/FLUSH straight to a single
commit worker, which starts the fsyncs of the backing descriptors on the worker pool (in
parallel when several are waiting), calls ``hooks.commit`` while they run, and answers once
both are done. Requests that arrive while a commit is in progress
are batched into the next ``hooks.commit`` call, which answers all of them (``datasync`` is True
only if every request in the batch asked for it). Everything else is served by a small worker
pool and never waits behind a slow commit; an uncontended fsync costs one thread handoff. The
kernel serialises fsyncs of one inode (it holds the inode lock), so batching happens across
files.

What ``mmap`` users get
-----------------------
With passthrough, stores into a shared mapping go straight to the backing file's page cache
and ``msync(MS_SYNC)`` sends nothing to the daemon (no FSYNC): such writes are replicated only
at the next fsync/close of some descriptor of the file that reaches us, or at the replication
layer's next periodic commit. Without passthrough, the kernel writes dirty pages back with WRITE
requests (reported to ``on_write``) and ``msync(MS_SYNC)`` does send FSYNC. Likewise
``pwritev2(..., RWF_DSYNC)`` on a passthrough file syncs only the local disk.

Extended attributes
-------------------
GETXATTR/SETXATTR/LISTXATTR/REMOVEXATTR pass through to the backing file. The kernel asks
GETXATTR("security.capability") before every write to a file, passthrough or not (to drop file
capabilities); the daemon remembers per inode that the attribute is absent and answers that
from the reader thread, so a write costs one short round trip. ``xattrs=False`` answers ENOSYS
to all four instead: the kernel then stops asking and passthrough writes cost nothing, but
applications get EOPNOTSUPP for extended attributes. A capability set on the backing file
behind the daemon's back is not seen until the inode is forgotten.

Setuid and setgid bits are cleared by the kernel (with the writer's credentials) on write and
truncate, and by the daemon on an O_TRUNC open by a non-root caller, as on a local filesystem.

Never touch the mountpoint from ``hooks``: the kernel holds the inode lock of a file while its
fsync is in ``commit``. Never page-fault on the mount (mmap) from the daemon's own process: a
fault is taken with the GIL held, and the daemon's threads need it to answer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import queue
import select
import stat
import struct
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from . import _syscalls
from . import mount as fmount
from .protocol import (
    EMPTY_ATTR,
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_KILL_SUIDGID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_MTIME_NOW,
    FATTR_SIZE,
    FATTR_UID,
    FOPEN_DIRECT_IO,
    FOPEN_PASSTHROUGH,
    FUSE_ASYNC_DIO,
    FUSE_ASYNC_READ,
    FUSE_ATOMIC_O_TRUNC,
    FUSE_AUTO_INVAL_DATA,
    FUSE_BIG_WRITES,
    FUSE_DO_READDIRPLUS,
    FUSE_GETATTR_FH,
    FUSE_MAX_PAGES,
    FUSE_OPEN_KILL_SUIDGID,
    FUSE_PARALLEL_DIROPS,
    FUSE_PASSTHROUGH,
    FUSE_READDIRPLUS_AUTO,
    FUSE_WRITE_KILL_SUIDGID,
    IN_HEADER_SIZE,
    KERNEL_MINOR_VERSION,
    KERNEL_VERSION,
    MIN_KERNEL_MINOR_VERSION,
    PASSTHROUGH_MINOR_VERSION,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_ID,
    AccessIn,
    Attr,
    AttrOut,
    CreateIn,
    Dirent,
    DirentPlus,
    EntryOut,
    FallocateIn,
    FlushIn,
    ForgetIn,
    FsyncIn,
    GetattrIn,
    GetxattrIn,
    GetxattrOut,
    InHeader,
    InitIn,
    InitOut,
    KStatfs,
    LinkIn,
    MkdirIn,
    MknodIn,
    Opcode,
    OpenIn,
    OpenOut,
    ReadIn,
    ReleaseIn,
    Rename2In,
    RenameIn,
    SetattrIn,
    SetxattrIn,
    WriteIn,
    WriteOut,
    decode_dev,
    dirent_size,
    direntplus_size,
    mode_to_dtype,
    opcode_name,
    parse_batch_forget,
    reply_header,
    split_names,
    split_timeout,
)

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_WRITE = MiB
#: Request buffers hold a header and a max_write payload (libfuse uses the same 4 KiB margin).
BUFFER_MARGIN = 4096
INIT_TIMEOUT = 10.0
JOIN_TIMEOUT = 30.0
_DT_DIR = 4
_SYNC_FLAGS = os.O_SYNC | os.O_DSYNC
#: Open flags the backing descriptor never gets: creation is done by us; O_APPEND would make
#: pwrite ignore its offset (the kernel computes append offsets); O_DIRECT needs aligned buffers.
_STRIP_FLAGS = (os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_ASYNC
                | os.O_NONBLOCK)
#: Served by the reader thread itself (no I/O; see _dispatch).
_READER_OPS = frozenset({Opcode.INIT, Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT,
                         Opcode.FSYNC, Opcode.FLUSH})
_CAPS_NAME = "security.capability"
_CAPS_NAME_Z = _CAPS_NAME.encode() + b"\0"
#: Requests that change the namespace or metadata rather than file data (an O_TRUNC open too):
#: see :attr:`FuseServer.mutations`.
_MUTATING_OPS = frozenset({Opcode.SETATTR, Opcode.SYMLINK, Opcode.MKNOD, Opcode.MKDIR,
                           Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2,
                           Opcode.LINK, Opcode.CREATE, Opcode.FALLOCATE, Opcode.SETXATTR,
                           Opcode.REMOVEXATTR})
_XATTR_OPS = frozenset({Opcode.GETXATTR, Opcode.SETXATTR, Opcode.LISTXATTR,
                        Opcode.REMOVEXATTR})
_CONTENT_FALLOCATE = _syscalls.FALLOC_FL_PUNCH_HOLE | _syscalls.FALLOC_FL_ZERO_RANGE
#: Reply write errors that only mean the request is gone (interrupted, connection closed).
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.EBADF, errno.ECONNABORTED, errno.ENOTCONN})


class SyncHooks(Protocol):
    """What the replication layer provides to the data path."""

    def commit(self, paths: list[str], datasync: bool) -> None:
        """Return once every change to ``paths`` (relative to the backing root, ``""`` for the
        root itself) is durable on enough replicas; raise if that cannot be achieved.

        ``datasync`` is True when every waiting caller asked only for fdatasync. Called from
        one thread at a time, while the daemon fsyncs the local files (the callers are
        answered once both are done).
        """
        ...

    def on_write(self, path: str, offset: int, length: int) -> None:
        """The Python write path wrote ``length`` bytes at ``offset`` of ``path`` (already in
        the backing file's page cache). Raising makes the write fail with EIO."""
        ...


class NullHooks:
    """Hooks that acknowledge at once (tests, benchmarks, a volume with one replica)."""

    def commit(self, paths: list[str], datasync: bool) -> None:
        return None

    def on_write(self, path: str, offset: int, length: int) -> None:
        return None


@dataclass(eq=False)
class _Node:
    """One inode the kernel knows (it holds ``nlookup`` references to ``nodeid``)."""

    nodeid: int
    generation: int
    key: tuple[int, int]  # (st_dev, st_ino) of the backing inode
    kind: int  # S_IFMT bits
    #: Known names, (parent, name), the most recent last; a directory has one.
    links: list[tuple[_Node, str]] = field(default_factory=list)
    nlookup: int = 0
    last_path: str = ""  # the path before the last name went away (unlinked but open)
    handles: set[int] = field(default_factory=set)  # open file handles
    backing_id: int = 0  # passthrough registration shared by all opens
    passthrough_opens: int = 0
    #: We saw that the backing file has no security.capability (the kernel asks before every
    #: write); cleared when we set or remove that attribute.
    no_caps: bool = False


@dataclass(eq=False)
class _FileHandle:
    fh: int
    node: _Node
    fd: int
    writable: bool
    passthrough: bool
    sync_writes: bool  # O_SYNC/O_DSYNC served as direct I/O, committed on every write
    datasync_writes: bool  # O_DSYNC without O_SYNC
    dirty: bool = False


@dataclass(eq=False)
class _DirHandle:
    fh: int
    node: _Node
    entries: list[tuple[bytes, int, int]] | None = None  # (name, ino, d_type)


@dataclass(eq=False)
class _Pending:
    """A request that is answered when the next group commit returns."""

    unique: int
    path: str
    datasync: bool
    handle: _FileHandle | None
    payload: bytes = b""
    fd: int = -1  # a backing descriptor the commit worker fsyncs first (-1: none)


Handler = Callable[[InHeader, memoryview], None]


def _errno_of(exc: OSError) -> int:
    return exc.errno if exc.errno else errno.EIO


class FuseServer:
    """Serve ``backing`` at ``mountpoint`` until :meth:`stop`.

    ``hooks`` gates fsync/fdatasync/close-after-write on the replication layer (see the module
    docstring). ``passthrough`` asks for kernel passthrough of READ/WRITE; whether the kernel
    granted it is :attr:`passthrough_active` after :meth:`start`.
    """

    def __init__(self, backing: Path, mountpoint: Path, hooks: SyncHooks, *,
                 passthrough: bool = True, workers: int = 4, entry_timeout: float = 1.0,
                 attr_timeout: float = 1.0, max_write: int = DEFAULT_MAX_WRITE,
                 readdirplus: bool = True, xattrs: bool = True) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.hooks = hooks
        self.passthrough_requested = passthrough
        self._workers_wanted = workers
        self._entry_valid = split_timeout(entry_timeout)
        self._attr_valid = split_timeout(attr_timeout)
        self._max_write = max(4096, min(max_write, 256 * 4096))
        self._readdirplus = readdirplus
        self._xattrs = xattrs
        self._root = ""

        self._lock = threading.Lock()  # the inode and handle tables
        self._nodes: dict[int, _Node] = {}
        self._by_key: dict[tuple[int, int], _Node] = {}
        self._names: dict[tuple[int, str], _Node] = {}
        self._next_nodeid = ROOT_ID + 1
        self._generation = 1
        self._files: dict[int, _FileHandle] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1

        self._stats_lock = threading.Lock()
        self._mutations = 0
        self._counters: Counter[str] = Counter()

        self._commit_q: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._commit_busy = False

        self._fd = -1
        self._wake_r = -1
        self._wake_w = -1
        self._mounted = False
        self._started = False
        self._stopped = False
        self._reader_failed = False
        self._initialized = threading.Event()
        self._init_error: str | None = None
        self._passthrough_active = False
        self._minor = 0
        self._buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._op_counts: Counter[int] = Counter()  # written by the reader thread only
        self._threads: list[threading.Thread] = []
        self._reader: threading.Thread | None = None
        self._committer: threading.Thread | None = None
        self._handlers: dict[int, Handler] = self._handler_table()

    # -- public ----------------------------------------------------------------------------

    @property
    def passthrough_active(self) -> bool:
        """Whether the kernel accepted passthrough (known once :meth:`start` returned)."""
        return self._passthrough_active

    @property
    def protocol_minor(self) -> int:
        """The negotiated protocol minor version (7.x)."""
        return self._minor

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters: requests per opcode name (``"WRITE"``, ``"FSYNC"``, ...),
        ``commit_calls``, ``commit_requests`` (requests answered by them), ``commit_errors``,
        ``passthrough_opens``, ``backing_ids_opened``, ``backing_ids_closed``."""
        ops = {opcode_name(op): n for op, n in list(self._op_counts.items())}
        with self._stats_lock:
            return {**ops, **self._counters}

    @property
    def mutations(self) -> int:
        """Counts every request that changes more than file data (see ``_MUTATING_OPS``),
        twice: when it starts and when it is done. So if this reads the same before taking a
        snapshot and later, nothing but file data changed in between and none was in flight:
        the fsync journal (``replication_agent.journal``) relies on it to ship only data."""
        with self._stats_lock:
            return self._mutations

    def _bump_mutations(self) -> None:
        with self._stats_lock:
            self._mutations += 1

    def pending_commits(self) -> int:
        """Requests waiting for the next group commit (not counting one in progress)."""
        return self._commit_q.qsize()

    def commit_in_progress(self) -> bool:
        return self._commit_busy

    def open_handles(self) -> int:
        with self._lock:
            return len(self._files) + len(self._dirs)

    def writing(self, rel: str) -> bool:
        """Whether the file at ``rel`` (relative to the backing root) is open for writing
        through this mount: replacing it now would send the writer's next writes to a file
        that is no longer there."""
        with self._lock:
            return any(handle.writable and self._rel_locked(handle.node) == rel
                       for handle in self._files.values())

    def known_nodes(self) -> int:
        """Inodes the kernel holds references to (the root included)."""
        with self._lock:
            return len(self._nodes)

    def start(self) -> None:
        """Mount and serve in background threads; returns once INIT has been answered."""
        if self._started:
            raise RuntimeError("a FuseServer starts once")
        self._started = True
        if not self.mountpoint.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "mountpoint is not a directory",
                                     str(self.mountpoint))
        root_st = self._prepare()
        try:
            self._fd = fmount.open_device()
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            for _ in range(self._workers_wanted + 2):
                self._buffers.put(bytearray(self._max_write + BUFFER_MARGIN))
            for i in range(self._workers_wanted):
                self._spawn(self._worker_loop, f"fuse-worker-{i}")
            self._committer = self._spawn(self._commit_loop, "fuse-commit")
            fmount.mount(self._fd, self.mountpoint, rootmode=stat.S_IFMT(root_st.st_mode),
                         max_read=self._max_write)
            self._mounted = True
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
            self._reader = self._spawn(self._reader_loop, "fuse-reader")
            if not self._initialized.wait(INIT_TIMEOUT):
                raise TimeoutError(f"the kernel did not send INIT within {INIT_TIMEOUT} s")
            if self._init_error is not None:
                raise OSError(errno.EPROTO, self._init_error)
        except BaseException:
            self.stop()
            raise
        log.info("fuse: serving %s at %s (protocol 7.%d, passthrough %s)", self._root,
                 self.mountpoint, self._minor, "on" if self._passthrough_active else "off")

    def stop(self) -> None:
        """Unmount, stop every thread, close every descriptor. Idempotent.

        Waits for a commit in progress (bounded by JOIN_TIMEOUT; if ``hooks.commit`` is still
        blocked after that, the device descriptor is left open rather than risk a late reply
        landing on a reused descriptor number).
        """
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        if self._mounted:
            self._unmount()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._reader is not None:
            self._reader.join(JOIN_TIMEOUT)
        # The commit worker first: its last batch may still hand fsyncs to the pool.
        self._commit_q.put(None)
        if self._committer is not None:
            self._committer.join(JOIN_TIMEOUT)
        for _ in range(self._workers_wanted):
            self._work.put(None)
        stuck = False
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():
                stuck = True
                log.error("fuse: thread %s did not stop", thread.name)
        with self._lock:
            handles = [h.fd for h in self._files.values()]
            self._files.clear()
            self._dirs.clear()
            self._nodes.clear()
            self._by_key.clear()
            self._names.clear()
        for fd in handles:
            self._close_quietly(fd)
        if not stuck:
            for attr in ("_fd", "_wake_r", "_wake_w"):
                fd = getattr(self, attr)
                if fd >= 0:
                    self._close_quietly(fd)
                    setattr(self, attr, -1)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- lifecycle helpers -----------------------------------------------------------------

    def _prepare(self) -> os.stat_result:
        """Resolve the backing root and seed the inode table with it (no mount, no threads)."""
        root_st = os.stat(self.backing)
        if not stat.S_ISDIR(root_st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "backing is not a directory",
                                     str(self.backing))
        self._root = os.fsdecode(os.path.realpath(self.backing))
        root = _Node(ROOT_ID, 0, (root_st.st_dev, root_st.st_ino), stat.S_IFDIR, nlookup=1)
        self._nodes[ROOT_ID] = root
        self._by_key[root.key] = root
        return root_st

    def _spawn(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    def _unmount(self) -> None:
        self._mounted = False
        try:
            fmount.unmount(self.mountpoint, lazy_fallback=False)
            return
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not mounted any more
                return
            if exc.errno != errno.EBUSY:
                log.error("fuse: unmount %s: %s", self.mountpoint, exc)
                return
        # Busy (files open on it): cut the connection off so that the reader ends, then detach.
        try:
            fmount.abort_connection(self.mountpoint)
        except OSError as exc:
            log.warning("fuse: abort connection of %s: %s", self.mountpoint, exc)
        try:
            fmount.unmount(self.mountpoint)
        except OSError as exc:
            log.error("fuse: lazy unmount %s: %s", self.mountpoint, exc)

    @staticmethod
    def _close_quietly(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counters[name] += n

    # -- request loop ----------------------------------------------------------------------

    def _reader_loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            buf = self._buffers.get()
            try:
                size = self._read_request(poller, buf)
            except Exception:
                log.exception("fuse: reader failed")
                self._reader_failed = True
                size = None
            if size is None:
                self._buffers.put(buf)
                self._initialized.set()
                if not self._stopped and self._reader_failed:
                    # Nobody will answer requests any more: make them fail (ENOTCONN) rather
                    # than hang every process that touches the mount.
                    try:
                        fmount.abort_connection(self.mountpoint)
                    except OSError as exc:
                        log.error("fuse: abort after reader failure: %s", exc)
                return
            try:
                self._dispatch(buf, size)
            except Exception:
                log.exception("fuse: dispatch failed")
                self._buffers.put(buf)

    def _read_request(self, poller: select.poll, buf: bytearray) -> int | None:
        """Read one request into ``buf``; None when the connection or the server ends."""
        while True:
            events = poller.poll()
            if any(fd == self._wake_r for fd, _ in events):
                return None
            try:
                return os.readv(self._fd, [buf])
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:  # the request vanished (interrupted)
                    continue
                if exc.errno != errno.ENODEV:  # ENODEV: unmounted or aborted
                    log.error("fuse: read from /dev/fuse: %s", exc)
                    self._reader_failed = True
                return None

    def _dispatch(self, buf: bytearray, size: int) -> None:
        view = memoryview(buf)[:size]
        header = InHeader.parse(view)
        end = min(size, header.len) - header.total_extlen * 8
        body = view[IN_HEADER_SIZE:max(IN_HEADER_SIZE, end)]
        op = header.opcode
        self._op_counts[op] += 1
        if op == Opcode.GETXATTR and self._cached_no_caps(header, body):
            self._buffers.put(buf)
            return
        if op in _READER_OPS:
            # No I/O in these: INIT, forgets, and FSYNC/FLUSH, which only pick the backing
            # descriptor and queue for the commit worker (one thread handoff per fsync).
            try:
                self._serve(header, body)
            finally:
                self._buffers.put(buf)
            return
        self._work.put(functools.partial(self._serve_and_release, header, body, buf))

    def _cached_no_caps(self, header: InHeader, body: memoryview) -> bool:
        """Answer GETXATTR("security.capability") from the cache when we know it is absent.

        The kernel asks before every write to the file (to drop capabilities), passthrough or
        not, so this is on the write path; answering from the reader saves a thread handoff.
        """
        if bytes(body[GetxattrIn.STRUCT.size:]) != _CAPS_NAME_Z:
            return False
        with self._lock:
            node = self._nodes.get(header.nodeid)
            cached = node is not None and node.no_caps
        if cached:
            self._reply_error(header.unique, errno.ENODATA)
            self._count("xattr_cache_hits")
        return cached

    def _serve_and_release(self, header: InHeader, body: memoryview, buf: bytearray) -> None:
        try:
            self._serve(header, body)
        finally:
            self._buffers.put(buf)

    def _worker_loop(self) -> None:
        while True:
            job = self._work.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # _serve answers every error itself; this is a last resort
                log.exception("fuse: worker job failed")

    def _serve(self, header: InHeader, body: memoryview) -> None:
        handler = self._handlers.get(header.opcode)
        if handler is None or (not self._xattrs and header.opcode in _XATTR_OPS):
            self._reply_error(header.unique, errno.ENOSYS)
            return
        mutating = header.opcode in _MUTATING_OPS or (
            header.opcode == Opcode.OPEN and len(body) >= OpenIn.STRUCT.size
            and bool(OpenIn.parse(body).flags & os.O_TRUNC))
        if mutating:
            self._bump_mutations()
        try:
            handler(header, body)
        except OSError as exc:
            self._reply_error(header.unique, _errno_of(exc))
        except (struct.error, ValueError, UnicodeError):
            log.warning("fuse: malformed %s request", opcode_name(header.opcode))
            self._reply_error(header.unique, errno.EINVAL)
        except Exception:
            log.exception("fuse: %s failed", opcode_name(header.opcode))
            self._reply_error(header.unique, errno.EIO)
        finally:
            if mutating:
                self._bump_mutations()

    def _reply(self, unique: int, *parts: bytes | memoryview) -> bool:
        """Send a successful reply (one write); False if the kernel no longer wants it."""
        length = sum(len(p) for p in parts)
        try:
            os.writev(self._fd, [reply_header(unique, 0, length), *parts])
        except OSError as exc:
            if exc.errno not in _GONE:
                log.warning("fuse: reply to %d: %s", unique, exc)
            return False
        return True

    def _reply_error(self, unique: int, error: int) -> None:
        try:
            os.write(self._fd, reply_header(unique, error, 0))
        except OSError as exc:
            if exc.errno not in _GONE:
                log.warning("fuse: error reply to %d: %s", unique, exc)

    def _handler_table(self) -> dict[int, Handler]:
        return {
            Opcode.INIT: self._op_init,
            Opcode.DESTROY: self._op_destroy,
            Opcode.LOOKUP: self._op_lookup,
            Opcode.FORGET: self._op_forget,
            Opcode.BATCH_FORGET: self._op_batch_forget,
            Opcode.INTERRUPT: self._op_interrupt,
            Opcode.GETATTR: self._op_getattr,
            Opcode.SETATTR: self._op_setattr,
            Opcode.READLINK: self._op_readlink,
            Opcode.SYMLINK: self._op_symlink,
            Opcode.MKNOD: self._op_mknod,
            Opcode.MKDIR: self._op_mkdir,
            Opcode.UNLINK: self._op_unlink,
            Opcode.RMDIR: self._op_rmdir,
            Opcode.RENAME: self._op_rename,
            Opcode.RENAME2: self._op_rename2,
            Opcode.LINK: self._op_link,
            Opcode.OPEN: self._op_open,
            Opcode.CREATE: self._op_create,
            Opcode.READ: self._op_read,
            Opcode.WRITE: self._op_write,
            Opcode.FLUSH: self._op_flush,
            Opcode.RELEASE: self._op_release,
            Opcode.FSYNC: self._op_fsync,
            Opcode.OPENDIR: self._op_opendir,
            Opcode.READDIR: self._op_readdir,
            Opcode.READDIRPLUS: self._op_readdirplus,
            Opcode.RELEASEDIR: self._op_releasedir,
            Opcode.FSYNCDIR: self._op_fsyncdir,
            Opcode.STATFS: self._op_statfs,
            Opcode.ACCESS: self._op_access,
            Opcode.FALLOCATE: self._op_fallocate,
            Opcode.GETXATTR: self._op_getxattr,
            Opcode.SETXATTR: self._op_setxattr,
            Opcode.LISTXATTR: self._op_listxattr,
            Opcode.REMOVEXATTR: self._op_removexattr,
            Opcode.IOCTL: self._op_ioctl,
        }

    # -- inode table -----------------------------------------------------------------------

    def _node(self, nodeid: int) -> _Node:
        with self._lock:
            node = self._nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, "unknown node id")
        return node

    def _rel_locked(self, node: _Node) -> str | None:
        parts: list[str] = []
        current = node
        while current.nodeid != ROOT_ID:
            if not current.links or len(parts) > 4096:
                return None
            parent, name = current.links[-1]
            parts.append(name)
            current = parent
        return "/".join(reversed(parts))

    def _rel(self, node: _Node) -> str | None:
        with self._lock:
            return self._rel_locked(node)

    def _abs(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def _path(self, node: _Node) -> str:
        """The backing path of ``node``; ENOENT if it has no known name (unlinked)."""
        rel = self._rel(node)
        if rel is None:
            raise OSError(errno.ENOENT, "node has no name")
        return self._abs(rel)

    def _hook_path(self, node: _Node) -> str:
        with self._lock:
            rel = self._rel_locked(node)
        return node.last_path if rel is None else rel

    @staticmethod
    def _check_name(raw: bytes) -> str:
        if not raw or b"/" in raw or raw in (b".", b".."):
            raise OSError(errno.EINVAL, "bad name")
        return os.fsdecode(raw)

    def _child(self, parent: _Node, raw: bytes) -> tuple[str, str]:
        """(name, backing path) of entry ``raw`` in directory ``parent``."""
        name = self._check_name(raw)
        return name, os.path.join(self._path(parent), name)

    def _any_fd_locked(self, node: _Node) -> int | None:
        for fh in node.handles:
            handle = self._files.get(fh)
            if handle is not None:
                return handle.fd
        return None

    def _target(self, node: _Node, fh: int | None = None) -> tuple[str | None, int | None]:
        """Where to operate on ``node``: (path, None), or (None, fd) for an open handle's
        descriptor when ``fh`` is given or the node has no name any more."""
        with self._lock:
            if fh is not None and fh in self._files:
                return None, self._files[fh].fd
            rel = self._rel_locked(node)
            if rel is not None:
                return self._abs(rel), None
            fd = self._any_fd_locked(node)
        if fd is None:
            raise OSError(errno.ENOENT, "node has no name")
        return None, fd

    def _stat(self, node: _Node, fh: int | None = None) -> os.stat_result:
        path, fd = self._target(node, fh)
        if fd is not None:
            return os.fstat(fd)
        assert path is not None
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != node.key:
            # The name now belongs to another file (changed behind our back): use an open
            # descriptor if there is one.
            with self._lock:
                fd = self._any_fd_locked(node)
            if fd is None:
                raise OSError(errno.ESTALE, "stale node")
            return os.fstat(fd)
        return st

    def _link_locked(self, node: _Node, parent: _Node, name: str) -> None:
        key = (parent.nodeid, name)
        previous = self._names.get(key)
        if previous is not None and previous is not node:
            self._unlink_name_locked(previous, parent, name)
        if node.kind == stat.S_IFDIR:
            for old_parent, old_name in node.links:
                if self._names.get((old_parent.nodeid, old_name)) is node:
                    del self._names[(old_parent.nodeid, old_name)]
            node.links = []
        else:
            node.links = [(p, n) for p, n in node.links if not (p is parent and n == name)]
        node.links.append((parent, name))
        self._names[key] = node

    def _unlink_name_locked(self, node: _Node, parent: _Node, name: str) -> None:
        rel = self._rel_locked(node)
        if rel is not None:
            node.last_path = rel
        node.links = [(p, n) for p, n in node.links if not (p is parent and n == name)]
        key = (parent.nodeid, name)
        if self._names.get(key) is node:
            del self._names[key]

    def _orphan_locked(self, node: _Node) -> None:
        """The backing inode is gone: its (dev, ino) may be reused by a new file."""
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        for parent, name in list(node.links):
            self._unlink_name_locked(node, parent, name)

    def _remember_locked(self, parent: _Node, name: str, st: os.stat_result) -> _Node:
        key = (st.st_dev, st.st_ino)
        kind = stat.S_IFMT(st.st_mode)
        node = self._by_key.get(key)
        if node is not None and node.kind != kind:
            self._orphan_locked(node)  # inode number reused for a file of another type
            node = None
        if node is None:
            node = _Node(self._next_nodeid, self._generation, key, kind)
            self._next_nodeid += 1
            self._nodes[node.nodeid] = node
            self._by_key[key] = node
        self._link_locked(node, parent, name)
        return node

    def _entry(self, parent: _Node, name: str, st: os.stat_result) -> tuple[_Node, EntryOut]:
        """Record a lookup of ``name`` in ``parent`` (one more kernel reference)."""
        with self._lock:
            node = self._remember_locked(parent, name, st)
            node.nlookup += 1
        return node, self._entry_out(node, st)

    def _entry_out(self, node: _Node, st: os.stat_result) -> EntryOut:
        return EntryOut(node.nodeid, node.generation, self._entry_valid[0], self._attr_valid[0],
                        self._entry_valid[1], self._attr_valid[1], Attr.from_stat(st))

    def _forget(self, nodeid: int, count: int) -> None:
        if nodeid == ROOT_ID:
            return
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is None:
                return
            node.nlookup -= count
            if node.nlookup > 0:
                return
            del self._nodes[nodeid]
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]
            for parent, name in node.links:
                if self._names.get((parent.nodeid, name)) is node:
                    del self._names[(parent.nodeid, name)]

    def _reply_entry(self, unique: int, node: _Node, entry: EntryOut,
                     extra: bytes = b"") -> bool:
        if self._reply(unique, entry.pack(), extra):
            return True
        self._forget(node.nodeid, 1)  # the kernel never saw this reference
        return False

    def _attr_out(self, st: os.stat_result) -> bytes:
        return AttrOut(self._attr_valid[0], self._attr_valid[1], Attr.from_stat(st)).pack()

    # -- new files: ownership and mode ------------------------------------------------------

    def _settle_new(self, header: InHeader, parent_path: str, path: str, fd: int | None,
                    mode: int) -> os.stat_result:
        """Give a file we just created (as root) the caller's ownership and the exact mode."""
        parent_st = os.lstat(parent_path)
        uid = header.uid
        gid = -1 if parent_st.st_mode & stat.S_ISGID else header.gid
        st = os.fstat(fd) if fd is not None else os.lstat(path)
        if st.st_uid != uid or (gid != -1 and st.st_gid != gid):
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                os.lchown(path, uid, gid)
            st = os.fstat(fd) if fd is not None else os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            return st
        want = mode & 0o7777
        if stat.S_ISDIR(st.st_mode):
            want |= st.st_mode & stat.S_ISGID  # inherited from a setgid parent
        if stat.S_IMODE(st.st_mode) != want:
            if fd is not None:
                os.fchmod(fd, want)
            else:
                os.chmod(path, want)
            st = os.fstat(fd) if fd is not None else os.lstat(path)
        return st

    # -- handlers: session -----------------------------------------------------------------

    def _op_init(self, header: InHeader, body: memoryview) -> None:
        init = InitIn.parse(body)
        try:
            if init.major != KERNEL_VERSION or init.minor < MIN_KERNEL_MINOR_VERSION:
                self._init_error = f"unsupported FUSE protocol {init.major}.{init.minor}"
                log.error("fuse: %s", self._init_error)
                self._reply_error(header.unique, errno.EPROTO)
                return
            offered = init.capabilities
            # Not HANDLE_KILLPRIV_V2: with it the kernel leaves clearing setuid/setgid on write to
            # us, and passthrough writes never reach us. Without it the kernel clears them itself
            # (a SETATTR of the mode) with the writer's credentials, as a local filesystem does.
            want = (FUSE_ASYNC_READ | FUSE_ATOMIC_O_TRUNC | FUSE_BIG_WRITES | FUSE_AUTO_INVAL_DATA
                    | FUSE_ASYNC_DIO | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES)
            if self._readdirplus:
                want |= FUSE_DO_READDIRPLUS | FUSE_READDIRPLUS_AUTO
            if self.passthrough_requested and init.minor >= PASSTHROUGH_MINOR_VERSION:
                want |= FUSE_PASSTHROUGH
            granted = want & offered
            self._minor = min(init.minor, KERNEL_MINOR_VERSION)
            self._passthrough_active = bool(granted & FUSE_PASSTHROUGH)
            if self.passthrough_requested and not self._passthrough_active:
                log.warning("fuse: the kernel does not offer passthrough; using the Python "
                            "write path")
            out = InitOut.with_capabilities(
                granted, major=KERNEL_VERSION, minor=self._minor,
                max_readahead=init.max_readahead, max_background=64, congestion_threshold=48,
                max_write=self._max_write, time_gran=1, max_pages=self._max_write // 4096,
                map_alignment=0, max_stack_depth=1 if self._passthrough_active else 0)
            self._reply(header.unique, out.pack())
        finally:
            self._initialized.set()

    def _op_destroy(self, header: InHeader, body: memoryview) -> None:
        self._reply(header.unique)

    def _op_interrupt(self, header: InHeader, body: memoryview) -> None:
        """Ignored: every request completes in bounded time (a commit cannot be cancelled)."""

    def _op_forget(self, header: InHeader, body: memoryview) -> None:
        self._forget(header.nodeid, ForgetIn.parse(body).nlookup)

    def _op_batch_forget(self, header: InHeader, body: memoryview) -> None:
        for item in parse_batch_forget(body):
            self._forget(item.nodeid, item.nlookup)

    # -- handlers: names -------------------------------------------------------------------

    def _op_lookup(self, header: InHeader, body: memoryview) -> None:
        parent = self._node(header.nodeid)
        name, path = self._child(parent, split_names(body, 1)[0])
        st = os.lstat(path)
        node, entry = self._entry(parent, name, st)
        self._reply_entry(header.unique, node, entry)

    def _op_getattr(self, header: InHeader, body: memoryview) -> None:
        node = self._node(header.nodeid)
        args = GetattrIn.parse(body)
        fh = args.fh if args.getattr_flags & FUSE_GETATTR_FH else None
        self._reply(header.unique, self._attr_out(self._stat(node, fh)))

    def _op_setattr(self, header: InHeader, body: memoryview) -> None:
        node = self._node(header.nodeid)
        args = SetattrIn.parse(body)
        valid = args.valid
        handle = None
        if valid & FATTR_FH:
            with self._lock:
                handle = self._files.get(args.fh)
        path, fd = self._target(node, handle.fh if handle is not None else None)
        if valid & FATTR_MODE:
            if fd is not None:
                os.fchmod(fd, args.mode & 0o7777)
            elif node.kind == stat.S_IFLNK:
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            else:
                assert path is not None
                os.chmod(path, args.mode & 0o7777)
        if valid & (FATTR_UID | FATTR_GID):
            uid = args.uid if valid & FATTR_UID else -1
            gid = args.gid if valid & FATTR_GID else -1
            if fd is not None:
                os.fchown(fd, uid, gid)
            else:
                assert path is not None
                os.lchown(path, uid, gid)
        if valid & FATTR_SIZE:
            self._truncate(node, path, fd, handle, args.size)
        if valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW):
            atime_now = bool(valid & FATTR_ATIME_NOW)
            mtime_now = bool(valid & FATTR_MTIME_NOW)
            atime = ((args.atime, args.atimensec)
                     if valid & FATTR_ATIME and not atime_now else None)
            mtime = ((args.mtime, args.mtimensec)
                     if valid & FATTR_MTIME and not mtime_now else None)
            _syscalls.utimens(path, fd, atime=atime, mtime=mtime, atime_now=atime_now,
                              mtime_now=mtime_now)
        if valid & FATTR_KILL_SUIDGID:
            self._kill_suidgid(path, fd)
        st = os.fstat(fd) if fd is not None else self._stat(node)
        self._reply(header.unique, self._attr_out(st))

    @staticmethod
    def _kill_suidgid(path: str | None, fd: int | None) -> None:
        """Drop setuid, and setgid if group-executable, as a write by an unprivileged caller
        does on a local filesystem (we write as root, so the backing filesystem would not)."""
        st = os.fstat(fd) if fd is not None else os.lstat(path or "")
        if not stat.S_ISREG(st.st_mode):
            return
        mode = stat.S_IMODE(st.st_mode)
        new = mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP:
            new &= ~stat.S_ISGID
        if new != mode:
            if fd is not None:
                os.fchmod(fd, new)
            else:
                os.chmod(path or "", new)

    def _truncate(self, node: _Node, path: str | None, fd: int | None,
                  handle: _FileHandle | None, size: int) -> None:
        if fd is not None:
            try:
                os.ftruncate(fd, size)
            except OSError as exc:
                if exc.errno not in (errno.EBADF, errno.EINVAL):
                    raise
                os.truncate(path or self._path(node), size)  # a read-only descriptor
        else:
            assert path is not None
            os.truncate(path, size)
        with self._lock:
            for fh in node.handles:
                other = self._files.get(fh)
                if other is not None and other.writable:
                    other.dirty = True
        if handle is not None:
            handle.dirty = True

    def _op_readlink(self, header: InHeader, body: memoryview) -> None:
        node = self._node(header.nodeid)
        self._reply(header.unique, os.fsencode(os.readlink(self._path(node))))

    def _op_symlink(self, header: InHeader, body: memoryview) -> None:
        parent = self._node(header.nodeid)
        raw_name, target = split_names(body, 2)
        name, path = self._child(parent, raw_name)
        os.symlink(target, path)
        st = self._settle_new(header, os.path.dirname(path), path, None, 0o777)
        node, entry = self._entry(parent, name, st)
        self._reply_entry(header.unique, node, entry)

    def _op_mknod(self, header: InHeader, body: memoryview) -> None:
        parent = self._node(header.nodeid)
        args = MknodIn.parse(body)
        name, path = self._child(parent, split_names(body, 1, MknodIn.STRUCT.size)[0])
        kind = stat.S_IFMT(args.mode) or stat.S_IFREG
        device = decode_dev(args.rdev) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        os.mknod(path, kind | (args.mode & 0o7777), device)
        st = self._settle_new(header, os.path.dirname(path), path, None, args.mode)
        node, entry = self._entry(parent, name, st)
        self._reply_entry(header.unique, node, entry)

    def _op_mkdir(self, header: InHeader, body: memoryview) -> None:
        parent = self._node(header.nodeid)
        args = MkdirIn.parse(body)
        name, path = self._child(parent, split_names(body, 1, MkdirIn.STRUCT.size)[0])
        os.mkdir(path, args.mode & 0o7777)
        st = self._settle_new(header, os.path.dirname(path), path, None, args.mode)
        node, entry = self._entry(parent, name, st)
        self._reply_entry(header.unique, node, entry)

    def _remove(self, header: InHeader, body: memoryview, directory: bool) -> None:
        parent = self._node(header.nodeid)
        name, path = self._child(parent, split_names(body, 1)[0])
        st = os.lstat(path)
        if directory:
            os.rmdir(path)
        else:
            os.unlink(path)
        with self._lock:
            node = self._names.get((parent.nodeid, name))
            if node is None or node.key != (st.st_dev, st.st_ino):
                node = self._by_key.get((st.st_dev, st.st_ino))
            if node is not None:
                self._unlink_name_locked(node, parent, name)
                if directory or st.st_nlink <= 1:
                    self._orphan_locked(node)
        self._reply(header.unique)

    def _op_unlink(self, header: InHeader, body: memoryview) -> None:
        self._remove(header, body, directory=False)

    def _op_rmdir(self, header: InHeader, body: memoryview) -> None:
        self._remove(header, body, directory=True)

    def _op_rename(self, header: InHeader, body: memoryview) -> None:
        args = RenameIn.parse(body)
        self._rename(header, args.newdir, body[RenameIn.STRUCT.size:], 0)

    def _op_rename2(self, header: InHeader, body: memoryview) -> None:
        args = Rename2In.parse(body)
        self._rename(header, args.newdir, body[Rename2In.STRUCT.size:], args.flags)

    def _rename(self, header: InHeader, newdir_id: int, names: memoryview, flags: int) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
                flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        olddir = self._node(header.nodeid)
        newdir = self._node(newdir_id)
        raw_old, raw_new = split_names(names, 2)
        old_name, old_path = self._child(olddir, raw_old)
        new_name, new_path = self._child(newdir, raw_new)
        src_st = os.lstat(old_path)
        try:
            dst_st: os.stat_result | None = os.lstat(new_path)
        except FileNotFoundError:
            dst_st = None
        if flags:
            _syscalls.renameat2(old_path, new_path, flags)
        else:
            os.rename(old_path, new_path)
        src_key = (src_st.st_dev, src_st.st_ino)
        dst_key = None if dst_st is None else (dst_st.st_dev, dst_st.st_ino)
        with self._lock:
            src = self._names.get((olddir.nodeid, old_name)) or self._by_key.get(src_key)
            dst = self._names.get((newdir.nodeid, new_name))
            if dst is None and dst_key is not None:
                dst = self._by_key.get(dst_key)
            if src_key == dst_key:
                pass  # two names of one inode: rename(2) does nothing
            elif flags & RENAME_EXCHANGE:
                if src is not None:
                    self._unlink_name_locked(src, olddir, old_name)
                if dst is not None:
                    self._unlink_name_locked(dst, newdir, new_name)
                    self._link_locked(dst, olddir, old_name)
                if src is not None:
                    self._link_locked(src, newdir, new_name)
            else:
                if dst is not None and dst_st is not None:
                    self._unlink_name_locked(dst, newdir, new_name)
                    if stat.S_ISDIR(dst_st.st_mode) or dst_st.st_nlink <= 1:
                        self._orphan_locked(dst)
                if src is not None:
                    self._unlink_name_locked(src, olddir, old_name)
                    self._link_locked(src, newdir, new_name)
        self._reply(header.unique)

    def _op_link(self, header: InHeader, body: memoryview) -> None:
        args = LinkIn.parse(body)
        source = self._node(args.oldnodeid)
        newdir = self._node(header.nodeid)
        name, path = self._child(newdir, split_names(body, 1, LinkIn.STRUCT.size)[0])
        os.link(self._path(source), path, follow_symlinks=False)
        st = os.lstat(path)
        node, entry = self._entry(newdir, name, st)
        self._reply_entry(header.unique, node, entry)

    # -- handlers: files -------------------------------------------------------------------

    def _open_handle(self, node: _Node, flags: int, fd: int) -> tuple[_FileHandle, OpenOut]:
        """Register an open backing descriptor; decide passthrough for it."""
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        sync = bool(flags & _SYNC_FLAGS)
        open_flags = 0
        backing_id = 0
        use_passthrough = False
        sync_writes = False
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            if self._passthrough_active and sync and writable:
                # Passthrough would sync these writes to the local disk only: serve them here.
                sync_writes = True
                open_flags = FOPEN_DIRECT_IO
            elif self._passthrough_active:
                if node.backing_id == 0:
                    try:
                        node.backing_id = _syscalls.backing_open(self._fd, fd)
                        self._count("backing_ids_opened")
                    except OSError as exc:
                        log.warning("fuse: passthrough refused for %s: %s",
                                    self._rel_locked(node), exc)
                if node.backing_id:
                    use_passthrough = True
                    node.passthrough_opens += 1
                    backing_id = node.backing_id
                    open_flags = FOPEN_PASSTHROUGH
            full_sync = bool(flags & (os.O_SYNC & ~os.O_DSYNC))
            handle = _FileHandle(fh, node, fd, writable, use_passthrough, sync_writes,
                                 datasync_writes=sync_writes and not full_sync,
                                 dirty=bool(flags & os.O_TRUNC) and writable)
            self._files[fh] = handle
            node.handles.add(fh)
        if use_passthrough:
            self._count("passthrough_opens")
        return handle, OpenOut(fh, open_flags, backing_id)

    def _release_handle(self, fh: int) -> None:
        backing_id = 0
        with self._lock:
            handle = self._files.pop(fh, None)
            if handle is None:
                return
            node = handle.node
            node.handles.discard(fh)
            if handle.passthrough:
                node.passthrough_opens -= 1
                if node.passthrough_opens == 0:
                    backing_id, node.backing_id = node.backing_id, 0
            if backing_id:
                try:
                    _syscalls.backing_close(self._fd, backing_id)
                    self._count("backing_ids_closed")
                except OSError as exc:
                    log.warning("fuse: backing close %d: %s", backing_id, exc)
        self._close_quietly(handle.fd)

    @staticmethod
    def _backing_flags(flags: int) -> int:
        return (flags & ~_STRIP_FLAGS) | os.O_CLOEXEC | os.O_NOFOLLOW

    def _op_open(self, header: InHeader, body: memoryview) -> None:
        node = self._node(header.nodeid)
        args = OpenIn.parse(body)
        fd = os.open(self._path(node), self._backing_flags(args.flags))
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != node.key:
                # Another file took the name behind the kernel's back (a peer's version of a
                # multi-writer file was renamed into place): ESTALE makes the kernel look the
                # name up again and open what it names now, as a local filesystem would.
                raise OSError(errno.ESTALE, "the name now belongs to another file")
            self._truncating_open(header, args.flags, args.open_flags, fd)
            handle, out = self._open_handle(node, args.flags, fd)
        except BaseException:
            os.close(fd)
            raise
        if not self._reply(header.unique, out.pack()):
            self._release_handle(handle.fh)

    def _op_create(self, header: InHeader, body: memoryview) -> None:
        parent = self._node(header.nodeid)
        args = CreateIn.parse(body)
        name, path = self._child(parent, split_names(body, 1, CreateIn.STRUCT.size)[0])
        flags = self._backing_flags(args.flags)
        created = True
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, args.mode & 0o7777)
        except FileExistsError:
            # It appeared since the kernel's lookup (e.g. in the backing directory): open it
            # like a local filesystem would, and leave its owner and mode alone.
            if args.flags & os.O_EXCL:
                raise
            fd = os.open(path, flags)
            created = False
        try:
            if not created:
                self._truncating_open(header, args.flags, args.open_flags, fd)
            st = (self._settle_new(header, os.path.dirname(path), path, fd, args.mode)
                  if created else os.fstat(fd))
            node, entry = self._entry(parent, name, st)
        except BaseException:
            os.close(fd)
            raise
        handle, out = self._open_handle(node, args.flags, fd)
        if not self._reply_entry(header.unique, node, entry, out.pack()):
            self._release_handle(handle.fh)

    def _truncating_open(self, header: InHeader, flags: int, open_flags: int, fd: int) -> None:
        """An O_TRUNC open by an unprivileged caller drops setuid/setgid, as on a local
        filesystem (with atomic O_TRUNC the truncation is ours, and we run as root)."""
        if flags & os.O_TRUNC and (header.uid != 0 or open_flags & FUSE_OPEN_KILL_SUIDGID):
            self._kill_suidgid(None, fd)

    def _handle(self, fh: int) -> _FileHandle:
        with self._lock:
            handle = self._files.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return handle

    def _op_read(self, header: InHeader, body: memoryview) -> None:
        args = ReadIn.parse(body)
        handle = self._handle(args.fh)
        self._reply(header.unique, os.pread(handle.fd, args.size, args.offset))

    def _op_write(self, header: InHeader, body: memoryview) -> None:
        args = WriteIn.parse(body)
        handle = self._handle(args.fh)
        data = body[WriteIn.STRUCT.size:WriteIn.STRUCT.size + args.size]
        written = os.pwrite(handle.fd, data, args.offset)
        handle.dirty = True
        if args.write_flags & FUSE_WRITE_KILL_SUIDGID:
            self._kill_suidgid(None, handle.fd)
        path = self._hook_path(handle.node)
        try:
            self.hooks.on_write(path, args.offset, written)
        except Exception:
            log.exception("fuse: on_write(%s, %d, %d) failed", path, args.offset, written)
            raise OSError(errno.EIO, "on_write failed") from None
        reply = WriteOut(written).pack()
        if handle.sync_writes:  # O_SYNC/O_DSYNC: durable on the replicas before we answer
            handle.dirty = False
            self._enqueue_commit(_Pending(header.unique, path, handle.datasync_writes, handle,
                                          reply))
        else:
            self._reply(header.unique, reply)

    def _op_flush(self, header: InHeader, body: memoryview) -> None:
        args = FlushIn.parse(body)
        with self._lock:
            handle = self._files.get(args.fh)
        if handle is None or not handle.writable or not (handle.passthrough or handle.dirty):
            self._reply(header.unique)
            return
        self._queue_sync(header.unique, handle, datasync=False)

    def _op_fsync(self, header: InHeader, body: memoryview) -> None:
        args = FsyncIn.parse(body)
        self._queue_sync(header.unique, self._handle(args.fh), datasync=args.datasync)

    def _queue_sync(self, unique: int, handle: _FileHandle, *, datasync: bool) -> None:
        """fsync the backing file, then commit: both in the commit worker. The kernel holds a
        reference to the file until we answer, so the descriptor stays valid until then."""
        handle.dirty = False  # writes from now on make it dirty again
        self._enqueue_commit(_Pending(unique, self._hook_path(handle.node), datasync, handle,
                                      fd=handle.fd))

    def _op_release(self, header: InHeader, body: memoryview) -> None:
        self._release_handle(ReleaseIn.parse(body).fh)
        self._reply(header.unique)

    def _op_fallocate(self, header: InHeader, body: memoryview) -> None:
        args = FallocateIn.parse(body)
        handle = self._handle(args.fh)
        _syscalls.fallocate(handle.fd, args.mode, args.offset, args.length)
        handle.dirty = True
        if args.mode & _CONTENT_FALLOCATE:
            path = self._hook_path(handle.node)
            try:
                self.hooks.on_write(path, args.offset, args.length)
            except Exception:
                log.exception("fuse: on_write(%s) for fallocate failed", path)
                raise OSError(errno.EIO, "on_write failed") from None
        self._reply(header.unique)

    # -- handlers: directories -------------------------------------------------------------

    def _op_opendir(self, header: InHeader, body: memoryview) -> None:
        node = self._node(header.nodeid)
        if node.kind != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._dirs[fh] = _DirHandle(fh, node)
        if not self._reply(header.unique, OpenOut(fh).pack()):
            with self._lock:
                self._dirs.pop(fh, None)

    def _list_dir(self, node: _Node) -> list[tuple[bytes, int, int]]:
        path = self._path(node)
        here = os.lstat(path)
        with self._lock:
            parent = node.links[-1][0] if node.links else node
            parent_rel = self._rel_locked(parent)
        try:
            up = os.lstat(self._abs(parent_rel)).st_ino if parent_rel is not None else 0
        except OSError:
            up = 0
        entries = [(b".", here.st_ino, _DT_DIR), (b"..", up or here.st_ino, _DT_DIR)]
        with os.scandir(os.fsencode(path)) as it:
            for item in it:
                if item.is_symlink():
                    dtype = mode_to_dtype(stat.S_IFLNK)
                elif item.is_dir(follow_symlinks=False):
                    dtype = _DT_DIR
                elif item.is_file(follow_symlinks=False):
                    dtype = mode_to_dtype(stat.S_IFREG)
                else:
                    try:
                        dtype = mode_to_dtype(item.stat(follow_symlinks=False).st_mode)
                    except OSError:
                        dtype = 0
                entries.append((item.name, item.inode(), dtype))
        return entries

    def _dir_entries(self, fh: int, offset: int) -> tuple[_DirHandle, list[tuple[bytes, int, int]]]:
        with self._lock:
            handle = self._dirs.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown directory handle")
        if offset == 0 or handle.entries is None:  # opendir, rewinddir: a fresh listing
            handle.entries = self._list_dir(handle.node)
        return handle, handle.entries

    def _op_readdir(self, header: InHeader, body: memoryview) -> None:
        args = ReadIn.parse(body)
        _, entries = self._dir_entries(args.fh, args.offset)
        out = bytearray()
        for index in range(args.offset, len(entries)):
            name, ino, dtype = entries[index]
            if len(out) + dirent_size(len(name)) > args.size:
                break
            out += Dirent(ino, index + 1, dtype, name).pack()
        self._reply(header.unique, bytes(out))

    def _op_readdirplus(self, header: InHeader, body: memoryview) -> None:
        args = ReadIn.parse(body)
        handle, entries = self._dir_entries(args.fh, args.offset)
        dir_path = self._path(handle.node)
        out = bytearray()
        counted: list[_Node] = []
        for index in range(args.offset, len(entries)):
            raw, ino, dtype = entries[index]
            if len(out) + direntplus_size(len(raw)) > args.size:
                break
            entry = EntryOut(0, 0, 0, 0, 0, 0, EMPTY_ATTR)
            if raw not in (b".", b".."):
                name = os.fsdecode(raw)
                try:
                    st = os.lstat(os.path.join(dir_path, name))
                except OSError:
                    pass  # vanished meanwhile: no lookup for it (nodeid 0)
                else:
                    node, entry = self._entry(handle.node, name, st)
                    counted.append(node)
                    ino, dtype = st.st_ino, mode_to_dtype(st.st_mode)
            out += DirentPlus(entry, Dirent(ino, index + 1, dtype, raw)).pack()
        if not self._reply(header.unique, bytes(out)):
            for node in counted:
                self._forget(node.nodeid, 1)

    def _op_releasedir(self, header: InHeader, body: memoryview) -> None:
        with self._lock:
            self._dirs.pop(ReleaseIn.parse(body).fh, None)
        self._reply(header.unique)

    def _op_fsyncdir(self, header: InHeader, body: memoryview) -> None:
        args = FsyncIn.parse(body)
        node = self._node(header.nodeid)
        fd = os.open(self._path(node), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if args.datasync:
                os.fdatasync(fd)
            else:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._enqueue_commit(_Pending(header.unique, self._hook_path(node), args.datasync, None))

    # -- handlers: misc --------------------------------------------------------------------

    def _op_ioctl(self, header: InHeader, body: memoryview) -> None:
        # No ioctls (isatty() probes with TCGETS on every Python open): "not a typewriter".
        self._reply_error(header.unique, errno.ENOTTY)

    def _op_statfs(self, header: InHeader, body: memoryview) -> None:
        self._reply(header.unique, KStatfs.from_statvfs(os.statvfs(self._root)).pack())

    def _op_access(self, header: InHeader, body: memoryview) -> None:
        # With default_permissions the kernel checks access itself and never asks; answer
        # whether the file exists, should a kernel ask anyway.
        AccessIn.parse(body)
        self._stat(self._node(header.nodeid))
        self._reply(header.unique)

    def _xattr_target(self, header: InHeader) -> str | int:
        node = self._node(header.nodeid)
        path, fd = self._target(node)
        if fd is not None:
            return fd
        assert path is not None
        return path

    def _op_getxattr(self, header: InHeader, body: memoryview) -> None:
        args = GetxattrIn.parse(body)
        name = os.fsdecode(split_names(body, 1, GetxattrIn.STRUCT.size)[0])
        try:
            value = os.getxattr(self._xattr_target(header), name, follow_symlinks=False)
        except OSError as exc:
            if name == _CAPS_NAME and exc.errno == errno.ENODATA:
                self._set_no_caps(header.nodeid, True)
            raise
        self._reply_sized(header.unique, args.size, value)

    def _set_no_caps(self, nodeid: int, absent: bool) -> None:
        with self._lock:
            node = self._nodes.get(nodeid)
            if node is not None:
                node.no_caps = absent

    def _op_listxattr(self, header: InHeader, body: memoryview) -> None:
        args = GetxattrIn.parse(body)
        names = os.listxattr(self._xattr_target(header), follow_symlinks=False)
        self._reply_sized(header.unique, args.size,
                          b"".join(os.fsencode(n) + b"\0" for n in names))

    def _reply_sized(self, unique: int, size: int, value: bytes) -> None:
        if size == 0:
            self._reply(unique, GetxattrOut(len(value)).pack())
        elif len(value) > size:
            self._reply_error(unique, errno.ERANGE)
        else:
            self._reply(unique, value)

    def _op_setxattr(self, header: InHeader, body: memoryview) -> None:
        args = SetxattrIn.parse(body)
        start = SetxattrIn.STRUCT.size
        raw_name = split_names(body, 1, start)[0]
        value_start = start + len(raw_name) + 1
        value = bytes(body[value_start:value_start + args.size])
        self._set_no_caps(header.nodeid, False)
        os.setxattr(self._xattr_target(header), os.fsdecode(raw_name), value, args.flags,
                    follow_symlinks=False)
        self._reply(header.unique)

    def _op_removexattr(self, header: InHeader, body: memoryview) -> None:
        name = os.fsdecode(split_names(body, 1)[0])
        self._set_no_caps(header.nodeid, False)
        os.removexattr(self._xattr_target(header), name, follow_symlinks=False)
        self._reply(header.unique)

    # -- group commit ----------------------------------------------------------------------

    def _enqueue_commit(self, pending: _Pending) -> None:
        self._commit_q.put(pending)

    def _commit_loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._commit_q.get()
            if first is None:
                return
            # Everything that queued up while the previous commit ran is one batch.
            batch = [first]
            while True:
                try:
                    item = self._commit_q.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True  # finish (answer) what is queued, then stop
                    break
                batch.append(item)
            self._commit_busy = True
            try:
                self._commit_batch(batch)
            except Exception:
                log.exception("fuse: commit batch failed")
                for pending in batch:
                    self._reply_error(pending.unique, errno.EIO)
            finally:
                self._commit_busy = False

    def _start_fsyncs(self, syncs: list[_Pending]) -> Callable[[], dict[int, int]]:
        """Start fsync (or fdatasync) of every pending descriptor on the worker pool; the call
        returned waits for them and gives {index: errno} of the failures.

        They run while ``hooks.commit`` ships the change: the local sync and the peers' take
        about as long, and neither needs the other (a journal record is read from the page
        cache once the file's writeback is done; a snapshot flushes what it takes). Several
        run in parallel, so that the filesystem can fold them into one journal commit.
        """
        failures: dict[int, int] = {}
        if not syncs:
            return lambda: failures
        remaining = [len(syncs)]
        lock = threading.Lock()
        done = threading.Event()

        def job(index: int) -> None:
            pending = syncs[index]
            try:
                if pending.datasync:
                    os.fdatasync(pending.fd)
                else:
                    os.fsync(pending.fd)
            except OSError as exc:
                failures[index] = _errno_of(exc)
            finally:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        for index in range(len(syncs)):
            self._work.put(functools.partial(job, index))

        def wait() -> dict[int, int]:
            done.wait()
            return failures

        return wait

    def _commit_batch(self, batch: list[_Pending]) -> None:
        syncs = [p for p in batch if p.fd >= 0]
        local = self._start_fsyncs(syncs)
        paths = list(dict.fromkeys(p.path for p in batch))
        datasync = all(p.datasync for p in batch)
        error = 0
        try:
            self.hooks.commit(paths, datasync)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EROFS:
                # the hook's own answer: the replica was fenced, a newer primary exists
                log.warning("fuse: commit of %d path(s) refused: %s", len(paths), exc)
                error = errno.EROFS
            else:
                log.exception("fuse: commit of %d path(s) failed; answering EIO", len(paths))
                error = errno.EIO
        # a local failure is the caller's errno, whatever the peers did (data they hold and the
        # caller was not promised is harmless: POSIX leaves the file's state open after it)
        local_errors = {id(syncs[i]): e for i, e in local().items()}
        with self._stats_lock:
            self._counters["commit_calls"] += 1
            self._counters["commit_requests"] += len(batch)
            if error:
                self._counters["commit_errors"] += 1
        for pending in batch:
            failed = local_errors.get(id(pending), error)
            if failed:
                if pending.handle is not None:
                    pending.handle.dirty = True
                self._reply_error(pending.unique, failed)
            else:
                self._reply(pending.unique, pending.payload)
