"""The standalone demo: the real components, driven through a volume's whole life.

First it plays the part kubelet and the external-provisioner play in a cluster: it starts
``sharedsync-csi`` on a unix socket and calls it over gRPC. Then three agents replicate a volume
between "nodes" on this machine (see :mod:`sharedsync.demo_cluster`). Every step is the real code
path with real loop devices, btrfs, FUSE and mounts; nothing is left behind at the end.
"""

import contextlib
import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from csi_driver.proto import csi_pb2, csi_pb2_grpc
from sharedsync.core.sizes import MiB
from sharedsync.demo_cluster import run_cluster_demo
from sharedsync.storage.leftovers import leftovers_under

T = TypeVar("T")
NODE = "demo-node"
RECORDS = 2000


def _capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))


class Demo:
    """One run of the demo in a scratch directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubelet = workdir / "kubelet"
        self.socket = workdir / "csi.sock"
        self.log = workdir / "plugin.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.step_no = 0

    def step(self, title: str, action: Callable[[], T]) -> T:
        self.step_no += 1
        started = time.perf_counter()
        result = action()
        elapsed = (time.perf_counter() - started) * 1000
        print(f"[{self.step_no:2}] {title:<58} {elapsed:8.1f} ms", flush=True)
        return result

    @contextlib.contextmanager
    def plugin(self) -> Iterator[grpc.Channel]:
        self.kubelet.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{self.socket}",
                 "--node-id", NODE, "--data-dir", str(self.workdir / "data"),
                 "--allowed-path-root", str(self.kubelet), "--log-format", "json"],
                stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while not self.socket.exists():
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the plugin did not start; see {self.log}")
                time.sleep(0.05)
            with grpc.insecure_channel(f"unix://{self.socket}") as channel:
                yield channel
        finally:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def run(self) -> None:
        print(f"sharedsync standalone demo in {self.workdir}\n")
        print("the CSI plugin, driven as kubelet and the external-provisioner would:\n")
        with self.plugin() as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)
            controller = csi_pb2_grpc.ControllerStub(channel)
            node = csi_pb2_grpc.NodeStub(channel)
            self._lifecycle(identity, controller, node)
        print("\nthree agents, one replicated volume, a failover:\n")
        run_cluster_demo(self.workdir / "cluster", self.step)
        left = leftovers_under(self.workdir)
        print("\nleft behind:", ", ".join(left) if left else "nothing (no mount, no loop device)")
        if left:
            raise RuntimeError(f"the demo left {left} behind")

    def _lifecycle(self, identity: csi_pb2_grpc.IdentityStub,
                   controller: csi_pb2_grpc.ControllerStub, node: csi_pb2_grpc.NodeStub) -> None:
        info = self.step("GetPluginInfo", lambda: identity.GetPluginInfo(
            csi_pb2.GetPluginInfoRequest()))
        print(f"     plugin {info.name} {info.vendor_version}")
        self.step("Probe until ready", lambda: self._wait_ready(identity))
        cap = _capability()
        volume = self.step("CreateVolume demo-data (256 MiB, btrfs replica)",
                           lambda: controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                               name="demo-data", volume_capabilities=[cap],
                               capacity_range=csi_pb2.CapacityRange(
                                   required_bytes=256 * MiB))).volume)
        print(f"     volume {volume.volume_id}, {volume.capacity_bytes // MiB} MiB, topology "
              f"{dict(volume.accessible_topology[0].segments)}")
        target = self._attach(node, volume.volume_id, "writer")
        digest = self.step(f"write {RECORDS} checksummed records + fsync",
                           lambda: self._write_records(target, "v1"))
        snap = self.step("CreateSnapshot (read-only btrfs snapshot)", lambda: controller
                         .CreateSnapshot(csi_pb2.CreateSnapshotRequest(
                             name="demo-snap", source_volume_id=volume.volume_id)).snapshot)
        self.step("overwrite the records after the snapshot",
                  lambda: self._write_records(target, "v2"))
        restored = self.step("CreateVolume from the snapshot (send | receive)",
                             lambda: controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                                 name="demo-restore", volume_capabilities=[cap],
                                 volume_content_source=csi_pb2.VolumeContentSource(
                                     snapshot=csi_pb2.VolumeContentSource.SnapshotSource(
                                         snapshot_id=snap.snapshot_id)))).volume)
        restored_target = self._attach(node, restored.volume_id, "reader")
        got = self.step("verify the restored volume holds the snapshot's data",
                        lambda: self._digest(restored_target))
        if got != digest:
            raise RuntimeError("restored data differs from the snapshot")
        print(f"     sha256 {got[:16]}... matches")
        self.step("ControllerExpandVolume to 512 MiB", lambda: controller.ControllerExpandVolume(
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id=volume.volume_id,
                capacity_range=csi_pb2.CapacityRange(required_bytes=512 * MiB))))
        self.step("NodeExpandVolume (online btrfs resize)", lambda: node.NodeExpandVolume(
            csi_pb2.NodeExpandVolumeRequest(volume_id=volume.volume_id,
                                            volume_path=str(target))))
        stats = self.step("NodeGetVolumeStats", lambda: node.NodeGetVolumeStats(
            csi_pb2.NodeGetVolumeStatsRequest(volume_id=volume.volume_id,
                                              volume_path=str(target))))
        print(f"     {stats.usage[0].used // MiB} MiB used of {stats.usage[0].total // MiB} MiB")
        health = self.step("NodeGetVolumeHealth", lambda: node.NodeGetVolumeHealth(
            csi_pb2.NodeGetVolumeHealthRequest(volume_id=volume.volume_id)))
        print(f"     {'healthy' if not health.volume_health.health_statuses else health}")
        for vol, role in ((restored.volume_id, "reader"), (volume.volume_id, "writer")):
            self._detach(node, vol, role)
        self.step("DeleteSnapshot", lambda: controller.DeleteSnapshot(
            csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)))
        for vol in (restored.volume_id, volume.volume_id):
            self.step(f"DeleteVolume {vol}", functools.partial(
                controller.DeleteVolume, csi_pb2.DeleteVolumeRequest(volume_id=vol)))

    @staticmethod
    def _wait_ready(identity: csi_pb2_grpc.IdentityStub) -> None:
        for _ in range(100):
            if identity.Probe(csi_pb2.ProbeRequest()).ready.value:
                return
            time.sleep(0.1)
        raise RuntimeError("the plugin never became ready (are btrfs-progs installed?)")

    def _paths(self, role: str) -> tuple[Path, Path]:
        staging = self.kubelet / "plugins" / "staging" / role
        target = self.kubelet / "pods" / role / "volumes" / "data"
        return staging, target

    def _attach(self, node: csi_pb2_grpc.NodeStub, volume_id: str, role: str) -> Path:
        staging, target = self._paths(role)
        staging.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        cap = _capability()
        self.step(f"NodeStageVolume ({role}: loop + btrfs mount + bind)", lambda: node
                  .NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
                      volume_id=volume_id, staging_target_path=str(staging),
                      volume_capability=cap)))
        self.step(f"NodePublishVolume ({role}: bind into the pod)", lambda: node
                  .NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                      volume_id=volume_id, staging_target_path=str(staging),
                      target_path=str(target), volume_capability=cap)))
        return target

    def _detach(self, node: csi_pb2_grpc.NodeStub, volume_id: str, role: str) -> None:
        staging, target = self._paths(role)
        self.step(f"NodeUnpublishVolume ({role})", lambda: node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target))))
        self.step(f"NodeUnstageVolume ({role}: unmount, detach loop)", lambda: node
                  .NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
                      volume_id=volume_id, staging_target_path=str(staging))))

    @staticmethod
    def _write_records(target: Path, version: str) -> str:
        with open(target / "records.log", "wb") as out:
            for i in range(RECORDS):
                body = f"{version} record {i:06d} ".encode() * 8
                out.write(hashlib.sha256(body).hexdigest().encode() + b" " + body + b"\n")
            out.flush()
            os.fsync(out.fileno())
        return Demo._digest(target)

    @staticmethod
    def _digest(target: Path) -> str:
        return hashlib.sha256((target / "records.log").read_bytes()).hexdigest()


def run_demo(workdir: Path | None = None, keep: bool = False) -> int:
    """Run the demo; returns a process exit code."""
    if os.geteuid() != 0:
        print("the demo mounts real filesystems: run it as root", file=sys.stderr)
        return 1
    scratch = workdir or Path(tempfile.mkdtemp(prefix="sharedsync-demo-"))
    demo = Demo(scratch)
    try:
        demo.run()
    except (grpc.RpcError, RuntimeError, OSError) as exc:
        print(f"\ndemo failed: {exc}\nplugin log: {demo.log}", file=sys.stderr)
        return 1
    if not keep:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\ndone: a volume was created, written, snapshotted, restored, expanded and removed;"
          "\nthree agents replicated another through a live policy change and a failover")
    return 0
