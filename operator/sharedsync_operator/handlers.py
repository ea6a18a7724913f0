"""kopf handlers: thin; each one reads the operator's view of the cluster and calls reconcile.

The view (nodes, agent leases, policies, volumes) is kept current by watch-event handlers, so
a reconcile never lists anything itself; every SharedVolume is also reconciled on a short timer,
which is how a SyncPolicy edit, an agent's death or a replica catching up reach the volume's
status within seconds without a watch on every input.
"""

import asyncio
import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
import structlog

from sharedsync.core.node_loss import NodeSignals
from sharedsync.core.placement import BTRFS, NodeView

from .agents import AgentInfo, Agents, agent_from_lease
from .kube import GROUP, SYNC_POLICIES, VERSION, Kube
from .metrics import LIVE_AGENTS, RECONCILE_ERRORS, RECONCILE_SECONDS
from .policies import IN_USE_FINALIZER, reconcile_policy, refuse_delete_in_use, volumes_using
from .snapshots import NotYetError, SnapshotReconciler
from .stranded_pods import StrandedPodReleaser
from .volumes import VolumeReconciler

log = structlog.get_logger(__name__)

#: How often every volume is reconciled even when nothing about it changed.
VOLUME_RESYNC_SECONDS = 3.0
POLICY_RESYNC_SECONDS = 5.0
#: How long a new leader waits for the agents' first reports (one that does not answer in
#: time counts as reporting nothing: its replicas keep the state last recorded, and it cannot
#: be promoted until it answers).
PRIME_POLL_TIMEOUT_SECONDS = 5.0
#: An agent's volume that no SharedVolume claims is removed only after it has been seen
#: orphaned this long (watch events for a just-created SharedVolume may still be on the way).
ORPHAN_GRACE_SECONDS = 30.0
FINALIZER = "sharedsync.io/finalizer"
#: Connections kopf may hold open to the API server: its five watches plus this many requests
#: at once. kopf's own session has no limit, and with hundreds of volumes it opened one TLS
#: connection per busy handler (about 300 KiB each: asyncio's 256 KiB read buffer and
#: OpenSSL's); the rest of the requests wait for a free connection.
KOPF_CONNECTIONS = 24


@dataclass
class NodeFacts:
    labels: dict[str, str]
    ready: bool
    schedulable: bool


@dataclass
class Runtime:
    """Everything the handlers share, kept in kopf's memo."""

    kube: Kube
    agents: Agents
    namespace: str
    volumes: VolumeReconciler
    nodes: dict[str, NodeFacts] = field(default_factory=dict)
    policies: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    shared_volumes: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    shared_volume_snapshots: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    orphans_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    snapshots: SnapshotReconciler | None = None
    stranded_pods: StrandedPodReleaser | None = None
    #: When a SharedVolume was last reconciled (its timer fires every few seconds): the
    #: leader's watchdog (cli) exits when kopf stops handling volumes while holding the lease.
    last_volume_reconcile: float = field(default_factory=time.monotonic)
    #: Volume reconciles running now (a long SyncNow is work, not a stall).
    volume_reconciles: int = 0

    def handling_volumes(self, within: float) -> bool:
        """False when volumes exist, none is being reconciled and none was for ``within``
        seconds."""
        return (not self.shared_volumes or self.volume_reconciles > 0
                or time.monotonic() - self.last_volume_reconcile < within)

    def __post_init__(self) -> None:
        # one view of the cluster: the reconcilers read the dicts the watch handlers fill
        self.volumes.known_volumes = self.shared_volumes
        self.volumes.known_snapshots = self.shared_volume_snapshots
        if self.snapshots is None:
            self.snapshots = SnapshotReconciler(self.volumes.kube, self.agents)
        self.snapshots.volumes = self.shared_volumes
        if self.stranded_pods is None:
            self.stranded_pods = StrandedPodReleaser(self.kube)

    def stranded_consumers(self, alive: Collection[str]) -> dict[str, dict[str, int]]:
        """Per node whose agent is ``alive``: the volumes it stopped serving to pods there,
        and since when (Unix ns), as its last report says."""
        return {node: {v.volume_id: v.consumers_stranded_unix_ns for v in status.volumes
                       if v.consumers_stranded_unix_ns}
                for node, status in self.agents.statuses.items() if node in alive}

    def node_signals(self, alive: Collection[str]) -> dict[str, NodeSignals]:
        """Each node's health as the stranded-pod release judges it (``alive``: the nodes
        whose agent's Lease is current, read once for both this and ``stranded_consumers``,
        so that a node cannot count as lost in one and alive in the other)."""
        return {name: NodeSignals(ready=facts.ready, agent_known=name in self.agents.leases,
                                  agent_alive=name in alive)
                for name, facts in self.nodes.items()}

    def snapshot_reconciler(self) -> SnapshotReconciler:
        assert self.snapshots is not None
        return self.snapshots

    def node_views(self) -> list[NodeView]:
        alive = self.agents.alive()
        views = []
        for name, facts in self.nodes.items():
            info = self.agents.leases.get(name)
            views.append(NodeView.of(name, facts.labels, ready=facts.ready,
                                     schedulable=facts.schedulable,
                                     agent_alive=name in alive,
                                     available_bytes=info.available_bytes if info else 0,
                                     store_filesystem=info.store_filesystem if info
                                     else BTRFS))
        return views


