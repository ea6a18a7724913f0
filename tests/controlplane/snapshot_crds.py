"""The VolumeSnapshot CRDs, from the external-snapshotter client module pinned in tools/.

scripts/build-tools downloads the module into the Go module cache; tests find it there with
GOPROXY=off, so a test never downloads anything. Several modules of the session install them
(whichever runs first); a module deletes only what it created itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from localcluster.snapshot_crds import SNAPSHOT_CRDS, SNAPSHOT_GROUP, snapshot_crd_files
from tests.controlplane.controlplane import ControlPlane
from tests.integration.agent_harness import wait_until

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
    CRDs this call created (the caller deletes those, and only those, when done).

    A module before this one may have left them terminating (a CRD goes only once its objects
    have; a snapshot whose controller is gone keeps its finalizer): new objects of such a CRD
    are refused, so this waits for it to be gone and fails with what holds it otherwise.
    """
    files = require_snapshot_crd_files()
    names = [f"{name}.{SNAPSHOT_GROUP}" for name in SNAPSHOT_CRDS]
    for name in names:
        _wait_while_terminating(cp, name)
    created = [n for n in names if cp.kubectl("get", "crd", n, check=False).returncode != 0]
    cp.kubectl("apply", "--server-side", "--force-conflicts", f"--field-manager={field_manager}",
               *(f"--filename={f}" for f in files))
    cp.kubectl("wait", "--for=condition=Established", f"--timeout={WAIT_SECONDS}s",
               *(f"crd/{n}" for n in names), timeout=WAIT_SECONDS + 30)
    wait_until(lambda: set(names) <= set(cp.kubectl("api-resources", "-o", "name",
                                                    check=False).stdout.split()),
               timeout=WAIT_SECONDS, interval=0.5, what=f"{names} in discovery")
    return created


def _wait_while_terminating(cp: ControlPlane, name: str) -> None:
    found = cp.kubectl("get", "crd", name, "-o", "json", check=False)
    if found.returncode != 0 or not json.loads(found.stdout)["metadata"].get(
            "deletionTimestamp"):
        return
    cp.kubectl("wait", "--for=delete", f"crd/{name}", f"--timeout={WAIT_SECONDS}s",
               check=False, timeout=WAIT_SECONDS + 30)
    if cp.kubectl("get", "crd", name, check=False).returncode == 0:
        plural = name.partition(".")[0]
        left = cp.kubectl("get", plural, "-A", "-o", "name", check=False)
        raise AssertionError(f"CRD {name} is still terminating after {WAIT_SECONDS} s; "
                             f"objects holding it: {left.stdout.strip() or left.stderr}")


def delete_snapshots(cp: ControlPlane, namespace: str, timeout: float = WAIT_SECONDS) -> None:
    """Delete a namespace's VolumeSnapshots while their controllers still run (a test that
    failed half way leaves some): stopped, the controllers can no longer take the finalizers
    off, and the CRDs' deletion would wait for them for good."""
    cp.kubectl("delete", "volumesnapshots", "--all", "-n", namespace, "--ignore-not-found",
               "--wait=true", f"--timeout={timeout:.0f}s", check=False, timeout=timeout + 30)
