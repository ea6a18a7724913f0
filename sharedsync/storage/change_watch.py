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
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import structlog
from inotify_simple import INotify
from inotify_simple import flags as _flags

log = structlog.get_logger(__name__)

#: Every event that can mean a changed file, directory or name.
WATCHED = (_flags.MODIFY | _flags.ATTRIB | _flags.CLOSE_WRITE | _flags.CREATE | _flags.DELETE
           | _flags.DELETE_SELF | _flags.MOVED_FROM | _flags.MOVED_TO | _flags.MOVE_SELF
           | _flags.ONLYDIR | _flags.DONT_FOLLOW)
_NEW_DIRECTORY = _flags.ISDIR | _flags.CREATE
_MOVED_DIRECTORY = _flags.ISDIR | _flags.MOVED_TO


class ChangeWatch:
    """Counts changes below ``root`` (a directory the caller owns); close it when done."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._inotify = INotify(nonblocking=True)
        self._paths: dict[int, Path] = {}
        self._generation = 0
        self._complete = True
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

    def _follow(self, wd: int, mask: int, name: str) -> None:
        if mask & _flags.Q_OVERFLOW:
            # events were dropped: which directories appeared is unknown, so watch all again
            self._rewatch()
        elif mask & _flags.IGNORED:
            self._paths.pop(wd, None)
        elif mask & _NEW_DIRECTORY == _NEW_DIRECTORY or mask & _MOVED_DIRECTORY == _MOVED_DIRECTORY:
            parent = self._paths.get(wd)
            if parent is not None:
                self._watch_tree(parent / name)

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
