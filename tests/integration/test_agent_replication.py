"""Three real agents in three network namespaces, mutual TLS through fault proxies.

Data is written into the primary's live subvolume and checked, file by file, on the peers'
replicas; faults are real (SIGKILL, partitions at the proxies). No timing is asserted: waits are
bounded, and what is checked is what data ended where.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from replication_agent.proto import agent_pb2 as pb
from sharedsync.storage import btrfs
from sharedsync.storage.leftovers import leftovers_under
from tests.integration.agent_harness import (
    AgentCluster,
    errno_of,
    started_cluster,
    tree_digest,
    volume_spec,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

VOLUME = "vol-" + "a1" * 12


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentCluster]:
    yield from started_cluster(tmp_path_factory, "agents")


def write_files(root: Path, count: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    (root / "dir").mkdir(exist_ok=True)
    for i in range(count):
        path = root / "dir" / f"file-{i:04d}.bin"
        with open(path, "wb") as out:
            out.write(rng.randbytes(size))
            out.flush()
            os.fsync(out.fileno())


def newest_snapshot(cluster: AgentCluster, node: str) -> Path | None:
    sync_dir = cluster.agents[node].sync_dir(VOLUME)
    names = sorted(p.name for p in sync_dir.iterdir() if p.name.startswith("e")) \
        if sync_dir.is_dir() else []
    return sync_dir / names[-1] if names else None


def in_sync(cluster: AgentCluster, primary: str, peers: list[str]) -> bool:
    """The primary counts every peer InSync at its newest snapshot, and each peer's newest
    snapshot holds what the primary's live volume holds now.

    The states alone do not say the peers hold what was just written: a new volume's first
    snapshot is taken at once, so its peers can be InSync at a snapshot of the empty volume
    taken a moment before the test wrote its files."""
    status = cluster.agents[primary].volume(VOLUME)
    newest = status.last_snapshot
    others = [r for r in status.replicas if r.node in peers]
    if not others or not all(
            r.state == pb.IN_SYNC and r.last_received.seq == newest.seq and
            r.last_received.epoch == newest.epoch for r in others):
        return False
    expected = tree_digest(cluster.agents[primary].live(VOLUME))
    held = [newest_snapshot(cluster, peer) for peer in peers]
    return all(snapshot is not None and tree_digest(snapshot) == expected for snapshot in held)


def peer_states(cluster: AgentCluster, primary: str, volume: str = VOLUME) -> dict[str, int]:
    """Each peer's replica state as ``primary`` shows it."""
    return {r.node: r.state for r in cluster.agents[primary].volume(volume).replicas}


def assert_replicas_match(cluster: AgentCluster, primary: str, peers: list[str]) -> None:
    expected = tree_digest(cluster.agents[primary].live(VOLUME))
    for peer in peers:
        snapshot = newest_snapshot(cluster, peer)
        assert snapshot is not None, f"{peer} holds no snapshot"
        assert tree_digest(snapshot) == expected, f"{peer}'s replica differs from the primary"


def test_asynchronous_replication_converges(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    live = cluster.agents["a"].live(VOLUME)
    write_files(live, 20, 64 << 10, seed=1)
    wait_until(lambda: in_sync(cluster, "a", ["b", "c"]), timeout=60, what="replicas in sync")
    assert_replicas_match(cluster, "a", ["b", "c"])
    # a second round of changes travels as an increment
    write_files(live, 5, 64 << 10, seed=2)
    (live / "dir" / "file-0019.bin").unlink()
    wait_until(lambda: in_sync(cluster, "a", ["b", "c"]), timeout=60,
               what="second round in sync")
    assert_replicas_match(cluster, "a", ["b", "c"])
    status = cluster.agents["a"].volume(VOLUME)
    assert status.bytes_shipped > 0
    assert status.role == "primary"


def test_partitioned_replica_catches_up_after_heal(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    live = cluster.agents["a"].live(VOLUME)
    write_files(live, 4, 32 << 10, seed=3)
    wait_until(lambda: in_sync(cluster, "a", ["b", "c"]), timeout=60, what="initial sync")
    before = cluster.agents["a"].volume(VOLUME).last_snapshot.seq
    cluster.partition("c")
    write_files(live, 8, 32 << 10, seed=4)
    wait_until(lambda: cluster.agents["a"].volume(VOLUME).last_snapshot.seq > before and
               in_sync(cluster, "a", ["b"]), timeout=60, what="b in sync with the new writes")
    assert not in_sync(cluster, "a", ["c"])
    cluster.heal("c")
    wait_until(lambda: in_sync(cluster, "a", ["b", "c"]), timeout=90, what="c caught up")
    assert_replicas_match(cluster, "a", ["b", "c"])


def test_a_stale_replica_that_answers_again_is_in_sync_without_new_writes(
        cluster: AgentCluster) -> None:
    """Cut off for longer than STALE_AFTER_SECONDS, a replica is Stale. Once it answers and
    holds the newest snapshot it is InSync, with no further write needed: the push that
    succeeded after the outage was counted Stale again, and nothing else lifted it (a
    Synchronous volume whose fsyncs ship journal records may take no snapshot for hours)."""
    from replication_agent.volume import STALE_AFTER_SECONDS

    cluster.apply(volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    live = cluster.agents["a"].live(VOLUME)
    write_files(live, 2, 32 << 10, seed=61)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="b holds a copy")
    cluster.partition("b")
    write_files(live, 2, 32 << 10, seed=62)  # a snapshot b cannot receive yet
    wait_until(lambda: peer_states(cluster, "a").get("b") == pb.STALE,
               timeout=STALE_AFTER_SECONDS + 60, what="b Stale")
    cluster.heal("b")  # nothing is written from here on
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60,
               what="b InSync once it holds the newest snapshot")


def test_scheduled_mode_ships_on_sync_now_only(cluster: AgentCluster) -> None:
    # a schedule that never fires during the test: once a year
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.SCHEDULED, schedule="0 0 1 1 *")
    cluster.apply(spec)
    live = cluster.agents["a"].live(VOLUME)
    write_files(live, 3, 16 << 10, seed=5)
    status = cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME))
    assert status.last_snapshot.seq >= 1
    assert_replicas_match(cluster, "a", ["b"])


