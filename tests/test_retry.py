"""The reconnect policy, on a fake clock: never wall time."""

from __future__ import annotations

import asyncio
import inspect
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from bridge.kite.retry import AuthError, Backoff, RetriesExhausted, auth_error, retry, retry_call


class FakeTime:
    """A clock that only moves when the code under test sleeps (or a test advances it)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def status(code: int) -> InvalidStatus:
    return InvalidStatus(Response(code, "x", Headers(), b""))


class Flaky:
    """Fails with the queued errors (optionally after running a while), then returns "ok"."""

    def __init__(
        self, time: FakeTime, errors: list[Exception], durations: list[float] | None = None
    ):
        self.time = time
        self.errors = list(errors)
        self.durations = list(durations or [])
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.durations:
            self.time.now += self.durations.pop(0)
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


# --------------------------------------------------------------------------------------------
# Backoff


def test_nominal_waits_double_then_cap() -> None:
    backoff = Backoff(base_wait=2, max_wait=60, jitter=0)
    assert [backoff.delay(n) for n in range(8)] == [2, 4, 8, 16, 32, 60, 60, 60]


def test_jitter_adds_up_to_the_fraction() -> None:
    assert Backoff(2, 60, jitter=0.1, rand=lambda: 0.0).delay(3) == 16
    assert Backoff(2, 60, jitter=0.1, rand=lambda: 0.5).delay(3) == pytest.approx(16.8)
    assert Backoff(2, 60, jitter=0.1, rand=lambda: 0.5).delay(9) == pytest.approx(63.0)


@pytest.mark.parametrize("attempt", [63, 64, 1023, 1024, 1025, 10**6, 10**30])
def test_huge_attempt_counts_do_not_overflow(attempt: int) -> None:
    assert Backoff(2, 60, jitter=0).delay(attempt) == 60
    assert Backoff(0.001, 5, jitter=0.1, rand=lambda: 0.99).delay(attempt) <= 5.5


@given(
    attempt=st.integers(min_value=0, max_value=5000),
    base=st.floats(min_value=0, max_value=100),
    extra=st.floats(min_value=0, max_value=1000),
    jitter=st.floats(min_value=0, max_value=1),
    u=st.floats(min_value=0, max_value=1, exclude_max=True),
)
@example(attempt=0, base=3.0, extra=0.0, jitter=0.4542552186250447, u=0.9999999999999999)
def test_delay_bounds(attempt: int, base: float, extra: float, jitter: float, u: float) -> None:
    backoff = Backoff(base, base + extra, jitter, rand=lambda: u)
    nominal = float(min(Fraction(base) * 2**attempt, Fraction(base + extra)))
    delay = backoff.delay(attempt)
    # Bounds written the way the delay is computed (wait + wait * jitter * u, u < 1), so float
    # rounding cannot put a correct delay one ulp above them.
    assert nominal <= delay <= nominal + nominal * jitter
    assert delay <= (base + extra) + (base + extra) * jitter


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_wait": -1},
        {"base_wait": float("inf"), "max_wait": float("inf")},
        {"base_wait": 5, "max_wait": 1},
        {"jitter": -0.1},
        {"jitter": 1.5},
    ],
)
def test_backoff_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - several messages, one type
        Backoff(**kwargs)


def test_negative_attempt_is_an_error() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().delay(-1)


# --------------------------------------------------------------------------------------------
# retry_call / retry


async def test_waits_follow_the_formula_until_success() -> None:
    time = FakeTime()
    call = Flaky(time, [OSError("refused")] * 7)
    result = await retry_call(
        call, backoff=Backoff(2, 60, jitter=0), sleep=time.sleep, clock=time.clock
    )
    assert result == "ok"
    assert call.calls == 8
    assert time.sleeps == [2, 4, 8, 16, 32, 60, 60]


@pytest.mark.parametrize("code", [400, 429, 500, 502, 503])
async def test_other_statuses_are_retried(code: int) -> None:
    time = FakeTime()
    call = Flaky(time, [status(code), TimeoutError(), ConnectionResetError()])
    assert await retry_call(call, sleep=time.sleep, clock=time.clock) == "ok"
    assert call.calls == 4


async def test_403_is_final() -> None:
    time = FakeTime()
    rejected = status(403)
    call = Flaky(time, [rejected])
    with pytest.raises(AuthError) as caught:
        await retry_call(call, sleep=time.sleep, clock=time.clock)
    assert caught.value.status == 403
    assert caught.value.__cause__ is rejected
    assert call.calls == 1
    assert time.sleeps == []


async def test_auth_error_is_reraised_as_is() -> None:
    time = FakeTime()
    error = AuthError()
    call = Flaky(time, [OSError(), error])
    with pytest.raises(AuthError) as caught:
        await retry_call(call, sleep=time.sleep, clock=time.clock)
    assert caught.value is error
    assert call.calls == 2


def test_auth_error_classification() -> None:
    assert auth_error(status(403)) is not None
    assert auth_error(status(401)) is None
    assert auth_error(OSError()) is None
    error = AuthError()
    assert auth_error(error) is error


async def test_exhaustion_raises_with_attempts_and_last_error() -> None:
    time = FakeTime()
    errors: list[Exception] = [OSError(str(n)) for n in range(10)]
    call = Flaky(time, errors)
    with pytest.raises(RetriesExhausted) as caught:
        await retry_call(
            call, max_retries=3, backoff=Backoff(1, 60, 0), sleep=time.sleep, clock=time.clock
        )
    assert call.calls == 4  # the first try and three retries
    assert time.sleeps == [1, 2, 4]
    assert caught.value.attempts == 4
    assert str(caught.value.last_error) == "3"
    assert caught.value.__cause__ is caught.value.last_error


async def test_zero_retries_means_one_call() -> None:
    time = FakeTime()
    call = Flaky(time, [OSError()])
    with pytest.raises(RetriesExhausted):
        await retry_call(call, max_retries=0, sleep=time.sleep, clock=time.clock)
    assert call.calls == 1
    assert time.sleeps == []


async def test_long_healthy_call_resets_the_counter() -> None:
    time = FakeTime()
    # three quick failures, one after 30 s of health, one quick failure, then success
    call = Flaky(time, [OSError()] * 5, durations=[0, 0, 0, 30, 0])
    await retry_call(
        call, backoff=Backoff(2, 60, 0), reset_after=30, sleep=time.sleep, clock=time.clock
    )
    assert time.sleeps == [2, 4, 8, 2, 4]


async def test_short_lived_calls_never_reset() -> None:
    """An accept-then-close server: every call "succeeds" briefly, then fails."""
    time = FakeTime()
    call = Flaky(time, [OSError()] * 20, durations=[29.9] * 20)
    with pytest.raises(RetriesExhausted):
        await retry_call(
            call,
            max_retries=5,
            backoff=Backoff(2, 60, 0),
            reset_after=30,
            sleep=time.sleep,
            clock=time.clock,
        )
    assert time.sleeps == [2, 4, 8, 16, 32]


async def test_uptime_decides_what_counts_as_healthy() -> None:
    """Calls that hang 40 s each but were never healthy (a black-holed handshake) are a streak."""
    time = FakeTime()
    call = Flaky(time, [TimeoutError()] * 20, durations=[40.0] * 20)
    seen: list[tuple[type[Exception], float]] = []

    def never_connected(exc: Exception, elapsed: float) -> float:
        seen.append((type(exc), elapsed))
        return 0.0

    with pytest.raises(RetriesExhausted):
        await retry_call(
            call,
            max_retries=3,
            backoff=Backoff(2, 60, 0),
            reset_after=30,
            sleep=time.sleep,
            clock=time.clock,
            uptime=never_connected,
        )
    assert time.sleeps == [2, 4, 8]
    assert seen == [(TimeoutError, 40.0)] * 4
    # The same calls without ``uptime``: each ran past reset_after, so none is a streak.
    time = FakeTime()
    call = Flaky(time, [TimeoutError()] * 20, durations=[40.0] * 20)
    assert await retry_call(call, max_retries=3, sleep=time.sleep, clock=time.clock) == "ok"


async def test_many_spread_out_drops_never_exhaust() -> None:
    time = FakeTime()
    call = Flaky(time, [OSError()] * 200, durations=[3600.0] * 200)
    assert await retry_call(call, max_retries=3, sleep=time.sleep, clock=time.clock) == "ok"
    assert call.calls == 201


async def test_unretryable_errors_propagate_unchanged() -> None:
    time = FakeTime()
    bug = TypeError("bug")
    call = Flaky(time, [OSError(), bug])
    with pytest.raises(TypeError) as caught:
        await retry_call(
            call,
            retryable=lambda exc: isinstance(exc, OSError),
            sleep=time.sleep,
            clock=time.clock,
        )
    assert caught.value is bug
    assert call.calls == 2


async def test_on_retry_hook_sync_and_async() -> None:
    time = FakeTime()
    seen: list[tuple[int, float, str]] = []
    errors: list[Exception] = [OSError("a"), TimeoutError("b"), OSError("c")]

    def sync_hook(attempt: int, wait: float, exc: Exception) -> None:
        seen.append((attempt, wait, str(exc)))

    await retry_call(
        Flaky(time, errors[:2]),
        backoff=Backoff(1, 60, 0),
        on_retry=sync_hook,
        sleep=time.sleep,
        clock=time.clock,
    )

    async def async_hook(attempt: int, wait: float, exc: Exception) -> None:
        await asyncio.sleep(0)
        seen.append((attempt, wait, str(exc)))

    await retry_call(
        Flaky(time, errors[2:]),
        backoff=Backoff(1, 60, 0),
        on_retry=async_hook,
        sleep=time.sleep,
        clock=time.clock,
    )
    assert seen == [(1, 1, "a"), (2, 2, "b"), (1, 1, "c")]


async def test_cancellation_is_not_retried() -> None:
    time = FakeTime()
    calls = 0

    async def cancelled() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retry_call(cancelled, sleep=time.sleep, clock=time.clock)
    assert calls == 1


async def test_decorator_on_a_method() -> None:
    time = FakeTime()

    class Client:
        def __init__(self) -> None:
            self.calls = 0

        @retry(5, 2, 60, jitter=0, sleep=time.sleep, clock=time.clock)
        async def fetch(self, value: int, *, twice: bool = False) -> int:
            """Fetch it."""
            self.calls += 1
            if self.calls < 3:
                raise OSError("not yet")
            return value * 2 if twice else value

    client = Client()
    assert await client.fetch(21, twice=True) == 42
    assert client.calls == 3
    assert time.sleeps == [2, 4]
    assert Client.fetch.__name__ == "fetch"
    assert Client.fetch.__doc__ == "Fetch it."


async def test_decorator_stops_on_403() -> None:
    time = FakeTime()
    calls = 0

    @retry(sleep=time.sleep, clock=time.clock)
    async def connect() -> None:
        nonlocal calls
        calls += 1
        raise status(403)

    with pytest.raises(InvalidStatus) as caught:  # caught as websockets reports a 403, too
        await connect()
    assert isinstance(caught.value, AuthError)
    assert caught.value.response.status_code == 403
    assert calls == 1


def test_auth_error_keeps_the_servers_response() -> None:
    response = Response(403, "Forbidden", Headers([("X-Reason", "expired")]), b"token expired")
    error = auth_error(InvalidStatus(response))
    assert error is not None
    assert error.response is response
    assert error.status == 403
    assert str(error) == "handshake rejected with HTTP 403: token expired or invalid"
    assert AuthError().response.status_code == 403  # one made without a response has one too


async def test_bare_decorator_wraps_with_the_defaults() -> None:
    calls = 0

    @retry
    async def connect(ok: bool) -> str:
        """Connect."""
        nonlocal calls
        calls += 1
        if not ok:
            raise status(403)
        return "ok"

    assert await connect(True) == "ok"
    with pytest.raises(AuthError):  # the 403 became AuthError: retry_call's policy applied
        await connect(False)
    assert calls == 2
    assert (connect.__name__, connect.__doc__) == ("connect", "Connect.")


def test_plain_functions_are_refused_when_decorated() -> None:
    def not_async() -> int:
        return 1

    with pytest.raises(TypeError, match=r"async functions; .*not_async"):
        retry()(not_async)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async functions"):
        retry(not_async)  # type: ignore[arg-type]


def test_decorator_defaults_match_aio_trader() -> None:
    params = inspect.signature(retry).parameters
    assert (params["max_retries"].default, params["base_wait"].default) == (50, 2)
    assert params["max_wait"].default == 60
    with pytest.raises(ValueError, match="max_retries"):
        retry(-1)
    with pytest.raises(ValueError, match="max_retries"):
        retry(True)
