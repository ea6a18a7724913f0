"""``sharedsync-agent``: run the per-node replication agent, and talk to a running one."""

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from sharedsync import __version__
from sharedsync.core.errors import SharedsyncError
from sharedsync.observability import configure_logging, serve_metrics

from .audit import verify_files
from .config import load_config
from .dev_pki import issue_dev_pki
from .proto import agent_pb2 as pb
from .proto import agent_pb2_grpc
from .server import serve
from .tls import CONTROLLER_NAME

DEFAULT_SOCKET = "/run/sharedsync/agent.sock"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharedsync-agent",
        description="The sharedsync replication agent: holds this node's volume replicas and "
                    "keeps them in sync with their peers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the agent")
    run.add_argument("--config", type=Path, required=True, help="agent config file (YAML)")
    run.add_argument("--log-level", default="INFO")
    run.add_argument("--log-format", choices=["json", "console", "auto"], default="auto")

    for name, help_text in (("status", "show the replicas this agent holds"),
                            ("sync-now", "run one sync cycle of a volume now"),
                            ("promote", "make this node's replica the primary")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's control socket")
        if name != "status":
            sub.add_argument("volume_id")
        if name == "promote":
            sub.add_argument("--epoch", type=int, required=True,
                             help="the new epoch (must be newer than the current one)")

    certs = commands.add_parser("certs", help="make a CA and per-node certificates for "
                                              "agents outside Kubernetes")
    certs.add_argument("directory", type=Path)
    certs.add_argument("--node", action="append", required=True, metavar="NAME=ADDRESS",
                       help="a node and the address it listens on (repeatable)")
    certs.add_argument("--controller", action="append", default=[], metavar="NAME",
                       help="also a client certificate for the agents' control API over the "
                            "network, named NAME (repeatable; agents accept "
                            f"{CONTROLLER_NAME!r} unless their controllerNames say otherwise)")

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify", help="check that audit log files form an unbroken, unedited hash chain")
    verify.add_argument("files", type=Path, nargs="+",
                        help="log files, oldest first (rotated files included)")
    return parser


async def _call(socket: str, command: str,
                args: argparse.Namespace) -> pb.AgentStatus | pb.VolumeStatus:
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        if command == "status":
            return await stub.GetStatus(pb.GetStatusRequest(), timeout=30)
        if command == "sync-now":
            return await stub.SyncNow(pb.SyncNowRequest(volume_id=args.volume_id), timeout=600)
        return await stub.Promote(pb.PromoteRequest(volume_id=args.volume_id, epoch=args.epoch),
                                  timeout=120)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            configure_logging(args.log_level, args.log_format)
            config = load_config(args.config)
            if config.metrics_address:
                try:
                    serve_metrics(config.metrics_address)
                except (OSError, ValueError) as exc:
                    print(f"sharedsync-agent: cannot serve metrics on "
                          f"{config.metrics_address}: {exc}", file=sys.stderr)
                    return 2
            asyncio.run(serve(config))
            return 0
        if args.command == "certs":
            nodes = dict(item.split("=", 1) for item in args.node)
            for issued in issue_dev_pki(args.directory, nodes, controllers=args.controller):
                print(f"{issued.node}: cert {issued.tls.cert} key {issued.tls.key}")
            return 0
        if args.command == "audit":
            result = verify_files(args.files)
            print(result.message)
            return 0 if result.ok else 1
        reply = asyncio.run(_call(args.socket, args.command, args))
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    except SharedsyncError as exc:
        print(f"sharedsync-agent: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"sharedsync-agent: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
