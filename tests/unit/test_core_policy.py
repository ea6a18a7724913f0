"""sharedsync.core.policy: every default of API.md, every error naming its field path."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.policy import Mode, Policy, majority, policy_from_spec

GiB = 1 << 30
MiB = 1 << 20

#: What the API server's schema defaults would fill in (API.md "default" column, minus the
#: operator-side defaults writeQuorum and maxLag).
SERVER_DEFAULTED: dict[str, Any] = {
    "mode": "Asynchronous",
    "replicas": 2,
    "onLagExceeded": "Alert",
    "paused": False,
    "trigger": {},
    "qos": {"priority": 1},
    "conflictResolution": "LastWriterWins",
    "placement": {"topologyKey": "kubernetes.io/hostname", "dataLocality": "BestEffort"},
    "failover": {"staleReplicaTimeout": "5m", "onQuorumLoss": "Freeze",
                 "strandedPodDeletion": "Never"},
    "integrity": {"scrubInterval": "168h", "autoRepair": True},
}


def with_field(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``base`` with the dotted ``path`` (below spec) set to ``value``."""
    spec: dict[str, Any] = dict(base or {})
    *parents, leaf = path.split(".")
    node = spec
    for part in parents:
        node[part] = dict(node.get(part) or {})
        node = node[part]
    node[leaf] = value
    return spec


# -- defaults ------------------------------------------------------------------------------------


def test_an_empty_spec_gets_every_default() -> None:
    p = policy_from_spec({})
    assert p == Policy()
    assert p.mode is Mode.ASYNCHRONOUS
    assert p.replicas == 2
    assert p.write_quorum == 0
    assert p.max_lag_seconds == 5.0
    assert p.on_lag_exceeded == "Alert"
    assert p.schedule == ""
    assert p.manual_trigger == ""
    assert p.paused is False
    assert p.bandwidth_bytes_per_second == 0
    assert p.priority == 1
    assert p.rebuild_bandwidth_bytes_per_second == 0
    assert p.conflict_resolution == "LastWriterWins"
    assert p.topology_key == "kubernetes.io/hostname"
    assert p.node_selector == ()
    assert p.data_locality is True
    assert p.stale_replica_timeout_seconds == 300.0
    assert p.on_quorum_loss == "Freeze"
    assert p.stranded_pod_deletion == "Never"
    assert p.scrub_interval_seconds == 168 * 3600.0
    assert p.auto_repair is True
    assert p.name == ""


def test_a_server_defaulted_spec_means_the_same_as_an_empty_one() -> None:
    assert policy_from_spec(SERVER_DEFAULTED) == policy_from_spec({})


def test_null_means_unset_everywhere() -> None:
    spec = {key: None for key in SERVER_DEFAULTED}
    assert policy_from_spec(spec) == Policy()
    nested = {"qos": {"bandwidth": None, "priority": None}, "placement": {"nodeSelector": None},
              "trigger": {"manual": None}, "writeQuorum": None, "maxLag": None,
              "schedule": None}
    assert policy_from_spec(nested) == Policy()


