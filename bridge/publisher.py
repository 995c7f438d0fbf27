"""Bounded hand-off from the feed to Redis pub/sub, published in batches.

The feed's dispatcher hands over every decoded frame: :meth:`Publisher.submit_payloads` takes
ready (token, JSON) pairs from the codec's payload path, :meth:`Publisher.submit` takes records
and serialises them. Either only appends the frame's (channel, JSON) pairs to a buffer and wakes
the sender task, which publishes what accumulated (events first, then ticks) in ONE round trip
(``bridge/transports.py``): whole frames, up to ``batch_max`` ticks or one frame if that is
larger, so the ticks of one websocket frame always reach Redis together. The buffer holds bytes
only, which the garbage collector never scans (holding records made the whole path about 2x
slower, docs/performance.md).

Two policies for when ticks arrive faster than they are published:

* **Redis is answering, the bridge is behind** (a burst, or more ticks than one core can both
  decode and publish): :meth:`Publisher.backpressure` asks the dispatcher to wait until the
  backlog falls from ``high_water`` to ``low_water``, which hands the CPU to the sender rather
  than to decoding ticks that would only be conflated. Frames wait in the feed's inbox
  meanwhile (its reader waits for room at most a second, and TCP pushes back on the server):
  late, but nothing is lost. Measured: conflating instead cost a third of the throughput.
* **Redis is down, stalled or slow** (an outage; no batch completed for ``stall_timeout``; or a
  round trip of ``slow_round_trip`` or more while the feed is ``max_lag`` behind): waiting
  would not make the bridge faster, only every tick later. No waiting, so the websocket keeps
  being read and decoded at full speed. Ticks queue in arrival order up to ``max_pending``;
  past that, or once a round trip has failed, the buffer is *conflated*: only the newest tick
  per instrument is kept and every tick thrown away is counted in ``stats.replaced``. Behind a
  failed round trip the waiting ticks are already stale, and ``ltp``/``quote`` ticks carry no
  timestamp: replayed in order after the outage they would pass for live prices. Memory is
  bounded by ``max_pending`` ticks plus one per instrument (at most Kite's 3000
  subscriptions), and subscribers get the latest state of every instrument as soon as Redis
  answers again.

Nothing is lost silently. Events and order updates are rarer and matter more: they sit in their
own queue of ``max_events`` (oldest dropped past that, counted in ``stats.events_dropped``) and
are retried until Redis takes them, so a short outage loses none.

A failed round trip is retried with backoff; the whole batch may be re-sent after an
ambiguous failure, so delivery is at-least-once (``stats.maybe_duplicated`` bounds the repeats).

An idle sender (the market is shut, or nothing subscribed) sends an empty batch every
``keepalive`` seconds. Redis's ``timeout`` setting and NAT or load-balancer idle timers close a
connection that stays silent, and the publisher's connection is the only one that can stay
silent for hours; without this the first ticks of the day would pay a failed send and a
reconnect, or, on a half-open socket, the whole socket timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.cancel import cancel_and_wait, checkpoint
from bridge.kite.records import Tick
from bridge.payload import tick_json
from bridge.redis_client import Outage, Recovery
from bridge.transports import (
    LuaTransport,
    NotLeaseholder,
    PipelineTransport,
    Transport,
    UnrepliedTransport,
)

__all__ = ["Publisher", "PublisherStats"]

_log = structlog.get_logger(__name__)


@dataclass
class PublisherStats:
    """Counters for status and metrics; all are totals since start except ``last_*``."""

    published: int = 0  #: ticks handed to Redis
    replaced: int = 0  #: ticks discarded by conflation (a newer tick of the same token won)
    events_published: int = 0  #: events and order updates handed to Redis
    events_dropped: int = 0  #: events discarded because their queue was full
    serialize_errors: int = 0  #: ticks that could not be turned into JSON (dropped)
    backpressure_waits: int = 0  #: times the feed was asked to wait for the backlog to drain
    backpressure_stalls: int = 0  #: waits given up after ``stall_timeout`` without progress
    backpressure_lagging: int = 0  #: waits skipped or cut short: Redis slow, feed lagging
    errors: int = 0  #: failed round trips
    #: Ticks of failed round trips that may have reached Redis all the same (a timeout, a reset
    #: mid-batch) and are sent again: at most this many were published twice.
    maybe_duplicated: int = 0
    keepalives: int = 0  #: empty round trips sent while idle
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
        transport: Literal["unreplied", "lua", "pipeline"] | Transport = "unreplied",
        serialize: Callable[[Tick], bytes] = tick_json,
        high_water: int | None = None,
        low_water: int | None = None,
        stall_timeout: float = 0.5,
        max_lag: float = 0.25,
        slow_round_trip: float = 0.05,
        base_wait: float = 0.05,
        max_wait: float = 5.0,
        keepalive: float | None = 10.0,
        clock: Callable[[], float] = time.perf_counter,
        recovery: Recovery | None = None,
    ) -> None:
        if max_pending < 1 or batch_max < 1 or max_events < 1:
            raise ValueError("max_pending, batch_max and max_events must be positive")
        high = max_pending // 2 if high_water is None else high_water
        low = high // 2 if low_water is None else low_water
        if not 0 <= low <= high <= max_pending:
            raise ValueError("need 0 <= low_water <= high_water <= max_pending")
        self.stats = PublisherStats()
        self._prefix = f"{namespace}:ticks:"
        self._events_channel = f"{namespace}:events".encode()
        self._orders_channel = f"{namespace}:orders".encode()
        self._max_pending = max_pending
        self._batch_max = batch_max
        self._max_events = max_events
        self._serialize = serialize
        self._clock = clock
        self._high_water = high
        self._low_water = low
        self._stall_timeout = stall_timeout
        self._max_lag = max_lag
        self._slow_round_trip = slow_round_trip
        self._keepalive = keepalive
        self._sending_since: float | None = None
        #: ``time.monotonic()`` of the first failed round trip since the last success, and why
        #: the latest one failed: ``/readyz`` and the status say so while it lasts.
        self.failing_since: float | None = None
        self.failing_since_at: float | None = None  # the same moment, ``time.time()``
        self.last_error: str | None = None
        if transport == "unreplied":
            self._transport: Transport = UnrepliedTransport(redis)
        elif transport == "lua":
            self._transport = LuaTransport(redis)
        elif transport == "pipeline":
            self._transport = PipelineTransport(redis)
        else:
            self._transport = transport
        self._outage = Outage(
            "publish", _log, base_wait=base_wait, max_wait=max_wait, recovery=recovery
        )
        self._channels: dict[int, bytes] = {}
        # Ready ticks in arrival order while under max_pending, one flat list per frame (channel,
        # message, channel, message...); _buffered counts their ticks. Once conflating: channel ->
        # newest message (None until the first overflow).
        self._frames: deque[list[bytes]] = deque()
        self._buffered = 0
        self._latest: dict[bytes, bytes] | None = None
        self._events: deque[tuple[bytes, bytes]] = deque()
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._progress = asyncio.Event()  # set after every round trip, failed ones included
        self._stalled = False  # a wait timed out: no more waiting until the backlog drains
        self._task: asyncio.Task[None] | None = None
        self._conflate_logged_at = -1e9
        self._stall_logged_at = -1e9

    # -- hand-off (called from the feed's dispatcher) ---------------------------------------

    @property
    def pending(self) -> int:
        """Ticks and events waiting to be sent (the batch in flight included)."""
        latest = 0 if self._latest is None else len(self._latest)
        return self._buffered + latest + len(self._events) + self._in_flight

    def failing_for(self) -> float | None:
        """Seconds since the first of the round trips that have failed in a row; ``None`` while
        the latest succeeded (nothing lost meanwhile: the batches wait, see the module doc)."""
        since = self.failing_since
        return None if since is None else time.monotonic() - since

    def submit(self, ticks: Sequence[Tick]) -> None:
        """Serialise and queue ``ticks``. O(len(ticks)), never waits, never raises on Redis."""
        if ticks:
            self._enqueue(self._ready(ticks))

    def submit_payloads(self, payloads: Sequence[tuple[int, bytes]]) -> None:
        """Queue ready ``(instrument_token, JSON)`` pairs, as ``codec.frame_payloads`` gives."""
        if not payloads:
            return
        flat: list[bytes] = []
        append = flat.append
        channels = self._channels
        for token, payload in payloads:
            append(channels.get(token) or self._channel(token))
            append(payload)
        self._enqueue(flat)

    def backpressure(self, lag: Callable[[], float] | None = None) -> Awaitable[None] | None:
        """What the feed should await before its next frame, or ``None`` to go straight on.

        ``None`` while the backlog is at most ``high_water``, and also while Redis is failing,
        stalled, or slow while ``lag()`` (the feed's, in seconds: ``KiteFeed.lag``) exceeds
        ``max_lag``: the conflation policy applies then (see the module docstring).
        """
        if self.pending <= self._high_water or self._stalled or self._outage.active:
            return None
        if self._lagging(lag):
            self.stats.backpressure_lagging += 1
            return None
        return self._wait_for_room(lag)

    def _lagging(self, lag: Callable[[], float] | None) -> bool:
        """Redis is the bottleneck and the feed is ``max_lag`` behind: stop pacing it.

        A slow round trip is what tells a slow Redis from a busy bridge: when the bridge's own
        CPU is the limit, batches complete fast whenever they get a turn, and pacing the feed
        is what gives them that turn.
        """
        if lag is None:
            return False
        round_trip = self.stats.last_batch_seconds
        if self._sending_since is not None:
            round_trip = max(round_trip, self._clock() - self._sending_since)
        return round_trip >= self._slow_round_trip and lag() > self._max_lag

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
            await cancel_and_wait([self._task])  # its Redis calls may swallow one cancel
            self._task = None
        if not flushed:
            _log.warning("publish_flush_incomplete", pending=self.pending)
        return flushed

    async def run(self) -> None:
        """The sender loop: runs until cancelled; Redis errors never end it."""
        while True:
            checkpoint()  # a cancel swallowed inside redis-py (bridge/cancel.py) ends us here
            if not self._has_work():
                self._drained.set()
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._keepalive):
                        await self._wake.wait()
                except TimeoutError:
                    await self._keep_alive()
                continue
            await self.send_once()

    async def _keep_alive(self) -> None:
        """One empty round trip on the idle connection (module docstring)."""
        try:
            await self._transport([])
        except (RedisError, OSError) as exc:
            # Nothing was lost; the next batch reconnects, and an outage is reported by the
            # status writer and by that batch.
            _log.debug("publish_keepalive_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            self.stats.keepalives += 1

    async def send_once(self) -> bool:
        """Send one batch of what is pending; on failure put it back and wait the backoff."""
        events, ticks = self._take()
        flat = [part for event in events for part in event]
        flat += ticks
        self._in_flight = len(events) + len(ticks) // 2
        started = self._sending_since = self._clock()
        try:
            unheard = await self._transport(flat) if flat else 0
        except (RedisError, OSError) as exc:
            self._sending_since = None
            self._in_flight = 0
            self.stats.errors += 1
            if not isinstance(exc, NotLeaseholder):  # held back, never sent
                self.stats.maybe_duplicated += len(ticks) // 2
            self._put_back(events, ticks)
            if self._frames:  # behind an outage, in-order ticks would only arrive stale
                self._conflate("outage")
            if self.failing_since is None:
                self.failing_since, self.failing_since_at = time.monotonic(), time.time()
            self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            wait = self._outage.failed(exc)
            self._progress.set()  # a waiting feed stops waiting: the outage policy applies
            await self._outage.pause(wait)
            return False
        except BaseException:  # cancelled mid-flight (shutdown): keep the batch for flush
            self._sending_since = None
            self._in_flight = 0
            self._put_back(events, ticks)
            raise
        self._in_flight = 0
        self._sending_since = None
        elapsed = self._clock() - started
        self.failing_since = self.failing_since_at = self.last_error = None
        self._outage.recovered()
        if self._stalled and self.pending <= self._low_water:
            self._stalled = False
        self._progress.set()
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

    async def _wait_for_room(self, lag: Callable[[], float] | None) -> None:
        """Wait until the backlog is down to ``low_water``, for as long as batches keep landing
        and Redis is not the slow part of a feed ``max_lag`` behind."""
        self.stats.backpressure_waits += 1
        progress = self._progress
        while self.pending > self._low_water and not self._outage.active:
            if self._lagging(lag):
                self.stats.backpressure_lagging += 1
                return
            progress.clear()
            try:
                async with asyncio.timeout(self._stall_timeout):
                    await progress.wait()
            except TimeoutError:
                self._stalled = True
                self.stats.backpressure_stalls += 1
                now = time.monotonic()
                if now - self._stall_logged_at >= 60.0:
                    self._stall_logged_at = now
                    _log.warning(
                        "publish_stalled",
                        pending=self.pending,
                        stall_timeout=self._stall_timeout,
                        stalls_total=self.stats.backpressure_stalls,
                    )
                return

    def _enqueue(self, flat: list[bytes]) -> None:
        if not flat:
            return
        latest = self._latest
        if latest is None:
            self._frames.append(flat)
            self._buffered += len(flat) // 2
            if self._buffered > self._max_pending:
                self._conflate("max_pending")
        else:
            it = iter(flat)
            for channel, message in zip(it, it, strict=True):
                if channel in latest:
                    self.stats.replaced += 1
                latest[channel] = message
        self._kick()

    def _kick(self) -> None:
        self._drained.clear()
        self._wake.set()

    def _has_work(self) -> bool:
        return bool(self._frames or self._latest or self._events)

    def _queue_event(self, channel: bytes, message: bytes) -> None:
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self.stats.events_dropped += 1
        self._events.append((channel, message))
        self._kick()

    def _conflate(self, reason: Literal["max_pending", "outage"]) -> None:
        latest: dict[bytes, bytes] = {} if self._latest is None else self._latest
        kept = len(latest)
        for flat in self._frames:
            it = iter(flat)
            latest.update(zip(it, it, strict=True))  # later pairs win: the newest per channel
        self.stats.replaced += self._buffered + kept - len(latest)
        self._frames.clear()
        self._buffered = 0
        self._latest = latest
        now = time.monotonic()
        if now - self._conflate_logged_at >= 60.0:  # a slow Redis may flip this often
            self._conflate_logged_at = now
            _log.warning(
                "publish_backlog_conflating",
                reason=reason,
                max_pending=self._max_pending,
                replaced_total=self.stats.replaced,
            )

    def _take(self) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
        """The next batch: all events, and whole frames of ticks as flat pairs: as many as fit
        in ``batch_max`` ticks, or the first alone if it is larger."""
        events = list(self._events)
        self._events.clear()
        room = self._batch_max
        latest = self._latest
        ticks: list[bytes]
        frames = self._frames
        if latest is not None:
            keys = list(islice(latest, room))
            ticks = [part for key in keys for part in (key, latest.pop(key))]
            if not latest:
                self._latest = None
        elif frames:
            ticks = frames.popleft()
            pairs = room * 2
            while frames and len(ticks) + len(frames[0]) <= pairs:
                ticks += frames.popleft()
            self._buffered -= len(ticks) // 2
        else:
            ticks = []
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
            self._frames.appendleft(ticks)  # one "frame": a batch is only ever whole frames
            self._buffered += len(ticks) // 2
            if self._buffered > self._max_pending:
                self._conflate("max_pending")
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
