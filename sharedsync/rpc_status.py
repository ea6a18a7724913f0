"""The one table that maps our exceptions to gRPC status codes, for every gRPC service we run.

Services (the CSI plugin's, the agent's) raise ``sharedsync.core.errors`` types and never touch
the gRPC context for errors; :mod:`sharedsync.rpc_interceptor` looks the exception up here.
Anything not in the table is a bug and becomes INTERNAL.
"""

import grpc

from sharedsync.core import errors

STATUS_BY_EXCEPTION: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for ``exc``: the most specific class in the table wins."""
    for cls in type(exc).__mro__:
        code = STATUS_BY_EXCEPTION.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def code_label(code: grpc.StatusCode) -> str:
    """A status code spelled as Go's ``codes.Code.String()`` does, for metric labels.

    csi-lib-utils labels ``csi_plugin_operations_seconds`` this way (``OK``,
    ``InvalidArgument``); matching it lets the community dashboards work unchanged.
    """
    if code is grpc.StatusCode.OK:
        return "OK"
    return "".join(part.capitalize() for part in code.name.split("_"))
