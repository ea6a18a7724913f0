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

from replication_agent.heap import keep_large_buffers
from replication_agent.peers import SERVER_OPTIONS, PeerPool
from replication_agent.proto import agent_pb2 as pb
from replication_agent.proto import agent_pb2_grpc
from replication_agent.push_wire import encode_frame
from replication_agent.tls import TlsConfig, server_credentials
from sharedsync.core.framing import FrameEncoder

MiB = 1 << 20


def _tls(pki: Path, node: str) -> TlsConfig:
    return TlsConfig(ca=pki / "ca.crt", cert=pki / f"{node}.crt", key=pki / f"{node}.key")


class _Counter(agent_pb2_grpc.ReplicationServicer):
    """``spool=None``: count payload bytes. ``spool=DIR``: what a replica does with a full
    stream before ``btrfs receive`` (transfer._pump_frames: verify every frame, then a
    synchronous os.write of it to a spool file; fsync at the end)."""

    def __init__(self, spool: Path | None) -> None:
        self.spool = spool

    async def Push(self, request_iterator: AsyncIterator[pb.PushMessage],  # noqa: N802
                   context: Any) -> pb.PushResult:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.header.volume_id == "warm":
            async for _ in request_iterator:
                pass
            return pb.PushResult()
        if self.spool is None:
            total = 0
            async for message in request_iterator:
                if message.WhichOneof("body") == "frame":
                    total += len(message.frame.payload)
            return pb.PushResult(bytes_received=total)
        from replication_agent.transfer import _pump_frames
        from sharedsync.core.framing import FrameDecoder

        path = self.spool / "probe.stream"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        received = 0

        async def sink(raw: bytes) -> None:
            os.write(fd, raw)

        def progress(n: int) -> None:
            nonlocal received
            received += n

        try:
            await _pump_frames(request_iterator, sink, FrameDecoder(), progress)
            os.fsync(fd)
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
        return pb.PushResult(bytes_received=received)


async def serve(listen: str, tls: TlsConfig, spool: Path | None) -> None:
    import grpc

    server = grpc.aio.server(options=SERVER_OPTIONS)
    # a probe serves Push alone: the other methods stay UNIMPLEMENTED, as the base class has them
    agent_pb2_grpc.add_ReplicationServicer_to_server(_Counter(spool), server)  # type: ignore[abstract]
    port = server.add_secure_port(listen, server_credentials(tls))
    await server.start()
    print(json.dumps({"port": port}), flush=True)
    await server.wait_for_termination()


async def push(target: str, tls: TlsConfig, nbytes: int,
               snapshot: Path | None) -> dict[str, float]:
    buffers = [os.urandom(MiB) for _ in range(8)]
    pool = PeerPool({"peer": target}, tls)
    stub = pool.stub("peer")

    async def prebuilt() -> AsyncIterator[pb.PushMessage | bytes]:
        # a valid stream (sequence numbers, checksums, digest) from memory
        encoder = FrameEncoder()
        yield pb.PushMessage(header=pb.StreamHeader(volume_id="probe"))
        for i in range(nbytes // MiB):
            for frame in encoder.feed(buffers[i % len(buffers)]):
                yield encode_frame(frame)
        yield encode_frame(encoder.finish())

    def stream() -> AsyncIterator[pb.PushMessage | bytes]:
        if snapshot is None:
            return prebuilt()
        # the agent's own sender: btrfs send of a snapshot -> FrameEncoder -> messages
        from replication_agent.lineage import SnapRef
        from replication_agent.transfer import Outgoing, stream_snapshot

        class _OneSnapshot:
            def path(self, ref: SnapRef) -> Path:
                return snapshot  # type: ignore[return-value]

        ref = SnapRef(1, 1)
        header = pb.StreamHeader(volume_id="probe")
        return stream_snapshot(Outgoing(_OneSnapshot(), ref, None, header))  # type: ignore[arg-type]

    # one small call first so that the TLS handshake is not timed
    await stub.Push(stream_of(pb.PushMessage(header=pb.StreamHeader(volume_id="warm"))))
    t = time.perf_counter()
    reply = await pool.push("peer")(stream())
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
    parser.add_argument("--spool", type=Path, default=None,
                        help="server: verify and spool frames like a replica's full receive")
    parser.add_argument("--snapshot", type=Path, default=None,
                        help="client: stream `btrfs send SNAPSHOT` like the agent's sender")
    args = parser.parse_args(argv)
    keep_large_buffers()  # as the agent does (replication_agent.server)
    tls = _tls(args.pki, args.node)
    if args.mode == "server":
        asyncio.run(serve(args.listen, tls, args.spool))
    else:
        print(json.dumps(asyncio.run(push(args.target, tls, args.bytes, args.snapshot))),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
