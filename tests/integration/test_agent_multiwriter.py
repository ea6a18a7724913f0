"""Multi-writer (ReadWriteMany) volumes: three real agents, every replica writable.

The agents run in three network namespaces and talk mutual TLS through fault proxies, as in
test_agent_replication.py. Files are written straight into each node's live directory (what a
pod's bind mount writes to) and compared, content and metadata, across the nodes; conflicts are
made for real by cutting a node off, writing the same file on both sides and healing. Waits are
bounded, and what is checked is which data ended where, never how fast.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import blake3
import grpc
import pytest

from replication_agent.audit import read_records
from replication_agent.proto import agent_pb2 as pb
from sharedsync.core.chunk_delta import CHUNK_BYTES
from sharedsync.core.file_merge import TEMP_PREFIX
from sharedsync.core.version_vectors import conflict_name
from tests.integration.agent_harness import (
    STORE_FILESYSTEMS,
    AgentCluster,
    started_cluster,
    volume_spec,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(600)]

VOLUME = "vol-" + "4d" * 12
PLAIN = "vol-" + "4e" * 12
NODES = ["a", "b", "c"]


@pytest.fixture(params=STORE_FILESYSTEMS)
def cluster(tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[AgentCluster]:
    """Three agents on btrfs, or on the ext4 fallback store (the same file-level engine, with
    inotify instead of btrfs generations telling it when to scan)."""
    yield from started_cluster(tmp_path_factory, "multiwriter", request.param)


def mw_spec(*, resolution: pb.ConflictResolution.ValueType = pb.LAST_WRITER_WINS,
            max_lag: float = 1.0, bandwidth: int = 0, paused: bool = False,
            primary: str = "a") -> pb.VolumeSpec:
    spec = volume_spec(VOLUME, NODES, primary, mode=pb.ASYNCHRONOUS, max_lag=max_lag,
                       bandwidth=bandwidth)
    spec.multi_writer = True
    spec.policy.conflict_resolution = resolution
    spec.policy.paused = paused
    return spec


def live(cluster: AgentCluster, node: str) -> Path:
    return cluster.agents[node].live(VOLUME)


def write(path: Path, data: bytes, *, mtime_s: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    if mtime_s is not None:
        os.utime(path, (mtime_s, mtime_s))


def files(root: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (content sha256 or symlink target, permission bits) of every file and
    symlink; our own temporary files must never be visible here."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            assert not name.startswith(TEMP_PREFIX), f"temporary file left: {rel}"
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link:" + os.readlink(path), 0)
            else:
                found[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                              stat.S_IMODE(st.st_mode))
    return found


def directories(root: Path) -> dict[str, int]:
    """Relative path -> permission bits of every directory below ``root``."""
    return {str(Path(folder, name).relative_to(root)):
            stat.S_IMODE(Path(folder, name).lstat().st_mode)
            for folder, names, _ in os.walk(root) for name in names}


def same_everywhere(cluster: AgentCluster, nodes: list[str] = NODES) -> bool:
    """Every node holds the same files and the same directories (empty ones too)."""
    trees = [(files(live(cluster, n)), directories(live(cluster, n))) for n in nodes]
    return all(tree == trees[0] for tree in trees[1:])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def conflict_records(cluster: AgentCluster, node: str) -> list[dict[str, str]]:
    return [{k: str(v) for k, v in r.detail_map.items()}
            for r in read_records([p for p in cluster.audit_files(node) if p.exists()])
            if r.kind == "conflict" and r.volume == VOLUME]


def test_writes_and_deletes_on_every_node_reach_every_node(cluster: AgentCluster) -> None:
    cluster.apply(mw_spec())
    rng = random.Random(1)
    expected: dict[str, bytes] = {}
    for node in NODES:
        for i in range(5):
            rel = f"{node}/dir-{i % 2}/file-{i}.bin"
            expected[rel] = rng.randbytes(rng.randint(0, 300_000))
            write(live(cluster, node) / rel, expected[rel])
    (live(cluster, "a") / "shared-link").symlink_to("a/dir-0/file-0.bin")
    os.chmod(live(cluster, "c") / "c/dir-1/file-1.bin", 0o600)
    wait_until(lambda: same_everywhere(cluster) and len(files(live(cluster, "b"))) == 16,
               timeout=120, what="every node's files on every node")
    tree = files(live(cluster, "c"))
    assert {rel: digest for rel, (digest, _) in tree.items() if rel != "shared-link"} == \
        {rel: sha(data) for rel, data in expected.items()}
    assert tree["shared-link"] == ("link:a/dir-0/file-0.bin", 0)
    assert tree["c/dir-1/file-1.bin"][1] == 0o600
    # deletions and overwrites travel too, from any node
    (live(cluster, "b") / "a/dir-0/file-0.bin").unlink()
    write(live(cluster, "c") / "b/dir-1/file-1.bin", b"rewritten on c")
    wait_until(lambda: same_everywhere(cluster)
               and "a/dir-0/file-0.bin" not in files(live(cluster, "a"))
               and files(live(cluster, "a")).get("b/dir-1/file-1.bin", ("",))[0]
               == sha(b"rewritten on c"), timeout=120, what="the delete and the overwrite")
    status = cluster.agents["b"].volume(VOLUME)
    assert status.multi_writer
    assert status.store_filesystem == cluster.agents["b"].config["storeFilesystem"]
    assert status.role == "replica"
    assert status.conflicts == 0
    assert cluster.agents["a"].volume(VOLUME).role == "primary"


def test_directories_travel_even_empty_and_so_does_their_removal(
        cluster: AgentCluster) -> None:
    cluster.apply(mw_spec())
    root_a = live(cluster, "a")
    (root_a / "empty" / "inner").mkdir(parents=True)
    os.chmod(root_a / "empty", 0o750)
    wait_until(lambda: same_everywhere(cluster)
               and "empty/inner" in directories(live(cluster, "c")),
               timeout=120, what="the empty directories on every node")
    assert directories(live(cluster, "b"))["empty"] == 0o750
    os.chmod(live(cluster, "b") / "empty", 0o705)
    wait_until(lambda: same_everywhere(cluster)
               and directories(live(cluster, "a"))["empty"] == 0o705,
               timeout=120, what="the chmod from b everywhere")
    # a tree removed on one node is removed on every node, files first
    write(root_a / "tree" / "sub" / "f.bin", b"in a tree")
    wait_until(lambda: same_everywhere(cluster)
               and "tree/sub/f.bin" in files(live(cluster, "c")),
               timeout=120, what="the tree everywhere")
    shutil.rmtree(live(cluster, "c") / "tree")
    (live(cluster, "c") / "empty" / "inner").rmdir()
    wait_until(lambda: same_everywhere(cluster) and set(directories(root_a)) == {"empty"},
               timeout=120, what="the removals everywhere")
    assert files(root_a) == {}
    assert all(cluster.agents[n].volume(VOLUME).conflicts == 0 for n in NODES)


def test_a_directory_removed_while_written_elsewhere_stays_with_what_was_written(
        cluster: AgentCluster) -> None:
    """The removal of ``keep`` (with its old file) on a cut-off node meets a new file in it
    on another node: the old file goes, the directory and the new file stay, everywhere."""
    cluster.apply(mw_spec())
    write(live(cluster, "a") / "keep" / "old.txt", b"old")
    wait_until(lambda: same_everywhere(cluster) and "keep/old.txt" in files(live(cluster, "c")),
               timeout=120, what="keep/old.txt everywhere")
    cluster.partition("a")
    shutil.rmtree(live(cluster, "a") / "keep")
    write(live(cluster, "b") / "keep" / "new.txt", b"written on b meanwhile")
    wait_until(lambda: "keep/new.txt" in files(live(cluster, "c")), timeout=120,
               what="b's new file on c")
    cluster.heal("a")
    wait_until(lambda: same_everywhere(cluster)
               and set(files(live(cluster, "a"))) == {"keep/new.txt"},
               timeout=120, what="keep/ with only the new file everywhere")
    assert set(directories(live(cluster, "a"))) == {"keep"}
    assert (live(cluster, "a") / "keep" / "new.txt").read_bytes() == b"written on b meanwhile"


def tombstones(cluster: AgentCluster, node: str) -> set[str]:
    """The deletions the node's change log still holds (read from its database)."""
    [path] = cluster.agents[node].data_dir.rglob(f"{VOLUME}.sqlite")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {str(row[0]) for row in db.execute("SELECT path FROM files WHERE digest='-'")}


