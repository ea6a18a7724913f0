"""The CSI Node service: stage a volume on this node, publish it into pods, report on it.

:class:`NodeServiceBase` holds what every mode shares: request validation, the per-volume
locks, Publish (a bind of the staging path, or of the block device, into the pod's target path),
Unpublish, and stats and health of what is mounted. Where a volume comes from is a subclass's
job. :class:`NodeService` (standalone) stages this node's own replica: it opens it (creating it
when the volume context says how) and bind-mounts its live subvolume at the staging path (a
filesystem volume) or attaches its block file to a loop device (a block volume). In a cluster,
:class:`csi_driver.node_agent.AgentNodeService` asks the node's replication agent instead.

Every step checks the kernel's current state first, so each RPC is idempotent and finishes
whatever a crashed earlier attempt left half done; Unpublish and Unstage undo exactly what
Publish and Stage did and leave no mount or loop device behind.
"""

import asyncio
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from sharedsync import failpoints
from sharedsync.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from sharedsync.core.ids import check_id, is_volume_id
from sharedsync.core.parameters import check_map
from sharedsync.core.sizes import CapacityRange, resolve_expansion
from sharedsync.storage import loop, mounts
from sharedsync.storage.replicas import ReplicaMeta, ReplicaStore, VolumeKind
from sharedsync.tasks import finish_first

from .backend import missing_tools
from .config import TOPOLOGY_NODE_KEY
from .controller import CAPACITY_CONTEXT_KEY
from .locks import KeyedTryLock
from .proto import csi_pb2, csi_pb2_grpc
from .validation import (
    READ_ONLY_MODES,
    AccessMode,
    Capability,
    check_path,
    lookup_path,
    require_capability,
    require_existing_dir,
)

RPC = csi_pb2.NodeServiceCapability.RPC
HealthEntry = csi_pb2.VolumeHealth.VolumeHealthEntry
StorageBackendHealth = csi_pb2.NodeGetStorageHealthResponse.StorageBackendHealth
log = structlog.get_logger(__name__)

CAPABILITIES = (RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME,
                RPC.SINGLE_NODE_MULTI_WRITER, RPC.VOLUME_MOUNT_GROUP, RPC.GET_VOLUME_HEALTH,
                RPC.GET_STORAGE_HEALTH)
#: Below this share of free space on the replica disk, storage health reports DEGRADED.
LOW_SPACE_RATIO = 0.05


def _known(volume_id: str) -> str:
    """After every field is validated: an id we could never have minted is simply not found."""
    if not is_volume_id(volume_id):
        raise NotFound(f"volume {volume_id} does not exist")
    return volume_id


def filesystem_usage(path: Path) -> list[csi_pb2.VolumeUsage]:
    """Bytes (and inodes, where the filesystem counts them) of the filesystem at ``path``."""
    Usage = csi_pb2.VolumeUsage
    st = os.statvfs(path)
    usage = [Usage(unit=Usage.BYTES, total=st.f_blocks * st.f_frsize,
                   available=st.f_bavail * st.f_frsize,
                   used=(st.f_blocks - st.f_bfree) * st.f_frsize)]
    if st.f_files:  # btrfs allocates inodes dynamically and reports none
        usage.append(Usage(unit=Usage.INODES, total=st.f_files, available=st.f_favail,
                           used=st.f_files - st.f_ffree))
    return usage


