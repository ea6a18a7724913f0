"""Identifiers of volumes and snapshots: derived from names, safe to use as path components.

CSI asks CreateVolume and CreateSnapshot to be idempotent by *name*. Deriving the id from the name
(a keyed hash) means a retried or crash-interrupted create lands on the same id without any
coordination, and an id can never contain a path separator. Ids we did not mint are recognised by
shape, so a lookup of a foreign id is a clean NOT_FOUND rather than a probe of the filesystem.
"""

import hashlib
import re

from .errors import InvalidArgument

#: The CSI spec caps ids and names at 128 bytes.
MAX_ID_BYTES = 128
MAX_NAME_BYTES = 128

VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"
_DIGEST_HEX = 24
# Always used with fullmatch: ``$`` alone would also accept a trailing newline.
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_OURS = {
    VOLUME_PREFIX: re.compile(rf"{VOLUME_PREFIX}[0-9a-f]{{{_DIGEST_HEX}}}"),
    SNAPSHOT_PREFIX: re.compile(rf"{SNAPSHOT_PREFIX}[0-9a-f]{{{_DIGEST_HEX}}}"),
}


def _digest(kind: str, name: str) -> str:
    return hashlib.blake2b(f"{kind}\0{name}".encode(), digest_size=_DIGEST_HEX // 2).hexdigest()


def volume_id_for(name: str) -> str:
    """The id of the volume created under CSI ``name``."""
    return VOLUME_PREFIX + _digest("volume", name)


def snapshot_id_for(name: str) -> str:
    """The id of the snapshot created under CSI ``name``."""
    return SNAPSHOT_PREFIX + _digest("snapshot", name)


def check_name(name: str, field: str) -> str:
    """Validate a CO-chosen name: present, at most 128 bytes, printable."""
    if not name:
        raise InvalidArgument(f"{field} is required")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_NAME_BYTES} bytes")
    if not name.isprintable():
        raise InvalidArgument(f"{field} contains non-printable characters")
    return name


def check_id(value: str, field: str) -> str:
    """Validate the *syntax* of an id the caller sent: present, bounded, no path tricks.

    This does not say the id is ours; see :func:`is_volume_id` and :func:`is_snapshot_id`.
    """
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value.encode()) > MAX_ID_BYTES:
        raise InvalidArgument(f"{field} is longer than {MAX_ID_BYTES} bytes")
    if not _SAFE.fullmatch(value):
        raise InvalidArgument(
            f"{field} may contain only letters, digits, '.', '_' and '-' and must start "
            "with a letter or digit"
        )
    return value


def is_volume_id(value: str) -> bool:
    """Whether ``value`` has the shape of a volume id we mint."""
    return bool(_OURS[VOLUME_PREFIX].fullmatch(value))


def is_snapshot_id(value: str) -> bool:
    """Whether ``value`` has the shape of a snapshot id we mint."""
    return bool(_OURS[SNAPSHOT_PREFIX].fullmatch(value))
