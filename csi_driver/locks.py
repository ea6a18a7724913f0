"""Per-object try-locks: a second operation on a busy volume gets ABORTED, not a queue.

The CSI spec asks a plugin to answer ABORTED when an operation is already pending for a volume;
the CO then retries with backoff. Queueing instead would let retries pile up behind a slow
mount and time out together.
"""

import contextlib
from collections.abc import AsyncIterator, Iterable

from sharedsync.core.errors import Aborted


class KeyedTryLock:
    """A set of held keys; holding one that is taken raises :class:`Aborted`."""

    def __init__(self) -> None:
        self._held: set[str] = set()

    @contextlib.asynccontextmanager
    async def hold(self, *keys: str) -> AsyncIterator[None]:
        """Hold every key in ``keys`` for the block, or none of them."""
        wanted = sorted(set(keys))
        busy = [k for k in wanted if k in self._held]
        if busy:
            raise Aborted(f"an operation on {busy[0]} is already in progress")
        self._held.update(wanted)
        try:
            yield
        finally:
            self._held.difference_update(wanted)

    def held(self) -> Iterable[str]:
        return frozenset(self._held)
