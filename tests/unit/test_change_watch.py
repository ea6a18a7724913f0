"""ChangeWatch: the inotify hint that spares the ext4 fallback a walk when nothing changed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sharedsync.storage.change_watch import ChangeWatch


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, ChangeWatch]]:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "file").write_bytes(b"x")
    watch = ChangeWatch(tmp_path)
    yield tmp_path, watch
    watch.close()


def moved(watch: ChangeWatch, before: int | None) -> bool:
    now = watch.generation()
    assert now is not None
    return now != before


def test_nothing_changed_keeps_the_generation(watched: tuple[Path, ChangeWatch]) -> None:
    root, watch = watched
    first = watch.generation()
    assert first is not None
    (root / "old" / "file").read_bytes()  # reads are not changes
    os.stat(root / "old" / "file")
    assert watch.generation() == first


@pytest.mark.parametrize("change", ["write", "create", "delete", "rename", "chmod", "mkdir"])
def test_every_kind_of_change_moves_it(watched: tuple[Path, ChangeWatch], change: str) -> None:
    root, watch = watched
    before = watch.generation()
    target = root / "old" / "file"
    if change == "write":
        with open(target, "r+b") as f:
            f.write(b"y")
    elif change == "create":
        (root / "new").write_bytes(b"")
    elif change == "delete":
        target.unlink()
    elif change == "rename":
        target.rename(root / "old" / "renamed")
    elif change == "chmod":
        target.chmod(0o600)
    else:
        (root / "old" / "sub").mkdir()
    assert moved(watch, before)


def test_a_new_directory_is_watched_from_then_on(watched: tuple[Path, ChangeWatch]) -> None:
    root, watch = watched
    (root / "made" / "deeper").mkdir(parents=True)
    after_mkdir = watch.generation()
    (root / "made" / "deeper" / "file").write_bytes(b"inside")
    assert moved(watch, after_mkdir)


def test_a_directory_moved_in_is_watched_too(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    (outside / "tree").mkdir(parents=True)
    watch = ChangeWatch(root)
    try:
        (outside / "tree").rename(root / "tree")
        after_move = watch.generation()
        (root / "tree" / "file").write_bytes(b"inside")
        assert moved(watch, after_move)
    finally:
        watch.close()
