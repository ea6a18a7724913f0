"""The one way our background loops wait and stop (sharedsync.tasks)."""

from __future__ import annotations

import asyncio

from sharedsync.tasks import cancel_and_wait, wait_event


async def _waiting_loop(wake: asyncio.Event, rounds: list[bool]) -> None:
    """The shape of every background loop of ours: wait for a wake-up or a tick, work, repeat."""
    while True:
        rounds.append(await wait_event(wake, 5.0))
        wake.clear()
        await asyncio.sleep(0)


async def test_a_cancel_that_meets_a_wake_up_still_stops_the_loop() -> None:
    """The wake-up and the cancel land in the same loop iteration: Python 3.11's wait_for
    returned the wake-up and dropped the cancel, and ``cancel_and_wait`` then waited forever."""
    for _ in range(50):
        wake, rounds = asyncio.Event(), list[bool]()
        loop = asyncio.create_task(_waiting_loop(wake, rounds))
        await asyncio.sleep(0.001)  # the loop waits
        wake.set()
        async with asyncio.timeout(5):
            await cancel_and_wait(loop)
        assert loop.cancelled()
        assert rounds == []  # the wake-up did not run another round after the cancel


async def test_wait_event_tells_a_wake_up_from_a_timeout() -> None:
    wake = asyncio.Event()
    assert await wait_event(wake, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, wake.set)
    assert await wait_event(wake, 5.0) is True


async def test_a_loop_stops_while_it_waits() -> None:
    rounds: list[bool] = []
    loop = asyncio.create_task(_waiting_loop(asyncio.Event(), rounds))
    await asyncio.sleep(0.01)
    await cancel_and_wait(loop)
    assert loop.done()
    assert rounds == []


async def test_cancel_and_wait_accepts_no_task_and_a_finished_one() -> None:
    await cancel_and_wait(None)
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await cancel_and_wait(done)
    assert done.done()
    assert not done.cancelled()
