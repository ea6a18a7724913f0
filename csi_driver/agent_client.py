"""The CSI plugin's side of the replication agent's Agent API (replication_agent/proto/agent.proto).

In a cluster the agents hold the replicas. The node plugin asks its own node's agent, over the
agent's control socket, to make a volume usable here (``Attach``: a directory to bind for a
filesystem volume, a file or device for a block volume) and to let it go (``Detach``); the
controller may ask any agent, over mutual TLS, what size its replica has.

The agent speaks the same status codes we do (``sharedsync.rpc_status``), so its errors are
turned back into our exceptions with its message kept verbatim: the CO shows the agent's own
sentence, for instance why this node may not serve the volume (FAILED_PRECONDITION).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from replication_agent.peers import open_channel
from replication_agent.proto import agent_pb2 as pb
from replication_agent.proto import agent_pb2_grpc
from replication_agent.tls import TlsConfig
from sharedsync.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    SharedsyncError,
    Unavailable,
    Unimplemented,
)

if TYPE_CHECKING:
    from replication_agent.proto.agent_pb2_grpc import AgentAsyncStub

#: Attach may start the volume's FUSE daemon; the other calls only read or stop things.
ATTACH_TIMEOUT_SECONDS = 60.0
CALL_TIMEOUT_SECONDS = 15.0

_ERRORS: dict[grpc.StatusCode, type[SharedsyncError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
}


def agent_error(exc: grpc.aio.AioRpcError, where: str) -> SharedsyncError:
    """Our exception for an Agent API error; ``where`` names the agent (for unreachable ones)."""
    code, details = exc.code(), exc.details() or ""
    known = _ERRORS.get(code)
    if known is not None:
        return known(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED):
        return Unavailable(f"the sharedsync agent {where} did not answer ({code.name}: "
                           f"{details}); retry")
    return Internal(f"the sharedsync agent {where} failed: {code.name}: {details}")


class AgentClient:
    """One agent's Agent API on one channel (opened on first use, in the running loop)."""

    def __init__(self, target: str, where: str, *, tls: TlsConfig | None = None) -> None:
        self.target = target
        self.where = where
        self._tls = tls
        self._channel: grpc.aio.Channel | None = None

    @classmethod
    def local(cls, socket: Path) -> AgentClient:
        """This node's agent, on its control socket (no TLS: the socket is root-only)."""
        return cls(f"unix://{socket}", f"at {socket}")

    @classmethod
    def remote(cls, node: str, address: str, tls: TlsConfig) -> AgentClient:
        """Another node's agent, on its mutual-TLS API (``address`` from its Lease)."""
        return cls(address, f"of node {node} ({address})", tls=tls)

    def _stub(self) -> AgentAsyncStub:
        if self._channel is None:
            self._channel = open_channel(self.target, self._tls)
        return agent_pb2_grpc.AgentStub(self._channel)

    async def attach(self, volume_id: str) -> str:
        try:
            response = await self._stub().Attach(pb.AttachRequest(volume_id=volume_id),
                                                 timeout=ATTACH_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise agent_error(exc, self.where) from exc
        if not response.path:
            raise Internal(f"the sharedsync agent {self.where} attached {volume_id} but named "
                           "no path")
        return response.path

    async def detach(self, volume_id: str) -> None:
        try:
            await self._stub().Detach(pb.DetachRequest(volume_id=volume_id),
                                      timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise agent_error(exc, self.where) from exc

    async def status(self, *volume_ids: str) -> pb.AgentStatus:
        """The agent's status (of ``volume_ids`` only, when given; unknown ones: NotFound)."""
        try:
            return await self._stub().GetStatus(
                pb.GetStatusRequest(volume_ids=list(volume_ids)), timeout=CALL_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            raise agent_error(exc, self.where) from exc

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()
