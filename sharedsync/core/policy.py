"""A SyncPolicy ``spec`` as one validated, fully defaulted value.

The operator reads SyncPolicies from the API server, where the CRD schema may or may not have
filled in defaults (a policy created before a default was added, or a test that builds a spec by
hand, has none). So this module applies every default of ``operator/API.md`` itself: the answer is
the same for a bare spec and for one the API server defaulted. It also checks what the schema and
its CEL rules cannot, or what a hand-made spec would skip: cron, duration and quantity syntax and
the cross-field rules (``writeQuorum`` only for Synchronous and at most ``replicas``, ``maxLag``
only for Asynchronous, ``schedule`` with and only with Scheduled). A bad policy must fail when it
is applied, with an ``InvalidArgument`` whose message starts with the field path
(``spec.qos.bandwidth: ...``), because that message ends up in the policy's Ready condition and
is the only thing a user sees.

Unknown fields are refused (the schema prunes them, so one reaching us is a typo in a hand-made
spec), and ``null`` means "not set", as it does for ``kubectl apply``.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import InvalidArgument
from .quantity import parse_bytes
from .schedule import parse_cron, parse_duration


class Mode(enum.StrEnum):
    """How a write reaches the replicas."""

    SYNCHRONOUS = "Synchronous"  # fsync returns once writeQuorum replicas hold the change
    ASYNCHRONOUS = "Asynchronous"  # shipped continuously, at most maxLag behind
    SCHEDULED = "Scheduled"  # shipped on a cron schedule


ON_LAG_EXCEEDED: Final = ("Alert", "Throttle")
CONFLICT_RESOLUTIONS: Final = ("LastWriterWins", "KeepBoth")
DATA_LOCALITIES: Final = ("BestEffort", "Disabled")
ON_QUORUM_LOSS: Final = ("Freeze", "Continue")
#: Which pods on a lost node the operator deletes so that their controller can replace them
#: (``sharedsync.core.node_loss``).
STRANDED_POD_DELETION: Final = ("Never", "StatefulSet", "Deployment",
                                    "StatefulSetAndDeployment")

HOSTNAME_KEY: Final = "kubernetes.io/hostname"
MIN_REPLICAS: Final = 1
MAX_REPLICAS: Final = 5
MIN_PRIORITY: Final = 1
MAX_PRIORITY: Final = 1000
DEFAULT_REPLICAS: Final = 2
DEFAULT_MAX_LAG_SECONDS: Final = 5.0
DEFAULT_STALE_REPLICA_TIMEOUT_SECONDS: Final = 300.0
DEFAULT_SCRUB_INTERVAL_SECONDS: Final = 168 * 3600.0
#: Rates travel as int64 (proto, token buckets); anything larger is a typo anyway.
MAX_QUANTITY: Final = 2**63 - 1


def majority(replicas: int) -> int:
    """The smallest number of replicas that is more than half of ``replicas``.

    Two majorities always share a replica, which is why it is the default write quorum: any two
    acknowledged writes meet on at least one node, so a promotion can always find the newest.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < MIN_REPLICAS:
        raise InvalidArgument(f"replicas must be a whole number >= 1, got {replicas!r}")
    return replicas // 2 + 1


@dataclass(frozen=True, slots=True)
class Policy:
    """A SyncPolicy spec with every default applied; build it with :func:`policy_from_spec`.

    ``Policy()`` is the policy of an empty spec. Constructing one directly checks the invariants
    the rest of the code relies on (resolved quorum, maxLag only for Asynchronous, ranges), but
    only :func:`policy_from_spec` gives messages that name the spec's fields.
    """

    mode: Mode = Mode.ASYNCHRONOUS
    replicas: int = DEFAULT_REPLICAS
    #: Synchronous: as given, else a majority of ``replicas``; 0 for the other modes.
    write_quorum: int = 0
    #: Asynchronous only (0.0 for the other modes).
    max_lag_seconds: float = DEFAULT_MAX_LAG_SECONDS
    on_lag_exceeded: str = "Alert"
    #: The cron expression of a Scheduled policy; "" otherwise.
    schedule: str = ""
    manual_trigger: str = ""
    paused: bool = False
    bandwidth_bytes_per_second: int = 0  # 0 = unlimited
    priority: int = MIN_PRIORITY
    rebuild_bandwidth_bytes_per_second: int = 0  # 0 = unlimited
    conflict_resolution: str = "LastWriterWins"
    topology_key: str = HOSTNAME_KEY
    #: Sorted by key, so that equal selectors compare and hash equal.
    node_selector: tuple[tuple[str, str], ...] = ()
    data_locality: bool = True  # BestEffort
    stale_replica_timeout_seconds: float = DEFAULT_STALE_REPLICA_TIMEOUT_SECONDS
    on_quorum_loss: str = "Freeze"
    stranded_pod_deletion: str = "Never"
    scrub_interval_seconds: float = DEFAULT_SCRUB_INTERVAL_SECONDS
    auto_repair: bool = True
    #: The SyncPolicy's ``metadata.name``, for messages ("policy fast wants 3 replicas ...").
    name: str = ""

    def __post_init__(self) -> None:
        problem = _invariant_problem(self)
        if problem:
            raise InvalidArgument(f"inconsistent Policy: {problem}")

    @property
    def selector(self) -> dict[str, str]:
        """``node_selector`` as a dict."""
        return dict(self.node_selector)


