"""Shared pieces of the benchmarks: results, machine info, a local btrfs baseline, a cluster.

Benchmarks print figures measured side by side in one run against a baseline; they never
pass or fail on timing. Each benchmark module exposes ``run(quick: bool, workdir: Path) ->
Result`` and can be run on its own with ``python -m bench.<module> [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from replication_agent.proto import agent_pb2 as pb  # noqa: E402
from replication_agent.proto import agent_pb2_grpc  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
OUT_DIR = REPO / "build" / "bench"


class NotAvailable(Exception):  # noqa: N818 - a state, not an error
    """The benchmark cannot run here (a feature is missing): reported, not a crash."""


# -- results -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured figure, its baseline measured in the same run, and the goal."""

    name: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""


@dataclass
class Result:
    name: str
    title: str
    status: str = "ok"  # ok | not available | crashed
    reason: str = ""
    figures: list[Figure] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    duration_seconds: float = 0.0

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        print(f"  {figure.name}: {fmt(figure.value)} {figure.unit}"
              + (f"  (baseline {figure.baseline}: {fmt(figure.baseline_value)}, "
                 f"ratio {fmt(figure.ratio)})" if figure.baseline else "")
              + (f"  goal {figure.goal}: {'met' if figure.met else 'NOT met'}"
                 if figure.goal and figure.met is not None else ""), flush=True)
        return figure

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (value != value):  # NaN
        return "nan"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}" if value else "0"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank q-quantile (0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- machine -----------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "memory_bytes": mem_kib * 1024,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "btrfs_progs": _first_line(["btrfs", "--version"]),
        "rsync": _first_line(["rsync", "--version"]),
        "loadavg_at_start": os.getloadavg(),
    }


# -- data --------------------------------------------------------------------------------------


class BufferPool:
    """Distinct random 1 MiB buffers (incompressible; no two frames repeat inside a chunk)."""

    def __init__(self, count: int = 32, size: int = MiB, seed: int = 12345) -> None:
        rng = random.Random(seed)
        self.buffers = [rng.randbytes(size) for _ in range(count)]
        self.size = size

    def __getitem__(self, i: int) -> bytes:
        return self.buffers[i % len(self.buffers)]


@dataclass
class WriteResult:
    bytes: int
    seconds: float
    fsync_seconds: list[float]

    @property
    def mib_per_s(self) -> float:
        return self.bytes / MiB / self.seconds if self.seconds > 0 else 0.0


def sequential_write(path: Path, total: int, pool: BufferPool, *, fsync_every: int = 64 * MiB,
                     pace_bytes_per_s: float | None = None,
                     on_progress: Callable[[int], None] | None = None) -> WriteResult:
    """1 MiB writes, fsync every ``fsync_every`` bytes and at the end (close included).

    With ``pace_bytes_per_s`` the writer sleeps to hold that rate (a paced writer).
    """
    fsyncs: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    i = 0
    start = time.perf_counter()
    try:
        while written < total:
            if pace_bytes_per_s:
                due = start + written / pace_bytes_per_s
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            buf = pool[i]
            n = os.write(fd, buf[: min(len(buf), total - written)])
            written += n
            i += 1
            if on_progress is not None:
                on_progress(written)
            if written % fsync_every == 0 or written >= total:
                t = time.perf_counter()
                os.fsync(fd)
                fsyncs.append(time.perf_counter() - t)
    finally:
        os.close(fd)
    return WriteResult(written, time.perf_counter() - start, fsyncs)


