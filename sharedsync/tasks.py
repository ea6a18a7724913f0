"""Background asyncio tasks: the one way to stop one, and the one way for a loop to wait.

On Python 3.11, ``asyncio.wait_for`` loses a cancellation that arrives in the same loop
iteration as the awaited thing completes (it returns the result instead of raising). A
background loop that waits with it on an :class:`asyncio.Event` can then outlive the
``cancel_and_wait`` that was meant to stop it, and that caller waits forever: a replica that
was told to follow a new primary stayed half-stopped this way. ``asyncio.timeout`` counts
cancellations and never loses one, so every wait of ours goes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended: a stopped loop must not run on,
    half-way through a write, after its owner says it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set (True) or ``seconds`` passed (False).

    A cancellation of the waiting task always propagates, even when the event is set in the
    same loop iteration (see the module docstring).
    """
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def finish_first(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the caller is cancelled meanwhile; then the
    cancellation goes on.

    A cancelled ``await asyncio.to_thread(...)`` returns at once while its thread runs on. A
    lock held around it would then be released with the work half done, and a retry (kubelet's,
    after its deadline) would mount beside a mount still under way. Awaited through this, the
    caller (and whatever it holds) stays until the work has ended.
    """
    task = asyncio.ensure_future(work)
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait({task})  # never cancels ``task`` itself
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        if not task.cancelled():
            task.exception()  # the caller is gone: its error has no one to reach
        raise asyncio.CancelledError
    return task.result()