def runtime(memo: Any) -> Runtime:
    value = memo["runtime"]
    assert isinstance(value, Runtime)
    return value


def _emitter(body: Any) -> Any:
    def emit(type_: str, reason: str, message: str) -> None:
        kopf.event(body, type=type_, reason=reason, message=message)
    return emit


#: Where events about cluster-scoped objects go (where kopf posts them too).
EVENTS_NAMESPACE = "default"


def _background_emitter(state: Runtime, body: Any) -> Any:
    """Events from the background loop, where kopf.event cannot post (see Kube.post_event);
    posted in the background too, so a slow API server does not stall the loop."""
    plain = _plain(body)

    def emit(type_: str, reason: str, message: str) -> None:
        task = asyncio.create_task(
            state.kube.post_event(plain, type_, reason, message, namespace=EVENTS_NAMESPACE))
        state.tasks.append(task)
        task.add_done_callback(_forget(state))
    return emit


def _forget(state: Runtime) -> Any:
    def done(task: asyncio.Task[None]) -> None:
        if task in state.tasks:
            state.tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("posting an event failed", error=str(task.exception())[:200])
    return done


def _plain(body: Any) -> dict[str, Any]:
    """A detached copy (kopf's body views change under us), complete enough for events."""
    return {"apiVersion": body.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": body.get("kind", ""),
            "metadata": dict(body.get("metadata", {})), "spec": dict(body.get("spec", {})),
            "status": dict(body.get("status", {}))}


# -- settings and background work -------------------------------------------------------------

@kopf.on.login()
async def login(memo: Any, **_: Any) -> kopf.AiohttpSession:
    """Log kopf in with the same credentials as our own client (kubeconfig or in-cluster),
    instead of kopf's guesses from the environment."""
    configuration = runtime(memo).kube.api_client.configuration
    header = await configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
    scheme, _space, token = str(header or "").rpartition(" ")
    info = kopf.ConnectionInfo(
        server=str(configuration.host), ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl, scheme=scheme or None, token=token or None,
        certificate_path=configuration.cert_file, private_key_path=configuration.key_file)
    # the same credentials in a session of our own, only to bound its connections (kopf
    # closes it when it logs in again)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers())
    return kopf.AiohttpSession(server=info.server, aiohttp_session=session)


