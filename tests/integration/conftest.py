"""Fixtures for integration tests: a real plugin process, real gRPC over a unix socket.

Every test gets its own short directory under /tmp (a unix socket path must stay under 108
bytes) holding the plugin's data dir, the "kubelet" dir that staging and target paths live in,
the socket and the plugin's log. The plugin is the real ``python -m csi_driver`` in a
subprocess; nothing in it is mocked. When a test ends the plugin is stopped (SIGTERM, then
SIGKILL) and the directory is checked for leaks: a mount under it or a loop device backed by a
file under it fails the test, after which both are cleaned up anyway so that one failure does
not poison the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import grpc
import pytest

from csi_driver.backend import missing_tools
from csi_driver.proto import csi_pb2, csi_pb2_grpc

if TYPE_CHECKING:
    from csi_driver.proto.csi_pb2_grpc import (
        ControllerAsyncStub,
        IdentityAsyncStub,
        NodeAsyncStub,
    )

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
NODE_ID = "test-node"
DRIVER_NAME = "csi.sharedsync.io"
TOPOLOGY_KEY = "topology.sharedsync.io/node"
MiB = 1 << 20
#: The smallest volume the driver makes (sharedsync.core.sizes.MIN_VOLUME_BYTES): asking for
#: less (the tests ask for 64 MiB) gets this much. Images are sparse, so it costs little.
MIN_VOLUME_BYTES = 256 * MiB
SMALL = 64 * MiB
#: Bounds on waiting for the plugin: start (socket up, answering), stop, and one RPC.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
RPC_TIMEOUT = 60.0

AccessMode = csi_pb2.VolumeCapability.AccessMode
Mode: TypeAlias = "csi_pb2.VolumeCapability.AccessMode.Mode.ValueType"


# -- leaks ---------------------------------------------------------------------------------------


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040``: a space), without the code under test."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, in mount order, from /proc/self/mountinfo."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split(" ")[4])
        if point == str(root) or point.startswith(prefix):
            found.append(point)
    return found


def mount_options(point: Path) -> set[str]:
    """Per-mount options of the topmost mount at ``point``."""
    options: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if _unescape(fields[4]) == str(point):
            options = set(fields[5].split(","))
    return options


def loops_under(root: Path, *, detaching: bool = True) -> list[tuple[str, str]]:
    """(device, backing file) of every loop device whose backing file is under ``root``.

    With ``detaching=False``, devices with a detach pending (autoclear set by ``losetup -d``
    while someone had them open; see :func:`settled_loops_under`) are left out.
    """
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,AUTOCLEAR,BACK-FILE"],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    prefix = str(root).rstrip("/") + "/"
    found = []
    for line in out.splitlines():
        name, autoclear, back = [*line.split(None, 2), "", ""][:3]
        back = back.strip().removesuffix(" (deleted)")
        if back.startswith(prefix) and (detaching or autoclear != "1"):
            found.append((name, back))
    return found


#: How long a detached loop device may take to go away (see :func:`settled_loops_under`).
LOOP_SETTLE_SECONDS = 10.0


def settled_loops_under(root: Path, within: float = LOOP_SETTLE_SECONDS) -> list[tuple[str, str]]:
    """:func:`loops_under`, after waiting (bounded) for pending detaches to finish.

    ``losetup --detach`` of a device that another process holds open at that instant (btrfs-progs
    scanning every block device during a concurrent mkfs, blkid, udev) only sets autoclear, and
    the kernel detaches it when that opener closes, a moment later. That is not a leak; a device
    still attached after ``within`` seconds is.
    """
    deadline = time.monotonic() + within
    while True:
        found = loops_under(root)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


async def lingering_loops(root: Path) -> list[tuple[str, str]]:
    """:func:`settled_loops_under` for async tests (does not block the event loop)."""
    return await asyncio.to_thread(settled_loops_under, root)


def _openers(device: str) -> str:
    """Who holds ``device`` open (processes, and kernel holders), for a leak report."""
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == device:
                        pid = fd_dir.parent.name
                        comm = (fd_dir.parent / "comm").read_text().strip()
                        found.append(f"{comm}[{pid}]")
    name = Path(device).name
    with contextlib.suppress(OSError):
        found += [f"holder {h.name}" for h in Path(f"/sys/block/{name}/holders").iterdir()]
    with contextlib.suppress(OSError):
        autoclear = Path(f"/sys/block/{name}/loop/autoclear").read_text().strip()
        found.append(f"autoclear={autoclear}")
    return ", ".join(sorted(set(found))) or "no opener found"


def leaks(root: Path) -> list[str]:
    return ([f"mount: {m}" for m in mounts_under(root)]
            + [f"loop device: {d} -> {f} ({_openers(d)})" for d, f in settled_loops_under(root)])


def clean_up_host(root: Path) -> None:
    """Unmount and detach whatever was left under ``root``, then remove it."""
    for point in reversed(mounts_under(root)):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=60)
    for device, _ in loops_under(root):
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


def files_under(root: Path) -> set[str]:
    """Every path below ``root`` (files, directories, links), relative to it."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        found.update(str(rel / name) for name in dirs + files)
    return found


