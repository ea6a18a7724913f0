"""Run a ``sharedsync-agent`` as a child process and talk to it: demos, tests, benchmarks.

Each agent is a ``python -m replication_agent run`` process with its own data directory and
control socket (its config is written next to them); callers use its Agent API over that socket
exactly as the operator does.
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

from .proto import agent_pb2 as pb
from .proto import agent_pb2_grpc


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
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "agent.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.socket.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.argv_prefix, sys.executable, "-m", "replication_agent", "run",
                 "--config", str(config_path), "--log-format", "json", "--log-level", "DEBUG"],
                stdout=log, stderr=log, env={**os.environ, **self.env},
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
