"""Loop devices backing replica images, through util-linux ``losetup``.

``--nooverlap`` makes attaching idempotent: asking twice for the same file returns the device it
is already on, which is what Stage needs after a crash between its steps.

Devices use direct I/O where the image lies on ext4 or xfs: the loop device then reads and
writes the image file with ``O_DIRECT``, so a replica's data is cached once (by the filesystem
inside the image) instead of twice (again as the image file's pages), copied once less, and
written back once. Measured here (three btrfs-on-loop filesystems, 1 GiB each written at once,
fsync every 64 MiB): 2.0-2.6 s of CPU instead of 5.8-9.3 s, 360-377 instead of 204-296 MiB/s
each; one alone 729-738 instead of 602-619 MiB/s, 4 KiB fsync P50 0.39-0.43 instead of
0.47-0.50 ms. A flush of the device still reaches the disk (the loop driver fsyncs the image).
Anywhere else the device is buffered, as before: a filesystem that checksums file data (btrfs,
where a block volume's file lives inside the replica) would compute its checksum from pages
the filesystem above may still change while they are written, and some filesystems (ramfs)
have no direct I/O at all.
"""

import os
import time

from ._run import CommandFailed, run

#: Filesystems an image may sit on with a direct-I/O loop device (``stat -f`` calls ext4
#: "ext2/ext3"): no checksums of file data, direct I/O of their own.
DIRECT_IO_FILESYSTEMS = frozenset({"ext2/ext3", "xfs"})
#: How long a detach may wait for the last user of a loop device to let go.
DETACH_TIMEOUT_SECONDS = 10.0


def attach(image: str | os.PathLike[str]) -> str:
    """Attach ``image`` to a loop device (or return the one it is on) and return its path.

    With direct I/O on the filesystems in ``DIRECT_IO_FILESYSTEMS`` (buffered if the kernel
    refuses it there all the same), buffered elsewhere. An image already on a device keeps that
    device as it is.
    """
    path = os.fspath(image)
    find = ["losetup", "--find", "--show", "--nooverlap"]
    if filesystem_type(os.path.dirname(os.path.abspath(path))) in DIRECT_IO_FILESYSTEMS:
        try:
            return run([*find, "--direct-io=on", path]).strip()
        except CommandFailed:
            pass
    return run([*find, path]).strip()


def filesystem_type(path: str | os.PathLike[str]) -> str:
    """The type of the filesystem holding ``path``, as ``stat --file-system`` names it."""
    return run(["stat", "--file-system", "--format=%T", os.fspath(path)]).strip()


def uses_direct_io(device: str) -> bool:
    """Whether the loop ``device`` reads and writes its image with direct I/O."""
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as flag:
            return flag.read().strip() == "1"
    except OSError:
        return False


def devices_for(image: str | os.PathLike[str]) -> list[str]:
    """Loop devices currently backed by ``image``.

    ``--list`` is spelled out: older util-linux releases print the legacy
    ``/dev/loopN: [dev]:ino (file)`` format for ``--associated`` unless asked for the list.
    """
    out = run(["losetup", "--list", "--noheadings", "--output", "NAME", "--associated",
               os.fspath(image)])
    return [line.strip() for line in out.splitlines() if line.strip()]


def detach_all(image: str | os.PathLike[str], *, timeout: float = DETACH_TIMEOUT_SECONDS) -> bool:
    """Detach every loop device backed by ``image``; True once they are really gone.

    ``losetup --detach`` on a device someone still holds open (a ``btrfs`` command scanning
    every block device, a backup tool) only marks it autoclear: the kernel detaches it when the
    last holder closes it. So this waits (bounded) for that to happen, and returns False when
    the device is still there at the deadline; the detach still completes later by itself.
    """
    for device in devices_for(image):
        run(["losetup", "--detach", device])
    deadline = time.monotonic() + timeout
    while devices_for(image):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def refresh_size(device: str) -> None:
    """Tell the loop device its backing file grew (``losetup --set-capacity``)."""
    run(["losetup", "--set-capacity", device])


def size_of(device: str) -> int:
    """Size of a block device in bytes."""
    return int(run(["blockdev", "--getsize64", device]).strip())


def backings() -> list[tuple[str, str]]:
    """(device, backing file) of every attached loop device on the host."""
    out = run(["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"])
    pairs = []
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        if name:
            pairs.append((name, back.strip()))
    return pairs
