"""Bounded hand-off from the feed to Redis pub/sub, published in batches.

The feed's reader calls :meth:`Publisher.submit` for every decoded frame. It must never wait
for Redis, so ``submit`` only serialises the ticks, appends the ready (channel, JSON) pairs to a
buffer and wakes the sender task, which publishes everything that accumulated (events first,
then ticks) in ONE round trip.

Serialising in ``submit`` rather than in the sender is deliberate: the buffer then holds bytes,
which the garbage collector never scans, and each tick's 14 dataclass objects die as soon as its
frame is handed off instead of surviving into older GC generations. Holding the records instead
made the whole path about 2x slower at full-mode firehose rates (measured with bench/e2e.py;
see docs/performance.md).

Overflow policy (Redis slow or down): ticks queue in arrival order up to ``max_pending``. Past
that the buffer is *conflated*: only the newest tick per instrument is kept and every tick
thrown away is counted in ``stats.replaced``. Memory is therefore bounded by ``max_pending``
ticks plus one tick per instrument (at most Kite's 3000 subscriptions), and subscribers get the
latest state of every instrument as soon as Redis answers again. Nothing is lost silently.

Events and order updates are rarer and matter more: they sit in their own queue of
``max_events`` (oldest dropped past that, counted in ``stats.events_dropped``) and are retried
until Redis takes them, so a short outage loses none.

A failed round trip is retried with backoff; the whole batch may be re-sent after an
ambiguous failure (redis-py re-sends a pipeline whole), so delivery is at-least-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Final, Literal, Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from bridge.kite.records import Tick
from bridge.payload import tick_json
from bridge.redis_client import Outage

__all__ = [
    "LUA_PUBLISH",
    "LuaTransport",
    "PipelineTransport",
    "Publisher",
    "PublisherStats",
    "Transport",
]

_log = structlog.get_logger(__name__)

#: Publishes ARGV as (channel, message) pairs; returns how many reached no subscriber.
LUA_PUBLISH: Final = """
local unheard = 0
for i = 1, #ARGV, 2 do
  if redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) == 0 then unheard = unheard + 1 end
end
return unheard
"""


class Transport(Protocol):
    """Sends one batch in one round trip: ``flat`` alternates channel and message.

    Returns how many messages reached no subscriber.
    """

    def __call__(self, flat: list[bytes], /) -> Awaitable[int]: ...


class PipelineTransport:
    """One ``PUBLISH`` per message in a non-transactional pipeline.

    Portable (fakeredis, Redis without scripting), but redis-py packs each pipelined command
    at a fixed per-command cost, which caps throughput (see bench/).
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def __call__(self, flat: list[bytes], /) -> int:
        it = iter(flat)
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, message in zip(it, it, strict=True):
                pipe.publish(channel, message)
            replies = await pipe.execute()
        return sum(1 for n in replies if n == 0)


class LuaTransport:
    """All messages as the arguments of ONE ``EVALSHA`` of :data:`LUA_PUBLISH`.

    One command with many arguments packs far faster than many commands (bench/publisher.py).
    redis-py loads the script again on ``NOSCRIPT`` (after a Redis restart). A batch runs
    atomically on the server, so ``batch_max`` also bounds how long one batch holds Redis.

    Where scripting is refused (an ACL without ``EVAL``, a proxy, fakeredis) the first
    ``ResponseError`` switches this transport to :class:`PipelineTransport` for good and sends
    the batch that way; a batch the script had half published may then repeat some messages,
    which at-least-once delivery allows.
    """

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._script = redis.register_script(LUA_PUBLISH)
        self._fallback: PipelineTransport | None = None

    async def __call__(self, flat: list[bytes], /) -> int:
        if self._fallback is not None:
            return await self._fallback(flat)
        try:
            return int(await self._script(args=flat))
        except ResponseError as exc:
            _log.warning("lua_publish_unavailable", error=str(exc), fallback="pipeline")
            self._fallback = PipelineTransport(self._redis)
            return await self._fallback(flat)


