"""The agents' transport without the agent: a ``Replication.Push`` stream of 1 MiB frames.

``python -m bench.grpc_probe server --listen HOST:0 --pki DIR --node c`` serves a Push that
only counts what it receives (prints ``{"port": N}``); ``... client --target HOST:PORT --pki
DIR --node a --bytes N`` streams N bytes of prebuilt 1 MiB frames to it with the agents' own
channel (replication_agent.peers: mutual TLS, the same options) and prints ``{"bytes": N,
"seconds": T}``. Run in the cluster's namespaces through a link proxy, it gives the ceiling of
the gRPC + TLS + proxy path, to compare the agents' stream rates with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from replication_agent.config import TlsConfig
from replication_agent.peers import SERVER_OPTIONS, PeerPool
from replication_agent.proto import agent_pb2 as pb
from replication_agent.proto import agent_pb2_grpc
from replication_agent.tls import server_credentials
from replication_agent.transfer import frame_message
from sharedsync.core.framing import FrameEncoder

MiB = 1 << 20


def _tls(pki: Path, node: str) -> TlsConfig:
    return TlsConfig(ca=pki / "ca.crt", cert=pki / f"{node}.crt", key=pki / f"{node}.key")


class _Counter(agent_pb2_grpc.ReplicationServicer):
    async def Push(self, request_iterator: AsyncIterator[pb.PushMessage],  # noqa: N802
                   context: Any) -> pb.PushResult:
        total = 0
        async for message in request_iterator:
            if message.WhichOneof("body") == "frame":
                total += len(message.frame.payload)
        return pb.PushResult(bytes_received=total)


async def serve(listen: str, tls: TlsConfig) -> None:
    import grpc

    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_pb2_grpc.add_ReplicationServicer_to_server(_Counter(), server)
    port = server.add_secure_port(listen, server_credentials(tls))
    await server.start()
    print(json.dumps({"port": port}), flush=True)
    await server.wait_for_termination()


async def push(target: str, tls: TlsConfig, nbytes: int) -> dict[str, float]:
    encoder = FrameEncoder()
    messages = [frame_message(f) for f in encoder.feed(os.urandom(8 * MiB))]
    pool = PeerPool({"peer": target}, tls)
    stub = pool.stub("peer")

    async def stream() -> AsyncIterator[pb.PushMessage]:
        yield pb.PushMessage(header=pb.StreamHeader(volume_id="probe"))
        for i in range(nbytes // MiB):
            yield messages[i % len(messages)]

    # one small call first so that the TLS handshake is not timed
    await stub.Push(stream_of(pb.PushMessage(header=pb.StreamHeader(volume_id="warm"))))
    t = time.perf_counter()
    reply = await stub.Push(stream())
    seconds = time.perf_counter() - t
    await pool.close()
    return {"bytes": reply.bytes_received, "seconds": seconds}


async def stream_of(*messages: pb.PushMessage) -> AsyncIterator[pb.PushMessage]:
    for message in messages:
        yield message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_probe")
    parser.add_argument("mode", choices=["server", "client"])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--target", default="")
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--bytes", type=int, default=256 * MiB)
    args = parser.parse_args(argv)
    tls = _tls(args.pki, args.node)
    if args.mode == "server":
        asyncio.run(serve(args.listen, tls))
    else:
        print(json.dumps(asyncio.run(push(args.target, tls, args.bytes))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
