"""5. QoS: a volume capped at 20 MiB/s ships at 20 MiB/s.

An Asynchronous volume on a, b, c with ``bandwidth_bytes_per_second`` = 20 MiB/s (the cap is
the volume's: one token bucket shared by its links). 200 MiB (quick: 60 MiB) of random
(incompressible) files are written at once; a's ``bytes_shipped`` is sampled every 100 ms until
both peers are in sync. The achieved rate is the least-squares slope of bytes_shipped over the
steady state: from one second after the first byte was shipped to the sample that reached
the final count. The link proxies' byte counters (a->b, a->c) give the same over the wire.
Goal: within +-10% of 20 MiB/s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.common import (
    Figure,
    MiB,
    Result,
    Sampler,
    StatusClient,
    agent_cluster,
    log,
    main,
    proxy_bytes,
    ratio,
    wait_in_sync,
    write_random_files,
)
from replication_agent.proto import agent_pb2 as pb

NAME = "qos"
TITLE = "QoS: replication rate of a volume capped at 20 MiB/s"
VOLUME = "vol-" + "90" * 12
CAP = 20 * MiB
PEERS = ("b", "c")


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over t."""
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return sum((t - mt) * (y - my) for t, y in points) / var


def body(quick: bool, workdir: Path, result: Result) -> None:
    from tests.integration.agent_harness import volume_spec

    data = 60 * MiB if quick else 200 * MiB
    files = data // (4 * MiB)
    size = 512 * MiB if quick else 1 << 30
    result.params.update(cap_bytes_per_s=CAP, data_bytes=data, replicas=3, volume_bytes=size,
                         sample_interval_s=0.1)
    with agent_cluster(workdir, result) as cluster:
        spec = volume_spec(VOLUME, ["a", "b", "c"], "a", mode=pb.ASYNCHRONOUS, max_lag=1.0,
                           bandwidth=CAP, size=size)
        cluster.apply(spec)
        a = cluster.agents["a"]
        with StatusClient(a.socket) as status:
            wait_in_sync(status, VOLUME, PEERS, timeout=60)
            base = status.volume(VOLUME).bytes_shipped

            def sample() -> tuple[int, int]:
                shipped = status.volume(VOLUME).bytes_shipped
                wire = sum(proxy_bytes(cluster, "a", p)["up"] for p in PEERS)
                return shipped, wire

            log(f"writing {data // MiB} MiB; cap {CAP // MiB} MiB/s shared by 2 links")
            with Sampler(sample, 0.1) as sampler:
                written_at = time.monotonic()
                write_random_files(a.live(VOLUME) / "data", files, data // files, seed=5)
                written = time.monotonic() - written_at
                expected = 2 * data / CAP
                wait_in_sync(status, VOLUME, PEERS, timeout=3 * expected + 60)
                time.sleep(0.3)
    samples = [(t, v[0] - base, v[1]) for t, v in sampler.samples]
    final = samples[-1][1]
    t_first = next(t for t, b, _ in samples if b > 0)
    t_last = next(t for t, b, _ in samples if b >= final)
    window = [(t, b, w) for t, b, w in samples if t_first + 1.0 <= t <= t_last]
    rate = slope([(t, b) for t, b, _ in window])
    wire_rate = slope([(t, w) for t, _, w in window])
    mean = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) \
        if len(window) >= 2 else None
    overall = final / (t_last - t_first) if t_last > t_first else None
    result.details.update(
        shipped_bytes=final, write_seconds=written, first_byte_after_write_start_s=t_first -
        written_at, transfer_seconds=t_last - t_first, window_samples=len(window),
        window_mean_mib_s=mean / MiB if mean else None,
        overall_mib_s=overall / MiB if overall else None,
        wire_slope_mib_s=wire_rate / MiB if wire_rate else None,
        first_second_mib=next((b for t, b, _ in samples if t >= t_first + 1.0), 0) / MiB,
        series=[(round(t - t_first, 2), round(b / MiB, 2)) for t, b, _ in samples
                if t >= t_first][::5])
    log(f"shipped {final / MiB:.0f} MiB in {t_last - t_first:.1f} s; steady-state slope "
        f"{(rate or 0) / MiB:.2f} MiB/s over {len(window)} samples; wire "
        f"{(wire_rate or 0) / MiB:.2f} MiB/s")
    q = ratio(rate, CAP)
    result.add(Figure("replication rate at a 20 MiB/s cap", rate / MiB if rate else None,
                      "MiB/s", baseline="cap", baseline_value=CAP / MiB, ratio=q,
                      goal="within +-10% of 20 MiB/s",
                      met=q is not None and 0.9 <= q <= 1.1,
                      note="agent bytes_shipped slope, first second excluded"))
    q = ratio(wire_rate, CAP)
    result.add(Figure("(diag) wire rate at the cap (proxies a->b + a->c)",
                      wire_rate / MiB if wire_rate else None, "MiB/s", baseline="cap",
                      baseline_value=CAP / MiB, ratio=q,
                      note="diagnostic: what crossed the links (TLS/HTTP2 included)"))


if __name__ == "__main__":
    sys.exit(main(NAME, TITLE, body))
