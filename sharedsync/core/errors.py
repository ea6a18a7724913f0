"""The exception vocabulary shared by every component.

Each class names *what went wrong* from the caller's point of view, not which library failed, so
that one table (``sharedsync.rpc_status``) can turn it into a gRPC status code and one module
can turn it into a Kubernetes condition. Messages are written for the person reading them:
they name the field or object at fault and never carry secrets.

The class names mirror the gRPC status codes they map to, hence no ``Error`` suffix.
"""
# ruff: noqa: N818


class SharedsyncError(Exception):
    """Base of every error we raise on purpose; anything else is a bug (INTERNAL)."""


class InvalidArgument(SharedsyncError):
    """The request is malformed: a missing, oversized or out-of-domain field."""


class PermissionDenied(SharedsyncError):
    """The caller is known (its certificate verified) but may not call this method."""


class NotFound(SharedsyncError):
    """The named volume, snapshot or path does not exist."""


class AlreadyExists(SharedsyncError):
    """An object with that name exists with incompatible properties."""


class FailedPrecondition(SharedsyncError):
    """The object is in a state that forbids the operation (for example still in use)."""


class OutOfRange(SharedsyncError):
    """A requested size or range is outside what we can provide."""


class ResourceExhausted(SharedsyncError):
    """Not enough capacity (space, loop devices) to do what was asked."""


class Aborted(SharedsyncError):
    """Another operation on the same object is in progress; retry later."""


class Unavailable(SharedsyncError):
    """A dependency is not ready yet (store not open, tool missing); retry later."""


class Unimplemented(SharedsyncError):
    """The operation or capability is not offered by this component."""


class Internal(SharedsyncError):
    """An invariant broke or an external tool failed unexpectedly."""
