"""Bring a tree's listing up to date from where it changed, instead of walking all of it.

A file-level replica records what changed by comparing a listing of its tree (path -> stat)
with its records. Walking a tree of 20,000 files to find the one a Synchronous ``fsync`` wrote
costs about 100 ms on this kind of machine; inotify says which directories changed
(:class:`sharedsync.storage.change_watch.ChangeWatch`), and re-reading only those gives the
same listing for the cost of the change.

The rules, for a listing that was right when the previous one was taken:

- a directory that *appeared* (made, or moved in) is walked whole: nothing inside it was
  watched before its watch was added;
- a directory whose *entries* changed is listed again: entries gone are dropped with everything
  below them; a child directory that is new there, or another one now (its inode, mode or owner
  differs), is walked whole; the others keep what the listing had below them (a change inside
  one is reported as a change of that directory itself);
- a file with several hard links is written through any of its names, but inotify reports the
  change in that name's directory only (and the making of a new link in the new name's
  directory only): when an entry with several links (``linked``) changed or went, every other
  name of its inode is looked at again (a name made and gone between two refreshes is the
  watch's to report: it asks for a whole walk then);
- a path to *recheck* (a file that was being written) is looked at again.

A directory reported but no longer a directory (removed, or replaced by a file) is dropped with
everything below it; its parent, which saw that happen, says what is there now.

The I/O (listing a directory, ``lstat``) is passed in, so that this runs, and is tested,
without a filesystem.
"""

from __future__ import annotations

import stat
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .file_merge import StatKey

#: ``walk_below(directory, descend)``: the entries below ``directory`` (paths relative to the
#: tree's root), descending into a child directory only when ``descend(path, key)`` says so
#: (and then into everything below it); None when ``directory`` is no longer a directory.
WalkBelow = Callable[[str, Callable[[str, StatKey], bool]], "dict[str, StatKey] | None"]
#: ``lstat(path)``: what is at ``path`` now, or None.
Lstat = Callable[[str], "StatKey | None"]


def parent_of(path: str) -> str:
    """The directory holding ``path`` ("" for an entry of the root)."""
    return path.rpartition("/")[0]


def depth(path: str) -> int:
    return 0 if not path else path.count("/") + 1


#: The key of no entry (neither a directory nor a file).
_NOTHING = StatKey(size=0, mtime_ns=0, inode=0, mode=0)


def _is_dir(key: StatKey) -> bool:
    return stat.S_ISDIR(key.mode)


def everything(_path: str, _key: StatKey) -> bool:
    """Descend into every directory (a whole walk)."""
    return True


@dataclass
class Listing:
    """A tree's listing (path -> stat) with an index of each directory's entries.

    The caller keeps it from one refresh to the next and :func:`refresh` updates it in place:
    building the index costs about as much as the rest of a refresh (15 ms for 20,000 entries
    here), and a Synchronous fsync waits on every refresh. A refresh that raised leaves it
    half updated: take a new one from a whole walk then.
    """

    entries: dict[str, StatKey]
    children: defaultdict[str, set[str]]
    #: Files with several links; walks add to it (``walk_below(..., linked=listing.linked)``).
    linked: set[str]
    #: Paths put with a key they did not have (during one refresh).
    touched: set[str] = field(default_factory=set)
    #: Inodes of files with several links whose entry went (during one refresh): other names
    #: may hold the change.
    gone_linked: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, entries: dict[str, StatKey], linked: set[str]) -> Listing:
        """The listing of a whole walk (``entries``, with the ``linked`` files it found)."""
        children: defaultdict[str, set[str]] = defaultdict(set)
        for path in entries:
            children[parent_of(path)].add(path)
        return cls(entries, children, linked)

    def _forget(self, path: str) -> None:
        key = self.entries.pop(path)
        if path in self.linked:
            self.gone_linked.add(key.inode)

    def put(self, path: str, key: StatKey) -> None:
        if self.entries.get(path) != key:
            self.touched.add(path)
        self.entries[path] = key
        self.children[parent_of(path)].add(path)

    def other_names(self, paths: set[str], inodes: set[int]) -> set[str]:
        """Every other path of the files at ``paths``, and every path of ``inodes`` (same
        inode: one filesystem)."""
        wanted = {self.entries[p].inode for p in paths if p in self.entries} | inodes
        if not wanted:
            return set()
        return {p for p, key in self.entries.items()
                if key.inode in wanted and stat.S_ISREG(key.mode)} - paths

    def drop_below(self, directory: str) -> None:
        """Forget everything below ``directory`` (not the directory's own entry)."""
        stack = [directory]
        while stack:
            for child in self.children.pop(stack.pop(), set()):
                self._forget(child)
                stack.append(child)

    def drop(self, path: str) -> None:
        """Forget ``path`` and everything below it."""
        self.drop_below(path)
        if path in self.entries:
            self._forget(path)
            self.children[parent_of(path)].discard(path)

    def replace_below(self, directory: str, found: Mapping[str, StatKey]) -> None:
        """Everything below ``directory`` is ``found`` now."""
        self.drop_below(directory)
        for path, key in found.items():
            self.put(path, key)


