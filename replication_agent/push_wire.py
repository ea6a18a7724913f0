"""``Replication.Push`` frames encoded straight to protobuf's wire format.

A snapshot stream is mostly 1 MiB frame payloads. Built as ``pb.PushMessage`` objects, each
payload was copied into the message and copied again by ``SerializeToString``: 2.3-3.1 ms per
MiB here, more of the sender's CPU than anything but the kernel's own send (0.44 ms with the
agent's heap setting, ``heap.py``). :func:`encode_frame` writes the same bytes with the payload
copied once (0.07 ms per MiB), and
:func:`request_wire` is the Push call's serializer: it passes such bytes through and serializes
anything else (the stream's header) as protobuf would. The receiver parses them as any
``PushMessage``: the bytes are identical to ``SerializeToString``'s, as the unit tests check.
"""

from sharedsync.core.framing import Frame

from .proto import agent_pb2 as pb

# field numbers of agent.proto: PushMessage.frame = 2; Frame fields 1-7
_VARINT, _LEN = 0, 2


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_FRAME_IN_MESSAGE = _key(2, _LEN)
_SEQ, _PAYLOAD, _COMPRESSED = _key(1, _VARINT), _key(2, _LEN), _key(3, _VARINT)
_RAW_LENGTH, _CHECKSUM, _LAST, _DIGEST = _key(4, _VARINT), _key(5, _LEN), _key(6, _VARINT), \
    _key(7, _LEN)


def _bytes_field(key: bytes, value: bytes) -> bytes:
    # proto3 leaves out fields at their default (empty, zero, false), as SerializeToString does
    return key + _varint(len(value)) + value if value else b""


def _varint_field(key: bytes, value: int) -> bytes:
    return key + _varint(value) if value else b""


def encode_frame(frame: Frame) -> bytes:
    """``pb.PushMessage(frame=...)`` of ``frame``, serialized, copying the payload once."""
    head = _varint_field(_SEQ, frame.seq)
    if frame.payload:
        head += _PAYLOAD + _varint(len(frame.payload))
    tail = (_varint_field(_COMPRESSED, int(frame.compressed))
            + _varint_field(_RAW_LENGTH, frame.raw_length)
            + _bytes_field(_CHECKSUM, frame.checksum)
            + _varint_field(_LAST, int(frame.last))
            + _bytes_field(_DIGEST, frame.stream_digest))
    inner = len(head) + len(frame.payload) + len(tail)
    return b"".join((_FRAME_IN_MESSAGE, _varint(inner), head, frame.payload, tail))


def request_wire(message: pb.PushMessage | bytes) -> bytes:
    """The Push call's request serializer: encoded frames as they are, messages serialized."""
    return message if isinstance(message, bytes) else message.SerializeToString()
