"""replication_agent.shared_streams: one recorded increment for the peers that trail."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication_agent import shared_streams
from replication_agent.lineage import SnapRef
from replication_agent.proto import agent_pb2 as pb
from replication_agent.push_wire import encode_frame
from replication_agent.shared_streams import (
    RecordedFrame,
    SharedStreams,
    StreamKey,
    replay,
)
from replication_agent.transfer import frame_of
from sharedsync.core.framing import NEVER_COMPRESS, CompressionPolicy, FrameDecoder, encode

KEY = StreamKey(SnapRef(1, 4), SnapRef(1, 5), NEVER_COMPRESS)


def _record(streams: SharedStreams, key: StreamKey, data: bytes, wanted: int = 1,
            chunk: int = 1000) -> list[bytes]:
    recorder = streams.record(key, wanted)
    wires = []
    for frame in encode(data, chunk):
        wire = encode_frame(frame)
        recorder(wire, len(frame.payload), frame.raw_length, frame.last)
        wires.append(wire)
    return wires


def test_a_whole_recording_is_taken_by_the_peers_it_was_kept_for_then_dropped() -> None:
    streams = SharedStreams()
    wires = _record(streams, KEY, os.urandom(5500), wanted=2)
    assert streams.held_bytes == sum(map(len, wires))
    for _ in range(2):
        frames = streams.take(KEY)
        assert frames is not None
        assert [f.wire for f in frames] == wires
    assert streams.take(KEY) is None
    assert streams.held_bytes == 0


def test_an_unfinished_recording_is_not_handed_out() -> None:
    streams = SharedStreams()
    recorder = streams.record(KEY, 1)
    frame = encode(b"x" * 3000, 1000)[0]
    recorder(encode_frame(frame), len(frame.payload), frame.raw_length, frame.last)
    assert streams.take(KEY) is None  # the last frame never came: the sender sends afresh


def test_another_increment_or_compression_is_not_the_same_stream() -> None:
    streams = SharedStreams()
    _record(streams, KEY, b"y" * 2000)
    assert streams.take(StreamKey(SnapRef(1, 3), SnapRef(1, 5), NEVER_COMPRESS)) is None
    assert streams.take(StreamKey(SnapRef(1, 4), SnapRef(1, 6), NEVER_COMPRESS)) is None
    slow = CompressionPolicy(link_bytes_per_second=1e6)
    assert streams.take(StreamKey(SnapRef(1, 4), SnapRef(1, 5), slow)) is None
    assert streams.take(KEY) is not None


def test_a_new_recording_replaces_the_old_one() -> None:
    streams = SharedStreams()
    _record(streams, KEY, b"old" * 500)
    newer = StreamKey(SnapRef(1, 5), SnapRef(1, 6), NEVER_COMPRESS)
    _record(streams, newer, b"new" * 500)
    assert streams.take(KEY) is None
    assert streams.take(newer) is not None


def test_a_stream_larger_than_the_limit_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared_streams, "RECORD_LIMIT_BYTES", 4000)
    streams = SharedStreams()
    _record(streams, KEY, os.urandom(9000))
    assert streams.take(KEY) is None
    assert streams.held_bytes == 0


@given(data=st.binary(max_size=20_000), chunk=st.integers(1, 4096))
def test_a_replay_is_the_stream_paced_and_counted_as_the_original(data: bytes,
                                                                    chunk: int) -> None:
    streams = SharedStreams()
    _record(streams, KEY, data, chunk=chunk)
    frames = streams.take(KEY)
    assert frames is not None
    header = pb.StreamHeader(volume_id="vol-1", epoch=1)
    paced: list[int] = []
    counted: list[int] = []

    async def pace(n: int) -> None:
        paced.append(n)

    async def run() -> list[pb.PushMessage | bytes]:
        return [m async for m in replay(header, frames, pace, counted.append)]

    messages = asyncio.run(run())
    assert messages[0] == pb.PushMessage(header=header)
    decoder = FrameDecoder(chunk_limit=max(chunk, 1))
    got = b"".join(
        decoder.accept(frame_of(pb.PushMessage.FromString(m).frame))
        for m in messages[1:] if isinstance(m, bytes))
    assert got == data
    assert decoder.finished
    assert paced == [f.payload_bytes for f in frames]
    assert sum(counted) == len(data)


def test_recorded_frame_is_what_went_on_the_wire() -> None:
    frame = encode(b"abc", 2)[0]
    recorded = RecordedFrame(encode_frame(frame), len(frame.payload), frame.raw_length)
    assert pb.PushMessage.FromString(recorded.wire).frame.payload == b"ab"


def test_a_send_that_does_not_wait_for_the_recording_lets_it_go() -> None:
    """Asynchronous volumes stream to every peer at once: the peer the recording was kept for
    sends afresh, and the recording stops keeping frames then, not when it ends."""
    streams = SharedStreams()
    recorder = streams.record(KEY, 1)
    frames = encode(os.urandom(3000), 1000)
    recorder(encode_frame(frames[0]), len(frames[0].payload), frames[0].raw_length, False)
    assert streams.take(KEY) is None  # unfinished: that peer sends afresh
    assert streams.held_bytes == 0
    for frame in frames[1:]:
        recorder(encode_frame(frame), len(frame.payload), frame.raw_length, frame.last)
    assert streams.take(KEY) is None
    assert streams.held_bytes == 0
