"""Hand-made ``btrfs send`` streams, as a compromised or broken peer could push them.

The format (btrfs-progs' ``send.h``, version 1): the magic ``btrfs-stream\\0`` and a version,
then commands, each a header (payload length, command, CRC32C of the whole command with the
CRC field zeroed) followed by type-length-value attributes. Only what the tests need is here.
"""

from __future__ import annotations

import struct
import uuid

_MAGIC = b"btrfs-stream\0"
_VERSION = 1
# commands
_SUBVOL, _MKFILE, _WRITE, _END = 1, 3, 15, 21
# attributes
_UUID, _CTRANSID, _INO, _PATH, _FILE_OFFSET, _DATA = 1, 2, 3, 15, 18, 19


def _crc32c(data: bytes) -> int:
    """CRC32C as the kernel's send computes it: seed 0, no final inversion."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", kind, len(value)) + value


def _command(kind: int, *attributes: bytes) -> bytes:
    body = b"".join(attributes)
    crc = _crc32c(struct.pack("<IHI", len(body), kind, 0) + body)
    return struct.pack("<IHI", len(body), kind, crc) + body


def file_writing_stream(subvolume: str, path: str, data: bytes) -> bytes:
    """A full stream creating ``subvolume`` and, in it, the file ``path`` holding ``data``.

    ``path`` is put in the stream as given: ``../`` and all, which is the point.
    """
    raw_path = path.encode()
    return b"".join((
        _MAGIC, struct.pack("<I", _VERSION),
        _command(_SUBVOL, _attribute(_PATH, subvolume.encode()),
                 _attribute(_UUID, uuid.uuid4().bytes),
                 _attribute(_CTRANSID, struct.pack("<Q", 7))),
        _command(_MKFILE, _attribute(_PATH, raw_path), _attribute(_INO, struct.pack("<Q", 257))),
        _command(_WRITE, _attribute(_PATH, raw_path),
                 _attribute(_FILE_OFFSET, struct.pack("<Q", 0)), _attribute(_DATA, data)),
        _command(_END),
    ))