def small_fsync_latencies(path: Path, count: int, *, size: int = 4 * KiB,
                          span: int = 16 * MiB, seed: int = 7) -> list[float]:
    """``count`` x (pwrite ``size`` bytes at a random aligned offset, then fsync): latencies
    of the fsync alone, in seconds."""
    rng = random.Random(seed)
    data = rng.randbytes(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, span)
        os.fsync(fd)
        lat = []
        for _ in range(count):
            os.pwrite(fd, data, rng.randrange(span // size) * size)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
        return lat
    finally:
        os.close(fd)


def write_random_files(root: Path, count: int, size: int, seed: int) -> list[Path]:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"file-{i:04d}.bin"
        with open(path, "wb") as out:
            left = size
            while left:
                n = min(left, 4 * MiB)
                out.write(rng.randbytes(n))
                left -= n
            out.flush()
            os.fsync(out.fileno())
        paths.append(path)
    return paths


def settle(seconds: float = 0.3) -> None:
    """Flush every dirty page (sync(2)) and pause, so that a timed write does not pay for
    the writeback of the one before it (the variants of a round run back to back)."""
    os.sync()
    time.sleep(seconds)


def drop_caches() -> None:
    with contextlib.suppress(OSError):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


# -- local btrfs baseline ----------------------------------------------------------------------


class LocalBtrfs:
    """A plain btrfs on a loop image, made like a replica (same mkfs options, a ``live``
    subvolume, ``noatime``), with no agent and no FUSE in the path: the local baseline."""

    def __init__(self, workdir: Path, size: int, label: str = "bench-local") -> None:
        self.workdir = workdir
        self.size = size
        self.label = label
        self.image = workdir / f"{label}.img"
        self.mnt = workdir / f"{label}-mnt"
        self.device: str | None = None

    @property
    def live(self) -> Path:
        return self.mnt / "live"

    def __enter__(self) -> LocalBtrfs:
        from sharedsync.storage import btrfs, loop

        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as image:
            image.truncate(self.size)
        try:
            # the same loop device as a replica's (direct I/O where the disk allows it)
            self.device = loop.attach(self.image)
            btrfs.make_filesystem(self.device, self.size, self.label)
            self.mnt.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "btrfs", "-o", "noatime", self.device,
                            str(self.mnt)], check=True)
            btrfs.create_subvolume(self.live)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mnt.exists() and os.path.ismount(self.mnt):
            subprocess.run(["umount", str(self.mnt)], check=False)
        if self.device:
            subprocess.run(["losetup", "-d", self.device], check=False)
            self.device = None
        self.image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.mnt.rmdir()


# -- the cluster -------------------------------------------------------------------------------


@contextlib.contextmanager
def agent_cluster(workdir: Path, result: Result, *, direct_links: bool = False,
                  store_filesystem: str = "btrfs") -> Iterator[Any]:
    """A started 3-agent AgentCluster (tests/integration/agent_harness.py), closed after;
    ``direct_links``: agents dial each other, without the fault proxies in between;
    ``store_filesystem``: what the agents make replicas with (btrfs, or the ext4 fallback)."""
    from tests.cluster import netns
    from tests.cluster.netns import netns_unavailable
    from tests.integration.agent_harness import AgentCluster

    reason = netns_unavailable()
    if reason:
        raise NotAvailable(reason)
    # Only one test network may exist on the host: colleagues' test runs hold the host lock
    # for their duration. Record how long we waited for it (it is not part of any figure).
    original = netns._acquire_host_lock

    def timed_lock(timeout: float) -> int:
        t = time.monotonic()
        try:
            return original(timeout)
        finally:
            result.details["netns_lock_wait_seconds"] = round(time.monotonic() - t, 2)
            if time.monotonic() - t > 1:
                log(f"waited {time.monotonic() - t:.0f} s for the test-network host lock")

    netns._acquire_host_lock = timed_lock
    started = time.monotonic()
    try:
        cluster = AgentCluster(workdir / "cluster", direct_links=direct_links,
                               extra_config={"storeFilesystem": store_filesystem})
    finally:
        netns._acquire_host_lock = original
    result.details["links"] = "direct" if direct_links else "through fault proxies"
    result.details["store_filesystem"] = store_filesystem
    try:
        cluster.start()
        result.details["cluster_start_seconds"] = round(time.monotonic() - started, 2)
        yield cluster
    finally:
        try:
            cluster.close()
        except AssertionError as exc:  # leftovers were cleaned up by close itself
            result.warnings.append(f"cluster close: {exc}")


class StatusClient:
    """A persistent channel to one agent's control socket (cheaper than a channel per call)."""

    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    def volume(self, volume_id: str, timeout: float = 10) -> pb.VolumeStatus:
        status = self.stub.GetStatus(pb.GetStatusRequest(volume_ids=[volume_id]),
                                     timeout=timeout)
        return status.volumes[0]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> StatusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sampler:
    """Calls ``sample()`` every ``interval`` s in a thread; keeps (monotonic time, value)."""

    def __init__(self, sample: Callable[[], Any], interval: float = 0.1) -> None:
        self.sample = sample
        self.interval = interval
        self.samples: list[tuple[float, Any]] = []
        self.errors = 0
        self.call_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                value = self.sample()
                self.call_seconds.append(time.monotonic() - t)
                self.samples.append((t, value))
            except Exception:  # noqa: BLE001 - count and go on
                self.errors += 1
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def volume_in_sync(status: pb.VolumeStatus, peers: Sequence[str]) -> bool:
    newest = status.last_snapshot
    others = [r for r in status.replicas if r.node in peers]
    return len(others) == len(peers) and newest.seq > 0 and all(
        r.state == pb.IN_SYNC and r.last_received.seq == newest.seq
        and r.last_received.epoch == newest.epoch for r in others)


