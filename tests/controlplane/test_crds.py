"""The CRDs in charts/crds, as a real kube-apiserver enforces them.

Every bad spec here is one a user could plausibly write; the API server must refuse it on
create, with a message that names the field, before the operator ever sees it. The good specs
must come back with the schema defaults filled in, and without defaults for the fields that
belong to one mode only.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from typing import Any

import pytest

from .controlplane import ControlPlane

GROUP = "sharedsync.io"
API_VERSION = f"{GROUP}/v1alpha1"
CRD_NAMES = ("syncpolicies.sharedsync.io", "sharedvolumes.sharedsync.io",
             "sharedvolumesnapshots.sharedsync.io")
WAIT_TIMEOUT = 60

#: What an empty SyncPolicy spec becomes: every schema default, and nothing that belongs to one
#: mode only (writeQuorum, maxLag, schedule are the operator's to default).
DEFAULT_SPEC: dict[str, Any] = {
    "mode": "Asynchronous",
    "replicas": 2,
    "onLagExceeded": "Alert",
    "paused": False,
    "qos": {"priority": 1},
    "conflictResolution": "LastWriterWins",
    "placement": {"topologyKey": "kubernetes.io/hostname", "dataLocality": "BestEffort"},
    "failover": {"staleReplicaTimeout": "5m", "onQuorumLoss": "Freeze",
                 "strandedPodDeletion": "Never"},
    "integrity": {"scrubInterval": "168h", "autoRepair": True},
}


def unique(prefix: str) -> str:
    """A fresh object name: the session shares one cluster and these objects are global."""
    return f"{prefix}-{secrets.token_hex(4)}"


def obj(kind: str, name: str, spec: dict[str, Any] | None) -> str:
    body: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}}
    if spec is not None:
        body["spec"] = spec
    return json.dumps(body)


def create(cp: ControlPlane, kind: str, name: str, spec: dict[str, Any] | None,
           *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """kubectl create with strict field validation (unknown fields are errors, not dropped)."""
    return cp.kubectl("create", "--validate=strict", "-f", "-", input=obj(kind, name, spec),
                      check=check)


def get(cp: ControlPlane, resource: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = json.loads(cp.kubectl("get", resource, name, "-o", "json").stdout)
    return found


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, one level of nesting deep (enough for a spec)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def patch_status(cp: ControlPlane, resource: str, name: str, status: dict[str, Any]) -> None:
    cp.kubectl("patch", resource, name, "--subresource=status", "--type=merge",
               "-p", json.dumps({"status": status}))


def ready_condition(status: str = "True") -> dict[str, str]:
    return {"type": "Ready", "status": status, "reason": "TestSaysSo",
            "message": "set by the test", "lastTransitionTime": "2030-01-01T00:00:00Z"}


def table(cp: ControlPlane, resource: str, name: str) -> dict[str, str]:
    """The default `kubectl get` row of one object, as {COLUMN: cell}."""
    lines = cp.kubectl("get", resource, name).stdout.splitlines()
    assert len(lines) == 2, lines
    header, row = lines[0].split(), lines[1].split()
    assert len(header) == len(row), lines
    return dict(zip(header, row, strict=True))


@pytest.fixture
def cp(control_plane: ControlPlane) -> ControlPlane:
    return control_plane


# -- the CRDs themselves -------------------------------------------------------------------------


def test_crds_are_established_with_their_short_names(cp: ControlPlane) -> None:
    for name in CRD_NAMES:
        crd = get(cp, "crd", name)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", (name, conditions)
        assert conditions.get("NamesAccepted") == "True", (name, conditions)
    resources = cp.kubectl("api-resources", f"--api-group={GROUP}", "-o", "wide").stdout
    for short in ("sp", "sv", "svs"):
        assert f" {short} " in resources, resources


def test_every_schema_field_is_documented(cp: ControlPlane) -> None:
    """kubectl explain is the user's manual: no field may come without a description."""
    undocumented: list[str] = []

    def walk(schema: dict[str, Any], path: str) -> None:
        if path and not schema.get("description") and not path.endswith(".metadata"):
            undocumented.append(path)
        for key, sub in schema.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")

    for name in CRD_NAMES:
        crd = get(cp, "crd", name)
        (version,) = crd["spec"]["versions"]
        walk(version["schema"]["openAPIV3Schema"], name)
    assert not undocumented


