"""Synchronous mode: an fsync returns only once the write quorum holds the data.

The volume is attached through the agent's FUSE data path (kernel passthrough); a writer
appends checksummed records, fsyncs each, and remembers what was acknowledged. Agents are
SIGKILLed and partitioned along the way; afterwards every acknowledged record must be on every
replica that the quorum rule says holds it, intact.

The suite runs on three clusters: every replica on btrfs (snapshot increments), every replica
on the ext4 fallback (file by file), and a mixed one (b on ext4, a and c on btrfs) whose
volumes the operator would make ``file_level``, so that btrfs and ext4 nodes share them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replication_agent.proto import agent_pb2 as pb
from tests.e2e.kube import metric
from tests.integration.agent_harness import (
    REPO,
    STORE_FILESYSTEMS,
    AgentCluster,
    started_cluster,
    volume_spec,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(900)]

VOLUME = "vol-" + "5c" * 12
RECORDS = 1000
PER_FILE = 100


MIXED = {"a": "btrfs", "b": "ext4", "c": "btrfs"}


@pytest.fixture(params=[*STORE_FILESYSTEMS, "mixed"])
def cluster(tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[AgentCluster]:
    """Three agents on btrfs (snapshot increments), on the ext4 fallback (file by file), or
    on both (file by file)."""
    yield from started_cluster(tmp_path_factory, "sync",
                               MIXED if request.param == "mixed" else request.param)


def stores(cluster: AgentCluster) -> set[str]:
    return {str(agent.config.get("storeFilesystem")) for agent in cluster.agents.values()}


def on_ext4(cluster: AgentCluster) -> bool:
    """Whether the volume replicates file by file: some replica is on ext4."""
    return "ext4" in stores(cluster)


def spec(cluster: AgentCluster, *args: Any, **kwargs: Any) -> pb.VolumeSpec:
    """``volume_spec``, made file-level where btrfs and ext4 nodes share it (as the operator
    does)."""
    made = volume_spec(*args, **kwargs)
    made.file_level = len(stores(cluster)) > 1
    return made


def record(i: int) -> bytes:
    body = f"record {i:06d} ".encode() * 4
    return f"{i:06d} {hashlib.sha256(body).hexdigest()} ".encode() + body + b"\n"


def write_record(mount: Path, i: int) -> None:
    """Append record ``i`` and fsync: returns only when the write quorum holds it."""
    with open(mount / f"records-{i // PER_FILE:03d}.log", "ab") as out:
        out.write(record(i))
        out.flush()
        os.fsync(out.fileno())


#: ``write_record`` as a program: ``python -c WRITE_ONE_RECORD <mount> <i>``.
WRITE_ONE_RECORD = (
    "import sys; from pathlib import Path; "
    "from tests.integration.test_agent_synchronous import write_record; "
    "write_record(Path(sys.argv[1]), int(sys.argv[2]))")


def records_in(root: Path) -> dict[int, bool]:
    """Record number -> whether its checksum verifies, for every record under ``root``."""
    found: dict[int, bool] = {}
    for path in sorted(root.glob("records-*.log")):
        for line in path.read_bytes().splitlines():
            number, digest, body = line.split(b" ", 2)
            found[int(number)] = hashlib.sha256(body + b"").hexdigest() == digest.decode() \
                or hashlib.sha256(body).hexdigest() == digest.decode()
    return found


def replicated(cluster: AgentCluster, node: str) -> Path:
    """What a replica holds for sure: its newest complete snapshot on btrfs, its live tree on
    the ext4 fallback (where files are merged into place one by one)."""
    if on_ext4(cluster):
        return cluster.agents[node].live(VOLUME)
    sync_dir = cluster.agents[node].sync_dir(VOLUME)
    names = sorted(p.name for p in sync_dir.iterdir() if p.name.startswith("e"))
    assert names, f"{node} holds no snapshot"
    return sync_dir / names[-1]


def check_all(acked: list[int], root: Path, where: str) -> None:
    found = records_in(root)
    missing = [i for i in acked if i not in found]
    corrupt = [i for i in acked if i in found and not found[i]]
    assert not missing, f"{where}: {len(missing)} acknowledged records lost, e.g. {missing[:5]}"
    assert not corrupt, f"{where}: corrupt records {corrupt[:5]}"


def attach(cluster: AgentCluster, node: str) -> Path:
    reply = cluster.agents[node].call("Attach", pb.AttachRequest(volume_id=VOLUME))
    return Path(reply.path)


def newest_replica(cluster: AgentCluster, nodes: tuple[str, ...]) -> str:
    """The replica the operator would promote: newest snapshot, then most journal records."""
    held = {n: cluster.agents[n].volume(VOLUME) for n in nodes}
    return max(nodes, key=lambda n: (held[n].last_snapshot.epoch, held[n].last_snapshot.seq,
                                     held[n].journal_records, n == nodes[0]))


def test_acknowledged_writes_survive_replica_kill_and_partition(cluster: AgentCluster) -> None:
    cluster.apply(spec(cluster, VOLUME, ["a", "b", "c"], "a", mode=pb.SYNCHRONOUS,
                              write_quorum=2))
    mount = attach(cluster, "a")
    acked: list[int] = []
    for i in range(RECORDS):
        if i == 250:
            cluster.agents["c"].kill()  # a replica dies: quorum is a + b
        elif i == 400:
            cluster.agents["c"].start()  # ... and comes back
        elif i == 550:
            cluster.partition("b")  # b is cut off: quorum is a + c (c catches up first)
        elif i == 700:
            cluster.heal("b")
        write_record(mount, i)
        acked.append(i)
    check_all(acked, mount, "the primary")
    # every acknowledged record reached a quorum: after the last write, at least one of b and
    # c held it; once everything settles, both do
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=300)
    if on_ext4(cluster):
        # file by file, a replica pulls what it missed while cut off: its own sync-now does it
        # at once (its puller may be backing off after the partition)
        for node in ("b", "c"):
            wait_until(lambda node=node: cluster.agents[node].call(
                "SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=120) is not None
                and set(acked) <= set(records_in(replicated(cluster, node))),
                timeout=120, interval=1, what=f"{node} holds every acknowledged record")
    for node in ("b", "c"):
        check_all(acked, replicated(cluster, node), f"replica {node}")
    cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))


def test_acknowledged_writes_survive_the_primary_dying(cluster: AgentCluster) -> None:
    cluster.apply(spec(cluster, VOLUME, ["a", "b", "c"], "a", mode=pb.SYNCHRONOUS,
                              write_quorum=2))
    mount = attach(cluster, "a")
    acked: list[int] = []
    for i in range(300):
        if i == 200:
            cluster.agents["a"].kill()  # the primary's agent and its FUSE daemon die
        try:
            write_record(mount, i)
        except OSError:
            break  # the mount is gone: this write was never acknowledged
        acked.append(i)
    assert 150 <= len(acked) <= 200
    # promote whichever replica holds the newest snapshot and the most fsync journal records
    # on it, as the operator would (on ext4 every replica merged every acknowledged write:
    # any of them will do)
    new_primary = newest_replica(cluster, ("b", "c"))
    cluster.agents[new_primary].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2))
    check_all(acked, cluster.agents[new_primary].live(VOLUME), f"promoted {new_primary}")
    # the old primary restarts fenced, rejoins as a replica of the new primary
    cluster.apply(spec(cluster, VOLUME, ["a", "b", "c"], new_primary, mode=pb.SYNCHRONOUS,
                              write_quorum=2, epoch=2), nodes=[new_primary, *(
                                  n for n in ("b", "c") if n != new_primary)])
    cluster.agents["a"].start()
    wait_until(lambda: cluster.agents["a"].volume(VOLUME).epoch == 2, timeout=120,
               what="the old primary follows epoch 2")
    assert cluster.agents["a"].volume(VOLUME).role == "replica"


def test_fsync_journal_records_are_replayed_by_the_promoted_replica(
        cluster: AgentCluster) -> None:
    """Appends to an existing file change only data: their fsyncs ship journal records, not
    snapshots. With the snapshot loop paused, the replicas' newest snapshot lacks them; the
    primary dies, and the promoted replica replays its journal: nothing acknowledged is lost."""
    if on_ext4(cluster):
        pytest.skip("the fsync journal is for volumes that replicate by btrfs snapshots")
    paused = spec(cluster, VOLUME, ["a", "b", "c"], "a", mode=pb.SYNCHRONOUS, write_quorum=2)
    paused.policy.paused = True
    cluster.apply(paused)
    mount = attach(cluster, "a")
    write_record(mount, 0)  # creates the file: a namespace change, committed by a snapshot
    acked = [0]
    for i in range(1, 60):
        write_record(mount, i)
        acked.append(i)
    journaled = {n: cluster.agents[n].volume(VOLUME).journal_records for n in ("b", "c")}
    assert max(journaled.values()) >= 59, journaled  # one record per fsync, or more (close)
    metrics = urllib.request.urlopen(cluster.metrics_url("a"), timeout=10).read()
    assert f'sharedsync_journal_records_total{{volume="{VOLUME}"}}'.encode() in metrics
    new_primary = newest_replica(cluster, ("b", "c"))
    in_snapshot = records_in(replicated(cluster, new_primary))
    assert len(in_snapshot) < len(acked), "the snapshot already held everything"
    cluster.agents["a"].kill()
    cluster.agents[new_primary].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2))
    check_all(acked, cluster.agents[new_primary].live(VOLUME), f"promoted {new_primary}")
    # the old primary comes back (reclaiming the mount its death left) and follows epoch 2
    cluster.agents["a"].start()
    wait_until(lambda: cluster.agents["a"].volume(VOLUME).epoch == 2, timeout=120,
               what="the old primary follows epoch 2")


def test_throttle_holds_writers_back_while_a_replica_lags(cluster: AgentCluster) -> None:
    throttled = spec(cluster, VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=0.5,
                     bandwidth=1 << 20)
    throttled.policy.on_lag_exceeded = pb.THROTTLE
    cluster.apply(throttled)
    mount = attach(cluster, "a")
    # 1 MiB files at a 1 MiB/s cap: the replica soon falls more than maxLag behind, and from
    # then on each close waits until it is back within maxLag
    import time

    for i in range(12):
        with open(mount / f"part-{i}.bin", "wb") as out:
            out.write(os.urandom(1 << 20))
        time.sleep(0.1)  # a writer that keeps going, faster than replication
    status = cluster.agents["a"].volume(VOLUME)
    peer = next(r for r in status.replicas if r.node == "b")
    assert peer.lag_seconds <= 0.5 + 1.0  # caught up to (about) maxLag when close returned
    with urllib.request.urlopen(cluster.metrics_url("a"), timeout=10) as response:
        text = response.read().decode()
    assert f'sharedsync_writer_throttled_total{{volume="{VOLUME}"}}' in text
    cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))


def write_big(path: Path, size: int, chunk: bytes) -> str:
    """Write ``size`` bytes in 1 MiB writes, fsync every 16 MiB (each must reach the quorum);
    return the content's digest."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for written in range(0, size, len(chunk)):
            block = chunk[:min(len(chunk), size - written)]
            block = written.to_bytes(8, "little") + block[8:]  # no two blocks alike
            out.write(block)
            digest.update(block)
            if (written + len(block)) % (16 << 20) == 0:
                out.flush()
                os.fsync(out.fileno())
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def test_rewriting_most_of_the_volume_keeps_every_replica(cluster: AgentCluster) -> None:
    """Delete a file of 60% of the volume and write another as large: for a while the
    replicas' snapshots still hold the old one, which leaves too little space for the new one
    until the pruned snapshots' extents are really freed. Every fsync must still reach the
    quorum, and no replica may be thrown away and rebuilt from scratch for lack of space."""
    if on_ext4(cluster):
        pytest.skip("file-level replicas hold no snapshots; a new version of a file is "
                    "written beside the old one, so one file cannot exceed half the volume")
    cluster.apply(spec(cluster, VOLUME, ["a", "b", "c"], "a", mode=pb.SYNCHRONOUS,
                       write_quorum=2, size=256 << 20))
    mount = attach(cluster, "a")
    chunk = os.urandom(1 << 20)
    size = 150 << 20
    write_big(mount / "first.bin", size, chunk)
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=300)
    rebuilds = len(cluster.rebuild_starts("a"))
    (mount / "first.bin").unlink()
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=300)
    # the old file's space comes back on the primary as soon as its last snapshot is pruned
    # (the cleaner is woken), not at btrfs' next periodic run, 30 s later
    live = cluster.agents["a"].live(VOLUME)

    def free_bytes() -> int:
        st = os.statvfs(live)
        return st.f_bavail * st.f_frsize

    wait_until(lambda: free_bytes() >= size, timeout=15, interval=0.2,
               what="the deleted file's space back on the primary")
    digest = write_big(mount / "second.bin", size, chunk)
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=300)
    assert len(cluster.rebuild_starts("a")) == rebuilds, (
        f"a replica was rebuilt from scratch: {cluster.rebuild_starts('a')[rebuilds:]}")
    for node in ("b", "c"):
        held = replicated(cluster, node) / "second.bin"
        assert hashlib.sha256(held.read_bytes()).hexdigest() == digest, f"{node}'s copy differs"
    cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))


