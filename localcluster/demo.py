"""The README's first command (``scripts/demo``): the whole product on a local cluster.

Steps, each printed with its duration: bring up the local cluster (``scripts/cluster up``:
control plane, three real nodes, images built and imported), ``helm install sharedsync
charts/`` with the local-cluster values, apply the ``deploy/`` examples (one SyncPolicy per
mode, the Synchronous StorageClass and the StatefulSet ``journal`` whose pods fsync a journal
line every second), wait until every pod runs on its replicated volume, and show
``kubectl get sp,sv,pvc,pods -o wide`` with what to try next. ``scripts/demo down`` tears it
all down (``scripts/cluster down``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from localcluster import cluster
from localcluster.layout import DEFAULT_NODES, REPO, TOOLS_BIN, state_dir
from localcluster.processes import StepError, run

NAMESPACE = "demo"
RELEASE = "sharedsync"
RELEASE_NAMESPACE = "sharedsync"
#: deploy/ examples name a public busybox; the local cluster has no registry, and imports
#: Debian's busybox under this name instead (scripts/build-node-images).
PUBLIC_BUSYBOX = "docker.io/library/busybox:1.37"
LOCAL_BUSYBOX = "localhost/busybox:1.35"
EXAMPLES = ("syncpolicies.yaml", "storageclass-synchronous.yaml")
WAIT = "300s"


def _helm(*args: str, timeout: float = 600) -> str:
    return run([str(TOOLS_BIN / "helm"), f"--kubeconfig={state_dir() / 'kubeconfig'}", *args],
               timeout=timeout).stdout


def _kubectl(*args: str, input: str | None = None, timeout: float = 330) -> str:
    return run([str(TOOLS_BIN / "kubectl"), f"--kubeconfig={state_dir() / 'kubeconfig'}", *args],
               input=input, timeout=timeout).stdout


def _step(number: int, text: str, action: Callable[[], object]) -> None:
    print(f"[{number}] {text}", flush=True)
    start = time.monotonic()
    action()
    print(f"    {time.monotonic() - start:.1f}s", flush=True)


def install() -> None:
    _helm("upgrade", "--install", RELEASE, str(REPO / "charts"), "-n", RELEASE_NAMESPACE,
          "--create-namespace", "-f", str(REPO / "charts" / "ci" / "local-values.yaml"),
          "--wait", f"--timeout={WAIT}")


def apply_examples() -> None:
    for name in EXAMPLES:
        _kubectl("apply", "-f", str(REPO / "deploy" / name))
    _kubectl("apply", "-f", "-", input=_kubectl("create", "namespace", NAMESPACE,
                                                "--dry-run=client", "-o", "yaml"))
    manifest = (REPO / "deploy" / "statefulset.yaml").read_text()
    _kubectl("apply", "-n", NAMESPACE, "-f", "-",
             input=manifest.replace(PUBLIC_BUSYBOX, LOCAL_BUSYBOX))


def wait_for_workload() -> None:
    _kubectl("rollout", "status", "statefulset/journal", "-n", NAMESPACE, f"--timeout={WAIT}")
    _kubectl("wait", "--for=condition=Ready", "sv", "--all", f"--timeout={WAIT}")


def up(nodes: int = DEFAULT_NODES) -> None:
    started = time.monotonic()
    _step(1, f"local cluster: {nodes} real nodes (scripts/cluster up)", lambda: cluster.up(nodes))
    _step(2, "helm install sharedsync charts/ (local images)", install)
    _step(3, "kubectl apply deploy/syncpolicies.yaml, storageclass-synchronous.yaml, "
             "statefulset.yaml", apply_examples)
    _step(4, "wait: the StatefulSet's pods run on replicated Synchronous volumes",
          wait_for_workload)
    print(_kubectl("get", "sp,sv", "-o", "wide"))
    print(_kubectl("get", "pvc,pods", "-n", NAMESPACE, "-o", "wide"))
    kubeconfig = state_dir() / "kubeconfig"
    print(f"""demo ready in {time.monotonic() - started:.0f}s. Try:
  export KUBECONFIG={kubeconfig} PATH={TOOLS_BIN}:{REPO / '.venv' / 'bin'}:$PATH
  kubectl sharedsync status -n {NAMESPACE}             # replicas, primary, lag of each volume
  kubectl exec -n {NAMESPACE} journal-0 -- tail -3 /data/journal.log
  sudo scripts/cluster kill-node node-2                  # a power cut: failover, the pod moves
  kubectl get sv -w
  sudo scripts/cluster restart-node node-2               # it comes back and catches up
  kubectl patch sp async --type merge -p '{{"spec":{{"mode":"Synchronous"}}}}'   # live change
  sudo scripts/demo down                                 # stop everything, put the host back""")


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["down"]:
            cluster.down()
        elif not argv:
            up()
        else:
            print("usage: scripts/demo [down]", file=sys.stderr)
            return 2
    except StepError as error:
        print(f"scripts/demo: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