class NodeServiceBase(csi_pb2_grpc.NodeServicer):
    """The Node RPCs; a subclass says where a volume comes from (the hooks below)."""

    def __init__(self, node_id: str, roots: tuple[Path, ...]) -> None:
        self.node_id = node_id
        self.roots = roots
        self.locks = KeyedTryLock()

    # -- hooks (run in worker threads, except the async ones) --------------------------------

    def _owns(self, entry: mounts.MountEntry, volume_id: str) -> bool:
        """Whether a mount shows this volume (its filesystem, or its block loop device)."""
        raise NotImplementedError

    def _bind_staging(self, volume_id: str, source: str | Path, staging: Path) -> bool:
        """Bind ``source`` at ``staging``; False when this volume is already staged there
        (idempotent), AlreadyExists when something else is."""
        present = mounts.mounts_at(staging)
        if present:
            if not self._owns(present[-1], volume_id):
                raise AlreadyExists(f"{staging} already holds another mount")
            return False
        mounts.bind(source, staging)
        return True

    def _volume_kind(self, volume_id: str) -> VolumeKind:
        """The volume's kind; NotFound when this node has nothing of it."""
        raise NotImplementedError

    async def _stage_volume(self, volume_id: str, staging: Path, cap: Capability,
                            context: Mapping[str, str], size_hint: int) -> None:
        raise NotImplementedError

    async def _unstage_volume(self, volume_id: str, staging: Path) -> None:
        raise NotImplementedError

    def _block_devices(self, volume_id: str) -> list[str]:
        """The loop devices of a staged block volume (none when it is not staged)."""
        raise NotImplementedError

    def _foreign_mounts(self, volume_id: str) -> list[str]:
        """Mount points showing the volume's filesystem, besides the one it is served from."""
        raise NotImplementedError

    def _block_size(self, volume_id: str) -> int:
        raise NotImplementedError

    def _expand(self, volume_id: str, path: Path, wish: CapacityRange) -> int:
        raise NotImplementedError

    async def _volume_problems(self, volume_id: str) -> list[HealthEntry]:
        """Health entries about the volume itself (the caller checks the mounts)."""
        raise NotImplementedError

    async def _storage_problems(self) -> list[Any]:
        """``StorageBackendHealth`` entries for whatever holds this node's volumes."""
        raise NotImplementedError

    # -- stage -------------------------------------------------------------------------------

    async def NodeStageVolume(self, request: csi_pb2.NodeStageVolumeRequest,
                              context: Any) -> csi_pb2.NodeStageVolumeResponse:
        volume_id = check_id(request.volume_id, "volume_id")
        staging = check_path(request.staging_target_path, "staging_target_path", self.roots)
        cap = require_capability(request.volume_capability,
                                 request.HasField("volume_capability"))
        check_map(request.volume_context, "volume_context")
        size_hint = request.volume_context.get(CAPACITY_CONTEXT_KEY, "")
        if size_hint and not (size_hint.isascii() and size_hint.isdigit()):
            raise InvalidArgument(f"volume_context[{CAPACITY_CONTEXT_KEY!r}] is not a number")
        async with self.locks.hold(_known(volume_id)):
            require_existing_dir(staging, "staging_target_path")
            await finish_first(self._stage_volume(volume_id, staging, cap,
                                                  dict(request.volume_context),
                                                  int(size_hint or 0)))
        return csi_pb2.NodeStageVolumeResponse()

    async def NodeUnstageVolume(self, request: csi_pb2.NodeUnstageVolumeRequest,
                                context: Any) -> csi_pb2.NodeUnstageVolumeResponse:
        volume_id = check_id(request.volume_id, "volume_id")
        staging = check_path(request.staging_target_path, "staging_target_path", self.roots)
        async with self.locks.hold(_known(volume_id)):
            await finish_first(self._unstage_volume(volume_id, staging))
        return csi_pb2.NodeUnstageVolumeResponse()

    def _publications(self, volume_id: str, exclude: set[Path]) -> list[str]:
        """Where the volume is mounted on this node, other than its source and ``exclude``."""
        skip = {str(p) for p in exclude}
        found = self._foreign_mounts(volume_id) + self._block_publications(volume_id)
        return sorted(p for p in found if p not in skip)

    def _block_publications(self, volume_id: str) -> list[str]:
        names = {"/" + Path(d).name for d in self._block_devices(volume_id)}
        if not names:
            return []
        return [m.mount_point for m in mounts.mount_table()
                if m.root in names and m.fs_type == "devtmpfs"]

    # -- publish -----------------------------------------------------------------------------

    async def NodePublishVolume(self, request: csi_pb2.NodePublishVolumeRequest,
                                context: Any) -> csi_pb2.NodePublishVolumeResponse:
        volume_id = check_id(request.volume_id, "volume_id")
        target = check_path(request.target_path, "target_path", self.roots)
        staging = check_path(request.staging_target_path, "staging_target_path", self.roots)
        cap = require_capability(request.volume_capability,
                                 request.HasField("volume_capability"))
        check_map(request.volume_context, "volume_context")
        # a "ro" mount flag makes the bind read-only too: say so, or a repeat of this request
        # would find "another read-only setting" and the fsGroup chown would hit EROFS
        read_only = request.readonly or cap.mode in READ_ONLY_MODES or "ro" in cap.mount_flags
        async with self.locks.hold(_known(volume_id)):
            await finish_first(asyncio.to_thread(self._publish, volume_id, staging, target, cap,
                                                 read_only))
        return csi_pb2.NodePublishVolumeResponse()

    def _publish(self, volume_id: str, staging: Path, target: Path, cap: Capability,
                 read_only: bool) -> None:
        kind = self._volume_kind(volume_id)
        if kind is not cap.kind:
            raise InvalidArgument(f"volume {volume_id} is a {kind} volume")
        if not target.parent.is_dir():
            raise NotFound(f"the parent directory of target_path {target} does not exist")
        present = mounts.mounts_at(target)
        if present:
            if not self._owns(present[-1], volume_id):
                raise AlreadyExists(f"{target} already holds another mount")
            if present[-1].read_only != read_only:
                raise AlreadyExists(f"{target} is published with another read-only setting")
            return
        if target.exists() and target.is_dir() != (cap.kind is VolumeKind.FILESYSTEM):
            raise InvalidArgument(f"target_path {target} exists and is " + (
                "not a directory" if cap.kind is VolumeKind.FILESYSTEM else "a directory"))
        if cap.mode == AccessMode.SINGLE_NODE_SINGLE_WRITER:
            elsewhere = self._publications(volume_id, exclude={staging, target})
            if elsewhere:
                raise FailedPrecondition(
                    f"volume {volume_id} is SINGLE_NODE_SINGLE_WRITER and already published "
                    f"at {', '.join(elsewhere)}")
        if cap.kind is VolumeKind.BLOCK:
            devices = self._block_devices(volume_id)
            if not devices:
                raise FailedPrecondition(f"volume {volume_id} is not staged on this node")
            if not target.exists():
                target.touch(mode=0o600)
            mounts.bind(devices[0], target, read_only=read_only)
        else:
            staged = mounts.mounts_at(staging)
            if not staged or not self._owns(staged[-1], volume_id):
                raise FailedPrecondition(f"volume {volume_id} is not staged at {staging}")
            target.mkdir(mode=0o750, exist_ok=True)
            failpoints.hit("node.publish.after_mkdir")
            mounts.bind(staging, target, read_only=read_only, options=list(cap.mount_flags))
            if cap.mount_group and not read_only:
                self._apply_group(target, int(cap.mount_group))
        log.info("volume published", volume_id=volume_id, target_path=str(target),
                 read_only=read_only)

    @staticmethod
    def _apply_group(root: Path, gid: int) -> None:
        """Give the pod's fsGroup the volume root, setgid so new files inherit it."""
        os.chown(root, -1, gid)
        mode = stat.S_IMODE(root.stat().st_mode)
        root.chmod(mode | stat.S_IRWXG | stat.S_ISGID)

    async def NodeUnpublishVolume(self, request: csi_pb2.NodeUnpublishVolumeRequest,
                                  context: Any) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = check_id(request.volume_id, "volume_id")
        target = check_path(request.target_path, "target_path", self.roots)
        async with self.locks.hold(_known(volume_id)):
            await finish_first(asyncio.to_thread(self._unpublish, volume_id, target))
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _unpublish(self, volume_id: str, target: Path) -> None:
        present = mounts.mounts_at(target)
        if present and not self._owns(present[-1], volume_id):
            log.warning("unmounting a target that does not show this volume",
                        volume_id=volume_id, target_path=str(target))
        mounts.unmount(target)
        if target.is_dir() and not target.is_symlink():
            target.rmdir()
        elif target.exists() or target.is_symlink():
            target.unlink()
        log.info("volume unpublished", volume_id=volume_id, target_path=str(target))

    # -- stats, expansion, health ------------------------------------------------------------

    async def NodeGetVolumeStats(self, request: csi_pb2.NodeGetVolumeStatsRequest,
                                 context: Any) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume_id = check_id(request.volume_id, "volume_id")
        path = lookup_path(request.volume_path, "volume_path", self.roots)
        return await asyncio.to_thread(self._stats, _known(volume_id), path)

    def _published_entry(self, volume_id: str, path: Path) -> mounts.MountEntry:
        if not path.exists():
            raise NotFound(f"volume_path {path} does not exist")
        kind = self._volume_kind(volume_id)
        present = mounts.mounts_at(path)
        if not present or not self._owns(present[-1], volume_id):
            raise NotFound(f"volume {volume_id} ({kind}) is not mounted at {path}")
        return present[-1]

    def _stats(self, volume_id: str, path: Path) -> csi_pb2.NodeGetVolumeStatsResponse:
        self._published_entry(volume_id, path)
        Usage = csi_pb2.VolumeUsage
        if not path.is_dir():
            size = self._block_size(volume_id)
            return csi_pb2.NodeGetVolumeStatsResponse(usage=[Usage(total=size, unit=Usage.BYTES)])
        return csi_pb2.NodeGetVolumeStatsResponse(usage=filesystem_usage(path))

    async def NodeExpandVolume(self, request: csi_pb2.NodeExpandVolumeRequest,
                               context: Any) -> csi_pb2.NodeExpandVolumeResponse:
        volume_id = check_id(request.volume_id, "volume_id")
        path = lookup_path(request.volume_path, "volume_path", self.roots)
        if request.HasField("volume_capability"):
            require_capability(request.volume_capability, True)
        wish = CapacityRange(request.capacity_range.required_bytes,
                             request.capacity_range.limit_bytes)
        async with self.locks.hold(_known(volume_id)):
            size = await finish_first(asyncio.to_thread(self._expand, volume_id, path, wish))
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    async def NodeGetVolumeHealth(self, request: csi_pb2.NodeGetVolumeHealthRequest,
                                  context: Any) -> csi_pb2.NodeGetVolumeHealthResponse:
        volume_id = check_id(request.volume_id, "volume_id")
        paths = [lookup_path(p, f, self.roots) for p, f in (
            (request.volume_publish_path, "volume_publish_path"),
            (request.staging_target_path, "staging_target_path")) if p]
        entries = await self._volume_problems(_known(volume_id))
        entries += await asyncio.to_thread(self._mount_problems, volume_id, paths)
        return csi_pb2.NodeGetVolumeHealthResponse(volume_health=csi_pb2.VolumeHealth(
            volume_id=volume_id, health_statuses=entries))

    def _mount_problems(self, volume_id: str,
                        paths: list[Path]) -> list[HealthEntry]:
        entries = []
        for path in paths:
            present = mounts.mounts_at(path)
            if not present or not self._owns(present[-1], volume_id):
                entries.append(HealthEntry(status=csi_pb2.INACCESSIBLE, reason="NotMounted",
                                           message=f"the volume is not mounted at {path}"))
        return entries

    async def NodeGetStorageHealth(self, request: csi_pb2.NodeGetStorageHealthRequest,
                                   context: Any) -> csi_pb2.NodeGetStorageHealthResponse:
        return csi_pb2.NodeGetStorageHealthResponse(
            backend_health=await self._storage_problems())

    # -- identity of the node ----------------------------------------------------------------

    async def NodeGetCapabilities(self, request: csi_pb2.NodeGetCapabilitiesRequest,
                                  context: Any) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=t))
            for t in CAPABILITIES])

    async def NodeGetInfo(self, request: csi_pb2.NodeGetInfoRequest,
                          context: Any) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_NODE_KEY: self.node_id}))


