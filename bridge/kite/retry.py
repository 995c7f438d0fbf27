"""Reconnect policy: exponential backoff with jitter, a stop on HTTP 403, and a stability reset.

Why our own loop rather than websockets' ``async for connect(...)``: that loop resets its backoff
after every successful handshake (an accept-then-close server drew 673 reconnects a second),
gives up on 429 and treats 403 like any other fatal status (ecosystem-notes §2a). Here:

* the wait before retry ``n`` (``n = 0, 1, …``) is ``min(base_wait * 2**n, max_wait)`` plus a
  random jitter of up to ``jitter`` times that (10 % by default), so a wait never exceeds
  ``max_wait * (1 + jitter)`` (66 s with the defaults) and never undercuts the formula;
* an HTTP 403 on the handshake (expired or invalid token) raises :class:`AuthError` at once:
  retrying cannot fix a token and would only hammer the gateway;
* the attempt counter goes back to 0 when the failing call had been healthy for ``reset_after``
  seconds (by default: had run that long; :class:`~bridge.kite.feed.KiteFeed` counts only the
  time its connection was open, so slow failed handshakes are a streak too), so a feed that
  drops once a day never runs out of retries, while a server that accepts and then closes at
  once still meets a growing backoff;
* after ``max_retries`` retries in a row (so ``max_retries + 1`` failed calls) it raises
  :class:`RetriesExhausted`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, ParamSpec, TypeVar, overload

from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

__all__ = [
    "AUTH_STATUS",
    "AuthError",
    "Backoff",
    "OnRetry",
    "RetriesExhausted",
    "Uptime",
    "auth_error",
    "retry",
    "retry_call",
]

P = ParamSpec("P")
T = TypeVar("T")

#: HTTP status of a rejected handshake that no retry can fix (kite-protocol.md §1.3).
AUTH_STATUS: Final = 403

#: ``uptime(error, elapsed)``: how long a call that failed with ``error`` after ``elapsed``
#: seconds had been healthy, for the stability reset.
Uptime = Callable[[Exception, float], float]

#: ``on_retry(attempt, wait, error)``: ``attempt`` counts from 1 (the first retry), ``wait`` is
#: the sleep about to start, ``error`` the failure that caused it. May be a coroutine function.
OnRetry = Callable[[int, float, Exception], object]


class AuthError(InvalidStatus):
    """The server refused the handshake with HTTP 403: the token is expired or invalid.

    Final by design: a new token is needed, so the caller must log in again. A subclass of
    websockets' :class:`~websockets.exceptions.InvalidStatus` carrying the server's response,
    so code that catches the 403 as websockets reports it (``except InvalidStatus``,
    ``error.response.status_code``) still does.
    """

    def __init__(
        self,
        status: int = AUTH_STATUS,
        message: str | None = None,
        response: Response | None = None,
    ) -> None:
        super().__init__(response or Response(status, "Forbidden", Headers()))
        self.status = status
        self.message = message or f"handshake rejected with HTTP {status}: token expired or invalid"

    def __str__(self) -> str:
        return self.message


class RetriesExhausted(Exception):
    """Every allowed retry failed; ``last_error`` is the final failure (also the ``__cause__``)."""

    def __init__(self, attempts: int, last_error: BaseException) -> None:
        self.attempts = attempts
        self.last_error = last_error
        super().__init__(
            f"gave up after {attempts} failed attempts in a row; "
            f"last error: {type(last_error).__name__}: {last_error}"
        )


def auth_error(exc: BaseException) -> AuthError | None:
    """The :class:`AuthError` an exception stands for, or ``None`` when it is retryable."""
    if isinstance(exc, AuthError):
        return exc
    if isinstance(exc, InvalidStatus) and exc.response.status_code == AUTH_STATUS:
        return AuthError(AUTH_STATUS, response=exc.response)
    return None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with additive jitter; :meth:`delay` is pure apart from ``rand``."""

    base_wait: float = 2.0
    max_wait: float = 60.0
    #: Extra wait as a fraction of the formula's value, drawn uniformly from ``[0, jitter)``.
    jitter: float = 0.1
    #: Source of uniform numbers in ``[0, 1)``; tests pass a constant.
    rand: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base_wait) and self.base_wait >= 0):
            raise ValueError(f"base_wait must be a finite number >= 0, not {self.base_wait!r}")
        if not (math.isfinite(self.max_wait) and self.max_wait >= self.base_wait):
            raise ValueError(f"max_wait must be finite and >= base_wait, not {self.max_wait!r}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be between 0 and 1, not {self.jitter!r}")

    def nominal(self, attempt: int) -> float:
        """``min(base_wait * 2**attempt, max_wait)``, without jitter; any attempt count is fine."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, not {attempt}")
        try:
            raw = self.base_wait * 2.0**attempt
        except OverflowError:  # 2.0**1024 and beyond: past any cap unless there is no wait
            return self.max_wait if self.base_wait else 0.0
        return min(raw, self.max_wait)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry ``attempt`` (0 for the first retry)."""
        wait = self.nominal(attempt)
        return wait + wait * self.jitter * self.rand() if self.jitter else wait


