"""replication_agent.push_wire: frames encoded by hand must be protobuf's own bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from replication_agent.peers import PUSH_METHOD
from replication_agent.proto import agent_pb2 as pb
from replication_agent.proto import agent_pb2_grpc
from replication_agent.push_wire import encode_frame, request_wire
from replication_agent.transfer import frame_message, frame_of
from sharedsync.core.framing import Frame, encode

frames = st.builds(
    Frame,
    seq=st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=4096) | st.sampled_from([b"", b"\0" * 200_000]),
    compressed=st.booleans(),
    raw_length=st.integers(0, 2**32 - 1),
    checksum=st.binary(max_size=40),
    last=st.booleans(),
    stream_digest=st.binary(max_size=40),
)


@given(frames)
def test_an_encoded_frame_is_what_protobuf_serializes(frame: Frame) -> None:
    wire = encode_frame(frame)
    assert wire == frame_message(frame).SerializeToString()
    parsed = pb.PushMessage.FromString(wire)
    assert parsed.WhichOneof("body") == "frame"
    assert frame_of(parsed.frame) == frame


def test_a_real_stream_parses_back_frame_by_frame() -> None:
    data = bytes(range(256)) * 20_000  # 5 MiB: several 1 MiB frames and a tail
    for frame in encode(data):
        assert frame_of(pb.PushMessage.FromString(encode_frame(frame)).frame) == frame


def test_the_push_serializer_passes_encoded_frames_and_serializes_messages() -> None:
    header = pb.PushMessage(header=pb.StreamHeader(volume_id="vol-1", epoch=3))
    assert request_wire(header) == header.SerializeToString()
    wire = encode_frame(encode(b"abc")[0])
    assert request_wire(wire) is wire


def test_the_push_call_names_the_method_the_generated_stub_calls() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.methods: list[str] = []

        def __getattr__(self, kind: str) -> object:
            def record(method: str, **_: object) -> None:
                self.methods.append(method)
            return record

    channel = Recorder()
    agent_pb2_grpc.ReplicationStub(channel)  # type: ignore[call-overload]
    assert PUSH_METHOD in channel.methods