def test_a_replica_placed_just_now_is_rebuilding_until_it_holds_a_copy(
        cluster: AgentCluster) -> None:
    """A replica of a new volume, or one added to a volume, holds nothing: it must not count as
    healthy (Lagging or InSync) before its full copy arrived, even after the primary's agent
    restarted. Shown Lagging, it made the operator call the volume Ready, and CreateVolume
    return, before any replica had the data, and it could have been promoted empty."""
    def states(volume: str) -> dict[str, int]:
        return peer_states(cluster, "a", volume)

    def state_of(node: str) -> int | None:
        return states(VOLUME).get(node)

    healthy = (pb.IN_SYNC, pb.LAGGING)
    cluster.partition("c")  # c's copy cannot arrive
    cluster.apply(volume_spec(VOLUME, ["a", "b", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    write_files(cluster.agents["a"].live(VOLUME), 2, 32 << 10, seed=41)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="b holds a copy")
    assert state_of("c") not in healthy, f"c is counted healthy: state {state_of('c')}"
    # the same after the primary's agent restarted (an upgrade, say): it remembers
    cluster.agents["a"].stop()
    cluster.agents["a"].start()
    wait_until(lambda: state_of("c") is not None and state_of("b") == pb.IN_SYNC, timeout=60,
               what="the restarted a tracks b and c")
    assert state_of("c") not in healthy, f"c is counted healthy: state {state_of('c')}"
    cluster.heal("c")
    wait_until(lambda: in_sync(cluster, "a", ["b", "c"]), timeout=120, what="c holds a copy")

    # added to a volume that has data: the same until its copy arrived
    other = "vol-" + "a2" * 12
    cluster.apply(volume_spec(other, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    write_files(cluster.agents["a"].live(other), 2, 32 << 10, seed=42)

    def synced(nodes: list[str]) -> bool:
        return all(states(other).get(n) == pb.IN_SYNC for n in nodes)
    wait_until(lambda: synced(["b"]), timeout=60, what="b holds a copy of the second volume")
    cluster.partition("c")
    cluster.apply(volume_spec(other, ["a", "b", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    wait_until(lambda: "c" in states(other), timeout=30, what="a tracks c")
    for _ in range(5):
        now = states(other)
        assert now["c"] not in healthy, f"c is counted healthy: {now}"
        time.sleep(0.5)
    cluster.heal("c")
    wait_until(lambda: synced(["b", "c"]), timeout=120, what="c holds a copy of the second")

    # a Scheduled volume whose schedule is far off: its replica gets a first copy all the same
    # (without one it stayed Rebuilding, and the volume not Ready, until the schedule fired)
    scheduled = "vol-" + "a3" * 12
    cluster.apply(volume_spec(scheduled, ["a", "b"], "a", mode=pb.SCHEDULED,
                              schedule="0 0 1 1 *"))
    wait_until(lambda: states(scheduled).get("b") == pb.IN_SYNC, timeout=60,
               what="b holds a first copy of the Scheduled volume")


def test_a_failed_replica_stays_failed_across_a_restart_of_the_primary(
        cluster: AgentCluster) -> None:
    """A replica whose receives keep failing is Failed, and only a full rebuild brings it
    back. The primary remembers that across its own restarts: in memory only, the replica
    came back Lagging (healthy, so promotable) on the snapshots from before its failure."""
    import subprocess

    def state_of(node: str) -> int | None:
        return peer_states(cluster, "a").get(node)

    def rebuilds_of_b() -> int:
        return sum(1 for d in cluster.rebuild_starts("a") if d.get("peer") == "b")

    cluster.apply(volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    live = cluster.agents["a"].live(VOLUME)
    write_files(live, 3, 32 << 10, seed=51)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="b holds a copy")
    # b can no longer take a snapshot in (even root cannot add to an immutable directory):
    # every receive fails on b, which is neither the network nor a lack of space
    sync_dir = cluster.agents["b"].sync_dir(VOLUME)
    subprocess.run(["chattr", "+i", str(sync_dir)], check=True)
    try:
        write_files(live, 2, 32 << 10, seed=52)
        wait_until(lambda: state_of("b") == pb.FAILED, timeout=120, interval=0.2,
                   what="b Failed after its receives failed again and again")
        cluster.agents["a"].stop()
        cluster.agents["a"].start()
        wait_until(lambda: state_of("b") is not None, timeout=30, what="the restarted a tracks b")
        for _ in range(8):
            now = state_of("b")
            assert now not in (pb.IN_SYNC, pb.LAGGING), f"failed b counted healthy: {now}"
            time.sleep(0.5)
    finally:
        subprocess.run(["chattr", "-i", str(sync_dir)], check=True)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=120, what="b rebuilt")
    rebuilds = rebuilds_of_b()
    # rebuilt, b is a replica like any: a later restart of a starts no rebuild of it
    cluster.agents["a"].stop()
    cluster.agents["a"].start()
    write_files(live, 1, 32 << 10, seed=53)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="b follows a again")
    assert rebuilds_of_b() == rebuilds, "a rebuilt b again after b's rebuild had finished"


def test_killed_replica_agent_resumes_and_converges(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                       bandwidth=4 << 20)
    cluster.apply(spec)
    live = cluster.agents["a"].live(VOLUME)
    write_files(live, 24, 1 << 20, seed=6)  # 24 MiB at 4 MiB/s: several seconds of stream
    wait_until(lambda: cluster.agents["b"].volume(VOLUME).bytes_received > (2 << 20),
               timeout=60, what="the full stream under way")
    cluster.agents["b"].kill()  # SIGKILL mid-receive
    cluster.agents["b"].start()
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=120, what="b rebuilt")
    assert_replicas_match(cluster, "a", ["b"])


@pytest.mark.parametrize("failpoint", ["agent.receive.before_answer",
                                       "agent.receive.before_spool_clear"])
def test_a_rebuild_whose_answer_was_lost_still_ends(cluster: AgentCluster,
                                                    failpoint: str) -> None:
    """The peer applies a rebuild's whole stream and dies before it answers (before it
    deleted the stream's spool, too). Restarted, it holds the snapshot: the rebuild is over,
    and the replica must be counted in sync (it stayed Rebuilding for good, never to be
    promoted), with no spool left (one can be the size of the volume). Nothing is written
    afterwards, so no later increment can hide the difference."""
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec, nodes=["a"])
    write_files(cluster.agents["a"].live(VOLUME), 4, 256 << 10, seed=31)
    wait_until(lambda: cluster.agents["a"].volume(VOLUME).last_snapshot.seq > 0, timeout=30,
               what="a snapshot of what was written")
    b = cluster.agents["b"]
    b.stop()
    b.env["SHAREDSYNC_FAILPOINTS"] = failpoint
    b.start()
    cluster.apply(spec, nodes=["b"])
    assert b.process is not None
    b.process.wait(timeout=60)  # killed by the failpoint, the stream applied and durable
    del b.env["SHAREDSYNC_FAILPOINTS"]
    b.start()
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="b counted in sync")
    assert_replicas_match(cluster, "a", ["b"])
    from replication_agent.audit import read_records
    finished = [r.detail_map for r in read_records(cluster.audit_files("a"))
                if r.kind == "rebuild" and r.detail_map.get("phase") == "finished"]
    assert finished, "the rebuild never finished"
    assert finished[-1].get("answer") == "lost"
    spool = b.data_dir / "agent" / "spool"
    assert not spool.is_dir() or list(spool.iterdir()) == []


def abandoned(method: Callable[..., object], request: object, timeout: float) -> None:
    """Make a call whose deadline may expire before the agent is done (any other error fails)."""
    try:
        method(request, timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise


def test_calls_their_callers_abandon_still_finish(cluster: AgentCluster) -> None:
    """An operator killed mid-reconcile, or a deadline that expires, cancels the agent's
    handler; the change must still end whole: every replica asked for is served (the
    caller's retry finds it), and a shutdown leaves no mount or loop device behind."""
    agent = cluster.agents["a"]
    ids = [f"vol-{i:02x}" + "c7" * 11 for i in range(8)]
    channel, stub = agent.stub()
    with channel:
        for i, volume_id in enumerate(ids):
            # cut short at different steps of a start (the request itself always arrives
            # in time: a handler never called has nothing to finish)
            abandoned(stub.ApplyVolume, pb.ApplyVolumeRequest(
                spec=volume_spec(volume_id, ["a"], "a")), timeout=0.1 + 0.05 * i)
        wait_until(lambda: {v.volume_id for v in agent.status().volumes} >= set(ids),
                   timeout=60, what="every abandoned ApplyVolume finished")
        # abandoned removals finish too
        for volume_id in ids[:3]:
            abandoned(stub.RemoveVolume, pb.RemoveVolumeRequest(volume_id=volume_id),
                      timeout=0.1)
        wait_until(lambda: not {v.volume_id for v in agent.status().volumes} & set(ids[:3]),
                   timeout=60, what="every abandoned RemoveVolume finished")
    agent.stop()
    assert leftovers_under(agent.workdir) == []
    agent.start()  # the rest are reopened where they were
    assert {v.volume_id for v in agent.status().volumes} >= set(ids[3:])


def test_failover_promotes_a_replica_and_fences_the_old_primary(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    live_a = cluster.agents["a"].live(VOLUME)
    write_files(live_a, 6, 32 << 10, seed=7)
    wait_until(lambda: in_sync(cluster, "a", ["b", "c"]), timeout=60, what="initial sync")
    expected = tree_digest(live_a)
    cluster.agents["a"].kill()  # the primary dies
    promoted = cluster.agents["b"].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2))
    assert promoted.role == "primary"
    assert promoted.epoch == 2
    assert tree_digest(cluster.agents["b"].live(VOLUME)) == expected
    # the new primary serves writes and replicates them to c
    spec2 = volume_spec(VOLUME, ["a", "b", "c"], "b", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                        epoch=2)
    cluster.apply(spec2, nodes=["b", "c"])
    write_files(cluster.agents["b"].live(VOLUME), 3, 32 << 10, seed=8)
    wait_until(lambda: in_sync(cluster, "b", ["c"]), timeout=60, what="c follows b")
    # the old primary comes back believing it is primary at epoch 1: it is fenced, and
    # rejoins as a replica that catches up from b
    cluster.agents["a"].start()
    wait_until(lambda: in_sync(cluster, "b", ["a", "c"]), timeout=120, what="a rejoined")
    status_a = cluster.agents["a"].volume(VOLUME)
    assert status_a.epoch == 2
    assert status_a.role == "replica"
    assert_replicas_match(cluster, "b", ["a", "c"])


def test_a_promoted_replica_reports_a_true_lag_for_a_new_peer(cluster: AgentCluster) -> None:
    """The snapshots a promoted replica had received carry the time the old primary took them:
    a new peer that holds none of them lags by minutes at most, not by decades (which would
    mark it Lagging, and throttle an Asynchronous volume's writers, right after failover)."""
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    write_files(cluster.agents["a"].live(VOLUME), 3, 32 << 10, seed=21)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="initial sync")
    started = time.time()
    cluster.agents["a"].kill()
    cluster.agents["b"].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2))
    cluster.proxies[("b", "c")].client.partition()  # c cannot receive anything yet
    cluster.apply(volume_spec(VOLUME, ["b", "c"], "b", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                              epoch=2), nodes=["b", "c"])

    def lag_of_c() -> float | None:
        found = [r for r in cluster.agents["b"].volume(VOLUME).replicas if r.node == "c"]
        return found[0].lag_seconds if found else None
    wait_until(lambda: lag_of_c() is not None, timeout=60, what="b tracks c")
    lag = lag_of_c()
    assert lag is not None
    assert lag <= time.time() - started + 120, lag
    cluster.proxies[("b", "c")].client.heal()
    wait_until(lambda: in_sync(cluster, "b", ["c"]), timeout=120, what="c rebuilt from b")
    cluster.agents["a"].start()  # a stopped agent takes its mounts down; a killed one cannot


