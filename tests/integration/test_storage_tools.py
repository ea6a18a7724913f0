"""sharedsync.storage tool adapters against the real kernel: pipes, mounts, loop devices, btrfs.

Everything here runs real commands as root on real loop devices and mounts; nothing is mocked.
Every test is checked for leaks: no loop device may stay attached to a file under the test's
temporary directory and nothing may stay mounted under it.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharedsync.core.errors import FailedPrecondition, Internal
from sharedsync.core.journal_delta import FileExtent, newer_extents, ranges_to_ship
from sharedsync.storage import btrfs, loop, mounts
from sharedsync.storage._run import CommandFailed, pipe, run
from sharedsync.storage.files import atomic_write, exclusive_lock
from sharedsync.storage.leftovers import leftovers_under
from tests.leaks import force_cleanup

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for loop devices and mounts"),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="util-linux losetup is missing"),
]

MiB = 1 << 20


# -- leak check (self-contained: the integration conftest belongs to someone else) --------------


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory; the test fails if it leaks a mount or a loop device under it."""
    yield tmp_path
    leaked = leftovers_under(tmp_path)
    if leaked:
        force_cleanup(tmp_path)
    assert not leaked, f"leaked: {leaked}"


def _image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# -- _run.run ----------------------------------------------------------------------------------


def test_run_returns_stdout(work: Path) -> None:
    assert run(["printf", "a b\\n"]) == "a b\n"


def test_run_failure_carries_code_and_stderr(work: Path) -> None:
    with pytest.raises(CommandFailed) as info:
        run(["sh", "-c", "echo oops >&2; exit 7"])
    assert info.value.returncode == 7
    assert info.value.stderr == "oops"
    assert info.value.argv[0] == "sh"
    assert "exit 7" in str(info.value)
    assert "oops" in str(info.value)
    assert isinstance(info.value, Internal)


def test_run_failure_without_stderr_uses_stdout(work: Path) -> None:
    with pytest.raises(CommandFailed, match="on stdout"):
        run(["sh", "-c", "echo on stdout; exit 1"])


def test_run_missing_tool(work: Path) -> None:
    with pytest.raises(Internal, match="not installed"):
        run(["sharedsync-no-such-tool-xyz"])


def test_run_timeout(work: Path) -> None:
    with pytest.raises(Internal, match="did not finish"):
        run(["sleep", "30"], timeout=0.2)


def test_run_survives_binary_output(work: Path) -> None:
    assert run(["printf", "\\377\\376ok"]).endswith("ok")


def test_run_stdin_is_not_inherited(work: Path) -> None:
    assert run(["cat"]) == ""  # reads /dev/null, never the test runner's terminal


# -- _run.pipe ---------------------------------------------------------------------------------


def test_pipe_success_moves_the_data(work: Path) -> None:
    dest = work / "out"
    payload = os.urandom(300_000).hex()  # larger than a pipe buffer
    (work / "in").write_text(payload)
    pipe(["cat", str(work / "in")], ["sh", "-c", f"cat > '{dest}'"])
    assert dest.read_text() == payload


def test_pipe_producer_failure_propagates(work: Path) -> None:
    with pytest.raises(CommandFailed) as info:
        pipe(["sh", "-c", "echo partial; echo send broke >&2; exit 3"], ["cat"])
    assert info.value.argv[0] == "sh"
    assert info.value.returncode == 3
    assert "send broke" in info.value.stderr


def test_pipe_consumer_failure_propagates(work: Path) -> None:
    with pytest.raises(CommandFailed) as info:
        pipe(["echo", "data"], ["sh", "-c", "cat >/dev/null; echo receive broke >&2; exit 5"])
    assert info.value.returncode == 5
    assert "receive broke" in info.value.stderr