def test_a_deletion_every_node_merged_is_forgotten_and_the_name_used_again(
        cluster: AgentCluster) -> None:
    """Tombstones do not pile up: once every replica merged a deletion, each drops it from its
    change log (here on sync-now; on its own within a minute), and a file made again under
    that name still reaches every node."""
    cluster.apply(mw_spec())
    scratch = live(cluster, "a") / "scratch.tmp"
    write(scratch, b"first")
    wait_until(lambda: same_everywhere(cluster) and "scratch.tmp" in files(live(cluster, "c")),
               timeout=120, what="the file everywhere")
    scratch.unlink()
    # a node removes the file, then commits the tombstone with the rest of its batch: wait for
    # both
    wait_until(lambda: same_everywhere(cluster) and not files(live(cluster, "c"))
               and all("scratch.tmp" in tombstones(cluster, n) for n in NODES),
               timeout=120, what="the deletion everywhere, as a tombstone")

    def forgotten() -> bool:
        for node in NODES:
            cluster.agents[node].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME))
        return not any(tombstones(cluster, n) for n in NODES)
    wait_until(forgotten, timeout=120, interval=1, what="the tombstones dropped everywhere")
    write(scratch, b"second")
    wait_until(lambda: same_everywhere(cluster)
               and files(live(cluster, "b")).get("scratch.tmp", ("",))[0] == sha(b"second"),
               timeout=120, what="the file made again, everywhere")


