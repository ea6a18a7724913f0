"""Reconcile one SyncPolicy: check what the schema cannot, and summarise its volumes.

What the API server can check (enums, ranges, cross-field rules) its CRD schema and CEL rules
reject before we ever see it. What it cannot (cron syntax, a nodeSelector no node matches, more
replicas than eligible nodes) ends here as ``Ready=False`` with a reason, a message and a
Warning event, and changes nothing else: volumes keep running on their last good spec.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.placement import NodeView, place
from sharedsync.core.policy import policy_from_spec

from . import conditions as cond
from .kube import SYNC_POLICIES, Kube
from .volumes import IN_USE_FINALIZER, EmitEvent

__all__ = ["IN_USE_FINALIZER", "reconcile_policy", "refuse_delete_in_use", "volumes_using"]


def volumes_using(policy_name: str, volumes: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(str(v["metadata"]["name"]) for v in volumes
                  if (v.get("spec") or {}).get("policy") == policy_name)


def policy_problem(name: str, spec: Mapping[str, Any],
                   nodes: Sequence[NodeView]) -> tuple[str, str]:
    """(reason, message) of why the policy cannot be honoured, or ("", "")."""
    try:
        policy = policy_from_spec(spec, name=name)
    except InvalidArgument as exc:
        return "InvalidSpec", str(exc)
    trial = place(policy, policy.replicas, 0, nodes, ())
    if trial.shortfall:
        return "InsufficientNodes", trial.reason
    return "", ""


def summary(policy_name: str, volumes: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Volume counts, worst lag and worst sync latency of the volumes using the policy."""
    total = in_sync = 0
    worst_lag = worst_p99 = 0.0
    for volume in volumes:
        if (volume.get("spec") or {}).get("policy") != policy_name:
            continue
        total += 1
        status = volume.get("status") or {}
        if cond.condition(status.get("conditions"), cond.SYNCED).get("status") == "True":
            in_sync += 1
        worst_lag = max(worst_lag, float(status.get("lagSeconds") or 0.0))
        latency = status.get("syncLatency") or {}
        worst_p99 = max(worst_p99, float(latency.get("p99Seconds") or 0.0))
    return {"volumes": total, "inSync": in_sync, "worstLagSeconds": worst_lag,
            "worstLag": f"{worst_lag:.1f}s", "worstSyncLatencyP99Seconds": worst_p99}


async def reconcile_policy(kube: Kube, body: Mapping[str, Any], nodes: Sequence[NodeView],
                           volumes: Iterable[Mapping[str, Any]], emit: EmitEvent) -> None:
    metadata = body["metadata"]
    name = str(metadata["name"])
    generation = int(metadata.get("generation") or 0)
    status = body.get("status") or {}
    reason, message = policy_problem(name, body.get("spec") or {}, nodes)
    was = cond.condition(status.get("conditions"), cond.READY)
    if reason and (was.get("reason") != reason or was.get("message") != message):
        emit("Warning", reason, message)
    ready = not reason
    conditions = cond.set_condition(
        status.get("conditions"), cond.READY, ready, reason=reason or "Valid",
        message=message or "the policy can be honoured", generation=generation)
    counts = summary(name, volumes)
    degraded = counts["inSync"] < counts["volumes"]
    conditions = cond.set_condition(
        conditions, cond.DEGRADED, degraded,
        reason="VolumesNotInSync" if degraded else "AsExpected",
        message=f"{counts['inSync']} of {counts['volumes']} volumes in sync",
        generation=generation)
    patch = {"observedGeneration": generation, "conditions": conditions, **counts}
    if any(status.get(k) != v for k, v in patch.items()):
        await kube.patch_status(SYNC_POLICIES, name, patch)


async def refuse_delete_in_use(kube: Kube, body: Mapping[str, Any],
                               volumes: Iterable[Mapping[str, Any]]) -> list[str]:
    """The volumes that still use the policy; if any, say so in a condition."""
    name = str(body["metadata"]["name"])
    users = volumes_using(name, volumes)
    if users:
        shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10
                                         else "")
        status = body.get("status") or {}
        conditions = cond.set_condition(
            status.get("conditions"), cond.READY, False, reason="InUse",
            message=f"deletion waits for the volumes that use this policy: {shown}",
            generation=int(body["metadata"].get("generation") or 0))
        await kube.patch_status(SYNC_POLICIES, name, {"conditions": conditions})
    return users