def test_pipe_consumer_failure_is_reported_not_the_producers_sigpipe(work: Path) -> None:
    # The consumer quits early; the endless producer then dies of SIGPIPE. The error that
    # explains what happened is the consumer's.
    with pytest.raises(CommandFailed) as info:
        pipe(["yes"], ["sh", "-c", "head -c 10 >/dev/null; echo gave up >&2; exit 4"])
    assert info.value.argv[0] == "sh"
    assert info.value.returncode == 4
    assert "gave up" in info.value.stderr


def test_pipe_producer_sigpipe_alone_is_still_a_failure(work: Path) -> None:
    # A consumer that exits 0 without reading everything truncated the stream: not a success.
    with pytest.raises(CommandFailed) as info:
        pipe(["yes"], ["head", "-c", "1"])
    assert info.value.argv[0] == "yes"


def test_pipe_both_fail_reports_the_producer(work: Path) -> None:
    with pytest.raises(CommandFailed) as info:
        pipe(["sh", "-c", "echo producer broke >&2; exit 2"],
             ["sh", "-c", "cat >/dev/null; exit 9"])
    assert info.value.returncode == 2
    assert "producer broke" in info.value.stderr


def test_pipe_chatty_producer_does_not_deadlock(work: Path) -> None:
    # 1 MiB on stderr fills the stderr pipe long before the producer finishes.
    pipe(["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' x >&2; echo done"], ["cat"])


@pytest.mark.parametrize("side", ["producer", "consumer"])
def test_pipe_missing_tool(work: Path, side: str) -> None:
    missing = ["sharedsync-no-such-tool-xyz"]
    producer, consumer = (missing, ["cat"]) if side == "producer" else (["echo", "x"], missing)
    with pytest.raises(Internal, match="not installed"):
        pipe(producer, consumer)


def test_pipe_timeout(work: Path) -> None:
    with pytest.raises(Internal, match="did not finish"):
        pipe(["sleep", "30"], ["cat"], timeout=0.2)


# -- mounts ------------------------------------------------------------------------------------


def test_bind_read_write_and_unmount(work: Path) -> None:
    src, dst = work / "src", work / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("hello")
    mounts.bind(src, dst)
    try:
        assert mounts.is_mounted(dst)
        [entry] = mounts.mounts_at(dst)
        assert not entry.read_only
        assert (dst / "f").read_text() == "hello"
        (dst / "g").write_text("via bind")
        assert (src / "g").read_text() == "via bind"
    finally:
        mounts.unmount(dst)
    assert not mounts.is_mounted(dst)
    assert not (dst / "f").exists()


def test_bind_read_only_really_is(work: Path) -> None:
    src, dst = work / "src", work / "ro target"  # a space exercises mountinfo escaping
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("keep")
    mounts.bind(src, dst, read_only=True)
    try:
        assert mounts.mounts_at(dst)[-1].read_only
        assert (dst / "f").read_text() == "keep"
        with pytest.raises(OSError, match="Read-only file system") as info:
            (dst / "new").write_text("x")
        assert info.value.errno == errno.EROFS
        with pytest.raises(OSError, match="Read-only file system") as info:
            (dst / "f").write_text("changed")
        assert info.value.errno == errno.EROFS
        with pytest.raises(OSError, match="Read-only file system") as info:
            (dst / "dir").mkdir()
        assert info.value.errno == errno.EROFS
        # The source stays writable: read-only applies to this mount only.
        (src / "f").write_text("changed at source")
        assert (dst / "f").read_text() == "changed at source"
    finally:
        mounts.unmount(dst)
    assert not mounts.is_mounted(dst)


def test_unmount_of_nothing_is_a_noop(work: Path) -> None:
    (work / "empty").mkdir()
    mounts.unmount(work / "empty")
    mounts.unmount(work / "does-not-exist")
    assert not mounts.is_mounted(work / "empty")


