"""The e2e session: one cluster (provider ``local`` or ``kind``) for every scenario.

``--provider`` (default: env SHAREDSYNC_E2E_PROVIDER, else ``local``) picks it. The local
provider brings the cluster up with ``scripts/cluster up`` and down at the end, unless
SHAREDSYNC_E2E_KEEP_CLUSTER=1 says it is up already and must stay up. A provider that cannot
run here (no root, no Docker, no kind) skips the session with the reason; in CI (env CI) the
default provider must run.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from .providers import PROVIDER_ENV, PROVIDERS, Cluster, UnavailableError, make


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--provider", choices=PROVIDERS, default=None,
                     help=f"e2e cluster provider (default: ${PROVIDER_ENV}, else local)")


def provider_name(config: pytest.Config) -> str:
    chosen: str | None = config.getoption("--provider", default=None)
    return chosen or os.environ.get(PROVIDER_ENV) or "local"


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    name = provider_name(request.config)
    provider = make(name)
    try:
        provider.start()
    except UnavailableError as why:
        if os.environ.get("CI") and name == "local":
            pytest.fail(f"e2e provider {name} cannot run: {why}")
        pytest.skip(f"e2e provider {name}: {why}")
    try:
        yield provider
    finally:
        provider.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    """A failed scenario carries the cluster's state at the moment it failed."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    provider = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
    if not isinstance(provider, Cluster):
        return
    for title, args in [
        ("nodes", ["get", "nodes", "-o", "wide"]),
        ("sharedsync objects", ["get", "sp,sv,svs,pvc,pods", "-A", "-o", "wide"]),
        ("events", ["get", "events", "-A", "--sort-by=.lastTimestamp"]),
    ]:
        try:
            done = provider.kubectl(*args, check=False, timeout=60)
            text = done.stdout[-8000:] + done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            text = "(timed out)"
        report.sections.append((f"cluster: {title}", text))
