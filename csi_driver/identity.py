"""The CSI Identity service: who we are, what we offer, whether we are ready."""

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from google.protobuf.wrappers_pb2 import BoolValue

from sharedsync import __version__

from .proto import csi_pb2, csi_pb2_grpc

PluginCapability = csi_pb2.PluginCapability
log = structlog.get_logger(__name__)

#: Returns None when every dependency is up, else a sentence saying what is missing.
ReadinessCheck = Callable[[], Awaitable[str | None]]


class IdentityService(csi_pb2_grpc.IdentityServicer):
    """Served by every plugin process, whatever its role."""

    def __init__(self, driver_name: str, *, controller: bool, readiness: ReadinessCheck) -> None:
        self.driver_name = driver_name
        self.controller = controller
        self.readiness = readiness

    async def GetPluginInfo(self, request: csi_pb2.GetPluginInfoRequest,
                            context: Any) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=self.driver_name,
                                             vendor_version=__version__)

    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: Any,
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        caps = [
            PluginCapability(volume_expansion=PluginCapability.VolumeExpansion(
                type=PluginCapability.VolumeExpansion.ONLINE)),
        ]
        if self.controller:
            caps += [
                PluginCapability(service=PluginCapability.Service(
                    type=PluginCapability.Service.CONTROLLER_SERVICE)),
                PluginCapability(service=PluginCapability.Service(
                    type=PluginCapability.Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
            ]
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=caps)

    async def Probe(self, request: csi_pb2.ProbeRequest, context: Any) -> csi_pb2.ProbeResponse:
        problem = await self.readiness()
        if problem:
            log.warning("probe: not ready", reason=problem)
        return csi_pb2.ProbeResponse(ready=BoolValue(value=problem is None))
