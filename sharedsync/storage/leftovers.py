"""What is still attached under a directory: mounts below it, loop devices backed by its files.

The demo and every storage test end by asking this, because leaving nothing behind is part of
the contract: a replica that is closed holds no mount and no loop device.
"""

from pathlib import Path

from . import loop, mounts


def leftovers_under(root: Path) -> list[str]:
    """Mounts under ``root`` and loop devices backed by files under it, one line each."""
    prefix = str(root).rstrip("/") + "/"
    found = [f"mount {m.mount_point}" for m in mounts.mount_table()
             if m.mount_point.startswith(prefix)]
    found += [f"loop {name} -> {back}" for name, back in loop.backings()
              if back.startswith(prefix)]
    return found
