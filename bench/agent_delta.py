"""3. Delta: ship a 1% change of 1 GiB of files with one SyncNow, vs rsync.

A Scheduled volume (a schedule that never fires during the run, so only SyncNow ships) on
replicas a and b (one link, so the figures compare one copy with one rsync destination) holds
64 files x 16 MiB of random data (quick: 16 x 8 MiB), replicated by a first SyncNow. Then 1%
of it changes: 256 x 40 KiB writes at random offsets (quick: scaled to the data size), and one
SyncNow is timed; the bytes are the agent's ``bytes_shipped`` delta (the raw btrfs send stream)
and the byte counters of a's network link, both ways (what crossed the wire: TCP/IP headers, TLS,
HTTP/2 and gRPC framing included; nothing else talks on that link during the timed sync).

The agents dial each other directly, as they do in a cluster (not through the fault proxies of
the test harness, an asyncio relay per link, which would add a Python hop the rsync baseline
does not have: rsync talks to its daemon over loopback).

rsync: a daemon on loopback (``rsync --daemon --no-detach``) with a module on a scratch dir,
``rsync -a --inplace --no-whole-file --stats`` of the same before tree (untimed first copy) and
the same after tree (timed); bytes are ``Total bytes sent`` + ``Total bytes received``.

Goals: bytes <= 0.9x rsync's, time <= 0.2x rsync's. Rounds (full: 3, quick: 2) each apply a
new change set to both trees; medians.

``delta-ext4`` (``bench.agent_delta_ext4``) runs the same on the ext4 fallback store, where
files replicate one by one: the volume's policy is paused so that nothing moves on its own, and
the timed sync is a SyncNow on a (which scans) then one on b (which pulls the changed files as
chunk deltas against the versions it holds); its bytes are b's ``bytes_received`` delta (the
framed delta streams).
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    Figure,
    GiB,
    KiB,
    MiB,
    Result,
    StatusClient,
    agent_cluster,
    log,
    main,
    median,
    ratio,
    veth_bytes,
    write_random_files,
)
from replication_agent.proto import agent_pb2 as pb

NAME = "delta"
TITLE = "Delta: 1% change of 1 GiB, one SyncNow vs rsync --inplace --no-whole-file"
VOLUME = "vol-" + "de" * 12
CHANGE = 40 * KiB


class RsyncDaemon:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dest = workdir / "rsync-dst"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> RsyncDaemon:
        self.dest.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = self.workdir / "rsyncd.conf"
        conf.write_text(
            f"use chroot = false\nlog file = {self.workdir / 'rsyncd.log'}\n"
            f"pid file = {self.workdir / 'rsyncd.pid'}\naddress = 127.0.0.1\n"
            f"[bench]\n  path = {self.dest}\n  read only = false\n  uid = root\n"
            f"  gid = root\n")
        self.proc = subprocess.Popen(
            ["rsync", "--daemon", "--no-detach", f"--port={self.port}", f"--config={conf}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError("rsync daemon did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def sync(self, source: Path) -> dict[str, float]:
        argv = ["rsync", "-a", "--inplace", "--no-whole-file", "--stats", f"{source}/",
                f"rsync://127.0.0.1:{self.port}/bench/"]
        t = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
        seconds = time.perf_counter() - t

        def number(label: str) -> int:
            match = re.search(rf"^{label}: ([\d,.]+)", out.stdout, re.MULTILINE)
            if match is None:
                raise RuntimeError(f"rsync --stats has no {label!r}: {out.stdout[-500:]}")
            return int(match.group(1).replace(",", "").replace(".", ""))

        sent, received = number("Total bytes sent"), number("Total bytes received")
        return {"seconds": seconds, "sent": sent, "received": received,
                "bytes": sent + received}


def change(roots: list[Path], files: int, file_size: int, count: int, seed: int) -> None:
    """The same ``count`` 40 KiB writes at random offsets into every tree in ``roots``."""
    rng = random.Random(seed)
    writes = [(rng.randrange(files), rng.randrange(file_size - CHANGE), rng.randbytes(CHANGE))
              for _ in range(count)]
    for root in roots:
        touched = set()
        for index, offset, data in writes:
            path = root / f"file-{index:04d}.bin"
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            touched.add(path)
        for path in touched:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def body(quick: bool, workdir: Path, result: Result, store_filesystem: str = "btrfs") -> None:
    from tests.integration.agent_harness import volume_spec

    file_level = store_filesystem == "ext4"

    files, file_size = (16, 8 * MiB) if quick else (64, 16 * MiB)
    total = files * file_size
    changes = max(1, round(256 * total / GiB))
    rounds = 2 if quick else 3
    size = 512 * MiB if quick else 2 * GiB
    result.params.update(files=files, file_bytes=file_size, total_bytes=total,
                         changes_per_round=changes, change_bytes=CHANGE, rounds=rounds,
                         volume_bytes=size, replicas=["a", "b"],
                         mode="paused+SyncNow on a then b" if file_level
                         else "Scheduled+SyncNow")
    with agent_cluster(workdir, result, direct_links=True,
                       store_filesystem=store_filesystem) as cluster, \
            RsyncDaemon(workdir) as rsync:
        if file_level:
            spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.ASYNCHRONOUS, size=size)
            spec.policy.paused = True
        else:
            spec = volume_spec(VOLUME, ["a", "b"], "a", mode=pb.SCHEDULED,
                               schedule="0 0 1 1 *", size=size)
        cluster.apply(spec)
        agent = cluster.agents["a"]
        puller = cluster.agents["b"]
        live = agent.live(VOLUME) / "data"
        source = workdir / "rsync-src"
        log(f"writing {files} x {file_size // MiB} MiB of random data into the live replica "
            "and the rsync source tree")
        write_random_files(live, files, file_size, seed=1)
        write_random_files(source, files, file_size, seed=1)

        with StatusClient(agent.socket) as status, StatusClient(puller.socket) as pulled:
            def sync_now() -> dict[str, float]:
                before = pulled.volume(VOLUME).bytes_received if file_level \
                    else status.volume(VOLUME).bytes_shipped
                wire = veth_bytes(cluster, "a")
                t = time.perf_counter()
                reply = agent.call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME), timeout=600)
                if file_level:  # a recorded its changes; b pulls them
                    reply = puller.call("SyncNow", pb.SyncNowRequest(volume_id=VOLUME),
                                        timeout=600)
                seconds = time.perf_counter() - t
                after_wire = veth_bytes(cluster, "a")
                moved = reply.bytes_received if file_level else reply.bytes_shipped
                return {"seconds": seconds, "bytes": moved - before,
                        "wire_up": after_wire[0] - wire[0],
                        "wire_down": after_wire[1] - wire[1],
                        "wire": sum(after_wire) - sum(wire), "seq": reply.last_snapshot.seq}

            first = sync_now()
            first_rsync = rsync.sync(source)
            result.details.update(initial_syncnow=first, initial_rsync=first_rsync)
            log(f"initial full copy: SyncNow {first['seconds']:.2f} s, "
                f"{first['bytes'] / MiB:.0f} MiB; rsync {first_rsync['seconds']:.2f} s")
            agent_runs, rsync_runs = [], []
            for i in range(rounds):
                # rsync's quick check compares mtimes in whole seconds: a file changed again
                # within the second of its last copy would be skipped. Start each change set in
                # a new second so that rsync sees every changed file.
                time.sleep(1.02 - time.time() % 1)
                change([live, source], files, file_size, changes, seed=100 + i)
                a = sync_now()
                r = rsync.sync(source)
                agent_runs.append(a)
                rsync_runs.append(r)
                log(f"round {i + 1}/{rounds}: SyncNow {a['seconds'] * 1e3:.0f} ms, "
                    f"{a['bytes'] / 1e6:.2f} MB stream, {a['wire'] / 1e6:.2f} MB on the wire; "
                    f"rsync {r['seconds'] * 1e3:.0f} ms, {r['bytes'] / 1e6:.2f} MB")
            _check_replica(cluster, live, files, file_level)
    result.details.update(agent_rounds=agent_runs, rsync_rounds=rsync_runs)
    a_bytes = median([a["bytes"] for a in agent_runs])
    a_wire = median([a["wire"] for a in agent_runs])
    a_time = median([a["seconds"] for a in agent_runs])
    r_bytes = median([r["bytes"] for r in rsync_runs])
    r_time = median([r["seconds"] for r in rsync_runs])
    for label, value in (("bytes on the wire (a's link, both ways)", a_wire),
                         ("bytes shipped (agent counter)", a_bytes)):
        q = ratio(value, r_bytes)
        result.add(Figure(label, value / 1e6 if value is not None else None, "MB",
                          baseline="rsync sent+received",
                          baseline_value=r_bytes / 1e6 if r_bytes is not None else None,
                          ratio=q, goal="<= 0.9x", met=q is not None and q <= 0.9))
    q = ratio(a_time, r_time)
    result.add(Figure("SyncNow time for the 1% change", a_time * 1e3 if a_time else None, "ms",
                      baseline="rsync wall time", baseline_value=r_time * 1e3 if r_time else None,
                      ratio=q, goal="<= 0.2x", met=q is not None and q <= 0.2))


def _check_replica(cluster: object, live: Path, files: int, file_level: bool) -> None:
    """The replica's newest snapshot (or, file by file, its live tree) holds the primary's bytes
    (spot check of a few files)."""
    if file_level:
        newest = cluster.agents["b"].live(VOLUME)  # type: ignore[attr-defined]
    else:
        sync_dir = cluster.agents["b"].sync_dir(VOLUME)  # type: ignore[attr-defined]
        newest = sorted(p for p in sync_dir.iterdir() if p.name.startswith("e"))[-1]
    for i in (0, files // 2, files - 1):
        name = f"file-{i:04d}.bin"
        if (newest / "data" / name).read_bytes() != (live / name).read_bytes():
            raise AssertionError(f"replica b differs from the primary in {name}")


if __name__ == "__main__":
    sys.exit(main(NAME, TITLE, body))