@dataclass
class PublisherStats:
    """Counters for status and metrics; all are totals since start except ``last_*``."""

    published: int = 0  #: ticks handed to Redis
    replaced: int = 0  #: ticks discarded by conflation (a newer tick of the same token won)
    events_published: int = 0  #: events and order updates handed to Redis
    events_dropped: int = 0  #: events discarded because their queue was full
    serialize_errors: int = 0  #: ticks that could not be turned into JSON (dropped)
    errors: int = 0  #: failed round trips
    batches: int = 0  #: successful round trips
    unheard: int = 0  #: messages no subscriber was listening for
    batch_seconds_total: float = 0.0
    last_batch_seconds: float = 0.0
    max_batch_seconds: float = 0.0
    last_batch_size: int = 0


class Publisher:
    """Owns the hand-off buffer and the sender task; see the module docstring for the policy."""

    def __init__(
        self,
        redis: Redis,
        namespace: str,
        *,
        max_pending: int = 10_000,
        batch_max: int = 2_000,
        max_events: int = 1_000,
        transport: Literal["lua", "pipeline"] | Transport = "lua",
        serialize: Callable[[Tick], bytes] = tick_json,
        base_wait: float = 0.05,
        max_wait: float = 5.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if max_pending < 1 or batch_max < 1 or max_events < 1:
            raise ValueError("max_pending, batch_max and max_events must be positive")
        self.stats = PublisherStats()
        self._prefix = f"{namespace}:ticks:"
        self._events_channel = f"{namespace}:events".encode()
        self._orders_channel = f"{namespace}:orders".encode()
        self._max_pending = max_pending
        self._batch_max = batch_max
        self._max_events = max_events
        self._serialize = serialize
        self._clock = clock
        if transport == "lua":
            self._transport: Transport = LuaTransport(redis)
        elif transport == "pipeline":
            self._transport = PipelineTransport(redis)
        else:
            self._transport = transport
        self._outage = Outage("publish", _log, base_wait=base_wait, max_wait=max_wait)
        self._channels: dict[int, bytes] = {}
        # Ready ticks, flat: channel, message, channel, message... in arrival order while under
        # max_pending. Once conflating: channel -> newest message (None until the first overflow).
        self._buffer: list[bytes] = []
        self._latest: dict[bytes, bytes] | None = None
        self._events: deque[tuple[bytes, bytes]] = deque()
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._conflate_logged_at = -1e9

    # -- hand-off (sync, called from the feed's reader) -------------------------------------

    @property
    def pending(self) -> int:
        """Ticks and events waiting to be sent (the batch in flight included)."""
        latest = 0 if self._latest is None else len(self._latest)
        return len(self._buffer) // 2 + latest + len(self._events) + self._in_flight

    def submit(self, ticks: Sequence[Tick]) -> None:
        """Serialise and queue ``ticks``. O(len(ticks)), never waits, never raises on Redis."""
        if not ticks:
            return
        ready = self._ready(ticks)
        latest = self._latest
        if latest is None:
            self._buffer += ready
            if len(self._buffer) > 2 * self._max_pending:
                self._conflate()
        else:
            it = iter(ready)
            for channel, message in zip(it, it, strict=True):
                if channel in latest:
                    self.stats.replaced += 1
                latest[channel] = message
        self._kick()

    def publish_event(self, event: bytes) -> None:
        """Queue one ready-made event JSON for ``<ns>:events``."""
        self._queue_event(self._events_channel, event)

    def publish_order(self, data: bytes) -> None:
        """Queue one order update JSON for ``<ns>:orders``."""
        self._queue_event(self._orders_channel, data)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name="publisher")
        return self._task

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109 (shutdown budget)
        """Wait until everything queued so far is sent; False if ``timeout`` ran out first."""
        try:
            async with asyncio.timeout(timeout):
                while self.pending:
                    self._drained.clear()
                    self._kick()
                    await self._drained.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 2.0) -> bool:  # noqa: ASYNC109
        """Flush (bounded by ``timeout``) then stop the sender; returns whether all was sent."""
        flushed = await self.flush(timeout) if self._task is not None else self.pending == 0
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if not flushed:
            _log.warning("publish_flush_incomplete", pending=self.pending)
        return flushed

    async def run(self) -> None:
        """The sender loop: runs until cancelled; Redis errors never end it."""
        while True:
            if not self._has_work():
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            await self.send_once()

    async def send_once(self) -> bool:
        """Send one batch of what is pending; on failure put it back and wait the backoff."""
        events, ticks = self._take()
        flat = [part for event in events for part in event]
        flat += ticks
        self._in_flight = len(events) + len(ticks) // 2
        started = self._clock()
        try:
            unheard = await self._transport(flat) if flat else 0
        except (RedisError, OSError) as exc:
            self._in_flight = 0
            self.stats.errors += 1
            self._put_back(events, ticks)
            await asyncio.sleep(self._outage.failed(exc))
            return False
        except BaseException:  # cancelled mid-flight (shutdown): keep the batch for flush
            self._in_flight = 0
            self._put_back(events, ticks)
            raise
        self._in_flight = 0
        elapsed = self._clock() - started
        self._outage.recovered()
        stats = self.stats
        stats.batches += 1
        stats.published += len(flat) // 2 - len(events)
        stats.events_published += len(events)
        stats.unheard += unheard
        stats.last_batch_seconds = elapsed
        stats.batch_seconds_total += elapsed
        stats.max_batch_seconds = max(stats.max_batch_seconds, elapsed)
        stats.last_batch_size = len(flat) // 2
        return True

    # -- internals ------------------------------------------------------------------------

    def _kick(self) -> None:
        self._drained.clear()
        self._wake.set()

    def _has_work(self) -> bool:
        return bool(self._buffer or self._latest or self._events)

    def _queue_event(self, channel: bytes, message: bytes) -> None:
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self.stats.events_dropped += 1
        self._events.append((channel, message))
        self._kick()

    def _conflate(self) -> None:
        it = iter(self._buffer)
        latest = dict(zip(it, it, strict=True))  # later pairs win: the newest per channel
        self.stats.replaced += len(self._buffer) // 2 - len(latest)
        self._buffer = []
        self._latest = latest
        now = time.monotonic()
        if now - self._conflate_logged_at >= 60.0:  # a slow Redis may flip this often
            self._conflate_logged_at = now
            _log.warning(
                "publish_backlog_conflating",
                max_pending=self._max_pending,
                replaced_total=self.stats.replaced,
            )

    def _take(self) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        """The next batch: all events, and at most ``batch_max`` ticks as flat pairs."""
        events = list(self._events)
        self._events.clear()
        room = self._batch_max
        latest = self._latest
        ticks: list[bytes]
        if latest is not None:
            keys = list(islice(latest, room))
            ticks = [part for key in keys for part in (key, latest.pop(key))]
            if not latest:
                self._latest = None
        elif len(self._buffer) <= 2 * room:
            ticks, self._buffer = self._buffer, []
        else:
            ticks = self._buffer[: 2 * room]
            del self._buffer[: 2 * room]
        return events, ticks

    def _put_back(self, events: list[tuple[bytes, bytes]], ticks: list[bytes]) -> None:
        """Return a failed batch to the front of the queues, still within the bounds."""
        if events:
            merged = events + list(self._events)
            excess = max(0, len(merged) - self._max_events)
            self.stats.events_dropped += excess
            self._events = deque(merged[excess:])
        if not ticks:
            return
        latest = self._latest
        if latest is None:
            self._buffer[:0] = ticks
            if len(self._buffer) > 2 * self._max_pending:
                self._conflate()
            return
        # Conflated: the failed ticks are older than anything buffered since.
        it = iter(ticks)
        older = dict(zip(it, it, strict=True))
        self.stats.replaced += len(ticks) // 2 - len(older)
        for channel, message in older.items():
            if channel in latest:
                self.stats.replaced += 1
            else:
                latest[channel] = message

    def _channel(self, token: int) -> bytes:
        channel = self._channels.get(token)
        if channel is None:
            channel = self._channels[token] = f"{self._prefix}{token}".encode()
        return channel

    def _ready(self, ticks: Sequence[Tick]) -> list[bytes]:
        """``ticks`` as flat (channel, JSON) pairs."""
        flat: list[bytes] = []
        append = flat.append
        serialize = self._serialize
        channels = self._channels
        channel_of = self._channel
        try:
            for tick in ticks:
                append(channels.get(tick.instrument_token) or channel_of(tick.instrument_token))
                append(serialize(tick))
        except Exception:
            # Rare (a codec bug): redo the frame tick by tick, dropping only the bad ones.
            flat.clear()
            for tick in ticks:
                try:
                    message = serialize(tick)
                except Exception:
                    self.stats.serialize_errors += 1
                    _log.exception("tick_serialize_failed", token=tick.instrument_token)
                    continue
                flat.append(channel_of(tick.instrument_token))
                flat.append(message)
        return flat
