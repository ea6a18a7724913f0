"""The agent's per-volume state file: what a restart reads back."""

from __future__ import annotations

import pytest

from replication_agent.proto import agent_pb2 as pb
from replication_agent.volume import PersistedState, Role


def spec() -> pb.VolumeSpec:
    return pb.VolumeSpec(volume_id="vol-" + "ab" * 12, size_bytes=1 << 30,
                         replica_nodes=["a", "b", "c"], primary_node="a")


def test_a_state_reads_back_as_written() -> None:
    state = PersistedState(spec(), 3, Role.PRIMARY, "a", fenced=True,
                           awaiting_copy=frozenset({"c", "b"}), failed=frozenset({"b"}),
                           suspended="the agent's Lease lapsed and no peer answers",
                           stranded_ns=1_796_000_000_000_000_000)
    again = PersistedState.from_json(state.to_json())
    assert again == state


@pytest.mark.parametrize("key", ["awaitingCopy", "failedReplicas"])
def test_a_file_written_before_a_peer_set_existed_reads_as_empty(key: str) -> None:
    """Files of earlier versions have no awaitingCopy, or no failedReplicas: their peers
    start as before (Lagging, confirmed by their first acknowledgement), never as Rebuilding
    or Failed."""
    written = PersistedState(spec(), 1, Role.PRIMARY, "a", awaiting_copy=frozenset({"c"}),
                             failed=frozenset({"c"})).to_json()
    assert f'"{key}": ["c"]'.encode() in written
    old = written.replace(f'"{key}": ["c"], '.encode(), b"")
    assert key.encode() not in old
    again = PersistedState.from_json(old)
    read = {"awaitingCopy": again.awaiting_copy, "failedReplicas": again.failed}
    assert read[key] == frozenset()
    assert all(peers == frozenset({"c"}) for name, peers in read.items() if name != key)


def test_a_file_written_before_suspensions_existed_reads_as_not_suspended() -> None:
    written = PersistedState(spec(), 1, Role.PRIMARY, "a", suspended="cut off").to_json()
    assert b'"writesSuspended": "cut off"' in written
    old = written.replace(b', "writesSuspended": "cut off"', b"")
    assert b"writesSuspended" not in old
    assert PersistedState.from_json(old).suspended == ""


def test_a_file_written_before_stranded_consumers_existed_reads_as_none() -> None:
    written = PersistedState(spec(), 1, Role.REPLICA, "b", stranded_ns=12).to_json()
    assert b'"consumersStrandedAt": 12' in written
    old = written.replace(b'"consumersStrandedAt": 12, ', b"")
    assert b"consumersStranded" not in old
    assert PersistedState.from_json(old).stranded_ns == 0
