"""tree_refresh: a listing kept up to date from inotify equals a walk of the whole tree.

The property runs on a real directory with real inotify (``ChangeWatch``) and the real
``LiveTree``: hypothesis makes random batches of changes (files written, appended, removed,
renamed, hard-linked and written through another name, directories made, moved, removed and
replaced by files, modes changed, symlinks made), and after every batch the refreshed listing
must be exactly what a whole walk finds. Missing one change here would mean a Synchronous write
acknowledged without being replicated, so the examples are many.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replication_agent.livetree import LiveTree
from sharedsync.core.file_merge import StatKey
from sharedsync.core.tree_refresh import Listing, depth, everything, parent_of, refresh
from sharedsync.storage.change_watch import ChangeWatch

NAMES = ["a", "b", "c", "d"]
KINDS = ["mkdir", "write", "append", "remove", "rmtree", "rename", "link", "write_through",
         "chmod", "symlink", "dir_to_file"]
Op = tuple[str, int, int, str]
ops = st.tuples(st.sampled_from(KINDS), st.integers(0, 50), st.integers(0, 50),
                st.sampled_from(NAMES))


def entries(root: Path) -> tuple[list[Path], list[Path]]:
    """Directories (the root first) and non-directories below ``root``, never through a link."""
    dirs, others = [root], []
    for top, subdirs, files in os.walk(root):
        dirs += [Path(top) / d for d in subdirs if not (Path(top) / d).is_symlink()]
        others += [Path(top) / f for f in files]
        others += [Path(top) / d for d in subdirs if (Path(top) / d).is_symlink()]
    return sorted(dirs), sorted(others)


def apply(root: Path, op: Op) -> None:
    """Carry out one change (anything that does not fit the tree as it is now is skipped)."""
    kind, i, j, name = op
    dirs, files = entries(root)
    regular = [f for f in files if f.is_file() and not f.is_symlink()]
    directory = dirs[i % len(dirs)]
    target = directory / name
    try:
        if kind == "mkdir":
            target.mkdir()
        elif kind == "write":
            if not target.is_dir():
                target.unlink(missing_ok=True) if target.is_symlink() else None
                target.write_bytes(os.urandom(j))
        elif kind == "append" and regular:
            with open(regular[j % len(regular)], "ab") as out:
                out.write(b"x" * (j + 1))
        elif kind == "remove" and files:
            files[j % len(files)].unlink()
        elif kind == "rmtree" and len(dirs) > 1:
            shutil.rmtree(dirs[1 + j % (len(dirs) - 1)])
        elif kind == "rename":
            movable = dirs[1:] + files
            if movable:
                source = movable[j % len(movable)]
                if not (target == source or source in target.parents or target.exists()):
                    source.rename(target)
        elif kind == "link" and regular and not target.exists():
            os.link(regular[j % len(regular)], target)
        elif kind == "write_through" and regular:
            # rewrite in place, as a pod would: a file with several names changes under all
            with open(regular[j % len(regular)], "r+b") as out:
                out.write(os.urandom(8))
        elif kind == "chmod":
            everything = dirs[1:] + regular
            if everything:
                path = everything[j % len(everything)]
                path.chmod(0o700 if stat.S_IMODE(path.stat().st_mode) != 0o700 else 0o755)
        elif kind == "symlink" and not target.exists() and not target.is_symlink():
            target.symlink_to(NAMES[j % len(NAMES)])
        elif kind == "dir_to_file" and len(dirs) > 1:
            gone = dirs[1 + j % (len(dirs) - 1)]
            shutil.rmtree(gone)
            gone.write_bytes(b"now a file")
    except (FileExistsError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            OSError):
        pass


def whole(tree: LiveTree) -> Listing:
    linked = set[str]()
    return Listing.of(tree.walk(linked=linked), linked)


def refreshed(tree: LiveTree, watch: ChangeWatch, listing: Listing) -> Listing:
    places = watch.take_places()
    if places is None:  # a name made and removed again: the watch cannot place everything
        return whole(tree)

    def walk_below(directory: str,
                   descend: Callable[[str, StatKey], bool]) -> dict[str, StatKey] | None:
        return tree.walk_below(directory, descend, linked=listing.linked)

    refresh(listing, directories=places.directories, trees=places.trees, recheck=(),
            walk_below=walk_below, lstat=tree.lstat)
    return listing


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(ops, min_size=1, max_size=12), min_size=1, max_size=4))
def test_a_refreshed_listing_is_a_whole_walk(tmp_path: Path, batches: list[list[Op]]) -> None:
    root = tmp_path / "tree"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for setup in (("mkdir", 0, 0, "a"), ("write", 1, 100, "b"), ("mkdir", 1, 0, "c"),
                  ("write", 0, 10, "d")):
        apply(root, setup)
    tree = LiveTree(root)
    watch = ChangeWatch(root)
    try:
        listing = whole(tree)
        for batch in batches:
            for op in batch:
                apply(root, op)
            listing = refreshed(tree, watch, listing)
            assert listing.entries == tree.walk(), batch
    finally:
        watch.close()


def test_nothing_changed_reads_nothing(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"1")
    tree = LiveTree(tmp_path)
    listing = whole(tree)
    before = dict(listing.entries)

    def no_walk(directory: str, descend: Callable[[str, StatKey], bool]) -> None:
        raise AssertionError(f"walked {directory!r}")

    def no_lstat(path: str) -> None:
        raise AssertionError(f"looked at {path!r}")

    assert refresh(listing, directories=(), trees=(), recheck=(), walk_below=no_walk,
                   lstat=no_lstat) == before


def test_only_the_changed_directory_is_read(tmp_path: Path) -> None:
    """The point of it all: a write in one directory of many reads that directory only."""
    for d in range(20):
        (tmp_path / f"dir{d}").mkdir()
        for f in range(5):
            (tmp_path / f"dir{d}" / f"f{f}").write_bytes(b"x")
    tree = LiveTree(tmp_path)
    watch = ChangeWatch(tmp_path)
    try:
        listing = whole(tree)
        (tmp_path / "dir7" / "f3").write_bytes(b"changed")
        places = watch.take_places()
        assert places is not None
        assert places.directories == {"dir7"}
        assert places.trees == set()
        read: list[str] = []

        def walk_below(directory: str,
                       descend: Callable[[str, StatKey], bool]) -> dict[str, StatKey] | None:
            read.append(directory)
            return tree.walk_below(directory, descend)

        refresh(listing, directories=places.directories, trees=places.trees, recheck=(),
                walk_below=walk_below, lstat=tree.lstat)
        assert read == ["dir7"]
        assert listing.entries == tree.walk()
    finally:
        watch.close()


def test_a_missing_root_is_an_error_never_an_empty_tree(tmp_path: Path) -> None:
    """An empty listing would record every file as deleted, and peers would merge that."""
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "f").write_bytes(b"1")
    tree = LiveTree(tmp_path / "live")
    listing = whole(tree)
    shutil.rmtree(tmp_path / "live")
    with pytest.raises(FileNotFoundError):
        tree.walk()
    with pytest.raises(FileNotFoundError):
        tree.walk_below("", everything)
    with pytest.raises(FileNotFoundError):
        refresh(listing, directories={""}, trees=(), recheck=(), walk_below=tree.walk_below,
                lstat=tree.lstat)


def test_lost_events_ask_for_a_whole_walk(tmp_path: Path) -> None:
    watch = ChangeWatch(tmp_path)
    try:
        watch._places = None  # what a queue overflow does
        assert watch.take_places() is None
        assert watch.take_places() is not None  # and the next round starts afresh
    finally:
        watch.close()


@pytest.mark.parametrize(("path", "expected"), [("", 0), ("a", 1), ("a/b", 2), ("a/b/c", 3)])
def test_depth_and_parent(path: str, expected: int) -> None:
    assert depth(path) == expected
    if path:
        assert parent_of(path) == path.rpartition("/")[0]