def _invariant_problem(p: Policy) -> str:
    if p.mode not in tuple(Mode):
        return f"mode {p.mode!r} is not one of {', '.join(Mode)}"
    if not MIN_REPLICAS <= p.replicas <= MAX_REPLICAS:
        return f"replicas {p.replicas} is outside {MIN_REPLICAS}-{MAX_REPLICAS}"
    if p.mode == Mode.SYNCHRONOUS and not 1 <= p.write_quorum <= p.replicas:
        return f"write_quorum {p.write_quorum} is outside 1-{p.replicas}"
    if p.mode != Mode.SYNCHRONOUS and p.write_quorum != 0:
        return f"write_quorum must be 0 for {p.mode}"
    if p.mode == Mode.ASYNCHRONOUS and not _positive_seconds(p.max_lag_seconds):
        return f"max_lag_seconds {p.max_lag_seconds} must be > 0 for Asynchronous"
    if p.mode != Mode.ASYNCHRONOUS and p.max_lag_seconds != 0.0:
        return f"max_lag_seconds must be 0 for {p.mode}"
    if (p.mode == Mode.SCHEDULED) != bool(p.schedule):
        return "schedule is required with, and only with, Scheduled"
    for value, name, allowed in ((p.on_lag_exceeded, "on_lag_exceeded", ON_LAG_EXCEEDED),
                                 (p.conflict_resolution, "conflict_resolution",
                                  CONFLICT_RESOLUTIONS),
                                 (p.on_quorum_loss, "on_quorum_loss", ON_QUORUM_LOSS),
                                 (p.stranded_pod_deletion, "stranded_pod_deletion",
                                  STRANDED_POD_DELETION)):
        if value not in allowed:
            return f"{name} {value!r} is not one of {', '.join(allowed)}"
    if not MIN_PRIORITY <= p.priority <= MAX_PRIORITY:
        return f"priority {p.priority} is outside {MIN_PRIORITY}-{MAX_PRIORITY}"
    if not (0 <= p.bandwidth_bytes_per_second <= MAX_QUANTITY
            and 0 <= p.rebuild_bandwidth_bytes_per_second <= MAX_QUANTITY):
        return "bandwidths must be >= 0 (0 = unlimited)"
    if not p.topology_key:
        return "topology_key is empty"
    keys = [key for key, _ in p.node_selector]
    if keys != sorted(set(keys)):
        return "node_selector must be sorted by key, each key once"
    if not (_positive_seconds(p.stale_replica_timeout_seconds)
            and _positive_seconds(p.scrub_interval_seconds)):
        return "stale_replica_timeout_seconds and scrub_interval_seconds must be > 0"
    return ""


def _positive_seconds(value: float) -> bool:
    return value > 0 and math.isfinite(value)


# -- reading a spec ------------------------------------------------------------------------------

# Kubernetes label syntax (apimachinery validation.IsQualifiedName / IsValidLabelValue).
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MAX_LABEL = 63
_MAX_PREFIX = 253


def _label_key_problem(key: str) -> str:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > _MAX_PREFIX
                  or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return (f"label key {key!r} has an invalid prefix (a lowercase DNS subdomain of at "
                f"most {_MAX_PREFIX} characters)")
    if not name or len(name) > _MAX_LABEL or not _LABEL_NAME.fullmatch(name):
        return (f"label key {key!r} is invalid (at most {_MAX_LABEL} letters, digits, '-', "
                f"'_' or '.', starting and ending with a letter or digit, after an optional "
                f"'prefix/')")
    return ""


