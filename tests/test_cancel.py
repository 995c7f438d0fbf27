"""``cancel_and_wait``: tasks that swallow a cancellation still end (bridge/cancel.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter

from redis.asyncio import Redis

from bridge.cancel import cancel_and_wait, checkpoint
from bridge.redis_client import create_redis


async def test_a_task_that_swallows_cancellations_is_cancelled_again() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed == 3:
                    raise
                swallowed += 1  # what wait_for does on 3.11 when the inner result is ready

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task, None], interval=0.01) == set()
    assert task.cancelled()
    assert swallowed == 3


async def test_a_task_that_never_ends_is_returned_after_the_timeout() -> None:
    alive = True

    async def immortal() -> None:
        while alive:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await cancel_and_wait([task], timeout=0.2, interval=0.02) == {task}
    assert loop.time() - started < 1.0
    alive = False  # the test's own clean-up: the next cancel ends it
    assert await cancel_and_wait([task]) == set()


async def test_exceptions_of_ended_tasks_are_retrieved_not_raised() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task]) == set()
    assert isinstance(task.exception(), RuntimeError)


async def test_checkpoint_raises_a_cancellation_that_was_swallowed() -> None:
    """The window of gh-86296 can recur at every attempt (a loop phase-locked with the
    canceller); modelled here by a step that always swallows. Only the checkpoint ends it."""
    swallow = True
    swallowed: Counter[str] = Counter()

    async def step() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if not swallow:
                raise
            # ... and return normally, as wait_for does with a ready result.
            swallowed[asyncio.current_task().get_name()] += 1  # type: ignore[union-attr]

    async def loop(with_checkpoint: bool) -> None:
        while True:
            if with_checkpoint:
                checkpoint()
            await step()

    naive = asyncio.create_task(loop(with_checkpoint=False), name="naive")
    guarded = asyncio.create_task(loop(with_checkpoint=True), name="guarded")
    await asyncio.sleep(0)
    try:
        assert await cancel_and_wait([naive], timeout=0.2, interval=0.02) == {naive}
        assert swallowed["naive"] >= 5  # the naive loop ran on through every re-cancel
        assert await cancel_and_wait([guarded], timeout=0.2, interval=0.02) == set()
        assert guarded.cancelled()
        assert swallowed["guarded"] == 1  # the first cancel was swallowed; no round followed
    finally:
        swallow = False  # the test's own clean-up
        assert await cancel_and_wait([naive, guarded]) == set()


async def test_checkpoint_ignores_a_timeout_that_withdrew_its_cancel() -> None:
    checkpoint()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(0.01):  # cancels us, then withdraws it: not a stop request
            await asyncio.sleep(1)
    checkpoint()  # must not raise


async def test_loops_over_redis_commands_always_end(redis_url: str) -> None:
    """The reason for the helpers: redis-py's writes go through ``wait_for``, which on 3.11 can
    drop a cancellation. A single ``cancel()`` leaves some of these loops running (about one in
    five here), re-cancelling alone some under CPU load (12 of 40 with three runs side by
    side); with the checkpoint none may be left."""
    client: Redis = create_redis(redis_url)
    rng = random.Random(7)
    running = True  # lets a loop the helper failed to stop end anyway, so the test fails cleanly

    async def loop() -> None:
        while running:
            checkpoint()  # as the bridge's loops do
            await client.exists("cancel-test")

    stuck = 0
    try:
        for _ in range(40):
            task = asyncio.create_task(loop())
            await asyncio.sleep(rng.random() * 0.003)
            stuck += len(await cancel_and_wait([task], timeout=1.0))
    finally:
        running = False
        await asyncio.sleep(0.1)
        await client.aclose()
    assert stuck == 0