def test_a_full_spec_is_read_field_by_field() -> None:
    spec = {
        "mode": "Synchronous",
        "replicas": 3,
        "writeQuorum": 3,
        "onLagExceeded": "Throttle",
        "trigger": {"manual": "2024-05-01T10:00"},
        "paused": True,
        "qos": {"bandwidth": "20Mi", "priority": 1000, "rebuildBandwidth": 1_000_000},
        "conflictResolution": "KeepBoth",
        "placement": {"topologyKey": "topology.kubernetes.io/zone",
                      "nodeSelector": {"disk": "ssd", "example.com/tier": "gold"},
                      "dataLocality": "Disabled"},
        "failover": {"staleReplicaTimeout": "1m30s", "onQuorumLoss": "Continue",
                     "strandedPodDeletion": "StatefulSetAndDeployment"},
        "integrity": {"scrubInterval": "24h", "autoRepair": False},
    }
    assert policy_from_spec(spec, name="fast") == Policy(
        mode=Mode.SYNCHRONOUS, replicas=3, write_quorum=3, max_lag_seconds=0.0,
        on_lag_exceeded="Throttle", schedule="", manual_trigger="2024-05-01T10:00", paused=True,
        bandwidth_bytes_per_second=20 * MiB, priority=1000,
        rebuild_bandwidth_bytes_per_second=1_000_000, conflict_resolution="KeepBoth",
        topology_key="topology.kubernetes.io/zone",
        node_selector=(("disk", "ssd"), ("example.com/tier", "gold")), data_locality=False,
        stale_replica_timeout_seconds=90.0, on_quorum_loss="Continue",
        stranded_pod_deletion="StatefulSetAndDeployment", scrub_interval_seconds=86400.0,
        auto_repair=False, name="fast")


@pytest.mark.parametrize(("replicas", "quorum"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)])
def test_synchronous_quorum_defaults_to_a_majority(replicas: int, quorum: int) -> None:
    p = policy_from_spec({"mode": "Synchronous", "replicas": replicas})
    assert p.write_quorum == quorum == majority(replicas)
    assert p.max_lag_seconds == 0.0


@pytest.mark.parametrize("quorum", [1, 2, 3])
def test_synchronous_quorum_as_given(quorum: int) -> None:
    assert policy_from_spec({"mode": "Synchronous", "replicas": 3,
                             "writeQuorum": quorum}).write_quorum == quorum


def test_asynchronous_max_lag_as_given() -> None:
    assert policy_from_spec({"maxLag": "1m30s"}).max_lag_seconds == 90.0
    assert policy_from_spec({"mode": "Asynchronous", "maxLag": "500ms"}).max_lag_seconds == 0.5


def test_scheduled() -> None:
    p = policy_from_spec({"mode": "Scheduled", "schedule": "*/15 * * * *"})
    assert p.mode is Mode.SCHEDULED
    assert p.schedule == "*/15 * * * *"
    assert p.write_quorum == 0
    assert p.max_lag_seconds == 0.0
    assert policy_from_spec({"mode": "Scheduled", "schedule": "@daily"}).schedule == "@daily"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), (1048576, MiB), ("1048576", MiB), ("20Mi", 20 * MiB), ("1G", 10**9),
     ("500k", 500_000), ("1.5Gi", 3 * GiB // 2), (2**63 - 1, 2**63 - 1)],
)
def test_quantities(value: int | str, expected: int) -> None:
    p = policy_from_spec({"qos": {"bandwidth": value, "rebuildBandwidth": value}})
    assert p.bandwidth_bytes_per_second == expected
    assert p.rebuild_bandwidth_bytes_per_second == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("5s", 5.0), ("1m30s", 90.0), ("168h", 604800.0), ("1.5h", 5400.0),
     ("1ns", 1e-9)],
)
def test_durations(value: str, seconds: float) -> None:
    p = policy_from_spec({"maxLag": value, "failover": {"staleReplicaTimeout": value},
                          "integrity": {"scrubInterval": value}})
    assert p.max_lag_seconds == seconds
    assert p.stale_replica_timeout_seconds == seconds
    assert p.scrub_interval_seconds == seconds


def test_node_selector_is_sorted_and_empty_values_allowed() -> None:
    p = policy_from_spec({"placement": {"nodeSelector": {"z": "1", "a": "", "m/x": "y"}}})
    assert p.node_selector == (("a", ""), ("m/x", "y"), ("z", "1"))
    assert p.selector == {"a": "", "m/x": "y", "z": "1"}


def test_policy_is_hashable_and_comparable() -> None:
    a = policy_from_spec({"placement": {"nodeSelector": {"b": "2", "a": "1"}}})
    b = policy_from_spec({"placement": {"nodeSelector": {"a": "1", "b": "2"}}})
    assert a == b
    assert hash(a) == hash(b)


