"""The CSI plugin's interceptor: our error mapping, timed into the standard CSI metric.

``csi_plugin_operations_seconds`` is named, labelled and bucketed exactly as csi-lib-utils does,
so the community dashboards work unchanged; requests are logged with every ``csi_secret`` field
stripped.
"""

from prometheus_client import Histogram

from sharedsync.rpc_interceptor import ErrorMappingInterceptor

from .redact import to_log_dict

OPERATIONS_SECONDS = Histogram(
    "csi_plugin_operations_seconds",
    "Container Storage Interface operation duration with gRPC error code status total",
    ["driver_name", "method_name", "grpc_status_code"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 25, 50, 120, 300, 600),
)
#: Probe is called every few seconds by the liveness sidecar: do not log it.
QUIET_METHODS = frozenset({"/csi.v1.Identity/Probe"})


def csi_interceptor(driver_name: str) -> ErrorMappingInterceptor:
    return ErrorMappingInterceptor(OPERATIONS_SECONDS, {"driver_name": driver_name},
                                   render=to_log_dict, quiet_methods=QUIET_METHODS)