# a startup that fails (the API server unreachable while priming) is tried again soon: kopf's
# default waits a minute, with no operator at work
@kopf.on.startup(errors=kopf.ErrorsMode.TEMPORARY, backoff=2)
async def configure(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="sharedsync.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="sharedsync.io", key="last-handled-configuration")
    # our own events are explicit (kopf.event); kopf's per-handler log events would flood
    # the API with one event per timer tick per volume
    settings.posting.level = logging.WARNING
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.batching.error_delays = [1, 2, 5, 10]
    state = runtime(memo)
    await prime_view(state)
    state.tasks.append(asyncio.create_task(_poll_agents(state), name="agent-poll"))


@kopf.on.cleanup()
async def shutdown(memo: Any, **_: Any) -> None:
    state = runtime(memo)
    for task in state.tasks:
        task.cancel()
    await asyncio.gather(*state.tasks, return_exceptions=True)
    await state.agents.close()


async def _poll_agents(state: Runtime) -> None:
    """Refresh every live agent's status, remove replicas no SharedVolume claims, keep the
    policies' finalizers and status current."""
    last_policy_resync = 0.0
    while True:
        try:
            LIVE_AGENTS.set(len(state.agents.alive()))
            await _guard_policies(state)
            await state.agents.poll_once()
            await _sweep_orphans(state)
            await _release_stranded_pods(state)
            if time.monotonic() - last_policy_resync >= POLICY_RESYNC_SECONDS:
                last_policy_resync = time.monotonic()
                await _resync_policies(state)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("agent poll failed")
        await asyncio.sleep(2.0)


async def _release_stranded_pods(state: Runtime) -> None:
    """Pods stranded by a failover (on a lost node, or on a node that stopped serving their
    volume) whose volumes' policies ask for it are deleted, so that their StatefulSet or
    Deployment replaces them where the volume now lives (``stranded_pods``)."""
    assert state.stranded_pods is not None
    try:
        alive = state.agents.alive()
        await state.stranded_pods.run_once(state.node_signals(alive), state.shared_volumes,
                                           state.policies, state.stranded_consumers(alive))
    except asyncio.CancelledError:
        raise
    except Exception:  # the agents' poll goes on; tried again next round
        log.exception("releasing stranded pods failed")


async def _sweep_orphans(state: Runtime) -> None:
    now = time.monotonic()
    seen = set()
    for node, status in list(state.agents.statuses.items()):
        for volume in status.volumes:
            key = (node, volume.volume_id)
            if volume.volume_id in state.shared_volumes:
                continue
            seen.add(key)
            first = state.orphans_seen.setdefault(key, now)
            if now - first >= ORPHAN_GRACE_SECONDS:
                log.info("removing a replica no SharedVolume claims", node=node,
                         volume_id=volume.volume_id)
                try:
                    await state.agents.remove(node, volume.volume_id)
                except Exception as exc:  # noqa: BLE001 - retried at the next sweep
                    log.warning("orphan removal failed", node=node, error=str(exc)[:200])
    for key in set(state.orphans_seen) - seen:
        del state.orphans_seen[key]


# -- the cluster view ------------------------------------------------------------------------

#: The label every agent's Lease carries (the chart's and the agent's).
AGENT_LEASE_LABELS = {"app.kubernetes.io/component": "agent"}


def _observe_node(state: Runtime, deleted: bool, name: str, body: Any) -> None:
    if deleted:
        state.nodes.pop(name, None)
        return
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in (body.get("status") or {}).get("conditions") or ())
    state.nodes[name] = NodeFacts(labels=dict(body.get("metadata", {}).get("labels") or {}),
                                  ready=ready,
                                  schedulable=not (body.get("spec") or {}).get("unschedulable"))


def _observe_lease(state: Runtime, deleted: bool, namespace: str | None, body: Any) -> None:
    if namespace != state.namespace:
        return
    info = agent_from_lease(body)
    if info is None:
        return
    leases: dict[str, AgentInfo] = dict(state.agents.leases)
    if deleted:
        leases.pop(info.node, None)
    else:
        leases[info.node] = info
    state.agents.observe_leases(leases.values())


def _observe(objects: dict[str, Mapping[str, Any]], deleted: bool, name: str,
             body: Any) -> None:
    if deleted:
        objects.pop(name, None)
    else:
        objects[name] = _plain(body)


