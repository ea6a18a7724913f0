"""One server interceptor for every RPC of a service: error mapping, timing, structured logs.

Services raise our exceptions; this turns them into gRPC statuses through
:mod:`sharedsync.rpc_status`, observes each call's duration in the histogram it is given
(labelled ``method_name`` and ``grpc_status_code`` plus any constant labels), and logs each
call, with the request rendered by a caller-supplied function that strips secrets.
"""

from __future__ import annotations

import contextlib
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


Behavior: TypeAlias = "Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]"

#: The four kinds of gRPC method handler: the attribute that holds a handler's behavior, and
#: the factory that builds a handler of that kind.
_HANDLER_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler[Any, Any]]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def rewrap_handler(handler: grpc.RpcMethodHandler[Any, Any],
                   wrap: Callable[[str, Behavior], Behavior | None]
                   ) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behavior replaced by ``wrap(kind, behavior)``, where ``kind`` is
    one of ``unary_unary``, ``unary_stream``, ``stream_unary``, ``stream_stream``; unchanged
    when ``wrap`` returns None. What server interceptors do to see or change every call."""
    for kind, make in _HANDLER_KINDS:
        behavior = getattr(handler, kind)
        if behavior is None:
            continue
        wrapped = wrap(kind, behavior)
        if wrapped is None:
            return handler
        return make(wrapped, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
    return handler


def plain_request(message: Message) -> dict[str, Any]:
    """Render a request that carries no secrets."""
    return MessageToDict(message, preserving_proto_field_name=True)


def _failure(exc: Exception, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a failed call ends with: ours mapped, anything else INTERNAL."""
    if isinstance(exc, SharedsyncError | NotImplementedError):
        code = status_for(exc)
        message = str(exc) or f"{method} is not implemented"
        log.info("call failed", method=method, code=code.name, error=message)
        return code, message
    log.error("call crashed", method=method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


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

        def wrap(kind: str, behavior: Behavior) -> Behavior | None:
            if kind == "unary_unary":
                return self._wrap(method, cast("Handler", behavior), log_request=True)
            if kind == "stream_unary":
                return self._wrap(method, cast("Handler", behavior), log_request=False)
            if kind == "unary_stream":
                return self._wrap_stream(method, behavior)
            return None
        return rewrap_handler(handler, wrap)

    @contextlib.asynccontextmanager
    async def _mapped(self, method: str,
                      context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        """Around one call: errors become statuses, the duration lands in the histogram."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = _failure(exc, method)
            await context.abort(code, message)
        finally:
            self.histogram.labels(**self.labels, method_name=method,
                                  grpc_status_code=code_label(code)).observe(
                time.perf_counter() - started)

    def _wrap_stream(self, method: str, inner: Behavior) -> Behavior:
        """Server-streaming handlers: the same mapping, applied while the stream is produced."""

        async def call(request: Any,
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            async with self._mapped(method, context):
                async for item in inner(request, context):
                    yield item

        return call

    def _wrap(self, method: str, inner: Handler, *, log_request: bool) -> Handler:
        quiet = method in self.quiet_methods

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if log_request and not quiet:
                log.debug("call", method=method, request=self.render(request))
            async with self._mapped(method, context):
                return await inner(request, context)

        return call
