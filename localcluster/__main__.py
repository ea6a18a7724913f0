"""``scripts/cluster``: a real multi-node Kubernetes cluster on this machine.

Usage: scripts/cluster up [--nodes N] | down | status | kill-node NODE | restart-node NODE |
       partition NODE | heal NODE | exec NODE [-- CMD...] | kubeconfig
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from localcluster import cluster
from localcluster.layout import DEFAULT_NODES, MAX_NODES, state_dir
from localcluster.processes import StepError


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    up = verbs.add_parser("up", help="start (or complete) the cluster")
    up.add_argument("--nodes", type=int, default=DEFAULT_NODES,
                    help=f"number of nodes, 1..{MAX_NODES} (default {DEFAULT_NODES})")
    verbs.add_parser("down", help="stop everything and put the host back")
    verbs.add_parser("status", help="what runs; exit 1 unless everything does")
    verbs.add_parser("kubeconfig", help="print the admin kubeconfig's path")
    for verb, text in (("kill-node", "SIGKILL a node's kubelet, containerd, shims and pods"),
                       ("restart-node", "start a killed node again"),
                       ("partition", "cut a node off the others (and the control plane)"),
                       ("heal", "reconnect a partitioned node")):
        verbs.add_parser(verb, help=text).add_argument("node", help="node-1, node-2, ...")
    run = verbs.add_parser("exec", help="run a command inside a node (default: a shell)")
    run.add_argument("node")
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.verb == "up" and not 1 <= args.nodes <= MAX_NODES:
        parser.error(f"--nodes must be 1..{MAX_NODES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        match args.verb:
            case "up":
                cluster.up(args.nodes)
            case "down":
                cluster.down()
            case "status":
                return cluster.status()
            case "kubeconfig":
                print(state_dir() / "kubeconfig")
            case "kill-node":
                cluster.kill_node(args.node)
            case "restart-node":
                cluster.restart_node(args.node)
            case "partition":
                cluster.partition(args.node, cut=True)
            case "heal":
                cluster.partition(args.node, cut=False)
            case "exec":
                command = args.command[1:] if args.command[:1] == ["--"] else args.command
                argv_in_node = cluster.exec_argv(args.node, command)
                os.execvp(argv_in_node[0], argv_in_node)  # noqa: S606 (the user's command)
    except StepError as error:
        print(f"scripts/cluster {args.verb}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
