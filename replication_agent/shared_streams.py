"""One increment, sent once: a stream's encoded frames kept for the peers that want it next.

A Synchronous fsync waits for ``writeQuorum - 1`` peers, so the others trail by one commit
(quorum first, ``PeerLink._wait_turn``): they want the very increment (same parent, same
snapshot) that the quorum peers received a moment before. Each ran its own ``btrfs send`` and
framing: on the primary, about half of the CPU a stream costs (the kernel's send alone 0.9 ms
per MiB, reading its pipe 0.4). Now the stream to the first peer is recorded, frame by encoded
frame, when another peer holds the same parent and still lacks the snapshot, and the trailing
peer is sent the recording.

Memory is the price, so it is bounded: a volume keeps one recording, at most
:data:`RECORD_LIMIT_BYTES` (a bigger stream stops being recorded and is sent afresh), and drops
it once the peers it was kept for took it, or when the next one starts.

The frames of a stream depend only on its parent, its snapshot and the compression policy
(``btrfs send`` of two read-only snapshots is deterministic, and so is the encoder); the header
is each call's own.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field

from sharedsync.core.framing import CompressionPolicy

from .lineage import SnapRef
from .proto import agent_pb2 as pb

#: The largest stream a volume records (a 64 MiB increment, with btrfs send's commands around
#: the data, is about 64.05 MiB).
RECORD_LIMIT_BYTES = 96 << 20


@dataclass(frozen=True, slots=True)
class StreamKey:
    """What makes two streams the same bytes."""

    parent: SnapRef
    snapshot: SnapRef
    compress: CompressionPolicy


@dataclass(frozen=True, slots=True)
class RecordedFrame:
    """One frame as it went on the wire, with what pacing and progress counted for it."""

    wire: bytes
    payload_bytes: int
    raw_bytes: int


@dataclass(slots=True)
class _Recording:
    key: StreamKey
    #: Sends still to come from this recording.
    wanted: int
    frames: list[RecordedFrame] = field(default_factory=list)
    size: int = 0
    complete: bool = False
    abandoned: bool = False


class Recorder:
    """Takes the frames of the stream being recorded, in order; see :meth:`SharedStreams.record`."""

    def __init__(self, recording: _Recording) -> None:
        self._recording = recording

    def __call__(self, wire: bytes, payload_bytes: int, raw_bytes: int, last: bool) -> None:
        rec = self._recording
        if rec.abandoned:
            return
        rec.size += len(wire)
        if rec.size > RECORD_LIMIT_BYTES:
            rec.abandoned = True
            rec.frames.clear()  # too big to keep: the peers after this one send afresh
            return
        rec.frames.append(RecordedFrame(wire, payload_bytes, raw_bytes))
        rec.complete = last


class SharedStreams:
    """A volume's recorded stream (one at a time)."""

    def __init__(self) -> None:
        self._recording: _Recording | None = None

    def record(self, key: StreamKey, wanted: int) -> Recorder:
        """Start recording the stream ``key`` for ``wanted`` later sends (drops any earlier
        recording: the peers it was kept for have moved on, or will send afresh)."""
        self._recording = _Recording(key, wanted)
        return Recorder(self._recording)

    def take(self, key: StreamKey) -> list[RecordedFrame] | None:
        """The whole recorded stream ``key``, if there is one. A send that finds ``key`` still
        being recorded goes ahead without it (Asynchronous volumes stream to every peer at
        once). Either way it counts as one of the sends the recording was kept for, and the
        recording is dropped after the last of them, or abandoned, if unfinished."""
        rec = self._recording
        if rec is None or rec.key != key or rec.abandoned:
            return None
        rec.wanted -= 1
        if rec.wanted <= 0:
            self._recording = None
            if not rec.complete:
                rec.abandoned = True  # nobody will take it: stop keeping its frames
                rec.frames.clear()
        return rec.frames if rec.complete else None

    def clear(self) -> None:
        self._recording = None

    @property
    def held_bytes(self) -> int:
        rec = self._recording
        return 0 if rec is None or rec.abandoned else rec.size


async def replay(header: pb.StreamHeader, frames: list[RecordedFrame],
                 pace: Callable[[int], Awaitable[None]], progress: Callable[[int], None],
                 ) -> AsyncGenerator[pb.PushMessage | bytes, None]:
    """A ``Push`` request stream of a recording, paced and counted as the original was."""
    yield pb.PushMessage(header=header)
    for frame in frames:
        await pace(frame.payload_bytes)
        progress(frame.raw_bytes)
        yield frame.wire
