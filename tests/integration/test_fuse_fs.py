"""The Synchronous-mode FUSE data path on a real mount (root, /dev/fuse).

Every filesystem test runs twice: with kernel passthrough and with the Python write path. The
server runs in this process (its threads serve while the test's thread makes system calls,
which release the GIL); anything that page-faults on the mount (mmap) runs in a child process,
since a fault taken while holding the GIL would wait for the daemon threads forever.

Ordering is asserted through events (a commit hook that blocks on a threading.Event the test
sets), never through timings.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from replication_agent.fuse import FuseServer, _syscalls
from replication_agent.fuse import mount as fmount

pytestmark = pytest.mark.root

REPO_ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
WAIT = 30.0  # bound on every wait for another thread or process (never asserted)


def _require_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: real FUSE mounts")
    if not os.path.exists(fmount.FUSE_DEVICE):
        pytest.skip("no /dev/fuse")


# -- hooks that record and can hold a commit --------------------------------------------------


class RecordingHooks:
    """Records commits, writes and an event log; ``gate`` holds commits until it is set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commits: list[tuple[list[str], bool]] = []
        self.writes: list[tuple[str, int, int]] = []
        self.events: list[str] = []
        self.entered = threading.Event()
        self.gate: threading.Event | None = None
        self.fail = False
        self.read_only = False

    def commit(self, paths: list[str], datasync: bool) -> None:
        with self.lock:
            self.commits.append((list(paths), datasync))
            self.events.append("commit-start")
        self.entered.set()
        gate = self.gate
        if gate is not None and not gate.wait(WAIT):
            raise TimeoutError("test never released the commit")
        if self.fail:
            raise ConnectionError("replicas unreachable")
        if self.read_only:
            raise OSError(errno.EROFS, "this replica was fenced")
        self.event("commit-end")

    def on_write(self, path: str, offset: int, length: int) -> None:
        with self.lock:
            self.writes.append((path, offset, length))

    def event(self, name: str) -> None:
        with self.lock:
            self.events.append(name)

    def hold(self) -> threading.Event:
        self.entered.clear()
        self.gate = threading.Event()
        return self.gate

    def release(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.gate = None

    def reset(self) -> None:
        with self.lock:
            self.commits.clear()
            self.writes.clear()
            self.events.clear()
        self.entered.clear()

    def paths_committed(self) -> list[str]:
        with self.lock:
            return [p for paths, _ in self.commits for p in paths]


@dataclass
class Mounted:
    server: FuseServer
    backing: Path
    mnt: Path
    hooks: RecordingHooks
    passthrough: bool

    def both(self, rel: str) -> tuple[Path, Path]:
        return self.mnt / rel, self.backing / rel


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh directory under /tmp; fails the test if a FUSE mount is left under it."""
    _require_fuse()
    root = Path(tempfile.mkdtemp(prefix="ssfuse-", dir="/tmp"))
    root.chmod(0o755)  # the unprivileged-user tests traverse it
    yield root
    left = fmount.fuse_mounts(root)
    for entry in reversed(left):
        with contextlib.suppress(OSError):
            fmount.abort_connection(entry.mount_point)
        subprocess.run(["umount", "-l", entry.mount_point], check=False, capture_output=True,
                       timeout=60)
    shutil.rmtree(root, ignore_errors=True)
    if left:
        pytest.fail("FUSE mounts left behind: " + ", ".join(m.mount_point for m in left),
                    pytrace=False)


def _start(workdir: Path, passthrough: bool, hooks: RecordingHooks) -> Mounted:
    backing, mnt = workdir / "backing", workdir / "mnt"
    backing.mkdir(exist_ok=True)
    mnt.mkdir(exist_ok=True)
    backing.chmod(0o777)
    server = FuseServer(backing, mnt, hooks, passthrough=passthrough)
    server.start()
    return Mounted(server, backing, mnt, hooks, passthrough)


@pytest.fixture(params=[True, False], ids=["passthrough", "python-write-path"])
def fs(request: pytest.FixtureRequest, workdir: Path) -> Iterator[Mounted]:
    passthrough: bool = request.param
    hooks = RecordingHooks()
    mounted = _start(workdir, passthrough, hooks)
    if passthrough:
        assert mounted.server.passthrough_active, "the kernel refused passthrough"
    else:
        assert not mounted.server.passthrough_active
    try:
        yield mounted
    finally:
        hooks.release()
        mounted.server.stop()
    assert not fmount.is_mounted(mounted.mnt)


def _run_thread(target: Callable[[], None]) -> tuple[threading.Thread, dict[str, BaseException]]:
    """Start ``target`` in a thread; exceptions land in the returned dict (never escape)."""
    errors: dict[str, BaseException] = {}

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"never happened: {what}")
        time.sleep(0.005)


def _errno(call: Callable[[], object]) -> int:
    """The errno of the OSError ``call`` must raise."""
    try:
        call()
    except OSError as exc:
        return exc.errno or 0
    raise AssertionError(f"{call} raised no OSError")


def _ranges(items: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of (offset, length) ranges as sorted, merged [start, end) intervals."""
    merged: list[list[int]] = []
    for start, end in sorted((o, o + n) for o, n in items if n > 0):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _as_nobody(script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script as nobody (65534) (/bin/sh: the venv's python lives under /root)."""
    return subprocess.run(["/bin/sh", "-c", script], user=65534, group=65534,
                          capture_output=True, text=True, timeout=60, check=False)


# -- plain filesystem behaviour ------------------------------------------------------------------


def test_create_write_read_append_pwrite(fs: Mounted) -> None:
    m, b = fs.both("file.bin")
    m.write_bytes(b"hello world")
    assert b.read_bytes() == m.read_bytes() == b"hello world"
    with open(m, "ab") as handle:
        handle.write(b", appended")
    with open(m, "ab") as handle:
        handle.write(b"!")
    assert m.read_bytes() == b.read_bytes() == b"hello world, appended!"
    fd = os.open(m, os.O_RDWR)
    try:
        assert os.pwrite(fd, b"HELLO", 0) == 5
        assert os.pwrite(fd, b"tail", 100) == 4  # leaves a hole
        assert os.pread(fd, 5, 0) == b"HELLO"
        assert os.fstat(fd).st_size == 104
    finally:
        os.close(fd)
    expected = b"HELLO world, appended!" + bytes(100 - 22) + b"tail"
    assert b.read_bytes() == m.read_bytes() == expected
    assert os.stat(m).st_size == os.stat(b).st_size == 104
    assert sorted(os.listdir(fs.mnt)) == sorted(os.listdir(fs.backing)) == ["file.bin"]


def test_new_files_get_requested_mode(fs: Mounted) -> None:
    m, b = fs.both("mode")
    os.close(os.open(m, os.O_CREAT | os.O_WRONLY, 0o640))
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o640
    (fs.mnt / "dir").mkdir(0o750)
    assert stat.S_IMODE(os.stat(fs.backing / "dir").st_mode) == 0o750


def test_truncate_and_ftruncate(fs: Mounted) -> None:
    m, b = fs.both("t")
    m.write_bytes(b"x" * 10000)
    os.truncate(m, 100)
    assert os.stat(m).st_size == os.stat(b).st_size == 100
    fd = os.open(m, os.O_RDWR)
    try:
        os.ftruncate(fd, 5000)
        assert os.fstat(fd).st_size == 5000
        os.ftruncate(fd, 10)
    finally:
        os.close(fd)
    assert b.read_bytes() == m.read_bytes() == b"x" * 10
    with open(m, "wb") as handle:  # O_TRUNC
        handle.write(b"new")
    assert b.read_bytes() == b"new"


def test_rename_over_existing_and_directories(fs: Mounted) -> None:
    (fs.mnt / "x").write_bytes(b"1")
    (fs.mnt / "y").write_bytes(b"2")
    os.rename(fs.mnt / "x", fs.mnt / "y")
    assert not (fs.mnt / "x").exists()
    assert not (fs.backing / "x").exists()
    assert (fs.mnt / "y").read_bytes() == (fs.backing / "y").read_bytes() == b"1"

    (fs.mnt / "a" / "b" / "c").mkdir(parents=True)
    (fs.mnt / "a" / "b" / "c" / "f").write_bytes(b"deep")
    os.rename(fs.mnt / "a", fs.mnt / "z")
    assert (fs.mnt / "z" / "b" / "c" / "f").read_bytes() == b"deep"
    assert (fs.backing / "z" / "b" / "c" / "f").read_bytes() == b"deep"
    # The daemon follows the move: a new file under the renamed tree lands there and its
    # commit names its new path.
    fs.hooks.reset()
    with open(fs.mnt / "z" / "b" / "c" / "g", "wb") as handle:
        handle.write(b"g")
        handle.flush()
        os.fsync(handle.fileno())
    assert (fs.backing / "z" / "b" / "c" / "g").read_bytes() == b"g"
    assert fs.hooks.commits[0] == (["z/b/c/g"], False)
    # a directory over an empty directory
    (fs.mnt / "empty").mkdir()
    os.rename(fs.mnt / "z", fs.mnt / "empty")
    assert (fs.mnt / "empty" / "b" / "c" / "f").read_bytes() == b"deep"
    # a file over a directory
    assert _errno(lambda: os.rename(fs.mnt / "y", fs.mnt / "empty")) == errno.EISDIR
    assert sorted(os.listdir(fs.mnt)) == sorted(os.listdir(fs.backing)) == ["empty", "y"]


def test_rename2_noreplace_and_exchange(fs: Mounted) -> None:
    (fs.mnt / "p").write_bytes(b"P")
    (fs.mnt / "q").write_bytes(b"Q")
    with pytest.raises(FileExistsError):
        _syscalls.renameat2(str(fs.mnt / "p"), str(fs.mnt / "q"), 1)  # RENAME_NOREPLACE
    _syscalls.renameat2(str(fs.mnt / "p"), str(fs.mnt / "r"), 1)
    assert (fs.backing / "r").read_bytes() == b"P"
    _syscalls.renameat2(str(fs.mnt / "r"), str(fs.mnt / "q"), 2)  # RENAME_EXCHANGE
    assert (fs.mnt / "r").read_bytes() == (fs.backing / "r").read_bytes() == b"Q"
    assert (fs.mnt / "q").read_bytes() == (fs.backing / "q").read_bytes() == b"P"
    fs.hooks.reset()
    fd = os.open(fs.mnt / "q", os.O_WRONLY)
    try:
        os.write(fd, b"p")
        os.fsync(fd)
    finally:
        os.close(fd)
    assert fs.hooks.commits[0] == (["q"], False)  # the table swapped the names too
    assert (fs.backing / "q").read_bytes() == b"p"
    # RENAME_WHITEOUT is not supported
    whiteout = _errno(lambda: _syscalls.renameat2(str(fs.mnt / "q"), str(fs.mnt / "s"), 4))
    assert whiteout == errno.EINVAL


def test_unlinked_open_file_keeps_working(fs: Mounted) -> None:
    m, b = fs.both("doomed")
    fd = os.open(m, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"before")
        os.unlink(m)
        assert not m.exists()
        assert not b.exists()
        os.write(fd, b" after")
        assert os.fstat(fd).st_size == 12
        assert os.pread(fd, 12, 0) == b"before after"
        fs.hooks.reset()
        os.fsync(fd)
        assert fs.hooks.commits == [(["doomed"], False)]  # its last name
    finally:
        os.close(fd)
    # the name is free again, for a new file
    m.write_bytes(b"reborn")
    assert b.read_bytes() == b"reborn"


def test_inode_number_reuse(fs: Mounted) -> None:
    seen = set()
    for i in range(20):  # ext4 hands a freed inode number to the next new file
        path = fs.mnt / f"reuse{i % 2}"
        path.write_bytes(f"generation {i}".encode())
        assert path.read_bytes() == f"generation {i}".encode()
        assert os.stat(path).st_ino == os.stat(fs.backing / path.name).st_ino
        seen.add(os.stat(path).st_ino)
        os.unlink(path)
    (fs.mnt / "d1").mkdir()
    os.rmdir(fs.mnt / "d1")
    (fs.mnt / "d1").write_bytes(b"now a file")
    assert (fs.mnt / "d1").read_bytes() == b"now a file"
    assert stat.S_ISREG(os.stat(fs.mnt / "d1").st_mode)


def test_mkdir_rmdir_readdir_2000_entries(fs: Mounted) -> None:
    d = fs.mnt / "many"
    d.mkdir()
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(2000)]
    for name in names:
        os.close(os.open(d / name, os.O_CREAT | os.O_WRONLY, 0o644))
    (d / "sub").mkdir()
    listed = os.listdir(d)
    assert sorted(listed) == sorted([*names, "sub"])
    assert sorted(os.listdir(fs.backing / "many")) == sorted(listed)
    with os.scandir(d) as it:
        kinds = {e.name: e.is_dir(follow_symlinks=False) for e in it}
    assert kinds["sub"] is True
    assert kinds[names[0]] is False
    # a second pass (rewind) sees the same; stat through the cached entries works
    assert sorted(os.listdir(d)) == sorted(listed)
    assert all(os.stat(d / n).st_size == 0 for n in names[:50])
    assert _errno(lambda: os.rmdir(d)) == errno.ENOTEMPTY
    for name in names:
        os.unlink(d / name)
    os.rmdir(d / "sub")
    assert os.listdir(d) == []
    os.rmdir(d)
    assert not (fs.backing / "many").exists()
    # every inode is gone: the kernel forgot them (FORGET / BATCH_FORGET) and so did we
    _wait_until(lambda: fs.server.known_nodes() == 1, "the inode table back to the root")
    counters = fs.server.counters()
    assert counters.get("FORGET", 0) + counters.get("BATCH_FORGET", 0) > 0
    (fs.mnt / "again").mkdir()
    with pytest.raises(FileExistsError):
        (fs.mnt / "again").mkdir()


def test_symlink_and_readlink(fs: Mounted) -> None:
    (fs.mnt / "target").write_bytes(b"pointed at")
    os.symlink("target", fs.mnt / "link")
    os.symlink("/etc/passwd-not-followed-by-the-daemon", fs.mnt / "abs")
    assert os.readlink(fs.mnt / "link") == os.readlink(fs.backing / "link") == "target"
    assert stat.S_ISLNK(os.lstat(fs.mnt / "link").st_mode)
    assert (fs.mnt / "link").read_bytes() == b"pointed at"
    assert os.readlink(fs.mnt / "abs") == "/etc/passwd-not-followed-by-the-daemon"
    os.lchown(fs.mnt / "link", 4321, 4321)
    assert os.lstat(fs.backing / "link").st_uid == 4321
    assert os.stat(fs.backing / "target").st_uid == 0  # lchown did not follow


def test_hardlinks_and_nlink(fs: Mounted) -> None:
    (fs.mnt / "one").write_bytes(b"shared")
    os.link(fs.mnt / "one", fs.mnt / "two")
    assert os.stat(fs.mnt / "one").st_nlink == os.stat(fs.mnt / "two").st_nlink == 2
    assert os.stat(fs.backing / "one").st_nlink == 2
    assert os.stat(fs.mnt / "one").st_ino == os.stat(fs.mnt / "two").st_ino
    with open(fs.mnt / "two", "ab") as handle:
        handle.write(b"+")
    assert (fs.mnt / "one").read_bytes() == b"shared+"
    os.unlink(fs.mnt / "one")
    assert os.stat(fs.mnt / "two").st_nlink == 1
    assert (fs.mnt / "two").read_bytes() == b"shared+"
    fs.hooks.reset()
    with open(fs.mnt / "two", "ab") as handle:
        handle.write(b"!")
        handle.flush()
        os.fsync(handle.fileno())
    assert fs.hooks.commits[0] == (["two"], False)  # the surviving name


def test_chmod_chown_utime(fs: Mounted) -> None:
    m, b = fs.both("meta")
    m.write_bytes(b"m")
    os.chmod(m, 0o604)
    assert stat.S_IMODE(os.stat(b).st_mode) == stat.S_IMODE(os.stat(m).st_mode) == 0o604
    os.chown(m, 1234, 5678)
    assert (os.stat(b).st_uid, os.stat(b).st_gid) == (1234, 5678)
    assert (os.stat(m).st_uid, os.stat(m).st_gid) == (1234, 5678)
    os.chown(m, -1, 42)
    assert (os.stat(m).st_uid, os.stat(m).st_gid) == (1234, 42)
    times = (1_000_000_000_123_456_789, 1_100_000_000_987_654_321)
    os.utime(m, ns=times)
    assert (os.stat(b).st_atime_ns, os.stat(b).st_mtime_ns) == times
    assert (os.stat(m).st_atime_ns, os.stat(m).st_mtime_ns) == times
    os.utime(m)  # now
    assert os.stat(b).st_mtime_ns > times[1]
    assert os.stat(m).st_mtime_ns == os.stat(b).st_mtime_ns
    fd = os.open(m, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=times)
    finally:
        os.close(fd)
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o600
    assert os.stat(b).st_mtime_ns == times[1]


def test_statfs_matches_backing(fs: Mounted) -> None:
    ours, real = os.statvfs(fs.mnt), os.statvfs(fs.backing)
    for name in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
        assert getattr(ours, name) == getattr(real, name), name
    # free space moves with everything else on this disk: close, not equal
    assert abs(ours.f_bavail - real.f_bavail) <= real.f_blocks // 100


def test_xattrs(fs: Mounted) -> None:
    m, b = fs.both("x")
    m.write_bytes(b"x")
    os.setxattr(m, "user.sharedsync", b"value-1")
    assert os.getxattr(m, "user.sharedsync") == os.getxattr(b, "user.sharedsync") == b"value-1"
    os.setxattr(m, "user.big", b"v" * 3000)
    assert os.getxattr(m, "user.big") == b"v" * 3000
    assert {"user.sharedsync", "user.big"} <= set(os.listxattr(m))
    with pytest.raises(FileExistsError):
        os.setxattr(m, "user.sharedsync", b"again", os.XATTR_CREATE)
    assert _errno(lambda: os.setxattr(m, "user.absent", b"v", os.XATTR_REPLACE)) == errno.ENODATA
    os.removexattr(m, "user.sharedsync")
    assert _errno(lambda: os.getxattr(m, "user.sharedsync")) == errno.ENODATA
    assert "user.sharedsync" not in os.listxattr(b)
    (fs.mnt / "xd").mkdir()
    os.setxattr(fs.mnt / "xd", "user.dir", b"d")
    assert os.getxattr(fs.backing / "xd", "user.dir") == b"d"


def test_fallocate_and_punch_hole(fs: Mounted) -> None:
    m, b = fs.both("alloc")
    fd = os.open(m, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.posix_fallocate(fd, 0, MiB)
        assert os.fstat(fd).st_size == MiB
        assert os.stat(b).st_size == MiB
        os.pwrite(fd, b"\xab" * (64 * 1024), 0)
        fs.hooks.reset()
        _syscalls.fallocate(fd, _syscalls.FALLOC_FL_PUNCH_HOLE | _syscalls.FALLOC_FL_KEEP_SIZE,
                            4096, 8192)
        assert os.pread(fd, 4096 * 4, 0) == (b"\xab" * 4096 + bytes(8192) + b"\xab" * 4096)
        assert ("alloc", 4096, 8192) in fs.hooks.writes
    finally:
        os.close(fd)
    data = b.read_bytes()
    assert data[4096:12288] == bytes(8192)
    assert len(data) == MiB


def test_large_file_64mib(fs: Mounted) -> None:
    m, b = fs.both("large")
    digest = hashlib.sha256()
    with open(m, "wb", buffering=0) as handle:
        for i in range(64):
            chunk = i.to_bytes(4, "little") * (MiB // 4)
            digest.update(chunk)
            assert handle.write(chunk) == MiB
    assert os.stat(m).st_size == os.stat(b).st_size == 64 * MiB
    assert _sha(b) == digest.hexdigest()
    assert _sha(m) == digest.hexdigest()


def test_concurrent_writers(fs: Mounted) -> None:
    def writer(index: int) -> None:
        with open(fs.mnt / f"w{index}", "wb", buffering=0) as handle:
            for block in range(128):
                handle.write(bytes([index, block % 256]) * (32 * 1024))
            os.fsync(handle.fileno())

    runs = [_run_thread(lambda i=i: writer(i)) for i in range(4)]  # type: ignore[misc]
    for thread, errors in runs:
        thread.join(WAIT * 4)
        assert not thread.is_alive()
        assert not errors, errors
    for index in range(4):
        expected = b"".join(bytes([index, block % 256]) * (32 * 1024) for block in range(128))
        assert (fs.backing / f"w{index}").read_bytes() == expected
        assert (fs.mnt / f"w{index}").read_bytes() == expected
    assert set(fs.hooks.paths_committed()) >= {f"w{i}" for i in range(4)}


def test_mknod_fifo_and_regular(fs: Mounted) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    os.mkfifo(fs.mnt / "fifo", 0o664)
    assert stat.S_ISFIFO(os.stat(fs.backing / "fifo").st_mode)
    assert stat.S_ISFIFO(os.lstat(fs.mnt / "fifo").st_mode)
    assert stat.S_IMODE(os.stat(fs.backing / "fifo").st_mode) == 0o664 & ~umask
    os.mknod(fs.mnt / "plain", stat.S_IFREG | 0o600)
    assert stat.S_ISREG(os.stat(fs.backing / "plain").st_mode)


def test_errors_become_errnos_and_the_loop_survives(fs: Mounted) -> None:
    with pytest.raises(FileNotFoundError):
        os.open(fs.mnt / "missing", os.O_RDONLY)
    with pytest.raises(FileNotFoundError):
        os.unlink(fs.mnt / "missing")
    (fs.mnt / "f").write_bytes(b"f")
    with pytest.raises(NotADirectoryError):
        os.listdir(fs.mnt / "f")
    with pytest.raises(FileExistsError):
        os.open(fs.mnt / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert _errno(lambda: os.readlink(fs.mnt / "f")) == errno.EINVAL
    assert _errno(lambda: os.getxattr(fs.mnt / "f", "user.nothing")) == errno.ENODATA
    assert (fs.mnt / "f").read_bytes() == b"f"  # still serving


def test_permissions_are_checked_by_the_kernel(fs: Mounted) -> None:
    secret = fs.mnt / "secret"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    (fs.mnt / "shared").mkdir(0o777)
    (fs.mnt / "shared").chmod(0o777)
    shared = fs.mnt / "shared"
    result = _as_nobody(f"""
        set -e
        if cat '{secret}' 2>/dev/null; then echo "read a 0600 root file" >&2; exit 1; fi
        echo 'by nobody' > '{shared}/mine'
        mkdir '{shared}/dir'
        """)
    assert result.returncode == 0, result.stderr
    created = os.stat(fs.backing / "shared" / "mine")
    assert (created.st_uid, created.st_gid) == (65534, 65534)
    assert os.stat(fs.backing / "shared" / "dir").st_uid == 65534
    assert (fs.backing / "shared" / "mine").read_text() == "by nobody\n"


def test_unprivileged_writes_drop_setuid_and_setgid(fs: Mounted) -> None:
    cases = {"write": "printf x >> '{f}'", "o_trunc": ": > '{f}'",
             "truncate": "truncate -s 1 '{f}'"}
    for case, script in cases.items():
        b = fs.backing / f"suid-{case}"
        b.write_bytes(b"abc")
        b.chmod(0o6777)
        result = _as_nobody(script.format(f=fs.mnt / b.name))
        assert result.returncode == 0, (case, result.stderr)
        assert stat.S_IMODE(os.stat(b).st_mode) == 0o777, case  # as on a local filesystem
    kept = fs.backing / "suid-root"
    kept.write_bytes(b"")
    kept.chmod(0o6777)
    with open(fs.mnt / "suid-root", "ab") as handle:  # root has CAP_FSETID: bits stay
        handle.write(b"x")
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o6777


@pytest.mark.parametrize("xattrs", [True, False], ids=["xattrs", "no-xattrs"])
def test_writes_and_the_capability_check(workdir: Path, xattrs: bool) -> None:
    """The kernel asks GETXATTR("security.capability") before every write, even with
    passthrough: answered from a per-inode cache, or never asked when xattrs are off."""
    backing, mnt = workdir / "backing", workdir / "mnt"
    backing.mkdir()
    mnt.mkdir()
    with FuseServer(backing, mnt, RecordingHooks(), xattrs=xattrs) as server:
        fd = os.open(mnt / "w", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            for i in range(100):
                os.pwrite(fd, b"w" * 4096, i * 4096)
        finally:
            os.close(fd)
        counters = server.counters()
        if xattrs:
            assert counters.get("xattr_cache_hits", 0) >= 99
            os.setxattr(mnt / "w", "user.ok", b"1")
            assert os.getxattr(backing / "w", "user.ok") == b"1"
        else:
            assert counters.get("GETXATTR", 0) <= 1  # ENOSYS once, then the kernel stops
            assert _errno(lambda: os.setxattr(mnt / "w", "user.no", b"1")) == errno.EOPNOTSUPP
        assert counters.get("WRITE", 0) == 0  # passthrough all along


# -- durability: fsync / close gated on hooks.commit -------------------------------------------


def test_fsync_returns_only_after_commit(fs: Mounted) -> None:
    hooks = fs.hooks
    fd = os.open(fs.mnt / "durable", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"must survive a node loss")
        hooks.reset()
        gate = hooks.hold()
        returned = threading.Event()

        def do_fsync() -> None:
            os.fsync(fd)
            hooks.event("fsync-returned")
            returned.set()

        thread, errors = _run_thread(do_fsync)
        assert hooks.entered.wait(WAIT)
        assert not returned.is_set()  # commit is holding it
        hooks.event("released")
        gate.set()
        thread.join(WAIT)
        assert not errors, errors
        assert hooks.events == ["commit-start", "released", "commit-end", "fsync-returned"]
        assert hooks.commits == [(["durable"], False)]
        # the write reached the backing file
        assert (fs.backing / "durable").read_bytes() == b"must survive a node loss"
        hooks.gate = None
        hooks.reset()
        os.write(fd, b"!")
        os.fdatasync(fd)
        assert hooks.commits == [(["durable"], True)]
    finally:
        os.close(fd)


def test_close_after_write_commits(fs: Mounted) -> None:
    hooks = fs.hooks
    fd = os.open(fs.mnt / "closing", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"data")
    hooks.reset()
    gate = hooks.hold()
    closed = threading.Event()

    def do_close() -> None:
        os.close(fd)
        hooks.event("close-returned")
        closed.set()

    thread, errors = _run_thread(do_close)
    assert hooks.entered.wait(WAIT)
    assert not closed.is_set()
    hooks.event("released")
    gate.set()
    thread.join(WAIT)
    assert not errors, errors
    assert hooks.events == ["commit-start", "released", "commit-end", "close-returned"]
    assert hooks.commits == [(["closing"], False)]


def test_close_without_writes_does_not_commit(fs: Mounted) -> None:
    (fs.backing / "ro").write_bytes(b"read me")
    fs.hooks.reset()
    assert (fs.mnt / "ro").read_bytes() == b"read me"
    fd = os.open(fs.mnt / "ro", os.O_RDWR)
    os.close(fd)
    if fs.passthrough:
        # writes are invisible under passthrough: any writable handle commits at close
        assert fs.hooks.commits == [(["ro"], False)]
    else:
        assert fs.hooks.commits == []


def test_commit_failure_is_eio(fs: Mounted) -> None:
    hooks = fs.hooks
    fd = os.open(fs.mnt / "unsafe", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"not replicated")
        hooks.fail = True
        assert _errno(lambda: os.fsync(fd)) == errno.EIO
        assert _errno(lambda: os.fdatasync(fd)) == errno.EIO
        hooks.fail = False
        hooks.reset()
    finally:
        os.close(fd)  # retried at close: the handle stayed dirty
    assert hooks.commits == [(["unsafe"], False)]
    fd = os.open(fs.mnt / "unsafe", os.O_WRONLY)
    os.write(fd, b"x")
    hooks.fail = True
    # close-after-write reports the failed commit too
    assert _errno(lambda: os.close(fd)) == errno.EIO
    hooks.fail = False


def test_a_commit_refused_as_read_only_is_erofs(fs: Mounted) -> None:
    """A fenced replica's hook refuses with EROFS: the caller learns why, not just EIO."""
    fd = os.open(fs.mnt / "fenced", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"after the fence")
        fs.hooks.read_only = True
        assert _errno(lambda: os.fsync(fd)) == errno.EROFS
        assert _errno(lambda: os.fdatasync(fd)) == errno.EROFS
        assert _errno(lambda: os.close(fd)) == errno.EROFS
    finally:
        fs.hooks.read_only = False


def test_group_commit_batches_concurrent_fsyncs(fs: Mounted) -> None:
    hooks, server = fs.hooks, fs.server
    fds = [os.open(fs.mnt / f"g{i}", os.O_CREAT | os.O_WRONLY, 0o644) for i in range(8)]
    try:
        for i, fd in enumerate(fds):
            os.write(fd, f"file {i}".encode())
        hooks.reset()
        calls_before = server.counters().get("commit_calls", 0)
        gate = hooks.hold()
        first = _run_thread(lambda: os.fsync(fds[0]))
        assert hooks.entered.wait(WAIT)
        others = [_run_thread(lambda fd=fd: os.fsync(fd))  # type: ignore[misc]
                  for fd in fds[1:]]
        _wait_until(lambda: server.pending_commits() == 7, "7 fsyncs queued behind the commit")
        assert server.commit_in_progress()
        gate.set()
        for thread, errors in [first, *others]:
            thread.join(WAIT)
            assert not errors, errors
        assert len(hooks.commits) == 2  # 8 fsyncs, 2 commit calls
        assert hooks.commits[0] == (["g0"], False)
        assert sorted(hooks.commits[1][0]) == [f"g{i}" for i in range(1, 8)]
        assert server.counters()["commit_calls"] - calls_before == 2
    finally:
        hooks.release()
        for fd in fds:
            os.close(fd)


def test_other_requests_do_not_wait_behind_a_commit(fs: Mounted) -> None:
    hooks = fs.hooks
    (fs.backing / "existing").write_bytes(b"e")
    fd = os.open(fs.mnt / "slow", os.O_CREAT | os.O_WRONLY, 0o644)
    other = -1
    try:
        os.write(fd, b"s")
        gate = hooks.hold()
        thread, errors = _run_thread(lambda: os.fsync(fd))
        assert hooks.entered.wait(WAIT)
        # While the commit is held, everything that does not itself wait for a commit
        # proceeds: lookups, reads, directory changes, creating and writing another file.
        assert (fs.mnt / "existing").read_bytes() == b"e"
        assert "existing" in os.listdir(fs.mnt)
        (fs.mnt / "dir-meanwhile").mkdir()
        os.rename(fs.mnt / "dir-meanwhile", fs.mnt / "dir-renamed")
        os.symlink("existing", fs.mnt / "link-meanwhile")
        other = os.open(fs.mnt / "meanwhile", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(other, b"m")
        assert os.pread(other, 1, 0) == b"m"
        assert thread.is_alive()
        assert hooks.commits == [(["slow"], False)]
        gate.set()
        thread.join(WAIT)
        assert not errors, errors
    finally:
        hooks.release()
        os.close(fd)
        if other >= 0:
            os.close(other)  # its close-after-write commit ran after the held one


def test_fsyncdir_commits_the_directory(fs: Mounted) -> None:
    (fs.mnt / "d").mkdir()
    (fs.mnt / "d" / "f").write_bytes(b"f")
    fs.hooks.reset()
    fd = os.open(fs.mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert fs.hooks.commits == [(["d"], False)]


def test_o_dsync_writes_are_committed_one_by_one(fs: Mounted) -> None:
    fd = os.open(fs.mnt / "sync", os.O_CREAT | os.O_WRONLY | os.O_DSYNC, 0o644)
    try:
        fs.hooks.reset()
        os.write(fd, b"first")
        assert fs.hooks.commits == [(["sync"], True)]
        os.write(fd, b"second")
        assert fs.hooks.commits == [(["sync"], True), (["sync"], True)]
    finally:
        os.close(fd)
    assert (fs.backing / "sync").read_bytes() == b"firstsecond"
    # an O_DSYNC handle and an ordinary (passthrough) one on the same inode at once
    sync_fd = os.open(fs.mnt / "sync", os.O_WRONLY | os.O_DSYNC)
    plain_fd = os.open(fs.mnt / "sync", os.O_RDWR)
    try:
        fs.hooks.reset()
        os.pwrite(plain_fd, b"F", 0)
        os.pwrite(sync_fd, b"S", 1)
        assert fs.hooks.commits == [(["sync"], True)]  # only the O_DSYNC write
        assert os.pread(plain_fd, 11, 0) == b"FSrstsecond"
    finally:
        os.close(sync_fd)
        os.close(plain_fd)
    assert (fs.backing / "sync").read_bytes() == b"FSrstsecond"


def test_a_file_created_behind_our_back_keeps_its_owner(fs: Mounted) -> None:
    m, b = fs.both("race")
    assert not m.exists()
    b.write_bytes(b"from the backing side")
    os.chown(b, 777, 777)
    os.close(os.open(m, os.O_CREAT | os.O_WRONLY, 0o600))  # opens it, creates nothing
    assert (os.stat(b).st_uid, b.read_bytes()) == (777, b"from the backing side")
    assert _errno(lambda: os.open(m, os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == errno.EEXIST


# -- the two write paths -----------------------------------------------------------------------


def test_python_write_path_reports_exact_ranges(workdir: Path) -> None:
    hooks = RecordingHooks()
    mounted = _start(workdir, False, hooks)
    try:
        written = [(0, 10), (100, 5000), (5, 3), (MiB + 7, 3 * MiB + 11), (8 * MiB, 1)]
        fd = os.open(mounted.mnt / "ranges", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            for offset, length in written:
                assert os.pwrite(fd, os.urandom(length), offset) == length
        finally:
            os.close(fd)
        assert {path for path, _, _ in hooks.writes} == {"ranges"}
        reported = [(o, n) for _, o, n in hooks.writes]
        assert _ranges(reported) == _ranges(written)
        assert sum(n for _, n in reported) == sum(n for _, n in written)  # no overlap, no gap
        counters = mounted.server.counters()
        assert counters["WRITE"] >= len(written)
        assert counters.get("passthrough_opens", 0) == 0
    finally:
        mounted.server.stop()


def test_passthrough_is_really_active(workdir: Path) -> None:
    hooks = RecordingHooks()
    mounted = _start(workdir, True, hooks)
    try:
        assert mounted.server.passthrough_active
        data = os.urandom(4 * MiB)
        with open(mounted.mnt / "pt", "wb", buffering=0) as handle:
            for i in range(0, len(data), MiB):
                handle.write(data[i:i + MiB])
            os.fsync(handle.fileno())
        assert (mounted.mnt / "pt").read_bytes() == data
        fd = os.open(mounted.mnt / "pt", os.O_RDWR)
        try:
            os.pwrite(fd, b"z" * 4096, 12345)
            assert os.pread(fd, 4096, 12345) == b"z" * 4096
        finally:
            os.close(fd)
        assert (mounted.backing / "pt").read_bytes()[12345:12345 + 4096] == b"z" * 4096
        # RELEASE is asynchronous: wait until the kernel has released every handle
        _wait_until(lambda: mounted.server.open_handles() == 0, "all releases")
        counters = mounted.server.counters()
        assert counters.get("READ", 0) == 0
        assert counters.get("WRITE", 0) == 0
        assert hooks.writes == []  # the daemon never saw the data
        assert counters["passthrough_opens"] == 3
        assert counters["FSYNC"] == 1
        assert counters["backing_ids_opened"] == counters["backing_ids_closed"] == 3
        assert "pt" in hooks.paths_committed()
    finally:
        mounted.server.stop()


def test_passthrough_shares_one_backing_id_per_inode(workdir: Path) -> None:
    mounted = _start(workdir, True, RecordingHooks())
    try:
        (mounted.mnt / "shared").write_bytes(b"0123456789")
        _wait_until(lambda: mounted.server.open_handles() == 0, "the writer's release")
        before = mounted.server.counters()["backing_ids_opened"]
        fds = [os.open(mounted.mnt / "shared", os.O_RDWR) for _ in range(5)]
        try:
            os.pwrite(fds[0], b"A", 0)
            assert all(os.pread(fd, 1, 0) == b"A" for fd in fds)
            counters = mounted.server.counters()
            assert counters["backing_ids_opened"] - before == 1
            assert counters["passthrough_opens"] >= 6
        finally:
            for fd in fds:
                os.close(fd)
        _wait_until(lambda: mounted.server.open_handles() == 0, "all releases")
        counters = mounted.server.counters()
        assert counters["backing_ids_opened"] == counters["backing_ids_closed"]
    finally:
        mounted.server.stop()


MMAP_CHILD = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
os.write(fd, b"a" * 8192)
os.fsync(fd)
print("written", flush=True); sys.stdin.readline()
m = mmap.mmap(fd, 8192)
m[0:5] = b"XXXXX"
m.flush()  # msync(MS_SYNC)
print("msynced", flush=True); sys.stdin.readline()
m.close()
os.close(fd)
"""


def test_mmap_semantics_as_documented(fs: Mounted) -> None:
    child = subprocess.Popen([sys.executable, "-c", MMAP_CHILD, str(fs.mnt / "mapped")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "written"
        fs.hooks.reset()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "msynced"
        if fs.passthrough:  # msync reaches nobody: replicated at the next fsync/close
            assert fs.hooks.commits == []
            assert fs.hooks.writes == []
        else:  # the kernel writes the page back and sends FSYNC
            assert fs.hooks.commits == [(["mapped"], True)]
            assert ("mapped", 0, 4096) in fs.hooks.writes
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(WAIT) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT)
        child.stdin.close()
        child.stdout.close()
    assert (fs.backing / "mapped").read_bytes()[:8] == b"XXXXXaaa"
    if fs.passthrough:
        assert (["mapped"], False) in fs.hooks.commits  # the close


# -- lifecycle -----------------------------------------------------------------------------------


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _fuse_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fuse-") and t.is_alive()]


def test_stop_closes_every_fd_and_thread(workdir: Path) -> None:
    before = _fds()
    mounted = _start(workdir, True, RecordingHooks())
    (mounted.mnt / "f").write_bytes(b"x")
    assert (mounted.mnt / "f").read_bytes() == b"x"
    os.listdir(mounted.mnt)
    assert _fuse_threads()
    mounted.server.stop()
    mounted.server.stop()  # idempotent
    assert _fds() == before
    assert _fuse_threads() == []
    assert not fmount.is_mounted(mounted.mnt)


def test_stop_with_a_file_still_open(workdir: Path) -> None:
    mounted = _start(workdir, False, RecordingHooks())
    handle = open(mounted.mnt / "busy", "wb")  # noqa: SIM115 - held across stop on purpose
    try:
        handle.write(b"x")
        handle.flush()
        mounted.server.stop()  # busy: aborted and detached, not hung
        assert not fmount.is_mounted(mounted.mnt)
        assert _fuse_threads() == []
    finally:
        assert _errno(handle.close) in (errno.ENOTCONN, errno.ECONNABORTED)  # connection gone


def test_context_manager(workdir: Path) -> None:
    (workdir / "b").mkdir()
    (workdir / "m").mkdir()
    with FuseServer(workdir / "b", workdir / "m", RecordingHooks()) as server:
        assert fmount.is_mounted(workdir / "m")
        assert server.protocol_minor >= 31
        (workdir / "m" / "f").write_text("ctx")
    assert not fmount.is_mounted(workdir / "m")
    assert (workdir / "b" / "f").read_text() == "ctx"


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "python-write-path"])
def test_killed_daemon_leaves_a_stale_mount_that_cleanup_removes(workdir: Path,
                                                                 passthrough: bool) -> None:
    backing, mnt = workdir / "backing", workdir / "mnt"
    backing.mkdir()
    mnt.mkdir()
    argv = [sys.executable, "-m", "replication_agent.fuse", str(backing), str(mnt)]
    if not passthrough:
        argv.append("--no-passthrough")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    daemon = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert daemon.stdout is not None
    try:
        ready = daemon.stdout.readline()
        assert ready.startswith("READY"), ready + (daemon.stderr.read() if daemon.stderr else "")
        assert f"passthrough={int(passthrough)}" in ready
        with open(mnt / "before-crash", "wb") as handle:
            handle.write(b"acknowledged")
            handle.flush()
            os.fsync(handle.fileno())
        daemon.send_signal(signal.SIGKILL)
        assert daemon.wait(WAIT) == -signal.SIGKILL
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(WAIT)
        daemon.stdout.close()
        if daemon.stderr is not None:
            daemon.stderr.close()
    assert fmount.is_mounted(mnt)
    assert _errno(lambda: os.stat(mnt)) == errno.ENOTCONN  # "Transport endpoint is not connected"
    assert fmount.is_stale(mnt)
    assert fmount.cleanup_stale(mnt) is True
    assert not fmount.is_mounted(mnt)
    assert fmount.cleanup_stale(mnt) is False  # nothing left to do
    assert (backing / "before-crash").read_bytes() == b"acknowledged"
    # and a new daemon serves the same directory again
    with FuseServer(backing, mnt, RecordingHooks(), passthrough=passthrough):
        assert (mnt / "before-crash").read_bytes() == b"acknowledged"


def test_cleanup_stale_leaves_live_mounts_alone(workdir: Path) -> None:
    mounted = _start(workdir, True, RecordingHooks())
    try:
        assert not fmount.is_stale(mounted.mnt)
        assert fmount.cleanup_stale(mounted.mnt) is False
        assert fmount.cleanup_stale_under(workdir) == []
        assert fmount.is_mounted(mounted.mnt)
    finally:
        mounted.server.stop()


def test_inotify_on_the_backing_tree_sees_writes_through_the_mount(fs: Mounted) -> None:
    """The ext4 fallback store learns of changes from inotify on the replica (the backing
    tree), while pods write through the mount: with passthrough the writes never reach the
    daemon, so the kernel must report them on the backing file itself."""
    from sharedsync.storage.change_watch import ChangeWatch

    mnt, backing = fs.both("watched")
    with open(mnt, "wb") as out:
        out.write(b"first")
    watch = ChangeWatch(fs.backing)
    try:
        with open(mnt, "r+b") as out:
            settled = watch.generation()
            out.write(b"in place")
            out.flush()  # a write(2), no close and no fsync
            deadline = time.monotonic() + 5
            while watch.generation() == settled and time.monotonic() < deadline:
                time.sleep(0.01)
            assert watch.generation() != settled
        # and in the directory that holds it: a commit re-reads only that one
        places = watch.take_places()
        folder = backing.parent.relative_to(fs.backing)
        assert places is not None
        assert ("" if folder == Path(".") else folder.as_posix()) in places.directories, places
    finally:
        watch.close()
    assert backing.read_bytes() == b"in place"


def test_mutations_count_what_changes_more_than_data(fs: Mounted) -> None:
    """The fsync journal ships data only while this count stands still: every request that
    creates, renames, removes, truncates or changes metadata moves it; reads, writes into an
    existing file, fsync and close do not."""
    m, _ = fs.both("data.bin")
    m.write_bytes(b"x" * 8192)
    # a request is counted again just after its reply: wait for the count to settle
    _wait_until(lambda: fs.server.mutations % 2 == 0, "the create counted as done")
    moved = fs.server.mutations
    fd = os.open(m, os.O_RDWR)
    try:
        os.pwrite(fd, b"y" * 4096, 4096)
        os.fsync(fd)
        assert os.pread(fd, 4, 4096) == b"yyyy"
    finally:
        os.close(fd)
    with open(m, "ab") as handle:  # an append to an existing file: OPEN, not CREATE
        handle.write(b"tail")
    assert fs.server.mutations == moved
    for change in (lambda: os.chmod(m, 0o600), lambda: os.truncate(m, 10),
                   lambda: os.close(os.open(m, os.O_WRONLY | os.O_TRUNC)),
                   lambda: os.rename(m, fs.mnt / "renamed.bin"),
                   lambda: (fs.mnt / "dir").mkdir(),
                   lambda: (fs.mnt / "new.bin").write_bytes(b""),
                   lambda: (fs.mnt / "new.bin").unlink()):
        before = fs.server.mutations
        change()
        # counted as it starts and once done
        _wait_until(functools.partial(_counted, fs.server, before + 2), "the change counted")


def _counted(server: FuseServer, at_least: int) -> bool:
    """The mutation count reached ``at_least`` with nothing in flight (even)."""
    count = server.mutations
    return count >= at_least and count % 2 == 0