# -- the plugin process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Workspace:
    """The per-test directory tree a plugin runs in (kept across restarts)."""

    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "csi.sock"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def kubelet(self) -> Path:
        return self.root / "kubelet"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"


@dataclass
class Plugin:
    """One running plugin process and a gRPC channel to it."""

    workspace: Workspace
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_url: str
    channel: grpc.aio.Channel
    identity: IdentityAsyncStub
    controller: ControllerAsyncStub
    node: NodeAsyncStub
    failpoints: str = ""

    @property
    def socket(self) -> Path:
        return self.workspace.socket

    @property
    def data_dir(self) -> Path:
        return self.workspace.data_dir

    @property
    def kubelet(self) -> Path:
        return self.workspace.kubelet

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_exit(self, within: float = STOP_TIMEOUT) -> int:
        """Wait (bounded) for the process to end and return its exit status."""
        deadline = asyncio.get_running_loop().time() + within
        while self.process.poll() is None:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"plugin pid {self.process.pid} still running after "
                                   f"{within} s")
            await asyncio.sleep(0.05)
        return self.process.returncode

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; close the channel."""
        await self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await self.wait_exit(STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.wait_exit(STOP_TIMEOUT)
        return self.process.returncode

    async def kill(self) -> None:
        """SIGKILL: the crash the recovery code must survive."""
        if self.process.poll() is None:
            self.process.kill()
        await self.wait_exit(STOP_TIMEOUT)
        await self.channel.close()


class StartPlugin(Protocol):
    def __call__(self, failpoints: str = "", *, env: Mapping[str, str] | None = None,
                 log_level: str = "INFO") -> Awaitable[Plugin]: ...


def _accepting(path: Path) -> bool:
    """Whether something listens on the unix socket ``path`` (a stale socket file refuses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:  # missing, refused (stale, left by a killed plugin), not yet listening
            return False
    return True


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)


class PortTakenError(RuntimeError):
    """The metrics port picked was grabbed by someone else before the plugin bound it."""


async def _launch(workspace: Workspace, failpoints: str, env: Mapping[str, str] | None,
                  log_level: str, index: int) -> Plugin:
    for _ in range(5):
        with contextlib.suppress(PortTakenError):
            return await _launch_once(workspace, failpoints, env, log_level, index)
    raise RuntimeError("no free metrics port after 5 attempts")


async def _launch_once(workspace: Workspace, failpoints: str, env: Mapping[str, str] | None,
                       log_level: str, index: int) -> Plugin:
    workspace.kubelet.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workspace.root / f"plugin-{index}.log"
    child_env = {k: v for k, v in os.environ.items() if k != "SHAREDSYNC_FAILPOINTS"}
    if failpoints:
        child_env["SHAREDSYNC_FAILPOINTS"] = failpoints
    child_env.update(env or {})
    # --kubelet-dir too: the default (/var/lib/kubelet) would be an allowed root on the host
    argv = [str(PYTHON), "-m", "csi_driver", "--endpoint", workspace.endpoint,
            "--node-id", NODE_ID, "--data-dir", str(workspace.data_dir),
            "--kubelet-dir", str(workspace.kubelet),
            "--allowed-path-root", str(workspace.kubelet),
            "--metrics-address", f"127.0.0.1:{port}", "--log-format", "json",
            "--log-level", log_level]
    process = _spawn(argv, child_env, log_path)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_TIMEOUT
    while not _accepting(workspace.socket):
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")
            if "Address already in use" in log:
                raise PortTakenError(port)
            raise RuntimeError(f"plugin exited at start ({process.returncode}):\n{log[-4000:]}")
        if loop.time() > deadline:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
            raise RuntimeError(f"plugin did not listen on {workspace.socket} in time")
        await asyncio.sleep(0.05)
    channel = grpc.aio.insecure_channel(workspace.endpoint)
    try:
        await asyncio.wait_for(channel.channel_ready(),
                               timeout=max(1.0, deadline - loop.time()))
    except BaseException:
        await channel.close()
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        raise
    return Plugin(
        workspace=workspace, process=process, log_path=log_path,
        metrics_url=f"http://127.0.0.1:{port}/metrics", channel=channel,
        identity=csi_pb2_grpc.IdentityStub(channel),
        controller=csi_pb2_grpc.ControllerStub(channel),
        node=csi_pb2_grpc.NodeStub(channel), failpoints=failpoints)