# -- SyncPolicy: refused -------------------------------------------------------------------------


BAD_POLICIES = [
    pytest.param({"replicas": 0}, ["spec.replicas", "greater than or equal to 1"],
                 id="replicas-0"),
    pytest.param({"replicas": 6}, ["spec.replicas", "less than or equal to 5"], id="replicas-6"),
    pytest.param({"replicas": "three"}, ["spec.replicas", "integer"], id="replicas-string"),
    pytest.param({"mode": "Synchronous", "replicas": 2, "writeQuorum": 3},
                 ["spec.writeQuorum", "must be at most spec.replicas"],
                 id="writeQuorum-over-replicas"),
    pytest.param({"mode": "Synchronous", "replicas": 3, "writeQuorum": 0},
                 ["spec.writeQuorum", "greater than or equal to 1"], id="writeQuorum-0"),
    pytest.param({"mode": "Asynchronous", "writeQuorum": 1},
                 ["spec.writeQuorum", "only with mode Synchronous"],
                 id="writeQuorum-with-Asynchronous"),
    pytest.param({"writeQuorum": 1}, ["spec.writeQuorum", "only with mode Synchronous"],
                 id="writeQuorum-with-default-mode"),
    pytest.param({"mode": "Scheduled", "schedule": "0 * * * *", "writeQuorum": 1},
                 ["spec.writeQuorum", "only with mode Synchronous"],
                 id="writeQuorum-with-Scheduled"),
    pytest.param({"mode": "Scheduled"}, ["spec.schedule", "required when mode is Scheduled"],
                 id="Scheduled-without-schedule"),
    pytest.param({"mode": "Asynchronous", "schedule": "0 * * * *"},
                 ["spec.schedule", "only with mode Scheduled"], id="schedule-with-Asynchronous"),
    pytest.param({"mode": "Synchronous", "schedule": "@hourly"},
                 ["spec.schedule", "only with mode Scheduled"], id="schedule-with-Synchronous"),
    pytest.param({"mode": "Scheduled", "schedule": "0 * * *"}, ["spec.schedule", "should match"],
                 id="schedule-4-fields"),
    pytest.param({"mode": "Scheduled", "schedule": "0 * * * * *"},
                 ["spec.schedule", "should match"], id="schedule-6-fields"),
    pytest.param({"mode": "Synchronous", "maxLag": "5s"},
                 ["spec.maxLag", "only with mode Asynchronous"], id="maxLag-with-Synchronous"),
    pytest.param({"mode": "Scheduled", "schedule": "@daily", "maxLag": "5s"},
                 ["spec.maxLag", "only with mode Asynchronous"], id="maxLag-with-Scheduled"),
    pytest.param({"maxLag": "5 seconds"}, ["spec.maxLag", "should match"], id="maxLag-words"),
    pytest.param({"maxLag": "5"}, ["spec.maxLag", "should match"], id="maxLag-no-unit"),
    pytest.param({"maxLag": "1d"}, ["spec.maxLag", "should match"], id="maxLag-days"),
    pytest.param({"maxLag": "-5s"}, ["spec.maxLag", "should match"], id="maxLag-negative"),
    pytest.param({"maxLag": "0s"}, ["spec.maxLag", "must be a positive duration"],
                 id="maxLag-zero"),
    pytest.param({"maxLag": "0h0m0.0s"}, ["spec.maxLag", "must be a positive duration"],
                 id="maxLag-zero-compound"),
    pytest.param({"maxLag": "99999999999h"}, ["spec.maxLag", "must be a positive duration"],
                 id="maxLag-overflow"),
    pytest.param({"onLagExceeded": "Drop"}, ['spec.onLagExceeded: Unsupported value: "Drop"'],
                 id="onLagExceeded-unknown"),
    pytest.param({"mode": "Fast"}, ['spec.mode: Unsupported value: "Fast"'], id="mode-unknown"),
    pytest.param({"mode": "asynchronous"}, ['spec.mode: Unsupported value: "asynchronous"'],
                 id="mode-lowercase"),
    pytest.param({"qos": {"bandwidth": "-1Mi"}}, ["spec.qos.bandwidth", "positive quantity"],
                 id="bandwidth-negative"),
    pytest.param({"qos": {"bandwidth": -1}}, ["spec.qos.bandwidth", "positive quantity"],
                 id="bandwidth-negative-int"),
    pytest.param({"qos": {"bandwidth": 0}}, ["spec.qos.bandwidth", "positive quantity"],
                 id="bandwidth-zero-int"),
    pytest.param({"qos": {"bandwidth": "0Mi"}}, ["spec.qos.bandwidth", "positive quantity"],
                 id="bandwidth-zero"),
    pytest.param({"qos": {"bandwidth": "lots"}}, ["spec.qos.bandwidth", "positive quantity"],
                 id="bandwidth-lots"),
    pytest.param({"qos": {"bandwidth": "100MB/s"}}, ["spec.qos.bandwidth", "positive quantity"],
                 id="bandwidth-with-unit"),
    pytest.param({"qos": {"rebuildBandwidth": "0"}},
                 ["spec.qos.rebuildBandwidth", "positive quantity"], id="rebuildBandwidth-zero"),
    pytest.param({"qos": {"rebuildBandwidth": "fast"}},
                 ["spec.qos.rebuildBandwidth", "positive quantity"], id="rebuildBandwidth-fast"),
    pytest.param({"qos": {"priority": 0}}, ["spec.qos.priority", "greater than or equal to 1"],
                 id="priority-0"),
    pytest.param({"qos": {"priority": 1001}}, ["spec.qos.priority", "less than or equal to 1000"],
                 id="priority-1001"),
    pytest.param({"conflictResolution": "Merge"},
                 ['spec.conflictResolution: Unsupported value: "Merge"'],
                 id="conflictResolution-unknown"),
    pytest.param({"placement": {"dataLocality": "Always"}},
                 ['spec.placement.dataLocality: Unsupported value: "Always"'],
                 id="dataLocality-Always"),
    pytest.param({"placement": {"topologyKey": ""}}, ["spec.placement.topologyKey"],
                 id="topologyKey-empty"),
    pytest.param({"placement": {"topologyKey": "not a label"}},
                 ["spec.placement.topologyKey", "must be a label key"], id="topologyKey-spaces"),
    pytest.param({"placement": {"nodeSelector": {"bad key!": "x"}}},
                 ["spec.placement.nodeSelector", "must be label keys"],
                 id="nodeSelector-bad-key"),
    pytest.param({"placement": {"nodeSelector": {"disk": "x" * 64}}},
                 ["spec.placement.nodeSelector.disk", "Too long"],
                 id="nodeSelector-value-too-long"),
    pytest.param({"placement": {"nodeSelector": {"disk": "ssd fast"}}},
                 ["spec.placement.nodeSelector.disk", "should match"],
                 id="nodeSelector-value-spaces"),
    pytest.param({"placement": {"nodeSelector": {f"k{i}": "v" for i in range(33)}}},
                 ["spec.placement.nodeSelector", "Too many"], id="nodeSelector-too-many"),
    pytest.param({"failover": {"onQuorumLoss": "Panic"}},
                 ['spec.failover.onQuorumLoss: Unsupported value: "Panic"'],
                 id="onQuorumLoss-Panic"),
    pytest.param({"failover": {"strandedPodDeletion": "Always"}},
                 ['spec.failover.strandedPodDeletion: Unsupported value: "Always"'],
                 id="strandedPodDeletion-Always"),
    pytest.param({"failover": {"staleReplicaTimeout": "5d"}},
                 ["spec.failover.staleReplicaTimeout", "should match"],
                 id="staleReplicaTimeout-days"),
    pytest.param({"failover": {"staleReplicaTimeout": "0m"}},
                 ["spec.failover.staleReplicaTimeout", "must be a positive duration"],
                 id="staleReplicaTimeout-zero"),
    pytest.param({"integrity": {"scrubInterval": "weekly"}},
                 ["spec.integrity.scrubInterval", "should match"], id="scrubInterval-weekly"),
    pytest.param({"integrity": {"scrubInterval": "0h"}},
                 ["spec.integrity.scrubInterval", "must be a positive duration"],
                 id="scrubInterval-zero"),
    pytest.param({"integrity": {"autoRepair": "sometimes"}},
                 ["spec.integrity.autoRepair", "boolean"], id="autoRepair-string"),
    pytest.param({"paused": "yes"}, ["spec.paused", "boolean"], id="paused-string"),
    pytest.param({"trigger": {"manual": "x" * 254}}, ["spec.trigger.manual", "Too long"],
                 id="trigger-manual-too-long"),
    pytest.param({"replica": 3}, ['unknown field "spec.replica"'], id="unknown-field-typo"),
    pytest.param({"qos": {"bandwith": "10Mi"}}, ['unknown field "spec.qos.bandwith"'],
                 id="unknown-field-nested"),
]