def test_a_fenced_old_primary_can_be_promoted_again(cluster: AgentCluster) -> None:
    """Two failovers in a row (the operator saw a's Lease lapse, then b's): a was fenced
    (its live made read-only) and must still take the primary role back, writable."""
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    live_a = cluster.agents["a"].live(VOLUME)
    write_files(live_a, 3, 32 << 10, seed=11)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="initial sync")
    # b is promoted while a is alive and cannot hear from b (b -> a cut): a's next push is
    # refused by b, and a fences itself (its live becomes read-only)
    cluster.proxies[("b", "a")].client.partition()
    cluster.agents["b"].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2))
    write_files(live_a, 1, 32 << 10, seed=12)
    # the write path refuses writes from the moment a is fenced; its live is made read-only
    # right after (a btrfs transaction, off the event loop)
    wait_until(lambda: cluster.agents["a"].volume(VOLUME).fenced
               and btrfs.subvolume_info(live_a).read_only, timeout=60,
               what="a fenced, its live read-only")
    cluster.proxies[("b", "a")].client.heal()
    # then a learns of epoch 2 and follows b as a replica, as the operator tells it to
    cluster.apply(volume_spec(VOLUME, ["a", "b"], "b", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                              epoch=2))
    wait_until(lambda: cluster.agents["a"].volume(VOLUME).epoch == 2
               and cluster.agents["a"].volume(VOLUME).role == "replica", timeout=60,
               what="a follows b")
    write_files(cluster.agents["b"].live(VOLUME), 1, 32 << 10, seed=14)
    wait_until(lambda: in_sync(cluster, "b", ["a"]), timeout=60, what="a receives from b")
    # now a is promoted back at a newer epoch
    promoted = cluster.agents["a"].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=3))
    assert promoted.role == "primary"
    assert promoted.epoch == 3
    assert not promoted.fenced
    live_a = cluster.agents["a"].live(VOLUME)
    assert not btrfs.subvolume_info(live_a).read_only
    write_files(live_a, 1, 32 << 10, seed=13)  # writable again
    cluster.apply(volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                              epoch=3))
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=120, what="b follows a again")
    assert_replicas_match(cluster, "a", ["b"])


