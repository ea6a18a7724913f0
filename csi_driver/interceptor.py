"""One server interceptor for every RPC: error mapping, the CSI metric, structured logs.

Services raise our exceptions; this turns them into gRPC statuses through ``status``, times the
call into ``csi_plugin_operations_seconds`` (named and labelled exactly as csi-lib-utils does so
the community dashboards work), and logs each call with secrets stripped from the request.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, cast

import grpc
import structlog
from google.protobuf.message import Message
from prometheus_client import Histogram

from sharedsync.core.errors import SharedsyncError

from .redact import to_log_dict
from .status import code_label, status_for

log = structlog.get_logger(__name__)

OPERATIONS_SECONDS = Histogram(
    "csi_plugin_operations_seconds",
    "Container Storage Interface operation duration with gRPC error code status total",
    ["driver_name", "method_name", "grpc_status_code"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 25, 50, 120, 300, 600),
)
#: Probe is called every few seconds by the liveness sidecar: log it only at debug level.
QUIET_METHODS = frozenset({"/csi.v1.Identity/Probe"})

Handler: TypeAlias = "Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]"


class CsiInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary CSI handler."""

    def __init__(self, driver_name: str) -> None:
        self.driver_name = driver_name

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method: str = handler_call_details.method
        wrapped = self._wrap(method, cast(Handler, handler.unary_unary))
        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _wrap(self, method: str, inner: Handler) -> Handler:
        quiet = method in QUIET_METHODS

        async def call(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            bound = log.bind(method=method)
            if not quiet:
                bound.debug("call", request=to_log_dict(request))
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except (SharedsyncError, NotImplementedError) as exc:
                code = status_for(exc)
                message = str(exc) or f"{method} is not implemented"
                bound.info("call failed", code=code.name, error=message)
                await context.abort(code, message)
            except Exception as exc:
                code = grpc.StatusCode.INTERNAL
                bound.exception("call crashed")
                await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                OPERATIONS_SECONDS.labels(self.driver_name, method, code_label(code)).observe(
                    time.perf_counter() - started)

        return call
