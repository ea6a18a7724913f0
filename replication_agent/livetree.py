"""The live tree of a multi-writer replica, read and written only through directory descriptors.

The agent runs as root on the host, and the tree it scans and writes belongs to pods, which may
put a symlink anywhere in it (or swap a directory for one between two calls). A path string
resolved by the kernel would follow such a link out of the volume: a scan would read, and a
merge write, host files. So every access walks the path component by component with
``O_NOFOLLOW | O_DIRECTORY`` and acts on the last component relative to its directory's
descriptor (``openat``, ``renameat``, ``unlinkat`` ...); a symlink in the way is an error, not a
detour. Symlinks *in* the volume are replicated as what they are (their target text).

New content is written to a temporary file (``TEMP_PREFIX``) in the destination's directory,
given its owner, mode and mtime, fsynced, and renamed over the destination: a reader sees the
old file or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import blake3
import structlog

from sharedsync.core.file_merge import (
    DIRECTORY,
    TEMP_PREFIX,
    Hashed,
    Record,
    StatKey,
    directory_key,
    is_tracked_mode,
)
from sharedsync.core.tree_refresh import everything

log = structlog.get_logger(__name__)

OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
READ_SIZE = 1 << 20
#: ioctl(dest, FICLONE, src): a copy-on-write clone of a whole file (btrfs, xfs).
FICLONE = 0x40049409


def stat_key(st: os.stat_result) -> StatKey:
    """The versioned part of a stat (of a directory: without its mtime and size)."""
    return directory_key(StatKey(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino,
                                 mode=st.st_mode, uid=st.st_uid, gid=st.st_gid))


def _split(rel: str) -> tuple[list[str], str]:
    parts = rel.split("/")
    return parts[:-1], parts[-1]


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class LiveTree:
    """One replica's ``live`` directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextlib.contextmanager
    def directory(self, parts: Sequence[str], *, create: bool = False) -> Iterator[int]:
        """A descriptor of the directory ``parts`` below the root, never through a symlink.

        With ``create``, missing directories are made with their parent's mode and owner (so
        a volume set up for an fsGroup stays usable by it).
        """
        fd = os.open(self.root, OPEN_DIR)
        try:
            for part in parts:
                try:
                    child = os.open(part, OPEN_DIR, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    parent = os.fstat(fd)
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o700, dir_fd=fd)
                    child = os.open(part, OPEN_DIR, dir_fd=fd)
                    try:
                        os.fchown(child, parent.st_uid, parent.st_gid)
                        os.fchmod(child, stat.S_IMODE(parent.st_mode))
                    except BaseException:
                        os.close(child)
                        raise
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    # -- reading -------------------------------------------------------------------------------

    def walk(self, *, sweep: bool = False,
             linked: set[str] | None = None) -> dict[str, StatKey]:
        """Every directory, regular file and symlink below the root (path -> stat), skipping
        our temporary files (and deleting them with ``sweep``: leftovers of a stopped agent).
        Names that are not UTF-8 cannot travel in the protocol and are skipped with a warning.
        Files with more than one hard link are added to ``linked`` (see
        :mod:`sharedsync.core.tree_refresh`)."""
        found = self.walk_below("", everything, sweep=sweep, linked=linked)
        if found is None:  # walk_below raises for the root itself; this says so to mypy
            raise FileNotFoundError(f"the live tree {self.root} is not a directory")
        return found

    def walk_below(self, directory: str, descend: Callable[[str, StatKey], bool], *,
                   sweep: bool = False,
                   linked: set[str] | None = None) -> dict[str, StatKey] | None:
        """What :meth:`walk` finds below ``directory``, descending into a child directory of
        it only when ``descend(path, stat)`` says so (and then into everything below that);
        None when ``directory`` is no longer a directory. The root itself missing is an error,
        never an empty tree: read as one, every file would be recorded as deleted."""
        try:
            with self.directory(directory.split("/") if directory else []) as held:
                top = os.open(".", OPEN_DIR, dir_fd=held)
        except OSError as exc:
            gone = isinstance(exc, FileNotFoundError | NotADirectoryError) \
                or exc.errno == errno.ELOOP  # a symlink where a directory was
            if gone and directory:
                return None
            raise
        found: dict[str, StatKey] = {}
        stack: list[tuple[str, int]] = [(f"{directory}/" if directory else "", top)]
        top_prefix = stack[0][0]
        try:
            while stack:
                prefix, fd = stack.pop()
                try:
                    with os.scandir(fd) as entries:
                        for entry in entries:
                            name = entry.name
                            if name.startswith(TEMP_PREFIX):
                                if sweep:
                                    with contextlib.suppress(OSError):
                                        os.unlink(name, dir_fd=fd)
                                continue
                            if not _encodable(name):
                                log.warning("skipped a file name that is not UTF-8",
                                            directory=prefix, name=repr(name)[:200])
                                continue
                            rel = f"{prefix}{name}"
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue
                            if stat.S_ISDIR(st.st_mode):
                                if prefix == top_prefix and not descend(rel, stat_key(st)):
                                    found[rel] = stat_key(st)
                                    continue
                                try:
                                    child = os.open(name, OPEN_DIR, dir_fd=fd)
                                except OSError:
                                    continue  # gone, or swapped for something else
                                stack.append((f"{rel}/", child))
                                found[rel] = stat_key(os.fstat(child))
                            elif is_tracked_mode(st.st_mode):
                                found[rel] = stat_key(st)
                                if linked is not None and st.st_nlink > 1 \
                                        and stat.S_ISREG(st.st_mode):
                                    linked.add(rel)
                finally:
                    os.close(fd)
        finally:
            for _, fd in stack:
                os.close(fd)
        return found

    def lstat(self, rel: str) -> StatKey | None:
        """What is at ``rel`` now (any type), or None."""
        parts, name = _split(rel)
        try:
            with self.directory(parts) as dfd:
                return stat_key(os.stat(name, dir_fd=dfd, follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None  # a symlink where a directory was: nothing of ours is there
            raise

    def hash_file(self, rel: str, seen: StatKey) -> Hashed | None:
        """The file's digest, if it stayed exactly as ``seen`` while it was read; else None
        (it is being written: the next scan tries again)."""
        parts, name = _split(rel)
        try:
            with self.directory(parts) as dfd:
                if stat.S_ISDIR(seen.mode):
                    now = stat_key(os.stat(name, dir_fd=dfd, follow_symlinks=False))
                    return Hashed(seen, DIRECTORY) if now == seen else None
                if stat.S_ISLNK(seen.mode):
                    target = os.fsencode(os.readlink(name, dir_fd=dfd))
                    after = stat_key(os.stat(name, dir_fd=dfd, follow_symlinks=False))
                    if after != seen:
                        return None
                    return Hashed(seen, blake3.blake3(target).hexdigest())
                fd = os.open(name, OPEN_READ, dir_fd=dfd)
                try:
                    before = stat_key(os.fstat(fd))
                    if before != seen or not stat.S_ISREG(before.mode):
                        return None
                    digest = blake3.blake3()
                    while chunk := os.read(fd, READ_SIZE):
                        digest.update(chunk)
                    after = stat_key(os.fstat(fd))
                    named = stat_key(os.stat(name, dir_fd=dfd, follow_symlinks=False))
                finally:
                    os.close(fd)
                if after != seen or named != seen:
                    return None
                return Hashed(seen, digest.hexdigest())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                return None
            raise

    def open_version(self, rel: str, expected: StatKey) -> BinaryIO | None:
        """A reader of the file at ``rel`` if it is still exactly as ``expected``; else None.
        A symlink reads as its target."""
        parts, name = _split(rel)
        try:
            with self.directory(parts) as dfd:
                if stat.S_ISLNK(expected.mode):
                    target = os.fsencode(os.readlink(name, dir_fd=dfd))
                    now = stat_key(os.stat(name, dir_fd=dfd, follow_symlinks=False))
                    return io.BytesIO(target) if now == expected else None
                fd = os.open(name, OPEN_READ, dir_fd=dfd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO):
                return None
            raise
        if stat_key(os.fstat(fd)) != expected:
            os.close(fd)
            return None
        return open(fd, "rb", buffering=0)  # the caller closes it

    # -- writing -------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Space the tree's filesystem still has for new files."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def incoming(self, rel: str, symlink: bool) -> Incoming:
        """A temporary file beside ``rel`` (parents made as needed) to write new content to."""
        return Incoming(self, rel, symlink)

    def copy_of(self, source: str, expected: StatKey, rel: str) -> Incoming | None:
        """A temporary copy, beside ``rel``, of the file at ``source`` if it is still exactly
        as ``expected`` (a copy-on-write clone where the filesystem can)."""
        reader = self.open_version(source, expected)
        if reader is None:
            return None
        with reader:
            incoming = self.incoming(rel, stat.S_ISLNK(expected.mode))
            try:
                if incoming.fd is not None:
                    try:
                        fcntl.ioctl(incoming.fd, FICLONE, reader.fileno())
                    except OSError:
                        while chunk := reader.read(READ_SIZE):
                            incoming.write(chunk)
                else:
                    incoming.write(reader.read())
            except BaseException:
                incoming.discard()
                raise
        return incoming

    def set_metadata(self, rel: str, record: Record) -> StatKey:
        """Give the file at ``rel`` the owner, mode and mtime of ``record`` (content as is;
        a directory gets its owner and mode)."""
        if record.is_directory:
            return self.make_directory(rel, record)
        parts, name = _split(rel)
        with self.directory(parts) as dfd:
            if stat.S_ISLNK(record.mode):
                os.chown(name, record.uid, record.gid, dir_fd=dfd, follow_symlinks=False)
                os.utime(name, ns=(record.mtime_ns, record.mtime_ns), dir_fd=dfd,
                         follow_symlinks=False)
                return stat_key(os.stat(name, dir_fd=dfd, follow_symlinks=False))
            fd = os.open(name, OPEN_READ, dir_fd=dfd)
            try:
                _set_file_metadata(fd, record)
                return stat_key(os.fstat(fd))
            finally:
                os.close(fd)

    def make_directory(self, rel: str, record: Record) -> StatKey:
        """The directory ``rel`` with the owner and mode of ``record``: made (parents too) if
        missing, taken over if there, in place of a file or symlink that is there (the merge
        checked that one is the version it replaces)."""
        parts, name = _split(rel)
        with self.directory(parts, create=True) as dfd:
            try:
                os.mkdir(name, 0o700, dir_fd=dfd)
            except FileExistsError:
                there = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISDIR(there.st_mode):
                    os.unlink(name, dir_fd=dfd)
                    os.mkdir(name, 0o700, dir_fd=dfd)
            fd = os.open(name, OPEN_DIR, dir_fd=dfd)
            try:
                os.fchown(fd, record.uid, record.gid)  # before the mode, as for files
                os.fchmod(fd, stat.S_IMODE(record.mode))
                key = stat_key(os.fstat(fd))
            finally:
                os.close(fd)
            os.fsync(dfd)
            return key

    def remove_directory(self, rel: str) -> bool:
        """Remove the directory ``rel`` if it is empty (or already gone): True. False when
        something is in it: it was written on this node, so the directory stays."""
        parts, name = _split(rel)
        try:
            with self.directory(parts) as dfd:
                try:
                    os.rmdir(name, dir_fd=dfd)
                except FileNotFoundError:
                    return True
                except OSError as exc:
                    if exc.errno == errno.ENOTEMPTY:
                        return False
                    raise
                os.fsync(dfd)
        except (FileNotFoundError, NotADirectoryError):
            return True
        return True

    def unlink(self, rel: str) -> None:
        """Remove the file at ``rel`` if it is there (directories are removed by their own
        record, once empty: :meth:`remove_directory`)."""
        parts, name = _split(rel)
        try:
            with self.directory(parts) as dfd:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dfd)
                os.fsync(dfd)
        except (FileNotFoundError, NotADirectoryError):
            return


def _set_file_metadata(fd: int, record: Record) -> None:
    os.fchown(fd, record.uid, record.gid)  # before the mode: chown clears setuid/setgid
    os.fchmod(fd, stat.S_IMODE(record.mode))
    os.utime(fd, ns=(record.mtime_ns, record.mtime_ns))


class Incoming:
    """New content for one path, in a temporary file of the destination's directory."""

    def __init__(self, tree: LiveTree, rel: str, symlink: bool) -> None:
        self.rel = rel
        parts, self.name = _split(rel)
        self.temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        self._dir_context = tree.directory(parts, create=True)
        self.dfd = self._dir_context.__enter__()
        self.symlink = symlink
        self.fd: int | None = None
        self._target = bytearray()
        self._made = False
        if not symlink:
            try:
                self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                  os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.dfd)
            except BaseException:
                self._dir_context.__exit__(None, None, None)
                raise
            self._made = True

    def write(self, data: bytes) -> None:
        if self.fd is None:
            self._target += data
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def finish(self, record: Record) -> StatKey:
        """Owner, mode and mtime of ``record``, durably on disk; returns the temp's stat (its
        inode is the one the destination will have)."""
        if self.fd is None:
            os.symlink(os.fsdecode(bytes(self._target)), self.temp, dir_fd=self.dfd)
            self._made = True
            os.chown(self.temp, record.uid, record.gid, dir_fd=self.dfd, follow_symlinks=False)
            os.utime(self.temp, ns=(record.mtime_ns, record.mtime_ns), dir_fd=self.dfd,
                     follow_symlinks=False)
            return stat_key(os.stat(self.temp, dir_fd=self.dfd, follow_symlinks=False))
        _set_file_metadata(self.fd, record)
        os.fsync(self.fd)
        return stat_key(os.fstat(self.fd))

    def install(self) -> None:
        """Rename over the destination and make the rename durable."""
        os.rename(self.temp, self.name, src_dir_fd=self.dfd, dst_dir_fd=self.dfd)
        self._made = False
        os.fsync(self.dfd)
        self.close()

    def discard(self) -> None:
        if self._made:
            with contextlib.suppress(OSError):
                os.unlink(self.temp, dir_fd=self.dfd)
            self._made = False
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.dfd >= 0:
            self._dir_context.__exit__(None, None, None)
            self.dfd = -1
