"""The multi-node part of the demo: three real agents replicating a volume on this machine.

Three ``sharedsync-agent`` processes play three nodes (each with its own data directory,
replicas and control socket), talking mutual TLS on loopback with certificates from a CA made
for the run. The demo writes checksummed records through the Synchronous data path, changes the
policy live, kills the primary's agent with SIGKILL, promotes a replica, checks that every
acknowledged record survived, and brings the old primary back as a fenced replica.
"""

import functools
import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from replication_agent.dev_pki import issue_dev_pki
from replication_agent.process import AgentProcess
from replication_agent.proto import agent_pb2 as pb

NODES = ("node-a", "node-b", "node-c")
VOLUME = "vol-" + "de" * 12
STATES = {pb.IN_SYNC: "InSync", pb.LAGGING: "Lagging", pb.REBUILDING: "Rebuilding",
          pb.STALE: "Stale", pb.FAILED: "Failed"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _record(i: int) -> bytes:
    body = f"record {i:06d} written through sharedsync ".encode()
    return f"{i:06d} {hashlib.sha256(body).hexdigest()} ".encode() + body + b"\n"


def _verify(root: Path, acked: list[int]) -> int:
    found = {}
    for line in (root / "records.log").read_bytes().splitlines():
        number, digest, body = line.split(b" ", 2)
        found[int(number)] = hashlib.sha256(body).hexdigest() == digest.decode()
    lost = [i for i in acked if not found.get(i)]
    if lost:
        raise RuntimeError(f"{len(lost)} acknowledged records missing or corrupt: {lost[:5]}")
    return len(acked)


def _spec(primary: str, mode: pb.Mode.ValueType, epoch: int = 1) -> pb.VolumeSpec:
    return pb.VolumeSpec(
        volume_id=VOLUME, size_bytes=256 << 20, kind="filesystem", replica_nodes=list(NODES),
        primary_node=primary, epoch=epoch,
        policy=pb.VolumePolicy(mode=mode, replicas=3, write_quorum=2, max_lag_seconds=1.0,
                               priority=1))


def _table(agent: AgentProcess) -> str:
    status = agent.volume(VOLUME)
    lines = [f"     volume {status.volume_id}  mode {pb.Mode.Name(status.mode)}  epoch "
             f"{status.epoch}  primary {status.primary_node}  sync P50/P99 "
             f"{status.sync_latency_p50_seconds * 1000:.1f}/"
             f"{status.sync_latency_p99_seconds * 1000:.1f} ms  shipped "
             f"{status.bytes_shipped} B"]
    for replica in status.replicas:
        lines.append(f"       {replica.node:<8} {replica.role:<8} "
                     f"{STATES.get(replica.state, '?'):<10} lag {replica.lag_seconds:5.2f} s  "
                     f"snapshot e{replica.last_received.epoch}-s{replica.last_received.seq}")
    return "\n".join(lines)


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def run_cluster_demo(workdir: Path, step: Callable[[str, Callable[[], Any]], Any]) -> None:
    """Drive three agents through sync, a live policy change, a failover and a rejoin."""
    ports = {node: _free_port() for node in NODES}
    pki = issue_dev_pki(workdir / "pki", {n: f"127.0.0.1:{p}" for n, p in ports.items()})
    tls = {issued.node: issued.tls for issued in pki}
    agents: dict[str, AgentProcess] = {}
    for node in NODES:
        config = {"node": node, "listen": f"127.0.0.1:{ports[node]}",
                  "controlSocket": str(workdir / node / "agent.sock"),
                  "dataDir": str(workdir / node / "data"),
                  "tls": {"ca": str(tls[node].ca), "cert": str(tls[node].cert),
                          "key": str(tls[node].key)},
                  "peers": {n: f"127.0.0.1:{p}" for n, p in ports.items() if n != node}}
        agents[node] = AgentProcess(node=node, listen=f"127.0.0.1:{ports[node]}",
                                    workdir=workdir / node, config=config)
    a, b, c = (agents[n] for n in NODES)
    try:
        for agent in agents.values():
            step(f"start agent {agent.node} (mutual TLS on loopback)", agent.start)
        spec = _spec("node-a", pb.SYNCHRONOUS)
        for agent in agents.values():
            step(f"apply a Synchronous volume (3 replicas, quorum 2) on {agent.node}",
                 functools.partial(agent.call, "ApplyVolume", pb.ApplyVolumeRequest(spec=spec)))
        mount = Path(step("attach it on node-a (FUSE, kernel passthrough)", lambda: a.call(
            "Attach", pb.AttachRequest(volume_id=VOLUME)).path))
        acked: list[int] = []

        def write(first: int, count: int) -> None:
            with open(mount / "records.log", "ab") as out:
                for i in range(first, first + count):
                    out.write(_record(i))
                    out.flush()
                    os.fsync(out.fileno())  # returns once 2 of 3 replicas hold the record
                    acked.append(i)

        step("write 200 records, fsync each (quorum acknowledged)", lambda: write(0, 200))
        print(_table(a))
        step("switch the policy to Asynchronous live (no remount)", lambda: [
            ag.call("ApplyVolume", pb.ApplyVolumeRequest(spec=_spec("node-a", pb.ASYNCHRONOUS)))
            for ag in agents.values()])
        step("write 200 more records at local speed", lambda: write(200, 200))
        step("back to Synchronous, sync now", lambda: ([
            ag.call("ApplyVolume", pb.ApplyVolumeRequest(spec=spec)) for ag in agents.values()],
            a.call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME))))
        print(_table(a))
        step("SIGKILL node-a's agent (the primary)", a.kill)
        step("promote node-b at epoch 2", lambda: b.call(
            "Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2)))
        verified = step("verify every acknowledged record on node-b",
                        lambda: _verify(b.live(VOLUME), acked))
        print(f"     {verified} of {len(acked)} acknowledged records intact on node-b")
        spec2 = _spec("node-b", pb.SYNCHRONOUS, epoch=2)
        for agent in (b, c):
            agent.call("ApplyVolume", pb.ApplyVolumeRequest(spec=spec2))
        step("restart node-a: it is fenced and rejoins as a replica", a.start)
        step("wait until every replica is in sync at epoch 2", lambda: _wait(
            lambda: a.volume(VOLUME).epoch == 2 and all(
                r.state == pb.IN_SYNC for r in b.volume(VOLUME).replicas), "replicas in sync"))
        print(_table(b))
        remove = pb.RemoveVolumeRequest(volume_id=VOLUME)
        for agent in agents.values():
            step(f"remove the volume from {agent.node}",
                 functools.partial(agent.call, "RemoveVolume", remove))
    finally:
        for agent in agents.values():
            agent.stop()
