"""The e2e session: one cluster (provider ``local`` or ``kind``) for every scenario.

``--provider`` (default: env SHAREDSYNC_E2E_PROVIDER, else ``local``) picks it. The local
provider brings the cluster up with ``scripts/cluster up`` and down at the end, unless
SHAREDSYNC_E2E_KEEP_CLUSTER=1 says it is up already and must stay up. A provider that cannot
run here (no root, no Docker, no kind) skips the session with the reason; in CI (env CI) the
default provider must run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from .kube import NAMESPACE
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
    except BaseException:
        # a start that failed half-way (some nodes up) is taken down before the error is
        # reported: the host must not keep a half cluster for the next run to trip over
        with contextlib.suppress(Exception):
            provider.stop()
        raise
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
    # most telling last: a CI log keeps the head and the tail of a long report
    for title, args, keep in [
        ("nodes", ["get", "nodes", "-o", "wide"], 3000),
        ("sharedsync objects", ["get", "sp,sv,svs,pvc,pods", "-A", "-o", "wide"], 6000),
        ("events", ["get", "events", "-A", "--sort-by=.lastTimestamp"], 5000),
        ("shared volumes", ["get", "sv", "-o",
                            "custom-columns=NAME:.metadata.name,PRIMARY:.status.primary,"
                            "EPOCH:.status.epoch,REPLICAS:.status.replicas,"
                            "CONDITIONS:.status.conditions"], 6000),
        ("leases", ["get", "leases", "-n", NAMESPACE, "-o",
                    "custom-columns=NAME:.metadata.name,HOLDER:.spec.holderIdentity,"
                    "RENEWED:.spec.renewTime"], 2000),
        ("shared volume events", ["get", "events", "--field-selector",
                                  "involvedObject.kind=SharedVolume",
                                  "--sort-by=.lastTimestamp"], 4000),
    ]:
        report.sections.append((f"cluster: {title}", _kubectl_text(provider, args, keep)))
    report.sections.append(("cluster: operator logs", _operator_logs(provider)))


def _kubectl_text(provider: Cluster, args: list[str], keep: int) -> str:
    try:
        done = provider.kubectl(*args, check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return "(timed out)"
    return done.stdout[-keep:] + done.stderr[-1000:]


def _operator_logs(provider: Cluster, lines: int = 15) -> str:
    """The last lines of every operator replica (the leader's decisions, the standby's wait),
    each clipped: which replica leads, and what it last did or failed at."""
    names = _kubectl_text(provider, ["get", "pods", "-n", NAMESPACE, "-l",
                                     "app.kubernetes.io/component=operator", "-o",
                                     "custom-columns=:metadata.name,:spec.nodeName",
                                     "--no-headers"], 2000)
    parts = []
    for row in names.splitlines():
        pod, _, node = row.partition(" ")
        log = _kubectl_text(provider, ["logs", "-n", NAMESPACE, pod, f"--tail={lines}"], 20000)
        clipped = "\n".join(line[:300] for line in log.splitlines())
        parts.append(f"--- {pod} on {node.strip()}\n{clipped}")
    return "\n".join(parts)