@pytest.mark.parametrize(("spec", "expected"), BAD_POLICIES)
def test_bad_sync_policy_is_refused(cp: ControlPlane, spec: dict[str, Any],
                                    expected: list[str]) -> None:
    name = unique("bad")
    done = create(cp, "SyncPolicy", name, spec, check=False)
    if done.returncode == 0:
        cp.kubectl("delete", "sp", name, "--wait=false")
    assert done.returncode != 0, f"accepted: {spec}"
    for text in expected:
        assert text in done.stderr, done.stderr
    assert "NotFound" in cp.kubectl("get", "sp", name, check=False).stderr


def test_rules_hold_on_update_too(cp: ControlPlane) -> None:
    name = unique("update")
    create(cp, "SyncPolicy", name, {"mode": "Asynchronous", "maxLag": "2s"})
    try:
        done = cp.kubectl("patch", "sp", name, "--type=merge",
                          "-p", json.dumps({"spec": {"mode": "Synchronous"}}), check=False)
        assert done.returncode != 0
        assert "spec.maxLag is allowed only with mode Asynchronous" in done.stderr
        done = cp.kubectl("patch", "sp", name, "--type=merge",
                          "-p", json.dumps({"spec": {"replicas": 9}}), check=False)
        assert done.returncode != 0
        assert "spec.replicas" in done.stderr
        cp.kubectl("patch", "sp", name, "--type=merge",
                   "-p", json.dumps({"spec": {"mode": "Synchronous", "maxLag": None,
                                              "writeQuorum": 2}}))
        spec = get(cp, "sp", name)["spec"]
        assert (spec["mode"], spec["writeQuorum"], "maxLag" in spec) == ("Synchronous", 2, False)
    finally:
        cp.kubectl("delete", "sp", name)


