"""The operator's side of the Agent API: which agents are alive, what they hold, and the calls.

Agents announce themselves with Leases (operator/API.md, "Agent leases"); :class:`Agents` keeps
one gRPC channel (mutual TLS) per live agent and a cache of each agent's last ``GetStatus``,
refreshed by :meth:`Agents.poll_forever`. Reconciles read the cache instead of calling every
agent for every volume; the calls that change something (apply, promote, remove, sync now)
go straight to the agent and refresh the cache with the status they return.
"""

import asyncio
import datetime
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import structlog

from replication_agent.peers import open_channel
from replication_agent.proto import agent_pb2 as pb
from replication_agent.proto import agent_pb2_grpc
from replication_agent.tls import TlsConfig
from sharedsync.core.placement import BTRFS
from sharedsync.leases import STORE_FILESYSTEM_ANNOTATION, expires_at

if TYPE_CHECKING:
    from replication_agent.proto.agent_pb2_grpc import AgentAsyncStub, ReplicationAsyncStub

log = structlog.get_logger(__name__)

#: How long one Agent API call may take before the reconcile gives up on it (SyncNow waits
#: for the peers, so it gets longer).
CALL_TIMEOUT_SECONDS = 30.0
SYNC_NOW_TIMEOUT_SECONDS = 300.0
POLL_INTERVAL_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """One agent as its Lease describes it."""

    node: str
    address: str
    expires: datetime.datetime | None
    capacity_bytes: int = 0
    available_bytes: int = 0
    #: What the agent makes new replicas with (Lease annotation; older agents: btrfs only).
    store_filesystem: str = BTRFS

    def alive(self, now: datetime.datetime) -> bool:
        return self.expires is not None and now < self.expires


def agent_from_lease(lease: Mapping[str, object]) -> AgentInfo | None:
    """Read an agent Lease (a dict as kopf gives it); None if it is not an agent's."""
    metadata = lease.get("metadata")
    if not isinstance(metadata, Mapping):
        return None
    annotations = metadata.get("annotations") or {}
    assert isinstance(annotations, Mapping)
    node = annotations.get("sharedsync.io/node")
    address = annotations.get("sharedsync.io/address")
    if not node or not address:
        return None

    def number(key: str) -> int:
        try:
            return int(str(annotations.get(key, "0")))
        except ValueError:
            return 0
    return AgentInfo(node=str(node), address=str(address), expires=expires_at(lease),
                     capacity_bytes=number("sharedsync.io/capacity-bytes"),
                     available_bytes=number("sharedsync.io/available-bytes"),
                     store_filesystem=str(annotations.get(STORE_FILESYSTEM_ANNOTATION) or BTRFS))