async def retry_call(
    call: Callable[[], Awaitable[T]],
    *,
    max_retries: int = 50,
    backoff: Backoff | None = None,
    reset_after: float = 30.0,
    retryable: Callable[[Exception], bool] | None = None,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    uptime: Uptime | None = None,
) -> T:
    """Await ``call()`` until it returns, retrying failures by the module's policy.

    ``retryable(error)`` returning False re-raises ``error`` unchanged (for errors no wait can
    fix, such as a programming error); by default every :class:`Exception` but a 403 is retried.
    ``uptime`` says how long a failed call had been healthy (default: how long it ran).
    Cancellation is never caught.
    """
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, not {max_retries}")
    policy = backoff if backoff is not None else Backoff()
    attempt = 0
    while True:
        started = clock()
        try:
            return await call()
        except Exception as exc:
            denied = auth_error(exc)
            if denied is not None:
                if denied is exc:
                    raise
                raise denied from exc
            if retryable is not None and not retryable(exc):
                raise
            elapsed = clock() - started
            if (elapsed if uptime is None else uptime(exc, elapsed)) >= reset_after:
                attempt = 0  # the call had been healthy: this is a fresh failure, not a streak
            if attempt >= max_retries:
                raise RetriesExhausted(attempt + 1, exc) from exc
            wait = policy.delay(attempt)
            attempt += 1
            if on_retry is not None:
                outcome = on_retry(attempt, wait, exc)
                if inspect.isawaitable(outcome):
                    await outcome
            await sleep(wait)


@overload
def retry(
    max_retries: Callable[P, Awaitable[T]],
) -> Callable[P, Awaitable[T]]: ...


@overload
def retry(
    max_retries: int = 50,
    base_wait: float = 2,
    max_wait: float = 60,
    *,
    reset_after: float = 30,
    jitter: float = 0.1,
    retryable: Callable[[Exception], bool] | None = None,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]: ...


def retry(
    max_retries: int | Callable[P, Awaitable[T]] = 50,
    base_wait: float = 2,
    max_wait: float = 60,
    *,
    reset_after: float = 30,
    jitter: float = 0.1,
    retryable: Callable[[Exception], bool] | None = None,
    on_retry: OnRetry | None = None,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[P, Awaitable[T]] | Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Decorate an async function or method so failed calls are retried (see the module doc).

    Same signature and defaults as Aio-Trader's ``retry``; the keyword-only arguments add the
    stability reset, jitter, a retry hook, and injectable ``sleep``/``clock`` for tests.
    ``@retry`` without parentheses means the defaults. A plain (non-async) function is refused
    when decorated: its result could only fail when awaited, after it had already run.
    """
    if callable(max_retries):
        return retry()(max_retries)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, not {max_retries!r}")
    policy = Backoff(float(base_wait), float(max_wait), jitter)

    def decorate(func: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(
                f"retry() decorates async functions; {getattr(func, '__qualname__', func)!r} "
                "is not one"
            )

        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await retry_call(
                lambda: func(*args, **kwargs),
                max_retries=max_retries,
                backoff=policy,
                reset_after=reset_after,
                retryable=retryable,
                on_retry=on_retry,
                sleep=sleep,
                clock=clock,
            )

        return wrapper

    return decorate
