"""Delete pods stranded by a failover, where their SyncPolicy asks for it, so they can move.

Two kinds of stranded pods: those on a lost node, and those on a node that stopped serving
their volume under them (its agent reports it). The rules are pure
(``sharedsync.core.node_loss``); this module gathers what they need from the cluster (the pods
bound to those nodes, the sharedsync volumes they mount, those volumes' policies) and acts on
the verdicts: a deletion with the pod's UID as a precondition (never its replacement of the
same name), forced on a lost node (no kubelet will confirm it), graceful elsewhere; a Warning
event on the pod, a log line and a counter.
"""

import datetime
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.node_loss import (
    NodeSignals,
    StrandedPod,
    confirm_lost,
    lost_volumes,
    verdict,
)
from sharedsync.core.policy import policy_from_spec

from .kube import Kube
from .metrics import STRANDED_PODS_DELETED

log = structlog.get_logger(__name__)

#: How often the pods of each lost node are looked at again (one pod list per lost node).
PASS_INTERVAL_SECONDS = 5.0
#: Pods that are over (a Job's, a crashed one's) hold nothing and are left to their owner.
_FINISHED = ("Succeeded", "Failed")


def owner_kind(pod: Mapping[str, Any]) -> str:
    """The kind of the pod's controller, "" when it has none."""
    for ref in pod.get("metadata", {}).get("ownerReferences") or ():
        if ref.get("controller"):
            return str(ref.get("kind") or "")
    return ""


def claims_of(pod: Mapping[str, Any]) -> list[str]:
    """The PersistentVolumeClaims the pod mounts: named ones, and generic ephemeral volumes'
    (which Kubernetes names ``<pod>-<volume>``)."""
    name = pod.get("metadata", {}).get("name", "")
    claims = []
    for volume in (pod.get("spec") or {}).get("volumes") or ():
        if volume.get("persistentVolumeClaim"):
            claims.append(str(volume["persistentVolumeClaim"].get("claimName") or ""))
        elif volume.get("ephemeral"):
            claims.append(f"{name}-{volume.get('name', '')}")
    return [claim for claim in claims if claim]