@dataclass
class Agents:
    """Channels to the live agents and the cache of what they last reported."""

    tls: TlsConfig | None
    leases: dict[str, AgentInfo] = field(default_factory=dict)
    statuses: dict[str, pb.AgentStatus] = field(default_factory=dict)
    #: When each node's agent was last seen alive (monotonic), to say how long it is gone.
    last_alive: dict[str, float] = field(default_factory=dict)
    _channels: dict[str, tuple[str, grpc.aio.Channel]] = field(default_factory=dict)
    #: The answer :meth:`alive` gave last, to log each agent that is lost or returns once.
    _alive_before: frozenset[str] = frozenset()

    @classmethod
    def from_files(cls, ca: Path | None, cert: Path | None, key: Path | None) -> "Agents":
        if ca is None and cert is None and key is None:
            return cls(tls=None)
        if ca is None or cert is None or key is None:
            raise ValueError("agent TLS needs all of --agent-ca, --agent-cert, --agent-key")
        return cls(tls=TlsConfig(ca=ca, cert=cert, key=key))

    # -- who is alive ------------------------------------------------------------------------

    def observe_leases(self, leases: Iterable[AgentInfo]) -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.leases = {info.node: info for info in leases}
        for info in self.leases.values():
            if info.alive(now):
                self.last_alive[info.node] = time.monotonic()

    def alive(self) -> set[str]:
        now = datetime.datetime.now(datetime.UTC)
        alive = {node for node, info in self.leases.items() if info.alive(now)}
        if alive != self._alive_before:
            # every failover and replacement decision starts here: say when it changes
            for node in sorted(self._alive_before - alive):
                info = self.leases.get(node)
                log.info("agent lease expired", node=node,
                         expired=info.expires.isoformat() if info and info.expires else None)
            for node in sorted(alive - self._alive_before):
                log.info("agent lease current", node=node)
            self._alive_before = frozenset(alive)
        return alive

    def down_for(self, nodes: Iterable[str], alive: set[str] | None = None) -> dict[str, float]:
        """Seconds each of ``nodes`` whose agent is not alive has been gone (measured from its
        Lease's expiry; a node never seen counts from the operator's start). ``alive`` is the
        caller's :meth:`alive`, so that both answers describe the same moment."""
        now = datetime.datetime.now(datetime.UTC)
        alive = self.alive() if alive is None else alive
        gone: dict[str, float] = {}
        for node in nodes:
            if node in alive:
                continue
            info = self.leases.get(node)
            if info is not None and info.expires is not None:
                gone[node] = max(0.0, (now - info.expires).total_seconds())
            else:
                gone[node] = max(0.0, time.monotonic() - self.last_alive.get(node, _STARTED))
        return gone

    def addresses(self) -> dict[str, str]:
        return {node: info.address for node, info in self.leases.items()}

    def volume_reports(self, volume_id: str) -> dict[str, pb.VolumeStatus]:
        """Every live agent's status of ``volume_id`` (agents that do not hold it are absent)."""
        alive = self.alive()
        found = {}
        for node, status in self.statuses.items():
            if node not in alive:
                continue
            for volume in status.volumes:
                if volume.volume_id == volume_id:
                    found[node] = volume
        return found

    # -- calls -------------------------------------------------------------------------------

    def _stub(self, node: str) -> "AgentAsyncStub":
        info = self.leases.get(node)
        if info is None:
            raise LookupError(f"no agent lease for node {node}")
        known = self._channels.get(node)
        if known is None or known[0] != info.address:
            if known is not None:
                asyncio.get_running_loop().create_task(known[1].close())
            channel = open_channel(info.address, self.tls)
            known = (info.address, channel)
            self._channels[node] = known
        return agent_pb2_grpc.AgentStub(known[1])

    def _remember(self, node: str, volume: pb.VolumeStatus) -> None:
        status = self.statuses.get(node)
        if status is None:
            return
        kept = [v for v in status.volumes if v.volume_id != volume.volume_id]
        del status.volumes[:]
        status.volumes.extend([*kept, volume])

    def _forget(self, node: str, volume_id: str) -> None:
        status = self.statuses.get(node)
        if status is not None:
            kept = [v for v in status.volumes if v.volume_id != volume_id]
            del status.volumes[:]
            status.volumes.extend(kept)

    async def apply(self, node: str, spec: pb.VolumeSpec) -> pb.VolumeStatus:
        status = await self._stub(node).ApplyVolume(pb.ApplyVolumeRequest(spec=spec),
                                                   timeout=CALL_TIMEOUT_SECONDS)
        self._remember(node, status)
        return status

    async def promote(self, node: str, volume_id: str, epoch: int) -> pb.VolumeStatus:
        status = await self._stub(node).Promote(
            pb.PromoteRequest(volume_id=volume_id, epoch=epoch), timeout=CALL_TIMEOUT_SECONDS)
        self._remember(node, status)
        return status

    async def remove(self, node: str, volume_id: str) -> None:
        await self._stub(node).RemoveVolume(pb.RemoveVolumeRequest(volume_id=volume_id),
                                            timeout=CALL_TIMEOUT_SECONDS)
        self._forget(node, volume_id)

    async def sync_now(self, node: str, volume_id: str,
                       handover_to: str = "") -> pb.VolumeStatus:
        """One sync cycle on the primary ``node``; with ``handover_to``, the first step of
        moving the primary to that node, where a pod waits (refused while pods on ``node`` use
        it; waits for that replica alone, so that a replica that is down does not hold it)."""
        status = await self._stub(node).SyncNow(
            pb.SyncNowRequest(volume_id=volume_id, handover=bool(handover_to),
                              handover_to=handover_to),
            timeout=SYNC_NOW_TIMEOUT_SECONDS)
        self._remember(node, status)
        return status

    async def create_snapshot(self, node: str, volume_id: str, snapshot_id: str,
                              source: pb.SnapshotRef | None = None) -> pb.SnapshotStatus:
        """A CSI snapshot of the node's replica (the primary syncs first, so it may take as
        long as SyncNow)."""
        request = pb.CreateSnapshotRequest(volume_id=volume_id, snapshot_id=snapshot_id)
        if source is not None:
            request.source.CopyFrom(source)
        reply: pb.SnapshotStatus = await self._stub(node).CreateSnapshot(
            request, timeout=SYNC_NOW_TIMEOUT_SECONDS)
        return reply

    async def delete_snapshot(self, node: str, volume_id: str, snapshot_id: str) -> None:
        await self._stub(node).DeleteSnapshot(
            pb.DeleteSnapshotRequest(volume_id=volume_id, snapshot_id=snapshot_id),
            timeout=CALL_TIMEOUT_SECONDS)

    def snapshot_holders(self, snapshot_id: str) -> set[str]:
        """Live agents whose last status lists the CSI snapshot ``snapshot_id``."""
        alive = self.alive()
        return {node for node, status in self.statuses.items() if node in alive
                and any(s.snapshot_id == snapshot_id for v in status.volumes
                        for s in v.snapshots)}

    async def resync(self, primary: str, volume_id: str, node: str, reason: str) -> None:
        """Ask the primary to re-read what ``node`` holds and ship what it lacks (after that
        replica was dropped and recreated empty)."""
        self._stub(primary)  # opens (or reuses) the channel to the primary
        channel = self._channels[primary][1]
        stub: ReplicationAsyncStub = agent_pb2_grpc.ReplicationStub(channel)
        await stub.Resync(pb.ResyncRequest(volume_id=volume_id, node=node, reason=reason),
                          timeout=CALL_TIMEOUT_SECONDS)

    async def refresh(self, node: str, call_timeout: float = CALL_TIMEOUT_SECONDS) -> None:
        try:
            self.statuses[node] = await self._stub(node).GetStatus(
                pb.GetStatusRequest(), timeout=call_timeout)
        except (grpc.aio.AioRpcError, LookupError) as exc:
            self.statuses.pop(node, None)
            log.info("agent status unavailable", node=node, error=str(exc)[:200])

    async def poll_once(self, call_timeout: float = CALL_TIMEOUT_SECONDS) -> None:
        alive = self.alive()
        for node in list(self.statuses):
            if node not in alive:
                del self.statuses[node]
        await asyncio.gather(*(self.refresh(node, call_timeout) for node in sorted(alive)))

    async def poll_forever(self, interval: float = POLL_INTERVAL_SECONDS) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()


_STARTED = time.monotonic()
