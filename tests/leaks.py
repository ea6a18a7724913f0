"""Putting the host back after a test that left mounts or loop devices behind.

Tests find leftovers with ``sharedsync.storage.leftovers.leftovers_under`` and fail on them;
this cleans up anyway, so that one failure does not poison the rest of the run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from sharedsync.storage import loop, mounts


def force_cleanup(root: Path) -> None:
    """Undo whatever was left under ``root``: innermost mounts first, then loop devices."""
    prefix = str(root).rstrip("/") + "/"
    for point in sorted((m.mount_point for m in mounts.mount_table()
                         if m.mount_point.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    for _ in range(2):  # block-file loops first, then the images they lived in
        for name, back in loop.backings():
            if back.startswith(prefix):
                subprocess.run(["losetup", "-d", name], check=False, capture_output=True)
