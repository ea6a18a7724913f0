"""``sharedsync-operator``: run the operator (one leader at a time, any number of standbys).

Two operator replicas are safe because only the holder of the ``sharedsync-operator`` Lease
runs handlers; the other waits to take it over. A leader that cannot renew its Lease within
its duration stops at once (exit 1) instead of racing the successor: the Deployment restarts
it as a standby. Decisions survive a leader change because they live in the objects' status.
"""

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import kopf
import structlog
from aiohttp import web

from sharedsync import __version__
from sharedsync.kubeclient import api_client
from sharedsync.leases import LeaseKeeper
from sharedsync.lifecycle import until_terminated
from sharedsync.observability import configure_logging, serve_metrics
from sharedsync.tasks import wait_event

from .agents import Agents
from .kube import Kube
from .metrics import LEADER
from .volumes import VolumeReconciler

log = structlog.get_logger(__name__)

LEADER_LEASE = "sharedsync-operator"
#: A leader that reconciled no SharedVolume for this long, while volumes exist (each one's timer
#: fires every few seconds), has stopped working and exits (see _hold_leadership).
WATCHDOG_SECONDS = 90.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharedsync-operator",
        description="The sharedsync operator: reconciles SyncPolicy and SharedVolume objects "
                    "and drives the replication agents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE", "sharedsync"),
                        help="the release namespace: agent Leases and the leader Lease live "
                             "here (default: $POD_NAMESPACE, else sharedsync)")
    parser.add_argument("--kubeconfig", type=Path, default=None,
                        help="kubeconfig file (default: the pod's service account)")
    parser.add_argument("--agent-ca", type=Path, help="CA that signed the agents' certificates")
    parser.add_argument("--agent-cert", type=Path, help="client certificate for the Agent API")
    parser.add_argument("--agent-key", type=Path, help="its private key")
    parser.add_argument("--identity", default=os.environ.get("POD_NAME", socket.gethostname()),
                        help="this replica's name in the leader Lease (default: $POD_NAME)")
    parser.add_argument("--lease-duration", type=int, default=15,
                        help="leader Lease duration in seconds (default 15)")
    parser.add_argument("--metrics-address", default="",
                        help="host:port for the Prometheus endpoint (default: off)")
    parser.add_argument("--health-address", default="",
                        help="host:port for the liveness endpoint /healthz, answered by the "
                             "leader and by standbys alike (default: off)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=["json", "console", "auto"], default="auto")
    return parser


class HealthServer:
    """``/healthz`` for the kubelet's liveness probe.

    A standby waiting for the leader Lease is healthy (it must not be restarted for waiting);
    the leader is healthy while its kopf operator runs. kopf's own liveness endpoint only
    exists once kopf starts, which a standby never does.
    """

    def __init__(self) -> None:
        self.operator: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.operator is not None and self.operator.done():
            return web.Response(status=500, text="operator stopped\n")
        return web.Response(text="leader\n" if self.operator is not None else "standby\n")

    async def start(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host.strip("[]") or "0.0.0.0", int(port)).start()  # noqa: S104

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def _hold_leadership(keeper: LeaseKeeper, stop: asyncio.Event,
                           handling: Callable[[], bool] = lambda: True) -> None:
    """Renew the leader Lease; set ``stop`` when it is lost (or could not be renewed in time).

    ``handling()`` is the watchdog: a leader whose kopf stopped handling SharedVolumes (a
    watcher that died inside kopf, never surfacing) must not keep the Lease and the cluster's
    volumes hostage. It exits at once; kubelet restarts it, and a standby takes over when the
    Lease expires.
    """
    period = keeper.duration_seconds / 3
    last_renewed = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(period)
        if not handling():
            log.error("no SharedVolume was reconciled for too long: exiting so that a "
                      "standby takes over", seconds=WATCHDOG_SECONDS)
            os._exit(70)
        try:
            if await keeper.renew(take_over=False):
                last_renewed = time.monotonic()
                continue
            log.error("leadership taken over by another operator replica")
        except Exception as exc:  # noqa: BLE001 - an API outage: keep trying until expiry
            log.warning("could not renew the leader lease", error=str(exc)[:300])
            if time.monotonic() - last_renewed < keeper.duration_seconds - period:
                continue
            log.error("leader lease expired while the API server was unreachable")
        stop.set()
        return


async def run(args: argparse.Namespace) -> int:
    connection = await api_client(args.kubeconfig)
    keeper = LeaseKeeper(
        connection, args.namespace, LEADER_LEASE,
        holder=args.identity, duration_seconds=args.lease_duration,
        labels={"app.kubernetes.io/name": "sharedsync",
                "app.kubernetes.io/component": "operator"})
    health = HealthServer()
    if args.health_address:
        await health.start(args.health_address)
    terminated = asyncio.create_task(until_terminated())
    stop = asyncio.Event()
    terminated.add_done_callback(lambda _: stop.set())
    log.info("waiting to lead", identity=args.identity, namespace=args.namespace)
    while not stop.is_set():
        try:
            if await keeper.renew(take_over=False):
                break
        except Exception as exc:  # noqa: BLE001 - keep waiting through API outages
            log.warning("could not read the leader lease", error=str(exc)[:300])
        await wait_event(stop, args.lease_duration / 3)
    if stop.is_set():
        await health.stop()
        await connection.close()
        return 0
    LEADER.set(1)
    log.info("leading", identity=args.identity)
    agents = Agents.from_files(args.agent_ca, args.agent_cert, args.agent_key)
    from . import handlers  # registers the handlers
    state = handlers.Runtime(kube=Kube(connection), agents=agents, namespace=args.namespace,
                             volumes=VolumeReconciler(Kube(connection), agents))
    holder = asyncio.create_task(_hold_leadership(
        keeper, stop, lambda: state.handling_volumes(WATCHDOG_SECONDS)))
    # kopf would name itself after getpass.getuser(), which fails for a uid with no passwd
    # entry (the chart's runAsUser, OpenShift's random uids); leadership is ours anyway
    operator = asyncio.create_task(kopf.operator(
        clusterwide=True, standalone=True, memo=kopf.Memo(runtime=state), stop_flag=stop,
        identity=args.identity))
    health.operator = operator
    await asyncio.wait([operator, holder], return_when=asyncio.FIRST_COMPLETED)
    lost = not terminated.done()
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await operator
    holder.cancel()
    terminated.cancel()
    LEADER.set(0)
    if not lost:
        await keeper.release()
    await health.stop()
    await connection.close()
    return 1 if lost else 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    # kopf reports every handler and timer run at info level: one line per volume every few
    # seconds. Its warnings and errors (failed handlers, retries) still come through.
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.metrics_address:
        serve_metrics(args.metrics_address)
    try:
        sys.exit(asyncio.run(run(args)))
    except ValueError as exc:
        print(f"sharedsync-operator: {exc}", file=sys.stderr)
        sys.exit(2)