# -- majority ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m"), [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3), (6, 4), (7, 4)])
def test_majority(n: int, m: int) -> None:
    assert majority(n) == m


@given(st.integers(min_value=1, max_value=1000))
def test_two_majorities_always_overlap(n: int) -> None:
    assert 2 * majority(n) > n
    assert 2 * (majority(n) - 1) <= n  # and it is the smallest such number


@pytest.mark.parametrize("n", [0, -1, True])
def test_majority_refuses_nonsense(n: int) -> None:
    with pytest.raises(InvalidArgument, match="replicas"):
        majority(n)


# -- errors --------------------------------------------------------------------------------------

ERRORS: list[tuple[dict[str, Any], str, str]] = [
    # (spec, field path, fragment of the message)
    ({"mode": "sync"}, "spec.mode", "must be one of Synchronous, Asynchronous, Scheduled"),
    ({"mode": "synchronous"}, "spec.mode", "got 'synchronous'"),
    ({"mode": 1}, "spec.mode", "must be one of"),
    ({"replicas": 0}, "spec.replicas", "from 1 to 5, got 0"),
    ({"replicas": 6}, "spec.replicas", "from 1 to 5, got 6"),
    ({"replicas": "3"}, "spec.replicas", "got '3'"),
    ({"replicas": 3.0}, "spec.replicas", "whole number"),
    ({"replicas": True}, "spec.replicas", "whole number"),
    ({"mode": "Synchronous", "writeQuorum": 0}, "spec.writeQuorum", "from 1 to 5"),
    ({"mode": "Synchronous", "writeQuorum": "2"}, "spec.writeQuorum", "whole number"),
    ({"mode": "Synchronous", "replicas": 2, "writeQuorum": 3}, "spec.writeQuorum",
     "3 is more than spec.replicas (2)"),
    ({"writeQuorum": 1}, "spec.writeQuorum", "only applies when spec.mode is Synchronous "
                                             "(mode is Asynchronous)"),
    ({"mode": "Scheduled", "schedule": "@daily", "writeQuorum": 1}, "spec.writeQuorum",
     "only applies when spec.mode is Synchronous"),
    ({"mode": "Synchronous", "maxLag": "5s"}, "spec.maxLag",
     "only applies when spec.mode is Asynchronous (mode is Synchronous)"),
    ({"mode": "Scheduled", "schedule": "@daily", "maxLag": "5s"}, "spec.maxLag",
     "only applies when spec.mode is Asynchronous"),
    ({"maxLag": "5"}, "spec.maxLag", "missing unit"),
    ({"maxLag": "5d"}, "spec.maxLag", "use hours"),
    ({"maxLag": "-5s"}, "spec.maxLag", "negative"),
    ({"maxLag": ""}, "spec.maxLag", "empty"),
    ({"maxLag": "0"}, "spec.maxLag", "longer than 0"),
    ({"maxLag": "0s"}, "spec.maxLag", "longer than 0"),
    ({"maxLag": 5}, "spec.maxLag", "must be a duration string"),
    ({"onLagExceeded": "Block"}, "spec.onLagExceeded", "must be one of Alert, Throttle"),
    ({"mode": "Scheduled"}, "spec.schedule", "required when spec.mode is Scheduled"),
    ({"mode": "Scheduled", "schedule": ""}, "spec.schedule", "required"),
    ({"schedule": "@daily"}, "spec.schedule", "only applies when spec.mode is Scheduled "
                                              "(mode is Asynchronous)"),
    ({"mode": "Synchronous", "schedule": "@daily"}, "spec.schedule", "only applies"),
    ({"mode": "Scheduled", "schedule": "61 * * * *"}, "spec.schedule",
     "invalid minute field '61'"),
    ({"mode": "Scheduled", "schedule": "* * *"}, "spec.schedule", "must have 5 fields"),
    ({"mode": "Scheduled", "schedule": "@reboot"}, "spec.schedule", "unknown shorthand"),
    ({"mode": "Scheduled", "schedule": "0 0 30 2 *"}, "spec.schedule", "never run"),
    ({"mode": "Scheduled", "schedule": 5}, "spec.schedule", "must be a string"),
    ({"trigger": "now"}, "spec.trigger", "must be an object"),
    ({"trigger": {"manual": 3}}, "spec.trigger.manual", "must be a string"),
    ({"trigger": {"auto": "x"}}, "spec.trigger.auto", "unknown field"),
    ({"paused": "true"}, "spec.paused", "must be true or false"),
    ({"paused": 1}, "spec.paused", "must be true or false"),
    ({"qos": []}, "spec.qos", "must be an object"),
    ({"qos": {"bandwidth": 0}}, "spec.qos.bandwidth", "more than 0"),
    ({"qos": {"bandwidth": "0"}}, "spec.qos.bandwidth", "more than 0"),
    ({"qos": {"bandwidth": "0Mi"}}, "spec.qos.bandwidth", "more than 0"),
    ({"qos": {"bandwidth": -1}}, "spec.qos.bandwidth", "negative"),
    ({"qos": {"bandwidth": "-1Mi"}}, "spec.qos.bandwidth", "not a quantity"),
    ({"qos": {"bandwidth": "20MB"}}, "spec.qos.bandwidth", "not a quantity"),
    ({"qos": {"bandwidth": "0.5"}}, "spec.qos.bandwidth", "not a whole number of bytes"),
    ({"qos": {"bandwidth": 1.5}}, "spec.qos.bandwidth", "must be a quantity"),
    ({"qos": {"bandwidth": True}}, "spec.qos.bandwidth", "must be a quantity"),
    ({"qos": {"bandwidth": 2**63}}, "spec.qos.bandwidth", "too large"),
    ({"qos": {"bandwidth": "16Ei"}}, "spec.qos.bandwidth", "too large"),
    ({"qos": {"rebuildBandwidth": "fast"}}, "spec.qos.rebuildBandwidth", "not a quantity"),
    ({"qos": {"rebuildBandwidth": 0}}, "spec.qos.rebuildBandwidth", "more than 0"),
    ({"qos": {"priority": 0}}, "spec.qos.priority", "from 1 to 1000"),
    ({"qos": {"priority": 1001}}, "spec.qos.priority", "from 1 to 1000"),
    ({"qos": {"priority": "high"}}, "spec.qos.priority", "whole number"),
    ({"qos": {"burst": "1Mi"}}, "spec.qos.burst", "unknown field"),
    ({"conflictResolution": "FirstWriterWins"}, "spec.conflictResolution",
     "must be one of LastWriterWins, KeepBoth"),
    ({"placement": "anywhere"}, "spec.placement", "must be an object"),
    ({"placement": {"topologyKey": ""}}, "spec.placement.topologyKey", "must not be empty"),
    ({"placement": {"topologyKey": 7}}, "spec.placement.topologyKey", "must be a string"),
    ({"placement": {"topologyKey": "zone name"}}, "spec.placement.topologyKey",
     "label key 'zone name' is invalid"),
    ({"placement": {"topologyKey": "Example.com/zone"}}, "spec.placement.topologyKey",
     "invalid prefix"),
    ({"placement": {"topologyKey": "/zone"}}, "spec.placement.topologyKey", "invalid prefix"),
    ({"placement": {"topologyKey": "example.com/"}}, "spec.placement.topologyKey",
     "is invalid"),
    ({"placement": {"topologyKey": "a" * 64}}, "spec.placement.topologyKey", "is invalid"),
    ({"placement": {"topologyKey": "a" * 254 + "/zone"}}, "spec.placement.topologyKey",
     "invalid prefix"),
    ({"placement": {"topologyKey": "-zone"}}, "spec.placement.topologyKey", "is invalid"),
    ({"placement": {"nodeSelector": ["disk=ssd"]}}, "spec.placement.nodeSelector",
     "must be a map"),
    ({"placement": {"nodeSelector": {"disk": 1}}}, "spec.placement.nodeSelector['disk']",
     "must be a string"),
    ({"placement": {"nodeSelector": {"disk": None}}}, "spec.placement.nodeSelector['disk']",
     "must be a string"),
    ({"placement": {"nodeSelector": {1: "x"}}}, "spec.placement.nodeSelector[1]",
     "label keys must be strings"),
    ({"placement": {"nodeSelector": {"disk type": "ssd"}}},
     "spec.placement.nodeSelector['disk type']", "label key 'disk type' is invalid"),
    ({"placement": {"nodeSelector": {"disk": "s s d"}}}, "spec.placement.nodeSelector['disk']",
     "label value 's s d' is invalid"),
    ({"placement": {"nodeSelector": {"disk": "x" * 64}}},
     "spec.placement.nodeSelector['disk']", "label value"),
    ({"placement": {"nodeSelector": {"disk": "ssd-"}}}, "spec.placement.nodeSelector['disk']",
     "label value"),
    ({"placement": {"dataLocality": "Strict"}}, "spec.placement.dataLocality",
     "must be one of BestEffort, Disabled"),
    ({"placement": {"dataLocality": True}}, "spec.placement.dataLocality", "must be one of"),
    ({"placement": {"affinity": {}}}, "spec.placement.affinity", "unknown field"),
    ({"failover": 5}, "spec.failover", "must be an object"),
    ({"failover": {"staleReplicaTimeout": "5 minutes"}}, "spec.failover.staleReplicaTimeout",
     "duration '5 minutes'"),
    ({"failover": {"staleReplicaTimeout": "0s"}}, "spec.failover.staleReplicaTimeout",
     "longer than 0"),
    ({"failover": {"staleReplicaTimeout": 300}}, "spec.failover.staleReplicaTimeout",
     "duration string"),
    ({"failover": {"onQuorumLoss": "Panic"}}, "spec.failover.onQuorumLoss",
     "must be one of Freeze, Continue"),
    ({"failover": {"strandedPodDeletion": "Always"}}, "spec.failover.strandedPodDeletion",
     "must be one of Never, StatefulSet, Deployment, StatefulSetAndDeployment"),
    ({"failover": {"strandedPodDeletion": True}}, "spec.failover.strandedPodDeletion", ""),
    ({"failover": {"timeout": "5m"}}, "spec.failover.timeout", "unknown field"),
    ({"integrity": {"scrubInterval": "7d"}}, "spec.integrity.scrubInterval", "use hours"),
    ({"integrity": {"scrubInterval": "0"}}, "spec.integrity.scrubInterval", "longer than 0"),
    ({"integrity": {"scrubInterval": "3000000h"}}, "spec.integrity.scrubInterval", "too long"),
    ({"integrity": {"autoRepair": "yes"}}, "spec.integrity.autoRepair", "true or false"),
    ({"integrity": {"verify": True}}, "spec.integrity.verify", "unknown field"),
    ({"replica": 3}, "spec.replica", "unknown field (known fields: mode, replicas,"),
    ({"status": {}}, "spec.status", "unknown field"),
]