@dataclass
class StrandedPodReleaser:
    """Remembers when each node was first seen lost and what each pod mounts, between passes
    (in memory: a new leader starts the confirmation over, which only delays it)."""

    kube: Kube
    clock: Callable[[], float] = time.monotonic
    lost_since: dict[str, float] = field(default_factory=dict)
    #: pod UID -> the sharedsync volumes it mounts (a pod's volumes never change)
    volumes_of_pod: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: (pod UID, reason) already logged as kept, so a long outage logs it once
    kept_logged: set[tuple[str, str]] = field(default_factory=set)
    last_pass: float = float("-inf")

    async def run_once(self, signals: Mapping[str, NodeSignals],
                       shared_volumes: Mapping[str, Mapping[str, Any]],
                       policies: Mapping[str, Mapping[str, Any]],
                       moved: Mapping[str, Mapping[str, int]] | None = None) -> list[str]:
        """One pass; returns the pods deleted (``namespace/name``). ``moved`` maps a node
        whose agent is alive to the volumes it stopped serving to pods there, and since when
        (Unix ns: ``VolumeStatus.consumers_stranded_unix_ns``)."""
        now = self.clock()
        lost, self.lost_since = confirm_lost(signals, self.lost_since, now)
        moved = {node: volumes for node, volumes in (moved or {}).items()
                 if volumes and node not in lost}
        if not (lost or moved) or now - self.last_pass < PASS_INTERVAL_SECONDS:
            return []
        self.last_pass = now
        deleted: list[str] = []
        seen: set[str] = set()
        for node in sorted(lost | set(moved)):
            for body in await self.kube.pods_on_node(node):
                metadata = body.get("metadata", {})
                uid = str(metadata.get("uid") or "")
                phase = (body.get("status") or {}).get("phase")
                if not uid or phase in _FINISHED:
                    continue
                seen.add(uid)
                pod = await self._stranded(body, node, uid, shared_volumes)
                if node in lost:
                    where = (f"on node {node}, which is lost (not Ready, and its sharedsync "
                             "agent's Lease expired)")
                    reason, force = "PodDeletedOnNodeLoss", True
                else:
                    if metadata.get("deletionTimestamp"):
                        continue  # its kubelet is stopping it already
                    gone = lost_volumes(pod, phase == "Running", created_unix_ns(metadata),
                                        moved[node])
                    if not gone:
                        continue
                    where = (f"on node {node}, which stopped serving volume "
                             f"{', '.join(gone)} under it (the replica there was fenced or "
                             "demoted by a failover: its mount no longer works)")
                    reason, force = "PodDeletedVolumeMoved", False
                decision = verdict(pod, {v: _setting(v, shared_volumes, policies)
                                         for v in pod.volumes})
                if not decision.delete:
                    if pod.volumes and (uid, decision.reason) not in self.kept_logged:
                        await self._report_kept(body, pod, uid, where, decision.reason)
                    continue
                why = f"deleted {where}, so that its {pod.owner_kind} can replace it"
                if await self._delete(body, pod, uid, force=force, reason=reason,
                                      message=f"{why}: {decision.reason}"):
                    deleted.append(f"{pod.namespace}/{pod.name}")
        self.volumes_of_pod = {u: v for u, v in self.volumes_of_pod.items() if u in seen}
        self.kept_logged = {entry for entry in self.kept_logged if entry[0] in seen}
        return deleted

    async def _stranded(self, body: Mapping[str, Any], node: str, uid: str,
                        shared_volumes: Mapping[str, Mapping[str, Any]]) -> StrandedPod:
        metadata = body.get("metadata", {})
        namespace = str(metadata.get("namespace") or "")
        volumes = self.volumes_of_pod.get(uid)
        if volumes is None:
            handles = [await self.kube.claim_volume_handle(namespace, claim)
                       for claim in claims_of(body)]
            volumes = tuple(h for h in handles if h is not None and h in shared_volumes)
            if None not in handles:  # an unbound claim may be bound by the next pass
                self.volumes_of_pod[uid] = volumes
        return StrandedPod(namespace=namespace, name=str(metadata.get("name") or ""),
                           node=node, owner_kind=owner_kind(body), volumes=volumes)

    async def _report_kept(self, body: Mapping[str, Any], pod: StrandedPod, uid: str,
                           where: str, why_kept: str) -> None:
        """Say once, on the pod, that it is stranded and left to a human (what Never asks)."""
        self.kept_logged.add((uid, why_kept))
        log.info("stranded pod kept", pod=f"{pod.namespace}/{pod.name}", node=pod.node,
                 reason=why_kept)
        await self._warn(body, pod, "PodStranded",
                         f"stranded {where}; left alone: {why_kept}. Delete it, and its "
                         "controller (if any) replaces it where the volume is served now; the "
                         "SyncPolicy's failover.strandedPodDeletion can have the operator do "
                         "that")

    async def _delete(self, body: Mapping[str, Any], pod: StrandedPod, uid: str, *,
                      force: bool, reason: str, message: str) -> bool:
        if not await self.kube.delete_pod(pod.namespace, pod.name, uid, force=force):
            return False
        STRANDED_PODS_DELETED.labels(pod.owner_kind, reason).inc()
        log.warning("stranded pod deleted", pod=f"{pod.namespace}/{pod.name}", node=pod.node,
                    owner=pod.owner_kind, volumes=list(pod.volumes), reason=reason)
        await self._warn(body, pod, reason, message)
        return True

    async def _warn(self, body: Mapping[str, Any], pod: StrandedPod, reason: str,
                    message: str) -> None:
        """A Warning event on the pod (it outlives the pod in ``kubectl get events``)."""
        await self.kube.post_event(
            {"apiVersion": "v1", "kind": "Pod", "metadata": dict(body["metadata"])},
            "Warning", reason, message, namespace=pod.namespace)


def created_unix_ns(metadata: Mapping[str, Any]) -> int:
    """The pod's creationTimestamp in Unix ns (0 if absent or unreadable: then no volume can
    have been lost after it, and the pod is left alone)."""
    stamp = metadata.get("creationTimestamp")
    if isinstance(stamp, datetime.datetime):
        when = stamp
    else:
        try:
            when = datetime.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
        except ValueError:
            return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1e9)


def _setting(volume: str, shared_volumes: Mapping[str, Mapping[str, Any]],
             policies: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The ``strandedPodDeletion`` of the volume's policy; None if either is unreadable."""
    spec = (shared_volumes.get(volume) or {}).get("spec") or {}
    policy_name = str(spec.get("policy") or "")
    body = policies.get(policy_name)
    if body is None:
        return None
    try:
        return policy_from_spec(body.get("spec") or {}, name=policy_name) \
            .stranded_pod_deletion
    except InvalidArgument:
        return None
