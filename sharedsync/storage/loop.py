"""Loop devices backing replica images, through util-linux ``losetup``.

``--nooverlap`` makes attaching idempotent: asking twice for the same file returns the device it
is already on, which is what Stage needs after a crash between its steps.
"""

import os
import time

from ._run import run

#: How long a detach may wait for the last user of a loop device to let go.
DETACH_TIMEOUT_SECONDS = 10.0


def attach(image: str | os.PathLike[str]) -> str:
    """Attach ``image`` to a loop device (or return the one it is on) and return its path."""
    return run(["losetup", "--find", "--show", "--nooverlap", os.fspath(image)]).strip()


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