@pytest.mark.parametrize(("spec", "path", "fragment"), ERRORS,
                         ids=[f"{path}:{fragment}" for _, path, fragment in ERRORS])
def test_errors_name_the_field(spec: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        policy_from_spec(spec)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message


def test_a_missing_spec_is_an_empty_one() -> None:
    assert policy_from_spec(None) == Policy()


@pytest.mark.parametrize("spec", [[], "mode: Synchronous", 3])
def test_spec_must_be_an_object(spec: Any) -> None:
    with pytest.raises(InvalidArgument, match=r"^spec: must be an object"):
        policy_from_spec(spec)


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(InvalidArgument) as info:
        policy_from_spec({"mode": "x" * 1000})
    assert len(str(info.value)) < 200
    assert str(info.value).endswith("...")


# -- Policy built directly -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"mode": "Sync"}, "mode"),
        ({"replicas": 0}, "replicas"),
        ({"replicas": 6}, "replicas"),
        ({"mode": Mode.SYNCHRONOUS, "max_lag_seconds": 0.0}, "write_quorum"),
        ({"mode": Mode.SYNCHRONOUS, "max_lag_seconds": 0.0, "write_quorum": 3},
         "write_quorum"),
        ({"write_quorum": 1}, "write_quorum must be 0"),
        ({"max_lag_seconds": 0.0}, "max_lag_seconds"),
        ({"max_lag_seconds": float("inf")}, "max_lag_seconds"),
        ({"mode": Mode.SCHEDULED, "schedule": "@daily"}, "max_lag_seconds must be 0"),
        ({"mode": Mode.SCHEDULED, "max_lag_seconds": 0.0}, "schedule"),
        ({"schedule": "@daily"}, "schedule"),
        ({"on_lag_exceeded": "Block"}, "on_lag_exceeded"),
        ({"conflict_resolution": "x"}, "conflict_resolution"),
        ({"on_quorum_loss": "x"}, "on_quorum_loss"),
        ({"stranded_pod_deletion": "Always"}, "stranded_pod_deletion"),
        ({"priority": 0}, "priority"),
        ({"bandwidth_bytes_per_second": -1}, "bandwidth"),
        ({"rebuild_bandwidth_bytes_per_second": -1}, "bandwidth"),
        ({"topology_key": ""}, "topology_key"),
        ({"node_selector": (("b", "1"), ("a", "1"))}, "sorted"),
        ({"node_selector": (("a", "1"), ("a", "2"))}, "each key once"),
        ({"stale_replica_timeout_seconds": 0.0}, "stale_replica_timeout_seconds"),
        ({"scrub_interval_seconds": float("nan")}, "scrub_interval_seconds"),
    ],
)
def test_direct_construction_checks_invariants(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(fragment)):
        dataclasses.replace(Policy(), **changes)


