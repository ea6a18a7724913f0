"""Run an agent: the peer/control API on TCP (mutual TLS), the control API on a unix socket."""

import asyncio
import contextlib
import sys

import grpc
import structlog
from prometheus_client import Histogram

from sharedsync.core.isolation import probe_seconds
from sharedsync.lifecycle import until_terminated
from sharedsync.rpc_interceptor import ErrorMappingInterceptor
from sharedsync.tasks import cancel_and_wait

from .agent import Agent, ensure_dirs
from .authz import CallerCheckInterceptor
from .config import AgentConfig
from .heap import keep_large_buffers
from .peers import SERVER_OPTIONS
from .proto import agent_pb2_grpc
from .tls import server_credentials

log = structlog.get_logger(__name__)
SHUTDOWN_GRACE_SECONDS = 5.0
RPC_SECONDS = Histogram(
    "sharedsync_agent_rpc_duration_seconds", "Agent API calls by method and status",
    ["method_name", "grpc_status_code"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600))


def build_servers(agent: Agent, config: AgentConfig) -> tuple[grpc.aio.Server, grpc.aio.Server]:
    """The network server (peers, operator) and the local one (CSI node plugin, CLI)."""
    interceptor = ErrorMappingInterceptor(RPC_SECONDS)
    # over TLS, each call's certificate must grant its method (the local socket is the node's)
    checks = [] if config.tls is None else [CallerCheckInterceptor(config.controller_names)]
    network = grpc.aio.server(interceptors=[*checks, interceptor], options=SERVER_OPTIONS)
    local = grpc.aio.server(interceptors=[interceptor], options=SERVER_OPTIONS)
    for server in (network, local):
        agent_pb2_grpc.add_AgentServicer_to_server(agent, server)
    agent_pb2_grpc.add_ReplicationServicer_to_server(agent, network)
    if config.tls is None:
        network.add_insecure_port(config.listen)
    else:
        network.add_secure_port(config.listen, server_credentials(config.tls))
    config.control_socket.unlink(missing_ok=True)
    local.add_insecure_port(f"unix://{config.control_socket}")
    return network, local


async def serve(config: AgentConfig) -> None:
    """Run until SIGTERM or SIGINT."""
    ensure_dirs(config)
    # The FUSE daemon's threads and the event loop hand each fsync to each other several times
    # (reader -> commit worker -> loop -> commit worker); with the default 5 ms switch interval
    # a busy thread made each handoff wait. Measured with the fsync journal (quick bench sync):
    # P50 3.7 ms at 5 ms, 3.0-4.1 at 0.5 ms, 2.5-3.1 at 0.1 ms, no better at 0.05 ms; the
    # replication throughput did not move.
    sys.setswitchinterval(0.0001)
    keep_large_buffers()
    agent = Agent(config)
    network, local = build_servers(agent, config)
    # volumes are reopened (and interrupted receives discarded) before anyone can call us
    await agent.start()
    await network.start()
    await local.start()
    announcer = None
    guard: asyncio.Task[None] | None = None
    if config.kubernetes is not None:
        from .announce import Announcer
        announcer = Announcer(config, agent.store.filesystem)
        announcer.start()
        probe = probe_seconds(config.kubernetes.lease_duration_seconds)
        guard = asyncio.create_task(agent.guard_isolation(announcer.lapsed, probe),
                                    name="isolation")
    log.info("agent serving", node=config.node, listen=config.listen,
             control_socket=str(config.control_socket), volumes=len(agent.engines),
             tls=config.tls is not None, kubernetes=config.kubernetes is not None,
             store_filesystem=str(agent.store.filesystem))
    await until_terminated()
    log.info("agent stopping")
    if guard is not None:
        await cancel_and_wait(guard)
    if announcer is not None:
        await announcer.stop()
    await asyncio.gather(network.stop(SHUTDOWN_GRACE_SECONDS),
                         local.stop(SHUTDOWN_GRACE_SECONDS))
    await agent.stop()
    with contextlib.suppress(FileNotFoundError):
        config.control_socket.unlink()