def refresh(listing: Listing, *, directories: Iterable[str], trees: Iterable[str],
            recheck: Iterable[str], walk_below: WalkBelow, lstat: Lstat) -> dict[str, StatKey]:
    """Bring ``listing`` up to date from the places that changed since it was (see the module
    docstring for the rules); returns its entries."""
    listing.touched.clear()
    listing.gone_linked.clear()
    done: list[str] = []  # trees walked whole: nothing below them needs another look

    def covered(path: str) -> bool:
        return any(path == top or path.startswith(f"{top}/") or top == "" for top in done)

    for tree in sorted(set(trees), key=depth):
        if not covered(tree) and _walk_whole(listing, tree, walk_below, lstat):
            done.append(tree)
    for directory in sorted(set(directories), key=depth):
        if covered(directory):
            continue
        if directory and directory not in listing.entries:
            # gone with its parent (or a stale name, after a rename), or not seen yet: a
            # directory there now is walked whole
            if _walk_whole(listing, directory, walk_below, lstat):
                done.append(directory)
            continue
        _relist(listing, directory, walk_below)

    # ``linked`` is read only now: the walks above add the files they found with several links
    again = set(recheck) | listing.other_names(listing.touched & listing.linked,
                                               listing.gone_linked)
    for path in again:
        if covered(path):
            continue
        key = lstat(path)
        if key is None:
            continue  # gone: the DELETE in its directory says so
        if path in listing.entries and not _is_dir(key):
            listing.put(path, key)
    listing.linked.intersection_update(listing.entries)
    return listing.entries


def _relist(listing: Listing, directory: str, walk_below: WalkBelow) -> None:
    """List ``directory`` again; walk whole each child directory that is new or another one."""
    walked: set[str] = set()

    def descend(path: str, key: StatKey) -> bool:
        if listing.entries.get(path) == key:  # the same directory: its own watch reports it
            return False
        walked.add(path)
        return True

    found = walk_below(directory, descend)
    if found is None:
        listing.drop_below(directory)
        return
    for gone in listing.children.get(directory, set()) - found.keys():
        listing.drop(gone)
    for path in walked:
        listing.drop_below(path)
    for path, key in found.items():
        old = listing.entries.get(path)
        if old is not None and _is_dir(old) and not _is_dir(key):
            listing.drop_below(path)  # a directory replaced by a file
        listing.put(path, key)


def _walk_whole(listing: Listing, path: str, walk_below: WalkBelow, lstat: Lstat) -> bool:
    """Take ``path`` and everything below it afresh; True if it was walked as a directory.

    Only below a directory the listing has: anything else is reported by its own parent."""
    if path:
        parent = parent_of(path)
        if parent and not _is_dir(listing.entries.get(parent, _NOTHING)):
            return False
        key = lstat(path)
        listing.drop(path)
        if key is None:
            return False
        listing.put(path, key)
        if not _is_dir(key):
            return False
    found = walk_below(path, everything)
    if found is None:
        listing.drop(path)
        return False
    listing.replace_below(path, found)
    return True
