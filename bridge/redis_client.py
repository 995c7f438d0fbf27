"""The one place a Redis client is built, so every part of the bridge shares the same policy.

Two layers of retrying, on purpose:

* redis-py's own ``Retry`` absorbs *blips* (a reset connection, a failover, a restart that takes
  under a second): a few quick attempts, capped well under a second. ``Redis.from_url`` gets no
  retries at all unless given ``retry=`` (ecosystem-notes §2b), hence the explicit object here.
* Our own loops (publisher, control consumer, status writer, start-up) handle *outages* of
  minutes: they back off up to ``max_wait``, log once per outage and recover by themselves. They
  share one :class:`Recovery`: the first loop to reach Redis again (the status writer tries every
  half second) wakes the others, so ticks and commands do not sit out the rest of a backoff.

Keeping the inner layer short matters: it runs inside every call, so long inner retries would
stall shutdown and hide outages from the outer loops that count and report them.

Blocking commands must stay under ``socket_timeout`` (the control consumer blocks for 1 s
against a 5 s socket timeout), otherwise redis-py raises ``TimeoutError`` and retries them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ResponseError

from bridge.kite.retry import Backoff

__all__ = [
    "ACL_COMMANDS",
    "ACL_OPTIONAL_COMMANDS",
    "INNER_RETRIES",
    "OUTAGE_REMINDER_INTERVAL",
    "SOCKET_TIMEOUT",
    "InfoRefused",
    "Outage",
    "Recovery",
    "acl_rules",
    "create_redis",
    "info_field",
]

#: Attempts redis-py makes on top of the first before a call fails to our own loops.
INNER_RETRIES: Final = 3
#: Seconds a command (blocking ones included) may wait for its reply.
SOCKET_TIMEOUT: Final = 5.0


#: What the bridge sends to Redis (``bridge run``, ``bridge health``, ``check-config --connect``):
#: a least-privilege ACL grants these on the namespace's keys and channels
#: (:func:`acl_rules`, docs/operators.md). AUTH and HELLO are always allowed.
ACL_COMMANDS: Final = (
    # connection set-up (SELECT for a database other than 0) and the unreplied transport
    "ping", "select", "client|setname", "client|reply",
    # ticks, events, the lease's and the Lua transport's scripts
    "publish", "evalsha", "script|load",
    # status, subscriptions, lease
    "hset", "hgetall", "hlen", "del", "exists", "get", "set", "pexpire",
    # the control list, replies, dead letters
    "blmove", "lmove", "llen", "lrem", "ltrim", "rpush", "expire",
    "multi", "exec", "discard", "watch", "unwatch",
)  # fmt: skip
#: Read-only checks the bridge does without when refused (persistence, eviction, restarts,
#: replicas): grant them too, or it warns that it cannot tell.
ACL_OPTIONAL_COMMANDS: Final = ("info", "config|get", "role")


def acl_rules(namespace: str, *, optional: bool = True) -> list[str]:
    """The ``ACL SETUSER <user> on ><password> ...`` rules of a least-privilege bridge user."""
    commands = ACL_COMMANDS + (ACL_OPTIONAL_COMMANDS if optional else ())
    return [
        "resetkeys",
        f"~{namespace}:*",
        "resetchannels",
        f"&{namespace}:*",
        "-@all",
        *(f"+{command}" for command in commands),
    ]


def create_redis(
    url: str,
    *,
    client_name: str | None = None,
    socket_timeout: float = SOCKET_TIMEOUT,
    connect_timeout: float = 5.0,
    retries: int = INNER_RETRIES,
    health_check_interval: int = 30,
) -> Redis:
    """Build an asyncio client for ``url``; replies come back as ``bytes``.

    The client connects lazily: building it never fails because Redis is down.
    """
    return Redis.from_url(
        url,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.05), retries),
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        health_check_interval=health_check_interval,
        client_name=client_name,
        # No CLIENT SETINFO: it only labels the connection, and a least-privilege ACL on Redis
        # 7.2+ would log a refusal for every connection (7.0 has no such subcommand to grant).
        driver_info=None,
    )


class InfoRefused(Exception):
    """``INFO`` is refused here (renamed or denied by an ACL, a proxy, fakeredis): what it would
    tell (a restart, evictions, persistence) cannot be known."""


async def info_field(redis: Redis, section: str, field: str) -> str | None:
    """One field of ``INFO <section>`` as text (``None`` if the server has no such field).

    Raises :class:`InfoRefused` when the server refuses ``INFO``; connection errors propagate.
    """
    try:
        value = (await redis.info(section)).get(field)
    except ResponseError as exc:
        raise InfoRefused(str(exc)) from exc
    return None if value is None else str(value)


#: Seconds between the reminders an outage logs while it lasts.
OUTAGE_REMINDER_INTERVAL: Final = 60.0


class Recovery:
    """Wakes every loop backing off from an outage as soon as one of them reaches Redis again.

    Each loop backs off on its own schedule; after a long outage the publisher and the control
    consumer wait up to ``max_wait`` between attempts, so without this the ticks and commands of
    a restarted Redis resumed up to 5 s after the status writer had already written to it
    (measured: 4.4 s after a 20 s outage).
    """

    def __init__(self) -> None:
        self._answered = asyncio.Event()

    def announce(self) -> None:
        """Redis answered a loop that had been failing: wake every loop waiting now."""
        self._answered.set()
        self._answered = asyncio.Event()

    async def wait(self, delay: float, stop: asyncio.Event | None = None) -> None:
        """Sleep up to ``delay``: less when Redis is announced back, or ``stop`` is set."""
        waiters = {asyncio.ensure_future(self._answered.wait())}
        if stop is not None:
            waiters.add(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


class Outage:
    """The outer retry layer of one loop: growing waits, and few log lines per outage.

    A loop calls :meth:`failed` on every Redis error (it returns how long to wait before the
    next attempt) and :meth:`recovered` after every success. The first failure of an outage logs
    a warning, then one reminder a minute (``redis_still_unavailable``: a wrong password or a
    missing ACL permission never heals by itself, and one line an hour ago is easy to miss), and
    the first success after it logs the recovery: not one line per tick or per command.
    """

    def __init__(
        self,
        what: str,
        logger: Any,
        *,
        base_wait: float = 0.1,
        max_wait: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        recovery: Recovery | None = None,
    ) -> None:
        self.what = what
        #: Shared by the loops of one bridge; a private one wakes nobody else.
        self.recovery = Recovery() if recovery is None else recovery
        self.failures = 0
        #: ``time.time()`` of the outage's first failure, and its latest error; ``None`` when
        #: there is no outage.
        self.since_at: float | None = None
        self.last_error: str | None = None
        self._log = logger
        self._backoff = Backoff(base_wait, max_wait, jitter=0)
        self._clock = clock
        self._wall_clock = wall_clock
        self._since = 0.0
        self._reminded = 0.0

    @property
    def active(self) -> bool:
        return self.failures > 0

    def failing_for(self) -> float | None:
        """Seconds since the outage's first failure; ``None`` when there is no outage."""
        return self._clock() - self._since if self.failures else None

    def failed(self, error: BaseException) -> float:
        """Count a failure; return the wait before the next attempt (jittered exponential)."""
        now = self._clock()
        self.last_error = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if self.failures == 0:
            self._since = self._reminded = now
            self.since_at = self._wall_clock()
            self._log.warning("redis_unavailable", what=self.what, error=self.last_error)
        elif now - self._reminded >= OUTAGE_REMINDER_INTERVAL:
            self._reminded = now
            self._log.warning(
                "redis_still_unavailable",
                what=self.what,
                error=self.last_error,
                failures=self.failures,
                outage_seconds=round(now - self._since, 3),
            )
        self.failures += 1
        ceiling = self._backoff.nominal(self.failures - 1)
        # Equal jitter: never below half the ceiling, so a dead server is not hammered.
        return ceiling / 2 + random.random() * ceiling / 2

    async def pause(self, delay: float, stop: asyncio.Event | None = None) -> None:
        """Wait out ``delay`` (from :meth:`failed`), cut short when another loop of the same
        :class:`Recovery` reaches Redis again or ``stop`` is set."""
        await self.recovery.wait(delay, stop)

    def recovered(self) -> None:
        if self.failures:
            self.recovery.announce()
            self._log.info(
                "redis_recovered",
                what=self.what,
                failures=self.failures,
                outage_seconds=round(self._clock() - self._since, 3),
            )
            self.failures = 0
            self.since_at = self.last_error = None
