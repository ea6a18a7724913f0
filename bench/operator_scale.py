"""6. Operator at scale: 200 SharedVolumes from the CSI controller's write to Ready.

A real control plane (etcd + kube-apiserver + kube-controller-manager, tests/controlplane),
three real agents in network namespaces announcing themselves with Leases, the real operator
with the chart's RBAC. The volumes (Asynchronous, 2 replicas, 64 MiB asked, so the 256 MiB
minimum replica) are written exactly as the CSI controller writes them in a cluster: through
its Kubernetes state store (csi_driver/state/kubernetes.py). The clock runs from the first
write until every volume's Ready condition is True.

Figures: volumes per second (goal >= 3/s), the operator's peak RSS (VmHWM; goal <= 150 MiB) and
API requests per volume. The last comes from the API server's own counter of requests it
dispatched for service accounts (flow schema ``service-accounts``: the operator and the
agents; the benchmark itself is an admin and not counted), minus the idle rate of those same
clients (Lease renewals, watches) measured for 10 s before the first write.
Baseline: how fast the same API server accepts the 200 writes alone (no operator work).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Figure, NotAvailable, Result, log, main, ratio

NAME = "operator"
TITLE = "Operator: SharedVolumes from the CSI write to Ready, with RSS and API requests"

_DISPATCHED = re.compile(
    r'^apiserver_flowcontrol_dispatched_requests_total\{[^}]*flow_schema="service-accounts"'
    r'[^}]*\} (\S+)$', re.M)


def _service_account_requests(cp: Any) -> float:
    text = cp.kubectl("get", "--raw", "/metrics", timeout=60).stdout
    return sum(float(v) for v in _DISPATCHED.findall(text))


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _write_volumes(kubeconfig: Path, names: list[str], policy: str) -> float:
    """Create the records as CreateVolume does; returns the seconds the writes took."""
    from csi_driver.state.kubernetes import KubernetesStateStore
    from sharedsync.core.records import VolumeRecord

    store = await KubernetesStateStore.connect(kubeconfig)
    started = time.monotonic()
    try:
        semaphore = asyncio.Semaphore(16)

        async def one(name: str) -> None:
            async with semaphore:
                await store.put_volume(VolumeRecord(
                    volume_id=name, name=f"pvc-{name}", capacity_bytes=64 << 20,
                    kind="filesystem", access_modes=("ReadWriteOnce",),
                    parameters=(("syncPolicy", policy),), created_at=time.time()))
        await asyncio.gather(*(one(n) for n in names))
        return time.monotonic() - started
    finally:
        await store.close()


def _ready(cp: Any, names: set[str]) -> int:
    out = cp.kubectl("get", "sv", "-o", "json", timeout=120)
    count = 0
    for item in json.loads(out.stdout)["items"]:
        if item["metadata"]["name"] not in names:
            continue
        for cond in (item.get("status") or {}).get("conditions") or ():
            if cond["type"] == "Ready" and cond["status"] == "True":
                count += 1
    return count


def body(quick: bool, workdir: Path, result: Result) -> None:
    from tests.cluster.netns import netns_unavailable
    from tests.controlplane.controlplane import ControlPlane, missing_binaries
    from tests.controlplane.operator_harness import OperatorCluster, policy

    reason = netns_unavailable()
    if reason:
        raise NotAvailable(reason)
    if missing_binaries():
        raise NotAvailable(f"missing {missing_binaries()} (run scripts/build-tools)")
    count = 40 if quick else 200
    result.params.update(volumes=count, replicas=2, mode="Asynchronous", asked_bytes=64 << 20)
    cp = ControlPlane(workdir / "cp").start()
    cluster = None
    try:
        cp.apply_crds()
        # baseline: the API server alone takes the same writes (then they are deleted)
        base_names = [f"vol-{i:08x}" + "b" * 16 for i in range(count)]
        baseline = asyncio.run(_write_volumes(cp.kubeconfig, base_names, "none"))
        cp.kubectl("delete", "sv", "--all", "--wait=true", timeout=300)
        log(f"baseline: {count} writes alone in {baseline:.2f} s")

        # the default Lease duration (15 s): on a loaded 2-core machine the tests' 4 s Leases
        # expire while agents format hundreds of replicas, which would measure failovers
        cluster = OperatorCluster(cp, workdir / "cluster", lease_seconds=15).start()
        cluster.apply(policy("bench", mode="Asynchronous", replicas=2, maxLag="5s"))
        cluster.wait_condition("sp", "bench", "Ready")
        idle_start, idle_requests = time.monotonic(), _service_account_requests(cp)
        time.sleep(10)
        idle_rate = (_service_account_requests(cp) - idle_requests) / (
            time.monotonic() - idle_start)
        log(f"idle service-account request rate: {idle_rate:.1f}/s")

        names = [f"vol-{i:08x}" + "c" * 16 for i in range(count)]
        before = _service_account_requests(cp)
        started = time.monotonic()
        write_seconds = asyncio.run(_write_volumes(cp.kubeconfig, names, "bench"))
        log(f"{count} SharedVolumes written in {write_seconds:.2f} s; waiting for Ready")
        progress = []
        while True:
            ready = _ready(cp, set(names))
            progress.append((round(time.monotonic() - started, 1), ready))
            if ready >= count:
                break
            if time.monotonic() - started > 1800:
                raise TimeoutError(f"only {ready} of {count} volumes Ready after 1800 s")
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        requests = _service_account_requests(cp) - before - idle_rate * elapsed
        assert cluster.operator.process is not None
        rss = _peak_rss_mib(cluster.operator.process.pid)
        holders = {name: len(cluster.holders(name)) for name in names[:10]}
        result.details.update(progress=progress[-50:], write_seconds=write_seconds,
                              idle_request_rate=idle_rate, sample_replica_counts=holders)
    finally:
        if cluster is not None:
            try:
                cluster.close()
            except AssertionError as exc:  # leftovers were cleaned up by close itself
                result.warnings.append(f"cluster close: {str(exc)[:300]}")
        cp.stop()
    rate = count / elapsed
    base_rate = count / baseline
    log(f"{count} volumes Ready in {elapsed:.1f} s = {rate:.2f}/s; operator peak RSS "
        f"{rss:.0f} MiB; {requests / count:.1f} API requests per volume")
    result.add(Figure("volumes from CSI write to Ready", rate, "volumes/s",
                      baseline="API server accepting the writes alone", baseline_value=base_rate,
                      ratio=ratio(rate, base_rate), goal=">= 3/s", met=rate >= 3,
                      note=f"{count} volumes in {elapsed:.1f} s, 2 replicas each"))
    result.add(Figure("operator peak RSS", rss, "MiB", goal="<= 150 MiB", met=rss <= 150))
    result.add(Figure("API requests per volume (operator + agents)", requests / count,
                      "requests", note="service-account requests dispatched by the API "
                                       "server, idle rate subtracted"))


if __name__ == "__main__":
    sys.exit(main(NAME, TITLE, body))
