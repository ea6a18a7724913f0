"""The contract every ``csi_driver.state.StateStore`` honours, run against each implementation.

Today there is one implementation, :class:`~csi_driver.state.LocalStateStore` (SQLite). A
Kubernetes-backed store joins by adding an entry to :data:`IMPLEMENTATIONS`: a function that
opens a *new handle* onto the same backing storage every time it is called (a new SQLite
connection here, a new API client there), skipping when its backend is absent. Tests that
"reopen" the store call it again to check that what was written is really stored, not cached.

The durability test at the end is specific to the local store: a subprocess writes records and
SIGKILLs itself mid-loop, and every record in the reopened database must be complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from csi_driver.state import LocalStateStore, StateStore
from sharedsync.core.errors import Aborted
from sharedsync.core.records import Phase, SnapshotRecord, SourceKind, VolumeRecord

pytestmark = pytest.mark.timeout(120)

#: Opens a handle onto the backing storage rooted at a per-test directory.
Opener = Callable[[Path], StateStore]


def _local(root: Path) -> StateStore:
    return LocalStateStore(root / "state" / "controller.db")


IMPLEMENTATIONS: dict[str, Opener] = {
    "local": _local,
    # "kubernetes": _kubernetes,  # SharedVolume-backed, with the operator
}


class Stores:
    """Opens handles onto one backing storage and closes them all at the end."""

    def __init__(self, opener: Opener, root: Path) -> None:
        self._opener = opener
        self._root = root
        self._open: list[StateStore] = []

    def open(self) -> StateStore:
        store = self._opener(self._root)
        self._open.append(store)
        return store

    async def reopen(self, store: StateStore) -> StateStore:
        """Close ``store`` and open a fresh handle: only what was stored survives."""
        await store.close()
        self._open.remove(store)
        return self.open()

    async def close_all(self) -> None:
        while self._open:
            await self._open.pop().close()


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stores]:
    opened = Stores(IMPLEMENTATIONS[request.param], tmp_path)
    try:
        yield opened
    finally:
        await opened.close_all()


@pytest.fixture
def store(stores: Stores) -> StateStore:
    return stores.open()


def vid(n: int) -> str:
    """A volume id of the shape the controller mints."""
    return f"vol-{n:024x}"


def sid(n: int) -> str:
    return f"snap-{n:024x}"


def volume(n: int, **changes: object) -> VolumeRecord:
    record = VolumeRecord(
        volume_id=vid(n), name=f"pvc-{n}", capacity_bytes=(256 + n) << 20, kind="filesystem",
        access_modes=("MULTI_NODE_MULTI_WRITER", "SINGLE_NODE_WRITER"),
        parameters=(("syncPolicy", f"policy-{n}"),), source_kind=SourceKind.SNAPSHOT,
        source_id=sid(n + 1000), accessible_nodes=("node-a", "node-b"), created_at=1.5 + n)
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def snapshot(n: int, source: int, **changes: object) -> SnapshotRecord:
    record = SnapshotRecord(snapshot_id=sid(n), name=f"snapshot-{n}",
                            source_volume_id=vid(source), size_bytes=(256 + n) << 20,
                            created_at_ns=1_700_000_000_000_000_000 + n,
                            accessible_nodes=("node-a",))
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


# -- volumes -------------------------------------------------------------------------------------


async def test_volume_round_trip(store: StateStore) -> None:
    assert await store.get_volume(vid(1)) is None
    stored = await store.put_volume(volume(1))
    assert stored.revision == 1
    assert stored == dataclasses.replace(volume(1), revision=1)
    assert await store.get_volume(vid(1)) == stored
    ready = await store.put_volume(dataclasses.replace(stored, phase=Phase.READY))
    assert ready.revision == 2
    assert (await store.get_volume(vid(1))) == ready


async def test_every_field_survives_reopen(stores: Stores) -> None:
    store = stores.open()
    odd = volume(7, kind="block", access_modes=(), parameters=(), source_kind=SourceKind.NONE,
                 source_id="", accessible_nodes=(), phase=Phase.DELETING, created_at=0.25)
    stored = [await store.put_volume(volume(1)), await store.put_volume(odd)]
    snap = await store.put_snapshot(snapshot(1, 1, phase=Phase.READY))
    store = await stores.reopen(store)
    assert [await store.get_volume(r.volume_id) for r in stored] == stored
    assert await store.get_snapshot(sid(1)) == snap
    restored = await store.get_volume(vid(1))
    assert restored is not None
    assert isinstance(restored.source_kind, SourceKind)
    assert isinstance(restored.phase, Phase)
    assert restored.parameter_map == {"syncPolicy": "policy-1"}


async def test_volume_revision_conflicts(store: StateStore) -> None:
    first = await store.put_volume(volume(1))
    with pytest.raises(Aborted):
        await store.put_volume(volume(1))  # "new" again: someone created it first
    with pytest.raises(Aborted):
        await store.put_volume(dataclasses.replace(first, revision=5))  # from the future
    second = await store.put_volume(dataclasses.replace(first, capacity_bytes=1 << 30))
    with pytest.raises(Aborted):
        await store.put_volume(dataclasses.replace(first, phase=Phase.READY))  # stale
    assert await store.get_volume(vid(1)) == second


async def test_concurrent_writers_one_wins(store: StateStore) -> None:
    base = await store.put_volume(volume(1))
    attempts = [dataclasses.replace(base, capacity_bytes=(300 + i) << 20) for i in range(8)]
    results = await asyncio.gather(*(store.put_volume(a) for a in attempts),
                                   return_exceptions=True)
    winners = [r for r in results if isinstance(r, VolumeRecord)]
    assert len(winners) == 1, results
    assert all(isinstance(r, Aborted) for r in results if not isinstance(r, VolumeRecord))
    assert await store.get_volume(vid(1)) == winners[0]
    assert winners[0].revision == 2


async def test_delete_volume(store: StateStore) -> None:
    stored = await store.put_volume(volume(1))
    await store.put_volume(volume(2))
    await store.delete_volume(vid(1))
    assert await store.get_volume(vid(1)) is None
    assert [r.volume_id for r in await store.list_volumes(None, 10)] == [vid(2)]
    await store.delete_volume(vid(1))  # missing: a no-op
    await store.delete_volume(vid(99))
    again = await store.put_volume(volume(1))  # a new record starts over
    assert again.revision == 1
    assert again == dataclasses.replace(stored, revision=1)


async def test_list_volumes_order_after_limit(store: StateStore) -> None:
    numbers = [5, 3, 9, 1, 7, 2, 8, 4, 6, 0]
    for n in numbers:
        await store.put_volume(volume(n))
    everything = await store.list_volumes(None, 100)
    assert [r.volume_id for r in everything] == [vid(n) for n in range(10)]
    assert everything[3] == dataclasses.replace(volume(3), revision=1)
    assert [r.volume_id for r in await store.list_volumes(None, 3)] == [vid(0), vid(1), vid(2)]
    assert [r.volume_id for r in await store.list_volumes(vid(2), 3)] == [vid(3), vid(4),
                                                                         vid(5)]
    assert [r.volume_id for r in await store.list_volumes(vid(8), 3)] == [vid(9)]
    assert await store.list_volumes(vid(9), 3) == []
    # "after" need not exist: the next page starts after where it would be
    await store.delete_volume(vid(4))
    assert [r.volume_id for r in await store.list_volumes(vid(4), 2)] == [vid(5), vid(6)]
    # walking pages visits each record exactly once
    seen: list[str] = []
    after: str | None = None
    for _ in range(20):
        page = await store.list_volumes(after, 4)
        seen += [r.volume_id for r in page]
        if len(page) < 4:
            break
        after = page[-1].volume_id
    assert seen == [vid(n) for n in range(10) if n != 4]


async def test_empty_store(store: StateStore) -> None:
    assert await store.list_volumes(None, 10) == []
    assert await store.list_snapshots(None, 10) == []
    assert await store.list_snapshots(None, 10, vid(1)) == []
    assert await store.count_snapshots(vid(1)) == 0
    assert await store.get_snapshot(sid(1)) is None


# -- snapshots -----------------------------------------------------------------------------------


async def test_snapshot_round_trip_and_conflicts(store: StateStore) -> None:
    stored = await store.put_snapshot(snapshot(1, 1))
    assert stored.revision == 1
    assert await store.get_snapshot(sid(1)) == stored
    with pytest.raises(Aborted):
        await store.put_snapshot(snapshot(1, 1))
    ready = await store.put_snapshot(dataclasses.replace(stored, phase=Phase.READY))
    assert ready.revision == 2
    with pytest.raises(Aborted):
        await store.put_snapshot(dataclasses.replace(stored, size_bytes=1))
    assert await store.get_snapshot(sid(1)) == ready
    await store.delete_snapshot(sid(1))
    await store.delete_snapshot(sid(1))
    assert await store.get_snapshot(sid(1)) is None


async def test_list_snapshots_by_source_and_count(store: StateStore) -> None:
    # snapshots 0..9, of volume n % 3
    for n in [4, 0, 8, 2, 6, 9, 1, 5, 3, 7]:
        await store.put_snapshot(snapshot(n, n % 3))
    everything = await store.list_snapshots(None, 100)
    assert [r.snapshot_id for r in everything] == [sid(n) for n in range(10)]
    assert [r.snapshot_id for r in await store.list_snapshots(sid(6), 2)] == [sid(7), sid(8)]
    of_one = await store.list_snapshots(None, 100, vid(1))
    assert [r.snapshot_id for r in of_one] == [sid(1), sid(4), sid(7)]
    assert all(r.source_volume_id == vid(1) for r in of_one)
    assert [r.snapshot_id for r in await store.list_snapshots(sid(1), 1, vid(1))] == [sid(4)]
    assert [r.snapshot_id for r in await store.list_snapshots(sid(4), 5, vid(1))] == [sid(7)]
    assert await store.list_snapshots(sid(7), 5, vid(1)) == []
    assert await store.list_snapshots(None, 5, vid(42)) == []
    assert [await store.count_snapshots(vid(v)) for v in range(4)] == [4, 3, 3, 0]
    await store.delete_snapshot(sid(4))
    assert await store.count_snapshots(vid(1)) == 2
    assert [r.snapshot_id for r in await store.list_snapshots(None, 100, vid(1))] == [sid(1),
                                                                                     sid(7)]


async def test_volumes_and_snapshots_are_separate(store: StateStore) -> None:
    await store.put_volume(volume(1))
    await store.put_snapshot(snapshot(1, 1))
    await store.delete_volume(vid(1))
    assert await store.get_snapshot(sid(1)) is not None  # a snapshot outlives its volume
    assert await store.count_snapshots(vid(1)) == 1
    await store.delete_snapshot(sid(1))
    assert await store.list_volumes(None, 10) == []


async def test_two_handles_see_each_other(stores: Stores) -> None:
    """Two handles on one backing storage (two plugin processes, or two clients)."""
    one, two = stores.open(), stores.open()
    stored = await one.put_volume(volume(1))
    assert await two.get_volume(vid(1)) == stored
    with pytest.raises(Aborted):
        await two.put_volume(volume(1))
    newer = await two.put_volume(dataclasses.replace(stored, phase=Phase.READY))
    with pytest.raises(Aborted):
        await one.put_volume(dataclasses.replace(stored, phase=Phase.DELETING))
    assert await one.get_volume(vid(1)) == newer


# -- durability of the local store ---------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import asyncio, dataclasses, os, random, signal, sys, threading
    from csi_driver.state import LocalStateStore
    from sharedsync.core.records import Phase, SnapshotRecord, VolumeRecord

    path, start, kill_at, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)

    def die_soon():
        threading.Timer(rng.uniform(0, 0.02), os.kill, (os.getpid(), signal.SIGKILL)).start()

    async def main():
        store = LocalStateStore(path)
        n = start
        while True:
            vid, sid = f"vol-{n:024x}", f"snap-{n:024x}"
            record = await store.put_volume(VolumeRecord(
                volume_id=vid, name=f"pvc-{n}-" + "x" * (n % 200), capacity_bytes=n << 20,
                kind="filesystem", parameters=(("syncPolicy", f"p{n}"),), created_at=n))
            await store.put_volume(dataclasses.replace(record, phase=Phase.READY))
            await store.put_snapshot(SnapshotRecord(
                snapshot_id=sid, name=f"s{n}", source_volume_id=vid, size_bytes=n,
                created_at_ns=n))
            print(n, flush=True)
            if n == kill_at:
                die_soon()
            n += 1

    asyncio.run(main())
""")


