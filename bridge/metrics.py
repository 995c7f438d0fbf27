"""Prometheus metrics, read from the counters the bridge already keeps.

Hot-path rule: nothing here runs per tick through ``prometheus_client``. A ``Counter.inc()``
takes a lock (about 0.5 µs); at 100k ticks/s that is a twentieth of a core spent on bookkeeping.
The feed, publisher and control consumer count in plain ints on their ``stats`` dataclasses and
:class:`BridgeCollector` turns those into metric families only when ``/metrics`` is scraped.

What does run more often than a scrape, and why it is cheap enough:

* :class:`TokenActivity` stores one float per tick in a dict (no lock, no allocation per tick
  once a token is known) so that per-token silence can be reported;
* :class:`LatencyHistogram` observes once per publish *batch* (up to 2000 ticks), not per tick;
* :class:`Progress` and :class:`LoopLag` are sampled a few times a second by a background task.

Every metric is documented in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Final, NamedTuple, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.control import ControlStats
from bridge.kite.feed import CAUSES, FeedStats
from bridge.kite.records import Mode
from bridge.publisher import PublisherStats
from bridge.status import STATES
from bridge.transports import Transport

__all__ = [
    "DEFAULT_LATENCY_BUCKETS",
    "DEFAULT_SILENCE_AFTER",
    "BridgeCollector",
    "BridgeMetrics",
    "ControlView",
    "FeedView",
    "LatencyHistogram",
    "LoopLag",
    "Progress",
    "PublisherView",
    "TimedTransport",
    "TokenActivity",
]

#: Seconds; a local Redis answers a small batch in well under 1 ms, a 2000-tick batch in
#: 1-10 ms, an outage in seconds.
DEFAULT_LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: A subscribed token with no tick for this long counts as silent. Illiquid instruments may
#: legitimately stay quiet for a while, so this is reported, never acted on.
DEFAULT_SILENCE_AFTER: Final = 60.0
_MODES: Final[tuple[Mode, ...]] = ("ltp", "quote", "full")


class FeedView(Protocol):
    """What the collector reads from a :class:`~bridge.kite.feed.KiteFeed`."""

    @property
    def stats(self) -> FeedStats: ...

    @property
    def subscriptions(self) -> Mapping[int, Mode]: ...

    @property
    def pending(self) -> int: ...

    def lag(self) -> float: ...

    @property
    def connected(self) -> bool: ...


class PublisherView(Protocol):
    """What the collector reads from a :class:`~bridge.publisher.Publisher`."""

    @property
    def stats(self) -> PublisherStats: ...

    @property
    def pending(self) -> int: ...


class ControlView(Protocol):
    """What the collector reads from a :class:`~bridge.control.ControlConsumer`."""

    @property
    def stats(self) -> ControlStats: ...


class LatencyHistogram:
    """A lock-free histogram for one event loop: ``observe`` is a bisect and two additions."""

    def __init__(self, buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be non-empty and distinct")
        self.bounds: tuple[float, ...] = tuple(bounds)
        self._counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        result: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self._counts, strict=False):
            running += count
            result.append((_le(bound), running))
        result.append(("+Inf", self.count))
        return result


def _le(bound: float) -> str:
    return repr(bound) if bound != int(bound) else f"{bound:.1f}"


class TimedTransport:
    """Wraps a publisher transport and times every successful round trip (one per batch).

    Failed round trips are not observed: the publisher counts them in ``stats.errors`` and an
    outage's timeouts would only smear the histogram.
    """

    def __init__(
        self,
        inner: Transport,
        histogram: LatencyHistogram,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._inner = inner
        self._histogram = histogram
        self._clock = clock

    def __call__(self, flat: list[bytes], /) -> Awaitable[int]:
        return self._timed(flat)

    async def _timed(self, flat: list[bytes]) -> int:
        started = self._clock()
        unheard = await self._inner(flat)
        if flat:  # an idle publisher's keepalive is not a publish
            self._histogram.observe(self._clock() - started)
        return unheard


class Silence(NamedTuple):
    """What :meth:`TokenActivity.silence` found."""

    #: Silent token -> seconds without a tick.
    tokens: dict[int, float]
    #: The longest silence of any subscribed token, silent or not yet.
    longest: float


class TokenActivity:
    """When each token last ticked, to report subscribed tokens that went silent.

    ``observe`` runs on the dispatcher for every decoded frame, so it does as little as
    possible: one clock read per frame, one dict store per tick.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.last_tick: dict[int, float] = {}
        # Subscribed tokens that had not ticked when first seen by silence(): their silence is
        # counted from then, not from the start of the process.
        self._noticed: dict[int, float] = {}

    def observe(self, payloads: Iterable[tuple[int, object]]) -> None:
        """Note the ticks of one frame: ``(instrument_token, payload)`` pairs."""
        now = self._clock()
        last = self.last_tick
        for token, _ in payloads:
            last[token] = now

    def notice(self, subscribed: Iterable[int]) -> None:
        """Start the silence clock of subscribed tokens that have not ticked yet.

        Called every second by the service, so a token that never ticks is reported
        ``silent_after`` seconds after it was subscribed, not after the first scrape.
        """
        now, last, noticed = self._clock(), self.last_tick, self._noticed
        tokens = set(subscribed)
        for token in tokens:
            if token not in last and token not in noticed:
                noticed[token] = now
        self._forget_all_but(tokens)

    def _forget_all_but(self, tokens: set[int]) -> None:
        """Drop unsubscribed tokens, so a bridge whose subscriptions change over weeks does not
        accumulate them (whether or not anyone scrapes the metrics)."""
        for book in (self.last_tick, self._noticed):
            for token in book.keys() - tokens:
                del book[token]

    def silence(
        self, subscribed: Iterable[int], silent_after: float, since: float | None = None
    ) -> Silence:
        """The tokens of ``subscribed`` silent for ``silent_after`` seconds or more.

        ``since`` (monotonic) is when ticks could first have arrived, e.g. when the current
        connection came up: nothing is silent for longer than the feed has been connected.
        """
        now = self._clock()
        last, noticed = self.last_tick, self._noticed
        floor = now if since is None else since
        tokens = set(subscribed)
        silent: dict[int, float] = {}
        longest = 0.0
        for token in tokens:
            seen = last.get(token)
            if seen is None:
                seen = noticed.setdefault(token, now)
            quiet = now - max(seen, floor)
            if quiet >= silent_after:
                silent[token] = quiet
            longest = max(longest, quiet)
        self._forget_all_but(tokens)
        return Silence(silent, longest)