def out_of_space_refusals(cluster: AgentCluster, node: str) -> float:
    """Sends ``node`` made that a peer refused for lack of space (its sync error counter)."""
    text = urllib.request.urlopen(cluster.metrics_url(node), timeout=10).read().decode()
    return metric(text, "sharedsync_sync_errors_total", volume=VOLUME,
                  reason="resource_exhausted") or 0.0


def test_an_fsync_whose_answer_was_lost_still_returns(cluster: AgentCluster) -> None:
    """The quorum peer applies an fsync's increment and dies before it answers. Restarted, it
    holds the snapshot, and the fsync, which waited for it, must return (it waited for its
    timeout and failed with EIO: the data was on the quorum all along)."""
    if on_ext4(cluster):
        pytest.skip("the snapshot increment's answer (btrfs replicas)")
    cluster.apply(spec(cluster, VOLUME, ["a", "b"], "a", mode=pb.SYNCHRONOUS, write_quorum=2))
    mount = attach(cluster, "a")
    write_record(mount, 0)
    b = cluster.agents["b"]
    b.stop()
    b.env["SHAREDSYNC_FAILPOINTS"] = "agent.receive.before_answer"
    b.start()
    # the writer is a process of its own: a test thread holding a file of the mount open
    # would hand it to the agent started below, whose exec then closes it (a FUSE flush,
    # which waits for the very commit that waits for b)
    writer = subprocess.Popen([sys.executable, "-c", WRITE_ONE_RECORD, str(mount),
                               str(PER_FILE)], cwd=REPO, stderr=subprocess.PIPE)
    assert b.process is not None
    b.process.wait(timeout=60)  # killed by the failpoint, the increment applied
    del b.env["SHAREDSYNC_FAILPOINTS"]
    b.start()
    _, said = writer.communicate(timeout=120)
    assert writer.returncode == 0, f"the fsync failed: {said.decode(errors='replace')}"
    cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))
    check_all([0, PER_FILE], replicated(cluster, "b"), "b")