def test_direct_construction_of_consistent_policies() -> None:
    sync = Policy(mode=Mode.SYNCHRONOUS, replicas=3, write_quorum=2, max_lag_seconds=0.0)
    assert sync == policy_from_spec({"mode": "Synchronous", "replicas": 3})
    scheduled = Policy(mode=Mode.SCHEDULED, max_lag_seconds=0.0, schedule="@hourly")
    assert scheduled == policy_from_spec({"mode": "Scheduled", "schedule": "@hourly"})


# -- properties ----------------------------------------------------------------------------------

_durations = st.sampled_from(["1ns", "500ms", "5s", "1m30s", "1h", "168h", "2h45m"])
_quantities = st.one_of(st.integers(min_value=1, max_value=2**40),
                        st.sampled_from(["1", "20Mi", "1G", "500k", "1.5Gi", "3Ti"]))


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Well-formed specs, with any subset of fields left out."""
    mode = draw(st.sampled_from(["Synchronous", "Asynchronous", "Scheduled", None]))
    replicas = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=5)))
    spec: dict[str, Any] = {"mode": mode, "replicas": replicas}
    if mode == "Synchronous" and draw(st.booleans()):
        spec["writeQuorum"] = draw(st.integers(min_value=1, max_value=replicas or 2))
    if mode in ("Asynchronous", None) and draw(st.booleans()):
        spec["maxLag"] = draw(_durations)
    if mode == "Scheduled":
        spec["schedule"] = draw(st.sampled_from(["@daily", "*/5 * * * *", "0 3 * * mon-fri"]))
    optional: dict[str, st.SearchStrategy[Any]] = {
        "onLagExceeded": st.sampled_from(["Alert", "Throttle"]),
        "trigger.manual": st.text(max_size=20),
        "paused": st.booleans(),
        "qos.bandwidth": _quantities,
        "qos.priority": st.integers(min_value=1, max_value=1000),
        "qos.rebuildBandwidth": _quantities,
        "conflictResolution": st.sampled_from(["LastWriterWins", "KeepBoth"]),
        "placement.topologyKey": st.sampled_from(
            ["kubernetes.io/hostname", "topology.kubernetes.io/zone", "rack"]),
        "placement.nodeSelector": st.dictionaries(
            st.sampled_from(["disk", "example.com/tier", "a"]),
            st.sampled_from(["", "ssd", "gold", "x.y_z-1"]), max_size=3),
        "placement.dataLocality": st.sampled_from(["BestEffort", "Disabled"]),
        "failover.staleReplicaTimeout": _durations,
        "failover.onQuorumLoss": st.sampled_from(["Freeze", "Continue"]),
        "failover.strandedPodDeletion": st.sampled_from(
            ["Never", "StatefulSet", "Deployment", "StatefulSetAndDeployment"]),
        "integrity.scrubInterval": _durations,
        "integrity.autoRepair": st.booleans(),
    }
    for path, strategy in optional.items():
        if draw(st.booleans()):
            spec = with_field(path, draw(strategy), spec)
    return spec


@given(valid_specs())
def test_every_valid_spec_is_accepted_and_consistent(spec: dict[str, Any]) -> None:
    p = policy_from_spec(spec)
    assert p.mode == (spec["mode"] or "Asynchronous")
    assert p.replicas == (spec["replicas"] or 2)
    if p.mode is Mode.SYNCHRONOUS:
        assert p.write_quorum == spec.get("writeQuorum", majority(p.replicas))
        assert 1 <= p.write_quorum <= p.replicas
    else:
        assert p.write_quorum == 0
    assert (p.max_lag_seconds > 0) == (p.mode is Mode.ASYNCHRONOUS)
    assert bool(p.schedule) == (p.mode is Mode.SCHEDULED)
    assert list(p.node_selector) == sorted(spec.get("placement", {}).get("nodeSelector",
                                                                          {}).items())
    # Filling in the server's defaults changes nothing.
    filled = dict(SERVER_DEFAULTED)
    for key, value in spec.items():
        if isinstance(value, dict):
            filled[key] = {**filled.get(key, {}), **value}
        elif value is not None:
            filled[key] = value
    assert policy_from_spec(filled) == p


_FIELD_PATHS = ["mode", "replicas", "writeQuorum", "maxLag", "onLagExceeded", "schedule",
                "trigger", "trigger.manual", "paused", "qos", "qos.bandwidth", "qos.priority",
                "qos.rebuildBandwidth", "conflictResolution", "placement",
                "placement.topologyKey", "placement.nodeSelector", "placement.dataLocality",
                "failover", "failover.staleReplicaTimeout", "failover.onQuorumLoss",
                "failover.strandedPodDeletion",
                "integrity", "integrity.scrubInterval", "integrity.autoRepair"]
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)


@given(valid_specs(), st.sampled_from(_FIELD_PATHS), _json)
def test_any_value_anywhere_gives_a_policy_or_an_error_naming_that_field(
        spec: dict[str, Any], path: str, value: Any) -> None:
    spec = with_field(path, value, spec)
    try:
        policy_from_spec(spec)
    except InvalidArgument as exc:
        message = str(exc)
        named = re.match(r"spec(\.[A-Za-z]+)*", message)
        assert named is not None, message
        # Either the broken field (or something under it), or a field whose cross-field
        # rule the new value broke (mode and replicas interact with quorum, lag, schedule).
        assert (named.group(0).startswith(f"spec.{path}")
                or f"spec.{path}".startswith(named.group(0))
                or path in ("mode", "replicas")), message
