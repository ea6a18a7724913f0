"""``python -m replication_agent.fuse BACKING MOUNTPOINT``: serve until SIGTERM/SIGINT.

Prints ``READY`` (and the negotiated state) on stdout once the mount answers. Used by the
integration tests (to SIGKILL a daemon) and the benchmark (to keep the daemon in its own
process); ``--cleanup-stale`` removes a mount left behind by a killed daemon first.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from . import mount
from .daemon import FuseServer, NullHooks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication_agent.fuse")
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("--no-passthrough", action="store_true",
                        help="serve READ/WRITE in Python (the Python write path)")
    parser.add_argument("--no-xattrs", action="store_true",
                        help="answer ENOSYS to xattr requests (the kernel stops asking)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--cleanup-stale", action="store_true")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    if args.cleanup_stale:
        mount.cleanup_stale(args.mountpoint)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    with FuseServer(args.backing, args.mountpoint, NullHooks(),
                    passthrough=not args.no_passthrough, workers=args.workers,
                    xattrs=not args.no_xattrs) as server:
        print(f"READY passthrough={int(server.passthrough_active)} "
              f"minor={server.protocol_minor}", flush=True)
        while not done.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