def test_attach_serves_every_replica_of_a_multi_writer_volume_only(
        cluster: AgentCluster) -> None:
    cluster.apply(mw_spec())
    attached = cluster.agents["b"].call("Attach", pb.AttachRequest(volume_id=VOLUME))
    write(Path(attached.path) / "from-b", b"written through b's attachment")
    assert (live(cluster, "b") / "from-b").read_bytes() == b"written through b's attachment"
    wait_until(lambda: (live(cluster, "a") / "from-b").exists(), timeout=60,
               what="b's write on a")
    assert (live(cluster, "a") / "from-b").read_bytes() == b"written through b's attachment"
    cluster.agents["b"].call("Detach", pb.DetachRequest(volume_id=VOLUME))
    # a volume that is not multi-writer is still served by its primary only
    cluster.apply(volume_spec(PLAIN, NODES, "a", mode=pb.ASYNCHRONOUS))
    with pytest.raises(grpc.RpcError) as refused:
        cluster.agents["b"].call("Attach", pb.AttachRequest(volume_id=PLAIN))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # and a block volume cannot be multi-writer
    block = volume_spec("vol-" + "4f" * 12, NODES, "a")
    block.kind = "block"
    block.multi_writer = True
    with pytest.raises(grpc.RpcError) as invalid:
        cluster.agents["a"].call("ApplyVolume", pb.ApplyVolumeRequest(spec=block))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filesystem" in (invalid.value.details() or "")
    # a multi-writer volume refuses snapshot streams (they would overwrite local writes)
    with pytest.raises(grpc.RpcError) as flipped:
        cluster.agents["a"].call("ApplyVolume", pb.ApplyVolumeRequest(
            spec=volume_spec(VOLUME, NODES, "a", mode=pb.ASYNCHRONOUS)))
    assert flipped.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def attach(cluster: AgentCluster, node: str) -> Path:
    return Path(cluster.agents[node].call("Attach", pb.AttachRequest(volume_id=VOLUME)).path)