# -- SyncPolicy: accepted, with defaults ---------------------------------------------------------


@pytest.mark.parametrize("spec", [pytest.param({}, id="empty-spec"),
                                  pytest.param(None, id="no-spec")])
def test_empty_policy_gets_every_schema_default(cp: ControlPlane,
                                                spec: dict[str, Any] | None) -> None:
    name = unique("defaults")
    create(cp, "SyncPolicy", name, spec)
    try:
        assert get(cp, "sp", name)["spec"] == DEFAULT_SPEC
    finally:
        cp.kubectl("delete", "sp", name)


GOOD_POLICIES = [
    pytest.param({"mode": "Synchronous", "replicas": 3, "writeQuorum": 2,
                  "failover": {"onQuorumLoss": "Continue"}}, id="Synchronous"),
    pytest.param({"mode": "Synchronous", "replicas": 5}, id="Synchronous-quorum-by-operator"),
    pytest.param({"mode": "Synchronous", "replicas": 1, "writeQuorum": 1}, id="Synchronous-1"),
    pytest.param({"mode": "Asynchronous", "maxLag": "1m30s", "onLagExceeded": "Throttle",
                  "qos": {"bandwidth": "100Mi", "rebuildBandwidth": 52428800, "priority": 1000}},
                 id="Asynchronous"),
    pytest.param({"mode": "Asynchronous", "maxLag": "500ms", "qos": {"bandwidth": "1.5G"}},
                 id="Asynchronous-fractions"),
    pytest.param({"mode": "Scheduled", "schedule": "*/15 * * * *",
                  "trigger": {"manual": "2030-01-01T00:00:00Z"}}, id="Scheduled"),
    pytest.param({"mode": "Scheduled", "schedule": "@hourly", "paused": True},
                 id="Scheduled-macro"),
    pytest.param({"mode": "Scheduled", "schedule": "0 2 * jan-jun mon-fri"},
                 id="Scheduled-names"),
    pytest.param({"conflictResolution": "KeepBoth",
                  "placement": {"topologyKey": "topology.kubernetes.io/zone",
                                "nodeSelector": {"sharedsync.io/storage": "true",
                                                 "disk": "", "tier": "fast_1.a"},
                                "dataLocality": "Disabled"},
                  "failover": {"staleReplicaTimeout": "1h"},
                  "integrity": {"scrubInterval": "24h", "autoRepair": False}},
                 id="placement-and-integrity"),
]