class NodeService(NodeServiceBase):
    """Standalone: volumes are replicas in this node's own replica store."""

    def __init__(self, store: ReplicaStore, node_id: str, roots: tuple[Path, ...]) -> None:
        super().__init__(node_id, roots)
        self.store = store

    # -- ownership ---------------------------------------------------------------------------

    def _owns(self, entry: mounts.MountEntry, volume_id: str) -> bool:
        if self.store.meta(volume_id) is None:
            return False
        if entry.source in self.store.devices(volume_id):
            return True
        block = self.store.block_file(volume_id)
        if self.store.is_open(volume_id) and block.exists():
            names = {"/" + Path(d).name for d in loop.devices_for(block)}
            return entry.root in names
        return False

    def _require_meta(self, volume_id: str) -> ReplicaMeta:
        meta = self.store.meta(volume_id)
        if meta is None or meta.deleted:
            raise NotFound(f"volume {volume_id} has no replica on node {self.node_id}")
        return meta

    def _volume_kind(self, volume_id: str) -> VolumeKind:
        return self._require_meta(volume_id).kind

    def _block_devices(self, volume_id: str) -> list[str]:
        if not self.store.is_open(volume_id):
            return []
        return loop.devices_for(self.store.block_file(volume_id))

    def _foreign_mounts(self, volume_id: str) -> list[str]:
        return self.store.foreign_mounts(volume_id)

    def _block_size(self, volume_id: str) -> int:
        return self._require_meta(volume_id).size_bytes

    # -- stage -------------------------------------------------------------------------------

    async def _stage_volume(self, volume_id: str, staging: Path, cap: Capability,
                            context: Mapping[str, str], size_hint: int) -> None:
        await asyncio.to_thread(self._stage, volume_id, staging, cap, size_hint)

    def _stage(self, volume_id: str, staging: Path, cap: Capability, size_hint: int) -> None:
        # refuse an occupied staging path before opening (or creating) anything, so that a
        # refused stage leaves no replica mounted behind it
        present = mounts.mounts_at(staging) if cap.kind is VolumeKind.FILESYSTEM else []
        if present and not self._owns(present[-1], volume_id):
            raise AlreadyExists(f"{staging} already holds another mount")
        meta = self.store.meta(volume_id)
        if meta is None or meta.deleted:
            if not size_hint:
                raise NotFound(f"volume {volume_id} has no replica on node {self.node_id}")
            available = self.store.available_bytes()
            if size_hint > available:
                raise ResourceExhausted(f"a replica of {size_hint} bytes does not fit in the "
                                        f"{available} bytes free on node {self.node_id}")
            meta = self.store.create(volume_id, size_hint, cap.kind)
            log.info("replica created on stage", volume_id=volume_id, size_bytes=size_hint)
        if meta.kind is not cap.kind:
            raise InvalidArgument(f"volume {volume_id} is a {meta.kind} volume")
        self.store.open(volume_id)
        failpoints.hit("node.stage.after_open")
        if cap.kind is VolumeKind.BLOCK:
            loop.attach(self.store.block_file(volume_id))
            return
        if self._bind_staging(volume_id, self.store.live_path(volume_id), staging):
            log.info("volume staged", volume_id=volume_id, staging_target_path=str(staging))

    async def _unstage_volume(self, volume_id: str, staging: Path) -> None:
        await asyncio.to_thread(self._unstage, volume_id, staging)

    def _unstage(self, volume_id: str, staging: Path) -> None:
        present = mounts.mounts_at(staging)
        if present and not self._owns(present[-1], volume_id):
            log.warning("unmounting a staging path that does not show this volume",
                        volume_id=volume_id, staging_target_path=str(staging))
        mounts.unmount(staging)
        failpoints.hit("node.unstage.after_unmount")
        if self.store.meta(volume_id) is None:
            return
        block = self.store.block_file(volume_id)
        if self.store.is_open(volume_id) and block.exists():
            published = self._block_publications(volume_id)
            if published:
                raise FailedPrecondition(
                    f"volume {volume_id} is still published at {', '.join(published)}")
            loop.detach_all(block)
        self.store.close(volume_id)
        log.info("volume unstaged", volume_id=volume_id, staging_target_path=str(staging))

    # -- expansion, health -------------------------------------------------------------------

    def _expand(self, volume_id: str, path: Path, wish: CapacityRange) -> int:
        self._published_entry(volume_id, path)
        meta = self._require_meta(volume_id)
        if wish.required > meta.size_bytes:
            meta = self.store.expand(volume_id, resolve_expansion(meta.size_bytes, wish),
                                     within_free_space=True)
        else:
            meta = self.store.grow_online(volume_id)
        log.info("volume expanded on node", volume_id=volume_id, capacity_bytes=meta.size_bytes)
        return meta.size_bytes

    async def _volume_problems(self, volume_id: str) -> list[HealthEntry]:
        return await asyncio.to_thread(self._replica_problems, volume_id)

    def _replica_problems(self, volume_id: str) -> list[HealthEntry]:
        self._require_meta(volume_id)
        health = self.store.health(volume_id)
        if health.abnormal:
            return [HealthEntry(status=csi_pb2.DEGRADED, reason="ReplicaUnhealthy",
                                message=health.message)]
        return []

    async def _storage_problems(self) -> list[Any]:
        problems: list[Any] = []
        missing = missing_tools()
        if missing:
            problems.append(StorageBackendHealth(
                status=csi_pb2.STORAGE_UNREACHABLE, reason="ToolsMissing",
                message=f"storage tools missing: {', '.join(missing)}"))
        usage = await asyncio.to_thread(shutil.disk_usage, self.store.root)
        if usage.total and usage.free / usage.total < LOW_SPACE_RATIO:
            problems.append(StorageBackendHealth(
                status=csi_pb2.STORAGE_DEGRADED, reason="LowSpace",
                message=f"only {usage.free} bytes free for replicas"))
        return problems
