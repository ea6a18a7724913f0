"""Which subvolumes a ``btrfs send`` stream creates, read from its command headers as it passes.

A replica applies a peer's stream with ``btrfs receive``, which creates whatever subvolumes the
stream's commands name: a ``subvol`` (full stream) or ``snapshot`` (incremental) command starts
one, and a stream may carry several. The receiver asked for one snapshot, named in the stream's
header; a stream that creates another one, under any other name, would leave a subvolume in the
replica's lineage that nobody sent as such (a later snapshot's name, say, which a promotion
would then prefer). :class:`SubvolumeGuard` reads the stream as it is fed to ``btrfs receive``
and refuses it unless its first command creates exactly the expected subvolume and no other
command creates one.

The format (btrfs-progs ``send.h``, versions 1-3 alike for what is read here): the magic
``btrfs-stream\\0`` and a little-endian u32 version, then commands, each a 10-byte header
(u32 payload length, u16 command, u32 CRC32C) and its payload of type-length-value attributes
(u16 type, u16 length). Only the headers are walked, and only the payload of the one command
that creates a subvolume is read; CRCs are ``btrfs receive``'s to check. Pure: no I/O.
"""

from __future__ import annotations

import struct

from .errors import InvalidArgument

MAGIC = b"btrfs-stream\0"
_STREAM_HEADER = struct.Struct("<13sI")
_COMMAND_HEADER = struct.Struct("<IHI")
_ATTRIBUTE_HEADER = struct.Struct("<HH")
#: Commands that create a subvolume, and the attribute that names it.
SUBVOL, SNAPSHOT = 1, 2
PATH = 15
#: The stream versions btrfs-progs knows (the command header and these commands are the same).
VERSIONS = frozenset({1, 2, 3})
#: A subvolume-creating command is a path, two UUIDs and transids: far below this.
_MAX_CREATE_PAYLOAD = 64 << 10


class StreamRefused(InvalidArgument):
    """The stream would create something other than the one subvolume asked for."""


class SubvolumeGuard:
    """Feed the stream's bytes in order, in chunks of any size; :meth:`feed` raises
    :class:`StreamRefused` as soon as they show a subvolume other than ``expected``."""

    def __init__(self, expected: str) -> None:
        self.expected = expected
        self._held = bytearray()  # the part of a header (or of the create command) seen so far
        self._want = _STREAM_HEADER.size  # bytes ``_held`` needs before it can be read
        self._skip = 0  # payload bytes of the current command still to pass over
        self._state = "stream-header"
        self._commands = 0

    @property
    def created(self) -> bool:
        """Whether the expected subvolume's command has been seen."""
        return self._commands > 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            step = min(self._want - len(self._held), len(view))
            self._held += view[:step]
            view = view[step:]
            if len(self._held) == self._want:
                self._advance()

    def _advance(self) -> None:
        held = bytes(self._held)
        self._held.clear()
        if self._state == "stream-header":
            magic, version = _STREAM_HEADER.unpack(held)
            if magic != MAGIC or version not in VERSIONS:
                raise StreamRefused("not a btrfs send stream (magic or version)")
            self._state, self._want = "command-header", _COMMAND_HEADER.size
        elif self._state == "command-header":
            length, command, _ = _COMMAND_HEADER.unpack(held)
            creates = command in (SUBVOL, SNAPSHOT)
            if creates != (self._commands == 0):
                raise StreamRefused(
                    "the stream creates a second subvolume" if creates else
                    f"the stream starts with command {command}, not by creating its subvolume")
            self._commands += 1
            if creates:
                if length > _MAX_CREATE_PAYLOAD:
                    raise StreamRefused(f"a {length}-byte subvolume command")
                self._state, self._want = "create-payload", length
                if length == 0:
                    self._advance()
            else:
                self._skip = length
        else:  # the payload of the command that creates the subvolume
            name = _path_of(held)
            if name != self.expected:
                raise StreamRefused(f"the stream creates subvolume {name!r}, "
                                    f"not {self.expected!r}")
            self._state, self._want = "command-header", _COMMAND_HEADER.size


def _path_of(payload: bytes) -> str | None:
    """The PATH attribute of a command's payload (None if it has none)."""
    offset = 0
    while offset + _ATTRIBUTE_HEADER.size <= len(payload):
        kind, length = _ATTRIBUTE_HEADER.unpack_from(payload, offset)
        offset += _ATTRIBUTE_HEADER.size
        if kind == PATH:
            return payload[offset:offset + length].decode(errors="replace")
        offset += length
    return None