@pytest.mark.parametrize("spec", GOOD_POLICIES)
def test_good_sync_policy_is_accepted_with_defaults(cp: ControlPlane,
                                                    spec: dict[str, Any]) -> None:
    name = unique("good")
    create(cp, "SyncPolicy", name, spec)
    try:
        stored = get(cp, "sp", name)["spec"]
        assert stored == merged(DEFAULT_SPEC, spec)
        # the one-mode fields are never defaulted by the schema
        for field in ("writeQuorum", "maxLag", "schedule"):
            assert (field in stored) == (field in spec), field
    finally:
        cp.kubectl("delete", "sp", name)


def test_sync_policy_columns(cp: ControlPlane) -> None:
    name = unique("columns")
    create(cp, "SyncPolicy", name, {"mode": "Synchronous", "replicas": 3})
    try:
        patch_status(cp, "sp", name, {"volumes": 4, "inSync": 3, "worstLag": "1.2s",
                                      "worstLagSeconds": 1.2, "conditions": [ready_condition()]})
        row = table(cp, "sp", name)
        assert list(row) == ["NAME", "MODE", "REPLICAS", "VOLUMES", "INSYNC", "WORSTLAG",
                             "READY", "AGE"]
        assert row | {"AGE": ""} == {"NAME": name, "MODE": "Synchronous", "REPLICAS": "3",
                                     "VOLUMES": "4", "INSYNC": "3", "WORSTLAG": "1.2s",
                                     "READY": "True", "AGE": ""}
        assert name in cp.kubectl("get", "sharedsync").stdout  # the category
    finally:
        cp.kubectl("delete", "sp", name)


def test_status_is_a_subresource(cp: ControlPlane) -> None:
    """Writes to the main resource cannot set status (only the operator, via /status)."""
    name = unique("status")
    create(cp, "SyncPolicy", name, {})
    try:
        cp.kubectl("patch", "sp", name, "--type=merge",
                   "-p", json.dumps({"status": {"volumes": 7}}))
        assert "status" not in get(cp, "sp", name)
        bad = cp.kubectl("patch", "sp", name, "--subresource=status", "--type=merge",
                         "-p", json.dumps({"status": {"conditions": [
                             ready_condition("Maybe")]}}), check=False)
        assert bad.returncode != 0
        assert 'status.conditions[0].status: Unsupported value: "Maybe"' in bad.stderr
    finally:
        cp.kubectl("delete", "sp", name)


# -- SharedVolume --------------------------------------------------------------------------------


