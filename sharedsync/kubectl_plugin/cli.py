"""``kubectl-sharedsync``: flags, dispatch, and the one place errors become an exit status.

Exit status: 0 done; 1 for anything the user must act on (an unknown volume or claim, an API
error, a refused request, a wait that timed out), with one line on stderr saying what; 2 for a
command line argparse refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TextIO

from kubernetes_asyncio.client.exceptions import ApiException

from sharedsync import __version__
from sharedsync.core.errors import InvalidArgument
from sharedsync.core.schedule import parse_duration

from . import day2, render
from .kube import (
    TRANSPORT_ERRORS,
    Cluster,
    Obj,
    PluginError,
    context_namespace,
    describe_api_error,
    kubeconfig_path,
)
from .resolve import resolve

DEFAULT_TIMEOUT = "5m"

EXAMPLES = """\
examples:
  kubectl sharedsync status                       every volume, one row each, then its replicas
  kubectl sharedsync status -n shop               the volumes of the claims in namespace shop
  kubectl sharedsync status pvc/data -o json      one claim's volume, as JSON
  kubectl sharedsync sync-now pvc/data --wait     ship everything now, wait for the replicas
  kubectl sharedsync switchover vol-1f0c... --to node-b --wait
  kubectl sharedsync rebuild vol-1f0c... --node node-c --wait

VOLUME is a SharedVolume name (vol-..., or sv/NAME) or a claim (pvc/NAME, in the namespace of
-n or of the kubeconfig's context); a bare name that is no SharedVolume is tried as a claim.
"""


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive duration (30s, 5m)")
    return seconds


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """--kubeconfig and -n, accepted before and after the command (kubectl users put them
    anywhere); below the command they default to "not given" so as not to undo the top's."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--kubeconfig", default=default,
                        help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    parser.add_argument("-n", "--namespace", default=default,
                        help="namespace of claims (pvc/NAME) and of the volumes status lists "
                             "(default: the kubeconfig context's)")


def _wait_flags(parser: argparse.ArgumentParser, until: str) -> None:
    parser.add_argument("--wait", action="store_true", help=f"return only once {until}")
    parser.add_argument("--timeout", type=_duration, default=_duration(DEFAULT_TIMEOUT),
                        metavar="DURATION",
                        help=f"give up waiting after this long (default {DEFAULT_TIMEOUT})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl sharedsync", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="See and steer sharedsync volumes: the status the operator reports, and "
                    "its day-2 operations (sync now, switchover, rebuild).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", help="replicas, primary, epoch, lag and conditions")
    _common(status, top=False)
    status.add_argument("targets", nargs="*", metavar="VOLUME|PVC",
                        help="volumes to show (default: all, or those of -n's claims)")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text")

    sync_now = commands.add_parser("sync-now", help="ship every change to the replicas now")
    _common(sync_now, top=False)
    sync_now.add_argument("target", metavar="VOLUME|pvc/NAME")
    _wait_flags(sync_now, "the operator reports the sync done")

    switchover = commands.add_parser("switchover", help="move the primary to another replica")
    _common(switchover, top=False)
    switchover.add_argument("target", metavar="VOLUME")
    switchover.add_argument("--to", required=True, metavar="NODE",
                            help="the node whose replica becomes the primary")
    _wait_flags(switchover, "NODE holds the primary")

    rebuild = commands.add_parser("rebuild", help="drop one node's replica and copy it afresh")
    _common(rebuild, top=False)
    rebuild.add_argument("target", metavar="VOLUME")
    rebuild.add_argument("--node", required=True, help="the node whose replica is rebuilt")
    _wait_flags(rebuild, "the replica is rebuilt and in sync")
    return parser


async def status(cluster: Cluster, args: argparse.Namespace, namespace: str,
                 out: TextIO, err: TextIO) -> int:
    """Like ``kubectl get a b``: what was found is shown, what was not is an error each."""
    failed = False
    volumes: list[Obj] = []
    if args.targets:
        seen: set[str] = set()
        for target in args.targets:
            try:
                volume = await resolve(cluster, target, namespace)
            except PluginError as exc:
                print(exc, file=err)
                failed = True
                continue
            if volume["metadata"]["name"] not in seen:
                seen.add(volume["metadata"]["name"])
                volumes.append(volume)
    else:
        volumes = await cluster.volumes()
    claims = await cluster.claims()
    if not args.targets and args.namespace is not None:
        volumes = [v for v in volumes if (claim := claims.get(v["metadata"]["name"]))
                   and claim.namespace == namespace]
    views = [render.view(v, claims.get(v["metadata"]["name"])) for v in volumes]
    if args.output == "json":
        out.write(render.to_json(views) + "\n")
    elif views:
        out.write(render.to_text(views))
    elif not failed:
        where = f" for claims in namespace {namespace}" if args.namespace is not None else ""
        print(f"No SharedVolumes found{where}.", file=err)
    return 1 if failed else 0


async def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    kubeconfig = kubeconfig_path(args.kubeconfig)
    namespace = args.namespace or context_namespace(kubeconfig)
    async with await Cluster.connect(kubeconfig) as cluster:
        if args.command == "status":
            return await status(cluster, args, namespace, out, err)
        volume = await resolve(cluster, args.target, namespace)
        wait = args.timeout if args.wait else None
        if args.command == "sync-now":
            await day2.sync_now(cluster, volume, wait=wait, out=out)
        elif args.command == "switchover":
            await day2.switchover(cluster, volume, args.to, wait=wait, out=out)
        elif args.command == "rebuild":
            await day2.rebuild(cluster, volume, args.node, wait=wait, out=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args, sys.stdout, sys.stderr))
    except PluginError as exc:
        print(exc, file=sys.stderr)
    except ApiException as exc:
        print(describe_api_error(exc), file=sys.stderr)
    except TRANSPORT_ERRORS as exc:
        print(f"error: cannot reach the API server: {exc or type(exc).__name__}",
              file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