def wait_in_sync(client: StatusClient, volume_id: str, peers: Sequence[str],
                 timeout: float, interval: float = 0.05) -> float:
    """Seconds until every peer holds the newest snapshot; raises TimeoutError."""
    start = time.monotonic()
    deadline = start + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if volume_in_sync(client.volume(volume_id), peers):
                return time.monotonic() - start
        except grpc.RpcError as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{volume_id}: peers {list(peers)} not in sync within {timeout} s"
                       + (f" (last error: {last})" if last else ""))


def proxy_bytes(cluster: Any, src: str, dst: str) -> dict[str, int]:
    """Bytes the fault proxy of link src->dst forwarded: up (src->dst), down, total."""
    stats = cluster.proxies[(src, dst)].client.stats()
    up, down = int(stats["up"]["bytes"]), int(stats["down"]["bytes"])
    return {"up": up, "down": down, "total": up + down}


def veth_bytes(cluster: Any, node: str) -> tuple[int, int]:
    """Bytes ``node`` sent and received on its link (its veth's counters, seen from the bridge
    side: what the node sends arrives there). IP packets, so TCP/IP headers count too."""
    stats = Path("/sys/class/net") / cluster.net.node(node).veth / "statistics"
    received_from_node = int((stats / "rx_bytes").read_text())
    sent_to_node = int((stats / "tx_bytes").read_text())
    return received_from_node, sent_to_node


def agent_log_errors(cluster: Any, limit: int = 5) -> list[str]:
    """The last few warning/error lines of every agent's log (for crash reports)."""
    out = []
    for name, agent in cluster.agents.items():
        lines = [line for line in agent.log_tail(400).splitlines()
                 if '"level": "error"' in line or '"level": "warning"' in line
                 or "Traceback" in line]
        out += [f"{name}: {line[:400]}" for line in lines[-limit:]]
    return out


BENCH_LOCK = Path("/run/lock/sharedsync-bench.lock")