async def prime_view(state: Runtime) -> None:
    """Read the whole view, and every live agent's report, before any handler runs.

    kopf starts its watches only once the startup handlers are done, and then each watch
    delivers its objects on its own schedule: a new leader (a restart, a standby taking over)
    reconciled volumes before it knew the nodes their replicas are on, and dropped those
    replicas from the layout to place them again as new ones, rebuilt from nothing; a volume
    whose policy had not arrived yet went NotReady, and the policy guard took in-use
    finalizers off policies whose volumes it had not seen. Each decision is only as good as
    the view it is made from, so the view is complete first; the watches keep it current.
    """
    listing = await state.kube.list_all(
        state.namespace, ",".join(f"{k}={v}" for k, v in AGENT_LEASE_LABELS.items()))
    for body in listing.nodes:
        _observe_node(state, False, body["metadata"]["name"], body)
    for body in listing.agent_leases:
        _observe_lease(state, False, body["metadata"].get("namespace"), body)
    for objects, bodies in ((state.policies, listing.policies),
                            (state.shared_volumes, listing.volumes),
                            (state.shared_volume_snapshots, listing.snapshots)):
        for body in bodies:
            _observe(objects, False, body["metadata"]["name"], body)
    await state.agents.poll_once(call_timeout=PRIME_POLL_TIMEOUT_SECONDS)
    log.info("view primed", nodes=len(state.nodes), agents=len(state.agents.statuses),
             policies=len(state.policies), volumes=len(state.shared_volumes))


@kopf.on.event("", "v1", "nodes")
def node_event(type: str, name: str, body: Any, memo: Any, **_: Any) -> None:
    _observe_node(runtime(memo), type == "DELETED", name, body)


@kopf.on.event("coordination.k8s.io", "v1", "leases", labels=AGENT_LEASE_LABELS)
def lease_event(type: str, namespace: str | None, body: Any, memo: Any, **_: Any) -> None:
    _observe_lease(runtime(memo), type == "DELETED", namespace, body)


@kopf.on.event(GROUP, VERSION, "syncpolicies")
def policy_event(type: str, name: str, body: Any, memo: Any, **_: Any) -> None:
    _observe(runtime(memo).policies, type == "DELETED", name, body)


@kopf.on.event(GROUP, VERSION, "sharedvolumes")
def volume_event(type: str, name: str, body: Any, memo: Any, **_: Any) -> None:
    _observe(runtime(memo).shared_volumes, type == "DELETED", name, body)


# -- SharedVolume ------------------------------------------------------------------------------

async def _reconcile_volume(handler: str, body: Any, memo: Any) -> None:
    state = runtime(memo)
    if body.get("metadata", {}).get("deletionTimestamp"):
        return
    state.last_volume_reconcile = time.monotonic()
    state.volume_reconciles += 1
    # renewals reach us as lease events; let time move the view along between them too
    state.agents.observe_leases(state.agents.leases.values())
    with RECONCILE_SECONDS.labels(handler).time():
        try:
            await state.volumes.reconcile(_plain(body), state.policies, state.node_views(),
                                          _emitter(body))
        except Exception:
            RECONCILE_ERRORS.labels(handler).inc()
            raise
        finally:
            state.volume_reconciles -= 1
            state.last_volume_reconcile = time.monotonic()


@kopf.on.resume(GROUP, VERSION, "sharedvolumes")
@kopf.on.create(GROUP, VERSION, "sharedvolumes")
@kopf.on.update(GROUP, VERSION, "sharedvolumes")
async def volume_changed(body: Any, memo: Any, **_: Any) -> None:
    await _reconcile_volume("volume", body, memo)


@kopf.timer(GROUP, VERSION, "sharedvolumes", interval=VOLUME_RESYNC_SECONDS, sharp=False)
async def volume_timer(body: Any, memo: Any, **_: Any) -> None:
    await _reconcile_volume("volume_timer", body, memo)


@kopf.on.delete(GROUP, VERSION, "sharedvolumes")
async def volume_deleted(name: str, body: Any, memo: Any, **_: Any) -> None:
    state = runtime(memo)
    with RECONCILE_SECONDS.labels("volume_delete").time():
        try:
            await state.volumes.delete(name, _emitter(body))
        except RuntimeError as exc:
            RECONCILE_ERRORS.labels("volume_delete").inc()
            raise kopf.TemporaryError(str(exc), delay=2) from exc


# -- SharedVolumeSnapshot ----------------------------------------------------------------------

#: How soon a snapshot that could not be taken yet is tried again.
SNAPSHOT_RETRY_SECONDS = 2.0


