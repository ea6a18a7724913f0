"""What the operator tells the agents about a volume (the multi-writer and file-level switches),
and what it reads back from their reports."""

from __future__ import annotations

from sharedsync_operator.volumes import multi_writer, report_of, volume_spec

from replication_agent.proto import agent_pb2 as pb
from sharedsync.core.policy import policy_from_spec
from sharedsync.core.volume_plan import Layout, Replication


def test_read_write_many_filesystem_volumes_are_multi_writer() -> None:
    assert multi_writer({"accessModes": ["ReadWriteMany"]})
    assert multi_writer({"accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                         "volumeMode": "Filesystem"})
    assert not multi_writer({"accessModes": ["ReadWriteMany"], "volumeMode": "Block"})
    assert not multi_writer({"accessModes": ["ReadWriteOnce"]})
    assert not multi_writer({"accessModes": ["ReadOnlyMany"]})
    assert not multi_writer({})


def test_the_switch_reaches_the_spec_and_its_revision() -> None:
    policy = policy_from_spec({"mode": "Asynchronous", "replicas": 2})
    layout = Layout(replicas=("a", "b"), primary="a", epoch=1)
    single = volume_spec("vol-1", 1 << 30, "filesystem", policy, layout, 1, {})
    many = volume_spec("vol-1", 1 << 30, "filesystem", policy, layout, 1, {},
                       many_writers=True)
    assert not single.multi_writer
    assert many.multi_writer
    # agents echo the revision: a changed switch must reach them as a new spec
    assert single.revision != many.revision


def test_a_volume_placed_to_replicate_files_tells_single_writer_agents_so() -> None:
    policy = policy_from_spec({"mode": "Synchronous", "replicas": 2})
    snapshots = Layout(replicas=("a", "b"), primary="a", epoch=1)
    files = Layout(replicas=("a", "b"), primary="a", epoch=1, replication=Replication.FILES)
    assert not volume_spec("vol-1", 1 << 30, "filesystem", policy, snapshots, 2, {}).file_level
    by_file = volume_spec("vol-1", 1 << 30, "filesystem", policy, files, 2, {})
    assert by_file.file_level
    assert by_file.revision != volume_spec("vol-1", 1 << 30, "filesystem", policy, snapshots,
                                           2, {}).revision
    # multi-writer volumes replicate file by file anyway: multi_writer says it all
    many = volume_spec("vol-1", 1 << 30, "filesystem", policy, files, 2, {}, many_writers=True)
    assert many.multi_writer
    assert not many.file_level


def test_an_agents_report_carries_its_fsync_journal_for_failover() -> None:
    """Two replicas on the same snapshot differ by the journal records they hold: the plan
    must see that count, or it could promote the one missing acknowledged writes."""
    status = pb.VolumeStatus(volume_id="vol-1", epoch=3, primary_node="a", role="replica",
                             journal_records=17)
    status.last_snapshot.epoch, status.last_snapshot.seq = 3, 9
    report = report_of("b", status)
    assert report.last_received == (3, 9)
    assert report.journal_records == 17
