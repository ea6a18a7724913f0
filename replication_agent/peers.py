"""gRPC channels to the other agents: one per peer, mutual TLS, keepalive to notice partitions."""

from typing import TYPE_CHECKING

import grpc

from .proto import agent_pb2 as pb
from .proto import agent_pb2_grpc
from .push_wire import request_wire
from .tls import PEER_SERVER_NAME, TlsConfig, channel_credentials

if TYPE_CHECKING:
    from .proto.agent_pb2_grpc import ReplicationAsyncStub

    PushCall = grpc.aio.StreamUnaryMultiCallable[pb.PushMessage | bytes, pb.PushResult]

PUSH_METHOD = "/sharedsync.agent.v1.Replication/Push"
#: Frames are at most 4 MiB raw (sharedsync.core.framing.MAX_CHUNK_SIZE) plus a few fields.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
#: Keepalive pings find a peer behind a partition within about 10 s, even mid-stream.
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
SERVER_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
]


def open_channel(address: str, tls: TlsConfig | None) -> grpc.aio.Channel:
    """A channel to an agent's network API: mutual TLS verified against the agents' shared
    name (peers dial by address), or plaintext in loopback development mode. Peers, the
    operator and the CSI controller all dial agents this one way."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(
        address, channel_credentials(tls),
        options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", PEER_SERVER_NAME)])


class PeerPool:
    """Lazily opened channels to peers by node name."""

    def __init__(self, addresses: dict[str, str], tls: TlsConfig | None) -> None:
        self.addresses = dict(addresses)
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _channel(self, node: str) -> grpc.aio.Channel:
        channel = self._channels.get(node)
        if channel is None:
            address = self.addresses.get(node)
            if address is None:
                raise KeyError(f"no address known for peer {node}")
            channel = open_channel(address, self.tls)
            self._channels[node] = channel
        return channel

    def stub(self, node: str) -> "ReplicationAsyncStub":
        return agent_pb2_grpc.ReplicationStub(self._channel(node))

    def push(self, node: str) -> "PushCall":
        """``Replication.Push`` to ``node``, taking frames already encoded
        (``transfer.stream_snapshot``'s output; see ``push_wire``)."""
        return self._channel(node).stream_unary(
            PUSH_METHOD, request_serializer=request_wire,
            response_deserializer=pb.PushResult.FromString)

    async def update(self, addresses: dict[str, str]) -> None:
        """Take a new address book; channels to moved or removed peers are closed."""
        for node, channel in list(self._channels.items()):
            if addresses.get(node) != self.addresses.get(node):
                await channel.close()
                del self._channels[node]
        self.addresses = dict(addresses)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
