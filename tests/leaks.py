"""What a test left behind on the host: mounts and loop devices under a directory.

Every storage test checks this at teardown (and then cleans up anyway, so one failure does not
poison the rest of the run): leaving nothing behind is part of the contract under test.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

_OCTAL = re.compile(r"\\([0-7]{3})")


def mount_points() -> list[str]:
    """Every mount point of this mount namespace (octal escapes decoded)."""
    text = Path("/proc/self/mountinfo").read_bytes().decode(errors="surrogateescape")
    return [_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), line.split(" ")[4])
            for line in text.split("\n") if line]


def loop_backings() -> list[tuple[str, str]]:
    """(device, backing file) of every attached loop device."""
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=True).stdout
    pairs = []
    for line in out.splitlines():
        name, _, back = line.strip().partition(" ")
        pairs.append((name, back.strip()))
    return pairs


def leaks_under(root: Path) -> list[str]:
    """Mounts under ``root`` and loop devices backed by files under it."""
    prefix = str(root).rstrip("/") + "/"
    found = [f"mount {p}" for p in mount_points() if p.startswith(prefix)]
    found += [f"loop {name} -> {back}" for name, back in loop_backings()
              if back.startswith(prefix)]
    return found


def force_cleanup(root: Path) -> None:
    """Undo whatever was left under ``root``: innermost mounts first, then loop devices."""
    prefix = str(root).rstrip("/") + "/"
    for point in sorted((p for p in mount_points() if p.startswith(prefix)),
                        key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    for _ in range(2):  # block-file loops first, then the images they lived in
        for name, back in loop_backings():
            if back.startswith(prefix):
                subprocess.run(["losetup", "-d", name], check=False, capture_output=True)
