"""Start and drive real agent processes for integration tests.

Each agent is a ``python -m replication_agent run`` process with its own data directory and
control socket; tests talk to it over its Agent API exactly as the operator will.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from replication_agent.process import AgentProcess
from replication_agent.proto import agent_pb2 as pb
from sharedsync.storage.leftovers import leftovers_under
from tests.leaks import force_cleanup

REPO = Path(__file__).resolve().parents[2]


def volume_spec(volume_id: str, nodes: Sequence[str], primary: str, *,
                mode: pb.Mode.ValueType = pb.ASYNCHRONOUS, size: int = 256 << 20, epoch: int = 1,
                write_quorum: int = 0, max_lag: float = 1.0, bandwidth: int = 0,
                schedule: str = "") -> pb.VolumeSpec:
    return pb.VolumeSpec(
        volume_id=volume_id, size_bytes=size, kind="filesystem", replica_nodes=list(nodes),
        primary_node=primary, epoch=epoch,
        policy=pb.VolumePolicy(mode=mode, replicas=len(nodes), write_quorum=write_quorum,
                               max_lag_seconds=max_lag, bandwidth_bytes_per_second=bandwidth,
                               schedule=schedule, priority=1, auto_repair=True))


def wait_until(predicate: Any, timeout: float = 60, interval: float = 0.1,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:
            last = exc
        time.sleep(interval)
    suffix = f" (last error: {last})" if last else ""
    raise AssertionError(f"timed out waiting for {what}{suffix}")


def errno_of(call: Any) -> int | None:
    """The errno of the OSError ``call()`` raised, None when it succeeded (what a pod's
    system call on a volume returned)."""
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


AGENT_PORT = 7400


def controller_name(client: str) -> str:
    """The name on the certificate of the harness's Agent API client ``client``: the
    operator's carries the one agents accept by default (``controllerNames``)."""
    from replication_agent.tls import CONTROLLER_NAME
    return CONTROLLER_NAME if client == "operator" else client
METRICS_PORT = 9810


