"""Reconnect policy behaviour the mutation audit found unpinned: defaults and boundaries."""

from __future__ import annotations

import pytest
from test_retry import FakeTime, Flaky

from bridge.kite.retry import Backoff, RetriesExhausted, retry, retry_call


def test_backoff_defaults_are_2s_doubling_to_60s_plus_up_to_10_percent() -> None:
    """KiteFeed builds ``Backoff(base_wait, max_wait)``: the default jitter is production's."""
    assert Backoff(rand=lambda: 0.0).delay(0) == 2
    assert Backoff(rand=lambda: 0.5).delay(0) == pytest.approx(2.1)
    assert Backoff(rand=lambda: 0.5).delay(10) == pytest.approx(63.0)
    assert Backoff(rand=lambda: 0.0).delay(10) == 60


def test_jitter_of_one_is_allowed() -> None:
    assert Backoff(2, 60, jitter=1, rand=lambda: 0.5).delay(0) == 3
    assert Backoff(2, 60, jitter=0).delay(0) == 2


async def test_retry_call_rejects_negative_max_retries() -> None:
    time = FakeTime()
    with pytest.raises(ValueError, match="max_retries"):
        await retry_call(Flaky(time, []), max_retries=-1, sleep=time.sleep, clock=time.clock)


async def test_retry_call_default_is_50_retries() -> None:
    time = FakeTime()
    call = Flaky(time, [OSError()] * 60)
    with pytest.raises(RetriesExhausted) as caught:
        await retry_call(call, sleep=time.sleep, clock=time.clock)
    assert call.calls == 51
    assert caught.value.attempts == 51
    assert "gave up after 51 failed attempts in a row; last error: OSError" in str(caught.value)


async def test_retry_call_default_reset_after_is_30s_inclusive() -> None:
    time = FakeTime()
    # Every failure comes after exactly 30 s of health: each is a fresh one, never a streak.
    # No jitter, so the fake clock stays exact (1000 + 2 + 30 ...) and "exactly" means it.
    call = Flaky(time, [OSError()] * 5, durations=[30.0] * 5)
    assert (
        await retry_call(
            call, max_retries=1, backoff=Backoff(jitter=0), sleep=time.sleep, clock=time.clock
        )
        == "ok"
    )
    time = FakeTime()
    call = Flaky(time, [OSError()] * 5, durations=[29.9] * 5)
    with pytest.raises(RetriesExhausted):
        await retry_call(
            call, max_retries=1, backoff=Backoff(jitter=0), sleep=time.sleep, clock=time.clock
        )


async def test_decorator_with_zero_retries_calls_once() -> None:
    time = FakeTime()
    calls = 0

    @retry(0, sleep=time.sleep, clock=time.clock)
    async def connect() -> None:
        nonlocal calls
        calls += 1
        raise OSError("down")

    with pytest.raises(RetriesExhausted):
        await connect()
    assert calls == 1
    assert time.sleeps == []


async def test_decorator_passes_reset_after_on_retry_and_default_jitter() -> None:
    time = FakeTime()
    seen: list[tuple[int, float]] = []

    def hook(attempt: int, wait: float, exc: Exception) -> None:
        seen.append((attempt, wait))

    # Failures after 5 s of health each: with reset_after=4 none is a streak (not exactly 5:
    # the jittered fake clock is a float, and 1002.13 + 5 - 1002.13 may come out under 5).
    call = Flaky(time, [OSError()] * 4, durations=[5.0] * 4)

    @retry(1, 2, 60, reset_after=4, on_retry=hook, sleep=time.sleep, clock=time.clock)
    async def connect() -> str:
        return await call()

    assert await connect() == "ok"
    assert [attempt for attempt, _ in seen] == [1, 1, 1, 1]
    # The default jitter (0.1) applies: every wait is in [2, 2.2).
    assert all(2 <= wait < 2.2 for _, wait in seen)
    assert any(wait > 2 for _, wait in seen)


@pytest.mark.parametrize(("health", "recovers"), [(30.0, True), (29.5, False)])
async def test_decorator_default_reset_after_is_30s(health: float, recovers: bool) -> None:
    time = FakeTime()
    call = Flaky(time, [OSError()] * 3, durations=[health] * 3)

    @retry(1, jitter=0, sleep=time.sleep, clock=time.clock)  # exact fake clock (see above)
    async def connect() -> str:
        return await call()

    if recovers:
        assert await connect() == "ok"
    else:
        with pytest.raises(RetriesExhausted):
            await connect()
