"""rewrap_handler: one place that rebuilds a gRPC method handler of any kind around a wrapper."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from sharedsync.rpc_interceptor import rewrap_handler


def behavior(request: Any, context: Any) -> Any:
    return request


def deserialize(data: bytes) -> bytes:
    return data


def serialize(data: bytes) -> bytes:
    return data


FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_each_kind_is_rebuilt_around_the_wrapper_with_its_codecs(kind: str) -> None:
    handler = FACTORIES[kind](behavior, request_deserializer=deserialize,
                              response_serializer=serialize)
    seen: list[tuple[str, Any]] = []

    def wrapper(request: Any, context: Any) -> Any:
        return ("wrapped", request)

    def wrap(got_kind: str, inner: Any) -> Any:
        seen.append((got_kind, inner))
        return wrapper

    rebuilt = rewrap_handler(handler, wrap)
    assert seen == [(kind, behavior)]
    assert getattr(rebuilt, kind) is wrapper
    assert (rebuilt.request_streaming, rebuilt.response_streaming) == \
        (handler.request_streaming, handler.response_streaming)
    assert rebuilt.request_deserializer is deserialize
    assert rebuilt.response_serializer is serialize
    for other in set(FACTORIES) - {kind}:
        assert getattr(rebuilt, other) is None


def test_a_wrapper_that_declines_leaves_the_handler_as_it_was() -> None:
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(behavior)
    assert rewrap_handler(handler, lambda kind, inner: None) is handler
