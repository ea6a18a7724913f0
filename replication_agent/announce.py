"""Tell the operator this agent is alive, where it listens and how much room it has.

The agent keeps a coordination.k8s.io Lease named after its node (operator/API.md, "Agent
leases"), renewed every third of its duration. The operator treats an agent whose Lease
expired as gone: its replicas turn Stale and a primary it held fails over. A clean stop does
not release the Lease on purpose: an agent restarted by a rolling update renews it within
seconds, and releasing it would make the operator fail its volumes over for nothing.
"""

import asyncio
import shutil
from collections.abc import Mapping
from pathlib import Path

import structlog

from sharedsync import __version__
from sharedsync.kubeclient import api_client
from sharedsync.leases import LeaseKeeper

from .config import AgentConfig

log = structlog.get_logger(__name__)

LEASE_LABELS = {"app.kubernetes.io/name": "sharedsync", "app.kubernetes.io/component": "agent"}


def lease_name(node: str) -> str:
    return f"sharedsync-agent-{node}"


def advertised(config: AgentConfig, data_dir: Path) -> Mapping[str, str]:
    """What the Lease carries besides its holder: address, space and version."""
    data_dir.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(data_dir)
    return {"sharedsync.io/node": config.node, "sharedsync.io/address": config.advertise_address,
            "sharedsync.io/capacity-bytes": str(usage.total),
            "sharedsync.io/available-bytes": str(usage.free),
            "sharedsync.io/version": __version__}


async def announce_forever(config: AgentConfig) -> None:
    """Renew the Lease until cancelled; API errors are logged and retried, never fatal (the
    data path must not depend on the API server being up)."""
    kube = config.kubernetes
    assert kube is not None
    period = kube.lease_duration_seconds / 3
    connection = await api_client(kube.kubeconfig)
    keeper = LeaseKeeper(
        connection, kube.namespace, lease_name(config.node),
        holder=config.node, duration_seconds=kube.lease_duration_seconds, labels=LEASE_LABELS,
        annotations=lambda: advertised(config, config.data_dir))
    try:
        while True:
            try:
                await keeper.renew(take_over=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep announcing through API outages
                log.warning("could not renew the agent lease", error=str(exc)[:300])
            await asyncio.sleep(period)
    finally:
        await connection.close()
