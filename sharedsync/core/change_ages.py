"""How long a peer has left this replica's changes unmerged (file-level replication).

A file-level replica records its changes in a log numbered by sequence; its peers pull from
it and say, with every pull, the sequence they merged up to. The age of the oldest change a
peer has not merged yet is that peer's lag behind this replica: what ``onLagExceeded:
Throttle`` holds writers back on, and half of what a replica's status reports as its lag (the
other half is how far this replica is behind the peer's own changes).

:class:`ChangeAges` keeps, for every scan that recorded changes, the newest sequence it
recorded and when. It forgets what every peer merged, and past ``limit`` entries it merges the
two oldest into one that keeps the older time: ages can then only be overstated, never
understated, so a lagging peer is never reported in sync nor a writer released early.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .errors import InvalidArgument

DEFAULT_LIMIT = 4096


class ChangeAges:
    """(sequence, time recorded) of the scans that recorded changes, oldest first."""

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 2:
            raise InvalidArgument(f"limit must be at least 2, got {limit}")
        self.limit = limit
        self._entries: deque[tuple[int, float]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, seq: int, at: float) -> None:
        """Changes up to ``seq`` were recorded by time ``at`` (sequences only grow)."""
        if self._entries and seq <= self._entries[-1][0]:
            return  # nothing new (a log that starts over is forgotten with clear())
        self._entries.append((seq, at))
        if len(self._entries) > self.limit:
            _, older = self._entries.popleft()
            newer, _ = self._entries.popleft()
            self._entries.appendleft((newer, older))

    def age(self, merged: int, now: float) -> float:
        """Seconds the oldest change after sequence ``merged`` has waited (0: none waits)."""
        for seq, at in self._entries:
            if seq > merged:
                return max(0.0, now - at)
        return 0.0

    def forget_merged(self, merged_by: Iterable[int]) -> None:
        """Drop what every peer merged (``merged_by``: each peer's merged sequence; a peer
        not heard from yet counts as 0)."""
        floor = min(merged_by, default=0)
        while self._entries and self._entries[0][0] <= floor:
            self._entries.popleft()

    def clear(self) -> None:
        self._entries.clear()