def _require_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: real loop devices, btrfs and mounts")
    missing = missing_tools()
    if missing:
        pytest.skip(f"storage tools missing: {', '.join(missing)} (run scripts/setup)")
    if not PYTHON.exists():
        pytest.skip(f"{PYTHON} not found (create the venv)")


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    """A fresh short directory; at the end, fail on leaked mounts or loop devices."""
    _require_host()
    root = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    ws = Workspace(root)
    yield ws
    left = leaks(root)
    logs = sorted(root.glob("plugin-*.log"))
    tail = logs[-1].read_text(errors="replace")[-3000:] if logs else ""
    clean_up_host(root)
    if left:
        pytest.fail("the plugin left these behind:\n  " + "\n  ".join(left)
                    + f"\n--- last plugin log (tail):\n{tail}", pytrace=False)


@pytest.fixture
async def start_plugin(workspace: Workspace) -> AsyncIterator[StartPlugin]:
    """Start plugin processes on one workspace (restarts reuse the same data dir).

    Every process started is stopped at the end, before the workspace's leak check.
    """
    started: list[Plugin] = []

    async def start(failpoints: str = "", *, env: Mapping[str, str] | None = None,
                    log_level: str = "INFO") -> Plugin:
        for previous in started:
            if previous.process.poll() is None:
                raise RuntimeError("stop the running plugin before starting another")
        plugin = await _launch(workspace, failpoints, env, log_level, len(started) + 1)
        started.append(plugin)
        return plugin

    yield start
    for plugin in started:
        await plugin.stop()


@pytest.fixture
async def plugin(start_plugin: StartPlugin) -> Plugin:
    """A plugin serving every service, without failpoints."""
    return await start_plugin()


# -- request builders ----------------------------------------------------------------------------


def mount_cap(mode: Mode = AccessMode.SINGLE_NODE_WRITER, *, fs_type: str = "",
              flags: tuple[str, ...] = (), group: str = "") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags),
                                                   volume_mount_group=group),
        access_mode=AccessMode(mode=mode))


def block_cap(mode: Mode = AccessMode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=AccessMode(mode=mode))


def rwx_cap() -> csi_pb2.VolumeCapability:
    return mount_cap(AccessMode.MULTI_NODE_MULTI_WRITER)


def create_request(name: str, *, required: int = SMALL, limit: int = 0,
                   cap: csi_pb2.VolumeCapability | None = None,
                   parameters: Mapping[str, str] | None = None,
                   snapshot_id: str = "", source_volume_id: str = "",
                   secrets: Mapping[str, str] | None = None,
                   ) -> csi_pb2.CreateVolumeRequest:
    request = csi_pb2.CreateVolumeRequest(
        name=name, capacity_range=csi_pb2.CapacityRange(required_bytes=required,
                                                        limit_bytes=limit),
        volume_capabilities=[cap or mount_cap()], parameters=dict(parameters or {}),
        secrets=dict(secrets or {}))
    if snapshot_id:
        request.volume_content_source.snapshot.snapshot_id = snapshot_id
    if source_volume_id:
        request.volume_content_source.volume.volume_id = source_volume_id
    return request


async def create_volume(plugin: Plugin, name: str, **kwargs: Any) -> csi_pb2.Volume:
    """CreateVolume (see :func:`create_request` for the keywords) and return the volume."""
    response = await plugin.controller.CreateVolume(create_request(name, **kwargs),
                                                    timeout=RPC_TIMEOUT)
    return response.volume


async def delete_volume(plugin: Plugin, volume_id: str) -> None:
    await plugin.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id),
                                         timeout=RPC_TIMEOUT)


@dataclass(frozen=True)
class Attachment:
    """Where a volume is staged and published, and how."""

    volume: csi_pb2.Volume
    staging: Path
    target: Path
    cap: csi_pb2.VolumeCapability
    readonly: bool = False

    @property
    def volume_id(self) -> str:
        return self.volume.volume_id


