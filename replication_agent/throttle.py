"""``onLagExceeded: Throttle``: hold a writer back while a replica lags beyond maxLag.

Both replication engines (snapshot streams in :mod:`.volume`, file by file in
:mod:`.multiwriter`) throttle the same way and differ only in how they measure a replica's lag,
which they pass in as ``lagging``.
"""

import asyncio
import time
from collections.abc import Callable

from . import metrics

#: How often a held writer looks again.
POLL_SECONDS = 0.05


async def hold_writer(volume_id: str, lagging: Callable[[], bool], limit: float) -> None:
    """Return once ``lagging()`` is false, or after ``limit`` seconds (a writer is slowed to
    the pace replication keeps, never failed); a writer held at all is counted once in
    ``sharedsync_writer_throttled_total``."""
    started = time.monotonic()
    throttled = False
    while time.monotonic() - started < limit:
        if not lagging():
            return
        if not throttled:
            throttled = True
            metrics.THROTTLED.labels(volume_id).inc()
        await asyncio.sleep(POLL_SECONDS)
