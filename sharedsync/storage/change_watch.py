"""Whether anything changed in a directory tree, from the kernel's inotify notifications.

The ext4 fallback store has no ``ctransid`` to compare (see :mod:`sharedsync.storage.btrfs`):
without a hint, the file-level replication loop would walk and stat the whole tree every cycle
to learn that nothing changed. A :class:`ChangeWatch` keeps one inotify watch on every directory
of the tree and counts the batches of events it reads; a caller that remembers the
:meth:`~ChangeWatch.generation` it last acted on knows, in one non-blocking read, whether a walk
can find anything new.

The hint can only err on the side of "changed": events are never lost without the counter
moving (a queue overflow moves it too), a new directory gets its watch before its contents are
trusted (the generation moves when it is created), and a tree that cannot be watched completely
(the per-user watch limit) yields ``None`` so that the caller walks every time. The caller still
walks now and then regardless: inotify does not see writes through a shared ``mmap``.

It also says *where* things changed (:meth:`~ChangeWatch.take_places`): the directories whose
entries changed, and the directories that appeared (moved or made) since the last call, whose
contents were never watched before their watch was added and must be walked whole. A caller
that re-reads only those (:mod:`sharedsync.core.tree_refresh`) sees what a whole walk would,
at the cost of the change rather than of the tree. One thing it cannot place: a name made and
removed again between two calls may have been another hard link of a file listed elsewhere,
written through that name (inotify reports a write in the directory of the name written
through, and the making of a link not at all in the other names' directories); then the
places are unknown (``None``) and the caller walks the whole tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from inotify_simple import INotify
from inotify_simple import flags as _flags

log = structlog.get_logger(__name__)

#: Every event that can mean a changed file, directory or name.
WATCHED = (_flags.MODIFY | _flags.ATTRIB | _flags.CLOSE_WRITE | _flags.CREATE | _flags.DELETE
           | _flags.DELETE_SELF | _flags.MOVED_FROM | _flags.MOVED_TO | _flags.MOVE_SELF
           | _flags.ONLYDIR | _flags.DONT_FOLLOW)
#: Names made between two ``take_places`` beyond which the places are given up (walk whole).
MAX_PLACES = 50_000
_NEW_DIRECTORY = _flags.ISDIR | _flags.CREATE
_MOVED_DIRECTORY = _flags.ISDIR | _flags.MOVED_TO


@dataclass
class Places:
    """Where a tree changed, as paths relative to its root ("" is the root itself)."""

    #: Directories whose entries (names, or the stat of one) changed.
    directories: set[str] = field(default_factory=set)
    #: Directories that appeared: walk each whole (nothing inside them was watched before).
    trees: set[str] = field(default_factory=set)


class ChangeWatch:
    """Counts changes below ``root`` (a directory the caller owns); close it when done."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._inotify = INotify(nonblocking=True)
        self._paths: dict[int, Path] = {}
        self._generation = 0
        self._complete = True
        #: Where changes happened since the last ``take_places``; None: unknown (events lost).
        self._places: Places | None = Places()
        #: Names (not directories) made since the last ``take_places``.
        self._made: set[str] = set()
        self._watch_tree(root)

    def close(self) -> None:
        self._inotify.close()

    def generation(self) -> int | None:
        """A number that moves whenever something below the root may have changed since it
        was last read; ``None`` when the tree is not watched completely (walk it instead)."""
        events = self._inotify.read(timeout=0)
        if events:
            self._generation += 1
            for event in events:
                self._follow(event.wd, event.mask, event.name)
        return self._generation if self._complete else None

    def take_places(self) -> Places | None:
        """Where the tree changed since the last call (reading pending events first), then
        start over; None when that is unknown (events were lost, or the tree is not watched
        completely): walk the whole tree instead."""
        known = self.generation() is not None
        places, self._places = self._places, Places()
        self._made.clear()
        return places if known else None

    def _relative(self, path: Path) -> str | None:
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None  # moved out of the tree: nothing of ours
        return "" if rel == Path(".") else rel.as_posix()

    def _follow(self, wd: int, mask: int, name: str) -> None:
        if mask & _flags.Q_OVERFLOW:
            # events were dropped: which directories appeared is unknown, so watch all again
            self._places = None
            self._rewatch()
            return
        if mask & _flags.IGNORED:
            self._paths.pop(wd, None)
            return
        directory = self._paths.get(wd)
        if directory is None or not name:
            # an event on a watched directory itself: its parent's watch reports it by name
            return
        if self._places is not None and (rel := self._relative(directory)) is not None:
            self._places.directories.add(rel)
            if not self._note_name(f"{rel}/{name}" if rel else name, mask):
                self._places = None
                self._made.clear()
        if mask & _NEW_DIRECTORY == _NEW_DIRECTORY or mask & _MOVED_DIRECTORY == _MOVED_DIRECTORY:
            self._watch_tree(directory / name)
            if self._places is not None and (rel := self._relative(directory / name)) is not None:
                self._places.trees.add(rel)

    def _note_name(self, path: str, mask: int) -> bool:
        """Follow names made since the last ``take_places``; False when the places can no
        longer be told: a name made and removed again may have been another link of a file
        listed elsewhere (see the module docstring), or so many were made that a whole walk
        is no dearer."""
        if mask & _flags.ISDIR:
            return True
        if mask & (_flags.CREATE | _flags.MOVED_TO):
            self._made.add(path)
            return len(self._made) <= MAX_PLACES
        if mask & _flags.MOVED_FROM:
            self._made.discard(path)  # it is where it moved to (and made there)
        elif mask & _flags.DELETE and path in self._made:
            return False
        return True

    def _rewatch(self) -> None:
        for wd in list(self._paths):
            with contextlib.suppress(OSError):  # already gone with its directory
                self._inotify.rm_watch(wd)
        self._paths.clear()
        self._complete = True
        self._watch_tree(self.root)

    def _watch_tree(self, top: Path) -> None:
        """Watch ``top`` and every directory below it (symlinks are never followed)."""
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                wd = self._inotify.add_watch(directory, WATCHED)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:  # fs.inotify.max_user_watches reached
                    if self._complete:
                        log.warning("inotify watch limit reached: the tree is walked every "
                                    "cycle instead", root=str(self.root))
                    self._complete = False
                    return
                continue  # gone or no longer a directory: its parent's event says so
            self._paths[wd] = directory
            try:
                with os.scandir(directory) as entries:
                    stack.extend(Path(e.path) for e in entries
                                 if e.is_dir(follow_symlinks=False))
            except OSError:
                continue
