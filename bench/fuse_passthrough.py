#!/usr/bin/env python3
"""Synchronous-mode data path: direct disk vs FUSE passthrough vs the Python write path.

Run as root from the repository root::

    .venv/bin/python bench/fuse_passthrough.py [--size MIB] [--iops N] [--rounds R] [--dir DIR]

For each target, side by side in one run and interleaved round by round (the disk is noisy):

- sequential write: 1 MiB writes, fsync every 64 MiB and at the end (``--size`` MiB in all,
  1 GiB by default), in MiB/s;
- 4 KiB ``pwrite`` + ``fsync`` at random 4 KiB-aligned offsets of a 64 MiB file: IOPS and
  fsync p50 / p99 latency;
- the daemon's CPU time (user + system) for each phase.

Targets: ``direct`` is the backing directory itself; the others are
``python -m replication_agent.fuse`` daemons (each in its own process, NullHooks: commit
returns at once) serving that directory: ``passthrough`` (the default configuration),
``pt-no-xattrs`` (passthrough with ``xattrs=False``: the kernel stops asking
GETXATTR("security.capability") before every write) and ``python-path`` (no passthrough:
READ/WRITE served in Python, ``on_write`` for every write). Figures are medians over the
rounds; ratios are against ``direct``. Nothing here is asserted: this prints numbers.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from replication_agent.fuse import mount as fmount  # noqa: E402

MiB = 1 << 20
FSYNC_EVERY = 64 * MiB
IOPS_FILE = 64 * MiB
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    name: str
    directory: Path
    process: subprocess.Popen[str] | None = None
    seq_mibs: list[float] = field(default_factory=list)
    iops: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    seq_cpu: list[float] = field(default_factory=list)
    iops_cpu: list[float] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        if self.process is None:
            return 0.0
        fields_ = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields_[11]) + int(fields_[12])) / CLK_TCK


def start_daemon(backing: Path, mountpoint: Path, passthrough: bool,
                 xattrs: bool) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "replication_agent.fuse", str(backing), str(mountpoint)]
    if not passthrough:
        argv.append("--no-passthrough")
    if not xattrs:
        argv.append("--no-xattrs")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    ready = process.stdout.readline()
    if not ready.startswith("READY"):
        process.kill()
        raise RuntimeError(f"daemon did not start: {ready!r}")
    if passthrough and "passthrough=1" not in ready:
        process.kill()
        raise RuntimeError("the kernel refused passthrough")
    return process


def stop_daemon(process: subprocess.Popen[str], mountpoint: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(60)
    if process.stdout is not None:
        process.stdout.close()
    fmount.cleanup_stale(mountpoint)


def seq_write(directory: Path, total: int) -> float:
    """MiB/s of 1 MiB writes with an fsync every 64 MiB."""
    path = directory / "seq.bin"
    buf = os.urandom(MiB)
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    start = time.perf_counter()
    try:
        written = 0
        while written < total:
            written += os.write(fd, buf)
            if written % FSYNC_EVERY == 0:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    os.unlink(path)
    return total / MiB / elapsed


def iops_4k(directory: Path, count: int, seed: int) -> tuple[float, float, float]:
    """(IOPS, fsync p50 ms, fsync p99 ms) of 4 KiB pwrite + fsync at random offsets."""
    path = directory / "iops.bin"
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
    try:
        chunk = bytes(MiB)
        for _ in range(IOPS_FILE // MiB):
            os.write(fd, chunk)
        os.fsync(fd)
        rng = random.Random(seed)
        block = os.urandom(4096)
        latencies: list[float] = []
        start = time.perf_counter()
        for _ in range(count):
            os.pwrite(fd, block, rng.randrange(IOPS_FILE // 4096) * 4096)
            before = time.perf_counter()
            os.fsync(fd)
            latencies.append(time.perf_counter() - before)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    os.unlink(path)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return count / elapsed, p50, p99


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(targets: list[Target], size_mib: int, count: int, rounds: int) -> None:
    base = targets[0]
    print(f"\nseq write {size_mib} MiB (1 MiB writes, fsync every 64 MiB); "
          f"{count} x (4 KiB pwrite + fsync); median of {rounds} round(s)\n")
    header = (f"{'target':<13} {'seq MiB/s':>10} {'ratio':>6} {'IOPS':>8} {'ratio':>6} "
              f"{'fsync p50':>10} {'fsync p99':>10} {'cpu seq':>8} {'cpu iops':>9}")
    print(header)
    print("-" * len(header))
    for t in targets:
        seq, iops = median(t.seq_mibs), median(t.iops)
        cpu_seq = f"{median(t.seq_cpu):.2f}s" if t.process is not None else "-"
        cpu_iops = f"{median(t.iops_cpu):.2f}s" if t.process is not None else "-"
        print(f"{t.name:<13} {seq:>10.0f} {seq / median(base.seq_mibs):>5.2f}x "
              f"{iops:>8.0f} {iops / median(base.iops):>5.2f}x "
              f"{median(t.p50_ms):>8.3f}ms {median(t.p99_ms):>8.3f}ms "
              f"{cpu_seq:>8} {cpu_iops:>9}")
    print("\nper round (seq MiB/s | IOPS):")
    for t in targets:
        seqs = " ".join(f"{v:.0f}" for v in t.seq_mibs)
        iopss = " ".join(f"{v:.0f}" for v in t.iops)
        print(f"  {t.name:<13} {seqs} | {iopss}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB per sequential run")
    parser.add_argument("--iops", type=int, default=2000, help="4 KiB pwrite+fsync per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                        help="where the backing directory and mountpoints are created")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (FUSE mounts)", file=sys.stderr)
        return 2
    size = max(64, args.size // 64 * 64) * MiB
    work = Path(tempfile.mkdtemp(prefix="fuse-bench-", dir=args.dir))
    backing = work / "backing"
    backing.mkdir()
    targets = [Target("direct", backing)]
    try:
        for name, passthrough, xattrs in (("passthrough", True, True),
                                          ("pt-no-xattrs", True, False),
                                          ("python-path", False, True)):
            mountpoint = work / name
            mountpoint.mkdir()
            target = Target(name, mountpoint)
            target.process = start_daemon(backing, mountpoint, passthrough, xattrs)
            targets.append(target)
        for round_ in range(args.rounds):
            for t in targets:
                cpu = t.cpu_seconds()
                t.seq_mibs.append(seq_write(t.directory, size))
                t.seq_cpu.append(t.cpu_seconds() - cpu)
                cpu = t.cpu_seconds()
                iops, p50, p99 = iops_4k(t.directory, args.iops, seed=round_)
                t.iops_cpu.append(t.cpu_seconds() - cpu)
                t.iops.append(iops)
                t.p50_ms.append(p50)
                t.p99_ms.append(p99)
                print(f"round {round_ + 1} {t.name:<12} seq {t.seq_mibs[-1]:7.0f} MiB/s  "
                      f"iops {iops:6.0f}  p50 {p50:.3f} ms  p99 {p99:.3f} ms", flush=True)
        report(targets, size // MiB, args.iops, args.rounds)
    finally:
        for t in targets:
            if t.process is not None:
                stop_daemon(t.process, t.directory)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
