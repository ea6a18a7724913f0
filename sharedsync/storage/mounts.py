"""Mount table queries (from /proc/self/mountinfo) and mount/unmount through util-linux.

We ask the kernel what is mounted every time rather than remembering it: after a crash, a restart
or another process's work, mountinfo is the only truth.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sharedsync.core.errors import FailedPrecondition

from ._run import CommandFailed, run

_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo, the parts we use."""

    mount_id: int
    major_minor: str
    root: str
    mount_point: str
    options: frozenset[str]
    fs_type: str
    source: str
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        """Whether this mount is read-only (per-mount flag, as ``mount -o ro`` or bind ro sets)."""
        return "ro" in self.options

    @property
    def fs_read_only(self) -> bool:
        """Whether the filesystem itself is read-only (as btrfs makes it after an I/O error)."""
        return "ro" in self.super_options


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the text of a mountinfo file (see proc(5))."""
    entries = []
    # Only "\n" ends a record: str.splitlines() would also split on characters such as \x1c or
    # \u2028 that the kernel leaves unescaped inside paths.
    for line in text.split("\n"):
        if not line.strip():
            continue
        fields = line.split(" ")
        # The optional fields end at a lone "-", which only ever follows the six fixed fields
        # (searching for the text " - " would stop at a per-mount option spelled "-").
        try:
            separator = fields.index("-", 6)
        except ValueError:
            separator = len(fields)
        right = " ".join(fields[separator + 1:])
        # Fields are separated by single spaces and never contain one (it is escaped as \040);
        # a mount made with an empty source string shows two spaces in a row after the type.
        fs_type, source, super_opts = ([*right.split(" ", 2), "", "", ""])[:3]
        entries.append(MountEntry(
            mount_id=int(fields[0]),
            major_minor=fields[2],
            root=_unescape(fields[3]),
            mount_point=_unescape(fields[4]),
            options=frozenset(_unescape(o) for o in fields[5].split(",")),
            fs_type=_unescape(fs_type),
            source=_unescape(source),
            super_options=frozenset(_unescape(o) for o in super_opts.split(",")),
        ))
    return entries


def mount_table() -> list[MountEntry]:
    """The current mount namespace's mounts."""
    # Decoded like os.fsdecode does, so that paths that are not UTF-8 compare equal to ours.
    return parse_mountinfo(os.fsdecode(Path("/proc/self/mountinfo").read_bytes()))


def mounts_at(path: str | os.PathLike[str]) -> list[MountEntry]:
    """Every mount stacked on ``path`` (the last one is visible)."""
    target = os.path.abspath(path)
    return [m for m in mount_table() if m.mount_point == target]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return bool(mounts_at(path))


def mount(source: str, target: str | os.PathLike[str], *, fs_type: str | None = None,
          options: list[str] | None = None) -> None:
    """Mount ``source`` on ``target``."""
    argv = ["mount"]
    if fs_type:
        argv += ["-t", fs_type]
    if options:
        argv += ["-o", ",".join(options)]
    run([*argv, source, os.fspath(target)])


def bind(source: str | os.PathLike[str], target: str | os.PathLike[str], *,
         read_only: bool = False, options: list[str] | None = None) -> None:
    """Bind-mount ``source`` on ``target``; util-linux applies ``ro`` and flags with a remount."""
    opts = ["bind", *(options or [])]
    if read_only:
        opts.append("ro")
    run(["mount", "-o", ",".join(opts), os.fspath(source), os.fspath(target)])


def unmount(target: str | os.PathLike[str]) -> None:
    """Unmount every mount stacked on ``target``; a no-op when nothing is mounted."""
    while is_mounted(target):
        try:
            run(["umount", os.fspath(target)])
        except CommandFailed as exc:
            if "busy" in exc.stderr:
                raise FailedPrecondition(f"{target} is busy and cannot be unmounted") from exc
            raise
