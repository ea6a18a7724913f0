"""Check every call on the agent's network port against the caller's certificate.

The table of who may call what is :mod:`sharedsync.core.rpc_roles`; this module reads the
names from the verified client certificate (gRPC's auth context: common name and subject
alternative names) and refuses a call its caller may not make with PERMISSION_DENIED, before
the handler runs or reads a single message of a stream. A server interceptor cannot see the
auth context (only the method and metadata), so it wraps each handler instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

import grpc
import structlog

from sharedsync.core.errors import PermissionDenied
from sharedsync.core.rpc_roles import authorize
from sharedsync.rpc_interceptor import Behavior, rewrap_handler

from . import metrics
from .tls import PEER_SERVER_NAME

log = structlog.get_logger(__name__)

#: Auth-context properties that carry the names a certificate was issued for.
NAME_PROPERTIES = ("x509_common_name", "x509_subject_alternative_name")

def certificate_names(auth_context: Mapping[str, Any]) -> frozenset[str]:
    """The common name and subject alternative names of the verified client certificate
    (empty without one)."""
    names = set()
    for key in NAME_PROPERTIES:
        for value in auth_context.get(key, ()):
            names.add(value.decode(errors="replace") if isinstance(value, bytes) else str(value))
    return frozenset(names)


class CallerCheckInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls whose caller's certificate does not grant the method (rpc_roles)."""

    def __init__(self, controller_names: Collection[str],
                 peer_name: str = PEER_SERVER_NAME) -> None:
        self.controller_names = frozenset(controller_names)
        self.peer_name = peer_name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: grpc.RpcMethodHandler[Any, Any] | None = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method

        def wrap(kind: str, behavior: Behavior) -> Behavior:
            if kind.endswith("_stream"):  # the response is a stream
                return self._streaming(method, behavior)
            return self._single(method, behavior)
        return rewrap_handler(handler, wrap)

    async def _check(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            authorize(method, certificate_names(context.auth_context()),
                      peer_name=self.peer_name, controller_names=self.controller_names)
        except PermissionDenied as exc:
            metrics.RPC_DENIED.labels(method).inc()
            log.warning("call refused for the caller's certificate", method=method,
                        peer=context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))

    def _single(self, method: str, inner: Behavior) -> Behavior:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._check(method, context)
            return await inner(request, context)
        return call

    def _streaming(self, method: str, inner: Behavior) -> Behavior:
        async def call(request: Any,
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await self._check(method, context)
            async for item in inner(request, context):  # our streaming handlers are generators
                yield item
        return call
