"""The one way our background loops wait and stop (sharedsync.tasks)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sharedsync.tasks import cancel_and_wait, finish_first, wait_event


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


async def test_finish_first_holds_the_caller_until_a_thread_ends() -> None:
    """The reason it exists: a cancelled to_thread returns at once, its thread runs on."""
    release, events = threading.Event(), list[str]()

    def work() -> str:
        release.wait(5)
        events.append("work ended")
        return "done"

    async def caller() -> None:
        lock = asyncio.Lock()
        try:
            async with lock:
                await finish_first(asyncio.to_thread(work))
        finally:
            events.append("lock released")

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # cancelled, but the thread still works: the caller waits
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == ["work ended", "lock released"]


async def test_finish_first_passes_results_and_errors_through() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise ValueError("bad")

    assert await finish_first(answer()) == 42
    with pytest.raises(ValueError, match="bad"):
        await finish_first(fail())


async def test_finish_first_survives_repeated_cancels_and_swallows_a_late_error() -> None:
    finished = asyncio.Event()

    async def slow_failure() -> None:
        await asyncio.sleep(0.1)
        finished.set()
        raise ValueError("nobody is left to hear this")

    task = asyncio.create_task(finish_first(slow_failure()))
    for _ in range(3):
        await asyncio.sleep(0.01)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()  # the work ran to its end despite three cancels


async def test_finish_first_passes_on_the_work_s_own_cancellation() -> None:
    async def cancelled_inside() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await finish_first(cancelled_inside())
