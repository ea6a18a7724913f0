"""The VolumeSnapshot CRDs, from the external-snapshotter client module pinned in tools/.

scripts/build-tools downloads the module into the Go module cache; tests find it there with
GOPROXY=off, so a test never downloads anything. Several modules of the session install them
(whichever runs first); a module deletes only what it created itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from localcluster.snapshot_crds import SNAPSHOT_CRDS, SNAPSHOT_GROUP, snapshot_crd_files
from tests.controlplane.controlplane import ControlPlane

__all__ = ["SNAPSHOT_CRDS", "SNAPSHOT_GROUP", "snapshot_crd_files"]
WAIT_SECONDS = 120


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