def test_a_pod_on_a_fenced_primary_gets_no_write_acknowledged(cluster: AgentCluster) -> None:
    """What a pod still running on an old primary sees once a newer primary exists (its node
    was cut off, the volume failed over, the pod was not moved): the replica is made
    read-only, which refuses new opens for writing, but not writes through a file the pod
    already holds open (the kernel checks at open); those still land in the set-aside live.
    fsync and close reach the FUSE daemon, though, and fail with EROFS: nothing written after
    the fence is ever acknowledged as durable."""
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    mount = Path(cluster.agents["a"].call("Attach", pb.AttachRequest(volume_id=VOLUME)).path)
    held = os.open(mount / "held-open.log", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(held, b"before the fence\n")
        os.fsync(held)  # acknowledged: a is the primary
        wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="initial sync")
        cluster.proxies[("b", "a")].client.partition()
        cluster.agents["b"].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2))
        (mount / "after.bin").write_bytes(b"x" * 4096)  # a's next push meets epoch 2
        wait_until(lambda: cluster.agents["a"].volume(VOLUME).fenced
                   and btrfs.subvolume_info(cluster.agents["a"].live(VOLUME)).read_only,
                   timeout=60, what="a fenced, its live read-only")
        assert errno_of(lambda: (mount / "new.bin").write_bytes(b"y")) == errno.EROFS
        os.write(held, b"after the fence\n")  # lands (the open came before) ...
        assert errno_of(lambda: os.fsync(held)) == errno.EROFS  # ... but is never acknowledged
        assert errno_of(lambda: os.fdatasync(held)) == errno.EROFS
        # the agent says since when the pods here have lost it (the operator deletes them)
        stranded_at = cluster.agents["a"].volume(VOLUME).consumers_stranded_unix_ns
        assert 0 < stranded_at <= time.time_ns()
    finally:
        with contextlib.suppress(OSError):
            os.close(held)
        cluster.proxies[("b", "a")].client.heal()
        cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))
    # kubelet's unmount after the pods: nobody here has lost it any more
    assert cluster.agents["a"].volume(VOLUME).consumers_stranded_unix_ns == 0


