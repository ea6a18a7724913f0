"""Loop devices backing replica images, through util-linux ``losetup``.

``--nooverlap`` makes attaching idempotent: asking twice for the same file returns the device it
is already on, which is what Stage needs after a crash between its steps.
"""

import os
import time

from sharedsync.core.errors import FailedPrecondition

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


def detach_all(image: str | os.PathLike[str], *, timeout: float = DETACH_TIMEOUT_SECONDS) -> None:
    """Detach every loop device backed by ``image`` and wait until they are really gone.

    ``losetup --detach`` on a device someone still holds open only marks it for detach when
    the last user closes it (autoclear); returning then would report a clean unstage while the
    device lingers. So this waits (bounded) for the kernel to release it, and says who is late.
    """
    for device in devices_for(image):
        run(["losetup", "--detach", device])
    deadline = time.monotonic() + timeout
    while (left := devices_for(image)):
        if time.monotonic() > deadline:
            raise FailedPrecondition(
                f"loop device {', '.join(left)} of {image} is still held open by another "
                "process; it will detach when that process closes it")
        time.sleep(0.05)


def refresh_size(device: str) -> None:
    """Tell the loop device its backing file grew (``losetup --set-capacity``)."""
    run(["losetup", "--set-capacity", device])


def size_of(device: str) -> int:
    """Size of a block device in bytes."""
    return int(run(["blockdev", "--getsize64", device]).strip())
