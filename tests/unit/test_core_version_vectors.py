"""sharedsync.core.version_vectors: ordering of writes and deterministic conflict resolution."""

from __future__ import annotations

import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedsync.core.errors import InvalidArgument
from sharedsync.core.version_vectors import (
    CONFLICT_MARK,
    MAX_NAME_BYTES,
    ConflictPolicy,
    FileVersion,
    Ordering,
    Resolution,
    VersionVector,
    compare,
    conflict_name,
    dominates,
    resolve,
)

NODES = ["node-a", "node-b", "node-c", "worker.example.com"]
vectors = st.dictionaries(st.sampled_from(NODES), st.integers(0, 4)).map(VersionVector.of)
digests = st.sampled_from(["aa11", "bb22", "cc33"])
policies = st.sampled_from(list(ConflictPolicy))


def version(path: str = "dir/file.txt", vector: VersionVector | None = None, mtime_ns: int = 0,
            digest: str = "aa11", node: str = "node-a", size: int = 10) -> FileVersion:
    return FileVersion(path=path, vector=vector or VersionVector(), mtime_ns=mtime_ns,
                       size=size, digest=digest, node=node)


files = st.builds(
    version, vector=vectors, mtime_ns=st.integers(0, 3), digest=digests,
    node=st.sampled_from(NODES), size=st.integers(0, 2),
)


# -- vectors -------------------------------------------------------------------------------------


def v(**counters: int) -> VersionVector:
    return VersionVector.of(counters)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (v(), v(), Ordering.EQUAL),
        (v(a=1), v(), Ordering.AFTER),
        (v(), v(a=1), Ordering.BEFORE),
        (v(a=2, b=1), v(a=1, b=1), Ordering.AFTER),
        (v(a=1, b=1), v(a=1, b=2), Ordering.BEFORE),
        (v(a=1), v(b=1), Ordering.CONCURRENT),
        (v(a=2, b=1), v(a=1, b=2), Ordering.CONCURRENT),
        (v(a=1, b=0), v(a=1), Ordering.EQUAL),
    ],
)
def test_compare_table(a: VersionVector, b: VersionVector, expected: Ordering) -> None:
    assert compare(a, b) is expected
    assert a.compare(b) is expected
    assert dominates(a, b) is (expected in (Ordering.AFTER, Ordering.EQUAL))


def test_vector_is_an_immutable_canonical_mapping() -> None:
    vec = VersionVector.of({"b": 2, "a": 1, "c": 0})
    assert vec.counters == (("a", 1), ("b", 2))
    assert dict(vec) == {"a": 1, "b": 2}
    assert vec["b"] == 2
    assert "c" not in vec
    assert vec.counter("c") == 0
    assert len(vec) == 2
    assert vec == VersionVector.of({"a": 1, "b": 2})
    assert hash(vec) == hash(VersionVector.of({"a": 1, "b": 2}))
    assert str(vec) == "{a:1, b:2}"
    with pytest.raises(KeyError):
        vec["c"]


@pytest.mark.parametrize(
    "counters",
    [(("b", 1), ("a", 1)), (("a", 1), ("a", 2)), (("a", 0),), (("a", -1),), (("", 1),),
     (("a", True),)],
)
def test_vector_refuses_non_canonical_form(counters: tuple[tuple[str, int], ...]) -> None:
    with pytest.raises(InvalidArgument):
        VersionVector(counters)


@pytest.mark.parametrize("counters", [{"a": -1}, {"a": True}, {"": 1}])
def test_vector_of_refuses_bad_counters(counters: dict[str, int]) -> None:
    with pytest.raises(InvalidArgument):
        VersionVector.of(counters)


def test_bump() -> None:
    assert v().bump("a") == v(a=1)
    assert v(a=1, b=3).bump("b") == v(a=1, b=4)
    with pytest.raises(InvalidArgument):
        v().bump("")


@given(vectors, vectors)
def test_compare_is_antisymmetric(a: VersionVector, b: VersionVector) -> None:
    assert compare(b, a) is compare(a, b).reversed()
    assert (compare(a, b) is Ordering.EQUAL) == (a == b)


@given(vectors, vectors, vectors)
def test_merge_is_a_join(a: VersionVector, b: VersionVector, c: VersionVector) -> None:
    m = a.merge(b)
    assert m == b.merge(a)
    assert a.merge(a) == a
    assert m.merge(c) == a.merge(b.merge(c))
    assert dominates(m, a)
    assert dominates(m, b)
    # The least upper bound: anything covering both covers the merge.
    if dominates(c, a) and dominates(c, b):
        assert dominates(c, m)