def test_a_switchover_moves_the_primary_of_an_attached_volume(cluster: AgentCluster) -> None:
    """The operator's switchover, step by step: the old primary ships everything, the new one
    is promoted, then the new layout reaches every replica. The old primary, serving a mount
    with a file just written, stops serving it and follows at once (it once stayed half-stopped
    here: its loop missed the cancel that met a wake-up from the unmount, and the ApplyVolume
    that carried the new layout never returned)."""
    cluster.apply(volume_spec(VOLUME, ["a", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    mount = Path(cluster.agents["a"].call("Attach", pb.AttachRequest(volume_id=VOLUME)).path)
    payload = random.Random(31).randbytes(512 << 10)
    with open(mount / "through-fuse.bin", "wb") as out:
        out.write(payload)
        out.flush()
        os.fsync(out.fileno())
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=120)
    cluster.agents["c"].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2))
    cluster.apply(volume_spec(VOLUME, ["a", "c"], "c", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                              epoch=2))
    status_a = cluster.agents["a"].volume(VOLUME)
    assert (status_a.epoch, status_a.role, status_a.primary_node) == (2, "replica", "c")
    assert not os.path.ismount(mount)  # a serves the volume no more
    assert (cluster.agents["c"].live(VOLUME) / "through-fuse.bin").read_bytes() == payload
    # the new primary's writes reach the old one
    write_files(cluster.agents["c"].live(VOLUME), 2, 32 << 10, seed=32)
    cluster.agents["c"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=120)
    assert in_sync(cluster, "c", ["a"])
    assert_replicas_match(cluster, "c", ["a"])