def test_a_full_replica_waits_for_space_and_is_never_rebuilt(cluster: AgentCluster) -> None:
    """Fill c's replica behind the agent's back: its receives fail for lack of space. The
    quorum goes on with a and b; c frees what it can, stays Lagging with a message that says
    why, and is never failed and rebuilt from scratch. Once there is room again, it catches
    up from the snapshot it holds."""
    if on_ext4(cluster):
        pytest.skip("this is the snapshot receive's out-of-space path (btrfs replicas)")
    cluster.apply(spec(cluster, VOLUME, ["a", "b", "c"], "a", mode=pb.SYNCHRONOUS,
                       write_quorum=2))
    mount = attach(cluster, "a")
    chunk = os.urandom(1 << 20)
    write_big(mount / "before.bin", 8 << 20, chunk)
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=300)
    rebuilds = len(cluster.rebuild_starts("a"))
    filler = cluster.agents["c"].sync_dir(VOLUME).parent / "filler"
    with open(filler, "wb") as out:
        end = 0
        for step in (16 << 20, 1 << 20, 64 << 10):  # as much as the filesystem will take
            with contextlib.suppress(OSError):
                while True:
                    os.posix_fallocate(out.fileno(), end, step)
                    end += step
        os.fsync(out.fileno())
    try:
        digest = write_big(mount / "after.bin", 48 << 20, chunk)  # quorum: a and b

        def c_status() -> pb.ReplicaStatus:
            return {r.node: r for r in cluster.agents["a"].volume(VOLUME).replicas}["c"]

        def c_waits_for_space() -> bool:
            c = c_status()
            return c.state == pb.LAGGING and "space" in c.message

        wait_until(c_waits_for_space, timeout=60, what="c reported Lagging for lack of space")
        # more refusals than would fail a broken replica (ERRORS_BEFORE_FAILED): still Lagging
        wait_until(lambda: out_of_space_refusals(cluster, "a") > 5, timeout=120,
                   interval=0.5, what="c refusing sends for lack of space, again and again")
        assert c_waits_for_space(), c_status()
        assert len(cluster.rebuild_starts("a")) == rebuilds
    finally:
        filler.unlink()
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=300)
    wait_until(lambda: all(r.state == pb.IN_SYNC
                           for r in cluster.agents["a"].volume(VOLUME).replicas),
               timeout=120, what="c back in sync")
    assert len(cluster.rebuild_starts("a")) == rebuilds, "c was rebuilt from scratch"
    held = replicated(cluster, "c") / "after.bin"
    assert hashlib.sha256(held.read_bytes()).hexdigest() == digest
    cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))


