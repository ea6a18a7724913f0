"""kubelet plugin registration, served in-process instead of by node-driver-registrar.

kubelet's plugin watcher scans ``<kubelet-dir>/plugins_registry/`` for sockets, calls
``GetInfo`` on each to learn a CSI driver's name and CSI endpoint, registers it, and reports the
outcome with ``NotifyRegistrationStatus``. Where no registrar image can be had (no registry),
the node plugin serves that small API itself on a socket of its own: a separate gRPC server, so
the CSI services never answer on the registration socket and the registration API never goes
through the CSI interceptor.
"""

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from .proto import pluginregistration_pb2, pluginregistration_pb2_grpc

log = structlog.get_logger(__name__)

#: PluginInfo.type kubelet's CSI handler claims.
CSI_PLUGIN_TYPE = "CSIPlugin"
#: The CSI plugin-registration versions we speak (kubelet's CSI handler accepts 1.0.0).
SUPPORTED_VERSIONS = ("1.0.0",)
REGISTRY_DIR_NAME = "plugins_registry"
#: How long a registration call in flight may finish on stop: they answer at once.
STOP_GRACE_SECONDS = 2.0


class RegistrationSetupError(Exception):
    """The registration socket cannot be served (bad kubelet dir, something else at the path).

    Raised at start so the process fails loudly instead of running unregistered: kubelet would
    never find the driver and every mount would wait forever.
    """


def registration_socket(kubelet_dir: Path, driver_name: str) -> Path:
    """Where kubelet's plugin watcher looks for this driver's registration socket."""
    return kubelet_dir / REGISTRY_DIR_NAME / f"{driver_name}-reg.sock"


class RegistrationService(pluginregistration_pb2_grpc.RegistrationServicer):
    """Answers kubelet's plugin watcher: who we are and where our CSI socket is."""

    def __init__(self, driver_name: str, csi_endpoint: Path) -> None:
        self.driver_name = driver_name
        self.csi_endpoint = csi_endpoint
        #: The last status kubelet reported (None: none yet); for diagnostics.
        self.last_status: pluginregistration_pb2.RegistrationStatus | None = None

    async def GetInfo(self, request: pluginregistration_pb2.InfoRequest,  # noqa: N802
                      context: Any) -> pluginregistration_pb2.PluginInfo:
        log.debug("kubelet asked for plugin info", driver=self.driver_name)
        return pluginregistration_pb2.PluginInfo(
            type=CSI_PLUGIN_TYPE, name=self.driver_name, endpoint=str(self.csi_endpoint),
            supported_versions=list(SUPPORTED_VERSIONS))

    async def NotifyRegistrationStatus(  # noqa: N802
        self, request: pluginregistration_pb2.RegistrationStatus, context: Any,
    ) -> pluginregistration_pb2.RegistrationStatusResponse:
        # Unlike node-driver-registrar we do not exit on a refusal: the CSI socket would go with
        # us, and kubelet retries the registration on its own as long as our socket is there.
        self.last_status = request
        if request.plugin_registered:
            log.info("registered with kubelet", driver=self.driver_name,
                     endpoint=str(self.csi_endpoint))
        else:
            log.error("kubelet refused the registration", driver=self.driver_name,
                      endpoint=str(self.csi_endpoint), error=request.error)
        return pluginregistration_pb2.RegistrationStatusResponse()


def _prepare(path: Path, kubelet_dir: Path) -> None:
    """Check kubelet's dir, create the registry dir, and remove a stale socket of ours."""
    if not kubelet_dir.is_dir():
        raise RegistrationSetupError(
            f"--kubelet-dir {kubelet_dir} is not a directory: kubelet registration needs "
            "kubelet's root directory (mounted from the host)")
    try:
        path.parent.mkdir(exist_ok=True)
    except OSError as exc:
        raise RegistrationSetupError(f"cannot create {path.parent}: {exc}") from exc
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise RegistrationSetupError(f"{path} exists and is not a socket; refusing to replace it")
    path.unlink()


@dataclass
class RegistrationServer:
    """The registration socket's own gRPC server."""

    socket: Path
    kubelet_dir: Path
    service: RegistrationService
    server: grpc.aio.Server | None = None

    @classmethod
    def for_driver(cls, kubelet_dir: Path, driver_name: str,
                   csi_endpoint: Path) -> "RegistrationServer":
        return cls(registration_socket(kubelet_dir, driver_name), kubelet_dir,
                   RegistrationService(driver_name, csi_endpoint))

    async def start(self) -> None:
        """Serve on the socket; call once the CSI socket answers (kubelet calls it next)."""
        _prepare(self.socket, self.kubelet_dir)
        server = grpc.aio.server()
        pluginregistration_pb2_grpc.add_RegistrationServicer_to_server(self.service, server)
        try:
            server.add_insecure_port(f"unix://{self.socket}")
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            raise RegistrationSetupError(f"cannot listen on {self.socket}: {exc}") from exc
        await server.start()
        self.server = server
        os.chmod(self.socket, 0o660)
        log.info("serving kubelet registration", socket=str(self.socket),
                 driver=self.service.driver_name, endpoint=str(self.service.csi_endpoint))

    async def stop(self) -> None:
        """Remove the socket first, so kubelet deregisters the driver, then stop serving."""
        if self.server is None:  # never started: whatever is at the path is not ours
            return
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        await self.server.stop(STOP_GRACE_SECONDS)
        self.server = None
