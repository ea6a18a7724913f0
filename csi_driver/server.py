"""Assemble and run a plugin process: the services its role calls for, on one gRPC socket."""

import contextlib
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from sharedsync.core.errors import InvalidArgument
from sharedsync.lifecycle import until_terminated
from sharedsync.storage.replicas import ReplicaStore

from .backend import LocalBackend, VolumeBackend
from .config import PluginConfig
from .controller import ControllerService
from .identity import IdentityService, ReadinessCheck
from .interceptor import csi_interceptor
from .node import NodeService, NodeServiceBase
from .proto import csi_pb2_grpc
from .registration import RegistrationServer
from .state import StateStore, open_state_store

log = structlog.get_logger(__name__)
#: How long in-flight RPCs may finish after SIGTERM before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 10.0


def socket_path(endpoint: str) -> Path:
    """The filesystem path of a ``unix://`` endpoint (the only kind a CSI plugin serves)."""
    for prefix in ("unix://", "unix:"):
        if endpoint.startswith(prefix):
            path = endpoint[len(prefix):]
            if path.startswith("/"):
                return Path(path)
    raise InvalidArgument(f"endpoint must be unix:///absolute/path, got {endpoint!r}")


def _prepare_socket(path: Path) -> None:
    """Create the socket's directory and remove a stale socket left by a previous run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise InvalidArgument(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()


@dataclass
class Plugin:
    """A configured, not yet started, plugin process."""

    config: PluginConfig
    server: grpc.aio.Server
    state: StateStore | None
    #: Released after the server stopped (backend clients, agent channels).
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: kubelet's registration socket (``--kubelet-registration``), else None.
    registration: RegistrationServer | None = None

    async def start(self) -> None:
        path = socket_path(self.config.endpoint)
        _prepare_socket(path)
        self.server.add_insecure_port(self.config.endpoint)
        await self.server.start()
        os.chmod(path, 0o660)
        log.info("serving", endpoint=self.config.endpoint, role=str(self.config.role),
                 node_id=self.config.node_id)
        if self.registration is not None:
            # after the CSI socket is up: kubelet calls NodeGetInfo on it as it registers us
            try:
                await self.registration.start()
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        if self.registration is not None:
            await self.registration.stop()  # first: kubelet deregisters before the CSI socket goes
        await self.server.stop(SHUTDOWN_GRACE_SECONDS)
        if self.state is not None:
            await self.state.close()
        for close in self.closers:
            await close()
        with contextlib.suppress(FileNotFoundError):
            socket_path(self.config.endpoint).unlink()


async def _controller_backend(config: PluginConfig, local: LocalBackend) -> VolumeBackend:
    """Standalone: replicas on this node. Cluster mode: SharedVolumes through the operator."""
    if not config.cluster_controller:
        return local
    # imported only when used: standalone never loads the Kubernetes client
    from replication_agent.tls import TlsConfig

    from .cluster_backend import ClusterBackend

    tls = None
    if config.agent_tls is not None:
        ca, cert, key = config.agent_tls
        tls = TlsConfig(ca=ca, cert=cert, key=key)
    return await ClusterBackend.connect(config.kubeconfig, config.namespace, agent_tls=tls,
                                        wait_seconds=config.operator_timeout)


def _all_of(checks: list[ReadinessCheck]) -> ReadinessCheck:
    async def ready() -> str | None:
        for check in checks:
            problem = await check()
            if problem:
                return problem
        return None
    return ready


async def build_plugin(config: PluginConfig) -> Plugin:
    """Create the gRPC server with the services ``config.role`` asks for (and open the
    controller's state store: SQLite on local disk, or SharedVolume objects in Kubernetes)."""
    store = ReplicaStore(config.replica_root)
    local = LocalBackend(store, config.node_id)
    server = grpc.aio.server(
        interceptors=[csi_interceptor(config.driver_name)],
        options=[("grpc.max_receive_message_length", config.max_message_bytes),
                 ("grpc.max_send_message_length", config.max_message_bytes)],
    )
    state: StateStore | None = None
    closers: list[Callable[[], Awaitable[None]]] = []
    checks: list[ReadinessCheck] = []
    if config.serves_controller:
        state = await open_state_store(config)
        backend = await _controller_backend(config, local)
        closers.append(backend.close)
        checks.append(backend.ready)
        csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(state, backend), server)
    if config.serves_node:
        node: NodeServiceBase
        if config.agent_socket is not None:
            from .agent_client import AgentClient
            from .node_agent import AgentNodeService

            agent = AgentClient.local(config.agent_socket)
            closers.append(agent.close)
            node = AgentNodeService(agent, config.staged_dir, config.node_id,
                                    config.allowed_path_roots)
            checks.append(node.ready)
        else:
            node = NodeService(store, config.node_id, config.allowed_path_roots)
            if local.ready not in checks:
                checks.append(local.ready)
        csi_pb2_grpc.add_NodeServicer_to_server(node, server)
    identity = IdentityService(config.driver_name, controller=config.serves_controller,
                               readiness=_all_of(checks))
    csi_pb2_grpc.add_IdentityServicer_to_server(identity, server)
    registration = (RegistrationServer.for_driver(config.kubelet_dir, config.driver_name,
                                                  config.kubelet_csi_endpoint)
                    if config.registers_with_kubelet else None)
    return Plugin(config, server, state, closers, registration)


async def serve(config: PluginConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls and exit."""
    plugin = await build_plugin(config)
    await plugin.start()
    await until_terminated()
    log.info("stopping")
    await plugin.stop()
