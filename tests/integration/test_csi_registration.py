"""In-process kubelet plugin registration: the real node plugin process, called as kubelet does.

kubelet's plugin watcher dials ``<kubelet-dir>/plugins_registry/<driver>-reg.sock``, calls
``pluginregistration.Registration/GetInfo`` and then ``NotifyRegistrationStatus``. These tests
play that part over a real unix socket against ``python -m csi_driver --role node
--kubelet-registration``. No mounts are made, so neither root nor the storage tools are needed;
the plugin is started here rather than by conftest's fixtures, which require both.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import pytest

from csi_driver.proto import csi_pb2, csi_pb2_grpc, pluginregistration_pb2
from csi_driver.proto import pluginregistration_pb2_grpc as reg_grpc

from .conftest import (
    DRIVER_NAME,
    NODE_ID,
    PYTHON,
    REPO_ROOT,
    RPC_TIMEOUT,
    START_TIMEOUT,
    STOP_TIMEOUT,
)

if TYPE_CHECKING:
    from csi_driver.proto.pluginregistration_pb2_grpc import RegistrationAsyncStub

pytestmark = pytest.mark.timeout(120)

REG_SOCKET_NAME = f"{DRIVER_NAME}-reg.sock"


@dataclass
class Node:
    """One node plugin process with registration on, and where it was told kubelet lives."""

    root: Path
    process: subprocess.Popen[bytes]

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    @property
    def csi_socket(self) -> Path:
        return self.root / "csi.sock"

    @property
    def reg_socket(self) -> Path:
        return self.kubelet / "plugins_registry" / REG_SOCKET_NAME

    @property
    def log_path(self) -> Path:
        return self.root / "plugin.log"

    def log_events(self) -> list[dict[str, Any]]:
        """The plugin's JSON log lines (stderr lines that are not JSON are skipped)."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    async def wait_log(self, event: str) -> dict[str, Any]:
        """The first log record with this ``event``, waiting (bounded) for it to be written."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RPC_TIMEOUT
        while True:
            for record in self.log_events():
                if record.get("event") == event:
                    return record
            if loop.time() > deadline:
                raise AssertionError(f"no {event!r} in the plugin log:\n"
                                     f"{self.log_path.read_text(errors='replace')[-3000:]}")
            await asyncio.sleep(0.05)

    async def wait_exit(self) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT
        while self.process.poll() is None:
            if loop.time() > deadline:
                raise TimeoutError(f"plugin pid {self.process.pid} still running")
            await asyncio.sleep(0.05)
        return self.process.returncode


class Launch(Protocol):
    def __call__(self, *extra: str, env: Mapping[str, str] | None = None,
                 wait: bool = True) -> Awaitable[Node]: ...


def _accepting(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture
def root() -> Iterator[Path]:
    """A short directory (unix socket paths must stay under 108 bytes) with a kubelet dir."""
    if not PYTHON.exists():
        pytest.skip(f"{PYTHON} not found (create the venv)")
    path = Path(tempfile.mkdtemp(prefix="ss-reg-", dir="/tmp"))
    (path / "kubelet").mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def launch(root: Path) -> AsyncIterator[Launch]:
    """Start ``--role node --kubelet-registration`` processes; each is stopped at the end."""
    started: list[Node] = []

    async def start(*extra: str, env: Mapping[str, str] | None = None,
                    wait: bool = True) -> Node:
        argv = [str(PYTHON), "-m", "csi_driver", "--role", "node",
                "--endpoint", f"unix://{root / 'csi.sock'}", "--node-id", NODE_ID,
                "--data-dir", str(root / "data"), "--kubelet-dir", str(root / "kubelet"),
                "--log-format", "json", *extra]
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("SHAREDSYNC_KUBELET_REGISTRATION", "CSI_ROLE")}
        child_env.update(env or {})
        process = _spawn(argv, child_env, root / "plugin.log")
        node = Node(root, process)
        started.append(node)
        if wait:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START_TIMEOUT
            while not _accepting(node.reg_socket):
                if process.poll() is not None:
                    raise RuntimeError(f"plugin exited at start ({process.returncode}):\n"
                                       f"{node.log_path.read_text(errors='replace')[-3000:]}")
                if loop.time() > deadline:
                    raise RuntimeError(f"plugin did not listen on {node.reg_socket} in time")
                await asyncio.sleep(0.05)
        return node

    yield start
    for node in started:
        if node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
            try:
                await node.wait_exit()
            except TimeoutError:
                node.process.kill()
                node.process.wait(timeout=STOP_TIMEOUT)


@contextlib.asynccontextmanager
async def kubelet(path: Path) -> AsyncIterator[RegistrationAsyncStub]:
    """A Registration client on ``path``, the way kubelet's plugin watcher dials it."""
    async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
        yield reg_grpc.RegistrationStub(channel)


async def test_get_info_reports_driver_and_kubelet_endpoint(launch: Launch) -> None:
    node = await launch("--kubelet-registration")
    mode = node.reg_socket.lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660
    async with kubelet(node.reg_socket) as registration:
        info = await registration.GetInfo(pluginregistration_pb2.InfoRequest(),
                                          timeout=RPC_TIMEOUT)
    assert info.type == "CSIPlugin"
    assert info.name == DRIVER_NAME
    assert info.endpoint == str(node.kubelet / "plugins" / DRIVER_NAME / "csi.sock")
    assert list(info.supported_versions) == ["1.0.0"]


