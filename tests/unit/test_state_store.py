"""The state-store contract (``tests/state_store_contract.py``) run against the SQLite store.

The durability test at the end is specific to the local store: a subprocess writes records and
SIGKILLs itself mid-loop, and every record in the reopened database must be complete.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from csi_driver.config import PluginConfig
from csi_driver.state import LocalStateStore, StateStore, open_state_store
from sharedsync.core.records import Phase
from tests.state_store_contract import Names, StateStoreContract, Stores

pytestmark = pytest.mark.timeout(120)

vid = Names().vid


class TestLocalStateStore(StateStoreContract):
    @pytest.fixture
    async def stores(self, tmp_path: Path) -> AsyncIterator[Stores]:
        async def open_db() -> StateStore:
            return LocalStateStore(tmp_path / "state" / "controller.db")

        opened = Stores(open_db)
        try:
            yield opened
        finally:
            await opened.close_all()


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
            extra = await store.put_volume(Names().volume(100_000))
            await store.delete_volume(extra.volume_id)
            start = max(volumes) + 1  # the next round continues after what made it to disk
        finally:
            await store.close()


# -- choosing the store --------------------------------------------------------------------------


async def test_the_plugin_config_opens_the_local_store_by_default(tmp_path: Path) -> None:
    store = await open_state_store(PluginConfig(endpoint="unix:///unused", node_id="n",
                                                data_dir=tmp_path))
    try:
        assert isinstance(store, LocalStateStore)
        assert store.path == tmp_path / "state" / "controller.db"
    finally:
        await store.close()


def test_the_kubernetes_client_is_loaded_only_when_used() -> None:
    """A standalone plugin (and a node without the Kubernetes extra) never imports it."""
    probe = ("import sys, csi_driver.server, csi_driver.cli, csi_driver.state as s; "
             "before = 'kubernetes_asyncio' in sys.modules; s.KubernetesStateStore; "
             "print(before, 'kubernetes_asyncio' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=True, cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.split() == ["False", "True"]
