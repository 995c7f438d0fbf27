"""Control consumer on fakeredis: every command kind, replies, dead letters, atomicity, re-queue.

fakeredis's BLMOVE never blocks, so the blocking path is covered on the real server at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import fakeredis
import orjson
import pytest
from helpers import wait_until
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from structlog.testing import capture_logs

from bridge.control import ControlConsumer
from bridge.kite.records import Mode
from bridge.subscriptions import SubscriptionStore

NS = "c"
CONTROL, PROCESSING, DEAD, SUBS = (
    f"{NS}:control",
    f"{NS}:control:processing",
    f"{NS}:control:dead",
    f"{NS}:subscriptions",
)


class FeedSpy:
    def __init__(self) -> None:
        self.calls: list[dict[int, Mode]] = []
        self.fail = False

    async def reconcile(self, desired: Mapping[int, Mode]) -> None:
        if self.fail:
            raise RuntimeError("websocket gone")
        self.calls.append(dict(desired))


# ``server`` and ``redis`` (fakeredis) come from tests/conftest.py.


@pytest.fixture
async def events(server: fakeredis.FakeServer) -> AsyncIterator[PubSub]:
    client = fakeredis.FakeAsyncRedis(server=server)
    pubsub = client.pubsub()
    await pubsub.subscribe(f"{NS}:events")
    await pubsub.get_message(timeout=0.1)
    yield pubsub
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()


@pytest.fixture
def feed() -> FeedSpy:
    return FeedSpy()


@pytest.fixture
def consumer(redis: Redis, feed: FeedSpy) -> ControlConsumer:
    return ControlConsumer(
        redis,
        NS,
        SubscriptionStore(redis, NS),
        default_mode="quote",
        reconcile=feed.reconcile,
        base_wait=0.001,
        max_wait=0.01,
        idle_sleep=0.001,
    )


async def stored(redis: Redis) -> dict[str, str]:
    raw = await redis.hgetall(SUBS)
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def take(redis: Redis) -> bytes:
    raw = await redis.lmove(CONTROL, PROCESSING, "LEFT", "RIGHT")
    assert isinstance(raw, bytes)
    return raw


async def run_one(redis: Redis, consumer: ControlConsumer, command: str | bytes) -> dict[str, Any]:
    """Push a command the way operators do, then take and handle exactly it."""
    await redis.rpush(CONTROL, command)
    raw = await take(redis)
    outcome = await consumer.handle(raw)
    assert outcome is not None
    assert await redis.llen(PROCESSING) == 0  # acknowledged
    result: dict[str, Any] = orjson.loads(outcome.result)
    return result


async def next_event(pubsub: PubSub) -> dict[str, Any]:
    async with asyncio.timeout(2):
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
            if msg is not None:
                event: dict[str, Any] = orjson.loads(msg["data"])
                return event


async def test_text_commands_of_every_kind(
    redis: Redis, consumer: ControlConsumer, feed: FeedSpy, events: PubSub
) -> None:
    result = await run_one(redis, consumer, "subscribe full 256265 408065")
    assert result["ok"] is True
    assert result["subscriptions"] == {"256265": "full", "408065": "full"}
    assert result["command"] == "subscribe full 256265 408065"
    assert await stored(redis) == {"256265": "full", "408065": "full"}
    assert await next_event(events) == result

    result = await run_one(redis, consumer, "SUBSCRIBE 738561")  # default mode, any case
    assert result["subscriptions"]["738561"] == "quote"
    result = await run_one(redis, consumer, "mode ltp 408065")
    assert (await stored(redis))["408065"] == "ltp"
    result = await run_one(redis, consumer, "unsubscribe 256265")
    assert await stored(redis) == {"408065": "ltp", "738561": "quote"}
    result = await run_one(redis, consumer, "list")
    assert result["ok"] is True
    assert result["subscriptions"] == {"408065": "ltp", "738561": "quote"}
    result = await run_one(redis, consumer, "unsubscribe all")
    assert result["subscriptions"] == {}
    assert await stored(redis) == {}
    # The feed followed every change but not the list.
    assert feed.calls == [
        {256265: "full", 408065: "full"},
        {256265: "full", 408065: "full", 738561: "quote"},
        {256265: "full", 408065: "ltp", 738561: "quote"},
        {408065: "ltp", 738561: "quote"},
        {},
    ]
    assert consumer.stats.applied == 6
    assert consumer.stats.by_action == {"subscribe": 2, "mode": 1, "unsubscribe": 2, "list": 1}


async def test_json_command_with_id_gets_a_reply_that_expires(
    redis: Redis, consumer: ControlConsumer, events: PubSub
) -> None:
    command = {"id": "a1", "action": "subscribe", "mode": "full", "tokens": [256265]}
    result = await run_one(redis, consumer, orjson.dumps(command))
    assert result["id"] == "a1"
    assert result["ok"] is True
    assert result["error"] is None
    assert set(result) == {"event", "id", "command", "ok", "error", "subscriptions", "at"}
    assert 295 <= await redis.ttl(f"{NS}:reply:a1") <= 300
    reply = await redis.blpop([f"{NS}:reply:a1"], 1)
    assert reply is not None
    assert orjson.loads(reply[1]) == result
    assert await next_event(events) == result

    result = await run_one(redis, consumer, '{"id": "l2", "action": "list"}')
    assert result["subscriptions"] == {"256265": "full"}
    assert await redis.llen(f"{NS}:reply:l2") == 1


async def test_rejected_command_changes_nothing_and_is_dead_lettered(
    redis: Redis, consumer: ControlConsumer, feed: FeedSpy
) -> None:
    await run_one(redis, consumer, "subscribe ltp 1 2")
    feed.calls.clear()
    # All-or-nothing: one bad token rejects the whole command.
    result = await run_one(
        redis, consumer, '{"id": "x", "action": "subscribe", "tokens": [3, "z"]}'
    )
    assert result["ok"] is False
    assert "bad token" in result["error"]
    assert result["subscriptions"] == {"1": "ltp", "2": "ltp"}
    assert await stored(redis) == {"1": "ltp", "2": "ltp"}
    assert feed.calls == []
    reply = await redis.lrange(f"{NS}:reply:x", 0, -1)
    assert len(reply) == 1
    assert orjson.loads(reply[0])["ok"] is False
    dead = [orjson.loads(item) for item in await redis.lrange(DEAD, 0, -1)]
    assert len(dead) == 1
    assert set(dead[0]) == {"command", "error", "at"}
    assert dead[0]["command"] == '{"id": "x", "action": "subscribe", "tokens": [3, "z"]}'
    assert dead[0]["error"] == result["error"]
    # mode on an unsubscribed token is rejected too.
    result = await run_one(redis, consumer, "mode full 1 9")
    assert result["ok"] is False
    assert "not subscribed" in result["error"]
    assert await stored(redis) == {"1": "ltp", "2": "ltp"}
    assert consumer.stats.rejected == 2


async def test_the_3000_limit_rejects_the_whole_command(
    redis: Redis, consumer: ControlConsumer
) -> None:
    await run_one(redis, consumer, "subscribe ltp " + " ".join(map(str, range(1, 2999))))
    result = await run_one(redis, consumer, "subscribe ltp 5000 5001 5002")
    assert result["ok"] is False
    assert "3000" in result["error"]
    assert len(await stored(redis)) == 2998


async def test_dead_letters_are_capped_at_the_newest_1000(
    redis: Redis, consumer: ControlConsumer
) -> None:
    for n in range(1005):
        await redis.rpush(CONTROL, f"bogus {n}")
    for _ in range(1005):
        await consumer.handle(await take(redis))
    dead = await redis.lrange(DEAD, 0, -1)
    assert len(dead) == 1000
    assert orjson.loads(dead[0])["command"] == "bogus 5"
    assert orjson.loads(dead[-1])["command"] == "bogus 1004"


async def test_a_flood_of_garbage_never_stops_the_consumer(
    redis: Redis, consumer: ControlConsumer
) -> None:
    garbage: list[bytes] = [
        b"",
        b"   ",
        b"\xff\xfe\x00",
        b"{",
        b"[1,2]",
        b'{"action": 5}',
        b"null",
        b"subscribe",
        b"subscribe weird 1",
        b"mode 1",
        b"unsubscribe all 1",
        b"x" * 70_000,
        b'{"id": "' + b"a" * 100 + b'", "action": "list"}',
    ]
    for item in garbage:
        await redis.rpush(CONTROL, item)
    await redis.rpush(CONTROL, "subscribe ltp 42")
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await wait_until(lambda: consumer.stats.applied == 1)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert consumer.stats.rejected == len(garbage)
    assert await stored(redis) == {"42": "ltp"}
    assert await redis.llen(DEAD) == len(garbage)
    assert await redis.llen(PROCESSING) == 0


async def test_parser_bug_is_dead_lettered_not_a_poison_pill(
    redis: Redis, consumer: ControlConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> Any:
        raise KeyError("bug")

    monkeypatch.setattr("bridge.control.parse_command", broken)
    with capture_logs() as logs:
        result = await run_one(redis, consumer, "subscribe 1")
    assert result["ok"] is False
    assert result["error"] == "internal error: KeyError"
    assert any(e["event"] == "command_internal_error" for e in logs)
    assert await redis.llen(DEAD) == 1


async def test_processing_is_requeued_at_the_head_in_original_order(
    redis: Redis, consumer: ControlConsumer
) -> None:
    await redis.rpush(PROCESSING, "p1", "p2", "p3")
    await redis.rpush(CONTROL, "c1", "c2")
    assert await consumer.requeue() == 3
    assert await redis.lrange(CONTROL, 0, -1) == [b"p1", b"p2", b"p3", b"c1", b"c2"]
    assert await redis.llen(PROCESSING) == 0
    assert await consumer.requeue() == 0


async def test_consumer_runs_commands_in_fifo_order(
    redis: Redis, consumer: ControlConsumer
) -> None:
    await redis.rpush(CONTROL, "subscribe ltp 1", "mode full 1", "subscribe quote 2")
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await wait_until(lambda: consumer.stats.applied == 3)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert await stored(redis) == {"1": "full", "2": "quote"}


async def test_redis_failure_at_commit_applies_nothing_and_retries_to_the_same_effect(
    redis: Redis,
    server: fakeredis.FakeServer,
    consumer: ControlConsumer,
    monkeypatch: pytest.MonkeyPatch,
    feed: FeedSpy,
) -> None:
    await run_one(redis, consumer, "subscribe ltp 1")
    feed.calls.clear()
    real_commit = consumer._commit
    attempts = 0

    async def flaky_commit(raw: bytes, outcome: Any) -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            server.connected = False  # the EXEC never reaches Redis
            try:
                await real_commit(raw, outcome)
            finally:
                server.connected = True
        else:
            # Nothing of the failed attempts was applied.
            assert await stored(redis) == {"1": "ltp"}
            assert await redis.llen(PROCESSING) == 1
            await real_commit(raw, outcome)

    monkeypatch.setattr(consumer, "_commit", flaky_commit)
    with capture_logs() as logs:
        result = await run_one(redis, consumer, '{"id": "r", "action": "subscribe", "tokens": [2]}')
    assert attempts == 3
    assert result["ok"] is True
    assert await stored(redis) == {"1": "ltp", "2": "quote"}
    assert await redis.llen(f"{NS}:reply:r") == 1
    assert feed.calls == [{1: "ltp", 2: "quote"}]
    assert consumer.stats.redis_errors == 2
    names = [e["event"] for e in logs]
    assert names.count("redis_unavailable") == 1
    assert names.count("redis_recovered") == 1


async def test_a_replayed_commit_has_the_same_effect(
    redis: Redis, consumer: ControlConsumer
) -> None:
    """EXEC reached Redis but its reply was lost: the retry re-sends the same transaction."""
    await redis.rpush(CONTROL, '{"id": "d", "action": "unsubscribe", "tokens": [1]}')
    await redis.hset(SUBS, mapping={"1": "ltp", "2": "full"})
    raw = await take(redis)
    outcome = consumer.decide(raw, {1: "ltp", 2: "full"})
    await consumer._commit(raw, outcome)
    await consumer._commit(raw, outcome)
    assert await stored(redis) == {"2": "full"}
    assert await redis.llen(PROCESSING) == 0
    replies = await redis.lrange(f"{NS}:reply:d", 0, -1)
    assert len(replies) == 2
    assert replies[0] == replies[1]


async def test_outage_while_taking_is_retried_and_stop_is_prompt(
    redis: Redis, server: fakeredis.FakeServer, consumer: ControlConsumer
) -> None:
    server.connected = False
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await wait_until(lambda: consumer.stats.redis_errors >= 3)
    server.connected = True
    await redis.rpush(CONTROL, "subscribe 7")
    await wait_until(lambda: consumer.stats.applied == 1)
    stop.set()
    await asyncio.wait_for(task, 1)
    assert await stored(redis) == {"7": "quote"}


async def test_stop_during_an_outage_leaves_the_command_in_processing(
    redis: Redis, server: fakeredis.FakeServer, consumer: ControlConsumer
) -> None:
    await redis.rpush(PROCESSING, "subscribe 9")
    stop = asyncio.Event()
    server.connected = False
    task = asyncio.create_task(consumer.handle(b"subscribe 9", stop))
    await wait_until(lambda: consumer.stats.redis_errors >= 1)
    stop.set()
    assert await asyncio.wait_for(task, 1) is None
    server.connected = True
    assert await redis.lrange(PROCESSING, 0, -1) == [b"subscribe 9"]
    assert await stored(redis) == {}


async def test_reconcile_failure_is_logged_and_redis_keeps_the_new_set(
    redis: Redis, consumer: ControlConsumer, feed: FeedSpy
) -> None:
    feed.fail = True
    with capture_logs() as logs:
        result = await run_one(redis, consumer, "subscribe 5")
    assert result["ok"] is True
    assert await stored(redis) == {"5": "quote"}
    assert any(e["event"] == "feed_reconcile_failed" for e in logs)


@pytest.mark.redis
async def test_blocking_take_on_a_real_server(redis_url: str, namespace: str) -> None:
    client = Redis.from_url(redis_url, socket_timeout=5)
    feed = FeedSpy()
    consumer = ControlConsumer(
        client,
        namespace,
        SubscriptionStore(client, namespace),
        default_mode="ltp",
        reconcile=feed.reconcile,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.sleep(0.2)  # the consumer is now blocked in BLMOVE
        await client.rpush(
            f"{namespace}:control", '{"id": "b", "action": "subscribe", "tokens": [11]}'
        )
        reply = await client.blpop([f"{namespace}:reply:b"], 2)
        assert reply is not None
        assert orjson.loads(reply[1])["subscriptions"] == {"11": "ltp"}
        await wait_until(lambda: feed.calls == [{11: "ltp"}])  # the feed follows Redis
        # Stop is honoured while blocked, well before the 1 s block timeout.
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        stop.set()
        await asyncio.wait_for(task, 2)
        assert loop.time() - started < 0.9
    finally:
        stop.set()
        await asyncio.wait_for(task, 2)
        await client.delete(
            f"{namespace}:subscriptions", f"{namespace}:reply:b", f"{namespace}:control:processing"
        )
        await client.aclose()