def test_unmount_removes_stacked_mounts(work: Path) -> None:
    a, b, target = work / "a", work / "b", work / "t"
    for d in (a, b, target):
        d.mkdir()
    (a / "from-a").touch()
    (b / "from-b").touch()
    mounts.bind(a, target)
    mounts.bind(b, target)
    try:
        assert len(mounts.mounts_at(target)) == 2
        assert (target / "from-b").exists()  # the last mount is the visible one
    finally:
        mounts.unmount(target)
    assert mounts.mounts_at(target) == []
    assert list(target.iterdir()) == []


def test_mount_tmpfs_with_options_and_busy_unmount(work: Path) -> None:
    target = work / "tmpfs"
    target.mkdir()
    mounts.mount("sharedsync-test", target, fs_type="tmpfs", options=["size=1m", "mode=0700"])
    try:
        [entry] = mounts.mounts_at(target)
        assert entry.fs_type == "tmpfs"
        assert entry.source == "sharedsync-test"
        assert "size=1024k" in entry.super_options
        holder = subprocess.Popen(["sleep", "60"], cwd=target)
        try:
            with pytest.raises(FailedPrecondition, match="busy"):
                mounts.unmount(target)
            assert mounts.is_mounted(target)
        finally:
            holder.kill()
            holder.wait()
    finally:
        mounts.unmount(target)
    assert not mounts.is_mounted(target)


def test_mount_failure_is_command_failed(work: Path) -> None:
    (work / "t").mkdir()
    with pytest.raises(CommandFailed):
        mounts.mount(str(work / "not-a-device"), work / "t", fs_type="ext4")
    assert not mounts.is_mounted(work / "t")


