"""Where the VolumeSnapshot CRDs are: the external-snapshotter client module pinned in tools/.

scripts/build-tools downloads the module into the Go module cache; it is found there with
GOPROXY=off, so nothing is downloaded here. Used by ``scripts/cluster up`` and by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from localcluster.layout import REPO

SNAPSHOT_MODULE = "github.com/kubernetes-csi/external-snapshotter/client/v8"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
SNAPSHOT_CRDS = ("volumesnapshotclasses", "volumesnapshotcontents", "volumesnapshots")


def snapshot_crd_files() -> tuple[list[Path], str]:
    """The CRD files, or ([], why not)."""
    go = shutil.which("go")
    if go is None:
        return [], "no go on PATH to find the external-snapshotter client module"
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=readonly", "GOWORK": "off"}
    done = subprocess.run([go, "mod", "download", "-json", SNAPSHOT_MODULE],
                          cwd=REPO / "tools" / "external-snapshotter", env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    try:
        info = json.loads(done.stdout)
    except json.JSONDecodeError:
        info = {"Error": (done.stderr or done.stdout).strip()}
    if done.returncode != 0 or info.get("Error") or not info.get("Dir"):
        return [], f"{SNAPSHOT_MODULE} not in the module cache (run scripts/build-tools): {info}"
    files = [Path(info["Dir"], "config", "crd", f"{SNAPSHOT_GROUP}_{name}.yaml")
             for name in SNAPSHOT_CRDS]
    missing = [f.name for f in files if not f.exists()]
    return ([], f"missing in {info['Dir']}: {missing}") if missing else (files, "")