class Progress:
    """Notes when a counter last advanced: "the last successful Redis write was N s ago".

    The counter it watches (successful status writes) only counts successes, so a counter
    that stops moving means Redis stopped accepting writes. ``sample`` is called a few
    times a second; the age it reports is therefore late by at most one sampling period.
    """

    def __init__(
        self,
        counters: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._counters = counters
        self._clock = clock
        self._last_value: int | None = None
        self._advanced_at: float | None = None

    def sample(self) -> None:
        value = self._counters()
        if self._last_value is not None and value != self._last_value:
            self._advanced_at = self._clock()
        self._last_value = value

    def age(self) -> float | None:
        """Seconds since the counter last advanced; ``None`` if it never did."""
        return None if self._advanced_at is None else self._clock() - self._advanced_at


class LoopLag:
    """How late the event loop wakes up a sleeper: a blocked loop shows here first."""

    def __init__(self, interval: float = 0.5, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self.last = 0.0
        self.max = 0.0

    async def run(self, on_sample: Callable[[], None] | None = None) -> None:
        """Sample until cancelled; ``on_sample`` piggybacks other periodic sampling."""
        while True:
            expected = self._clock() + self.interval
            await asyncio.sleep(self.interval)
            self.last = max(0.0, self._clock() - expected)
            self.max = max(self.max, self.last)
            if on_sample is not None:
                on_sample()


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class BridgeCollector(Collector):
    """Builds every ``bridge_*`` family from the components' plain counters at scrape time."""

    def __init__(
        self,
        *,
        feed: FeedView,
        publisher: PublisherView,
        control: ControlView,
        state: Callable[[], str],
        activity: TokenActivity,
        latency: LatencyHistogram,
        loop_lag: LoopLag | None = None,
        redis_write_age: Callable[[], float | None] = lambda: None,
        lease_held: Callable[[], bool] | None = None,
        silent_after: float = DEFAULT_SILENCE_AFTER,
        version: str = __version__,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._feed = feed
        self._publisher = publisher
        self._control = control
        self._state = state
        self._activity = activity
        self._latency = latency
        self._loop_lag = loop_lag
        self._redis_write_age = redis_write_age
        self._lease_held = lease_held
        self._silent_after = silent_after
        self._version = version
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._process()
        yield from self._feed_metrics()
        yield from self._publisher_metrics()
        yield from self._control_metrics()

    def _process(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("bridge_info", "Bridge version; always 1.", labels=["version"])
        info.add_metric([self._version], 1)
        yield info
        current = self._state()
        state = GaugeMetricFamily(
            "bridge_state", "1 for the bridge's current state, 0 for the others.", labels=["state"]
        )
        for name in STATES:
            state.add_metric([name], 1 if name == current else 0)
        yield state
        age = self._redis_write_age()
        if age is not None:
            yield _gauge(
                "bridge_redis_last_write_age_seconds",
                "Seconds since Redis last accepted a keyspace write (the status hash).",
                age,
            )
        if self._lease_held is not None:
            yield _gauge(
                "bridge_namespace_held",
                "1 while this bridge holds <ns>:lock and publishes; 0 for a standby.",
                self._lease_held(),
            )
        if self._loop_lag is not None:
            yield _gauge(
                "bridge_event_loop_lag_seconds",
                "How late the event loop woke the last periodic sampler.",
                self._loop_lag.last,
            )

    def _feed_metrics(self) -> Iterator[Metric]:
        feed = self._feed
        s = feed.stats
        yield _gauge(
            "bridge_websocket_connected", "1 while the Kite websocket is up.", feed.connected
        )
        yield _counter(
            "bridge_frames", "Websocket messages received (heartbeats and text included).", s.frames
        )
        yield _counter("bridge_heartbeats", "1-byte heartbeat frames received.", s.heartbeats)
        yield _counter("bridge_text_messages", "Text frames received.", s.text_messages)
        yield _counter("bridge_ticks", "Ticks decoded from binary frames.", s.ticks)
        yield _counter(
            "bridge_malformed_frames",
            "Binary frames that failed to decode plus text frames that are not Kite messages.",
            s.malformed_frames,
        )
        yield _counter(
            "bridge_skipped_packets",
            "Packets of unknown length skipped in good frames.",
            s.skipped_packets,
        )
        yield _counter("bridge_handler_errors", "Feed handlers that raised.", s.handler_errors)
        yield _counter(
            "bridge_feed_frames_dropped",
            "Frames dropped unhandled because the dispatch queue was full (the older half).",
            s.frames_dropped,
        )
        yield _counter("bridge_connections", "Successful websocket handshakes.", s.connections)
        reconnects = CounterMetricFamily(
            "bridge_reconnects",
            "Reconnect attempts by the cause of the failure before them.",
            labels=["cause"],
        )
        by_cause = s.reconnects_by_cause
        for cause in (*CAUSES, *sorted(set(by_cause) - set(CAUSES))):
            reconnects.add_metric([cause], by_cause.get(cause, 0))
        yield reconnects
        yield _gauge(
            "bridge_feed_pending", "Frames waiting for the feed's dispatcher.", feed.pending
        )
        yield _gauge(
            "bridge_feed_lag_seconds",
            "How long the oldest frame waiting for the dispatcher has waited (0: none waits).",
            feed.lag(),
        )
        now_wall = time.time()
        if s.last_frame_at is not None:
            yield _gauge(
                "bridge_last_frame_age_seconds",
                "Seconds since the last websocket frame (any kind).",
                max(0.0, now_wall - s.last_frame_at),
            )
        subscriptions = feed.subscriptions
        by_mode = dict.fromkeys(_MODES, 0)
        for mode in subscriptions.values():
            by_mode[mode] = by_mode.get(mode, 0) + 1
        subs = GaugeMetricFamily(
            "bridge_subscriptions", "Subscribed tokens by mode.", labels=["mode"]
        )
        for mode, count in by_mode.items():
            subs.add_metric([mode], count)
        yield subs
        since = None
        if s.connected_since is not None:  # wall clock -> our monotonic clock
            since = self._clock() - max(0.0, now_wall - s.connected_since)
        elif not feed.connected:
            since = self._clock()  # disconnected: silence is the feed's fault, not the tokens'
        silence = self._activity.silence(subscriptions, self._silent_after, since)
        yield _gauge(
            "bridge_silent_tokens",
            f"Subscribed tokens without a tick for {self._silent_after:g} s or more "
            "while connected.",
            len(silence.tokens),
        )
        yield _gauge(
            "bridge_token_silence_max_seconds",
            "Longest time any subscribed token has gone without a tick while connected.",
            silence.longest,
        )
        # One series per silent token only (normally none, at most the 3000 subscribed), so an
        # alert can say which instrument went quiet without a series per subscription.
        per_token = GaugeMetricFamily(
            "bridge_token_silence_seconds",
            f"Seconds without a tick, for each subscribed token silent for "
            f"{self._silent_after:g} s or more while connected.",
            labels=["token", "mode"],
        )
        for token, quiet in sorted(silence.tokens.items()):
            per_token.add_metric([str(token), subscriptions.get(token, "")], quiet)
        yield per_token

    def _publisher_metrics(self) -> Iterator[Metric]:
        p = self._publisher.stats
        yield _counter("bridge_ticks_published", "Ticks handed to Redis.", p.published)
        yield _counter(
            "bridge_ticks_replaced",
            "Ticks discarded by conflation because a newer tick of the same token won.",
            p.replaced,
        )
        dropped = CounterMetricFamily(
            "bridge_ticks_dropped",
            "Ticks dropped without publishing, by reason.",
            labels=["reason"],
        )
        dropped.add_metric(["serialize_error"], p.serialize_errors)
        yield dropped
        yield _counter(
            "bridge_events_published",
            "Events and order updates handed to Redis.",
            p.events_published,
        )
        yield _counter(
            "bridge_events_dropped",
            "Events dropped because their queue was full.",
            p.events_dropped,
        )
        yield _counter("bridge_publish_batches", "Successful publish round trips.", p.batches)
        yield _counter("bridge_publish_errors", "Failed publish round trips (retried).", p.errors)
        yield _counter(
            "bridge_publish_maybe_duplicated_ticks",
            "Ticks sent again after a failed round trip that may have reached Redis all the same:"
            " at most this many were published twice.",
            p.maybe_duplicated,
        )
        yield _counter(
            "bridge_publish_unheard",
            "Messages known to have reached no subscriber (only batches sent with replies).",
            p.unheard,
        )
        yield _counter(
            "bridge_publish_backpressure_waits",
            "Times the feed waited for the publish backlog to drain (Redis answering).",
            p.backpressure_waits,
        )
        yield _counter(
            "bridge_publish_backpressure_lagging",
            "Backpressure waits skipped or cut short because the feed lagged (then conflation).",
            p.backpressure_lagging,
        )
        yield _counter(
            "bridge_publish_stalls",
            "Backpressure waits given up because no batch completed in time (then conflation).",
            p.backpressure_stalls,
        )
        yield _gauge(
            "bridge_publish_pending",
            "Ticks and events waiting to be published.",
            self._publisher.pending,
        )
        latency = HistogramMetricFamily(
            "bridge_publish_latency_seconds",
            "Round-trip time of successful publish batches.",
            buckets=self._latency.cumulative(),
            sum_value=self._latency.sum,
        )
        yield latency

    def _control_metrics(self) -> Iterator[Metric]:
        c = self._control.stats
        commands = CounterMetricFamily(
            "bridge_commands", "Control commands processed, by result.", labels=["result"]
        )
        commands.add_metric(["applied"], c.applied)
        commands.add_metric(["rejected"], c.rejected)
        yield commands
        actions = CounterMetricFamily(
            "bridge_commands_by_action",
            "Control commands by action ('invalid' when unparseable).",
            labels=["action"],
        )
        for action in sorted(c.by_action):
            actions.add_metric([action], c.by_action[action])
        yield actions
        yield _counter(
            "bridge_commands_requeued",
            "Commands put back from processing (start-up, lost replies).",
            c.requeued,
        )
        yield _counter(
            "bridge_control_redis_errors",
            "Redis errors met by the control consumer.",
            c.redis_errors,
        )
        yield _counter(
            "bridge_control_write_errors",
            "Dead letters, acks, result events and replies Redis refused (not retried).",
            c.write_errors,
        )
        yield _counter(
            "bridge_commands_store_errors",
            "Commands rejected because the desired subscriptions could not be read or written.",
            c.store_errors,
        )


class BridgeMetrics:
    """The bridge's registry: :class:`BridgeCollector` plus process, platform and GC metrics.

    A dedicated registry, not the global one, so tests and two bridges in one process never
    see each other's collectors.
    """

    def __init__(
        self,
        *,
        feed: FeedView,
        publisher: PublisherView,
        control: ControlView,
        state: Callable[[], str],
        silent_after: float = DEFAULT_SILENCE_AFTER,
        latency: LatencyHistogram | None = None,
        redis_counters: Callable[[], int] | None = None,
        lease_held: Callable[[], bool] | None = None,
        process: bool = True,
    ) -> None:
        self.activity = TokenActivity()
        #: Pass the histogram in when the publisher's transport had to be timed before the
        #: publisher (and so this object) existed.
        self.latency = latency or LatencyHistogram()
        self.loop_lag = LoopLag()
        self.redis_writes = Progress(redis_counters or (lambda: 0))
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = BridgeCollector(
            feed=feed,
            publisher=publisher,
            control=control,
            state=state,
            activity=self.activity,
            latency=self.latency,
            loop_lag=self.loop_lag,
            redis_write_age=self.redis_writes.age,
            lease_held=lease_held,
            silent_after=silent_after,
        )
        self.registry.register(self.collector)
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    async def sample(self) -> None:
        """The periodic sampler (loop lag, Redis write progress); runs until cancelled."""
        self.redis_writes.sample()
        await self.loop_lag.run(self.redis_writes.sample)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything registered."""
        return generate_latest(self.registry)