def test_mounts_at_relative_path(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (work / "src").mkdir()
    (work / "dst").mkdir()
    mounts.bind(work / "src", work / "dst")
    try:
        monkeypatch.chdir(work)
        assert mounts.is_mounted("dst")
        assert mounts.is_mounted("./src/../dst")
    finally:
        mounts.unmount(work / "dst")


# -- loop --------------------------------------------------------------------------------------


def test_losetup_associated_query_works_here(work: Path) -> None:
    """The exact query devices_for makes prints bare device names on this util-linux."""
    image = _image(work / "probe.img", 8 * MiB)
    device = loop.attach(image)
    try:
        out = run(["losetup", "--list", "--noheadings", "--output", "NAME", "--associated",
                   str(image)])
        assert out.split() == [device]
    finally:
        loop.detach_all(image)


def test_attach_is_idempotent(work: Path) -> None:
    image = _image(work / "a.img", 16 * MiB)
    first = loop.attach(image)
    try:
        assert re.fullmatch(r"/dev/loop\d+", first)
        assert loop.attach(image) == first  # --nooverlap: the same device, not a second one
        assert loop.attach(str(image)) == first
        assert loop.devices_for(image) == [first]
        assert loop.size_of(first) == 16 * MiB
    finally:
        loop.detach_all(image)
    assert loop.devices_for(image) == []


def test_attach_uses_direct_io_on_ext4_or_xfs(work: Path) -> None:
    if loop.filesystem_type(work) not in loop.DIRECT_IO_FILESYSTEMS:
        pytest.skip(f"the test directory is on {loop.filesystem_type(work)}, not ext4 or xfs")
    image = _image(work / "dio.img", 16 * MiB)
    device = loop.attach(image)
    try:
        assert loop.uses_direct_io(device)
        # what goes through the device is what the image file holds
        payload = os.urandom(MiB)
        with open(device, "r+b") as dev:
            dev.seek(3 * MiB)
            dev.write(payload)
            dev.flush()
            os.fsync(dev.fileno())
        with open(image, "rb") as f:
            f.seek(3 * MiB)
            assert f.read(MiB) == payload
    finally:
        loop.detach_all(image)


def test_attach_is_buffered_where_the_filesystem_has_no_direct_io(work: Path) -> None:
    # ramfs cannot do O_DIRECT (the kernel refuses a direct-I/O loop device on it)
    ram = work / "ram"
    ram.mkdir()
    run(["mount", "-t", "ramfs", "ramfs", str(ram)])
    try:
        image = _image(ram / "buffered.img", 8 * MiB)
        device = loop.attach(image)
        try:
            assert not loop.uses_direct_io(device)
            assert loop.attach(image) == device
            assert loop.size_of(device) == 8 * MiB
        finally:
            loop.detach_all(image)
    finally:
        mounts.unmount(ram)


def test_devices_for_and_detach_all(work: Path) -> None:
    a = _image(work / "a.img", 8 * MiB)
    b = _image(work / "with space.img", 8 * MiB)
    dev_a, dev_b = loop.attach(a), loop.attach(b)
    try:
        assert dev_a != dev_b
        assert loop.devices_for(a) == [dev_a]
        assert loop.devices_for(b) == [dev_b]
        # A second device on the same file (as an old crash without --nooverlap could leave).
        extra = run(["losetup", "--find", "--show", str(a)]).strip()
        assert sorted(loop.devices_for(a)) == sorted([dev_a, extra])
        loop.detach_all(a)
        assert loop.devices_for(a) == []
        assert loop.devices_for(b) == [dev_b]  # the other image is untouched
        loop.detach_all(a)  # nothing left: a no-op
    finally:
        loop.detach_all(a)
        loop.detach_all(b)
    assert loop.devices_for(b) == []


def test_devices_for_unattached_or_missing_file(work: Path) -> None:
    assert loop.devices_for(_image(work / "idle.img", MiB)) == []
    loop.detach_all(work / "idle.img")


def test_refresh_size_after_growth(work: Path) -> None:
    image = _image(work / "grow.img", 8 * MiB)
    device = loop.attach(image)
    try:
        with open(image, "r+b") as f:
            f.truncate(24 * MiB)
        assert loop.size_of(device) == 8 * MiB
        loop.refresh_size(device)
        assert loop.size_of(device) == 24 * MiB
    finally:
        loop.detach_all(image)


# -- btrfs -------------------------------------------------------------------------------------


@pytest.fixture
def btrfs_mount(work: Path) -> Iterator[Path]:
    if shutil.which("mkfs.btrfs") is None:
        pytest.skip("btrfs-progs is not installed")
    image = _image(work / "fs.img", 256 * MiB)
    device = loop.attach(image)
    target = work / "fs"
    target.mkdir()
    try:
        btrfs.make_filesystem(device, 256 * MiB, "sharedsync-test")
        mounts.mount(device, target, fs_type="btrfs")
        yield target
    finally:
        mounts.unmount(target)
        loop.detach_all(image)


def test_a_file_on_btrfs_is_attached_buffered(btrfs_mount: Path) -> None:
    # a block volume's file inside a replica: btrfs checksums file data, and direct I/O would
    # hand it pages the filesystem on the device may still change while they are written
    assert loop.filesystem_type(btrfs_mount) == "btrfs"
    image = _image(btrfs_mount / "disk.img", 8 * MiB)
    device = loop.attach(image)
    try:
        assert not loop.uses_direct_io(device)
    finally:
        loop.detach_all(image)


def test_btrfs_subvolumes_snapshots_and_send_receive(btrfs_mount: Path) -> None:
    live, snaps, recv = btrfs_mount / "live", btrfs_mount / "snaps", btrfs_mount / "recv"
    btrfs.create_subvolume(live)
    snaps.mkdir()
    recv.mkdir()
    assert btrfs.is_subvolume(live)
    assert not btrfs.is_subvolume(snaps)
    assert not btrfs.is_subvolume(btrfs_mount / "missing")
    (live / "a").write_bytes(b"one")
    btrfs.snapshot(live, snaps / "s1", read_only=True)
    assert btrfs.is_read_only(snaps / "s1")
    assert not btrfs.is_read_only(live)
    (live / "b").write_bytes(b"two")
    btrfs.snapshot(live, snaps / "s2", read_only=True)
    btrfs.send_receive(snaps / "s1", recv)
    btrfs.send_receive(snaps / "s2", recv, parent=snaps / "s1")  # incremental
    assert (recv / "s2" / "a").read_bytes() == b"one"
    assert (recv / "s2" / "b").read_bytes() == b"two"
    assert btrfs.is_read_only(recv / "s2")
    for sub in (recv / "s2", recv / "s1", snaps / "s2", snaps / "s1", live):
        btrfs.delete_subvolume(sub)
        assert not sub.exists()
        btrfs.delete_subvolume(sub)  # already gone: a no-op


def _ioctl_send(snapshot: Path, parent: Path | None = None) -> bytes:
    """The stream btrfs.send writes, read from a pipe while a thread sends."""
    read_fd, write_fd = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while chunk := os.read(read_fd, 1 << 20):
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        btrfs.send(snapshot, write_fd, parent=parent)
    finally:
        os.close(write_fd)
        reader.join()
        os.close(read_fd)
    return b"".join(chunks)


def test_btrfs_send_ioctl_writes_what_the_cli_prints(btrfs_mount: Path) -> None:
    live, snaps, recv = btrfs_mount / "live", btrfs_mount / "snaps", btrfs_mount / "recv"
    btrfs.create_subvolume(live)
    snaps.mkdir()
    recv.mkdir()
    (live / "a").write_bytes(os.urandom(300_000))
    (live / "dir").mkdir()
    (live / "dir" / "link").symlink_to("../a")
    btrfs.snapshot(live, snaps / "s1", read_only=True)
    (live / "b").write_bytes(b"two")
    (live / "a").unlink()
    btrfs.snapshot(live, snaps / "s2", read_only=True)
    assert btrfs.subvolume_info(snaps / "s1").tree_id != btrfs.subvolume_info(live).tree_id
    for snapshot, parent in ((snaps / "s1", None), (snaps / "s2", snaps / "s1")):
        ours = _ioctl_send(snapshot, parent)
        argv = ["btrfs", "send", "--quiet", *(["-p", str(parent)] if parent else []),
                str(snapshot)]
        assert ours == subprocess.run(argv, capture_output=True, check=True).stdout
        subprocess.run(["btrfs", "receive", str(recv)], input=ours, check=True,
                       capture_output=True)
    assert sorted(p.name for p in (recv / "s2").iterdir()) == ["b", "dir"]
    assert os.readlink(recv / "s2" / "dir" / "link") == "../a"
    # what the CLI refuses, the ioctls refuse, with the path in the error
    btrfs.create_subvolume(btrfs_mount / "rw")
    with pytest.raises(PermissionError, match="rw"):  # a writable subvolume is not sent
        _ioctl_send(btrfs_mount / "rw")
    with pytest.raises(FileExistsError, match="s2"):
        btrfs.snapshot(live, snaps / "s2", read_only=True)
    with pytest.raises(FileNotFoundError):
        btrfs.snapshot(live, btrfs_mount / "nowhere" / "s3", read_only=True)
    with pytest.raises(OSError, match="delete subvolume"):  # a plain directory
        btrfs.delete_subvolume(recv)
    assert recv.is_dir()
    # a reader that goes away ends the send (EPIPE), never hangs it
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    with pytest.raises(BrokenPipeError):
        btrfs.send(snaps / "s1", write_fd)
    os.close(write_fd)


def test_btrfs_send_receive_failure_propagates(btrfs_mount: Path) -> None:
    btrfs.create_subvolume(btrfs_mount / "rw")
    with pytest.raises(CommandFailed):  # send refuses a writable subvolume
        btrfs.send_receive(btrfs_mount / "rw", btrfs_mount)
    btrfs.create_subvolume(btrfs_mount / "src")
    btrfs.snapshot(btrfs_mount / "src", btrfs_mount / "snap", read_only=True)
    with pytest.raises(CommandFailed):  # receive into a directory that does not exist
        btrfs.send_receive(btrfs_mount / "snap", btrfs_mount / "nowhere")


def test_btrfs_health_queries_on_a_fresh_filesystem(btrfs_mount: Path) -> None:
    assert not btrfs.has_device_errors(btrfs_mount)
    assert btrfs.device_slack(btrfs_mount) == 0
    btrfs.sync(btrfs_mount)


def test_btrfs_resize_to_grown_device(work: Path, btrfs_mount: Path) -> None:
    [device] = loop.devices_for(work / "fs.img")
    with open(work / "fs.img", "r+b") as f:
        f.truncate(512 * MiB)
    loop.refresh_size(device)
    assert btrfs.device_slack(btrfs_mount) == 256 * MiB
    before = os.statvfs(btrfs_mount)
    btrfs.resize_to_device(btrfs_mount)
    after = os.statvfs(btrfs_mount)
    assert btrfs.device_slack(btrfs_mount) == 0
    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 200 * MiB
    btrfs.resize_to_device(btrfs_mount)  # already at the device's size: still fine


# -- files -------------------------------------------------------------------------------------


def test_atomic_write_replaces_and_leaves_no_temp(work: Path) -> None:
    target = work / "meta.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000
    assert sorted(p.name for p in work.iterdir()) == ["meta.json"]
    assert target.stat().st_mode & 0o777 == 0o600


def test_exclusive_lock_excludes_other_processes(work: Path) -> None:
    lock = work / "locks" / "x.lock"
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    with exclusive_lock(lock):
        held = subprocess.run([sys.executable, "-c", probe, str(lock)], check=False)
        assert held.returncode == 3
    free = subprocess.run([sys.executable, "-c", probe, str(lock)], check=False)
    assert free.returncode == 0


def test_btrfs_file_extents_since_a_snapshot_rebuild_the_file(btrfs_mount: Path) -> None:
    """What the fsync journal relies on: after each fsync, the extents newer than a snapshot
    and not yet shipped cover every byte written since the last look. Shipping those ranges
    onto the snapshot's copy, round after round (rewrites of one range, appends, transaction
    commits in between, which free and may reuse disk addresses), rebuilds the file exactly."""
    live = btrfs_mount / "live"
    btrfs.create_subvolume(live)
    rng = random.Random(11)
    path = live / "db"
    path.write_bytes(rng.randbytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        btrfs.snapshot(live, btrfs_mount / "base", read_only=True)
        generation = btrfs.subvolume_info(btrfs_mount / "base").generation
        replica = bytearray((btrfs_mount / "base" / "db").read_bytes())
        shipped: set[FileExtent] = set()
        for round_ in range(60):
            for _ in range(rng.randrange(1, 4)):
                size = os.fstat(fd).st_size
                offset = rng.choice([0, 4096, size, rng.randrange(size)])  # hot spots, appends
                os.pwrite(fd, rng.randbytes(rng.choice([1, 100, 4096, 70_000])), offset)
            os.fsync(fd)
            if round_ % 10 == 9:
                btrfs.sync(btrfs_mount)  # a transaction commit: freed extents may be reused
            size = os.fstat(fd).st_size
            new = newer_extents(btrfs.file_extents(fd, min_generation=generation + 1),
                                generation, shipped)
            for start, end in ranges_to_ship(new, size):
                replica[start:end] = os.pread(fd, end - start, start)
            del replica[size:]
            replica.extend(bytes(size - len(replica)))
            shipped.update(new)
            assert bytes(replica) == os.pread(fd, size + 1, 0), f"round {round_}"
        # a file untouched since the snapshot ships nothing
        assert newer_extents(btrfs.file_extents(fd, min_generation=generation + 1),
                             generation, shipped) == []
    finally:
        os.close(fd)