@given(vectors, vectors)
def test_compare_is_consistent_with_merge(a: VersionVector, b: VersionVector) -> None:
    order = compare(a, b)
    assert dominates(a, b) == (a.merge(b) == a)
    assert dominates(b, a) == (a.merge(b) == b)
    assert (order is Ordering.CONCURRENT) == (a.merge(b) not in (a, b))


@given(vectors, st.sampled_from(NODES))
def test_bump_moves_strictly_forward(a: VersionVector, node: str) -> None:
    bumped = a.bump(node)
    assert compare(bumped, a) is Ordering.AFTER
    assert bumped.counter(node) == a.counter(node) + 1


@given(vectors, vectors, st.sampled_from(NODES))
def test_a_write_after_a_merge_supersedes_both(a: VersionVector, b: VersionVector,
                                               node: str) -> None:
    after = a.merge(b).bump(node)
    assert compare(after, a) is Ordering.AFTER
    assert compare(after, b) is Ordering.AFTER


# -- conflict names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("docs/report.txt", "docs/report.conflict-node-b-0123456789ab.txt"),
        ("report", "report.conflict-node-b-0123456789ab"),
        (".bashrc", ".bashrc.conflict-node-b-0123456789ab"),
        ("a/b/archive.tar.gz", "a/b/archive.tar.conflict-node-b-0123456789ab.gz"),
    ],
)
def test_conflict_name_table(path: str, expected: str) -> None:
    assert conflict_name(path, "node-b", "0123456789abcdef") == expected


def test_conflict_name_cannot_escape_its_directory() -> None:
    name = conflict_name("d/f.txt", "../../etc", "ab/cd")
    assert name.startswith("d/f.conflict-")
    assert posixpath.dirname(name) == "d"


def test_conflict_name_of_a_maximal_name_differs_from_it() -> None:
    tag = f"{CONFLICT_MARK}n-abc"
    name = "x" * (MAX_NAME_BYTES - len(tag) - 4) + tag + ".txt"
    assert len(name.encode()) == MAX_NAME_BYTES
    assert conflict_name(name, "n", "abc") != name
    underscored = "_" + tag + "." + "s" * (MAX_NAME_BYTES - len(tag) - 2)
    assert conflict_name(underscored, "n", "abc") != underscored


path_parts = st.text(st.characters(blacklist_characters="/\0", codec="utf-8"),
                     min_size=1, max_size=300).filter(lambda s: s not in {".", ".."})


@given(st.lists(path_parts, min_size=1, max_size=3), st.text(min_size=1, max_size=80),
       st.text(st.sampled_from("0123456789abcdef"), min_size=1, max_size=64))
def test_conflict_name_properties(parts: list[str], node: str, digest: str) -> None:
    path = "/".join(parts)
    name = conflict_name(path, node, digest)
    assert name == conflict_name(path, node, digest)
    assert name != path
    assert posixpath.dirname(name) == posixpath.dirname(path)
    base = posixpath.basename(name)
    assert 0 < len(base.encode()) <= MAX_NAME_BYTES
    assert CONFLICT_MARK in base


# -- resolve -------------------------------------------------------------------------------------


def test_newer_version_wins_without_conflict() -> None:
    old = version(vector=v(a=1), mtime_ns=100, digest="old", node="a")
    new = version(vector=v(a=1, b=1), mtime_ns=50, digest="new", node="b")  # clock behind
    for policy in ConflictPolicy:
        for local, remote in ((old, new), (new, old)):
            assert resolve(local, remote, policy) == Resolution(
                winner=new, vector=v(a=1, b=1), conflict=False)


def test_concurrent_last_writer_wins() -> None:
    a = version(vector=v(a=1), mtime_ns=200, digest="aaaa", node="a")
    b = version(vector=v(b=1), mtime_ns=100, digest="bbbb", node="b")
    res = resolve(a, b, ConflictPolicy.LAST_WRITER_WINS)
    assert res == Resolution(winner=a, vector=v(a=1, b=1), conflict=True, loser=b)
    assert res.kept is None


def test_mtime_tie_goes_to_the_greater_node_name() -> None:
    a = version(vector=v(a=1), mtime_ns=100, digest="aaaa", node="a")
    b = version(vector=v(b=1), mtime_ns=100, digest="bbbb", node="b")
    assert resolve(a, b, ConflictPolicy.LAST_WRITER_WINS).winner == b
    assert resolve(b, a, ConflictPolicy.LAST_WRITER_WINS).winner == b