async def test_env_switch_and_kubelet_endpoint(launch: Launch) -> None:
    """SHAREDSYNC_KUBELET_REGISTRATION turns it on; --kubelet-endpoint is what kubelet is told."""
    endpoint = "/var/lib/kubelet/plugins/csi.sharedsync.io/other.sock"
    node = await launch("--kubelet-endpoint", endpoint,
                        env={"SHAREDSYNC_KUBELET_REGISTRATION": "true"})
    async with kubelet(node.reg_socket) as registration:
        info = await registration.GetInfo(pluginregistration_pb2.InfoRequest(),
                                          timeout=RPC_TIMEOUT)
    assert info.endpoint == endpoint


async def test_registration_status_is_logged_and_refusal_keeps_serving(launch: Launch) -> None:
    node = await launch("--kubelet-registration")
    async with kubelet(node.reg_socket) as registration:
        await registration.NotifyRegistrationStatus(
            pluginregistration_pb2.RegistrationStatus(plugin_registered=True),
            timeout=RPC_TIMEOUT)
        accepted = await node.wait_log("registered with kubelet")
        assert accepted["level"] == "info"

        await registration.NotifyRegistrationStatus(
            pluginregistration_pb2.RegistrationStatus(
                plugin_registered=False, error="plugin name csi.sharedsync.io already taken"),
            timeout=RPC_TIMEOUT)
        refused = await node.wait_log("kubelet refused the registration")
        assert refused["level"] == "error"
        assert refused["error"] == "plugin name csi.sharedsync.io already taken"

        # still serving both sockets: kubelet retries the registration
        assert node.process.poll() is None
        info = await registration.GetInfo(pluginregistration_pb2.InfoRequest(),
                                          timeout=RPC_TIMEOUT)
        assert info.name == DRIVER_NAME
    async with grpc.aio.insecure_channel(f"unix://{node.csi_socket}") as channel:
        node_info = await csi_pb2_grpc.NodeStub(channel).NodeGetInfo(
            csi_pb2.NodeGetInfoRequest(), timeout=RPC_TIMEOUT)
    assert node_info.node_id == NODE_ID


async def test_sigterm_removes_the_registration_socket(launch: Launch) -> None:
    node = await launch("--kubelet-registration")
    node.process.send_signal(signal.SIGTERM)
    assert await node.wait_exit() == 0
    assert not node.reg_socket.exists()
    assert not node.csi_socket.exists()
    assert (node.kubelet / "plugins_registry").is_dir()


async def test_stale_socket_is_replaced(launch: Launch, root: Path) -> None:
    """A socket left by a killed plugin (nobody listening) does not stop the next one."""
    stale = root / "kubelet" / "plugins_registry" / REG_SOCKET_NAME
    stale.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as leftover:
        leftover.bind(str(stale))
    assert stat.S_ISSOCK(stale.lstat().st_mode)
    assert not _accepting(stale)
    node = await launch("--kubelet-registration")
    async with kubelet(node.reg_socket) as registration:
        info = await registration.GetInfo(pluginregistration_pb2.InfoRequest(),
                                          timeout=RPC_TIMEOUT)
    assert info.name == DRIVER_NAME


@pytest.mark.parametrize("kind", ["missing", "file"])
async def test_bad_kubelet_dir_is_a_clear_startup_error(launch: Launch, root: Path,
                                                        kind: str) -> None:
    shutil.rmtree(root / "kubelet")
    if kind == "file":
        (root / "kubelet").write_text("not a directory\n")
    node = await launch("--kubelet-registration", wait=False)
    assert await node.wait_exit() == 2
    log = node.log_path.read_text(errors="replace")
    assert f"--kubelet-dir {root / 'kubelet'} is not a directory" in log
    assert "Traceback" not in log
    assert not node.csi_socket.exists()  # the CSI socket it had opened is cleaned up


async def test_something_else_at_the_socket_path_is_left_alone(launch: Launch,
                                                               root: Path) -> None:
    path = root / "kubelet" / "plugins_registry" / REG_SOCKET_NAME
    path.parent.mkdir()
    path.write_text("precious\n")
    node = await launch("--kubelet-registration", wait=False)
    assert await node.wait_exit() == 2
    assert "is not a socket; refusing to replace it" in node.log_path.read_text(errors="replace")
    assert path.read_text() == "precious\n"


async def test_controller_role_refuses_registration(launch: Launch) -> None:
    node = await launch("--kubelet-registration", "--role", "controller", wait=False)
    assert await node.wait_exit() == 2
    assert "--kubelet-registration registers a node plugin" in node.log_path.read_text()
    assert not node.csi_socket.exists()


async def test_off_by_default(launch: Launch) -> None:
    node = await launch(wait=False)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while not _accepting(node.csi_socket):
        assert node.process.poll() is None, node.log_path.read_text(errors="replace")
        assert loop.time() < deadline, "plugin did not listen in time"
        await asyncio.sleep(0.05)
    assert not (node.kubelet / "plugins_registry").exists()
