"""The one place that writes Kubernetes conditions (status.conditions of our objects).

Conditions follow the standard shape (metav1.Condition). ``lastTransitionTime`` changes only
when ``status`` does, so ``kubectl wait`` and alerting see real transitions, not every rewrite.
"""

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

READY = "Ready"
DEGRADED = "Degraded"
SYNCED = "Synced"


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str, status: bool, *,
                  reason: str, message: str, generation: int | None) -> list[dict[str, Any]]:
    """``conditions`` with ``type_`` set; the others are kept as they are, in their order."""
    value = "True" if status else "False"
    result: list[dict[str, Any]] = []
    found = False
    for existing in conditions or ():
        if existing.get("type") != type_:
            result.append(dict(existing))
            continue
        found = True
        changed = existing.get("status") != value
        result.append({
            "type": type_, "status": value, "reason": reason, "message": message[:32768],
            "lastTransitionTime": now_rfc3339() if changed else existing.get(
                "lastTransitionTime", now_rfc3339()),
            **({"observedGeneration": generation} if generation is not None else {}),
        })
    if not found:
        result.append({"type": type_, "status": value, "reason": reason,
                       "message": message[:32768], "lastTransitionTime": now_rfc3339(),
                       **({"observedGeneration": generation} if generation is not None else {})})
    return result


def condition(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any]:
    """The condition of ``type_`` (an empty mapping when absent)."""
    for existing in conditions or ():
        if existing.get("type") == type_:
            return existing
    return {}