def test_keep_both_keeps_the_loser_under_a_conflict_name() -> None:
    a = version(path="d/f.txt", vector=v(a=1), mtime_ns=200, digest="aaaa1111", node="a")
    b = version(path="d/f.txt", vector=v(b=1), mtime_ns=100, digest="bbbb2222", node="b")
    res = resolve(a, b, ConflictPolicy.KEEP_BOTH)
    assert res.winner == a
    assert res.conflict
    assert res.conflict_copy == "d/f.conflict-b-bbbb2222.txt"
    assert res.kept == version(path="d/f.conflict-b-bbbb2222.txt", vector=v(b=1), mtime_ns=100,
                               digest="bbbb2222", node="b")


def test_concurrent_identical_content_is_not_a_conflict() -> None:
    a = version(vector=v(a=1), mtime_ns=1, digest="same", node="a")
    b = version(vector=v(b=1), mtime_ns=2, digest="same", node="b")
    res = resolve(a, b, ConflictPolicy.KEEP_BOTH)
    assert res == Resolution(winner=b, vector=v(a=1, b=1), conflict=False)


def test_equal_vectors_with_different_content_are_treated_as_a_conflict() -> None:
    a = version(vector=v(a=1), mtime_ns=1, digest="one", node="a")
    b = version(vector=v(a=1), mtime_ns=2, digest="two", node="a")
    res = resolve(a, b, ConflictPolicy.KEEP_BOTH)
    assert res.conflict
    assert res.winner == b
    assert res.conflict_copy is not None


def test_resolve_refuses_different_paths() -> None:
    with pytest.raises(InvalidArgument, match="different files"):
        resolve(version(path="a"), version(path="b"), ConflictPolicy.KEEP_BOTH)


@pytest.mark.parametrize(
    "kwargs",
    [{"path": ""}, {"path": "dir/"}, {"path": "a/.."}, {"digest": ""}, {"node": ""},
     {"size": -1}],
)
def test_file_version_validation(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"path": "f", "vector": v(), "mtime_ns": 0, "size": 0,
                                 "digest": "d", "node": "n", **kwargs}
    with pytest.raises(InvalidArgument):
        FileVersion(**fields)  # type: ignore[arg-type]


@given(files, files, policies)
def test_resolve_is_deterministic_and_symmetric(a: FileVersion, b: FileVersion,
                                                policy: ConflictPolicy) -> None:
    res = resolve(a, b, policy)
    assert res == resolve(a, b, policy)
    assert res == resolve(b, a, policy)
    assert res.winner in (a, b)
    assert res.vector == a.vector.merge(b.vector)
    assert dominates(res.vector, a.vector)
    assert dominates(res.vector, b.vector)


@given(files, files, policies)
def test_a_descendant_always_wins_outright(a: FileVersion, b: FileVersion,
                                           policy: ConflictPolicy) -> None:
    order = compare(a.vector, b.vector)
    res = resolve(a, b, policy)
    if order is Ordering.AFTER:
        assert res.winner == a
        assert not res.conflict
    elif order is Ordering.BEFORE:
        assert res.winner == b
        assert not res.conflict


@given(files, files)
def test_keep_both_never_loses_a_version(a: FileVersion, b: FileVersion) -> None:
    res = resolve(a, b, ConflictPolicy.KEEP_BOTH)
    order = compare(a.vector, b.vector)
    if order in (Ordering.AFTER, Ordering.BEFORE):
        return  # the other version is an ancestor the winner already contains
    surviving = {(res.winner.digest, res.winner.size)}
    if res.kept is not None:
        assert res.kept.path != res.winner.path
        surviving.add((res.kept.digest, res.kept.size))
    assert {(a.digest, a.size), (b.digest, b.size)} <= surviving
    assert res.conflict == (res.kept is not None)


@given(files, files)
def test_last_writer_wins_reports_what_it_discards(a: FileVersion, b: FileVersion) -> None:
    res = resolve(a, b, ConflictPolicy.LAST_WRITER_WINS)
    assert res.conflict_copy is None
    if res.conflict:
        assert res.loser is not None
        assert {res.winner, res.loser} == {a, b}
        assert res.winner.mtime_ns >= res.loser.mtime_ns
    else:
        assert res.loser is None
