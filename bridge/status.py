"""The ``<ns>:status`` hash: what the bridge is doing, readable with one ``HGETALL``.

Refreshed every 0.5 s and at once on a state change, so ``updated_at`` doubles as a heartbeat
for ``bridge health`` and for operators. Times are ISO-8601 in UTC with an explicit offset.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal, TypeAlias, get_args

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from bridge import __version__
from bridge.cancel import checkpoint
from bridge.redis_client import Outage, Recovery

__all__ = [
    "LIVE_STATES",
    "STATES",
    "State",
    "StatusCounters",
    "StatusReporter",
    "iso",
]

_log = structlog.get_logger(__name__)

State: TypeAlias = Literal[
    "starting", "connecting", "connected", "reconnecting", "auth_failed", "stopping", "stopped"
]
STATES: Final[tuple[State, ...]] = get_args(State)
#: States in which a running bridge is healthy (it is working towards or holding a feed).
LIVE_STATES: Final[frozenset[State]] = frozenset(
    {"starting", "connecting", "connected", "reconnecting"}
)


def iso(moment: datetime | None) -> str:
    """ISO-8601 with offset; ``""`` for "never" (a hash cannot hold null)."""
    return "" if moment is None else moment.isoformat()


@dataclass
class StatusCounters:
    """The feed-side numbers the status shows, gathered fresh for every write."""

    last_frame_at: datetime | None = None
    last_tick_at: datetime | None = None
    ticks_total: int = 0
    frames_total: int = 0
    reconnects_total: int = 0
    subscriptions: int = 0
    #: Since when every publish has failed (``None`` while publishing works): an addition to
    #: CONTRACT §2, so ``bridge health`` sees ticks that stopped reaching Redis.
    publish_failing_since: datetime | None = None
    #: Since when Redis has refused the control consumer's work (``None`` while it works), for
    #: the same reason: commands left unanswered while everything else looks fine.
    control_failing_since: datetime | None = None


class StatusReporter:
    """Keeps ``<ns>:status`` current; Redis errors are logged once per outage, never raised."""

    def __init__(
        self,
        redis: Redis,
        namespace: str,
        counters: Callable[[], StatusCounters] = StatusCounters,
        *,
        interval: float = 0.5,
        version: str = __version__,
        pid: int | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        recovery: Recovery | None = None,
    ) -> None:
        self.key = f"{namespace}:status"
        self._redis = redis
        self._counters = counters
        self._interval = interval
        self._version = version
        self._pid = os.getpid() if pid is None else pid
        self._now = now
        self._outage = Outage("status", _log, recovery=recovery)
        self._changed = asyncio.Event()
        self.state: State = "starting"
        self.since = now()
        self.writes = 0
        #: Why the latest write failed (``None`` after a success): ``/readyz`` shows it, because
        #: "OOM command not allowed" or "READONLY" says more than "no write for 3 s".
        self.last_error: str | None = None

    def set_state(self, state: State) -> None:
        """Record a state change; the running loop writes it at once."""
        if state != self.state:
            _log.info("state_changed", state=state, previous=self.state)
            self.state = state
            self.since = self._now()
            self._changed.set()

    def fields(self) -> dict[FieldT, EncodableT]:
        """The whole hash each time: a reader never sees fields of two different moments."""
        counters = self._counters()
        return {
            "state": self.state,
            "since": iso(self.since),
            "last_frame_at": iso(counters.last_frame_at),
            "last_tick_at": iso(counters.last_tick_at),
            "ticks_total": counters.ticks_total,
            "frames_total": counters.frames_total,
            "reconnects_total": counters.reconnects_total,
            "subscriptions": counters.subscriptions,
            "publish_failing_since": iso(counters.publish_failing_since),
            "control_failing_since": iso(counters.control_failing_since),
            "version": self._version,
            "pid": self._pid,
            "updated_at": iso(self._now()),
        }

    async def write(self) -> bool:
        """Write the hash once; False (and logged once per outage) when Redis is unavailable."""
        try:
            await self._redis.hset(self.key, mapping=self.fields())
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return False
        self._outage.recovered()
        self.last_error = None
        self.writes += 1
        return True

    async def run(self) -> None:
        """Write every ``interval`` and on every state change, until cancelled.

        Half a second by default: "at least once a second" (CONTRACT §2) must hold with the
        write's own round trip and a busy event loop added to the wait.
        """
        while True:
            checkpoint()  # a cancel swallowed inside redis-py (bridge/cancel.py) ends us here
            self._changed.clear()
            await self.write()
            try:
                async with asyncio.timeout(self._interval):
                    await self._changed.wait()
            except TimeoutError:
                pass
