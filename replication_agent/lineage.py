"""A replica's replication snapshots: the points its peers sync from and to.

Inside the replica's btrfs (see ``sharedsync.storage.replicas``), ``sync/`` holds read-only
snapshots of ``live`` named by :class:`SnapRef` (epoch and sequence number). On the primary they
are taken from ``live``; on a replica they are the finished results of ``btrfs receive``, which
only marks a subvolume read-only once the whole stream arrived, so a writable entry in ``sync/``
is always a receive that was interrupted and is discarded.

Change detection costs one ioctl: a subvolume's ``ctransid`` moves only when its contents
change, and a snapshot inherits the value of its source, so ``live`` has changed since the
newest snapshot exactly when their ``ctransid`` differ (after a ``syncfs`` has committed what the
page cache held).
"""

import os
import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from sharedsync.core.snapshot_plan import reclaim_now
from sharedsync.storage import btrfs
from sharedsync.storage.files import syncfs
from sharedsync.storage.replicas import LIVE, ReplicaStore

SYNC_DIR = "sync"
#: Where a replica's writable data is parked when a failover discards it (never silently lost).
DIVERGED_PREFIX = ".diverged-"
_NAME = re.compile(r"^e(\d{8})-s(\d{12})$")


@dataclass(frozen=True, order=True, slots=True)
class SnapRef:
    """A replication snapshot's identity: (epoch, sequence number), ordered."""

    epoch: int
    seq: int

    @property
    def name(self) -> str:
        return f"e{self.epoch:08d}-s{self.seq:012d}"

    @classmethod
    def parse(cls, name: str) -> "SnapRef | None":
        match = _NAME.match(name)
        return cls(int(match.group(1)), int(match.group(2))) if match else None


class Lineage:
    """The replication snapshots of one open replica."""

    def __init__(self, store: ReplicaStore, volume_id: str) -> None:
        self.store = store
        self.volume_id = volume_id

    @property
    def root(self) -> Path:
        return self.store.mount_point(self.volume_id)

    @property
    def directory(self) -> Path:
        return self.root / SYNC_DIR

    @property
    def live(self) -> Path:
        return self.root / LIVE

    def path(self, ref: SnapRef) -> Path:
        return self.directory / ref.name

    def ensure(self) -> None:
        self.directory.mkdir(mode=0o700, exist_ok=True)

    def complete(self) -> list[SnapRef]:
        """Snapshots held completely, oldest first."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            ref = SnapRef.parse(entry.name)
            try:
                if ref is not None and btrfs.is_subvolume(entry) and \
                        btrfs.subvolume_info(entry).read_only:
                    found.append(ref)
            except FileNotFoundError:
                continue  # pruned while we looked
        return sorted(found)

    def newest(self) -> SnapRef | None:
        refs = self.complete()
        return refs[-1] if refs else None

    def discard_partial(self) -> list[str]:
        """Delete interrupted receives (writable subvolumes) and stray files; return names."""
        removed: list[str] = []
        if not self.directory.is_dir():
            return removed
        for entry in self.directory.iterdir():
            if btrfs.is_subvolume(entry):
                if not btrfs.subvolume_info(entry).read_only:
                    btrfs.delete_subvolume(entry)
                    removed.append(entry.name)
            elif entry.is_file() or entry.is_symlink():
                entry.unlink()
                removed.append(entry.name)
        return removed

    def take(self, ref: SnapRef) -> Path:
        """Snapshot ``live`` read-only as ``ref`` (idempotent)."""
        self.ensure()
        dest = self.path(ref)
        if not btrfs.is_subvolume(dest):
            btrfs.snapshot(self.live, dest, read_only=True)
        return dest

    def delete(self, ref: SnapRef) -> None:
        btrfs.delete_subvolume(self.path(ref), commit=False)

    def prune(self, refs: Iterable[SnapRef]) -> None:
        """Delete these snapshots (no commit: a deletion lost in a crash is done again); when
        the replica is short of space, have their extents freed now (see
        ``snapshot_plan.reclaim_now``)."""
        deleted = 0
        for ref in refs:
            self.delete(ref)
            deleted += 1
        if not deleted:
            return
        try:
            st = os.statvfs(self.root)
            if reclaim_now(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize):
                btrfs.sync(self.root)
        except OSError:
            pass  # closed meanwhile: the space comes back at the cleaner's own pace

    def reclaim(self, keep: Collection[SnapRef] = ()) -> list[SnapRef]:
        """Delete an interrupted receive and every complete snapshot not in ``keep``, and
        wait until their space is free. Returns the snapshots deleted."""
        self.discard_partial()
        doomed = [ref for ref in self.complete() if ref not in keep]
        for ref in doomed:
            self.delete(ref)
        btrfs.wait_for_cleaner(self.root)  # wakes the cleaner itself: no prune() needed
        return doomed

    def changed_since(self, ref: SnapRef | None) -> bool:
        """Whether ``live`` differs from snapshot ``ref`` (always True without one)."""
        syncfs(self.live)
        if ref is None or not btrfs.is_subvolume(self.path(ref)):
            return True
        return btrfs.subvolume_info(self.live).ctransid != \
            btrfs.subvolume_info(self.path(ref)).ctransid

    def restore_live(self, ref: SnapRef) -> str | None:
        """Make ``live`` a writable copy of snapshot ``ref``.

        The previous ``live`` is kept as ``sync/.diverged-<time>`` when it held changes that
        ``ref`` does not (writes a failed-over primary never shipped), so an operator can still
        look at them; the name is returned. Identical content is simply dropped.
        """
        kept = None
        if btrfs.is_subvolume(self.live):
            if btrfs.subvolume_info(self.live).read_only:
                # a fenced primary's live was made read-only; it can be neither renamed aside
                # nor replaced while it is (EROFS), and it is ours to retire now
                btrfs.set_read_only(self.live, False)
            if self.changed_since(ref):
                kept = f"{DIVERGED_PREFIX}{time.time_ns()}"
                os.rename(self.live, self.directory / kept)
            else:
                btrfs.delete_subvolume(self.live)
        btrfs.snapshot(self.path(ref), self.live, read_only=False)
        return kept

    def exclusive_bytes(self) -> int:
        """Bytes held only by replication snapshots (what deleting them all would free)."""
        if not self.directory.is_dir():
            return 0
        return btrfs.exclusive_bytes(self.directory)
