"""coordination.k8s.io Leases: agents announce themselves with one; operators elect a leader.

Both uses need the same two things: renew a Lease we hold without trampling one somebody else
holds, and tell whether a Lease is still current. The API server's optimistic concurrency
(``resourceVersion`` on replace) makes the take-over race safe: of two writers that both saw an
expired Lease, exactly one replace succeeds and the other gets 409 Conflict.
"""

import datetime
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = structlog.get_logger(__name__)

#: The agent Lease annotation naming the filesystem the agent makes new replicas with
#: (``btrfs`` or ``ext4``): the operator places a volume that ships btrfs snapshots on btrfs
#: nodes only, and makes one that needs an ext4 node replicate file by file. Agents that
#: predate it made btrfs replicas only.
STORE_FILESYSTEM_ANNOTATION = "sharedsync.io/store-filesystem"

_MICROTIME = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_microtime(when: datetime.datetime) -> str:
    """Kubernetes MicroTime: RFC 3339 with microseconds, always UTC."""
    return when.astimezone(datetime.UTC).strftime(_MICROTIME)


def parse_time(value: Any) -> datetime.datetime | None:
    """A Lease time as the API returns it (a string, or a datetime from the typed client)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime.datetime):
        return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    text = str(value).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text)


def expires_at(lease: Mapping[str, Any]) -> datetime.datetime | None:
    """When a Lease (as a dict: ``{"spec": {...}}``) stops being current; None if never renewed."""
    spec = lease.get("spec") or {}
    renewed = parse_time(spec.get("renewTime") or spec.get("renew_time"))
    duration = spec.get("leaseDurationSeconds") or spec.get("lease_duration_seconds")
    if renewed is None or not duration:
        return None
    return renewed + datetime.timedelta(seconds=int(duration))


def is_current(lease: Mapping[str, Any], now: datetime.datetime) -> bool:
    """True while the holder renewed it within its duration."""
    end = expires_at(lease)
    return end is not None and now < end


@dataclass
class LeaseKeeper:
    """Create, renew or take over one Lease on behalf of ``holder``.

    ``annotations`` is called at each renewal so that what the Lease advertises (an agent's free
    space, say) stays fresh without a second write.
    """

    api_client: client.ApiClient
    namespace: str
    name: str
    holder: str
    duration_seconds: int
    labels: Mapping[str, str]
    annotations: Callable[[], Mapping[str, str]] = dict

    def __post_init__(self) -> None:
        self.api = client.CoordinationV1Api(self.api_client)

    async def renew(self, *, take_over: bool = True) -> bool:
        """Renew our hold; take the Lease if it is free or expired (or always, with
        ``take_over``, for a Lease that is ours by name such as an agent's node Lease).
        Returns whether we hold it now."""
        now = datetime.datetime.now(datetime.UTC)
        try:
            current = await self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return await self._create(now)
        body = self.api_client.sanitize_for_serialization(current)
        spec = body.get("spec") or {}
        ours = spec.get("holderIdentity") == self.holder
        if not ours and not take_over and is_current(body, now):
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        body["spec"] = {
            "holderIdentity": self.holder, "leaseDurationSeconds": self.duration_seconds,
            "renewTime": format_microtime(now),
            "acquireTime": spec.get("acquireTime") if ours else format_microtime(now),
            "leaseTransitions": transitions,
        }
        metadata = body.setdefault("metadata", {})
        metadata["labels"] = {**(metadata.get("labels") or {}), **self.labels}
        metadata["annotations"] = {**(metadata.get("annotations") or {}), **self.annotations()}
        try:
            await self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # somebody else renewed or took it in between
                return False
            raise
        if not ours:
            log.info("lease acquired", lease=self.name, holder=self.holder)
        return True

    async def _create(self, now: datetime.datetime) -> bool:
        stamp = format_microtime(now)
        body: Any = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace,
                         "labels": dict(self.labels), "annotations": dict(self.annotations())},
            "spec": {"holderIdentity": self.holder, "leaseDurationSeconds": self.duration_seconds,
                     "renewTime": stamp, "acquireTime": stamp, "leaseTransitions": 0},
        }
        try:
            await self.api.create_namespaced_lease(self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # created by somebody else a moment ago
                return False
            raise
        log.info("lease created", lease=self.name, holder=self.holder)
        return True

    async def release(self) -> None:
        """Give the Lease up at a clean stop so a successor need not wait for it to expire."""
        try:
            current = await self.api.read_namespaced_lease(self.name, self.namespace)
            body = self.api_client.sanitize_for_serialization(current)
            if (body.get("spec") or {}).get("holderIdentity") != self.holder:
                return
            body["spec"]["holderIdentity"] = None
            body["spec"]["renewTime"] = None
            await self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            log.warning("could not release the lease", lease=self.name, status=exc.status)
