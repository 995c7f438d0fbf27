"""bridge.metrics: scrape-time collection from plain counters, histograms, silence, progress."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import pytest
from helpers import wait_until
from prometheus_client.parser import text_string_to_metric_families

from bridge import __version__
from bridge.control import ControlStats
from bridge.kite.feed import CAUSES, FeedStats, KiteFeed
from bridge.kite.records import Mode
from bridge.metrics import (
    BridgeCollector,
    BridgeMetrics,
    LatencyHistogram,
    LoopLag,
    Progress,
    TimedTransport,
    TokenActivity,
)
from bridge.publisher import PublisherStats
from bridge.simulator.server import Simulator


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeFeed:
    stats: FeedStats = field(default_factory=FeedStats)
    subscriptions: Mapping[int, Mode] = field(default_factory=dict)
    pending: int = 0
    connected: bool = False
    lag_seconds: float = 0.0

    def lag(self) -> float:
        return self.lag_seconds


@dataclass
class FakePublisher:
    stats: PublisherStats = field(default_factory=PublisherStats)
    pending: int = 0


@dataclass
class FakeControl:
    stats: ControlStats = field(default_factory=ControlStats)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    result: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def value(text: bytes, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


# -- LatencyHistogram ------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    histogram = LatencyHistogram([0.01, 0.1, 1.0])
    for seconds in (0.005, 0.01, 0.05, 0.5, 7.0):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("0.01", 2), ("0.1", 3), ("1.0", 4), ("+Inf", 5)]
    assert histogram.count == 5
    assert histogram.sum == pytest.approx(7.565)


@pytest.mark.parametrize("buckets", [[], [0.1, 0.1]])
def test_histogram_rejects_bad_buckets(buckets: list[float]) -> None:
    with pytest.raises(ValueError, match="buckets"):
        LatencyHistogram(buckets)


async def test_timed_transport_times_successes_only() -> None:
    clock = Clock()
    histogram = LatencyHistogram([0.01, 1.0])
    calls: list[list[bytes]] = []

    async def transport(flat: list[bytes], /) -> int:
        calls.append(flat)
        clock.now += 0.25
        if flat == [b"boom"]:
            raise ConnectionError("redis went away")
        return 3

    timed = TimedTransport(transport, histogram, clock=clock)
    assert await timed([b"ch", b"msg"]) == 3
    with pytest.raises(ConnectionError):
        await timed([b"boom"])
    assert calls == [[b"ch", b"msg"], [b"boom"]]
    assert histogram.count == 1
    assert histogram.sum == pytest.approx(0.25)
    assert histogram.cumulative() == [("0.01", 0), ("1.0", 1), ("+Inf", 1)]


# -- TokenActivity ---------------------------------------------------------------------------


def test_silence_counts_tokens_quiet_for_longer_than_the_threshold() -> None:
    clock = Clock()
    activity = TokenActivity(clock)
    activity.observe([(1, b""), (2, b"")])
    clock.now += 30
    activity.observe([(2, b"")])
    clock.now += 40  # token 1: 70 s quiet, token 2: 40 s
    found = activity.silence([1, 2], silent_after=60, since=0.0)
    assert found.tokens == pytest.approx({1: 70})
    assert found.longest == pytest.approx(70)
    found = activity.silence([1, 2], silent_after=30, since=0.0)
    assert found.tokens == pytest.approx({1: 70, 2: 40})


def test_silence_never_exceeds_the_connection_age() -> None:
    clock = Clock()
    activity = TokenActivity(clock)
    activity.observe([(1, b"")])
    clock.now += 100
    reconnected_at = clock.now - 5
    found = activity.silence([1], silent_after=60, since=reconnected_at)
    assert found.tokens == {}
    assert found.longest == pytest.approx(5)


def test_a_token_that_never_ticked_is_silent_from_when_it_was_first_seen() -> None:
    clock = Clock()
    activity = TokenActivity(clock)
    assert activity.silence([7], silent_after=10, since=0.0) == ({}, 0.0)
    clock.now += 11
    assert activity.silence([7], silent_after=10, since=0.0).tokens == pytest.approx({7: 11})


def test_notice_starts_the_clock_of_tokens_that_never_ticked() -> None:
    clock = Clock()
    activity = TokenActivity(clock)
    activity.observe([(1, b"")])
    activity.notice([1, 2])  # 2 subscribed now, no tick yet; 1 has its tick time already
    clock.now += 61
    activity.notice([1, 2, 3])  # a later notice does not restart the clock of 2
    found = activity.silence([1, 2, 3], silent_after=60, since=0.0)
    assert found.tokens == pytest.approx({1: 61, 2: 61})  # 3 was only just subscribed


def test_notice_forgets_unsubscribed_tokens_without_any_scrape() -> None:
    activity = TokenActivity(Clock())
    activity.observe([(1, b""), (2, b"")])
    activity.notice([1, 3])  # 2 unsubscribed, 3 new and silent so far
    assert set(activity.last_tick) == {1}
    activity.notice([1])
    activity.observe([(4, b"")])  # a late tick of a token no longer subscribed
    activity.notice([1])
    assert set(activity.last_tick) == {1}
    assert activity.silence([1], silent_after=10, since=0.0).tokens == {}


def test_unsubscribed_tokens_are_forgotten() -> None:
    clock = Clock()
    activity = TokenActivity(clock)
    activity.observe([(token, b"") for token in range(1, 101)])
    activity.silence([5, 500], silent_after=10, since=0.0)
    assert set(activity.last_tick) == {5}
    activity.silence([], silent_after=10, since=0.0)
    assert activity.last_tick == {}


# -- Progress, LoopLag -----------------------------------------------------------------------


def test_progress_reports_the_age_of_the_last_advance() -> None:
    clock = Clock()
    counter = [0]
    progress = Progress(lambda: counter[0], clock)
    progress.sample()
    assert progress.age() is None  # a first reading proves nothing
    counter[0] = 3
    clock.now += 1
    progress.sample()
    clock.now += 4
    progress.sample()  # no change: the age keeps growing
    assert progress.age() == pytest.approx(4)
    counter[0] = 4
    progress.sample()
    assert progress.age() == 0


async def test_loop_lag_measures_late_wake_ups() -> None:
    readings = iter([10.0, 10.35, 11.0, 11.01])  # expected wake-ups at 10.01 and 11.01
    lag = LoopLag(interval=0.01, clock=lambda: next(readings))
    samples_taken: list[float] = []

    def on_sample() -> None:
        samples_taken.append(lag.last)
        if len(samples_taken) == 2:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await lag.run(on_sample)
    assert samples_taken == [pytest.approx(0.34), 0.0]
    assert lag.max == pytest.approx(0.34)


# -- BridgeCollector -------------------------------------------------------------------------


def make_metrics(
    feed: FakeFeed | None = None,
    publisher: FakePublisher | None = None,
    control: FakeControl | None = None,
    state: str = "connected",
) -> tuple[BridgeMetrics, FakeFeed, FakePublisher, FakeControl]:
    feed = feed or FakeFeed()
    publisher = publisher or FakePublisher()
    control = control or FakeControl()
    metrics = BridgeMetrics(
        feed=feed, publisher=publisher, control=control, state=lambda: state, process=False
    )
    return metrics, feed, publisher, control


def test_counters_come_straight_from_the_stats() -> None:
    metrics, feed, publisher, control = make_metrics()
    feed.stats.frames, feed.stats.ticks, feed.stats.heartbeats = 120, 900, 7
    feed.stats.malformed_frames, feed.stats.handler_errors = 3, 1
    feed.stats.reconnects_by_cause = {"stale": 2, "dropped": 5, "novel": 1}
    publisher.stats.published, publisher.stats.replaced = 880, 20
    publisher.stats.errors, publisher.stats.serialize_errors = 4, 2
    publisher.stats.maybe_duplicated = 11
    publisher.pending, feed.pending, feed.lag_seconds = 17, 9, 0.125
    publisher.stats.backpressure_lagging = 5
    control.stats.applied, control.stats.rejected = 10, 6
    control.stats.by_action = {"subscribe": 9, "list": 1, "invalid": 6}
    control.stats.redis_errors, control.stats.write_errors, control.stats.store_errors = 8, 3, 2
    text = metrics.render()

    assert value(text, "bridge_frames_total") == 120
    assert value(text, "bridge_ticks_total") == 900
    assert value(text, "bridge_heartbeats_total") == 7
    assert value(text, "bridge_malformed_frames_total") == 3
    assert value(text, "bridge_handler_errors_total") == 1
    assert value(text, "bridge_reconnects_total", cause="stale") == 2
    assert value(text, "bridge_reconnects_total", cause="dropped") == 5
    assert value(text, "bridge_reconnects_total", cause="novel") == 1
    for cause in CAUSES:  # every known cause is present from the start, for rate()
        assert ("bridge_reconnects_total", (("cause", cause),)) in samples(text)
    assert value(text, "bridge_ticks_published_total") == 880
    assert value(text, "bridge_ticks_replaced_total") == 20
    assert value(text, "bridge_ticks_dropped_total", reason="serialize_error") == 2
    assert value(text, "bridge_publish_errors_total") == 4
    assert value(text, "bridge_publish_maybe_duplicated_ticks_total") == 11
    assert value(text, "bridge_publish_pending") == 17
    assert value(text, "bridge_feed_pending") == 9
    assert value(text, "bridge_feed_lag_seconds") == 0.125
    assert value(text, "bridge_publish_backpressure_lagging_total") == 5
    assert value(text, "bridge_commands_total", result="applied") == 10
    assert value(text, "bridge_commands_total", result="rejected") == 6
    assert value(text, "bridge_commands_by_action_total", action="invalid") == 6
    assert value(text, "bridge_control_redis_errors_total") == 8
    assert value(text, "bridge_control_write_errors_total") == 3
    assert value(text, "bridge_commands_store_errors_total") == 2

    # Scraping again reads the live numbers: nothing was copied at registration.
    feed.stats.frames = 121
    assert value(metrics.render(), "bridge_frames_total") == 121


def test_state_connection_and_subscription_gauges() -> None:
    feed = FakeFeed(subscriptions={1: "ltp", 2: "full", 3: "full"}, connected=True)
    metrics, *_ = make_metrics(feed, state="reconnecting")
    text = metrics.render()
    assert value(text, "bridge_state", state="reconnecting") == 1
    assert value(text, "bridge_state", state="connected") == 0
    assert value(text, "bridge_websocket_connected") == 1
    assert value(text, "bridge_subscriptions", mode="ltp") == 1
    assert value(text, "bridge_subscriptions", mode="quote") == 0
    assert value(text, "bridge_subscriptions", mode="full") == 2
    assert value(text, "bridge_info", version=__version__) == 1


def test_last_frame_age_is_absent_until_a_frame_arrives() -> None:
    metrics, feed, *_ = make_metrics()
    assert not any(name == "bridge_last_frame_age_seconds" for name, _ in samples(metrics.render()))
    feed.stats.last_frame_at = time.time() - 12
    assert value(metrics.render(), "bridge_last_frame_age_seconds") == pytest.approx(12, abs=1)


def test_publish_latency_histogram_is_exposed() -> None:
    metrics, *_ = make_metrics()
    metrics.latency.observe(0.003)
    metrics.latency.observe(0.2)
    text = metrics.render()
    assert value(text, "bridge_publish_latency_seconds_bucket", le="0.005") == 1
    assert value(text, "bridge_publish_latency_seconds_bucket", le="+Inf") == 2
    assert value(text, "bridge_publish_latency_seconds_count") == 2
    assert value(text, "bridge_publish_latency_seconds_sum") == pytest.approx(0.203)


def test_silent_tokens_while_connected() -> None:
    clock = Clock()
    feed = FakeFeed(subscriptions={1: "quote", 2: "quote"}, connected=True)
    activity = TokenActivity(clock)
    collector = BridgeCollector(
        feed=feed,
        publisher=FakePublisher(),
        control=FakeControl(),
        state=lambda: "connected",
        activity=activity,
        latency=LatencyHistogram(),
        silent_after=60,
        clock=clock,
    )
    feed.stats.connected_since = time.time() - 1000  # connected long ago
    activity.observe([(1, b""), (2, b"")])
    clock.now += 90
    activity.observe([(2, b"")])
    families = {m.name: m for m in collector.collect()}
    got = {name: m.samples[0].value for name, m in families.items() if m.samples}
    assert got["bridge_silent_tokens"] == 1
    assert got["bridge_token_silence_max_seconds"] == pytest.approx(90)
    [sample] = families["bridge_token_silence_seconds"].samples  # which one: token 1
    assert sample.labels == {"token": "1", "mode": "quote"}
    assert sample.value == pytest.approx(90)

    feed.connected, feed.stats.connected_since = False, None  # nobody is silent offline
    families = {m.name: m for m in collector.collect()}
    assert families["bridge_silent_tokens"].samples[0].value == 0
    assert families["bridge_token_silence_seconds"].samples == []


def test_redis_write_age_and_process_metrics() -> None:
    writes = [0]
    metrics = BridgeMetrics(
        feed=FakeFeed(),
        publisher=FakePublisher(),
        control=FakeControl(),
        state=lambda: "connected",
        redis_counters=lambda: writes[0],
    )
    text = metrics.render()
    assert not any(n == "bridge_redis_last_write_age_seconds" for n, _ in samples(text))
    metrics.redis_writes.sample()
    writes[0] += 1
    metrics.redis_writes.sample()
    text = metrics.render()
    assert value(text, "bridge_redis_last_write_age_seconds") < 5
    assert value(text, "process_resident_memory_bytes") > 0


def test_each_bridge_has_its_own_registry() -> None:
    first, feed1, *_ = make_metrics()
    second, feed2, *_ = make_metrics()
    feed1.stats.frames, feed2.stats.frames = 1, 2
    assert value(first.render(), "bridge_frames_total") == 1
    assert value(second.render(), "bridge_frames_total") == 2


# -- with a real feed ------------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(tick_interval=0.02, heartbeat_interval=0.05, seed=3) as simulator:
        yield simulator


async def test_a_real_feed_shows_up_in_the_metrics(sim: Simulator) -> None:
    feed = KiteFeed(
        api_key="k", access_token="t", url=sim.url, liveness_timeout=2, base_wait=0.05, max_wait=0.1
    )
    metrics = BridgeMetrics(
        feed=feed,
        publisher=FakePublisher(),
        control=FakeControl(),
        state=lambda: "connected",
        process=False,
    )
    feed.on_tick = lambda _feed, ticks: metrics.activity.observe(
        (t.instrument_token, t) for t in ticks
    )
    await feed.subscribe_symbols([408065, 256265], "full")
    task = asyncio.create_task(feed.connect())
    try:
        await wait_until(lambda: feed.stats.ticks >= 4)
        await sim.send_binary(b"\x00\x01\x00\x05abc")  # claims a 5-byte packet, has 3
        await sim.send_text("not json")
        await wait_until(lambda: feed.stats.malformed_frames >= 2)
        await sim.drop()
        await wait_until(lambda: feed.stats.connections >= 2 and feed.connected)
        text = metrics.render()
    finally:
        await feed.close()
        await task
    assert value(text, "bridge_malformed_frames_total") == 2
    assert value(text, "bridge_ticks_total") >= 4
    assert value(text, "bridge_reconnects_total", cause="dropped") == 1
    assert value(text, "bridge_subscriptions", mode="full") == 2
    assert value(text, "bridge_websocket_connected") == 1
    assert value(text, "bridge_silent_tokens") == 0
    assert set(metrics.activity.last_tick) == {408065, 256265}