def volume_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"capacity": "1Gi", "policy": "async-default",
                            "accessModes": ["ReadWriteMany"], "volumeMode": "Filesystem",
                            "requestName": "pvc-0b9f",
                            "parameters": {"syncPolicy": "async-default"},
                            "accessibleNodes": ["node-a", "node-b"]}
    spec.update(overrides)
    return spec


BAD_VOLUMES = [
    pytest.param(volume_spec(capacity=0), ["spec.capacity", "positive quantity"], id="capacity-0"),
    pytest.param(volume_spec(capacity="0"), ["spec.capacity", "positive quantity"],
                 id="capacity-0-string"),
    pytest.param(volume_spec(capacity="-1Gi"), ["spec.capacity", "positive quantity"],
                 id="capacity-negative"),
    pytest.param(volume_spec(capacity="big"), ["spec.capacity", "positive quantity"],
                 id="capacity-big"),
    pytest.param({k: v for k, v in volume_spec().items() if k != "capacity"},
                 ["spec.capacity", "Required value"], id="capacity-missing"),
    pytest.param(volume_spec(accessModes=["ReadWriteAll"]),
                 ['spec.accessModes[0]: Unsupported value: "ReadWriteAll"'], id="accessMode"),
    pytest.param(volume_spec(volumeMode="Raw"), ['spec.volumeMode: Unsupported value: "Raw"'],
                 id="volumeMode"),
    pytest.param(volume_spec(desiredReplicas=6),
                 ["spec.desiredReplicas", "less than or equal to 5"], id="desiredReplicas-6"),
    pytest.param(volume_spec(contentSource={"kind": "Backup", "name": "b-1"}),
                 ['spec.contentSource.kind: Unsupported value: "Backup"'],
                 id="contentSource-kind"),
    pytest.param(volume_spec(contentSource={"kind": "Snapshot"}),
                 ["spec.contentSource.name", "Required value"], id="contentSource-no-name"),
    pytest.param(volume_spec(size="1Gi"), ['unknown field "spec.size"'], id="unknown-field"),
]


@pytest.mark.parametrize(("spec", "expected"), BAD_VOLUMES)
def test_bad_shared_volume_is_refused(cp: ControlPlane, spec: dict[str, Any],
                                      expected: list[str]) -> None:
    name = unique("vol-bad")
    done = create(cp, "SharedVolume", name, spec, check=False)
    if done.returncode == 0:
        cp.kubectl("delete", "sv", name, "--wait=false")
    assert done.returncode != 0, f"accepted: {spec}"
    for text in expected:
        assert text in done.stderr, done.stderr


def test_shared_volume_policy_is_immutable(cp: ControlPlane) -> None:
    name = unique("vol")
    create(cp, "SharedVolume", name, volume_spec())
    try:
        for patch in ({"spec": {"policy": "sync-default"}}, {"spec": {"policy": None}}):
            done = cp.kubectl("patch", "sv", name, "--type=merge", "-p", json.dumps(patch),
                              check=False)
            assert done.returncode != 0, patch
            assert "spec.policy: Invalid value" in done.stderr
            assert "spec.policy is immutable" in done.stderr
        # other fields may change; policy stays
        cp.kubectl("patch", "sv", name, "--type=merge",
                   "-p", json.dumps({"spec": {"consumerNode": "node-b"}}))
        spec = get(cp, "sv", name)["spec"]
        assert (spec["policy"], spec["consumerNode"]) == ("async-default", "node-b")
    finally:
        cp.kubectl("delete", "sv", name)


def test_shared_volume_capacity_only_grows(cp: ControlPlane) -> None:
    name = unique("vol")
    create(cp, "SharedVolume", name, volume_spec(capacity="1Gi"))
    try:
        def resize(capacity: int | str) -> subprocess.CompletedProcess[str]:
            return cp.kubectl("patch", "sv", name, "--type=merge",
                              "-p", json.dumps({"spec": {"capacity": capacity}}), check=False)

        for capacity in ("2Gi", 3 << 30, "3221225472", "4G"):  # grow, or stay, in either form
            done = resize(capacity)
            assert done.returncode == 0, (capacity, done.stderr)
            assert get(cp, "sv", name)["spec"]["capacity"] == capacity
        for capacity in ("3Gi", 1 << 30, "3999999999"):
            done = resize(capacity)
            assert done.returncode != 0, capacity
            assert "spec.capacity may only grow, never shrink" in done.stderr
        assert get(cp, "sv", name)["spec"]["capacity"] == "4G"
    finally:
        cp.kubectl("delete", "sv", name)


