"""The control-plane tier: one real etcd + kube-apiserver + kube-controller-manager per session.

Starting a control plane costs ~10-30 s and ~500 MiB, so the whole session shares one, with the
CRDs from charts/crds applied. Tests keep out of each other's way by naming what they create
uniquely (the objects are cluster-scoped) rather than by restarting it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .controlplane import TOOLS_BIN, ControlPlane, missing_binaries

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/controlplane needs the real control plane."""
    del config
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.controlplane)


def require_tools() -> None:
    """Skip without the Kubernetes binaries, except in CI, where that is a failure."""
    missing = missing_binaries()
    if not missing:
        return
    reason = (f"{', '.join(missing)} not built in {TOOLS_BIN} (run scripts/build-tools)")
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must build them first")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running control plane with the sharedsync CRDs Established; stopped at session end."""
    require_tools()
    plane = ControlPlane(tmp_path_factory.mktemp("controlplane")).start()
    try:
        plane.apply_crds()
        yield plane
    finally:
        plane.stop()