def test_a_handover_waits_until_no_pod_uses_the_primary(cluster: AgentCluster) -> None:
    """Moving the primary to where a pod waits (SyncNow with ``handover``) is refused while
    pods on the primary's node use the volume: the operator decided on a status a few seconds
    old, and moving would fence them. Once agreed, no new pod may attach there."""
    cluster.apply(volume_spec(VOLUME, ["a", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0))
    with pytest.raises(grpc.RpcError) as refused:
        cluster.agents["c"].call("Attach", pb.AttachRequest(volume_id=VOLUME))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert cluster.agents["c"].volume(VOLUME).attach_wanted  # a pod waits on c
    cluster.agents["a"].call("Attach", pb.AttachRequest(volume_id=VOLUME))
    handover = pb.SyncNowRequest(volume_id=VOLUME, handover=True)
    with pytest.raises(grpc.RpcError) as in_use:
        cluster.agents["a"].call("SyncNow", handover, timeout=120)
    assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "in use on a" in (in_use.value.details() or "")
    assert cluster.agents["a"].volume(VOLUME).attached
    cluster.agents["a"].call("Detach", pb.DetachRequest(volume_id=VOLUME))
    cluster.agents["a"].call("SyncNow", handover, timeout=120)
    with pytest.raises(grpc.RpcError) as moving:
        cluster.agents["a"].call("Attach", pb.AttachRequest(volume_id=VOLUME))
    assert moving.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "is moving its primary" in (moving.value.details() or "")
    cluster.agents["c"].call("Promote", pb.PromoteRequest(volume_id=VOLUME, epoch=2))
    cluster.apply(volume_spec(VOLUME, ["a", "c"], "c", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                              epoch=2))
    served = cluster.agents["c"].call("Attach", pb.AttachRequest(volume_id=VOLUME))
    assert os.path.ismount(served.path)
    cluster.agents["c"].call("Detach", pb.DetachRequest(volume_id=VOLUME))


def test_a_handover_waits_for_its_destination_not_for_a_replica_that_is_down(
        cluster: AgentCluster) -> None:
    """After a node died, the pod that used the volume may be rescheduled onto a replica other
    than the one promoted: the primary then moves there (SyncNow with ``handover_to``). The
    dead replica is still in the layout until it is replaced; the handover must not wait for
    it (it waited SYNC_WAIT_SECONDS, 300 s, and then failed, for as long as the node was down),
    only for the destination, which must hold everything before it is promoted."""
    cluster.apply(volume_spec(VOLUME, ["a", "b", "c"], "a", mode=pb.ASYNCHRONOUS,
                              max_lag=1.0))
    write_files(cluster.agents["a"].live(VOLUME), 4, 256 << 10, seed=41)
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=120)
    cluster.agents["b"].kill()
    write_files(cluster.agents["a"].live(VOLUME), 4, 256 << 10, seed=42)  # b misses these
    # waiting for b would take SYNC_WAIT_SECONDS (300 s): the call's deadline fails it first
    status = cluster.agents["a"].call(
        "SyncNow", pb.SyncNowRequest(volume_id=VOLUME, handover=True, handover_to="c"),
        timeout=60)
    held = {r.node: r.last_received for r in status.replicas}
    assert held["c"] == status.last_snapshot
    assert_replicas_match(cluster, "a", ["c"])
    # a destination that holds no replica is refused, not waited for
    with pytest.raises(grpc.RpcError) as unknown:
        cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(
            volume_id=VOLUME, handover=True, handover_to="d"), timeout=60)
    assert unknown.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    cluster.agents["b"].start()  # it reclaims what the killed agent left mounted
    wait_until(lambda: in_sync(cluster, "a", ["b", "c"]), timeout=120, what="b back in sync")


def test_incremental_receive_killed_midway_leaves_previous_snapshot(
        cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    live = cluster.agents["a"].live(VOLUME)
    write_files(live, 4, 64 << 10, seed=9)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="initial sync")
    before = newest_snapshot(cluster, "b")
    assert before is not None
    expected_before = tree_digest(before)
    # a large increment at a capped rate, so that the receiver can be killed in the middle;
    # replication is paused while it is written, so that it travels as ONE increment however
    # slowly a loaded machine writes it
    paused = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                         bandwidth=2 << 20)
    paused.policy.paused = True
    cluster.apply(paused)
    received = cluster.agents["b"].volume(VOLUME).bytes_received
    write_files(live, 20, 1 << 20, seed=10)  # 20 MiB at 2 MiB/s: about ten seconds
    cluster.apply(volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                              bandwidth=2 << 20))
    wait_until(lambda: cluster.agents["b"].volume(VOLUME).bytes_received > received + (4 << 20),
               timeout=60, what="the increment under way")
    cluster.agents["b"].kill()
    # killed midway: the receive left a partial (writable) subvolume beside the previous
    # snapshot, which is intact
    partial = [p for p in before.parent.iterdir()
               if btrfs.is_subvolume(p) and not btrfs.subvolume_info(p).read_only]
    assert partial, "the receive was not interrupted midway"
    assert tree_digest(before) == expected_before
    cluster.agents["b"].start()
    assert all(not p.exists() for p in partial)  # discarded on restart
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=120, what="the increment redone")
    assert_replicas_match(cluster, "a", ["b"])


