"""Cluster mode: a volume is a SharedVolume that the operator places and the agents hold.

The controller's Kubernetes state store already writes the SharedVolume as its record; that
object is the operator's desired state. So this backend builds nothing itself: it waits for the
operator. A create returns once the operator has placed the volume and its ``Ready`` condition
is True (for the generation the record asked for), and reports the replica nodes as the
volume's topology, which Kubernetes turns into the PV's node affinity. A delete returns once
the SharedVolume is gone: the operator's finalizer removes every replica first. An expansion
grows ``spec.capacity`` (the operator resizes the replicas) and returns once the operator has
acted on it and, with agent credentials, once every live replica's agent reports the new size.

Every wait is bounded, by ``--operator-timeout`` and by the CO's deadline for the call,
whichever ends first, and then answers ABORTED with what the operator last said. The CO retries
(CreateVolume is idempotent by name; the record stays), so a slow placement costs retries, never
a duplicate.

Capacity comes from the agents' Leases (``sharedsync.io/available-bytes``, operator/API.md):
per node when the CO names one, else the most any live agent has, since each replica of a
volume must fit on one node.

Snapshots: the store writes the SharedVolumeSnapshot record; the operator snapshots the source
volume on its replicas and reports ``status.readyToUse``, which a create waits for; a delete
deletes the record and waits for the operator's finalizer to have removed every copy. A volume
made from a snapshot or a volume is an ordinary SharedVolume with ``spec.contentSource`` (the
store writes it): the operator places its primary where the source is held.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import aiohttp
import structlog
from kubernetes_asyncio.client import ApiClient, CoordinationV1Api, CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException

from replication_agent.tls import TlsConfig
from sharedsync.core.errors import (
    Aborted,
    InvalidArgument,
    NotFound,
    SharedsyncError,
    Unavailable,
)
from sharedsync.core.parameters import SYNC_POLICY, VolumeParameters
from sharedsync.core.quantity import parse_bytes
from sharedsync.core.records import SourceKind
from sharedsync.kubeclient import api_client
from sharedsync.leases import expires_at
from sharedsync.storage.replicas import Health, Source, VolumeKind

from .agent_client import AgentClient
from .backend import Provisioned, StillCreating

log = structlog.get_logger(__name__)

GROUP = "sharedsync.io"
VERSION = "v1alpha1"
SHARED_VOLUMES = "sharedvolumes"
SHARED_VOLUME_SNAPSHOTS = "sharedvolumesnapshots"
SYNC_POLICIES = "syncpolicies"
#: Agent Leases, as operator/API.md describes them.
AGENT_LEASE_SELECTOR = "app.kubernetes.io/name=sharedsync,app.kubernetes.io/component=agent"
DEFAULT_NAMESPACE = "sharedsync"
DEFAULT_WAIT_SECONDS = 60.0
POLL_SECONDS = 0.5
REQUEST_TIMEOUT_SECONDS = 30.0
_MERGE_PATCH: dict[str, Any] = {"_content_type": "application/merge-patch+json"}

JsonObject = dict[str, Any]


class _CustomObjects(Protocol):
    """The typed subset of ``CustomObjectsApi`` we call (the generated client is untyped)."""

    def get_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                  **kwargs: Any) -> Awaitable[Any]: ...
    def patch_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                    body: JsonObject, **kwargs: Any) -> Awaitable[Any]: ...
    def delete_cluster_custom_object(self, group: str, version: str, plural: str, name: str,
                                     **kwargs: Any) -> Awaitable[Any]: ...
    def list_cluster_custom_object(self, group: str, version: str, plural: str,
                                   **kwargs: Any) -> Awaitable[Any]: ...


class _Leases(Protocol):
    def list_namespaced_lease(self, namespace: str, **kwargs: Any) -> Awaitable[Any]: ...


@dataclass(frozen=True, slots=True)
class AgentLease:
    """One agent as its Lease describes it."""

    node: str
    address: str
    available_bytes: int
    alive: bool


def agent_lease(lease: JsonObject, now: datetime.datetime) -> AgentLease | None:
    """Read an agent's Lease (as JSON); None if it is not one."""
    annotations = (lease.get("metadata") or {}).get("annotations") or {}
    node, address = annotations.get("sharedsync.io/node"), annotations.get("sharedsync.io/address")
    if not node or not address:
        return None
    try:
        available = int(annotations.get("sharedsync.io/available-bytes", "0"))
    except ValueError:
        available = 0
    end = expires_at(lease)
    return AgentLease(node=str(node), address=str(address), available_bytes=max(available, 0),
                      alive=end is not None and now < end)