class AgentCluster:
    """Agents in network namespaces on a private bridge, talking mutual TLS through proxies.

    Every agent dials each peer through a fault proxy running in its own namespace, so a test
    can slow, cap, partition or reset any one direction of any link (``direct_links``: no
    proxies, for benchmarks that measure the product's own path). Agents join only the
    namespace's *network* (``nsenter --net``), not a private mount namespace, so the replicas
    they mount are visible to the test, which checks data and leaks directly.
    """

    def __init__(self, workdir: Path, names: Sequence[str] = ("a", "b", "c"), *,
                 extra_config: dict[str, Any] | None = None,
                 node_config: Mapping[str, dict[str, Any]] | None = None,
                 clients: Sequence[str] = (), direct_links: bool = False) -> None:
        from replication_agent.dev_pki import issue_dev_pki
        from tests.cluster.faultproxy import start_proxy_process
        from tests.cluster.netns import TestNetwork

        self.workdir = workdir
        self.net = TestNetwork().start()
        self.nodes = {name: self.net.add_node(name) for name in names}
        issued = {i.node: i.tls for i in issue_dev_pki(
            workdir / "pki", {n: node.endpoint(AGENT_PORT) for n, node in self.nodes.items()},
            controllers=[controller_name(c) for c in clients])}
        #: Certificates for Agent API clients that are not agents (the operator), named as the
        #: agents' default controllerNames expect.
        self.client_tls = {c: issued[controller_name(c)] for c in clients}
        self.proxies: dict[tuple[str, str], Any] = {}
        self.agents: dict[str, AgentProcess] = {}
        for src, node in self.nodes.items():
            peers = {}
            for dst, peer in self.nodes.items():
                if dst == src:
                    continue
                if direct_links:  # benchmarks: the product's own path, nothing in between
                    peers[dst] = peer.endpoint(AGENT_PORT)
                    continue
                proxy = start_proxy_process(self.net, node, listen=(node.address, 0),
                                            target=(peer.address, AGENT_PORT),
                                            control=(node.address, 0))
                self.proxies[(src, dst)] = proxy
                peers[dst] = f"{proxy.listen[0]}:{proxy.listen[1]}"
            home = workdir / src
            home.mkdir(parents=True, exist_ok=True)
            tls = issued[src]
            config = {"node": src, "listen": node.endpoint(AGENT_PORT),
                      "controlSocket": str(home / "agent.sock"), "dataDir": str(home / "data"),
                      "tls": {"ca": str(tls.ca), "cert": str(tls.cert), "key": str(tls.key)},
                      "metricsAddress": node.endpoint(METRICS_PORT), "peers": peers,
                      **(extra_config or {}), **(node_config or {}).get(src, {})}
            self.agents[src] = AgentProcess(
                node=src, listen=node.endpoint(AGENT_PORT), workdir=home, config=config,
                argv_prefix=("nsenter", f"--net=/run/netns/{node.namespace}", "--"))

    def metrics_url(self, name: str) -> str:
        return f"http://{self.nodes[name].endpoint(METRICS_PORT)}/metrics"

    def audit_files(self, name: str) -> list[Path]:
        """The node's audit log files, oldest first."""
        directory = self.agents[name].data_dir / "agent" / "audit"
        rotated = sorted(directory.glob("audit.log.*"), key=lambda p: -int(p.suffix[1:]))
        return [*rotated, directory / "audit.log"]

    def rebuild_starts(self, name: str) -> list[dict[str, str | int | float | bool]]:
        """The full streams node ``name`` began to send (a new replica, or one rebuilt from
        scratch), from its audit log, oldest first."""
        from replication_agent.audit import read_records
        return [r.detail_map for r in read_records(
            [p for p in self.audit_files(name) if p.exists()])
            if r.kind == "rebuild" and r.detail_map.get("phase") == "start"]

    def start(self) -> AgentCluster:
        for agent in self.agents.values():
            agent.start()
        return self

    def partition(self, name: str) -> None:
        """Cut every link to and from ``name`` (the proxies drop data both ways)."""
        for (src, dst), proxy in self.proxies.items():
            if name in (src, dst):
                proxy.client.partition()
                proxy.client.reset()

    def heal(self, name: str) -> None:
        for (src, dst), proxy in self.proxies.items():
            if name in (src, dst):
                proxy.client.heal()

    def apply(self, spec: pb.VolumeSpec, nodes: Sequence[str] | None = None) -> None:
        for name in nodes or spec.replica_nodes:
            self.agents[name].call("ApplyVolume", pb.ApplyVolumeRequest(spec=spec))

    def close(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        try:
            self.net.teardown()
        finally:
            leaked = leftovers_under(self.workdir)
            force_cleanup(self.workdir)
            if leaked:
                raise AssertionError(f"agents left behind: {leaked}")


#: The replica stores every file-level suite runs on (parametrize a ``cluster`` fixture).
STORE_FILESYSTEMS = ["btrfs", "ext4"]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under ``root`` (symlinks by target)."""
    import hashlib

    digests = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            digests[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            digests[rel] = "dir"
    return digests


def started_cluster(tmp_path_factory: Any, name: str,
                    store_filesystem: str | Mapping[str, str] = "btrfs"
                    ) -> Iterator[AgentCluster]:
    """The body of a test module's ``cluster`` fixture: three agents in network namespaces,
    with their replicas on ``store_filesystem`` (one for all, or per node), started, and
    closed (with its leftover checks) afterwards; skipped where namespaces cannot be made."""
    import pytest

    from tests.cluster.netns import netns_unavailable

    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    if isinstance(store_filesystem, str):
        shared, per_node = {"storeFilesystem": store_filesystem}, {}
    else:
        shared, per_node = {}, {n: {"storeFilesystem": fs} for n, fs in store_filesystem.items()}
    cluster = AgentCluster(Path(tmp_path_factory.mktemp(name)), extra_config=shared,
                           node_config=per_node)
    try:
        yield cluster.start()
    finally:
        cluster.close()