def test_hostile_streams_from_a_peer_change_nothing_outside_the_replica(
        cluster: AgentCluster, tmp_path: Path) -> None:
    """What a compromised (or broken) primary may push to its replicas, with valid frames.

    A stream is applied by ``btrfs receive``, which joins the paths in it to the replica's
    directory as they are: a file that climbs out with ``../`` must not be written, and must
    leave nothing behind. A header claiming the volume grew past the node's free space must
    not grow the (sparse) image. A stream creating a second subvolume (under a later
    snapshot's name, which a promotion would prefer) must leave neither. The replica takes
    the real primary's streams afterwards."""
    from replication_agent.peers import CHANNEL_OPTIONS, PUSH_METHOD
    from replication_agent.push_wire import encode_frame, request_wire
    from replication_agent.tls import PEER_SERVER_NAME, TlsConfig, channel_credentials
    from sharedsync.core.framing import encode
    from tests.integration.agent_harness import AGENT_PORT
    from tests.send_streams import end, file_with, file_writing_stream, stream, subvol

    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec, nodes=["b"])  # b waits for its first stream from a
    image = cluster.agents["b"].data_dir / "replicas" / "volumes" / VOLUME / "image"
    image_size = image.stat().st_size
    outside = tmp_path / "written-by-a-peer"
    tls = TlsConfig(**{k: Path(v) for k, v in cluster.agents["a"].config["tls"].items()})

    def refusal(stream: bytes, size: int) -> grpc.RpcError:
        header = pb.PushMessage(header=pb.StreamHeader(
            volume_id=VOLUME, epoch=1, sender_node="a", snapshot=pb.SnapshotRef(epoch=1, seq=1),
            kind=pb.BTRFS_SEND, volume_size_bytes=size, volume_kind=spec.kind))
        messages: list[pb.PushMessage | bytes] = [header, *map(encode_frame, encode(stream))]
        with grpc.secure_channel(
                cluster.nodes["b"].endpoint(AGENT_PORT), channel_credentials(tls),
                options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", PEER_SERVER_NAME)],
        ) as channel:
            push = channel.stream_unary(PUSH_METHOD, request_serializer=request_wire,
                                        response_deserializer=pb.PushResult.FromString)
            with pytest.raises(grpc.RpcError) as refused:
                push(iter(messages), timeout=60)
        return refused.value

    climb = "../" * 64 + str(outside).lstrip("/")
    escaping = file_writing_stream("e00000001-s000000000001", climb, b"* * * * * root sh\n")
    refused = refusal(escaping, spec.size_bytes)
    assert refused.code() == grpc.StatusCode.INTERNAL, refused.details()
    details = refused.details() or ""
    assert "btrfs receive failed" in details
    assert "Chroot to" not in details
    assert not outside.exists(), "a peer's stream wrote outside the replica"
    sync_dir = cluster.agents["b"].sync_dir(VOLUME)
    assert [p.name for p in sync_dir.iterdir()] == [], "the refused stream left a subvolume"

    harmless = file_writing_stream("e00000001-s000000000001", "f", b"data")
    for claimed in (8 << 40, 1 << 50, (1 << 63) - 1):  # 8 TiB fits a sparse ext4 file
        refused = refusal(harmless, claimed)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details()
        assert image.stat().st_size == image_size
    assert cluster.agents["b"].volume(VOLUME).size_bytes == spec.size_bytes

    planting = stream(subvol("e00000001-s000000000001"), file_with("f", b"1"),
                      subvol("e00000009-s000000000001"), file_with("g", b"2"), end())
    refused = refusal(planting, spec.size_bytes)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.details()
    assert "second subvolume" in (refused.details() or "")
    assert [p.name for p in sync_dir.iterdir()] == [], "the refused stream left a subvolume"

    # the real primary's streams are still taken
    cluster.apply(spec, nodes=["a"])
    write_files(cluster.agents["a"].live(VOLUME), 3, 64 << 10, seed=21)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="replication after it")
    assert_replicas_match(cluster, "a", ["b"])


def test_full_stream_resumes_from_the_spooled_prefix(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                       bandwidth=4 << 20)
    write_files_later = cluster.agents["a"]
    cluster.apply(spec, nodes=["a"])
    write_files(write_files_later.live(VOLUME), 24, 1 << 20, seed=11)
    cluster.apply(spec, nodes=["b"])  # b joins: it needs the whole volume (a rebuild)
    wait_until(lambda: cluster.agents["b"].volume(VOLUME).bytes_received > (6 << 20),
               timeout=60, what="the rebuild under way")
    cluster.agents["b"].kill()
    cluster.agents["b"].start()
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=120, what="rebuild finished")
    assert_replicas_match(cluster, "a", ["b"])
    rebuilds = cluster.rebuild_starts("a")
    assert any(int(d.get("resume_offset", 0)) > 0 for d in rebuilds), (
        f"the second attempt did not resume: {rebuilds}")