def test_the_trailing_replica_is_sent_the_recorded_increment(cluster: AgentCluster) -> None:
    """Quorum 2 of 3: each fsync's increment goes to one peer first, and the trailing one is
    sent the recording of that stream (no btrfs send of its own). Both end with the same
    snapshots, byte for byte."""
    if on_ext4(cluster):
        pytest.skip("recorded increments are btrfs snapshot streams")
    cluster.apply(spec(cluster, VOLUME, ["a", "b", "c"], "a", mode=pb.SYNCHRONOUS,
                       write_quorum=2))
    mount = attach(cluster, "a")
    for i in range(12):
        with open(mount / f"file-{i:02d}.bin", "wb") as out:  # a new file: a snapshot commit
            out.write(os.urandom(2 << 20))
            out.flush()
            os.fsync(out.fileno())
    newest = cluster.agents["a"].volume(VOLUME).last_snapshot

    def everyone_holds_the_newest() -> bool:
        replicas = cluster.agents["a"].volume(VOLUME).replicas
        return all((r.last_received.epoch, r.last_received.seq) >= (newest.epoch, newest.seq)
                   for r in replicas if r.node in ("b", "c"))

    wait_until(everyone_holds_the_newest, timeout=120, what="b and c hold the newest snapshot")
    text = urllib.request.urlopen(cluster.metrics_url("a"), timeout=10).read().decode()
    shared = metric(text, "sharedsync_shared_streams_total", volume=VOLUME)
    assert shared is not None
    assert shared >= 1, "every trailing send ran a btrfs send of its own"
    digests = {n: tree_digest(replicated(cluster, n)) for n in ("a", "b", "c")}
    assert digests["b"] == digests["a"]
    assert digests["c"] == digests["a"]


def tree_digest(root: Path) -> str:
    """Names and contents of every file under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
