"""The contract every ``csi_driver.state.StateStore`` honours, as one suite for every store.

A test module runs it against an implementation by subclassing :class:`StateStoreContract` as a
``Test...`` class that provides a ``stores`` fixture: a :class:`Stores` whose opener gives a *new
handle* onto the same backing storage at every call (a new SQLite connection, a new API client),
and whose :class:`Names` give the test ids of its own. Tests that "reopen" the store call the
opener again to check that what was written is really stored, not cached.

Revisions are compared only the way the contract defines them: positive, growing with every
write, and equal to what the store returned; their values are the store's business (1, 2, 3 in
SQLite, resourceVersions in Kubernetes).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import pytest

from csi_driver.state import StateStore
from sharedsync.core.errors import Aborted
from sharedsync.core.records import Phase, SnapshotRecord, SourceKind, VolumeRecord

#: Opens a new handle onto the backing storage under test.
Opener = Callable[[], Awaitable[StateStore]]
#: Far beyond any revision a store in a test hands out: a revision "from the future".
FUTURE = 10**12


@dataclasses.dataclass(frozen=True)
class Names:
    """Ids and records for one test; ``prefix`` keeps tests apart on a shared backend.

    Ids keep the shape and the length the controller mints (``vol-`` and 24 hex digits), so
    their order is the order of ``n``.
    """

    prefix: str = ""

    def vid(self, n: int) -> str:
        return f"vol-{self.prefix}{n:0{24 - len(self.prefix)}x}"

    def sid(self, n: int) -> str:
        return f"snap-{self.prefix}{n:0{24 - len(self.prefix)}x}"

    def volume(self, n: int, **changes: object) -> VolumeRecord:
        record = VolumeRecord(
            volume_id=self.vid(n), name=f"pvc-{n}", capacity_bytes=(256 + n) << 20,
            kind="filesystem", access_modes=("MULTI_NODE_MULTI_WRITER", "SINGLE_NODE_WRITER"),
            parameters=(("syncPolicy", f"policy-{n}"),), source_kind=SourceKind.SNAPSHOT,
            source_id=self.sid(n + 1000), accessible_nodes=("node-a", "node-b"),
            created_at=1.5 + n)
        return dataclasses.replace(record, **changes)  # type: ignore[arg-type]

    def snapshot(self, n: int, source: int, **changes: object) -> SnapshotRecord:
        record = SnapshotRecord(snapshot_id=self.sid(n), name=f"snapshot-{n}",
                                source_volume_id=self.vid(source), size_bytes=(256 + n) << 20,
                                created_at_ns=1_700_000_000_000_000_000 + n,
                                accessible_nodes=("node-a",))
        return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


class Stores:
    """Opens handles onto one backing storage and closes them all at the end."""

    def __init__(self, opener: Opener, names: Names | None = None) -> None:
        self._opener = opener
        self.names = names or Names()
        self._open: list[StateStore] = []

    async def open(self) -> StateStore:
        store = await self._opener()
        self._open.append(store)
        return store

    async def reopen(self, store: StateStore) -> StateStore:
        """Close ``store`` and open a fresh handle: only what was stored survives."""
        await store.close()
        self._open.remove(store)
        return await self.open()

    async def close_all(self) -> None:
        while self._open:
            await self._open.pop().close()


class StateStoreContract:
    """The shared suite; a subclass provides the ``stores`` fixture."""

    @pytest.fixture
    async def store(self, stores: Stores) -> StateStore:
        return await stores.open()

    @pytest.fixture
    def names(self, stores: Stores) -> Names:
        return stores.names

    # -- volumes ---------------------------------------------------------------------------------

    async def test_volume_round_trip(self, store: StateStore, names: Names) -> None:
        assert await store.get_volume(names.vid(1)) is None
        stored = await store.put_volume(names.volume(1))
        assert stored.revision > 0
        assert stored == dataclasses.replace(names.volume(1), revision=stored.revision)
        assert await store.get_volume(names.vid(1)) == stored
        ready = await store.put_volume(dataclasses.replace(stored, phase=Phase.READY))
        assert ready.revision > stored.revision
        assert ready == dataclasses.replace(stored, phase=Phase.READY, revision=ready.revision)
        assert (await store.get_volume(names.vid(1))) == ready

    async def test_every_write_gives_a_larger_revision(self, store: StateStore,
                                                       names: Names) -> None:
        record = await store.put_volume(names.volume(1))
        for _ in range(3):  # even a write that changes nothing is a new revision
            again = await store.put_volume(record)
            assert again.revision > record.revision
            assert again == dataclasses.replace(record, revision=again.revision)
            record = again

    async def test_every_field_survives_reopen(self, stores: Stores, names: Names) -> None:
        store = await stores.open()
        odd = names.volume(7, kind="block", access_modes=(), parameters=(),
                           source_kind=SourceKind.NONE, source_id="", accessible_nodes=(),
                           phase=Phase.DELETING, created_at=0.25)
        # access modes as the controller records them: the numbers of CSI's enum
        cloned = names.volume(8, access_modes=("1", "5", "7"), source_kind=SourceKind.VOLUME,
                              source_id=names.vid(1), phase=Phase.READY,
                              accessible_nodes=("node-c",), created_at=1_700_000_000.123456)
        stored = [await store.put_volume(names.volume(1)), await store.put_volume(odd),
                  await store.put_volume(cloned)]
        snap = await store.put_snapshot(names.snapshot(1, 1, phase=Phase.READY))
        store = await stores.reopen(store)
        assert [await store.get_volume(r.volume_id) for r in stored] == stored
        assert await store.get_snapshot(names.sid(1)) == snap
        restored = await store.get_volume(names.vid(1))
        assert restored is not None
        assert isinstance(restored.source_kind, SourceKind)
        assert isinstance(restored.phase, Phase)
        assert restored.parameter_map == {"syncPolicy": "policy-1"}

    async def test_volume_revision_conflicts(self, store: StateStore, names: Names) -> None:
        first = await store.put_volume(names.volume(1))
        with pytest.raises(Aborted):
            await store.put_volume(names.volume(1))  # "new" again: someone created it first
        with pytest.raises(Aborted):
            await store.put_volume(dataclasses.replace(first, revision=first.revision + FUTURE))
        second = await store.put_volume(dataclasses.replace(first, capacity_bytes=1 << 30))
        with pytest.raises(Aborted):
            await store.put_volume(dataclasses.replace(first, phase=Phase.READY))  # stale
        assert await store.get_volume(names.vid(1)) == second

    async def test_concurrent_writers_one_wins(self, store: StateStore, names: Names) -> None:
        base = await store.put_volume(names.volume(1))
        attempts = [dataclasses.replace(base, capacity_bytes=(300 + i) << 20) for i in range(8)]
        results = await asyncio.gather(*(store.put_volume(a) for a in attempts),
                                       return_exceptions=True)
        winners = [r for r in results if isinstance(r, VolumeRecord)]
        assert len(winners) == 1, results
        assert all(isinstance(r, Aborted) for r in results if not isinstance(r, VolumeRecord))
        assert await store.get_volume(names.vid(1)) == winners[0]
        assert winners[0].revision > base.revision

    async def test_delete_volume(self, store: StateStore, names: Names) -> None:
        stored = await store.put_volume(names.volume(1))
        await store.put_volume(names.volume(2))
        await store.delete_volume(names.vid(1))
        assert await store.get_volume(names.vid(1)) is None
        assert [r.volume_id for r in await store.list_volumes(None, 10)] == [names.vid(2)]
        await store.delete_volume(names.vid(1))  # missing: a no-op
        await store.delete_volume(names.vid(99))
        again = await store.put_volume(names.volume(1))  # a new record starts over
        assert again.revision > 0
        assert again == dataclasses.replace(stored, revision=again.revision)

    async def test_list_volumes_order_after_limit(self, store: StateStore, names: Names) -> None:
        vid = names.vid
        for n in [5, 3, 9, 1, 7, 2, 8, 4, 6, 0]:
            await store.put_volume(names.volume(n))
        everything = await store.list_volumes(None, 100)
        assert [r.volume_id for r in everything] == [vid(n) for n in range(10)]
        assert everything[3] == dataclasses.replace(names.volume(3),
                                                    revision=everything[3].revision)
        assert [r.volume_id for r in await store.list_volumes(None, 3)] == [vid(0), vid(1),
                                                                           vid(2)]
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

    async def test_empty_store(self, store: StateStore, names: Names) -> None:
        assert await store.list_volumes(None, 10) == []
        assert await store.list_snapshots(None, 10) == []
        assert await store.list_snapshots(None, 10, names.vid(1)) == []
        assert await store.count_snapshots(names.vid(1)) == 0
        assert await store.get_snapshot(names.sid(1)) is None

    # -- snapshots -------------------------------------------------------------------------------

    async def test_snapshot_round_trip_and_conflicts(self, store: StateStore,
                                                     names: Names) -> None:
        stored = await store.put_snapshot(names.snapshot(1, 1))
        assert stored.revision > 0
        assert stored == dataclasses.replace(names.snapshot(1, 1), revision=stored.revision)
        assert await store.get_snapshot(names.sid(1)) == stored
        with pytest.raises(Aborted):
            await store.put_snapshot(names.snapshot(1, 1))
        ready = await store.put_snapshot(dataclasses.replace(stored, phase=Phase.READY))
        assert ready.revision > stored.revision
        with pytest.raises(Aborted):
            await store.put_snapshot(dataclasses.replace(stored, size_bytes=1))
        assert await store.get_snapshot(names.sid(1)) == ready
        await store.delete_snapshot(names.sid(1))
        await store.delete_snapshot(names.sid(1))
        assert await store.get_snapshot(names.sid(1)) is None

    async def test_list_snapshots_by_source_and_count(self, store: StateStore,
                                                      names: Names) -> None:
        vid, sid = names.vid, names.sid
        # snapshots 0..9, of volume n % 3
        for n in [4, 0, 8, 2, 6, 9, 1, 5, 3, 7]:
            await store.put_snapshot(names.snapshot(n, n % 3))
        everything = await store.list_snapshots(None, 100)
        assert [r.snapshot_id for r in everything] == [sid(n) for n in range(10)]
        assert [r.snapshot_id for r in await store.list_snapshots(sid(6), 2)] == [sid(7),
                                                                                 sid(8)]
        of_one = await store.list_snapshots(None, 100, vid(1))
        assert [r.snapshot_id for r in of_one] == [sid(1), sid(4), sid(7)]
        assert all(r.source_volume_id == vid(1) for r in of_one)
        assert [r.snapshot_id for r in await store.list_snapshots(sid(1), 1, vid(1))] == [
            sid(4)]
        assert [r.snapshot_id for r in await store.list_snapshots(sid(4), 5, vid(1))] == [
            sid(7)]
        assert await store.list_snapshots(sid(7), 5, vid(1)) == []
        assert await store.list_snapshots(None, 5, vid(42)) == []
        assert [await store.count_snapshots(vid(v)) for v in range(4)] == [4, 3, 3, 0]
        await store.delete_snapshot(sid(4))
        assert await store.count_snapshots(vid(1)) == 2
        assert [r.snapshot_id for r in await store.list_snapshots(None, 100, vid(1))] == [
            sid(1), sid(7)]

    async def test_volumes_and_snapshots_are_separate(self, store: StateStore,
                                                      names: Names) -> None:
        await store.put_volume(names.volume(1))
        await store.put_snapshot(names.snapshot(1, 1))
        await store.delete_volume(names.vid(1))
        assert await store.get_snapshot(names.sid(1)) is not None  # it outlives its volume
        assert await store.count_snapshots(names.vid(1)) == 1
        await store.delete_snapshot(names.sid(1))
        assert await store.list_volumes(None, 10) == []

    async def test_two_handles_see_each_other(self, stores: Stores, names: Names) -> None:
        """Two handles on one backing storage (two plugin processes, or two clients)."""
        one, two = await stores.open(), await stores.open()
        stored = await one.put_volume(names.volume(1))
        assert await two.get_volume(names.vid(1)) == stored
        with pytest.raises(Aborted):
            await two.put_volume(names.volume(1))
        newer = await two.put_volume(dataclasses.replace(stored, phase=Phase.READY))
        with pytest.raises(Aborted):
            await one.put_volume(dataclasses.replace(stored, phase=Phase.DELETING))
        assert await one.get_volume(names.vid(1)) == newer
