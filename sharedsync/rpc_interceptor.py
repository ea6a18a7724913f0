"""One server interceptor for every RPC of a service: error mapping, timing, structured logs.

Services raise our exceptions; this turns them into gRPC statuses through
:mod:`sharedsync.rpc_status`, observes each call's duration in the histogram it is given
(labelled ``method_name`` and ``grpc_status_code`` plus any constant labels), and logs each
call, with the request rendered by a caller-supplied function that strips secrets.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias, cast

import grpc
import structlog
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from prometheus_client import Histogram

from sharedsync.core.errors import SharedsyncError

from .rpc_status import code_label, status_for

log = structlog.get_logger(__name__)

Handler: TypeAlias = "Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]"
RequestRenderer: TypeAlias = "Callable[[Message], dict[str, Any]]"


def plain_request(message: Message) -> dict[str, Any]:
    """Render a request that carries no secrets."""
    return MessageToDict(message, preserving_proto_field_name=True)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary handler (streaming handlers pass through with error mapping only)."""

    def __init__(self, histogram: Histogram, labels: Mapping[str, str] | None = None, *,
                 render: RequestRenderer = plain_request,
                 quiet_methods: frozenset[str] = frozenset()) -> None:
        self.histogram = histogram
        self.labels = dict(labels or {})
        self.render = render
        self.quiet_methods = quiet_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails],
                               Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap(method, cast("Handler", handler.unary_unary), log_request=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(method, cast("Handler", handler.stream_unary), log_request=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler

    def _wrap_stream(self, method: str, inner: Any) -> Any:
        """Server-streaming handlers: the same mapping, applied while the stream is produced."""

        async def call(request: Any,
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                async for item in inner(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except (SharedsyncError, NotImplementedError) as exc:
                code = status_for(exc)
                await context.abort(code, str(exc) or f"{method} is not implemented")
            except Exception as exc:
                code = grpc.StatusCode.INTERNAL
                log.exception("call crashed", method=method)
                await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self.histogram.labels(**self.labels, method_name=method,
                                      grpc_status_code=code_label(code)).observe(
                    time.perf_counter() - started)

        return call

    def _wrap(self, method: str, inner: Handler, *, log_request: bool) -> Handler:
        quiet = method in self.quiet_methods

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            bound = log.bind(method=method)
            if log_request and not quiet:
                bound.debug("call", request=self.render(request))
            try:
                return await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except (SharedsyncError, NotImplementedError) as exc:
                code = status_for(exc)
                message = str(exc) or f"{method} is not implemented"
                bound.info("call failed", code=code.name, error=message)
                await context.abort(code, message)
            except Exception as exc:  # noqa: BLE001 - a bug: reported as INTERNAL, logged
                code = grpc.StatusCode.INTERNAL
                bound.exception("call crashed")
                await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                self.histogram.labels(**self.labels, method_name=method,
                                      grpc_status_code=code_label(code)).observe(
                    time.perf_counter() - started)

        return call