def test_synchronous_fsync_returns_once_the_peers_merged_it(cluster: AgentCluster) -> None:
    """Synchronous: what a pod on one node fsync'd, a pod on another reads right away.

    Paused, so nothing moves on its own: only the fsync's commit can have carried the data. The
    names are rewritten over and over from both sides, so a reader often holds the name's old
    file in its kernel caches when a peer's version replaces it.
    """
    spec = mw_spec(paused=True)
    spec.policy.mode = pb.SYNCHRONOUS
    spec.policy.write_quorum = 2
    cluster.apply(spec)
    mounts = {node: attach(cluster, node) for node in ("a", "b")}
    rng = random.Random(11)
    latest: dict[str, bytes] = {}
    for i in range(40):
        writer, reader = ("a", "b") if i % 2 == 0 else ("b", "a")
        rel = f"shared/doc-{i % 4}.txt"
        data = f"{i} from {writer} ".encode() + rng.randbytes(rng.randint(0, 200_000))
        write(mounts[writer] / rel, data)  # open, write, fsync, close
        latest[rel] = data
        assert (mounts[reader] / rel).read_bytes() == data, f"write {i}: {reader} reads stale"
        os.stat(mounts[reader] / rel)  # the reader's kernel now caches the name's attributes
    # every reachable replica merged it, not only the quorum: c, never attached, too
    assert {rel: (live(cluster, "c") / rel).read_bytes() for rel in latest} == latest

    # c dies: a and b are the quorum, and still read each other's fsyncs at once
    cluster.agents["c"].kill()
    write(mounts["a"] / "while-c-is-down", b"quorum of a and b")
    assert (mounts["b"] / "while-c-is-down").read_bytes() == b"quorum of a and b"
    # b is cut off too: a alone is not a quorum, so its fsync fails (and says so)
    cluster.partition("b")
    with pytest.raises(OSError, match="Input/output error") as failed:
        write(mounts["a"] / "no-quorum", b"only on a")
    assert failed.value.errno == errno.EIO
    cluster.heal("b")
    cluster.agents["c"].start()
    write(mounts["a"] / "quorum-again", b"b or c is back")

    def links_back() -> bool:
        """Every node pulled from every other in a sync-now round and trusts it again."""
        for node in NODES:
            sync_now(cluster, node)
        return all(not replica.message for node in NODES
                   for replica in cluster.agents[node].volume(VOLUME).replicas)
    wait_until(links_back, timeout=120, what="every node pulling from every other again")
    assert same_everywhere(cluster)
    assert (live(cluster, "c") / "no-quorum").read_bytes() == b"only on a"
    # everyone is back: every fsync is read everywhere at once again
    write(mounts["b"] / "all-back", b"three again")
    assert (mounts["a"] / "all-back").read_bytes() == b"three again"
    assert (live(cluster, "c") / "all-back").read_bytes() == b"three again"
    for node in ("a", "b"):
        cluster.agents[node].call("Detach", pb.DetachRequest(volume_id=VOLUME))


def sync_now(cluster: AgentCluster, node: str) -> None:
    cluster.agents[node].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=300)


def test_a_file_open_for_writing_is_not_replaced_under_its_writer(
        cluster: AgentCluster) -> None:
    """A peer's version of a file that a pod here holds open for writing waits until the pod
    closes it: replaced earlier, the pod's next writes would go to a file no longer there."""
    cluster.apply(mw_spec(resolution=pb.KEEP_BOTH, paused=True))
    mounts = {node: attach(cluster, node) for node in ("a", "b")}
    ours = b"b: first line\nb: second line\n"
    with open(mounts["b"] / "journal.txt", "wb") as out:
        out.write(b"b: first line\n")
        out.flush()
        sync_now(cluster, "b")  # b records its version so far
        write(mounts["a"] / "journal.txt", b"a's version\n")
        sync_now(cluster, "a")  # a records its own
        sync_now(cluster, "b")  # b pulls a's version: the file is open here, so it waits
        out.write(b"b: second line\n")
    assert (live(cluster, "b") / "journal.txt").read_bytes() == ours

    def settled() -> bool:
        for node in NODES:
            sync_now(cluster, node)
        return same_everywhere(cluster)
    wait_until(settled, timeout=120, what="the two versions settled everywhere")
    kept = {path.read_bytes() for path in live(cluster, "c").glob("journal*")}
    # both whole, neither lost (KeepBoth may also keep b's first line alone: when a pulled it,
    # it had met a's version as a conflict of its own)
    assert {ours, b"a's version\n"} <= kept <= {ours, b"a's version\n", b"b: first line\n"}, kept
    for node in ("a", "b"):
        cluster.agents[node].call("Detach", pb.DetachRequest(volume_id=VOLUME))