def test_policy_change_applies_live(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    live = cluster.agents["a"].live(VOLUME)
    write_files(live, 2, 16 << 10, seed=12)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="initial sync")
    pid = cluster.agents["a"].process.pid if cluster.agents["a"].process else 0
    cluster.apply(volume_spec(VOLUME, ["a", "b"], "a", mode=pb.SCHEDULED,
                              schedule="0 0 1 1 *", bandwidth=8 << 20))
    status = cluster.agents["a"].volume(VOLUME)
    assert status.mode == pb.SCHEDULED
    assert cluster.agents["a"].process is not None
    assert cluster.agents["a"].process.pid == pid  # no restart
    # Scheduled now: a change waits for the schedule (or sync-now), not for maxLag
    seq = status.last_snapshot.seq
    write_files(live, 2, 16 << 10, seed=13)
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME))
    assert cluster.agents["a"].volume(VOLUME).last_snapshot.seq > seq
    assert_replicas_match(cluster, "a", ["b"])


def test_audit_log_is_an_unbroken_chain_and_detects_edits(cluster: AgentCluster,
                                                          tmp_path: Path) -> None:
    import subprocess
    import sys

    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    write_files(cluster.agents["a"].live(VOLUME), 3, 16 << 10, seed=14)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="sync")
    files = [p for p in cluster.audit_files("a") if p.exists()]

    def verify(paths: list[Path]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "replication_agent", "audit", "verify",
                               *map(str, paths)], capture_output=True, text=True, check=False)

    done = verify(files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok" in done.stdout
    text = files[-1].read_text()
    assert "sync" in text
    tampered = tmp_path / "tampered.log"
    lines = text.splitlines()
    lines[0] = lines[0].replace('"volume"', '"volume" ', 1).replace(VOLUME, "vol-" + "f" * 24)
    tampered.write_text("\n".join(lines) + "\n")
    bad = verify([tampered])
    assert bad.returncode == 1
    assert "FAILED" in bad.stdout


def test_metrics_endpoint_reports_replication(cluster: AgentCluster) -> None:
    import urllib.request

    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    write_files(cluster.agents["a"].live(VOLUME), 2, 64 << 10, seed=15)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="sync")
    with urllib.request.urlopen(cluster.metrics_url("a"), timeout=10) as response:
        text = response.read().decode()
    assert f'sharedsync_replication_bytes_total{{direction="sent",volume="{VOLUME}"}}' in text
    assert f'sharedsync_replica_state{{node="b",state="InSync",volume="{VOLUME}"}} 1.0' in text
    assert "sharedsync_sync_duration_seconds_bucket" in text
    assert f'sharedsync_replication_lag_seconds{{peer="b",volume="{VOLUME}"}}' in text


def _damage(image: Path, pattern: bytes) -> int:
    """Flip bytes in every on-disk copy of every 4 KiB block of ``pattern`` in ``image``."""
    import mmap

    damaged = 0
    os.sync()  # what btrfs still holds in memory reaches the image first
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as mem:
        for block in range(0, len(pattern), 4096):
            needle, start = pattern[block:block + 4096], 0
            while (at := mem.find(needle, start)) != -1:
                mem[at + 100:at + 108] = bytes(b ^ 0xFF for b in mem[at + 100:at + 108])
                damaged += 1
                start = at + 1
        mem.flush()
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return damaged


def _image(cluster: AgentCluster, node: str) -> Path:
    return cluster.agents[node].data_dir / "replicas" / "volumes" / VOLUME / "image"


def test_scrub_on_a_damaged_replica_rebuilds_it(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    pattern = random.Random(16).randbytes(64 << 10)
    (cluster.agents["a"].live(VOLUME) / "victim").write_bytes(pattern)
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="sync")
    assert _damage(_image(cluster, "b"), pattern) >= 16
    result = cluster.agents["b"].call("Scrub", pb.ScrubRequest(volume_id=VOLUME))
    assert result.errors > 0
    assert result.resync_requested
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=120,
               what="the damaged replica rebuilt")
    snapshot = newest_snapshot(cluster, "b")
    assert snapshot is not None
    assert (snapshot / "victim").read_bytes() == pattern
    assert cluster.agents["b"].call("Scrub", pb.ScrubRequest(volume_id=VOLUME)).errors == 0


def test_scrub_on_a_damaged_primary_repairs_files_from_a_replica(cluster: AgentCluster) -> None:
    spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0)
    cluster.apply(spec)
    live = cluster.agents["a"].live(VOLUME)
    pattern = random.Random(17).randbytes(64 << 10)
    (live / "victim").write_bytes(pattern)
    (live / "bystander").write_bytes(b"untouched")
    wait_until(lambda: in_sync(cluster, "a", ["b"]), timeout=60, what="sync")
    assert _damage(_image(cluster, "a"), pattern) >= 16
    with pytest.raises(OSError, match="Input/output error"):
        (live / "victim").read_bytes()
    result = cluster.agents["a"].call("Scrub", pb.ScrubRequest(volume_id=VOLUME))
    assert result.errors > 0
    assert list(result.repaired_files) == ["victim"]
    assert (live / "victim").read_bytes() == pattern
    assert (live / "bystander").read_bytes() == b"untouched"
