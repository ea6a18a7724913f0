"""Request checks that run before any side effect: capabilities, paths, mount flags.

Everything a CO (or an attacker on the socket) sends is checked here first; a request that fails
a check changes nothing. Path checks are strict on purpose: kubelet only ever passes absolute,
normalised paths under its own directory, so anything else is refused rather than interpreted.
"""

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sharedsync.core.errors import InvalidArgument, NotFound
from sharedsync.storage.replicas import VolumeKind

from .proto import csi_pb2

AccessMode = csi_pb2.VolumeCapability.AccessMode

#: Access modes we can serve, by kind. A block device cannot be written from several nodes at
#: once without a cluster-aware consumer, so multi-node writers are offered for filesystems only.
SUPPORTED_MODES: dict[VolumeKind, frozenset[int]] = {
    VolumeKind.FILESYSTEM: frozenset({
        AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.MULTI_NODE_READER_ONLY, AccessMode.MULTI_NODE_SINGLE_WRITER,
        AccessMode.MULTI_NODE_MULTI_WRITER, AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }),
    VolumeKind.BLOCK: frozenset({
        AccessMode.SINGLE_NODE_WRITER, AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.MULTI_NODE_READER_ONLY, AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
    }),
}
READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY,
                             AccessMode.MULTI_NODE_READER_ONLY})
#: Filesystem types a mount capability may name: ours is btrfs, and "" means "your choice".
SUPPORTED_FS_TYPES = frozenset({"", "btrfs"})
#: Mount flags a CO may add to a bind mount: per-mount VFS flags only. Filesystem options
#: (which would remount the shared superblock for every user of the replica) are refused.
ALLOWED_MOUNT_FLAGS = frozenset({
    "ro", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime",
    "diratime", "nodiratime", "relatime", "norelatime", "strictatime", "nostrictatime",
})
MAX_PATH_BYTES = 4096
#: Largest group id chown(2) accepts ((gid_t)-1 means "leave unchanged").
MAX_GID = 2**32 - 2
MAX_CAPABILITIES = 16


@dataclass(frozen=True, slots=True)
class Capability:
    """One validated volume capability."""

    kind: VolumeKind
    mode: int
    fs_type: str = ""
    mount_flags: tuple[str, ...] = ()
    mount_group: str = ""


