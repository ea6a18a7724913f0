"""1b. Synchronous on the ext4 fallback store: fsync latency in a volume of many files.

The same FUSE data path as ``sync`` (quorum 2 of 3, agents linked directly), on replicas that
replicate file by file (ext4 store). There an fsync waits while the primary finds what changed
in its tree and its peers merge it. The volume holds a tree of small files (20,000; quick
5,000) in 200 directories, as a shared volume of a web or build workload does; then 4 KiB
pwrite + fsync latencies into one file, P50 and P99, are measured:

- vs a local fsync on the host's disk (the goal of ``sync``: local + 2 RTT + 1 ms);
- the fsync of a new 4 KiB file (create, write, fsync) among them, vs the same on the local
  disk (no goal: the issue's goal is for writes into one file);
- ``(diag)`` a whole walk of the replica's tree (``LiveTree.walk``, what every fsync cost
  before the tree's listing was kept up to date from inotify) measured in the same run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import grpc

from bench import common
from bench.common import Figure, NotAvailable, Result
from replication_agent.livetree import LiveTree
from replication_agent.proto import agent_pb2 as pb

NAME = "sync-files"
TITLE = "Synchronous on the ext4 fallback store: fsync latency among many files"
VOLUME = "vol-" + "5f" * 12
DIRECTORIES = 200


def body(quick: bool, workdir: Path, result: Result) -> None:
    from tests.integration.agent_harness import volume_spec, wait_until

    files = 5_000 if quick else 20_000
    fsyncs = 40 if quick else 200
    size = 1 * common.GiB
    result.params.update(files=files, directories=DIRECTORIES, fsync_samples=fsyncs,
                         write_quorum=2, replicas=3, volume_bytes=size)
    with common.agent_cluster(workdir, result, direct_links=True,
                              store_filesystem="ext4") as cluster:
        rtt = common.median(common.measure_rtt(cluster, "a", "b", count=400)) or 0.0
        spec = volume_spec(VOLUME, ["a", "b", "c"], "a", mode=pb.SYNCHRONOUS, write_quorum=2,
                           size=size)
        cluster.apply(spec)
        agent = cluster.agents["a"]
        live = agent.live(VOLUME)
        common.log(f"writing {files} files in {DIRECTORIES} directories")
        for d in range(DIRECTORIES):
            folder = live / f"dir-{d:03d}"
            folder.mkdir()
            for f in range(files // DIRECTORIES):
                (folder / f"file-{f:04d}.txt").write_bytes(os.urandom(512))
        with common.StatusClient(agent.socket) as status:
            status.stub.SyncNow(pb.SyncNowRequest(volume_id=VOLUME), timeout=600)
            for peer in ("b", "c"):
                wait_until(lambda p=peer: (cluster.agents[p].live(VOLUME) / "dir-199").is_dir(),
                           timeout=600, what=f"the tree on {peer}")
            try:
                reply = agent.call("Attach", pb.AttachRequest(volume_id=VOLUME), timeout=60)
            except grpc.RpcError as exc:
                raise NotAvailable(f"Attach failed: {exc.code().name}: {exc.details()}") \
                    from exc
            mount = Path(reply.path)
            try:
                _measure(result, mount, live, workdir, fsyncs, rtt)
            finally:
                agent.call("Detach", pb.DetachRequest(volume_id=VOLUME), timeout=60)


def _measure(result: Result, mount: Path, live: Path, workdir: Path, fsyncs: int,
             rtt: float) -> None:
    walks = []
    tree = LiveTree(live)
    for _ in range(5):
        started = time.perf_counter()
        found = tree.walk()
        walks.append(time.perf_counter() - started)
    walk = common.median(walks) or 0.0
    result.details.update(walk_entries=len(found), walk_seconds=walks)
    common.log(f"a whole walk of the tree: {walk * 1e3:.1f} ms for {len(found)} entries")

    with common.LocalBtrfs(workdir / "local", 256 * common.MiB) as local:
        common.settle()
        local_lat = common.small_fsync_latencies(local.live / "fsync.bin", fsyncs)
    common.settle()
    lat = common.small_fsync_latencies(mount / "dir-000" / "fsync.bin", fsyncs)
    for q, label in ((0.5, "P50"), (0.99, "P99")):
        lf, ll = common.percentile(lat, q), common.percentile(local_lat, q)
        assert lf is not None
        assert ll is not None
        budget = ll + 2 * rtt + 1e-3
        result.add(Figure(f"fsync latency {label} (4 KiB write), "
                          f"{len(found)} entries in the volume", lf * 1e3, "ms",
                          baseline="local fsync", baseline_value=ll * 1e3,
                          ratio=common.ratio(lf, ll),
                          goal=f"<= local + 2 RTT + 1 ms = {budget * 1e3:.2f} ms",
                          met=lf <= budget))
    common.settle()
    local_new = new_file_fsync_latencies(local_dir := workdir / "local-new", fsyncs)
    common.settle()
    new = new_file_fsync_latencies(mount / "dir-100", fsyncs)
    result.details["local_new_file_dir"] = str(local_dir)
    for q, label in ((0.5, "P50"), (0.99, "P99")):
        lf, ll = common.percentile(new, q), common.percentile(local_new, q)
        assert lf is not None
        assert ll is not None
        result.add(Figure(f"new 4 KiB file fsync latency {label}, {len(found)} entries in the "
                          "volume", lf * 1e3, "ms", baseline="local disk",
                          baseline_value=ll * 1e3, ratio=common.ratio(lf, ll)))
    p50 = common.percentile(lat, 0.5) or 0.0
    result.add(Figure("(diag) fsync P50 vs one whole walk of the tree", p50 * 1e3, "ms",
                      baseline="whole walk (LiveTree.walk)", baseline_value=walk * 1e3,
                      ratio=common.ratio(p50, walk)))


def new_file_fsync_latencies(folder: Path, count: int) -> list[float]:
    """``count`` x (create a file in ``folder``, write 4 KiB, fsync, close): the fsyncs' times
    (a web upload's or a build step's output)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(4096)
    latencies = []
    for i in range(count):
        fd = os.open(folder / f"new-{i:05d}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            started = time.perf_counter()
            os.fsync(fd)
            latencies.append(time.perf_counter() - started)
        finally:
            os.close(fd)
    return latencies


if __name__ == "__main__":
    sys.exit(common.main(NAME, TITLE, body))