def _names_object(exc: ApiException) -> bool:
    """Whether a 404 is about the object (it is missing), not the URL (the CRD is)."""
    try:
        status = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        return False
    details = status.get("details") if isinstance(status, dict) else None
    return bool(isinstance(details, dict) and details.get("name"))


def condition(obj: JsonObject, type_: str) -> JsonObject:
    for entry in (obj.get("status") or {}).get("conditions") or ():
        if isinstance(entry, dict) and entry.get("type") == type_:
            return entry
    return {}


def replica_nodes(obj: JsonObject) -> tuple[str, ...]:
    """The nodes holding the volume's replicas (the operator's layout), primary first."""
    status = obj.get("status") or {}
    nodes = [str(r["node"]) for r in status.get("replicas") or ()
             if isinstance(r, dict) and r.get("node")]
    primary = str(status.get("primary") or "")
    return tuple(sorted(nodes, key=lambda n: (n != primary, n)))


def not_ready_reason(obj: JsonObject) -> str | None:
    """None when the operator reports the volume Ready for its current spec, else why not."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "it is being deleted"
    generation = int(meta.get("generation") or 0)
    if int(status.get("observedGeneration") or 0) < generation:
        return "the operator has not acted on its latest spec yet"
    ready = condition(obj, "Ready")
    if ready.get("status") == "True" and replica_nodes(obj):
        return None
    if ready:
        return f"Ready is {ready.get('status')}: {ready.get('reason')}: {ready.get('message')}"
    return "the operator has not reported on it yet"


class ClusterBackend:
    """A :class:`csi_driver.backend.VolumeBackend` over SharedVolumes and the operator."""

    supports_snapshots = True

    def __init__(self, client: ApiClient, namespace: str = DEFAULT_NAMESPACE, *,
                 agent_tls: TlsConfig | None = None, wait_seconds: float = DEFAULT_WAIT_SECONDS,
                 poll_seconds: float = POLL_SECONDS, owns_client: bool = False) -> None:
        self._client = client
        self._owns_client = owns_client
        self._objects = cast("_CustomObjects", CustomObjectsApi(client))
        self._leases = cast("_Leases", CoordinationV1Api(client))
        self.namespace = namespace
        self.agent_tls = agent_tls
        self.wait_seconds = wait_seconds
        self.poll_seconds = poll_seconds
        self._agents: dict[str, AgentClient] = {}

    @classmethod
    async def connect(cls, kubeconfig: Path | None, namespace: str = DEFAULT_NAMESPACE, *,
                      agent_tls: TlsConfig | None = None,
                      wait_seconds: float = DEFAULT_WAIT_SECONDS) -> ClusterBackend:
        """A backend with its own client: from ``kubeconfig``, else the pod's service account."""
        try:
            client = await api_client(kubeconfig)
        except ConfigException as exc:
            raise Unavailable(f"no usable Kubernetes credentials for cluster mode: {exc}") from exc
        except OSError as exc:
            raise InvalidArgument(f"cannot read kubeconfig {kubeconfig}: {exc}") from exc
        return cls(client, namespace, agent_tls=agent_tls, wait_seconds=wait_seconds,
                   owns_client=True)

    # -- API calls ---------------------------------------------------------------------------

    async def _call(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any,
                    missing_ok: bool = False, **kwargs: Any) -> Any:
        """One API request, errors in our vocabulary; with ``missing_ok``, None when the
        object named is not there (but not when the whole resource is: CRDs missing)."""
        try:
            return await call(*args, _request_timeout=REQUEST_TIMEOUT_SECONDS, **kwargs)
        except ApiException as exc:
            code = int(exc.status or 0)
            if code == 404 and missing_ok and _names_object(exc):
                return None
            text = f"{what}: the Kubernetes API server answered {code} {exc.reason}"
            if code in (401, 403):
                raise Unavailable(f"{text} (check the CSI controller's RBAC)") from exc
            if code in (409, 410):
                raise Aborted(f"{text}; retry") from exc
            if code in (400, 422):
                raise InvalidArgument(text) from exc
            raise Unavailable(text) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unavailable(f"{what}: cannot reach the Kubernetes API server "
                              f"({type(exc).__name__}: {exc})") from exc
        except ConfigException as exc:
            raise Unavailable(f"{what}: Kubernetes credentials unusable: {exc}") from exc

    async def _get(self, plural: str, name: str) -> JsonObject | None:
        return cast("JsonObject | None", await self._call(
            f"get {plural}/{name}", self._objects.get_cluster_custom_object,
            GROUP, VERSION, plural, name, missing_ok=True))

    async def _volume(self, volume_id: str) -> JsonObject:
        obj = await self._get(SHARED_VOLUMES, volume_id)
        if obj is None:
            raise NotFound(f"SharedVolume {volume_id} does not exist")
        return obj

    async def agent_leases(self) -> list[AgentLease]:
        found = await self._call(f"list agent Leases in namespace {self.namespace}",
                                 self._leases.list_namespaced_lease, self.namespace,
                                 label_selector=AGENT_LEASE_SELECTOR)
        now = datetime.datetime.now(datetime.UTC)
        items = self._client.sanitize_for_serialization(found).get("items") or []
        return [lease for item in items if (lease := agent_lease(item, now)) is not None]

    async def _wait(self, volume_id: str, within: float | None,
                    check: Callable[[JsonObject | None], Awaitable[str | None]],
                    late: type[Aborted] = Aborted, plural: str = SHARED_VOLUMES) -> None:
        """Poll the SharedVolume (or another of our objects) until ``check`` says nothing is
        missing (returns None); at the deadline raise ``late`` (retryable) with the last thing
        it said was missing."""
        budget = self.wait_seconds if within is None else min(within, self.wait_seconds)
        deadline = time.monotonic() + budget
        what = "volume" if plural == SHARED_VOLUMES else "snapshot"
        while True:
            missing = await check(await self._get(plural, volume_id))
            if missing is None:
                return
            if time.monotonic() >= deadline:
                raise late(f"{what} {volume_id}: {missing} (waited {budget:.0f} s for the "
                           "operator; retry)")
            await asyncio.sleep(min(self.poll_seconds, max(deadline - time.monotonic(), 0.0)))

    # -- VolumeBackend -----------------------------------------------------------------------

    def accessible_nodes(self) -> tuple[str, ...]:
        return ()  # the operator places each volume

    async def ready(self) -> str | None:
        try:
            await self._call("list SharedVolumes", self._objects.list_cluster_custom_object,
                             GROUP, VERSION, SHARED_VOLUMES, limit=1)
        except SharedsyncError as exc:
            return str(exc)
        return None

    async def admit(self, parameters: VolumeParameters, source: SourceKind) -> None:
        name = parameters.sync_policy
        if not name:
            raise InvalidArgument(f"the StorageClass parameter {SYNC_POLICY!r} is required in "
                                  "cluster mode: it names the SyncPolicy that replicates the "
                                  "volume")
        if await self._get(SYNC_POLICIES, name) is None:
            raise InvalidArgument(f"SyncPolicy {name!r} (StorageClass parameter {SYNC_POLICY!r}) "
                                  "does not exist")

    async def create_volume(self, volume_id: str, size_bytes: int, kind: VolumeKind,
                            source: Source | None, *,
                            within: float | None = None) -> Provisioned:
        placed: list[tuple[str, ...]] = []

        async def check(obj: JsonObject | None) -> str | None:
            if obj is None:
                raise Aborted(f"SharedVolume {volume_id} was deleted while being created; "
                              "retry")
            reason = not_ready_reason(obj)
            if reason is None:
                placed.append(replica_nodes(obj))
            return reason

        try:
            await self._wait(volume_id, within, check, late=StillCreating)
        except Unavailable as exc:  # the volume is under way; we only could not look
            raise StillCreating(f"volume {volume_id} is being created: {exc}") from exc
        log.info("volume placed", volume_id=volume_id, nodes=list(placed[-1]))
        return Provisioned(size_bytes=size_bytes, nodes=placed[-1])

    async def delete_volume(self, volume_id: str, *, within: float | None = None) -> None:
        await self._call(f"delete SharedVolume {volume_id}",
                         self._objects.delete_cluster_custom_object,
                         GROUP, VERSION, SHARED_VOLUMES, volume_id, missing_ok=True)

        async def check(obj: JsonObject | None) -> str | None:
            if obj is None:
                return None
            return ("the operator is still removing its replicas (finalizers: "
                    f"{', '.join((obj.get('metadata') or {}).get('finalizers') or ())})")

        await self._wait(volume_id, within, check)

    async def expand_volume(self, volume_id: str, size_bytes: int, *,
                            within: float | None = None) -> int:
        obj = await self._volume(volume_id)
        if parse_bytes((obj.get("spec") or {}).get("capacity", 0)) < size_bytes:
            obj = cast("JsonObject", await self._call(
                f"grow SharedVolume {volume_id}", self._objects.patch_cluster_custom_object,
                GROUP, VERSION, SHARED_VOLUMES, volume_id,
                {"spec": {"capacity": size_bytes}}, **_MERGE_PATCH))
        generation = int((obj.get("metadata") or {}).get("generation") or 0)

        async def check(current: JsonObject | None) -> str | None:
            if current is None:
                raise NotFound(f"SharedVolume {volume_id} was deleted while growing")
            observed = int((current.get("status") or {}).get("observedGeneration") or 0)
            if observed < generation:
                return f"the operator has not acted on the new size ({size_bytes} bytes) yet"
            reason = not_ready_reason(current)
            if reason is not None:
                return reason
            return await self._replicas_smaller(volume_id, replica_nodes(current), size_bytes)

        await self._wait(volume_id, within, check)
        return size_bytes

    async def _replicas_smaller(self, volume_id: str, nodes: tuple[str, ...],
                                size_bytes: int) -> str | None:
        """Which live replicas' agents do not report ``size_bytes`` yet (None: all do, or we
        have no credentials to ask them and trust the operator's Ready)."""
        if self.agent_tls is None:
            return None
        leases = {lease.node: lease for lease in await self.agent_leases() if lease.alive}
        smaller = []
        for node in nodes:
            lease = leases.get(node)
            if lease is None:
                continue  # the operator applies the new size when the agent returns
            client = self._agents.get(node)
            if client is None or client.target != lease.address:
                if client is not None:
                    await client.close()
                client = self._agents[node] = AgentClient.remote(node, lease.address,
                                                                 self.agent_tls)
            try:
                status = await client.status(volume_id)
            except SharedsyncError as exc:
                smaller.append(f"{node} ({exc})")
                continue
            held = status.volumes[0].size_bytes if status.volumes else 0
            if held < size_bytes:
                smaller.append(f"{node} ({held} bytes)")
        if smaller:
            return (f"not every replica holds {size_bytes} bytes yet: "
                    + ", ".join(smaller))
        return None

    def node_expansion_required(self, kind: VolumeKind) -> bool:
        # the agents grow the filesystem online; only a loop device on the node must be told
        return kind is VolumeKind.BLOCK

    async def volume_health(self, volume_id: str) -> Health:
        obj = await self._get(SHARED_VOLUMES, volume_id)
        if obj is None:
            return Health(abnormal=True, message=f"SharedVolume {volume_id} does not exist")
        degraded = condition(obj, "Degraded")
        if degraded.get("status") == "True":
            return Health(abnormal=True,
                          message=f"{degraded.get('reason')}: {degraded.get('message')}")
        ready = condition(obj, "Ready")
        if ready.get("status") != "True":
            return Health(abnormal=True, message=f"not Ready: {ready.get('reason')}: "
                                                 f"{ready.get('message')}")
        return Health(abnormal=False, message="")

    async def available_bytes(self, node: str | None = None) -> int:
        live = [lease for lease in await self.agent_leases() if lease.alive]
        if node is not None:
            return next((lease.available_bytes for lease in live if lease.node == node), 0)
        return max((lease.available_bytes for lease in live), default=0)

    async def create_snapshot(self, volume_id: str, snapshot_id: str) -> int:
        size: list[int] = []

        async def check(obj: JsonObject | None) -> str | None:
            if obj is None:
                raise Aborted(f"SharedVolumeSnapshot {snapshot_id} was deleted while being "
                              "created; retry")
            status = obj.get("status") or {}
            if status.get("readyToUse"):
                size.append(int(status.get("sizeBytes") or
                                (obj.get("spec") or {}).get("sizeBytes") or 0))
                return None
            ready = condition(obj, "Ready")
            if ready:
                return f"Ready is {ready.get('status')}: {ready.get('reason')}: " \
                       f"{ready.get('message')}"
            return "the operator has not taken it yet"

        await self._wait(snapshot_id, None, check, plural=SHARED_VOLUME_SNAPSHOTS)
        log.info("snapshot taken", snapshot_id=snapshot_id, volume_id=volume_id)
        return size[-1]

    async def delete_snapshot(self, volume_id: str, snapshot_id: str) -> None:
        await self._call(f"delete SharedVolumeSnapshot {snapshot_id}",
                         self._objects.delete_cluster_custom_object,
                         GROUP, VERSION, SHARED_VOLUME_SNAPSHOTS, snapshot_id, missing_ok=True)

        async def check(obj: JsonObject | None) -> str | None:
            if obj is None:
                return None
            return "the operator is still deleting its copies on the agents"

        await self._wait(snapshot_id, None, check, plural=SHARED_VOLUME_SNAPSHOTS)

    async def has_snapshot(self, volume_id: str, snapshot_id: str) -> bool:
        obj = await self._get(SHARED_VOLUME_SNAPSHOTS, snapshot_id)
        return bool(obj and (obj.get("status") or {}).get("readyToUse"))

    async def close(self) -> None:
        for client in self._agents.values():
            await client.close()
        self._agents.clear()
        if self._owns_client:
            await self._client.close()