def capability_problem(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why we cannot serve ``cap``, or None if we can."""
    access = cap.WhichOneof("access_type")
    if access is None:
        return "volume capability must set access_type (mount or block)"
    kind = VolumeKind.BLOCK if access == "block" else VolumeKind.FILESYSTEM
    if not cap.HasField("access_mode") or cap.access_mode.mode == AccessMode.UNKNOWN:
        return "volume capability must set access_mode"
    if cap.access_mode.mode not in SUPPORTED_MODES[kind]:
        name = AccessMode.Mode.Name(cap.access_mode.mode) \
            if cap.access_mode.mode in AccessMode.Mode.values() else str(cap.access_mode.mode)
        return f"access mode {name} is not supported for {kind} volumes"
    if kind is VolumeKind.FILESYSTEM:
        if cap.mount.fs_type not in SUPPORTED_FS_TYPES:
            return (f"fsType {cap.mount.fs_type!r} is not supported: sharedsync volumes are "
                    "btrfs (leave fsType empty or set it to btrfs)")
        bad = [f for f in cap.mount.mount_flags if f not in ALLOWED_MOUNT_FLAGS]
        if bad:
            return (f"mount flag {bad[0]!r} is not supported; allowed: "
                    f"{', '.join(sorted(ALLOWED_MOUNT_FLAGS))}")
        group = cap.mount.volume_mount_group
        # ASCII digits only ("²".isdigit() is true but int() refuses it) and a gid chown takes:
        # it is applied after the bind mount, so a bad one must be caught here, not there.
        if group and not (group.isascii() and group.isdigit() and len(group) <= 10
                          and int(group) <= MAX_GID):
            return (f"volume_mount_group must be a numeric group id (0 to {MAX_GID}), "
                    f"got {group[:32]!r}")
    return None


def parse_capability(cap: csi_pb2.VolumeCapability) -> Capability:
    """Validate one capability and return its parts."""
    problem = capability_problem(cap)
    if problem:
        raise InvalidArgument(problem)
    if cap.WhichOneof("access_type") == "block":
        return Capability(VolumeKind.BLOCK, cap.access_mode.mode)
    return Capability(VolumeKind.FILESYSTEM, cap.access_mode.mode, cap.mount.fs_type,
                      tuple(cap.mount.mount_flags), cap.mount.volume_mount_group)


def parse_capabilities(caps: Sequence[csi_pb2.VolumeCapability]) -> list[Capability]:
    """Validate a CreateVolume capability list: present, consistent in kind."""
    if not caps:
        raise InvalidArgument("volume_capabilities is required")
    if len(caps) > MAX_CAPABILITIES:
        raise InvalidArgument(f"at most {MAX_CAPABILITIES} volume capabilities are accepted")
    parsed = [parse_capability(c) for c in caps]
    if len({c.kind for c in parsed}) > 1:
        raise InvalidArgument("volume capabilities mix block and mount access types")
    return parsed


def require_capability(cap: csi_pb2.VolumeCapability, present: bool) -> Capability:
    """Validate the single capability of a Node RPC, which must be present."""
    if not present:
        raise InvalidArgument("volume_capability is required")
    return parse_capability(cap)


def check_path(value: str, field: str, roots: Sequence[Path]) -> Path:
    """Validate a CO-supplied path: absolute, normalised, under an allowed root, no symlinks.

    The path itself may not exist yet (a publish target), but every existing component of it
    must be a real directory (not a symlink) so that nothing we mount can land outside ``roots``.
    """
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value.encode()) > MAX_PATH_BYTES or "\0" in value:
        raise InvalidArgument(f"{field} is malformed")
    if not os.path.isabs(value) or os.path.normpath(value) != value.rstrip("/") or "//" in value:
        raise InvalidArgument(f"{field} must be an absolute, normalised path: {value!r}")
    path = Path(value)
    root = next((r for r in roots if path == r or r in path.parents), None)
    if root is None or path == root:
        raise InvalidArgument(
            f"{field} {value!r} is outside the directories this plugin serves "
            f"({', '.join(str(r) for r in roots)})")
    # every existing component below the root must be a plain directory, never a symlink
    current = root
    for part in path.relative_to(root).parts[:-1]:
        current = current / part
        try:
            mode = current.lstat().st_mode
        except FileNotFoundError:
            break
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            raise InvalidArgument(f"{field} {value!r} passes through {current}, "
                                  "which is not a plain directory")
    own_mode = mode_of(path, follow=False)
    if own_mode is not None and stat.S_ISLNK(own_mode):
        raise InvalidArgument(f"{field} {value!r} is a symbolic link")
    return path


def mode_of(path: str | Path, *, follow: bool) -> int | None:
    """``st_mode`` of ``path`` (``stat``, or ``lstat`` without ``follow``); None when there is
    nothing there. A FUSE mount whose daemon died answers ENOTCONN: a dead mount point, not an
    error, and exactly what an unstage or unpublish must be able to clean up."""
    try:
        return (os.stat(path) if follow else os.lstat(path)).st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENOTCONN):
            return None
        raise


def lookup_path(value: str, field: str, roots: Sequence[Path]) -> Path:
    """A path the CO asks us to *inspect* (stats, expansion, health), never to mount on.

    A path that could not be ours (relative, outside the served roots) cannot hold one of our
    volumes, so it is reported as NOT_FOUND, as the CSI spec asks; only a missing one is invalid.
    """
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        return check_path(value, field, roots)
    except InvalidArgument as exc:
        raise NotFound(f"no volume of this plugin is at {field} {value[:256]!r}: {exc}") from exc


def require_existing_dir(path: Path, field: str) -> None:
    """A path the CO must have created (a staging directory)."""
    if not path.is_dir():
        raise NotFound(f"{field} {path} does not exist")
