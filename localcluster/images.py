"""The images every node imports: ours (scripts/build-image) and the node images
(scripts/build-node-images: the pause sandbox, the CSI sidecars, a busybox workload image).

Both scripts skip work whose inputs did not change, so calling them on every ``up`` is cheap;
they print the image references and tarballs this module returns.
"""

from __future__ import annotations

import sys
from pathlib import Path

from localcluster.layout import REPO
from localcluster.processes import StepError, run

BUILD_TIMEOUT = 1800.0


def build() -> dict[str, Path]:
    """Build what is missing; every image reference -> its tarball."""
    images: dict[str, Path] = {}
    ours = run([sys.executable, str(REPO / "scripts" / "build-image")],
               timeout=BUILD_TIMEOUT).stdout
    version = (REPO / "sharedsync" / "__init__.py").read_text().split('__version__ = "')[1]
    version = version.split('"')[0]
    tarball = REPO / "build" / "image" / f"sharedsync-{version}.tar"
    if not tarball.exists():
        raise StepError(f"scripts/build-image did not write {tarball}:\n{ours[-2000:]}")
    images[f"localhost/sharedsync:{version}"] = tarball
    run([sys.executable, str(REPO / "scripts" / "build-node-images")], timeout=BUILD_TIMEOUT)
    listed = run([sys.executable, str(REPO / "scripts" / "build-node-images"), "--list"]).stdout
    for line in listed.splitlines():
        reference, _, path = line.partition("\t")
        if reference and path:
            images[reference] = Path(path)
    return images
