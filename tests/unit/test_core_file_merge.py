"""sharedsync.core.file_merge: scan planning and version-vector merging of multi-writer volumes.

Besides the table tests, a small simulation drives several nodes through random local writes,
deletions and pulls (the same loop the agent runs, with a dictionary for a disk): whatever the
interleaving, every node ends with the same files, and no written version disappears unless a
node overwrote or deleted it knowingly or a conflict note reports it.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.file_merge import (
    DIRECTORY,
    MAX_INTERVAL_SECONDS,
    MIN_INTERVAL_SECONDS,
    RACY_NS,
    TEMP_PREFIX,
    TOMBSTONE,
    ConflictNote,
    Hashed,
    Record,
    StatKey,
    Write,
    check_path,
    collectable_tombstones,
    exchange_interval,
    is_conflict_copy,
    needs_hash,
    plan_merge,
    plan_scan,
    raised_floor,
    verifiable,
)
from sharedsync.core.version_vectors import ConflictPolicy, VersionVector

REG = 0o100644
DIR = 0o040755
SEC = 1_000_000_000


def vv(**counters: int) -> VersionVector:
    return VersionVector.of(counters)


def rec(path: str = "f", vector: VersionVector | None = None, digest: str = "d1",
        mtime_ns: int = 10 * SEC, writer: str = "a", size: int = 1, mode: int = REG,
        stat: StatKey | None = None, hashed_at_ns: int = 0) -> Record:
    return Record(path=path, vector=vector or vv(a=1), digest=digest, size=size, mode=mode,
                  mtime_ns=mtime_ns, writer=writer, stat=stat, hashed_at_ns=hashed_at_ns)


# -- interval, paths --------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "max_lag", "expected"), [
    ("Asynchronous", 1.0, 0.25), ("Asynchronous", 0.1, MIN_INTERVAL_SECONDS),
    ("Asynchronous", 600.0, MAX_INTERVAL_SECONDS), ("Asynchronous", 0.0, 1.25),
    ("Synchronous", 0.1, 1.0), ("Scheduled", 100.0, 1.0),
])
def test_exchange_interval_table(mode: str, max_lag: float, expected: float) -> None:
    assert exchange_interval(mode, max_lag) == pytest.approx(expected)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_async_interval_is_always_within_bounds(max_lag: float) -> None:
    assert MIN_INTERVAL_SECONDS <= exchange_interval("Asynchronous", max_lag) \
        <= MAX_INTERVAL_SECONDS


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        exchange_interval("Sometimes", 1.0)


@pytest.mark.parametrize("path", ["a", "dir/a.txt", "a/b/c", ".hidden", "x..y"])
def test_safe_paths_pass(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize("path", ["", "/abs", "a/../b", "..", "a//b", "a/./b", "a/", "a\0b",
                                  f"dir/{TEMP_PREFIX}123", "x" * 256, "a/" * 3000 + "b"])
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidArgument):
        check_path(path)


# -- scanning ---------------------------------------------------------------------------------


def test_needs_hash_for_new_changed_and_racy_files() -> None:
    key = StatKey(size=1, mtime_ns=10 * SEC, inode=5, mode=REG)
    settled = rec(stat=key, hashed_at_ns=10 * SEC + RACY_NS + 1)
    assert needs_hash(None, key)
    assert not needs_hash(settled, key)
    assert needs_hash(settled, replace(key, size=2))
    assert needs_hash(settled, replace(key, inode=6))
    assert needs_hash(replace(settled, hashed_at_ns=10 * SEC + 1), key)  # hashed too soon
    assert needs_hash(replace(settled, digest=TOMBSTONE), key)


def test_only_files_proven_unchanged_are_verifiable() -> None:
    """A scrub without data checksums judges a digest only where the stat proves no write."""
    key = StatKey(size=1, mtime_ns=10 * SEC, inode=5, mode=REG)
    settled = rec(stat=key, hashed_at_ns=10 * SEC + RACY_NS + 1)
    assert verifiable(settled, key)
    assert not verifiable(None, key)  # never recorded
    assert not verifiable(settled, replace(key, size=2))  # written since: a change, not damage
    assert not verifiable(replace(settled, hashed_at_ns=10 * SEC + 1), key)  # racy
    assert not verifiable(replace(settled, digest=TOMBSTONE), key)  # deleted
    directory = StatKey(size=0, mtime_ns=0, inode=5, mode=stat.S_IFDIR | 0o755)
    assert not verifiable(rec(stat=directory, hashed_at_ns=RACY_NS * 10), directory)


def test_scan_bumps_changed_files_and_tombstones_vanished_ones() -> None:
    key = StatKey(size=1, mtime_ns=10 * SEC, inode=5, mode=REG)
    records = {"same": rec("same", stat=key), "edited": rec("edited", vector=vv(b=2), stat=key),
               "gone": rec("gone", vector=vv(a=1, b=1), stat=key),
               "dead": rec("dead", digest=TOMBSTONE)}
    observed = {"same": key, "edited": replace(key, size=2), "new": key}
    hashed = {"same": Hashed(key, "d1"), "edited": Hashed(replace(key, size=2), "d2"),
              "new": Hashed(key, "d3")}
    result = plan_scan(records, observed, hashed, node="a", now_ns=99 * SEC, next_seq=7)
    by_path = {r.path: r for r in result.changed}
    assert [r.seq for r in result.changed] == [7, 8, 9]
    assert result.next_seq == 10
    assert by_path["edited"].vector == vv(a=1, b=2)
    assert by_path["edited"].digest == "d2"
    assert by_path["new"].vector == vv(a=1)
    assert by_path["gone"].deleted
    assert by_path["gone"].vector == vv(a=2, b=1)
    assert by_path["gone"].mtime_ns == 99 * SEC
    assert [r.path for r in result.refreshed] == ["same"]
    assert result.refreshed[0].hashed_at_ns == 99 * SEC


def test_scan_adopts_an_interrupted_apply_instead_of_bumping() -> None:
    key = StatKey(size=1, mtime_ns=10 * SEC, inode=9, mode=REG)
    records = {"f": rec("f", vector=vv(a=1), digest="old", stat=replace(key, inode=1)),
               "g": rec("g", vector=vv(a=1), stat=key)}
    pending = {"f": rec("f", vector=vv(a=1, b=3), digest="new", writer="b"),
               "g": rec("g", vector=vv(a=1, b=1), digest=TOMBSTONE, writer="b", mode=0)}
    result = plan_scan(records, {"f": key}, {"f": Hashed(key, "new")}, node="a",
                       now_ns=50 * SEC, next_seq=1, pending=pending)
    by_path = {r.path: r for r in result.changed}
    assert by_path["f"].vector == vv(a=1, b=3)  # the peer's version, not a local write
    assert by_path["f"].writer == "b"
    assert by_path["f"].stat == key
    assert by_path["g"].vector == vv(a=1, b=1)
    assert by_path["g"].deleted


# -- merging ------------------------------------------------------------------------------------


LWW = ConflictPolicy.LAST_WRITER_WINS
KEEP = ConflictPolicy.KEEP_BOTH


def test_remote_dominates_is_applied() -> None:
    local = rec(vector=vv(a=1), digest="d1", stat=StatKey(1, 1, 1, REG))
    remote = rec(vector=vv(a=1, b=1), digest="d2", writer="b")
    plan = plan_merge({"f": local}, remote, LWW)
    (step,) = plan.steps
    assert step.write is Write.CONTENT
    assert step.record.vector == vv(a=1, b=1)
    assert step.expect == local
    assert step.source is not None
    assert not step.source.local
    assert not plan.resolved


@pytest.mark.parametrize("remote_vector", [vv(a=1), vv()])
def test_local_dominates_or_equal_is_skipped(remote_vector: VersionVector) -> None:
    local = rec(vector=vv(a=1, b=1), digest="d1")
    remote = rec(vector=remote_vector or vv(a=1), digest="d1")
    assert plan_merge({"f": local}, remote, LWW).skip


def test_same_content_from_another_writer_only_merges_the_vector() -> None:
    local = rec(vector=vv(a=1), digest="d1", mtime_ns=5)
    remote = rec(vector=vv(b=1), digest="d1", writer="b", mtime_ns=5)
    plan = plan_merge({"f": local}, remote, LWW)
    (step,) = plan.steps
    assert step.write in (Write.NONE, Write.METADATA)
    assert step.record.vector == vv(a=1, b=1)
    assert not plan.resolved


def test_tombstone_from_a_peer_deletes() -> None:
    local = rec(vector=vv(a=1))
    remote = rec(vector=vv(a=1, b=1), digest=TOMBSTONE, writer="b", size=0, mode=0)
    (step,) = plan_merge({"f": local}, remote, LWW).steps
    assert step.write is Write.DELETE
    assert step.record.deleted


def test_lww_conflict_keeps_the_later_write_and_reports_the_loser() -> None:
    local = rec(vector=vv(a=1), digest="aaaa", mtime_ns=10 * SEC, writer="a")
    remote = rec(vector=vv(b=1), digest="bbbb", mtime_ns=20 * SEC, writer="b")
    plan = plan_merge({"f": local}, remote, LWW)
    (step,) = plan.steps
    assert step.write is Write.CONTENT
    assert step.record.digest == "bbbb"
    assert step.record.vector == vv(a=1, b=1)
    (note,) = plan.resolved
    assert (note.winner_digest, note.loser_digest, note.kept_as) == ("bbbb", "aaaa", "")
    assert step.record.conflict == note
    # the node that wrote the other side decides the same, with the same note
    mirror = plan_merge({"f": remote}, local, LWW)
    (mirror_step,) = mirror.steps
    assert mirror_step.write is Write.NONE
    assert mirror_step.record.vector == vv(a=1, b=1)
    assert mirror.resolved == plan.resolved


def test_keep_both_saves_the_local_loser_before_overwriting() -> None:
    local = rec(vector=vv(a=1), digest="aaaa", mtime_ns=10 * SEC, writer="a")
    remote = rec(vector=vv(b=1), digest="bbbb", mtime_ns=20 * SEC, writer="b")
    plan = plan_merge({"f": local}, remote, KEEP)
    copy, main = plan.steps
    assert is_conflict_copy(copy.path)
    assert copy.write is Write.CONTENT
    assert copy.source is not None
    assert copy.source.local
    assert copy.source.path == "f"
    assert copy.record.digest == "aaaa"
    assert main.path == "f"
    assert main.record.digest == "bbbb"
    assert plan.resolved[0].kept_as == copy.path


def test_keep_both_fetches_a_remote_loser() -> None:
    local = rec(vector=vv(a=1), digest="aaaa", mtime_ns=30 * SEC, writer="a")
    remote = rec(vector=vv(b=1), digest="bbbb", mtime_ns=20 * SEC, writer="b")
    copy, main = plan_merge({"f": local}, remote, KEEP).steps
    assert copy.record.digest == "bbbb"
    assert copy.source is not None
    assert not copy.source.local
    assert copy.source.path == "f"
    assert main.write is Write.NONE
    assert main.record.digest == "aaaa"


def test_keep_both_with_a_deletion_losing_keeps_nothing_extra() -> None:
    local = rec(vector=vv(a=2), digest=TOMBSTONE, mtime_ns=10 * SEC, size=0, mode=0)
    remote = rec(vector=vv(a=1, b=1), digest="bbbb", mtime_ns=20 * SEC, writer="b")
    plan = plan_merge({"f": local}, remote, KEEP)
    (step,) = plan.steps
    assert step.write is Write.CONTENT
    assert plan.resolved[0].kept_as == ""
    assert plan.resolved[0].loser_digest == ""


def test_a_taken_version_carries_its_conflict_note_to_be_learned() -> None:
    note = ConflictNote(id="n1", path="f", resolution="LastWriterWins", winner_node="b",
                        winner_digest="bbbb", loser_node="a", loser_digest="aaaa")
    remote = replace(rec(vector=vv(a=1, b=1), digest="bbbb", writer="b"), conflict=note)
    plan = plan_merge({}, remote, LWW)
    assert plan.learned == (note,)
    assert plan.steps[0].record.conflict == note


# -- directories ------------------------------------------------------------------------------


def dir_rec(path: str = "d", vector: VersionVector | None = None, mode: int = DIR,
            writer: str = "a", stat: StatKey | None = None) -> Record:
    return rec(path, vector=vector, digest=DIRECTORY, mtime_ns=0, size=0, mode=mode,
               writer=writer, stat=stat)


def test_a_directory_is_versioned_by_mode_and_owner_not_by_its_entries() -> None:
    key = StatKey(size=4096, mtime_ns=10 * SEC, inode=3, mode=DIR)
    first = plan_scan({}, {"d": key}, {"d": Hashed(key, "anything")}, node="a", now_ns=20 * SEC,
                      next_seq=1)
    (made,) = first.changed
    assert (made.digest, made.size, made.mtime_ns, made.is_directory) == (DIRECTORY, 0, 0, True)
    # a file added in it moves its mtime and size: nothing to hash, nothing to record
    busier = replace(key, size=8192, mtime_ns=30 * SEC)
    assert not needs_hash(made, busier)
    # a chmod is a new version
    opened = replace(key, mode=0o040777)
    assert needs_hash(made, opened)
    again = plan_scan({"d": made}, {"d": opened}, {"d": Hashed(opened, DIRECTORY)}, node="a",
                      now_ns=40 * SEC, next_seq=2)
    assert again.changed[0].vector == vv(a=2)
    assert again.changed[0].mode == 0o040777


def test_deletions_come_first_deepest_first_then_new_paths_parents_first() -> None:
    """A peer applying the log in order empties ``d`` before it removes it, and before the file
    that now has the name ``d`` arrives; a new directory comes before its files."""
    dkey = StatKey(size=0, mtime_ns=0, inode=3, mode=DIR)
    fkey = StatKey(size=1, mtime_ns=10 * SEC, inode=4, mode=REG)
    records = {"d": dir_rec(stat=dkey), "d/e": dir_rec("d/e", stat=dkey),
               "d/e/f": rec("d/e/f", stat=fkey)}
    observed = {"d": fkey, "n": dkey, "n/g": fkey}
    hashed = {"d": Hashed(fkey, "d9"), "n": Hashed(dkey, DIRECTORY), "n/g": Hashed(fkey, "d8")}
    result = plan_scan(records, observed, hashed, node="a", now_ns=99 * SEC, next_seq=1)
    assert [(r.path, r.deleted) for r in result.changed] == [
        ("d/e/f", True), ("d/e", True), ("d", False), ("n", False), ("n/g", False)]
    assert [r.seq for r in result.changed] == [1, 2, 3, 4, 5]


def test_a_peer_directory_is_made_or_given_its_mode() -> None:
    remote = dir_rec(vector=vv(b=1), writer="b")
    (made,) = plan_merge({}, remote, LWW).steps
    assert made.write is Write.DIRECTORY
    assert made.source is None  # nothing to fetch
    local = dir_rec(vector=vv(b=1), writer="b")
    assert plan_merge({"d": local}, remote, LWW).skip
    chmod = dir_rec(vector=vv(b=2), mode=0o040700, writer="b")
    (step,) = plan_merge({"d": local}, chmod, LWW).steps
    assert step.write is Write.METADATA
    # a directory in place of a file this node holds (the peer saw the file)
    file_here = rec("d", vector=vv(b=1), writer="b")
    (replaced,) = plan_merge({"d": file_here}, dir_rec(vector=vv(b=2), writer="b"), LWW).steps
    assert replaced.write is Write.DIRECTORY
    assert replaced.expect == file_here


def test_a_deleted_directory_is_removed_and_never_copied_as_a_conflict_loser() -> None:
    local = dir_rec(vector=vv(a=1))
    gone = replace(dir_rec(vector=vv(a=2), writer="b"), digest=TOMBSTONE, mode=0,
                   mtime_ns=50 * SEC)
    (step,) = plan_merge({"d": local}, gone, KEEP).steps
    assert step.write is Write.DELETE
    # concurrent: a chmod here, the deletion there; the directory loses (it has no mtime), and
    # under KeepBoth it is not kept under a conflict name (its entries are records of their own)
    chmod = dir_rec(vector=vv(a=2), mode=0o040700)
    concurrent = replace(gone, vector=vv(a=1, b=1))
    plan = plan_merge({"d": chmod}, concurrent, KEEP)
    assert [s.write for s in plan.steps] == [Write.DELETE]
    assert plan.resolved[0].kept_as == ""
    # a file and a directory made at one name on two nodes: the file is kept, the directory
    # is not copied
    file_there = rec("d", vector=vv(b=1), digest="ffff", writer="b", mtime_ns=60 * SEC)
    plan = plan_merge({"d": dir_rec(vector=vv(a=1))}, file_there, KEEP)
    assert [s.write for s in plan.steps] == [Write.CONTENT]
    assert plan.resolved[0].kept_as == ""


def test_an_unsafe_remote_path_is_refused() -> None:
    with pytest.raises(InvalidArgument):
        plan_merge({}, rec(path="../etc/passwd"), LWW)


# -- simulation -----------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    disk: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # digest, mode, mtime
    inodes: dict[str, int] = field(default_factory=dict)
    records: dict[str, Record] = field(default_factory=dict)
    next_seq: int = 1
    cursors: dict[str, int] = field(default_factory=dict)
    notes: dict[str, ConflictNote] = field(default_factory=dict)
    floor: VersionVector = field(default_factory=VersionVector)


class World:
    def __init__(self, names: list[str], policy: ConflictPolicy) -> None:
        self.nodes = {n: Node(n) for n in names}
        self.policy = policy
        self.clock = 100 * SEC
        self.inode = 0
        self.written: set[str] = set()
        self.superseded: set[str] = set()

    def tick(self) -> int:
        self.clock += 3 * SEC
        return self.clock

    def stat(self, node: Node, path: str) -> StatKey:
        digest, mode, mtime = node.disk[path]
        return StatKey(size=len(digest), mtime_ns=mtime, inode=node.inodes[path], mode=mode)

    def put(self, node: Node, path: str, digest: str, mode: int, mtime: int) -> None:
        self.inode += 1
        node.disk[path] = (digest, mode, mtime)
        node.inodes[path] = self.inode

    def write(self, name: str, path: str, digest: str) -> None:
        node = self.nodes[name]
        self.scan(node)  # what was there is known before it is overwritten
        if path in node.disk:
            self.superseded.add(node.disk[path][0])
        self.put(node, path, digest, REG, self.tick())
        self.written.add(digest)

    def mkdir(self, name: str, path: str, mode: int) -> None:
        """Make (or chmod) the directory ``path``, in place of a file there."""
        node = self.nodes[name]
        self.scan(node)
        if path in node.disk and node.disk[path][0] != DIRECTORY:
            self.superseded.add(node.disk[path][0])
        self.put(node, path, DIRECTORY, mode, 0)

    def delete(self, name: str, path: str) -> None:
        node = self.nodes[name]
        self.scan(node)
        if path in node.disk:
            self.superseded.add(node.disk.pop(path)[0])

    def scan(self, node: Node) -> None:
        observed = {p: self.stat(node, p) for p in node.disk}
        hashed = {p: Hashed(k, node.disk[p][0]) for p, k in observed.items()
                  if needs_hash(node.records.get(p), k)}
        result = plan_scan(node.records, observed, hashed, node=node.name, now_ns=self.tick(),
                           next_seq=node.next_seq, floor=node.floor)
        for r in (*result.changed, *result.refreshed):
            node.records[r.path] = r
        node.next_seq = result.next_seq

    def collect(self, name: str) -> None:
        """Drop the tombstones every other node has pulled past (as the agent does)."""
        node = self.nodes[name]
        merged_by = {o.name: o.cursors[name] for o in self.nodes.values()
                     if o.name != name and name in o.cursors}
        dropped = collectable_tombstones(node.records, merged_by,
                                         [n for n in self.nodes if n != name])
        for record in dropped:
            del node.records[record.path]
        node.floor = raised_floor(node.floor, dropped)

    def pull(self, dst_name: str, src_name: str) -> int:
        """One pull round; returns how many records changed at dst."""
        dst, src = self.nodes[dst_name], self.nodes[src_name]
        self.scan(dst)
        self.scan(src)
        cursor = dst.cursors.get(src_name, 0)
        changes = sorted((r for r in src.records.values() if r.seq > cursor),
                         key=lambda r: r.seq)
        changed = 0
        for remote in changes:
            before = dict(dst.disk)
            plan = plan_merge(dst.records, remote.traveling(), self.policy)
            for note in (*plan.resolved, *plan.learned):
                dst.notes.setdefault(note.id, note)
            for step in plan.steps:
                record = step.record
                assert dst.records.get(step.path) == step.expect
                if step.write is Write.CONTENT:
                    assert step.source is not None
                    origin = before if step.source.local else src.disk
                    assert origin[step.source.path][0] == record.digest
                    self.put(dst, step.path, record.digest, record.mode, record.mtime_ns)
                elif step.write is Write.METADATA:
                    self.put(dst, step.path, record.digest, record.mode, record.mtime_ns)
                elif step.write is Write.DELETE:
                    dst.disk.pop(step.path, None)
                elif step.write is Write.DIRECTORY:
                    self.put(dst, step.path, DIRECTORY, record.mode, 0)
                stat = self.stat(dst, step.path) if not record.deleted else None
                dst.records[step.path] = replace(record, seq=dst.next_seq, stat=stat,
                                                 hashed_at_ns=self.tick())
                dst.next_seq += 1
                changed += 1
            dst.cursors[src_name] = remote.seq
        return changed

    def settle(self) -> None:
        names = sorted(self.nodes)
        for _ in range(12):
            if sum(self.pull(d, s) for d in names for s in names if d != s) == 0:
                return
        raise AssertionError("the replicas did not settle")


def test_a_tombstone_is_dropped_only_once_every_peer_merged_it() -> None:
    records = {"gone": rec("gone", digest=TOMBSTONE, size=0, mode=0, vector=vv(a=2)),
               "also": rec("also", digest=TOMBSTONE, size=0, mode=0, vector=vv(b=3)),
               "live": rec("live")}
    records = {p: replace(r, seq=n) for n, (p, r) in enumerate(records.items(), start=4)}
    assert collectable_tombstones(records, {"b": 9}, ["b", "c"]) == ()  # c never said
    assert collectable_tombstones(records, {"b": 9, "c": 4}, ["b", "c"]) == (records["gone"],)
    both = collectable_tombstones(records, {"b": 9, "c": 5}, ["b", "c"])
    assert both == (records["gone"], records["also"])
    assert collectable_tombstones(records, {}, []) == both  # a replica without peers
    assert raised_floor(vv(c=1), both) == vv(a=2, b=3, c=1)


def test_a_file_made_again_after_its_tombstone_was_dropped_reaches_every_node() -> None:
    """Without the floor, the new version ({a:1}) would lose to the tombstone ({a:2}) the
    peers still hold, and come back deleted on a too: the write lost everywhere."""
    world = World(["a", "b", "c"], LWW)
    world.write("a", "x", "first")
    world.settle()
    world.delete("a", "x")
    world.settle()
    world.collect("a")
    assert "x" not in world.nodes["a"].records
    assert world.nodes["b"].records["x"].deleted  # b and c have not dropped theirs
    world.write("a", "x", "again")
    world.settle()
    assert all(n.disk.get("x", ("",))[0] == "again" for n in world.nodes.values())


ops = st.lists(st.tuples(
    st.sampled_from(["write", "write", "delete", "pull", "mkdir", "collect"]),
    st.sampled_from(["a", "b", "c"]), st.sampled_from(["a", "b", "c"]),
    st.sampled_from(["x", "y", "d/z", "d"])), max_size=25)


@settings(max_examples=150, deadline=None)
@given(ops=ops, policy=st.sampled_from(list(ConflictPolicy)))
def test_replicas_converge_and_lose_nothing_silently(
        ops: list[tuple[str, str, str, str]], policy: ConflictPolicy) -> None:
    world = World(["a", "b", "c"], policy)
    for number, (op, node, other, path) in enumerate(ops):
        if op == "write":
            world.write(node, path, f"{node}{number:03d}")
        elif op == "mkdir":
            world.mkdir(node, path, DIR if number % 2 else 0o040700)
        elif op == "collect":
            world.collect(node)
        elif op == "delete":
            world.delete(node, path)
        elif node != other:
            world.pull(node, other)
    world.settle()
    disks = [n.disk for n in world.nodes.values()]
    contents = [{p: (d, m) for p, (d, m, _) in disk.items()} for disk in disks]
    assert contents[0] == contents[1] == contents[2]
    # tombstones may have been dropped on some nodes and not yet on others
    versions = [{p: (r.vector, r.digest) for p, r in n.records.items() if not r.deleted}
                for n in world.nodes.values()]
    assert versions[0] == versions[1] == versions[2]
    present = {d for d, _, _ in disks[0].values()}
    notes = [note for n in world.nodes.values() for note in n.notes.values()]
    reported = {note.loser_digest for note in notes if not note.kept_as}
    for digest in world.written:
        assert digest in present or digest in world.superseded or digest in reported, \
            f"{digest} vanished without a trace"
    if policy is ConflictPolicy.KEEP_BOTH:
        assert all(note.kept_as or not note.loser_digest for note in notes)
