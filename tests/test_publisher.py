"""Publisher: one round trip per batch, bounded hand-off, conflation, outage recovery."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import fakeredis
import orjson
import pytest
import structlog
from helpers import MakeRedis, ltp, quote, wait_until
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bridge.kite.records import Tick
from bridge.payload import tick_json
from bridge.publisher import Publisher
from bridge.redis_client import Outage, Recovery, create_redis
from bridge.transports import FencedTransport, PipelineTransport

NS = "t"


# ``server`` and ``redis`` (fakeredis) come from tests/conftest.py.


@pytest.fixture
async def listener(server: fakeredis.FakeServer) -> AsyncIterator[PubSub]:
    client = fakeredis.FakeAsyncRedis(server=server)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{NS}:*")
    await pubsub.get_message(timeout=0.1)  # the psubscribe confirmation
    yield pubsub
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()


async def received(pubsub: PubSub, count: int, within: float = 2.0) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    async with asyncio.timeout(within):
        while len(out) < count:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if msg is not None:
                out.append((msg["channel"].decode(), msg["data"]))
    # Nothing more than expected.
    assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05) is None
    return out


class CountingTransport:
    """The real pipeline transport, counting round trips and messages per round trip."""

    def __init__(self, redis: Redis) -> None:
        self.inner = PipelineTransport(redis)
        self.sizes: list[int] = []

    async def __call__(self, flat: list[bytes], /) -> int:
        self.sizes.append(len(flat) // 2)
        return await self.inner(flat)


def make(redis: Redis, **kwargs: Any) -> tuple[Publisher, CountingTransport]:
    transport = CountingTransport(redis)
    options: dict[str, Any] = {"base_wait": 0.001, "max_wait": 0.01, **kwargs}
    return Publisher(redis, NS, transport=transport, **options), transport


async def test_frames_that_accumulate_go_out_in_one_pipeline(
    redis: Redis, listener: PubSub, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipelines = 0
    real_pipeline = redis.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        nonlocal pipelines
        pipelines += 1
        return real_pipeline(*args, **kwargs)

    monkeypatch.setattr(redis, "pipeline", counting_pipeline)
    publisher, transport = make(redis)
    frames: list[list[Tick]] = [[quote(1, 10.0), ltp(2, 20.0)], [quote(1, 11.0)], [ltp(3, 30.0)]]
    for frame in frames:
        publisher.submit(frame)
    assert publisher.pending == 4
    assert await publisher.send_once()
    assert pipelines == 1
    assert transport.sizes == [4]
    got = await received(listener, 4)
    expected = [(f"{NS}:ticks:{t.instrument_token}", tick_json(t)) for f in frames for t in f]
    assert got == expected  # order kept within and across frames
    assert orjson.loads(got[0][1])["last_price"] == 10.0
    stats = publisher.stats
    assert (stats.published, stats.batches, stats.replaced, stats.errors) == (4, 1, 0, 0)
    assert stats.last_batch_size == 4
    assert publisher.pending == 0


async def test_batch_max_bounds_round_trips_but_never_splits_a_frame(redis: Redis) -> None:
    publisher, transport = make(redis, batch_max=4)
    for size in (1, 2, 1, 5, 3, 2):  # frames of these many ticks
        publisher.submit([ltp(token) for token in range(1, size + 1)])
    while publisher.pending:
        assert await publisher.send_once()
    # Whole frames while they fit in 4; a 5-tick frame goes alone, whole.
    assert transport.sizes == [4, 5, 3, 2]
    assert publisher.stats.batches == 4
    assert publisher.stats.published == 14


async def test_behind_a_failed_round_trip_the_backlog_is_conflated(
    redis: Redis, listener: PubSub
) -> None:
    """Once a round trip fails, the ticks waiting are already stale: when Redis answers again
    each instrument's newest goes out, not seconds of old prices replayed as if live."""
    transport = GatedTransport(redis)
    publisher = Publisher(
        redis, NS, transport=transport, batch_max=3, base_wait=0.001, max_wait=0.01
    )
    sizes: list[int] = []
    inner = transport.inner

    async def counting(flat: list[bytes], /) -> int:
        sizes.append(len(flat) // 2)
        return await inner(flat)

    transport.inner = counting  # type: ignore[assignment]
    publisher.submit_payloads(payloads(0, 2))  # tokens 1, 2
    publisher.submit_payloads(payloads(2, 4))  # tokens 3, 4, 5, 1 (newer)
    transport.fail = True
    assert not await publisher.send_once()  # the 2-tick frame fails and goes back
    publisher.submit_payloads(payloads(6, 2))  # tokens 2, 3 again, during the outage
    transport.fail = False
    while publisher.pending:
        assert await publisher.send_once()
    assert sizes == [3, 2]
    got = dict(await received(listener, 5))
    assert got == {
        f"{NS}:ticks:{token}": b'{"n":%d}' % n
        for token, n in [(1, 5), (2, 6), (3, 7), (4, 3), (5, 4)]
    }
    stats = publisher.stats
    assert (stats.published, stats.replaced, stats.errors) == (5, 3, 1)


async def test_overflow_keeps_only_the_newest_tick_per_token(
    redis: Redis, listener: PubSub
) -> None:
    publisher, _ = make(redis, max_pending=4)
    publisher.submit([ltp(1, 1.0), ltp(2, 2.0), ltp(1, 1.1)])
    assert publisher.stats.replaced == 0  # still under the bound: arrival order kept
    publisher.submit([ltp(2, 2.1), ltp(1, 1.2)])  # 5 > 4: conflate
    assert publisher.pending == 2
    assert publisher.stats.replaced == 3
    publisher.submit([ltp(1, 1.3), ltp(3, 3.0)])  # while conflated, each newer tick replaces
    assert publisher.pending == 3
    assert publisher.stats.replaced == 4
    assert await publisher.send_once()
    got = {
        channel: orjson.loads(data)["last_price"] for channel, data in await received(listener, 3)
    }
    assert got == {f"{NS}:ticks:1": 1.3, f"{NS}:ticks:2": 2.1, f"{NS}:ticks:3": 3.0}
    # Drained: back to keeping every tick in order.
    publisher.submit([ltp(1, 5.0), ltp(1, 5.1)])
    assert publisher.pending == 2
    assert publisher.stats.replaced == 4


async def test_memory_stays_bounded_however_long_redis_is_down(
    redis: Redis, server: fakeredis.FakeServer
) -> None:
    publisher, _ = make(redis, max_pending=100)
    server.connected = False
    for round_ in range(50):
        publisher.submit([ltp(token, float(round_)) for token in range(1, 21)])
        if round_ % 10 == 0:
            assert not await publisher.send_once()
    assert publisher.pending <= 100
    assert publisher.stats.replaced + publisher.pending == 50 * 20
    assert publisher.stats.errors == 5


async def test_events_and_orders_go_first_to_their_channels(redis: Redis, listener: PubSub) -> None:
    publisher, transport = make(redis)
    publisher.submit([ltp(7)])
    publisher.publish_event(b'{"event":"connected"}')
    publisher.publish_order(b'{"order_id":"1"}')
    assert await publisher.send_once()
    assert transport.sizes == [3]
    got = await received(listener, 3)
    assert got[0] == (f"{NS}:events", b'{"event":"connected"}')
    assert got[1] == (f"{NS}:orders", b'{"order_id":"1"}')
    assert got[2][0] == f"{NS}:ticks:7"
    assert publisher.stats.events_published == 2
    assert publisher.stats.published == 1


async def test_event_queue_is_bounded_and_drops_the_oldest(redis: Redis, listener: PubSub) -> None:
    publisher, _ = make(redis, max_events=3)
    for n in range(5):
        publisher.publish_event(b"%d" % n)
    assert publisher.stats.events_dropped == 2
    assert await publisher.send_once()
    assert [data for _, data in await received(listener, 3)] == [b"2", b"3", b"4"]


async def test_outage_keeps_pending_logs_once_and_recovers(
    redis: Redis, server: fakeredis.FakeServer, listener: PubSub
) -> None:
    publisher, _ = make(redis)
    publisher.publish_event(b"e1")
    publisher.submit([ltp(1, 1.0)])
    server.connected = False
    assert publisher.failing_for() is None
    with capture_logs() as logs:
        for _ in range(3):
            assert not await publisher.send_once()
        publisher.submit([ltp(2, 2.0)])
        assert publisher.pending == 3  # nothing lost, order kept
        assert publisher.stats.errors == 3
        assert publisher.stats.maybe_duplicated == 3  # tick 1, in each of the three attempts
        # Failing since the first failure, and why: what /readyz and the status show.
        failing = publisher.failing_for()
        assert failing is not None
        assert failing > 0
        since, error = publisher.failing_since_at, publisher.last_error
        assert since is not None
        assert error is not None
        assert error.startswith("ConnectionError")
        server.connected = True
        assert await publisher.send_once()
    assert publisher.failing_for() is None
    assert (publisher.failing_since_at, publisher.last_error) == (None, None)
    names = [entry["event"] for entry in logs]
    assert names.count("redis_unavailable") == 1
    assert names.count("redis_recovered") == 1
    recovered = next(entry for entry in logs if entry["event"] == "redis_recovered")
    assert recovered["failures"] == 3
    got = await received(listener, 3)
    assert [channel for channel, _ in got] == [f"{NS}:events", f"{NS}:ticks:1", f"{NS}:ticks:2"]
    assert publisher.stats.published == 2
    assert publisher.pending == 0


async def test_a_publisher_deep_in_its_backoff_sends_as_soon_as_another_loop_reaches_redis(
    redis: Redis, server: fakeredis.FakeServer, listener: PubSub
) -> None:
    recovery = Recovery()
    publisher, _ = make(redis, base_wait=30, max_wait=60, recovery=recovery)
    status = Outage("status", structlog.get_logger("test"), recovery=recovery)
    publisher.submit([ltp(1, 1.0)])
    server.connected = False
    status.failed(ConnectionError("down"))
    sending = asyncio.create_task(publisher.send_once())  # fails, then waits 15-30 s
    await wait_until(lambda: publisher.stats.errors == 1, within=2)
    server.connected = True
    status.recovered()  # the status writer's next write went through
    assert await asyncio.wait_for(sending, 5) is False
    assert await publisher.send_once()
    got = await received(listener, 1)
    assert [channel for channel, _ in got] == [f"{NS}:ticks:1"]


async def test_a_batch_held_back_by_the_lease_fence_cannot_be_a_duplicate(redis: Redis) -> None:
    confirmed = [False]
    transport = FencedTransport(CountingTransport(redis), lambda: confirmed[0])
    publisher = Publisher(redis, NS, transport=transport, base_wait=0.001, max_wait=0.01)
    publisher.submit([ltp(1, 1.0), ltp(2, 2.0)])
    assert not await publisher.send_once()
    assert (publisher.stats.errors, publisher.stats.maybe_duplicated) == (1, 0)
    assert publisher.last_error is not None
    assert publisher.last_error.startswith("NotLeaseholder")
    confirmed[0] = True
    assert await publisher.send_once()
    assert publisher.stats.published == 2


async def test_failed_batch_merges_into_a_conflated_backlog_without_going_back_in_time(
    redis: Redis, server: fakeredis.FakeServer, listener: PubSub
) -> None:
    publisher, _ = make(redis, max_pending=2)
    publisher.submit([ltp(1, 1.0)])
    server.connected = False
    task = asyncio.create_task(publisher.send_once())
    await asyncio.sleep(0)  # the batch with ltp(1, 1.0) is now in flight
    publisher.submit([ltp(1, 1.5), ltp(2, 2.0), ltp(1, 1.6)])  # overflow: conflated
    assert not await task
    # The failed (older) tick of token 1 was dropped in favour of the newer one.
    assert publisher.pending == 2
    assert publisher.stats.replaced == 2
    server.connected = True
    assert await publisher.send_once()
    got = {
        channel: orjson.loads(data)["last_price"] for channel, data in await received(listener, 2)
    }
    assert got == {f"{NS}:ticks:1": 1.6, f"{NS}:ticks:2": 2.0}


async def test_a_tick_that_cannot_be_serialised_is_dropped_alone(
    redis: Redis, listener: PubSub
) -> None:
    def serialize(tick: Tick) -> bytes:
        if tick.instrument_token == 2:
            raise ValueError("boom")
        return tick_json(tick)

    publisher, _ = make(redis, serialize=serialize)
    with capture_logs() as logs:  # ticks are serialised as they are handed off
        publisher.submit([ltp(1), ltp(2), ltp(3)])
    assert await publisher.send_once()
    assert [c for c, _ in await received(listener, 2)] == [f"{NS}:ticks:1", f"{NS}:ticks:3"]
    assert publisher.stats.serialize_errors == 1
    assert publisher.stats.published == 2
    assert any(entry["event"] == "tick_serialize_failed" for entry in logs)


async def test_running_sender_publishes_and_flush_waits_for_it(
    redis: Redis, listener: PubSub
) -> None:
    publisher, _ = make(redis)
    publisher.start()
    try:
        publisher.submit([ltp(1)])
        await wait_until(lambda: publisher.stats.published == 1)
        publisher.submit([ltp(2), ltp(3)])
        publisher.publish_event(b"bye")
        assert await publisher.flush(2.0)
        assert publisher.pending == 0
        assert publisher.stats.published == 3
        assert len(await received(listener, 4)) == 4
    finally:
        assert await publisher.close(1.0)


async def test_flush_gives_up_after_its_timeout_while_redis_is_down(
    redis: Redis, server: fakeredis.FakeServer
) -> None:
    publisher, _ = make(redis)
    publisher.start()
    server.connected = False
    publisher.submit([ltp(1)])
    assert not await publisher.flush(0.1)
    assert publisher.pending == 1
    assert not await publisher.close(0.05)
    assert publisher.stats.errors >= 1


def test_bounds_must_be_positive(redis: Redis) -> None:
    with pytest.raises(ValueError, match="positive"):
        Publisher(redis, NS, max_pending=0)


@pytest.mark.redis
@pytest.mark.parametrize("transport", ["unreplied", "lua", "pipeline"])
async def test_real_redis_transports_publish_and_count_unheard(
    redis_url: str, namespace: str, transport: str
) -> None:
    client = Redis.from_url(redis_url)
    sub_client = Redis.from_url(redis_url)
    pubsub = sub_client.pubsub()
    try:
        await pubsub.subscribe(f"{namespace}:ticks:1")
        await pubsub.get_message(timeout=1.0)
        publisher = Publisher(client, namespace, transport=transport)  # type: ignore[arg-type]
        await client.script_flush()  # the Lua transport must reload its script (NOSCRIPT)
        publisher.submit([quote(1, 1.5), ltp(2), quote(1, 1.6)])
        assert await publisher.send_once()
        got: list[float] = []
        async with asyncio.timeout(2):
            while len(got) < 2:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if msg is not None:
                    got.append(orjson.loads(msg["data"])["last_price"])
        assert got == [1.5, 1.6]
        assert publisher.stats.unheard == 1  # nobody listens on token 2
        assert publisher.stats.published == 3
        await publisher.close()
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await sub_client.aclose()
        await client.aclose()


async def test_lua_transport_falls_back_to_a_pipeline_where_scripting_is_refused(
    redis: Redis, listener: PubSub
) -> None:
    publisher = Publisher(redis, NS, transport="lua")  # fakeredis has no EVALSHA
    publisher.submit([ltp(1), ltp(2)])
    with capture_logs() as logs:
        assert await publisher.send_once()
        publisher.submit([ltp(3)])
        assert await publisher.send_once()
    assert [e["event"] for e in logs].count("publish_transport_fallback") == 1
    assert [c for c, _ in await received(listener, 3)] == [f"{NS}:ticks:{t}" for t in (1, 2, 3)]


# -- backpressure -------------------------------------------------------------------------------


class GatedTransport:
    """Publishes through a real pipeline, but each round trip waits for ``gate`` to open."""

    def __init__(self, redis: Redis) -> None:
        self.inner = PipelineTransport(redis)
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    async def __call__(self, flat: list[bytes], /) -> int:
        await self.gate.wait()
        if self.fail:
            raise RedisConnectionError("down")
        return await self.inner(flat)


def payloads(start: int, count: int) -> list[tuple[int, bytes]]:
    return [(1 + n % 5, b'{"n":%d}' % n) for n in range(start, start + count)]


async def test_submit_payloads_publishes_ready_json_in_order(
    redis: Redis, listener: PubSub
) -> None:
    publisher, _ = make(redis)
    publisher.submit_payloads(payloads(0, 3))
    publisher.submit_payloads([])
    assert await publisher.send_once()
    got = await received(listener, 3)
    assert got == [(f"{NS}:ticks:{t}", p) for t, p in payloads(0, 3)]


async def test_backpressure_waits_while_redis_drains_the_backlog_and_loses_nothing(
    redis: Redis, listener: PubSub
) -> None:
    transport = GatedTransport(redis)
    publisher = Publisher(
        redis, NS, transport=transport, max_pending=100, high_water=40, low_water=10, batch_max=8
    )
    publisher.submit_payloads(payloads(0, 40))
    assert publisher.backpressure() is None  # at high water: go on
    publisher.submit_payloads(payloads(40, 10))
    transport.gate.clear()
    publisher.start()
    wait = publisher.backpressure()
    assert wait is not None
    waiter = asyncio.ensure_future(wait)
    await asyncio.sleep(0.05)
    assert not waiter.done()  # Redis is slow, not failing, not stalled beyond the timeout
    transport.gate.set()
    await asyncio.wait_for(waiter, 2)
    assert publisher.pending <= 10
    await publisher.close()
    assert len(await received(listener, 50)) == 50
    stats = publisher.stats
    assert (stats.published, stats.replaced, stats.backpressure_waits) == (50, 0, 1)
    assert stats.backpressure_stalls == 0


async def test_a_slow_redis_stops_pacing_a_feed_max_lag_behind(redis: Redis) -> None:
    """Pacing helps when the bridge's CPU is the limit; with Redis slow it only delays."""
    transport = GatedTransport(redis)
    publisher = Publisher(
        redis,
        NS,
        transport=transport,
        max_pending=1000,
        high_water=40,
        low_water=10,
        batch_max=8,
        stall_timeout=5,
        max_lag=0.2,
        slow_round_trip=0.05,
    )
    lag = 0.0
    publisher.submit_payloads(payloads(0, 50))
    # Redis fast so far (no round trip yet): a lagging feed is paced all the same.
    early = publisher.backpressure(lambda: 0.3)
    assert isinstance(early, Coroutine)
    early.close()
    # A round trip in flight for longer than slow_round_trip: Redis is the slow part.
    transport.gate.clear()
    publisher.start()
    wait = publisher.backpressure(lambda: lag)
    assert wait is not None  # not lagging yet: pace
    waiter = asyncio.ensure_future(wait)
    await asyncio.sleep(0.08)
    assert not waiter.done()
    assert publisher.backpressure(lambda: 0.3) is None  # slow and lagging: go on
    lag = 0.25
    publisher._progress.set()  # what each landed (or failed) batch does
    await asyncio.wait_for(waiter, 1)  # the wait in progress ends too, without a stall
    stats = publisher.stats
    assert (stats.backpressure_waits, stats.backpressure_lagging) == (1, 2)
    assert stats.backpressure_stalls == 0
    transport.gate.set()
    await publisher.close()
    assert stats.published == 50


async def test_a_stalled_redis_ends_the_wait_and_conflation_takes_over(redis: Redis) -> None:
    transport = GatedTransport(redis)
    publisher = Publisher(
        redis,
        NS,
        transport=transport,
        max_pending=60,
        high_water=20,
        low_water=5,
        stall_timeout=0.1,
    )
    transport.gate.clear()  # the first round trip hangs
    publisher.start()
    publisher.submit_payloads(payloads(0, 30))
    wait = publisher.backpressure()
    assert wait is not None
    with capture_logs() as logs:
        await asyncio.wait_for(wait, 1)  # gave up after stall_timeout
    assert publisher.stats.backpressure_stalls == 1
    assert [e["event"] for e in logs] == ["publish_stalled"]
    # Stalled: the feed is not asked to wait again; the backlog conflates instead.
    publisher.submit_payloads(payloads(30, 100))
    assert publisher.backpressure() is None
    assert publisher.stats.replaced > 0
    assert publisher.pending <= 60 + 5
    # Redis answers again: once the backlog is down to low water, waiting resumes.
    transport.gate.set()
    await publisher.flush(2)
    publisher.submit_payloads(payloads(200, 30))
    again = publisher.backpressure()
    assert again is not None
    await asyncio.wait_for(again, 2)
    await publisher.close()
    stats = publisher.stats
    assert stats.published + stats.replaced == 160


async def test_an_outage_never_makes_the_feed_wait(redis: Redis) -> None:
    transport = GatedTransport(redis)
    transport.fail = True
    publisher = Publisher(
        redis,
        NS,
        transport=transport,
        max_pending=50,
        high_water=10,
        stall_timeout=5,
        base_wait=0.01,
        max_wait=0.02,
    )
    publisher.start()
    publisher.submit_payloads(payloads(0, 20))
    wait = publisher.backpressure()
    assert wait is not None
    await asyncio.wait_for(wait, 1)  # the first failure ends the wait, long before 5 s
    await asyncio.sleep(0.05)
    publisher.submit_payloads(payloads(20, 20))
    assert publisher.backpressure() is None  # still failing: read on, conflate past 50
    assert publisher.stats.backpressure_stalls == 0
    transport.fail = False
    assert await publisher.flush(2)
    await publisher.close()
    assert publisher.stats.published + publisher.stats.replaced == 40


def test_water_marks_must_be_ordered(redis: Redis) -> None:
    with pytest.raises(ValueError, match="low_water <= high_water"):
        Publisher(redis, NS, high_water=10, low_water=20)
    with pytest.raises(ValueError, match="high_water <= max_pending"):
        Publisher(redis, NS, max_pending=10, high_water=20)


@pytest.mark.parametrize(("keepalive", "errors"), [(0.3, 0), (None, 1)])
async def test_an_idle_connection_is_kept_alive_past_the_servers_idle_timeout(
    private_redis: MakeRedis, keepalive: float | None, errors: int
) -> None:
    """Redis's ``timeout 1`` closes a connection idle for a second; the keepalive prevents it.

    Without a keepalive (the second case) the first publish after the idle spell fails and is
    retried: the failure this feature exists to avoid, shown to be real.
    """
    server = await private_redis("--timeout", "1")
    client = create_redis(server.url)
    publisher = Publisher(client, NS, keepalive=keepalive)
    publisher.start()
    try:
        publisher.publish_event(b'{"n": 1}')
        assert await publisher.flush(5)
        await asyncio.sleep(2.5)  # idle well past the server's timeout
        publisher.publish_event(b'{"n": 2}')
        assert await publisher.flush(5)
        assert publisher.stats.events_published == 2
        assert publisher.stats.errors == errors
        assert (publisher.stats.keepalives >= 5) is (keepalive is not None)
    finally:
        await publisher.close()
        await client.aclose()