@contextlib.contextmanager
def bench_lock(result: Result) -> Iterator[None]:
    """Never two benchmarks at once on this host (two drivers alternate, one at a time)."""
    import fcntl

    BENCH_LOCK.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(BENCH_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"another benchmark is running ({BENCH_LOCK}); waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        waited = time.monotonic() - started
        if waited > 0.5:
            result.details["bench_lock_wait_seconds"] = round(waited, 1)
        yield
    finally:
        os.close(fd)


def mounts_under(root: Path) -> list[str]:
    prefix = f"{root}/"
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            target = line.split()[4]
            if target.startswith(prefix):
                found.append(target)
    return found


# -- running one benchmark ---------------------------------------------------------------------


def main(name: str, title: str, body: Callable[[bool, Path, Result], None],
         argv: Sequence[str] | None = None) -> int:
    """Command line of one benchmark module: run it, write its JSON, print its figures."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="result JSON path")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="an empty or new directory (default: a fresh one under /tmp)")
    args = parser.parse_args(argv)
    if args.workdir is not None and args.workdir.is_dir() and any(args.workdir.iterdir()):
        # an earlier run's agents would start with its replicas: a rebuild onto a "fresh"
        # node found the previous run's data there and ran out of space
        parser.error(f"--workdir {args.workdir} is not empty: an earlier run's replicas would "
                     "be reused; remove it or name a new one")
    result = Result(name=name, title=title, params={"quick": args.quick})
    out = args.out or OUT_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    base = args.workdir or Path(tempfile.mkdtemp(prefix=f"ssbench-{name}-", dir="/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"{name}: {title} ({'quick' if args.quick else 'full'}), workdir {base}")
    code = 0

    def _terminated(signum: int, frame: Any) -> None:
        raise SystemExit(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, _terminated)
    try:
        with bench_lock(result):
            body(args.quick, base, result)
    except NotAvailable as exc:
        result.status = "not available"
        result.reason = str(exc)
        log(f"{name}: not available: {exc}")
    except BaseException as exc:  # noqa: BLE001 - a crash is a result too
        result.status = "crashed"
        result.reason = f"{type(exc).__name__}: {exc}"
        result.details["traceback"] = traceback.format_exc()
        traceback.print_exc()
        code = 1
    finally:
        result.duration_seconds = round(time.monotonic() - started, 1)
        out.write_text(json.dumps(result.to_dict(), indent=2, default=str))
        if args.workdir is None and not mounts_under(base):
            shutil.rmtree(base, ignore_errors=True)
        elif mounts_under(base):
            log(f"{name}: mounts left under {base}, not removing it: {mounts_under(base)}")
    log(f"{name}: {result.status} in {result.duration_seconds} s -> {out}")
    return code


# -- raw TCP between the cluster's namespaces ----------------------------------------------------


def _probe_server(cluster: Any, node: str, mode: str) -> tuple[subprocess.Popen[str], int]:
    from tests.cluster.netns import read_line

    address = cluster.nodes[node].address
    proc = cluster.net.python(node, ["-m", "bench.netprobe", mode, "--listen", f"{address}:0"],
                              stdout=subprocess.PIPE, text=True)
    port = int(json.loads(read_line(proc.stdout, 30))["port"])
    return proc, port


def _link_proxy(cluster: Any, src: str, target: tuple[str, int]) -> Any:
    """A fault proxy in ``src``'s namespace, started exactly like the agents' link proxies
    (AgentCluster: listen on the node's address, no fault configured)."""
    from tests.cluster.faultproxy import start_proxy_process

    node = cluster.nodes[src]
    return start_proxy_process(cluster.net, node, listen=(node.address, 0), target=target,
                               control=(node.address, 0))


def measure_rtt(cluster: Any, src: str, dst: str, *, count: int = 500, size: int = 64,
                via_proxy: bool = False) -> list[float]:
    """Round trips of ``size``-byte messages from ``src`` to an echo server in ``dst``."""
    from tests.cluster import PYTHON

    echo, port = _probe_server(cluster, dst, "echo")
    proxy = None
    try:
        target = (cluster.nodes[dst].address, port)
        if via_proxy:
            proxy = _link_proxy(cluster, src, target)
            target = proxy.listen
        out = cluster.net.exec(src, [PYTHON, "-m", "bench.netprobe", "ping", "--target",
                                     f"{target[0]}:{target[1]}", "--count", str(count),
                                     "--size", str(size)], timeout=120)
        rtts: list[float] = json.loads(out.stdout.strip().splitlines()[-1])["rtt"]
        return rtts[min(20, len(rtts) // 10):]  # drop warm-up round trips
    finally:
        if proxy is not None:
            proxy.process.terminate()
            proxy.process.wait(10)
        echo.wait(30)


def tcp_copy(cluster: Any, src: str, dst: str, nbytes: int, *, via_proxy: bool = True
             ) -> dict[str, float]:
    """Send ``nbytes`` from ``src`` to a sink in ``dst`` over raw TCP, through a link proxy
    like the agents' (by default). Returns bytes, seconds (sink: accept to EOF), MiB/s."""
    from tests.cluster import PYTHON
    from tests.cluster.netns import read_line

    sink, port = _probe_server(cluster, dst, "sink")
    proxy = None
    try:
        target = (cluster.nodes[dst].address, port)
        if via_proxy:
            proxy = _link_proxy(cluster, src, target)
            target = proxy.listen
        wall = time.perf_counter()
        cluster.net.exec(src, [PYTHON, "-m", "bench.netprobe", "source", "--target",
                               f"{target[0]}:{target[1]}", "--bytes", str(nbytes)],
                         timeout=600)
        done = json.loads(read_line(sink.stdout, 600))
        wall = time.perf_counter() - wall
        return {"bytes": done["bytes"], "seconds": done["seconds"], "wall_seconds": wall,
                "mib_per_s": done["bytes"] / MiB / done["seconds"]}
    finally:
        if proxy is not None:
            proxy.process.terminate()
            proxy.process.wait(10)
        sink.wait(30)


def grpc_push_rate(cluster: Any, src: str, dst: str, nbytes: int, *,
                   spool: Path | None = None, snapshot: Path | None = None
                   ) -> dict[str, float]:
    """A bare Replication.Push stream (bench/grpc_probe.py: the agents' TLS channel and
    options, prebuilt 1 MiB frames, a server that only counts) from ``src`` to ``dst``
    through a link proxy like the agents'. The transport's ceiling, without the agent."""
    from tests.cluster import PYTHON
    from tests.cluster.netns import read_line

    pki = cluster.workdir / "pki"
    address = cluster.nodes[dst].address
    extra = ["--spool", str(spool)] if spool is not None else []
    server = cluster.net.python(dst, ["-m", "bench.grpc_probe", "server", "--listen",
                                      f"{address}:0", "--pki", str(pki), "--node", dst,
                                      *extra], stdout=subprocess.PIPE, text=True)
    proxy = None
    try:
        port = int(json.loads(read_line(server.stdout, 30))["port"])
        proxy = _link_proxy(cluster, src, (address, port))
        out = cluster.net.exec(src, [PYTHON, "-m", "bench.grpc_probe", "client", "--target",
                                     f"{proxy.listen[0]}:{proxy.listen[1]}", "--pki", str(pki),
                                     "--node", src, "--bytes", str(nbytes),
                                     *(["--snapshot", str(snapshot)] if snapshot else [])],
                                     timeout=600)
        done = json.loads(out.stdout.strip().splitlines()[-1])
        done["mib_per_s"] = done["bytes"] / MiB / done["seconds"]
        return dict(done)
    finally:
        if proxy is not None:
            proxy.process.terminate()
            proxy.process.wait(10)
        server.terminate()
        server.wait(10)
