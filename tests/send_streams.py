"""Hand-made ``btrfs send`` streams, as a compromised or broken peer could push them.

The format (btrfs-progs' ``send.h``, version 1): the magic ``btrfs-stream\\0`` and a version,
then commands, each a header (payload length, command, CRC32C of the whole command with the
CRC field zeroed) followed by type-length-value attributes. Only what the tests need is here;
``btrfs receive`` accepts what these functions build.
"""

from __future__ import annotations

import struct
import uuid

MAGIC = b"btrfs-stream\0"
# commands
SUBVOL, SNAPSHOT, MKFILE, WRITE, END = 1, 2, 3, 15, 21
# attributes
UUID, CTRANSID, INO, PATH, FILE_OFFSET, DATA, CLONE_UUID, CLONE_CTRANSID = \
    1, 2, 3, 15, 18, 19, 20, 21


def _crc32c(data: bytes) -> int:
    """CRC32C as the kernel's send computes it: seed 0, no final inversion."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


def attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("<HH", kind, len(value)) + value


def command(kind: int, *attributes: bytes) -> bytes:
    body = b"".join(attributes)
    crc = _crc32c(struct.pack("<IHI", len(body), kind, 0) + body)
    return struct.pack("<IHI", len(body), kind, crc) + body


def stream(*commands: bytes, version: int = 1) -> bytes:
    return b"".join((MAGIC, struct.pack("<I", version), *commands))


def subvol(name: str) -> bytes:
    """The command that starts a full stream's subvolume."""
    return command(SUBVOL, attribute(PATH, name.encode()), attribute(UUID, uuid.uuid4().bytes),
                   attribute(CTRANSID, struct.pack("<Q", 7)))


def snapshot(name: str) -> bytes:
    """The command that starts an incremental stream's subvolume (from some parent)."""
    return command(SNAPSHOT, attribute(PATH, name.encode()),
                   attribute(UUID, uuid.uuid4().bytes), attribute(CTRANSID, struct.pack("<Q", 9)),
                   attribute(CLONE_UUID, uuid.uuid4().bytes),
                   attribute(CLONE_CTRANSID, struct.pack("<Q", 7)))


def file_with(path: str, data: bytes) -> bytes:
    """Commands creating the file ``path`` (put in the stream as given, ``../`` and all)
    holding ``data``."""
    raw = path.encode()
    return (command(MKFILE, attribute(PATH, raw), attribute(INO, struct.pack("<Q", 257)))
            + command(WRITE, attribute(PATH, raw), attribute(FILE_OFFSET, struct.pack("<Q", 0)),
                      attribute(DATA, data)))


def end() -> bytes:
    return command(END)


def file_writing_stream(subvolume: str, path: str, data: bytes) -> bytes:
    """A full stream creating ``subvolume`` and, in it, the file ``path`` holding ``data``."""
    return stream(subvol(subvolume), file_with(path, data), end())
