"""The VolumeSnapshot CRDs, from the external-snapshotter client module pinned in tools/.

scripts/build-tools downloads the module into the Go module cache; tests find it there with
GOPROXY=off, so a test never downloads anything. Several modules of the session install them
(whichever runs first); a module deletes only what it created itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.controlplane.controlplane import ControlPlane

REPO_ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT_MODULE = "github.com/kubernetes-csi/external-snapshotter/client/v8"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
SNAPSHOT_CRDS = ("volumesnapshotclasses", "volumesnapshotcontents", "volumesnapshots")
WAIT_SECONDS = 120


def snapshot_crd_files() -> tuple[list[Path], str]:
    """The CRD files, or ([], why not)."""
    go = shutil.which("go")
    if go is None:
        return [], "no go on PATH to find the external-snapshotter client module"
    env = {**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=readonly", "GOWORK": "off"}
    done = subprocess.run([go, "mod", "download", "-json", SNAPSHOT_MODULE],
                          cwd=REPO_ROOT / "tools" / "external-snapshotter", env=env,
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


def require_snapshot_crd_files() -> list[Path]:
    """The files; skip without them, except in CI (env CI), where that is a failure."""
    files, reason = snapshot_crd_files()
    if not files:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run scripts/build-tools first")
        pytest.skip(reason)
    return files


def install_snapshot_crds(cp: ControlPlane, field_manager: str = "sharedsync-tests") -> list[str]:
    """Install the CRDs where missing and wait until they are served; return the names of the
    CRDs this call created (the caller deletes those, and only those, when done)."""
    files = require_snapshot_crd_files()
    names = [f"{name}.{SNAPSHOT_GROUP}" for name in SNAPSHOT_CRDS]
    created = [n for n in names if cp.kubectl("get", "crd", n, check=False).returncode != 0]
    cp.kubectl("apply", "--server-side", "--force-conflicts", f"--field-manager={field_manager}",
               *(f"--filename={f}" for f in files))
    cp.kubectl("wait", "--for=condition=Established", f"--timeout={WAIT_SECONDS}s",
               *(f"crd/{n}" for n in names), timeout=WAIT_SECONDS + 30)
    return created