def _run_writer(db: Path, start: int, kill_at: int, seed: int) -> int:
    """Run the writer until it kills itself; return the last index it acknowledged."""
    done = subprocess.run([sys.executable, "-c", _WRITER, str(db), str(start), str(kill_at),
                           str(seed)], capture_output=True, text=True, timeout=90,
                          check=False, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == -signal.SIGKILL, done.stderr
    acknowledged = [int(line) for line in done.stdout.split()]
    assert acknowledged, done.stderr
    assert acknowledged == list(range(start, acknowledged[-1] + 1))
    return acknowledged[-1]


async def test_local_store_survives_sigkill_mid_write(tmp_path: Path) -> None:
    db = tmp_path / "state" / "controller.db"
    acknowledged: set[int] = set()  # the writer printed these after their last write returned
    in_flight: set[int] = set()  # the one being written when the process died, per round
    start = 0
    for seed in range(3):  # three crashes in a row on one database
        last = _run_writer(db, start, kill_at=start + 40, seed=seed)
        acknowledged.update(range(start, last + 1))
        in_flight.add(last + 1)
        with sqlite3.connect(db) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        store = LocalStateStore(db)
        try:
            volumes = {int(r.volume_id[4:], 16): r
                       for r in await store.list_volumes(None, 10_000)}
            snapshots = {int(r.snapshot_id[5:], 16): r
                         for r in await store.list_snapshots(None, 10_000)}
            # every acknowledged record is there; anything else was in flight at a crash
            assert acknowledged <= volumes.keys()
            assert acknowledged <= snapshots.keys()
            assert volumes.keys() <= acknowledged | in_flight
            assert snapshots.keys() <= volumes.keys()
            for n, record in volumes.items():  # each one complete, whatever its revision
                assert record.name == f"pvc-{n}-" + "x" * (n % 200)
                assert record.capacity_bytes == n << 20
                assert record.parameters == (("syncPolicy", f"p{n}"),)
                assert record.created_at == n
                assert (record.revision, record.phase) in ((1, Phase.CREATING),
                                                           (2, Phase.READY))
                if n in acknowledged:
                    assert (record.revision, record.phase) == (2, Phase.READY)
            for n, snap in snapshots.items():
                assert (snap.name, snap.source_volume_id, snap.size_bytes, snap.revision) == (
                    f"s{n}", vid(n), n, 1)
                assert await store.count_snapshots(vid(n)) == 1
            # the store is writable after recovery
            extra = await store.put_volume(volume(100_000))
            await store.delete_volume(extra.volume_id)
            start = max(volumes) + 1  # the next round continues after what made it to disk
        finally:
            await store.close()
