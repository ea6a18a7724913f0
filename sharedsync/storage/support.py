"""What this node's kernel can mount, for choosing the replica store's filesystem."""

from __future__ import annotations

import subprocess
from pathlib import Path

PROC_FILESYSTEMS = Path("/proc/filesystems")


def kernel_supports(fs_type: str, proc_filesystems: Path = PROC_FILESYSTEMS) -> bool:
    """Whether the kernel can mount ``fs_type`` now, loading its module if it has one.

    ``/proc/filesystems`` lists only what is built in or already loaded, so a miss is followed
    by one quiet ``modprobe`` (absent or refused inside many containers: then the list decides).
    """
    if _listed(fs_type, proc_filesystems):
        return True
    try:
        subprocess.run(["modprobe", "-q", fs_type], check=False, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return _listed(fs_type, proc_filesystems)


def _listed(fs_type: str, proc_filesystems: Path) -> bool:
    try:
        lines = proc_filesystems.read_text().splitlines()
    except OSError:
        return False
    return any(line.split()[-1] == fs_type for line in lines if line.split())