def test_shared_volume_columns_and_ready_condition(cp: ControlPlane) -> None:
    name = unique("vol")
    create(cp, "SharedVolume", name, volume_spec(capacity="10Gi", volumeMode="Block"))
    try:
        not_yet = cp.kubectl("wait", "--for=condition=Ready", f"sv/{name}", "--timeout=1s",
                             check=False)
        assert not_yet.returncode != 0
        # a waiter started before the condition exists must return once the operator sets it
        waiter = subprocess.Popen(
            cp.kubectl_command("wait", "--for=condition=Ready", f"sv/{name}",
                               f"--timeout={WAIT_TIMEOUT}s"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            patch_status(cp, "sv", name, {
                "phase": "Ready", "mode": "Asynchronous", "primary": "node-a", "epoch": 1,
                "readyReplicas": 2,
                "desiredReplicas": 3, "replicasReady": "2/3", "lag": "0.4s", "lagSeconds": 0.4,
                "replicas": [
                    {"node": "node-a", "role": "primary", "state": "InSync"},
                    {"node": "node-b", "role": "replica", "state": "Lagging", "lagSeconds": 0.4,
                     "lastSyncTime": "2030-01-01T00:00:00Z"},
                    {"node": "node-c", "role": "replica", "state": "Rebuilding",
                     "rebuildProgress": 0.5, "message": "copying"}],
                "syncLatency": {"p50Seconds": 0.001, "p90Seconds": 0.002, "p99Seconds": 0.01},
                "bytesShipped": 1 << 40, "conflicts": 0, "snapshotBytes": 0,
                "conditions": [ready_condition()]})
            out, err = waiter.communicate(timeout=WAIT_TIMEOUT + 30)
        finally:
            if waiter.poll() is None:
                waiter.kill()
                waiter.communicate()
        assert waiter.returncode == 0, err
        assert "condition met" in out
        row = table(cp, "sv", name)
        assert list(row) == ["NAME", "SIZE", "POLICY", "MODE", "REPLICAS", "PRIMARY", "LAG",
                             "READY", "AGE"]
        assert row | {"AGE": ""} == {"NAME": name, "SIZE": "10Gi", "POLICY": "async-default",
                                     "MODE": "Asynchronous", "REPLICAS": "2/3", "PRIMARY": "node-a",
                                     "LAG": "0.4s", "READY": "True", "AGE": ""}
    finally:
        cp.kubectl("delete", "sv", name)


# -- SharedVolumeSnapshot ------------------------------------------------------------------------


def test_snapshot_record_is_accepted_and_listed(cp: ControlPlane) -> None:
    name = unique("snap")
    create(cp, "SharedVolumeSnapshot", name, {
        "requestName": "snapshot-1f2e", "sourceVolume": "vol-1234", "sizeBytes": 1 << 30,
        "createdAtNs": 1_900_000_000_000_000_000, "accessibleNodes": ["node-a"]})
    try:
        # the operator sets readyToUse; until it does the READY cell is empty
        patch_status(cp, "svs", name, {"readyToUse": False})
        row = table(cp, "svs", name)
        assert row | {"AGE": ""} == {"NAME": name, "SOURCE": "vol-1234",
                                     "SIZEBYTES": str(1 << 30), "READY": "false", "AGE": ""}
    finally:
        cp.kubectl("delete", "svs", name)
    done = create(cp, "SharedVolumeSnapshot", unique("snap"), {"sizeBytes": -1}, check=False)
    assert done.returncode != 0
    assert "spec.sourceVolume: Required value" in done.stderr
    assert "spec.sizeBytes" in done.stderr
