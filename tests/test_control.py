"""Control consumer on fakeredis: every command kind, replies, dead letters, atomicity, re-queue.

fakeredis's BLMOVE never blocks, so the blocking path is covered on the real server at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import fakeredis
import orjson
import pytest
from helpers import Calls, MakeRedis, wait_until
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from structlog.testing import capture_logs

from bridge.control import ControlConsumer, WriteFailure
from bridge.kite.records import Mode
from bridge.redis_client import create_redis
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


async def stored(redis: Redis, key: str = SUBS) -> dict[str, str]:
    raw = await redis.hgetall(key)
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

    # Rejected: well-formed ones keep their action, only unparseable ones count as invalid.
    result = await run_one(redis, consumer, "mode ltp 99")  # not subscribed
    assert result["ok"] is False
    result = await run_one(redis, consumer, "subscribe full " + " ".join(map(str, range(1, 3002))))
    assert result["ok"] is False
    result = await run_one(redis, consumer, "subscribe sideways 1")
    assert result["ok"] is False
    assert consumer.stats.rejected == 3
    assert consumer.stats.by_action == {
        "subscribe": 3,
        "mode": 2,
        "unsubscribe": 2,
        "list": 1,
        "invalid": 1,
    }


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


async def run_losing_the_first_move(
    redis: Redis,
    consumer: ControlConsumer,
    monkeypatch: pytest.MonkeyPatch,
    lose: Callable[
        [Callable[..., Awaitable[Any]], tuple[Any, ...], dict[str, Any]], Awaitable[Any]
    ],
) -> int:
    """Two commands through ``consumer.run``, the reply of the first BLMOVE that moved one
    replaced by what ``lose(blmove, args, kwargs)`` does; returns how often that happened."""
    await redis.rpush(CONTROL, "subscribe ltp 1", "subscribe full 2")
    real_blmove = redis.blmove
    lost = 0

    async def blmove(*args: Any, **kwargs: Any) -> Any:
        nonlocal lost
        result = await real_blmove(*args, **kwargs)
        if lost == 0 and result is not None:
            lost += 1
            return await lose(real_blmove, args, kwargs)
        return result

    monkeypatch.setattr(redis, "blmove", blmove)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await wait_until(lambda: consumer.stats.applied == 2)
    stop.set()
    await asyncio.wait_for(task, 2)
    return lost


async def test_nothing_is_taken_or_requeued_while_the_lease_is_unconfirmed(
    redis: Redis, feed: FeedSpy
) -> None:
    """A holder cut off longer than its lease may have been replaced: the new holder's command
    in processing is not ours to re-queue, and the queue not ours to take from."""
    confirmed = [False]
    consumer = ControlConsumer(
        redis,
        NS,
        SubscriptionStore(redis, NS),
        default_mode="quote",
        reconcile=feed.reconcile,
        idle_sleep=0.001,
        gate=lambda: confirmed[0],
    )
    await redis.rpush(PROCESSING, "subscribe ltp 9")  # the other holder's, in flight
    await redis.rpush(CONTROL, "subscribe ltp 1")
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(0.1)
    assert await redis.lrange(PROCESSING, 0, -1) == [b"subscribe ltp 9"]
    assert await redis.lrange(CONTROL, 0, -1) == [b"subscribe ltp 1"]
    confirmed[0] = True  # the lease is ours again (or the other holder has gone)
    await wait_until(lambda: consumer.stats.applied == 2)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert await stored(redis) == {"1": "ltp", "9": "ltp"}


async def test_a_command_moved_by_a_blmove_whose_reply_was_lost_is_not_stranded(
    redis: Redis, consumer: ControlConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis moved the command, then the connection died before the reply: re-queued."""

    async def connection_reset(*_: Any) -> Any:
        raise RedisConnectionError("connection reset after the move")

    lost = await run_losing_the_first_move(redis, consumer, monkeypatch, connection_reset)
    assert lost == 1
    assert consumer.stats.requeued == 1
    assert await stored(redis) == {"1": "ltp", "2": "full"}
    assert await redis.llen(PROCESSING) == 0
    assert await redis.llen(CONTROL) == 0


