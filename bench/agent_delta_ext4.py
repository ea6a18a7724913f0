"""3b. Delta on the ext4 fallback store: the same 1% change, files pulled as chunk deltas.

See ``bench.agent_delta``: the same data, change sets and rsync baseline, with the agents'
replicas on ext4, where every volume replicates file by file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.agent_delta import body as delta_body
from bench.common import Result, main

NAME = "delta-ext4"
TITLE = "Delta on the ext4 fallback store: 1% change of 1 GiB, chunk deltas vs rsync"


def body(quick: bool, workdir: Path, result: Result) -> None:
    delta_body(quick, workdir, result, store_filesystem="ext4")


if __name__ == "__main__":
    sys.exit(main(NAME, TITLE, body))
