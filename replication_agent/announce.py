"""Tell the operator this agent is alive, where it listens and how much room it has.

The agent keeps a coordination.k8s.io Lease named after its node (operator/API.md, "Agent
leases"), renewed every third of its duration. The operator treats an agent whose Lease
expired as gone: its replicas turn Stale and a primary it held fails over. A clean stop does
not release the Lease on purpose: an agent restarted by a rolling update renews it within
seconds, and releasing it would make the operator fail its volumes over for nothing.
"""

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from sharedsync import __version__
from sharedsync.core.isolation import lease_lapsed
from sharedsync.kubeclient import api_client
from sharedsync.leases import STORE_FILESYSTEM_ANNOTATION, LeaseKeeper

from .config import AgentConfig

log = structlog.get_logger(__name__)

LEASE_LABELS = {"app.kubernetes.io/name": "sharedsync", "app.kubernetes.io/component": "agent"}


def lease_name(node: str) -> str:
    return f"sharedsync-agent-{node}"


def advertised(config: AgentConfig, data_dir: Path, store_filesystem: str) -> Mapping[str, str]:
    """What the Lease carries besides its holder: address, space, store filesystem and
    version."""
    data_dir.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(data_dir)
    return {"sharedsync.io/node": config.node, "sharedsync.io/address": config.advertise_address,
            "sharedsync.io/capacity-bytes": str(usage.total),
            "sharedsync.io/available-bytes": str(usage.free),
            STORE_FILESYSTEM_ANNOTATION: store_filesystem,
            "sharedsync.io/version": __version__}


#: A main event loop that has not ticked for this long is wedged, not busy: stop renewing
#: so that the operator fails the node's volumes over.
WEDGED_AFTER_SECONDS = 120.0


async def announce_forever(config: AgentConfig, store_filesystem: str,
                           heartbeat: Callable[[], float] | None = None,
                           renewed: Callable[[float], None] | None = None) -> None:
    """Renew the Lease until cancelled; API errors are logged and retried, never fatal (the
    data path must not depend on the API server being up). With ``heartbeat`` (the monotonic
    time the agent's main loop last ticked), renewal stops while that loop is wedged.
    ``renewed`` is told the monotonic time each successful renewal started."""
    kube = config.kubernetes
    assert kube is not None
    period = kube.lease_duration_seconds / 3
    connection = await api_client(kube.kubeconfig)
    keeper = LeaseKeeper(
        connection, kube.namespace, lease_name(config.node),
        holder=config.node, duration_seconds=kube.lease_duration_seconds, labels=LEASE_LABELS,
        annotations=lambda: advertised(config, config.data_dir, store_filesystem))
    try:
        while True:
            stalled = time.monotonic() - heartbeat() if heartbeat is not None else 0.0
            if stalled > WEDGED_AFTER_SECONDS:
                log.error("the agent's main loop is stuck; not renewing the lease",
                          stalled_seconds=round(stalled))
            else:
                try:
                    started = time.monotonic()
                    if await keeper.renew(take_over=True) and renewed is not None:
                        renewed(started)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - keep announcing through API outages
                    log.warning("could not renew the agent lease", error=str(exc)[:300])
            await asyncio.sleep(period)
    finally:
        await connection.close()


class Announcer:
    """The Lease renewal on a thread of its own, with its own event loop.

    An agent formatting, mounting and syncing hundreds of replicas keeps its main loop busy
    for seconds at a time; a renewal queued behind that work would let the Lease expire and
    the operator fail every volume of a healthy node over. The thread renews on time as long
    as the main loop still ticks (a heartbeat task), and stops when it is really wedged.
    """

    def __init__(self, config: AgentConfig, store_filesystem: str) -> None:
        self.config = config
        self.store_filesystem = store_filesystem
        self.beat = time.monotonic()
        self.started_at = self.beat
        #: When the last successful renewal started (monotonic; None: none yet). Written by
        #: the lease thread, read by the main loop (a float assignment is atomic).
        self.renewed_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, name="lease", daemon=True)
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="heartbeat")
        self._thread.start()

    async def _tick(self) -> None:
        while True:
            self.beat = time.monotonic()
            await asyncio.sleep(1.0)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._task = loop.create_task(
            announce_forever(self.config, self.store_filesystem, lambda: self.beat,
                             self._renewed))
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(self._task)
        loop.close()

    def _renewed(self, at: float) -> None:
        self.renewed_at = at

    def lapsed(self) -> bool:
        """Whether the operator may soon see our Lease as expired (sharedsync.core.isolation)."""
        kube = self.config.kubernetes
        assert kube is not None
        return lease_lapsed(self.renewed_at, self.started_at, kube.lease_duration_seconds,
                            time.monotonic())

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._loop is not None and self._task is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._task.cancel)
        await asyncio.to_thread(self._thread.join, 10)
