"""``sharedsync-csi``: run the CSI plugin (controller, node, or both in one process)."""

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from sharedsync import __version__
from sharedsync.observability import configure_logging, serve_metrics

from .config import (
    DEFAULT_DATA_DIR,
    DEFAULT_KUBELET_DIR,
    DRIVER_NAME,
    PluginConfig,
    Role,
    StateStoreKind,
)
from .registration import RegistrationSetupError
from .server import serve

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _env_flag(name: str) -> bool | None:
    """A boolean environment variable; None when its value is neither true nor false."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharedsync-csi",
        description="The sharedsync CSI plugin: Identity plus Controller and/or Node services "
                    "on a unix socket.")
    env = os.environ.get
    parser.add_argument("--endpoint", default=env("CSI_ENDPOINT", "unix:///csi/csi.sock"),
                        help="unix:///path of the socket to serve (env CSI_ENDPOINT)")
    parser.add_argument("--node-id", default=env("NODE_ID") or socket.gethostname(),
                        help="this node's name, as Kubernetes knows it (env NODE_ID)")
    parser.add_argument("--role", type=Role, choices=list(Role), default=Role(env("CSI_ROLE",
                        "all")), help="which services to serve (env CSI_ROLE; default all)")
    parser.add_argument("--driver-name", default=DRIVER_NAME, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, default=Path(env("SHAREDSYNC_DATA_DIR",
                        str(DEFAULT_DATA_DIR))),
                        help="where replicas and controller state live "
                             "(env SHAREDSYNC_DATA_DIR)")
    parser.add_argument("--state-store", type=StateStoreKind, choices=list(StateStoreKind),
                        default=env("SHAREDSYNC_STATE_STORE", "local"),
                        help="where the controller keeps its records: local (SQLite under "
                             "--data-dir) or kubernetes (SharedVolume objects; needs the "
                             "CRDs) (env SHAREDSYNC_STATE_STORE; default local)")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="kubeconfig for the kubernetes state store (default: the pod's "
                             "service account, in-cluster)")
    cluster = parser.add_argument_group(
        "cluster mode", "with --state-store kubernetes the controller creates no replica: the "
        "operator places each SharedVolume and the agents hold it; with --agent-socket the "
        "node stages what the local agent attaches")
    cluster.add_argument("--agent-socket", type=Path, default=env("SHAREDSYNC_AGENT_SOCKET"),
                         help="the local replication agent's control socket (env "
                              "SHAREDSYNC_AGENT_SOCKET; default: standalone node)")
    cluster.add_argument("--namespace", default=env("POD_NAMESPACE", "sharedsync"),
                         help="the release namespace, where the agents' Leases are (env "
                              "POD_NAMESPACE; default sharedsync)")
    cluster.add_argument("--operator-timeout", type=float, default=60.0,
                         help="seconds CreateVolume, DeleteVolume and ControllerExpandVolume "
                              "wait for the operator before answering ABORTED (the CO "
                              "retries; default 60, never past the CO's own deadline)")
    cluster.add_argument("--agent-ca", type=Path, help="CA of the agents' mutual-TLS API")
    cluster.add_argument("--agent-cert", type=Path,
                         help="client certificate for the agents' API: the controller then "
                              "confirms an expansion on every replica")
    cluster.add_argument("--agent-key", type=Path, help="key of --agent-cert")
    parser.add_argument("--kubelet-dir", type=Path, default=DEFAULT_KUBELET_DIR,
                        help="kubelet's root directory: staging and target paths must be "
                             "inside it")
    registration = parser.add_argument_group(
        "kubelet registration", "without a node-driver-registrar sidecar, the node plugin can "
        "register itself: it serves kubelet's plugin registration API on "
        "<kubelet-dir>/plugins_registry/<driver-name>-reg.sock")
    registration.add_argument("--kubelet-registration", action="store_true",
                              default=_env_flag("SHAREDSYNC_KUBELET_REGISTRATION"),
                              help="serve the registration socket (node or all role; env "
                                   "SHAREDSYNC_KUBELET_REGISTRATION=true)")
    registration.add_argument("--kubelet-endpoint", type=Path, default=None,
                              help="the CSI socket's path as kubelet sees it, reported to "
                                   "kubelet (default <kubelet-dir>/plugins/"
                                   f"{DRIVER_NAME}/csi.sock)")
    parser.add_argument("--allowed-path-root", type=Path, action="append", default=[],
                        help="another directory under which staging and target paths are "
                             "accepted (repeatable; for tests and non-kubelet COs)")
    parser.add_argument("--metrics-address", default=env("METRICS_ADDRESS", ""),
                        help="host:port for the Prometheus endpoint (empty: off)")
    parser.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=["json", "console", "auto"], default="auto")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tls_files = (args.agent_ca, args.agent_cert, args.agent_key)
    if any(tls_files) and not all(tls_files):
        parser.error("--agent-ca, --agent-cert and --agent-key go together")
    if args.operator_timeout <= 0:
        parser.error("--operator-timeout must be positive")
    if args.kubelet_registration is None:
        parser.error("SHAREDSYNC_KUBELET_REGISTRATION must be true or false, got "
                     f"{os.environ.get('SHAREDSYNC_KUBELET_REGISTRATION')!r}")
    if args.kubelet_registration and args.role is Role.CONTROLLER:
        parser.error("--kubelet-registration registers a node plugin: use --role node or all")
    if args.kubelet_endpoint is not None and not args.kubelet_endpoint.is_absolute():
        parser.error(f"--kubelet-endpoint must be an absolute path, got {args.kubelet_endpoint}")
    configure_logging(args.log_level, args.log_format)
    roots = tuple(p.absolute() for p in [args.kubelet_dir, *args.allowed_path_root])
    config = PluginConfig(endpoint=args.endpoint, node_id=args.node_id, role=args.role,
                          driver_name=args.driver_name, data_dir=args.data_dir.absolute(),
                          allowed_path_roots=roots, metrics_address=args.metrics_address,
                          state_store=args.state_store,
                          kubeconfig=args.kubeconfig.absolute() if args.kubeconfig else None,
                          agent_socket=args.agent_socket.absolute() if args.agent_socket
                          else None,
                          namespace=args.namespace, operator_timeout=args.operator_timeout,
                          agent_tls=(args.agent_ca.absolute(), args.agent_cert.absolute(),
                                     args.agent_key.absolute()) if all(tls_files) else None,
                          kubelet_registration=args.kubelet_registration,
                          kubelet_dir=args.kubelet_dir.absolute(),
                          kubelet_endpoint=args.kubelet_endpoint)
    if config.metrics_address:
        try:
            serve_metrics(config.metrics_address)
        except (OSError, ValueError) as exc:
            print(f"sharedsync-csi: cannot serve metrics on {config.metrics_address}: {exc}",
                  file=sys.stderr)
            return 2
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 130
    except RegistrationSetupError as exc:
        print(f"sharedsync-csi: kubelet registration: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
