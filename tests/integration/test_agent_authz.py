"""Per-method authorization on a real agent's network port, with real certificates.

One agent listens on loopback over mutual TLS. Three callers hold certificates of its CA: a
peer agent (``b``), the operator (``sharedsync-operator``, the agents' default controller
name) and a client the agent was not told about. Each kind of handler (unary, client stream,
server stream, bidirectional) is refused before it runs when the caller's certificate does
not grant the method, and nothing changes on the agent.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from replication_agent.dev_pki import issue_dev_pki
from replication_agent.process import AgentProcess
from replication_agent.proto import agent_pb2 as pb
from replication_agent.proto import agent_pb2_grpc
from replication_agent.tls import CONTROLLER_NAME, PEER_SERVER_NAME, TlsConfig, channel_credentials
from tests.integration.agent_harness import volume_spec
from tests.integration.conftest import free_port
from tests.leaks import force_cleanup

VOLUME = "vol-" + "a5" * 12
DENIED = grpc.StatusCode.PERMISSION_DENIED


class Caller:
    """One certificate's view of the agent: its two services over one TLS channel."""

    def __init__(self, address: str, tls: TlsConfig) -> None:
        self.channel = grpc.secure_channel(
            address, channel_credentials(tls),
            options=[("grpc.ssl_target_name_override", PEER_SERVER_NAME)])
        self.agent = agent_pb2_grpc.AgentStub(self.channel)
        self.replication = agent_pb2_grpc.ReplicationStub(self.channel)

    def code(self, call: Callable[[], Any]) -> grpc.StatusCode:
        """The status ``call`` ends with (streams are read to their end)."""
        try:
            result = call()
            if isinstance(result, grpc.Call) and hasattr(result, "__iter__"):
                for _ in result:
                    pass
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, dict[str, Caller], str]]:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root: the agent makes real loop devices, btrfs and mounts")
    port, peer_port, metrics_port = free_port(), free_port(), free_port()
    issued = {i.node: i.tls for i in issue_dev_pki(
        tmp_path / "pki", {"a": f"127.0.0.1:{port}", "b": f"127.0.0.1:{peer_port}"},
        controllers=[CONTROLLER_NAME, "unlisted-tool"])}
    tls = issued["a"]
    process = AgentProcess(node="a", listen=f"127.0.0.1:{port}", workdir=tmp_path / "a", config={
        "node": "a", "listen": f"127.0.0.1:{port}",
        "controlSocket": str(tmp_path / "a" / "agent.sock"),
        "dataDir": str(tmp_path / "a" / "data"),
        "metricsAddress": f"127.0.0.1:{metrics_port}",
        "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
        "peers": {"b": f"127.0.0.1:{peer_port}"}})
    process.start()
    callers = {name: Caller(f"127.0.0.1:{port}", issued[name])
               for name in ("b", CONTROLLER_NAME, "unlisted-tool")}
    try:
        yield process, callers, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        for caller in callers.values():
            caller.channel.close()
        process.stop()
        force_cleanup(tmp_path)


def test_only_the_operator_controls_an_agent_and_only_agents_replicate(
        agent: tuple[AgentProcess, dict[str, Caller], str]) -> None:
    process, callers, metrics_url = agent
    peer, operator, unlisted = callers["b"], callers[CONTROLLER_NAME], callers["unlisted-tool"]
    spec = volume_spec(VOLUME, ["a"], "a")

    # the operator applies a volume and reads the status over the network
    assert operator.code(lambda: operator.agent.ApplyVolume(
        pb.ApplyVolumeRequest(spec=spec), timeout=120)) == grpc.StatusCode.OK
    assert operator.code(lambda: operator.agent.GetStatus(
        pb.GetStatusRequest(), timeout=30)) == grpc.StatusCode.OK

    # a peer's certificate (a stolen one, say) reaches none of the control API
    control: dict[str, Callable[[], Any]] = {
        "RemoveVolume": lambda: peer.agent.RemoveVolume(
            pb.RemoveVolumeRequest(volume_id=VOLUME), timeout=30),
        "Promote": lambda: peer.agent.Promote(
            pb.PromoteRequest(volume_id=VOLUME, epoch=9), timeout=30),
        "ApplyVolume": lambda: peer.agent.ApplyVolume(
            pb.ApplyVolumeRequest(spec=volume_spec(VOLUME, ["a"], "a", epoch=5)), timeout=30),
        "GetStatus": lambda: peer.agent.GetStatus(pb.GetStatusRequest(), timeout=30),
    }
    for name, call in control.items():
        assert peer.code(call) == DENIED, name
    # nor does a certificate of the CA whose name the agent was not given
    assert unlisted.code(lambda: unlisted.agent.GetStatus(
        pb.GetStatusRequest(), timeout=30)) == DENIED
    assert unlisted.code(lambda: unlisted.replication.Holdings(
        pb.HoldingsRequest(volume_id=VOLUME), timeout=30)) == DENIED

    # the operator speaks none of the replication protocol but Resync, whatever the
    # handler's kind: unary, client stream, server stream, both ways
    replication: dict[str, Callable[[], Any]] = {
        "Holdings": lambda: operator.replication.Holdings(
            pb.HoldingsRequest(volume_id=VOLUME), timeout=30),
        "Push": lambda: operator.replication.Push(iter([pb.PushMessage(
            header=pb.StreamHeader(volume_id=VOLUME, epoch=9, sender_node="b"))]), timeout=30),
        "FetchFile": lambda: operator.replication.FetchFile(
            pb.FetchFileRequest(volume_id=VOLUME, path="x"), timeout=30),
        "Journal": lambda: operator.replication.Journal(iter([]), timeout=30),
    }
    for name, call in replication.items():
        assert operator.code(call) == DENIED, name
    assert operator.code(lambda: operator.replication.Resync(
        pb.ResyncRequest(volume_id=VOLUME, node="b", reason="test"), timeout=30)) != DENIED

    # the peer may: its Holdings answer shows the volume at the epoch it was applied with
    holdings = peer.replication.Holdings(pb.HoldingsRequest(volume_id=VOLUME), timeout=30)
    assert holdings.epoch == 1

    # nothing the refused calls asked for happened
    status = process.volume(VOLUME)  # over the node-local socket, open to the node
    assert (status.epoch, status.role) == (1, "primary")
    metrics = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    assert 'sharedsync_agent_rpc_denied_total{method_name="/sharedsync.agent.v1.Agent/' \
        'RemoveVolume"} 1.0' in metrics

    assert operator.code(lambda: operator.agent.RemoveVolume(
        pb.RemoveVolumeRequest(volume_id=VOLUME), timeout=120)) == grpc.StatusCode.OK
    assert not process.status().volumes
