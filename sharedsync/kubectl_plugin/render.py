"""What ``kubectl sharedsync status`` prints: pure functions from SharedVolume objects to text
or JSON, so what a user reads is exactly what the operator wrote (operator/API.md), with no
judgement of our own added.

The text answers "is my data safe" first (one row per volume: replicas in sync, lag, the
conditions), then shows each volume's replicas, and the message of every condition that is not
in its healthy state, since that is where the operator says what is wrong.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .kube import ClaimRef, Obj

SYNC_NOW = "sharedsync.io/sync-now"
SWITCHOVER = "sharedsync.io/switchover"
REBUILD = "sharedsync.io/rebuild"
#: The healthy status of each condition the operator writes; others are shown with a reason.
HEALTHY = {"Ready": "True", "Degraded": "False", "Synced": "True"}
NONE = "-"

SUMMARY_COLUMNS = ("NAME", "PVC", "POLICY", "MODE", "REPLICAS", "PRIMARY", "EPOCH", "LAG",
                   "SYNC-P99", "CONDITIONS")
REPLICA_COLUMNS = ("NODE", "ROLE", "STATE", "LAG", "LAST-SYNC", "REBUILD", "MESSAGE")


def view(volume: Mapping[str, Any], claim: ClaimRef | None) -> Obj:
    """One volume as ``-o json`` shows it: the status fields a user needs, flattened."""
    metadata = volume.get("metadata") or {}
    spec = volume.get("spec") or {}
    status = volume.get("status") or {}
    annotations = metadata.get("annotations") or {}
    latency = status.get("syncLatency") or {}
    pending = {key: annotations[annotation] for key, annotation in
               (("syncNow", SYNC_NOW), ("switchover", SWITCHOVER), ("rebuild", REBUILD))
               if annotations.get(annotation)}
    return {
        "name": metadata.get("name"),
        "pvc": {"namespace": claim.namespace, "name": claim.name} if claim else None,
        "policy": spec.get("policy"),
        "capacity": spec.get("capacity"),
        "mode": status.get("mode"),
        "phase": status.get("phase"),
        "readyReplicas": status.get("readyReplicas"),
        "desiredReplicas": status.get("desiredReplicas"),
        "primary": status.get("primary"),
        "epoch": status.get("epoch"),
        "lag": status.get("lag"),
        "lagSeconds": status.get("lagSeconds"),
        "syncP99Seconds": latency.get("p99Seconds"),
        "lastSyncNow": status.get("lastSyncNow"),
        "pending": pending,
        "conditions": [
            {key: c.get(key) for key in ("type", "status", "reason", "message")}
            for c in status.get("conditions") or ()],
        "replicas": [
            {key: r.get(key) for key in ("node", "role", "state", "lagSeconds", "lastSyncTime",
                                         "rebuildProgress", "message")}
            for r in status.get("replicas") or ()],
    }


def to_json(views: Sequence[Obj]) -> str:
    return json.dumps(list(views), indent=2)


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return NONE
    if value < 1:
        return f"{value * 1000:.1f}ms"
    return f"{value:.2f}s"


def _lag(text: Any, seconds: Any) -> str:
    if text:
        return str(text)
    return f"{seconds:.1f}s" if isinstance(seconds, int | float) else NONE


def _cell(value: Any) -> str:
    return NONE if value is None or value == "" else str(value)


def replicas_cell(v: Mapping[str, Any]) -> str:
    ready, desired = v.get("readyReplicas"), v.get("desiredReplicas")
    if ready is None and desired is None:
        return NONE
    return f"{_cell(ready)}/{_cell(desired)}"


def conditions_cell(conditions: Sequence[Mapping[str, Any]]) -> str:
    """``Ready=True,Degraded=False,Synced=True``: one cell, no spaces, so columns stay split."""
    return ",".join(f"{c.get('type')}={c.get('status')}" for c in conditions) or NONE


def _table(rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
            .rstrip() for row in rows]


def summary_row(v: Mapping[str, Any]) -> list[str]:
    pvc = v.get("pvc")
    return [
        _cell(v.get("name")),
        f"{pvc['namespace']}/{pvc['name']}" if pvc else NONE,
        _cell(v.get("policy")),
        _cell(v.get("mode")),
        replicas_cell(v),
        _cell(v.get("primary")),
        _cell(v.get("epoch")),
        _lag(v.get("lag"), v.get("lagSeconds")),
        _seconds(v.get("syncP99Seconds")),
        conditions_cell(v.get("conditions") or ()),
    ]


def replica_row(r: Mapping[str, Any]) -> list[str]:
    progress = r.get("rebuildProgress")
    rebuild = NONE
    if r.get("state") == "Rebuilding" and isinstance(progress, int | float):
        rebuild = f"{progress * 100:.0f}%"
    return [
        _cell(r.get("node")),
        _cell(r.get("role")),
        _cell(r.get("state")),
        _lag(None, r.get("lagSeconds")),
        _cell(r.get("lastSyncTime")),
        rebuild,
        _cell(r.get("message")),
    ]


def details(v: Mapping[str, Any]) -> list[str]:
    """The lines under a volume's name: its replicas, what is wrong, what is pending."""
    lines = [f"{v.get('name')}:"]
    replicas = v.get("replicas") or []
    if replicas:
        lines += _table([list(REPLICA_COLUMNS), *(replica_row(r) for r in replicas)], "  ")
    else:
        lines.append("  no replicas reported yet (phase "
                     f"{_cell(v.get('phase'))}; is the operator running?)")
    for c in v.get("conditions") or ():
        if HEALTHY.get(str(c.get("type"))) != c.get("status"):
            lines.append(f"  {c.get('type')}={c.get('status')} {c.get('reason') or ''}: "
                         f"{c.get('message') or ''}".rstrip(": "))
    for key, value in (v.get("pending") or {}).items():
        lines.append(f"  pending {key}: {value}")
    return lines


def to_text(views: Sequence[Obj]) -> str:
    """A summary table, one row per volume, then each volume's replicas."""
    lines = _table([list(SUMMARY_COLUMNS), *(summary_row(v) for v in views)])
    for v in views:
        lines += ["", *details(v)]
    return "\n".join(lines) + "\n"