def _label_value_problem(value: str) -> str:
    if value and (len(value) > _MAX_LABEL or not _LABEL_NAME.fullmatch(value)):
        return (f"label value {value!r} is invalid (empty, or at most {_MAX_LABEL} letters, "
                f"digits, '-', '_' or '.', starting and ending with a letter or digit)")
    return ""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


class _Section:
    """One object of the spec (``spec``, ``spec.qos``, ...): typed reads that name the path."""

    def __init__(self, data: object, path: str, known: tuple[str, ...]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidArgument(f"{path}: must be an object, got {_show(data)}")
        for key in data:
            if key not in known:
                raise InvalidArgument(f"{path}.{key}: unknown field (known fields: "
                                      f"{', '.join(known)})")
        self.data: Mapping[str, Any] = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def error(self, key: str, why: str) -> InvalidArgument:
        return InvalidArgument(f"{self.at(key)}: {why}")

    def given(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def section(self, key: str, known: tuple[str, ...]) -> _Section:
        return _Section(self.data.get(key), self.at(key), known)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or value not in allowed:
            raise self.error(key, f"must be one of {', '.join(allowed)}, got {_show(value)}")
        return value

    def integer(self, key: str, low: int, high: int, default: int) -> int:
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"must be a whole number from {low} to {high}, "
                                  f"got {_show(value)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_show(value)}")
        return value

    def string(self, key: str, default: str = "") -> str:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_show(value)}")
        return value

    def duration(self, key: str, default: float) -> float:
        """A positive Kubernetes duration ("500ms", "1m30s") in seconds."""
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self.error(key, f"must be a duration string such as 30s, 1m30s or 500ms, "
                                  f"got {_show(value)}")
        try:
            seconds = parse_duration(value)
        except InvalidArgument as exc:
            raise self.error(key, str(exc)) from None
        if seconds <= 0:
            raise self.error(key, f"must be longer than 0, got {value!r}")
        return seconds

    def quantity(self, key: str) -> int:
        """A positive byte quantity (an integer or a string such as "20Mi"); 0 when unset."""
        value = self.data.get(key)
        if value is None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise self.error(key, f"must be a quantity such as 20Mi, 1G or 500k, or a whole "
                                  f"number, got {_show(value)}")
        try:
            number = parse_bytes(value)
        except InvalidArgument as exc:
            raise self.error(key, str(exc)) from None
        if number <= 0:
            raise self.error(key, f"must be more than 0 (leave it out for unlimited), "
                                  f"got {_show(value)}")
        if number > MAX_QUANTITY:
            raise self.error(key, f"{_show(value)} is too large (at most {MAX_QUANTITY})")
        return number

    def label_key(self, key: str, default: str) -> str:
        value = self.string(key, default)
        problem = _label_key_problem(value) if value else "must not be empty"
        if problem:
            raise self.error(key, problem)
        return value

    def label_map(self, key: str) -> tuple[tuple[str, str], ...]:
        value = self.data.get(key)
        if value is None:
            return ()
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a map of label keys to values, got {_show(value)}")
        pairs: list[tuple[str, str]] = []
        for label, wanted in value.items():
            where = f"{self.at(key)}[{label!r}]"
            if not isinstance(label, str):
                raise InvalidArgument(f"{where}: label keys must be strings")
            if not isinstance(wanted, str):
                raise InvalidArgument(f"{where}: must be a string, got {_show(wanted)}")
            problem = _label_key_problem(label) or _label_value_problem(wanted)
            if problem:
                raise InvalidArgument(f"{where}: {problem}")
            pairs.append((label, wanted))
        return tuple(sorted(pairs))


_SPEC_FIELDS = ("mode", "replicas", "writeQuorum", "maxLag", "onLagExceeded", "schedule",
                "trigger", "paused", "qos", "conflictResolution", "placement", "failover",
                "integrity")
_TRIGGER_FIELDS = ("manual",)
_QOS_FIELDS = ("bandwidth", "priority", "rebuildBandwidth")
_PLACEMENT_FIELDS = ("topologyKey", "nodeSelector", "dataLocality")
_FAILOVER_FIELDS = ("staleReplicaTimeout", "onQuorumLoss", "strandedPodDeletion")
_INTEGRITY_FIELDS = ("scrubInterval", "autoRepair")