async def test_a_blmove_whose_reply_was_silently_lost_is_not_stranded_either(
    redis: Redis, consumer: ControlConsumer, feed: FeedSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hung server times the BLMOVE out; redis-py retries it on a new connection and no error
    reaches us, but the hung server still runs the first one when it wakes: the command it
    moved sits in processing with nobody handling it. It must be picked up, not stranded."""

    async def silent_retry(
        blmove: Callable[..., Awaitable[Any]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return await blmove(*args, **kwargs)  # the silent retry's reply instead

    lost = await run_losing_the_first_move(redis, consumer, monkeypatch, silent_retry)
    assert lost == 1
    assert consumer.stats.requeued == 2  # the orphan and the command taken after it, in order
    assert consumer.stats.redis_errors == 0  # nothing was reported: found by looking
    assert feed.calls == [{1: "ltp"}, {1: "ltp", 2: "full"}]  # in the order they were pushed
    assert await stored(redis) == {"1": "ltp", "2": "full"}
    assert await redis.llen(PROCESSING) == 0
    assert await redis.llen(CONTROL) == 0


async def test_an_orphan_older_than_the_taken_command_is_applied_first(
    redis: Redis, consumer: ControlConsumer, feed: FeedSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis hangs while the consumer blocks; redis-py times the BLMOVE out and retries it on a
    new connection. When Redis wakes, the abandoned BLMOVE takes X and the retry takes Y, pushed
    after X. Applying Y then X would undo the operator's unsubscribe."""
    await redis.rpush(CONTROL, "subscribe ltp 1", "unsubscribe 1", "subscribe full 2")
    real_blmove = redis.blmove
    orphaned = 0

    async def blmove(*args: Any, **kwargs: Any) -> Any:
        nonlocal orphaned
        if orphaned == 0:
            orphaned += 1  # the abandoned BLMOVE, run by the server after the requeue
            assert await redis.lmove(CONTROL, PROCESSING, "LEFT", "RIGHT") is not None
        return await real_blmove(*args, **kwargs)

    monkeypatch.setattr(redis, "blmove", blmove)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await wait_until(lambda: consumer.stats.applied == 3)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert orphaned == 1
    assert consumer.stats.requeued == 2  # the orphan and the taken command, back in order
    assert feed.calls == [{1: "ltp"}, {}, {2: "full"}]
    assert await stored(redis) == {"2": "full"}
    assert await redis.llen(PROCESSING) == 0


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

    async def flaky_commit(raw: bytes, outcome: Any) -> list[WriteFailure]:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            server.connected = False  # the EXEC never reaches Redis
            try:
                return await real_commit(raw, outcome)
            finally:
                server.connected = True
        # Nothing of the failed attempts was applied.
        assert await stored(redis) == {"1": "ltp"}
        assert await redis.llen(PROCESSING) == 1
        return await real_commit(raw, outcome)

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
    assert await consumer._commit(raw, outcome) == []
    assert await consumer._commit(raw, outcome) == []
    assert await stored(redis) == {"2": "full"}
    assert await redis.llen(PROCESSING) == 0
    # The answer is a separate step after the state transaction.
    assert await redis.llen(f"{NS}:reply:d") == 0


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


# -- Refusals inside a transaction, on a real server ------------------------------------------
#
# Redis applies every other command of an EXEC when one of them fails, so a transaction that
# ran must never be re-run, and no single refused write may stop the queue.


class Live:
    """A consumer on a real Redis, with its keys, a feed spy and a listener on its events."""

    def __init__(self, client: Redis, namespace: str, **options: Any) -> None:
        self.client = client
        self.ns = namespace
        self.feed = FeedSpy()
        self.store = SubscriptionStore(client, namespace)
        self.consumer = ControlConsumer(
            client,
            namespace,
            self.store,
            default_mode="quote",
            reconcile=self.feed.reconcile,
            base_wait=0.01,
            max_wait=0.1,
            **options,
        )
        self.pubsub = client.pubsub()

    def key(self, suffix: str) -> str:
        return f"{self.ns}:{suffix}"

    async def listen(self) -> None:
        await self.pubsub.subscribe(self.key("events"))
        await self.pubsub.get_message(timeout=1)

    async def events(self) -> list[dict[str, Any]]:
        """Every event published so far."""
        found = []
        while (msg := await self.pubsub.get_message(True, timeout=0.2)) is not None:
            found.append(orjson.loads(msg["data"]))
        return found

    async def take(self) -> bytes:
        """Take one command into processing as the consumer's BLMOVE does."""
        raw = await self.client.lmove(
            self.key("control"), self.key("control:processing"), "LEFT", "RIGHT"
        )
        assert isinstance(raw, bytes)
        return raw

    async def consume_until(self, done: Any) -> None:
        """Run the consumer loop until ``done()``; fail if it never gets there."""
        stop = asyncio.Event()
        task = asyncio.create_task(self.consumer.run(stop))
        try:
            await wait_until(done, within=5)
        finally:
            stop.set()
            await asyncio.wait_for(task, 3)

    async def reply(self, command_id: str) -> dict[str, Any]:
        reply = await self.client.blpop([self.key(f"reply:{command_id}")], 2)
        assert reply is not None
        result: dict[str, Any] = orjson.loads(reply[1])
        return result

    async def close(self) -> None:
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        keys = [key async for key in self.client.scan_iter(match=f"{self.ns}:*")]
        if keys:
            await self.client.delete(*keys)
        await self.client.aclose()


@pytest.fixture
async def live(redis_url: str, namespace: str) -> AsyncIterator[Live]:
    consumer = Live(Redis.from_url(redis_url, socket_timeout=5), namespace)
    await consumer.listen()
    yield consumer
    await consumer.close()


@pytest.mark.redis
async def test_a_foreign_value_at_the_reply_key_neither_repeats_nor_blocks_the_command(
    live: Live,
) -> None:
    """The audit's case: the subscription, the ack and the event happen; only the reply fails."""
    await live.client.set(live.key("reply:wt"), "hello")
    await live.client.rpush(
        live.key("control"), '{"id":"wt","action":"subscribe","tokens":[777]}', "list"
    )
    with capture_logs() as logs:
        await live.consume_until(lambda: live.consumer.stats.applied == 2)
    events = await live.events()
    assert [(e["id"], e["command"][:9], e["ok"]) for e in events] == [
        ("wt", '{"id":"wt', True),  # applied exactly once ...
        (None, "list", True),  # ... and the command queued behind it was served
    ]
    assert events[1]["subscriptions"] == {"777": "quote"}
    assert await stored(live.client, live.key("subscriptions")) == {"777": "quote"}
    assert live.feed.calls == [{777: "quote"}]  # the feed was reconciled
    assert await live.client.llen(live.key("control:processing")) == 0
    assert await live.client.llen(live.key("control")) == 0
    # The foreign value is left alone, only given the reply's TTL so that the name frees itself.
    assert await live.client.get(live.key("reply:wt")) == b"hello"
    assert 0 < await live.client.ttl(live.key("reply:wt")) <= 300
    assert live.consumer.stats.write_errors == 1
    assert live.consumer.stats.rejected == 0
    failed = [e for e in logs if e["event"] == "command_write_failed"]
    assert len(failed) == 1
    assert failed[0]["write"] == "reply"
    assert failed[0]["key"] == live.key("reply:wt")
    assert "WRONGTYPE" in failed[0]["error"]
    assert failed[0]["log_level"] == "error"


@pytest.mark.redis
async def test_a_foreign_value_at_the_dead_letter_key_does_not_stop_the_queue(
    live: Live,
) -> None:
    await live.client.set(live.key("control:dead"), "junk")
    await live.client.rpush(live.key("control"), '{"id":"bad","action":"dance"}', "subscribe 3")
    with capture_logs() as logs:
        await live.consume_until(lambda: live.consumer.stats.applied == 1)
    rejected = await live.reply("bad")
    assert rejected["ok"] is False
    assert [e["ok"] for e in await live.events()] == [False, True]
    assert await stored(live.client, live.key("subscriptions")) == {"3": "quote"}
    assert await live.client.llen(live.key("control:processing")) == 0
    assert live.consumer.stats.rejected == 1
    failed = [e for e in logs if e["event"] == "command_write_failed"]
    assert [(e["write"], e["key"]) for e in failed] == [("dead_letter", live.key("control:dead"))]


@pytest.mark.redis
async def test_a_foreign_value_at_the_subscriptions_key_rejects_commands_without_stopping(
    live: Live,
) -> None:
    """The desired set cannot be read: every command is answered, dead-lettered, not lost."""
    subscriptions = live.key("subscriptions")
    await live.client.set(subscriptions, "hello")
    first = '{"id":"s1","action":"subscribe","tokens":[5]}'
    await live.client.rpush(live.key("control"), first, '{"id":"s2","action":"list"}')
    with capture_logs() as logs:
        await live.consume_until(lambda: live.consumer.stats.rejected == 2)
    for command_id in ("s1", "s2"):
        result = await live.reply(command_id)
        assert result["ok"] is False
        assert subscriptions in result["error"]
        assert "WRONGTYPE" in result["error"]
        assert result["subscriptions"] is None  # unknown, not "empty"
    dead = [
        orjson.loads(item) for item in await live.client.lrange(live.key("control:dead"), 0, -1)
    ]
    assert [d["command"] for d in dead] == [first, '{"id":"s2","action":"list"}']
    assert await live.client.get(subscriptions) == b"hello"  # left for the operator
    assert await live.client.llen(live.key("control:processing")) == 0
    assert live.feed.calls == []  # the feed keeps its subscriptions
    assert live.consumer.stats.store_errors == 2
    assert [e["key"] for e in logs if e["event"] == "command_store_unusable"] == [
        subscriptions,
        subscriptions,
    ]
    # Once the operator has fixed the key, the dead letter can be re-driven.
    await live.client.delete(subscriptions)
    await live.client.rpush(live.key("control"), dead[0]["command"])
    await live.consume_until(lambda: live.consumer.stats.applied == 1)
    assert (await live.reply("s1"))["subscriptions"] == {"5": "quote"}
    assert live.feed.calls == [{5: "quote"}]


@pytest.mark.redis
async def test_a_refused_write_of_the_set_inside_exec_rejects_the_command(
    live: Live, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state write fails inside an EXEC that removed the command from processing."""
    real_queue_replace = live.store.queue_replace

    def refused(pipe: Any, desired: Mapping[int, Mode]) -> None:
        real_queue_replace(pipe, desired)
        # Refused when EXEC runs it, not when queued (as e.g. an ACL changed in between).
        pipe.execute_command("HINCRBY", live.store.key, "refused", "not-a-number")

    monkeypatch.setattr(live.store, "queue_replace", refused)
    await live.client.rpush(
        live.key("control"), '{"id":"n","action":"subscribe","tokens":[8]}', "list"
    )
    with capture_logs() as logs:
        await live.consume_until(lambda: live.consumer.stats.applied == 1)
    result = await live.reply("n")
    assert result["ok"] is False
    assert result["error"].startswith(f"not applied: writing {live.key('subscriptions')} failed")
    assert result["subscriptions"] is None
    dead = await live.client.lrange(live.key("control:dead"), 0, -1)
    assert [orjson.loads(d)["command"] for d in dead] == [
        '{"id":"n","action":"subscribe","tokens":[8]}'
    ]
    assert [(e["id"], e["ok"]) for e in await live.events()] == [("n", False), (None, True)]
    assert await live.client.llen(live.key("control:processing")) == 0
    assert live.feed.calls == []
    assert live.consumer.stats.store_errors == 1
    assert live.consumer.stats.rejected == 1
    assert sum(e["event"] == "command_not_stored" for e in logs) == 1


async def fill_until_out_of_memory(client: Redis) -> None:
    """Grow one key until Redis refuses writes (one huge SET is refused by its query buffer)."""
    for _ in range(100):
        try:
            await client.append("ballast", b"x" * 1_000_000)
        except OutOfMemoryError:
            return
    raise AssertionError("Redis never ran out of memory")


@pytest.mark.redis
async def test_execabort_under_oom_applies_nothing_and_is_retried(
    private_redis: MakeRedis, namespace: str
) -> None:
    """OOM with noeviction refuses HSET while queued: EXECABORT, nothing applied, retried."""
    server = await private_redis("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    live = Live(Redis.from_url(server.url, socket_timeout=5), namespace)
    try:
        await live.client.rpush(live.key("control"), '{"id":"m","action":"subscribe","tokens":[9]}')
        raw = await live.take()
        await fill_until_out_of_memory(live.client)
        with capture_logs() as logs:
            task = asyncio.create_task(live.consumer.handle(raw))
            await wait_until(lambda: live.consumer.stats.redis_errors >= 3)
            assert await live.client.exists(live.key("subscriptions")) == 0  # nothing applied
            assert await live.client.llen(live.key("control:processing")) == 1
            await live.client.delete("ballast")
            outcome = await asyncio.wait_for(task, 3)
        assert outcome is not None
        assert outcome.ok
        assert await stored(live.client, live.key("subscriptions")) == {"9": "quote"}
        assert await live.client.llen(live.key("control:processing")) == 0
        assert await live.client.llen(live.key("reply:m")) == 1
        assert live.feed.calls == [{9: "quote"}]
        aborted = [e for e in logs if e["event"] == "command_transaction_aborted"]
        assert aborted
        assert "OutOfMemoryError" in aborted[0]["error"]
    finally:
        await live.close()


@pytest.mark.redis
async def test_a_lost_connection_is_still_retried_until_redis_is_back(
    private_redis: MakeRedis, namespace: str
) -> None:
    server = await private_redis(durable=True)
    client = create_redis(server.url, retries=1, connect_timeout=0.5, socket_timeout=1)
    live = Live(client, namespace)
    try:
        await client.rpush(live.key("control"), '{"id":"c","action":"subscribe","tokens":[4]}')
        raw = await live.take()
        await server.kill()
        task = asyncio.create_task(live.consumer.handle(raw))
        await wait_until(lambda: live.consumer.stats.redis_errors >= 2)
        assert not task.done()
        await server.start()  # same port, same append-only file
        outcome = await asyncio.wait_for(task, 5)
        assert outcome is not None
        assert outcome.ok
        assert await stored(client, live.key("subscriptions")) == {"4": "quote"}
        assert await client.llen(live.key("control:processing")) == 0
        assert await client.llen(live.key("reply:c")) == 1
        assert live.feed.calls == [{4: "quote"}]
    finally:
        await live.close()


async def test_a_commit_retried_after_the_lease_was_lost_does_not_overwrite_the_new_holder(
    redis: Redis,
) -> None:
    """Bridge A takes a command and reads the set, then is cut off for longer than the lease.
    B takes over, re-queues and applies that command and a newer one. A's commit, retried from
    memory once Redis answers again, wrote A's older set over B's (token 3 lost)."""
    await redis.hset(SUBS, "1", "ltp")
    lease = {"valid": True}
    a = ControlConsumer(
        redis, NS, SubscriptionStore(redis, NS), default_mode="ltp",
        base_wait=0.01, max_wait=0.01, gate=lambda: lease["valid"],
    )  # fmt: skip
    b = ControlConsumer(redis, NS, SubscriptionStore(redis, NS), default_mode="ltp")
    first = b'{"action": "subscribe", "tokens": [2]}'
    newer = b'{"action": "subscribe", "tokens": [3]}'
    await redis.rpush(PROCESSING, first)  # A's BLMOVE took it
    commit = a._commit
    calls = 0

    async def partitioned_commit(raw: bytes, outcome: Any) -> list[WriteFailure]:
        nonlocal calls
        calls += 1
        if calls == 1:  # A is cut off, its lease expires, B takes over and works on
            lease["valid"] = False
            await b.requeue()
            taken = await redis.lpop(CONTROL)
            assert taken == first
            for raw_b in (taken, newer):
                await b.handle(raw_b)
            raise RedisConnectionError("partitioned")
        return await commit(raw, outcome)

    a._commit = partitioned_commit  # type: ignore[method-assign]
    stop = asyncio.Event()
    handled = asyncio.create_task(a.handle(first, stop))
    await asyncio.sleep(0.2)  # A retries while it no longer holds the lease
    assert calls == 1
    stop.set()  # A's renewal finds the lease taken: the bridge stops
    assert await handled is None  # left for whoever holds the namespace
    assert await redis.hgetall(SUBS) == {b"1": b"ltp", b"2": b"ltp", b"3": b"ltp"}


async def test_a_committed_command_is_remembered_before_any_other_read(
    redis: Redis, consumer: ControlConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis restart right after a commit, before any other read: the set written back must
    be the one the command committed, not the one read before it (the subscription lost)."""
    store = consumer._store
    run_id = ["first"]

    async def server_id() -> str:
        return run_id[0]

    monkeypatch.setattr(store, "_current_server_id", server_id)
    await run_one(redis, consumer, "subscribe ltp 1")
    await run_one(redis, consumer, "subscribe full 2")
    assert store.known == {1: "ltp", 2: "full"}
    await redis.flushall()  # a restart without persistence
    run_id[0] = "second"
    assert await store.load() == {1: "ltp", 2: "full"}
    assert await stored(redis) == {"1": "ltp", "2": "full"}


async def test_a_read_overtaken_by_the_consumers_commit_leaves_the_committed_set_known(
    redis: Redis, consumer: ControlConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit holds the store's lock: a resync's read answered before the EXEC but
    finishing after it would otherwise leave the pre-command set in memory, for a later Redis
    restart to write back."""
    store = consumer._store
    await redis.rpush(PROCESSING, b"subscribe full 7")
    outcome = consumer.decide(b"subscribe full 7", {})
    answered, resume = asyncio.Event(), asyncio.Event()
    hgetall = redis.hgetall

    async def slow_hgetall(key: str) -> Any:
        reply = await hgetall(key)
        answered.set()
        await resume.wait()
        return reply

    monkeypatch.setattr(redis, "hgetall", slow_hgetall)
    read = asyncio.create_task(store.load())
    await answered.wait()
    monkeypatch.setattr(redis, "hgetall", hgetall)
    committed = asyncio.create_task(consumer._commit(b"subscribe full 7", outcome))
    await asyncio.sleep(0.01)
    resume.set()
    assert await read == {}
    assert await committed == []
    assert store.known == {7: "full"}


async def test_a_refused_read_of_the_set_is_retried_not_taken_for_a_wrong_type(
    redis: Redis, consumer: ControlConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only WRONGTYPE rejects a command for an unreadable set. Another refusal (NOPERM: an ACL
    being fixed) is a server condition: the command waits in processing and is applied once
    Redis lets it, and health reports the failure meanwhile."""
    load = consumer._store.load
    refusals = 2
    failing: list[float | None] = []

    async def refused_load() -> dict[int, Mode]:
        nonlocal refusals
        await asyncio.sleep(0)
        if refusals:
            refusals -= 1
            failing.append(consumer.failing_for())
            raise ResponseError("NOPERM this user has no permissions to run 'hgetall'")
        return await load()

    monkeypatch.setattr(consumer._store, "load", refused_load)
    with capture_logs() as logs:
        result = await run_one(redis, consumer, '{"id": "p", "action": "subscribe", "tokens": [4]}')
    assert result["ok"] is True
    assert await stored(redis) == {"4": "quote"}
    assert await redis.llen(DEAD) == 0
    assert failing[1] is not None  # reported by health while it lasted
    assert consumer.failing_for() is None
    assert [e["event"] for e in logs].count("command_redis_error") == 2
    assert consumer.stats.rejected == 0


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (b'{"id": "w", "action": "subscribe", "mode": "sideways", "tokens": [1]}', "mode"),
        (b'{"id": "w", "action": "list"}', "internal error: KeyError"),
    ],
    ids=["invalid", "parser-bug"],
)
async def test_a_bad_command_meeting_an_unreadable_set_is_rejected_for_its_own_reason(
    redis: Redis,
    consumer: ControlConsumer,
    monkeypatch: pytest.MonkeyPatch,
    command: bytes,
    error: str,
) -> None:
    """With a wrong type at the set's key, an invalid command (or one the parser chokes on)
    is still answered and dead-lettered, not a crash of the consumer."""
    await redis.set(SUBS, "hello")
    if error.startswith("internal"):

        def broken(*_: Any) -> Any:
            raise KeyError("bug")

        monkeypatch.setattr("bridge.control.parse_command", broken)
    with capture_logs() as logs:
        result = await run_one(redis, consumer, command)
    assert result["ok"] is False
    assert error in result["error"]
    assert result["subscriptions"] is None
    assert await redis.llen(DEAD) == 1
    if error.startswith("internal"):
        assert "command_internal_error" in [e["event"] for e in logs]


async def test_while_the_lease_is_unconfirmed_the_queue_is_not_touched(
    redis: Redis, feed: FeedSpy
) -> None:
    """With nothing in processing, a bridge whose lease is unconfirmed must not take the next
    command either: the new holder takes it."""
    consumer = ControlConsumer(
        redis, NS, SubscriptionStore(redis, NS), default_mode="quote",
        reconcile=feed.reconcile, idle_sleep=0.001, gate=lambda: False,
    )  # fmt: skip
    await redis.rpush(CONTROL, "subscribe ltp 1")
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert await redis.lrange(CONTROL, 0, -1) == [b"subscribe ltp 1"]
    assert await redis.llen(PROCESSING) == 0


async def test_a_stop_while_the_lease_is_unconfirmed_leaves_the_command_and_says_so(
    redis: Redis,
) -> None:
    consumer = ControlConsumer(
        redis, NS, SubscriptionStore(redis, NS), default_mode="quote", gate=lambda: False
    )
    await redis.rpush(PROCESSING, "subscribe 9")
    stop = asyncio.Event()
    stop.set()
    with capture_logs() as logs:
        assert await asyncio.wait_for(consumer.handle(b"subscribe 9", stop), 1) is None
    [left] = [e for e in logs if e["event"] == "command_left_in_processing"]
    assert left["error"] == "namespace lease not held"
    assert await redis.lrange(PROCESSING, 0, -1) == [b"subscribe 9"]


@pytest.mark.parametrize(
    "error",
    [RedisConnectionError("gone"), ResponseError("NOPERM no permissions to run 'exec'")],
    ids=["unreachable", "refused"],
)
async def test_a_stop_while_redis_fails_the_commit_leaves_the_command_in_processing(
    redis: Redis, consumer: ControlConsumer, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    """Shutdown must not wait on a Redis that keeps failing: the command stays in processing
    for the next start (re-queued), and the log says why."""
    await redis.rpush(PROCESSING, "subscribe 9")

    async def failing_commit(raw: bytes, outcome: Any) -> list[WriteFailure]:
        await asyncio.sleep(0)
        raise error

    monkeypatch.setattr(consumer, "_commit", failing_commit)
    stop = asyncio.Event()
    stop.set()
    with capture_logs() as logs:
        assert await asyncio.wait_for(consumer.handle(b"subscribe 9", stop), 1) is None
    [left] = [e for e in logs if e["event"] == "command_left_in_processing"]
    assert type(error).__name__ in left["error"]
    assert await redis.lrange(PROCESSING, 0, -1) == [b"subscribe 9"]
    assert await stored(redis) == {}


async def test_a_stop_while_the_answer_cannot_be_sent_gives_up_on_it_and_says_so(
    redis: Redis, consumer: ControlConsumer, monkeypatch: pytest.MonkeyPatch, feed: FeedSpy
) -> None:
    async def unreachable(outcome: Any, dead: bool) -> list[WriteFailure]:
        await asyncio.sleep(0)
        raise RedisConnectionError("gone")

    monkeypatch.setattr(consumer, "_answer", unreachable)
    await redis.rpush(PROCESSING, "subscribe 9")
    stop = asyncio.Event()
    stop.set()
    with capture_logs() as logs:
        outcome = await asyncio.wait_for(consumer.handle(b"subscribe 9", stop), 1)
    assert outcome is not None
    assert outcome.ok  # the state change stands
    assert await stored(redis) == {"9": "quote"}
    assert "command_result_unsent" in [e["event"] for e in logs]
    assert feed.calls == [{9: "quote"}]


async def test_an_answer_refused_as_a_whole_is_logged_and_never_repeated(
    redis: Redis, consumer: ControlConsumer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal (not an outage) of the answer pipeline: sending it again would answer the
    command twice or spin on a refusal that never heals."""
    calls = 0

    async def refused(outcome: Any, dead: bool) -> list[WriteFailure]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        if calls == 1:
            raise ResponseError("NOPERM no permissions to run 'publish'")
        return []

    monkeypatch.setattr(consumer, "_answer", refused)
    with capture_logs() as logs:
        result = await run_one(redis, consumer, "subscribe 5")
    assert result["ok"] is True
    assert calls == 1
    assert consumer.stats.write_errors == 1
    [failed] = [e for e in logs if e["event"] == "command_write_failed"]
    assert failed["write"] == "answer"


async def test_a_refused_take_is_logged_once_and_reported_until_it_heals(
    redis: Redis, consumer: ControlConsumer
) -> None:
    """A WRONGTYPE control key refuses every BLMOVE: one error line (not one per retry), and
    health reports it (since when, and why) until it heals, then stops reporting it even
    though no command arrives."""
    await redis.set(CONTROL, "junk")
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(consumer.run(stop))
        await wait_until(lambda: consumer.stats.redis_errors >= 3)
        assert consumer.failing_for() is not None
        assert consumer.failing_since_at is not None
        assert consumer.last_error is not None
        assert "WRONGTYPE" in consumer.last_error
        await redis.delete(CONTROL)
        await wait_until(lambda: consumer.failing_for() is None)
        stop.set()
        await asyncio.wait_for(task, 2)
    assert [e["event"] for e in logs].count("control_take_failed") == 1
    assert consumer.last_error is None


async def test_applied_rejected_and_requeued_commands_are_logged(
    redis: Redis, consumer: ControlConsumer
) -> None:
    """The lines operators follow a command by."""
    await redis.rpush(PROCESSING, "p1")
    with capture_logs() as logs:
        await consumer.requeue()
        await redis.delete(CONTROL)
        await run_one(redis, consumer, '{"id": "a", "action": "subscribe", "tokens": [3]}')
        await run_one(redis, consumer, '{"id": "r", "action": "dance"}')
    by_event = {e["event"]: e for e in logs}
    assert by_event["control_requeued"]["count"] == 1
    applied = by_event["command_applied"]
    assert (applied["id"], applied["action"], applied["subscriptions"]) == ("a", "subscribe", 1)
    assert by_event["command_rejected"]["id"] == "r"
    assert by_event["command_rejected"]["error"]


def _fail_once(error: Exception, real: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    failed = False

    async def once(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed:
            failed = True
            await asyncio.sleep(0)
            raise error
        return await real(*args, **kwargs)

    return once


@pytest.mark.parametrize(
    ("path", "counters"),
    [
        ("take-unreachable", {"redis_errors": 1, "applied": 1}),
        ("take-refused", {"redis_errors": 1, "applied": 1}),
        ("commit-refused", {"redis_errors": 1, "applied": 1}),
        ("set-unreadable", {"redis_errors": 1, "store_errors": 1, "rejected": 1}),
        ("set-not-stored", {"redis_errors": 1, "store_errors": 1, "rejected": 1}),
        ("reply-refused", {"redis_errors": 1, "write_errors": 1, "applied": 1}),
        ("answer-unreachable", {"redis_errors": 1, "applied": 1}),
    ],
)
async def test_every_redis_error_is_counted_once_where_it_belongs(
    redis: Redis,
    consumer: ControlConsumer,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    counters: dict[str, int],
) -> None:
    """The ``bridge_control_*`` metrics operators alert on: one error, one count."""
    unreachable, refused = RedisConnectionError("gone"), ResponseError("NOPERM refused")
    if path == "take-unreachable":
        monkeypatch.setattr(redis, "blmove", _fail_once(unreachable, redis.blmove))
    elif path == "take-refused":
        monkeypatch.setattr(redis, "blmove", _fail_once(refused, redis.blmove))
    elif path == "commit-refused":
        monkeypatch.setattr(consumer, "_commit", _fail_once(refused, consumer._commit))
    elif path == "set-unreadable":
        await redis.set(SUBS, "hello")
    elif path == "set-not-stored":
        real_queue_replace = consumer._store.queue_replace

        def refused_in_exec(pipe: Any, desired: Mapping[int, Mode]) -> None:
            real_queue_replace(pipe, desired)
            pipe.execute_command("HINCRBY", SUBS, "refused", "not-a-number")

        monkeypatch.setattr(consumer._store, "queue_replace", refused_in_exec)
    elif path == "reply-refused":
        await redis.set(f"{NS}:reply:x", "foreign")
    elif path == "answer-unreachable":
        monkeypatch.setattr(consumer, "_answer", _fail_once(unreachable, consumer._answer))
    await redis.rpush(CONTROL, '{"id": "x", "action": "subscribe", "tokens": [1]}')
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(consumer.run(stop))
        await wait_until(lambda: consumer.stats.applied + consumer.stats.rejected == 1)
        stop.set()
        await asyncio.wait_for(task, 2)
    if path.endswith("unreachable"):  # an outage: logged, and waited out with backoff
        assert [e["event"] for e in logs].count("redis_unavailable") == 1
    stats = consumer.stats
    names = ("redis_errors", "write_errors", "store_errors", "applied", "rejected")
    assert {n: getattr(stats, n) for n in names} == {n: counters.get(n, 0) for n in names}


async def test_an_idle_consumer_sleeps_between_empty_takes(
    redis: Redis, feed: FeedSpy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fakeredis's BLMOVE (and a proxy's) returns at once on an empty queue: without the idle
    sleep the consumer would spin on Redis at full CPU."""
    consumer = ControlConsumer(
        redis, NS, SubscriptionStore(redis, NS), default_mode="quote", idle_sleep=0.05
    )
    takes = Calls(monkeypatch, redis, "blmove")
    stop = asyncio.Event()
    started = time.monotonic()
    task = asyncio.create_task(consumer.run(stop))
    await wait_until(lambda: takes.count >= 3)
    elapsed = time.monotonic() - started
    stop.set()
    await asyncio.wait_for(task, 2)
    assert elapsed >= 0.09  # three takes with a 0.05 s sleep between them (load only slows it)