def stage_request(volume: csi_pb2.Volume, staging: Path, cap: csi_pb2.VolumeCapability,
                  secrets: Mapping[str, str] | None = None) -> csi_pb2.NodeStageVolumeRequest:
    return csi_pb2.NodeStageVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging), volume_capability=cap,
        volume_context=dict(volume.volume_context), secrets=dict(secrets or {}))


def publish_request(volume: csi_pb2.Volume, staging: Path, target: Path,
                    cap: csi_pb2.VolumeCapability,
                    readonly: bool = False) -> csi_pb2.NodePublishVolumeRequest:
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=volume.volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap, readonly=readonly, volume_context=dict(volume.volume_context))


def attachment_paths(plugin: Plugin, volume: csi_pb2.Volume,
                     label: str = "pod") -> tuple[Path, Path]:
    """kubelet-like staging and target paths for ``volume`` (the staging dir is created)."""
    staging = plugin.kubelet / "plugins" / DRIVER_NAME / "staging" / volume.volume_id
    staging.mkdir(parents=True, exist_ok=True)
    target = plugin.kubelet / "pods" / label / "volumes" / volume.volume_id / "mount"
    target.parent.mkdir(parents=True, exist_ok=True)
    return staging, target


async def stage(plugin: Plugin, volume: csi_pb2.Volume, staging: Path,
                cap: csi_pb2.VolumeCapability) -> None:
    await plugin.node.NodeStageVolume(stage_request(volume, staging, cap), timeout=RPC_TIMEOUT)


async def publish(plugin: Plugin, volume: csi_pb2.Volume, staging: Path, target: Path,
                  cap: csi_pb2.VolumeCapability, readonly: bool = False) -> None:
    await plugin.node.NodePublishVolume(publish_request(volume, staging, target, cap, readonly),
                                        timeout=RPC_TIMEOUT)


async def stage_and_publish(plugin: Plugin, volume: csi_pb2.Volume,
                            cap: csi_pb2.VolumeCapability | None = None, *,
                            label: str = "pod", readonly: bool = False) -> Attachment:
    """NodeStage then NodePublish ``volume`` at kubelet-like paths under the workspace."""
    cap = cap or mount_cap()
    staging, target = attachment_paths(plugin, volume, label)
    await stage(plugin, volume, staging, cap)
    await publish(plugin, volume, staging, target, cap, readonly)
    return Attachment(volume, staging, target, cap, readonly)


async def unpublish(plugin: Plugin, volume_id: str, target: Path) -> None:
    await plugin.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)),
        timeout=RPC_TIMEOUT)


async def unstage(plugin: Plugin, volume_id: str, staging: Path) -> None:
    await plugin.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id,
                                         staging_target_path=str(staging)),
        timeout=RPC_TIMEOUT)


async def detach(plugin: Plugin, attachment: Attachment) -> None:
    """Undo :func:`stage_and_publish`."""
    await unpublish(plugin, attachment.volume_id, attachment.target)
    await unstage(plugin, attachment.volume_id, attachment.staging)


@contextlib.asynccontextmanager
async def attached(plugin: Plugin, volume: csi_pb2.Volume,
                   cap: csi_pb2.VolumeCapability | None = None, *, label: str = "pod",
                   readonly: bool = False) -> AsyncIterator[Attachment]:
    """Stage and publish for the block's duration, then unpublish and unstage."""
    attachment = await stage_and_publish(plugin, volume, cap, label=label, readonly=readonly)
    try:
        yield attachment
    finally:
        await detach(plugin, attachment)


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    """Await ``call`` and return the gRPC error it must fail with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def expect_code(call: Awaitable[object], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    error = await rpc_error(call)
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: " \
                                 f"{error.details()}"
    return error


def write_file(path: Path, data: bytes) -> None:
    """Write and fsync, so that a snapshot or a crash cannot miss it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def replica_dirs(plugin: Plugin) -> list[str]:
    """Volume directories in the replica store (one per replica image on disk)."""
    folder = plugin.data_dir / "replicas" / "volumes"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


async def list_volume_ids(plugin: Plugin) -> list[str]:
    response = await plugin.controller.ListVolumes(csi_pb2.ListVolumesRequest(),
                                                   timeout=RPC_TIMEOUT)
    return sorted(e.volume.volume_id for e in response.entries)