def policy_from_spec(spec: Mapping[str, Any] | None, *, name: str = "") -> Policy:
    """Validate a SyncPolicy ``spec`` (as the API server returns it) and apply every default.

    A missing (None) spec is an empty one. ``name`` is the SyncPolicy's ``metadata.name``; it
    only appears in messages built later (placement shortfalls). Raises
    :class:`InvalidArgument` naming the field path at fault.
    """
    top = _Section(spec, "spec", _SPEC_FIELDS)
    mode = Mode(top.choice("mode", tuple(Mode), Mode.ASYNCHRONOUS))
    replicas = top.integer("replicas", MIN_REPLICAS, MAX_REPLICAS, DEFAULT_REPLICAS)

    if top.given("writeQuorum"):
        write_quorum = top.integer("writeQuorum", 1, MAX_REPLICAS, 1)
        if mode is not Mode.SYNCHRONOUS:
            raise top.error("writeQuorum", f"only applies when spec.mode is Synchronous "
                                           f"(mode is {mode})")
        if write_quorum > replicas:
            raise top.error("writeQuorum", f"{write_quorum} is more than spec.replicas "
                                           f"({replicas})")
    else:
        write_quorum = majority(replicas) if mode is Mode.SYNCHRONOUS else 0

    if top.given("maxLag"):
        max_lag = top.duration("maxLag", DEFAULT_MAX_LAG_SECONDS)
        if mode is not Mode.ASYNCHRONOUS:
            raise top.error("maxLag", f"only applies when spec.mode is Asynchronous "
                                      f"(mode is {mode})")
    else:
        max_lag = DEFAULT_MAX_LAG_SECONDS if mode is Mode.ASYNCHRONOUS else 0.0
    on_lag_exceeded = top.choice("onLagExceeded", ON_LAG_EXCEEDED, "Alert")

    schedule = top.string("schedule")
    if schedule:
        if mode is not Mode.SCHEDULED:
            raise top.error("schedule", f"only applies when spec.mode is Scheduled "
                                        f"(mode is {mode})")
        try:
            parse_cron(schedule)
        except InvalidArgument as exc:
            why = str(exc).removeprefix("schedule: ").removeprefix("schedule ")
            raise top.error("schedule", why) from None
    elif mode is Mode.SCHEDULED:
        raise top.error("schedule", "required when spec.mode is Scheduled (a 5-field cron "
                                    "expression in UTC, such as '*/15 * * * *')")

    trigger = top.section("trigger", _TRIGGER_FIELDS)
    qos = top.section("qos", _QOS_FIELDS)
    placement = top.section("placement", _PLACEMENT_FIELDS)
    failover = top.section("failover", _FAILOVER_FIELDS)
    integrity = top.section("integrity", _INTEGRITY_FIELDS)
    return Policy(
        mode=mode,
        replicas=replicas,
        write_quorum=write_quorum,
        max_lag_seconds=max_lag,
        on_lag_exceeded=on_lag_exceeded,
        schedule=schedule,
        manual_trigger=trigger.string("manual"),
        paused=top.boolean("paused", False),
        bandwidth_bytes_per_second=qos.quantity("bandwidth"),
        priority=qos.integer("priority", MIN_PRIORITY, MAX_PRIORITY, MIN_PRIORITY),
        rebuild_bandwidth_bytes_per_second=qos.quantity("rebuildBandwidth"),
        conflict_resolution=top.choice("conflictResolution", CONFLICT_RESOLUTIONS,
                                       "LastWriterWins"),
        topology_key=placement.label_key("topologyKey", HOSTNAME_KEY),
        node_selector=placement.label_map("nodeSelector"),
        data_locality=placement.choice("dataLocality", DATA_LOCALITIES,
                                       "BestEffort") == "BestEffort",
        stale_replica_timeout_seconds=failover.duration(
            "staleReplicaTimeout", DEFAULT_STALE_REPLICA_TIMEOUT_SECONDS),
        on_quorum_loss=failover.choice("onQuorumLoss", ON_QUORUM_LOSS, "Freeze"),
        stranded_pod_deletion=failover.choice("strandedPodDeletion",
                                                  STRANDED_POD_DELETION, "Never"),
        scrub_interval_seconds=integrity.duration("scrubInterval",
                                                  DEFAULT_SCRUB_INTERVAL_SECONDS),
        auto_repair=integrity.boolean("autoRepair", True),
        name=name,
    )