def _concurrent_writes(cluster: AgentCluster) -> tuple[bytes, bytes]:
    """The same file written on a (cut off) and on b; returns (a's, b's) content. b's write
    carries the later mtime, so it is the last writer."""
    write(live(cluster, "a") / "doc.txt", b"first version, everywhere")
    wait_until(lambda: same_everywhere(cluster) and "doc.txt" in files(live(cluster, "c")),
               timeout=60, what="the first version everywhere")
    cluster.partition("a")
    ours, theirs = b"written on a while cut off", b"written on b meanwhile"
    write(live(cluster, "a") / "doc.txt", ours, mtime_s=2_000_000_000)
    write(live(cluster, "b") / "doc.txt", theirs, mtime_s=2_000_000_100)
    wait_until(lambda: files(live(cluster, "c")).get("doc.txt", ("",))[0] == sha(theirs),
               timeout=60, what="b's version on c")
    cluster.heal("a")
    return ours, theirs


def test_concurrent_writes_last_writer_wins(cluster: AgentCluster) -> None:
    import urllib.request

    cluster.apply(mw_spec(resolution=pb.LAST_WRITER_WINS))
    ours, theirs = _concurrent_writes(cluster)
    wait_until(lambda: same_everywhere(cluster)
               and files(live(cluster, "a")).get("doc.txt", ("",))[0] == sha(theirs)
               and all(cluster.agents[n].volume(VOLUME).conflicts == 1 for n in NODES),
               timeout=120, what="one version everywhere, the conflict known everywhere")
    assert set(files(live(cluster, "a"))) == {"doc.txt"}  # the loser is gone, not copied
    records = [r for n in NODES for r in conflict_records(cluster, n)]
    assert records, "the conflict was not audited"
    for record in records:
        assert record["resolution"] == "LastWriterWins"
        assert record["winner_digest"] == blake3.blake3(theirs).hexdigest()
        assert record["loser_digest"] == blake3.blake3(ours).hexdigest()
        assert record["winner_node"] == "b"
        assert record["loser_node"] == "a"
    assert any(r["action"] == "resolved" for r in records)
    with urllib.request.urlopen(cluster.metrics_url("a"), timeout=10) as response:
        text = response.read().decode()
    assert f'sharedsync_conflicts_total{{volume="{VOLUME}"}} 1.0' in text


def test_concurrent_writes_keep_both(cluster: AgentCluster) -> None:
    cluster.apply(mw_spec(resolution=pb.KEEP_BOTH))
    ours, theirs = _concurrent_writes(cluster)
    kept = conflict_name("doc.txt", "a", blake3.blake3(ours).hexdigest())
    wait_until(lambda: same_everywhere(cluster) and kept in files(live(cluster, "b")),
               timeout=120, what="both versions everywhere")
    for node in NODES:
        tree = files(live(cluster, node))
        assert set(tree) == {"doc.txt", kept}
        assert tree["doc.txt"][0] == sha(theirs)
        assert tree[kept][0] == sha(ours)
    wait_until(lambda: all(cluster.agents[n].volume(VOLUME).conflicts == 1 for n in NODES),
               timeout=60, what="the conflict counted once on every node")
    records = [r for n in NODES for r in conflict_records(cluster, n)]
    assert records
    assert all(r["kept_as"] == kept and r["resolution"] == "KeepBoth" for r in records)


def test_sync_now_scans_and_pulls_at_once(cluster: AgentCluster) -> None:
    # paused: nothing moves unless asked, so only SyncNow can have brought the file
    cluster.apply(mw_spec(paused=True))
    write(live(cluster, "a") / "asked-for", b"moved by sync-now")
    cluster.agents["a"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME))  # a records it
    cluster.agents["b"].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME))  # b pulls it
    assert (live(cluster, "b") / "asked-for").read_bytes() == b"moved by sync-now"


