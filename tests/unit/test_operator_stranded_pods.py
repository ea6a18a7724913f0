"""What the stranded-pod release reads from a pod's JSON (operator stranded_pods)."""

from __future__ import annotations

import datetime

from sharedsync_operator.stranded_pods import claims_of, created_unix_ns, owner_kind


def test_the_controller_is_the_owner_reference_marked_controller() -> None:
    pod = {"metadata": {"ownerReferences": [
        {"kind": "ConfigMap", "name": "x"},
        {"kind": "StatefulSet", "name": "db", "controller": True}]}}
    assert owner_kind(pod) == "StatefulSet"
    assert owner_kind({"metadata": {"ownerReferences": [{"kind": "ReplicaSet"}]}}) == ""
    assert owner_kind({"metadata": {}}) == ""


def test_claims_are_named_ones_and_generic_ephemeral_volumes() -> None:
    pod = {"metadata": {"name": "web-1"}, "spec": {"volumes": [
        {"name": "data", "persistentVolumeClaim": {"claimName": "data-web-1"}},
        {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {}}},
        {"name": "cache", "emptyDir": {}},
        {"name": "broken", "persistentVolumeClaim": {}}]}}
    assert claims_of(pod) == ["data-web-1", "web-1-scratch"]
    assert claims_of({"metadata": {"name": "p"}}) == []


def test_the_creation_time_in_unix_ns() -> None:
    assert created_unix_ns({"creationTimestamp": "2026-12-01T08:00:00Z"}) == \
        int(datetime.datetime(2026, 12, 1, 8, tzinfo=datetime.UTC).timestamp()) * 10**9
    when = datetime.datetime(2026, 12, 1, 8, 0, 1, tzinfo=datetime.UTC)
    assert created_unix_ns({"creationTimestamp": when}) == int(when.timestamp()) * 10**9
    # unreadable: 0, so that no volume counts as lost after it
    assert created_unix_ns({"creationTimestamp": "yesterday"}) == 0
    assert created_unix_ns({}) == 0
