"""The agent's per-volume state file: what a restart reads back."""

from __future__ import annotations

from replication_agent.proto import agent_pb2 as pb
from replication_agent.volume import PersistedState, Role


def spec() -> pb.VolumeSpec:
    return pb.VolumeSpec(volume_id="vol-" + "ab" * 12, size_bytes=1 << 30,
                         replica_nodes=["a", "b", "c"], primary_node="a")


def test_a_state_reads_back_as_written() -> None:
    state = PersistedState(spec(), 3, Role.PRIMARY, "a", fenced=True,
                           awaiting_copy=frozenset({"c", "b"}), failed=frozenset({"b"}))
    again = PersistedState.from_json(state.to_json())
    assert again == state


def test_a_file_written_before_awaiting_copy_existed_presumes_no_peer_empty() -> None:
    """Files of earlier versions have no awaitingCopy: their peers start as before (Lagging,
    confirmed by their first acknowledgement), never as Rebuilding."""
    written = PersistedState(spec(), 1, Role.PRIMARY, "a").to_json()
    assert b'"awaitingCopy": []' in written
    old = written.replace(b'"awaitingCopy": [], ', b"")
    assert b"awaitingCopy" not in old
    assert PersistedState.from_json(old).awaiting_copy == frozenset()


def test_a_file_written_before_failed_replicas_were_kept_has_none_failed() -> None:
    """Files of earlier versions have no failedReplicas: no replica starts Failed."""
    written = PersistedState(spec(), 1, Role.PRIMARY, "a", failed=frozenset({"c"})).to_json()
    assert b'"failedReplicas": ["c"]' in written
    old = written.replace(b'"failedReplicas": ["c"], ', b"")
    assert b"failedReplicas" not in old
    assert PersistedState.from_json(old).failed == frozenset()