def test_a_file_changed_in_place_travels_as_its_changed_chunks(cluster: AgentCluster) -> None:
    """A peer that holds the previous version sends its chunk digests with the fetch, and gets
    back only the chunks that differ (what a database rewriting pages in place needs)."""
    cluster.apply(mw_spec(paused=True))  # nothing moves unless asked: the bytes are all ours
    data = bytearray(random.Random(11).randbytes(8 << 20))  # 128 chunks

    def converge() -> None:
        for node in NODES:  # a records, then b and c pull
            cluster.agents[node].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME))

    write(live(cluster, "a") / "big.bin", bytes(data))
    converge()
    assert (live(cluster, "b") / "big.bin").read_bytes() == data
    before = cluster.agents["b"].volume(VOLUME).bytes_received
    with open(live(cluster, "a") / "big.bin", "r+b") as out:
        for offset in (100, (3 << 20) + 5, (8 << 20) - 16):  # three chunks, the last one too
            out.seek(offset)
            out.write(b"rewritten page!!")
            data[offset:offset + 16] = b"rewritten page!!"
        os.fsync(out.fileno())
    converge()
    for node in ("b", "c"):
        assert (live(cluster, node) / "big.bin").read_bytes() == data, node
    received = cluster.agents["b"].volume(VOLUME).bytes_received - before
    assert 0 < received <= 3 * CHUNK_BYTES + (64 << 10), f"{received} bytes for 3 chunks"


def test_rewriting_most_of_a_full_volume_merges_in_batches_that_fit(
        cluster: AgentCluster) -> None:
    """Every new version is written beside the old one until its batch is installed: when the
    new versions together do not fit in the free space, a round takes them a batch at a time
    (it used to fetch them all at once, fail with ENOSPC, and never catch up)."""
    cluster.apply(mw_spec(paused=True))  # 256 MiB volumes; only sync-now moves anything
    rng = random.Random(31)
    names = [f"big-{i}.bin" for i in range(5)]

    def rewrite_all() -> dict[str, bytes]:
        contents = {name: rng.randbytes(32 << 20) for name in names}  # 160 MiB in all
        for name, data in contents.items():
            write(live(cluster, "a") / name, data)
        for node in ("a", "b"):  # a records, b pulls: one round
            cluster.agents[node].call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME),
                                      timeout=300)
        return contents

    rewrite_all()
    contents = rewrite_all()  # b must hold 160 MiB of new versions beside 160 MiB of old ones
    for name, data in contents.items():
        assert sha((live(cluster, "b") / name).read_bytes()) == sha(data), name


def test_killed_agent_restarts_and_converges_with_nothing_lost(cluster: AgentCluster) -> None:
    # a bandwidth cap on the serving side, so that b can be killed in the middle of a pull
    cluster.apply(mw_spec(bandwidth=2 << 20))
    rng = random.Random(7)
    expected: dict[str, bytes] = {}
    for i in range(24):
        expected[f"bulk/a-{i:02d}"] = rng.randbytes(512 << 10)
    for rel, data in expected.items():
        write(live(cluster, "a") / rel, data)
    for i in range(10):
        expected[f"small/b-{i}"] = rng.randbytes(4096)
        write(live(cluster, "b") / f"small/b-{i}", expected[f"small/b-{i}"])
    wait_until(lambda: cluster.agents["b"].volume(VOLUME).bytes_received > (2 << 20),
               timeout=120, what="b pulling a's files")
    cluster.agents["b"].kill()
    # written while b is down, on both sides of it
    expected["after/a"] = b"a, while b was down"
    write(live(cluster, "a") / "after/a", expected["after/a"])
    expected["after/b"] = b"b's disk, while its agent was down"
    write(live(cluster, "b") / "after/b", expected["after/b"])
    cluster.agents["b"].start()
    want = {rel: sha(data) for rel, data in expected.items()}
    wait_until(lambda: same_everywhere(cluster)
               and {rel: d for rel, (d, _) in files(live(cluster, "c")).items()} == want,
               timeout=240, what="every file on every node after the restart")
    assert cluster.agents["b"].volume(VOLUME).conflicts == 0
