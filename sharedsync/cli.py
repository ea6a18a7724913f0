"""``sharedsync``: the product's command line (components have their own entry points too)."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from sharedsync import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharedsync", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run the standalone demo: a real CSI plugin driven through a volume's "
                     "whole life on this machine (needs root)")
    demo.add_argument("--workdir", type=Path, help="scratch directory (default: a new temp dir)")
    demo.add_argument("--keep", action="store_true", help="keep the scratch directory")
    commands.add_parser("csi", help="run the CSI plugin (same as sharedsync-csi)",
                        add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["csi"]:
        from csi_driver.cli import main as csi_main
        return csi_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command == "demo":
        from sharedsync.demo import run_demo
        return run_demo(args.workdir, args.keep)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
