"""Start and drive real agent processes for integration tests.

Each agent is a ``python -m replication_agent run`` process with its own data directory and
control socket; tests talk to it over its Agent API exactly as the operator will.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from replication_agent.proto import agent_pb2 as pb
from replication_agent.proto import agent_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


@dataclass
class AgentProcess:
    """One running agent."""

    node: str
    listen: str
    workdir: Path
    config: dict[str, Any]
    argv_prefix: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def start(self, timeout: float = 30) -> None:
        config_path = self.workdir / "agent.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.socket.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.argv_prefix, sys.executable, "-m", "replication_agent", "run",
                 "--config", str(config_path), "--log-format", "json", "--log-level", "DEBUG"],
                stdout=log, stderr=log, cwd=REPO, env={**os.environ, **self.env},
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent {self.node} exited: {self.log_tail()}")
            if self.socket.exists():
                try:
                    self.status()
                    return
                except grpc.RpcError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"agent {self.node} did not start: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL, the crash every test must survive."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def stub(self) -> tuple[grpc.Channel, agent_pb2_grpc.AgentStub]:
        channel = grpc.insecure_channel(f"unix://{self.socket}")
        return channel, agent_pb2_grpc.AgentStub(channel)

    def call(self, method: str, request: Any, timeout: float = 120) -> Any:
        channel, stub = self.stub()
        with channel:
            return getattr(stub, method)(request, timeout=timeout)

    def status(self, volume_id: str | None = None) -> pb.AgentStatus:
        status: pb.AgentStatus = self.call("GetStatus", pb.GetStatusRequest(
            volume_ids=[volume_id] if volume_id else []), timeout=10)
        return status

    def volume(self, volume_id: str) -> pb.VolumeStatus:
        return self.status(volume_id).volumes[0]

    def live(self, volume_id: str) -> Path:
        return self.data_dir / "replicas" / "mnt" / volume_id / "live"

    def sync_dir(self, volume_id: str) -> Path:
        return self.data_dir / "replicas" / "mnt" / volume_id / "sync"


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


AGENT_PORT = 7400
METRICS_PORT = 9810


class AgentCluster:
    """Agents in network namespaces on a private bridge, talking mutual TLS through proxies.

    Every agent dials each peer through a fault proxy running in its own namespace, so a test
    can slow, cap, partition or reset any one direction of any link. Agents join only the
    namespace's *network* (``nsenter --net``), not a private mount namespace, so the replicas
    they mount are visible to the test, which checks data and leaks directly.
    """

    def __init__(self, workdir: Path, names: Sequence[str] = ("a", "b", "c")) -> None:
        from replication_agent.tls import issue_dev_pki
        from tests.cluster.faultproxy import start_proxy_process
        from tests.cluster.netns import TestNetwork

        self.workdir = workdir
        self.net = TestNetwork().start()
        self.nodes = {name: self.net.add_node(name) for name in names}
        issued = {i.node: i.tls for i in issue_dev_pki(
            workdir / "pki", {n: node.endpoint(AGENT_PORT) for n, node in self.nodes.items()})}
        self.proxies: dict[tuple[str, str], Any] = {}
        self.agents: dict[str, AgentProcess] = {}
        for src, node in self.nodes.items():
            peers = {}
            for dst, peer in self.nodes.items():
                if dst == src:
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
                      "metricsAddress": node.endpoint(METRICS_PORT), "peers": peers}
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
            leaked = leftovers(self.workdir)
            for line in leaked:
                cleanup_leftover(line)
            if leaked:
                raise AssertionError(f"agents left behind: {leaked}")


def leftovers(root: Path) -> list[str]:
    """Mounts and loop devices under ``root`` (a test must leave none)."""
    prefix = f"{root}/"
    found = [f"mount {line.split()[4]}" for line in
             Path("/proc/self/mountinfo").read_text().splitlines()
             if line.split()[4].startswith(prefix)]
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-FILE"],
                         capture_output=True, text=True, check=False).stdout
    found += [f"loop {line.split()[0]} {line.split()[1]}" for line in out.splitlines()
              if prefix in line]
    return found


def cleanup_leftover(entry: str) -> None:
    kind, _, rest = entry.partition(" ")
    if kind == "mount":
        subprocess.run(["umount", "-l", rest], check=False)
    else:
        subprocess.run(["losetup", "-d", rest.split()[0]], check=False)


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