@kopf.on.event(GROUP, VERSION, "sharedvolumesnapshots")
def snapshot_event(type: str, name: str, body: Any, memo: Any, **_: Any) -> None:
    _observe(runtime(memo).shared_volume_snapshots, type == "DELETED", name, body)


@kopf.on.resume(GROUP, VERSION, "sharedvolumesnapshots")
@kopf.on.create(GROUP, VERSION, "sharedvolumesnapshots")
async def snapshot_created(body: Any, memo: Any, **_: Any) -> None:
    if body.get("metadata", {}).get("deletionTimestamp"):
        return
    state = runtime(memo)
    with RECONCILE_SECONDS.labels("snapshot").time():
        try:
            await state.snapshot_reconciler().reconcile(_plain(body), _emitter(body))
        except NotYetError as exc:
            raise kopf.TemporaryError(str(exc), delay=SNAPSHOT_RETRY_SECONDS) from exc
        except Exception:
            RECONCILE_ERRORS.labels("snapshot").inc()
            raise


@kopf.on.delete(GROUP, VERSION, "sharedvolumesnapshots")
async def snapshot_deleted(body: Any, memo: Any, **_: Any) -> None:
    state = runtime(memo)
    with RECONCILE_SECONDS.labels("snapshot_delete").time():
        failed = await state.snapshot_reconciler().delete(_plain(body))
    if failed:
        RECONCILE_ERRORS.labels("snapshot_delete").inc()
        raise kopf.TemporaryError(f"DeleteSnapshot failed on {', '.join(failed)}", delay=2)


# -- SyncPolicy --------------------------------------------------------------------------------

async def _reconcile_policy(handler: str, body: Any, memo: Any) -> None:
    state = runtime(memo)
    if body.get("metadata", {}).get("deletionTimestamp"):
        return
    with RECONCILE_SECONDS.labels(handler).time():
        try:
            await reconcile_policy(state.kube, _plain(body), state.node_views(),
                                   list(state.shared_volumes.values()), _emitter(body))
        except Exception:
            RECONCILE_ERRORS.labels(handler).inc()
            raise


@kopf.on.resume(GROUP, VERSION, "syncpolicies")
@kopf.on.create(GROUP, VERSION, "syncpolicies")
@kopf.on.update(GROUP, VERSION, "syncpolicies")
async def policy_changed(body: Any, memo: Any, **_: Any) -> None:
    await _reconcile_policy("policy", body, memo)


async def _resync_policies(state: Runtime) -> None:
    """Every policy's status, again (volume counts, lag, eligible nodes change without the
    policy changing). Not a kopf timer: a timer puts kopf's finalizer on every policy, and a
    policy that nothing uses must stay deletable even when no operator runs (helm uninstall
    removes the operator with the policies)."""
    volumes = list(state.shared_volumes.values())
    for body in list(state.policies.values()):
        if body.get("metadata", {}).get("deletionTimestamp"):
            continue
        with RECONCILE_SECONDS.labels("policy_resync").time():
            try:
                await reconcile_policy(state.kube, body, state.node_views(), volumes,
                                       _background_emitter(state, body))
            except Exception:
                RECONCILE_ERRORS.labels("policy_resync").inc()
                log.exception("policy resync failed", policy=body["metadata"].get("name"))


async def _guard_policies(state: Runtime) -> None:
    """Keep the in-use finalizer exactly on the SyncPolicies that volumes use.

    A policy in use must not vanish under its volumes, so it carries
    ``sharedsync.io/in-use`` and its deletion waits (Ready=False, reason InUse, naming the
    volumes) until the last volume is gone. An unused policy carries no finalizer, so that
    deleting it, or uninstalling the chart with the operator, never leaves it stuck.
    """
    volumes = list(state.shared_volumes.values())
    for name, body in list(state.policies.items()):
        users = volumes_using(name, volumes)
        finalizers = list(body.get("metadata", {}).get("finalizers") or ())
        deleting = bool(body.get("metadata", {}).get("deletionTimestamp"))
        if deleting and users:
            await refuse_delete_in_use(state.kube, body, volumes)
        held = IN_USE_FINALIZER in finalizers
        if held != bool(users) and not (deleting and not held):
            await state.kube.set_finalizer(SYNC_POLICIES, name, IN_USE_FINALIZER, bool(users))


