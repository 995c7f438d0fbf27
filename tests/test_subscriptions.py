"""The desired set in ``<ns>:subscriptions``: load, replace, merge, hand-edited entries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import fakeredis
import pytest
from helpers import Calls, MakeRedis
from redis.asyncio import Redis
from structlog.testing import capture_logs

from bridge.redis_client import create_redis
from bridge.subscriptions import SubscriptionStore, decode_subscriptions

KEY = "s:subscriptions"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


@pytest.fixture
def store(redis: Redis) -> SubscriptionStore:
    return SubscriptionStore(redis, "s")


async def test_empty_store_loads_as_an_empty_set(store: SubscriptionStore) -> None:
    assert store.key == KEY
    assert await store.load() == {}


async def test_replace_makes_the_hash_exactly_the_given_set(
    store: SubscriptionStore, redis: Redis
) -> None:
    await store.replace({1: "ltp", 2: "full"})
    await store.replace({2: "quote", 3: "ltp"})
    assert await redis.hgetall(KEY) == {b"2": b"quote", b"3": b"ltp"}
    assert await store.load() == {2: "quote", 3: "ltp"}
    await store.replace({})
    assert await redis.exists(KEY) == 0
    assert await store.load() == {}


async def test_merge_adds_with_the_new_modes_winning_and_returns_the_whole_set(
    store: SubscriptionStore,
) -> None:
    await store.replace({1: "ltp", 2: "full"})
    assert await store.merge({2: "quote", 5: "ltp"}) == {1: "ltp", 2: "quote", 5: "ltp"}
    assert await store.merge({}) == {1: "ltp", 2: "quote", 5: "ltp"}
    assert await store.load() == {1: "ltp", 2: "quote", 5: "ltp"}


async def test_queue_replace_joins_the_callers_transaction(
    store: SubscriptionStore, redis: Redis
) -> None:
    await store.replace({1: "ltp"})
    async with redis.pipeline(transaction=True) as pipe:
        store.queue_replace(pipe, {7: "full"})
        pipe.rpush("s:other", "x")
        await pipe.execute()
    assert await store.load() == {7: "full"}
    assert await redis.llen("s:other") == 1


async def test_hand_edited_bad_entries_are_skipped_and_logged(
    store: SubscriptionStore, redis: Redis
) -> None:
    await redis.hset(
        KEY,
        mapping={
            "1": "LTP",
            "x": "full",
            "2": "bogus",
            "0": "ltp",
            "4294967296": "ltp",
            "9": " full ",
        },
    )
    with capture_logs() as logs:
        assert await store.load() == {1: "ltp", 9: "full"}
    bad = sorted(
        entry["instrument_token"]
        for entry in logs
        if entry["event"] == "subscription_entry_invalid"
    )
    assert bad == ["0", "2", "4294967296", "x"]
    # Once each while it stays (the guard reads every 5 s); again if it comes back.
    with capture_logs() as logs:
        assert await store.load() == {1: "ltp", 9: "full"}
    assert [e for e in logs if e["event"] == "subscription_entry_invalid"] == []
    await redis.hdel(KEY, "x")
    await store.load()
    await redis.hset(KEY, "x", "full")
    with capture_logs() as logs:
        await store.load()
    again = [e["instrument_token"] for e in logs if e["event"] == "subscription_entry_invalid"]
    assert again == ["x"]


def test_decode_accepts_str_replies() -> None:
    assert decode_subscriptions({"3": "quote"}) == {3: "quote"}


class Server:
    """Stands in for INFO's run_id: a restart gives the server a new identity."""

    def __init__(self) -> None:
        self.run_id = "first"

    async def current(self) -> str:
        return self.run_id


@pytest.fixture
def server(store: SubscriptionStore, monkeypatch: pytest.MonkeyPatch) -> Server:
    server = Server()
    monkeypatch.setattr(store, "_current_server_id", server.current)
    return server


async def test_a_restart_that_lost_the_set_gets_it_back(
    store: SubscriptionStore, redis: Redis, server: Server
) -> None:
    await store.load()
    await store.replace({1: "ltp", 2: "full"})
    await redis.flushall()
    server.run_id = "second"
    with capture_logs() as logs:
        assert await store.load() == {1: "ltp", 2: "full"}
    assert await redis.hgetall(KEY) == {b"1": b"ltp", b"2": b"full"}
    assert store.restored == 1
    [restored] = [entry for entry in logs if entry["event"] == "subscriptions_restored"]
    assert restored["reason"] == "the Redis server restarted and lost the set"


async def test_a_restart_from_an_older_snapshot_does_not_undo_acknowledged_changes(
    store: SubscriptionStore, redis: Redis, server: Server
) -> None:
    await store.replace({1: "ltp", 2: "full"})
    await store.load()
    assert await redis.hgetall(KEY) == {b"1": b"ltp", b"2": b"full"}  # what a SAVE would keep
    await store.replace({2: "quote", 3: "ltp"})  # acknowledged commands after the snapshot
    await redis.delete(KEY)
    await redis.hset(KEY, mapping={"1": "ltp", "2": "full"})  # a restart loads that snapshot
    server.run_id = "second"
    with capture_logs() as logs:
        assert await store.load() == {2: "quote", 3: "ltp"}
    assert await redis.hgetall(KEY) == {b"2": b"quote", b"3": b"ltp"}
    [restored] = [entry for entry in logs if entry["event"] == "subscriptions_restored"]
    assert restored["reason"].startswith("the Redis server restarted with an older set")
    assert (restored["found"], restored["subscriptions"]) == (2, 2)


async def test_on_the_same_server_the_hash_wins_even_when_deleted(
    store: SubscriptionStore, redis: Redis, server: Server
) -> None:
    await store.load()
    await store.replace({1: "ltp", 2: "full"})
    await redis.hdel(KEY, "1")
    assert await store.load() == {2: "full"}  # a hand edit is the desired set
    await redis.delete(KEY)
    assert await store.load() == {}  # so is a DEL (or FLUSHALL) of the same server
    assert store.restored == 0
    # With nothing remembered (a fresh process), a new server's set is simply taken.
    fresh = SubscriptionStore(redis, "s")
    await redis.hset(KEY, mapping={"5": "quote"})
    assert await fresh.load() == {5: "quote"}


async def test_a_set_evicted_on_the_same_server_is_written_back(
    store: SubscriptionStore, redis: Redis, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``allkeys-*`` Redis may evict the hash: not a DEL by an operator, since the server's
    ``evicted_keys`` grew meanwhile. Following it would unsubscribe everything."""
    evicted = [7]

    async def evicted_keys() -> int:
        return evicted[0]

    monkeypatch.setattr(store, "_evicted_keys", evicted_keys)
    await store.load()
    await store.replace({1: "ltp", 2: "full"})
    await redis.delete(KEY)  # evicted...
    evicted[0] += 40  # ...with other keys
    with capture_logs() as logs:
        assert await store.load() == {1: "ltp", 2: "full"}
    assert await redis.hgetall(KEY) == {b"1": b"ltp", b"2": b"full"}
    [restored] = [entry for entry in logs if entry["event"] == "subscriptions_restored"]
    assert restored["reason"].startswith("Redis evicted the set")
    # Evictions elsewhere while the hash stays are nothing; a DEL with no eviction is followed.
    evicted[0] += 5
    assert await store.load() == {1: "ltp", 2: "full"}
    await redis.delete(KEY)
    assert await store.load() == {}
    assert store.restored == 1

    # Under a policy that evicts only keys with a TTL the hash cannot have been evicted: other
    # applications' evictions do not turn an operator's DEL into one.
    async def volatile_only() -> bool:
        return False

    monkeypatch.setattr(store, "_evicts_any_key", volatile_only)
    await store.replace({3: "quote"})
    await store.load()
    await redis.delete(KEY)
    evicted[0] += 100
    assert await store.load() == {}
    assert store.restored == 1


@pytest.mark.redis
async def test_a_real_eviction_is_repaired(private_redis: MakeRedis) -> None:
    server = await private_redis("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")
    client = Redis.from_url(server.url)
    store = SubscriptionStore(client, "evict")
    try:
        await store.load()
        await store.replace({256265: "full", 408065: "quote"})
        await store.load()
        filler = b"x" * 100_000
        for n in range(2000):  # a cache beside the bridge fills the memory: LRU evicts the set
            await client.set(f"cache:{n}", filler)
            if not await client.exists(store.key):
                break
        assert not await client.exists(store.key), "nothing was evicted"
        assert await store.load() == {256265: "full", 408065: "quote"}
        assert await client.hgetall(store.key) == {b"256265": b"full", b"408065": b"quote"}
        assert store.restored == 1
    finally:
        await client.aclose()


async def test_a_restart_in_the_middle_of_a_read_is_not_taken_for_a_del(
    store: SubscriptionStore, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """INFO answered by the old server, HGETALL by the restarted, empty one: without a second
    look this passes for a DEL on the same server, followed, and every subscription is gone."""
    answers = ["first", "first"]

    async def current() -> str:
        return answers.pop(0) if answers else "second"

    monkeypatch.setattr(store, "_current_server_id", current)
    await store.load()
    await store.replace({1: "ltp", 2: "full"})
    await redis.flushall()  # the restart, just after the next INFO
    answers.append("first")
    with capture_logs() as logs:
        assert await store.load() == {1: "ltp", 2: "full"}
    assert await redis.hgetall(KEY) == {b"1": b"ltp", b"2": b"full"}
    [restored] = [entry for entry in logs if entry["event"] == "subscriptions_restored"]
    assert restored["reason"] == "the Redis server restarted and lost the set"


async def test_a_read_overtaken_by_a_commit_does_not_leave_a_stale_set_in_memory(
    store: SubscriptionStore, redis: Redis, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconnect's resync reads the hash while a command commits: HGETALL answered before
    the EXEC, the read finishing after the command's ``remember``. Without the lock around the
    read the store then remembered the pre-command set, and a later Redis restart wrote that
    stale set back: the command's subscription lost (seen as a flaky integration test)."""
    await store.load()
    answered, resume = asyncio.Event(), asyncio.Event()
    hgetall = redis.hgetall

    async def slow_hgetall(key: str) -> object:
        reply = await hgetall(key)
        answered.set()
        await resume.wait()  # the reply is in, the read not yet finished
        return reply

    monkeypatch.setattr(redis, "hgetall", slow_hgetall)
    read = asyncio.create_task(store.load())
    await answered.wait()
    monkeypatch.setattr(redis, "hgetall", hgetall)

    async def commit() -> None:  # what the control consumer does (bridge/control.py _commit)
        async with store.lock, redis.pipeline(transaction=True) as pipe:
            store.queue_replace(pipe, {7: "full"})
            await pipe.execute()
            store.remember({7: "full"})

    committed = asyncio.create_task(commit())
    await asyncio.sleep(0.01)
    resume.set()
    assert await read == {}  # read before the commit: right for its caller at the time
    await committed
    assert store.known == {7: "full"}
    await redis.flushall()  # a restart without persistence
    server.run_id = "second"
    assert await store.load() == {7: "full"}
    assert await redis.hgetall(KEY) == {b"7": b"full"}


async def test_reload_returns_what_was_known_before_the_read(
    store: SubscriptionStore, redis: Redis
) -> None:
    await store.replace({1: "ltp"})
    await redis.hset(KEY, "2", "full")  # an operator's hand edit
    assert await store.reload() == ({1: "ltp"}, {1: "ltp", 2: "full"})
    assert await store.reload() == ({1: "ltp", 2: "full"}, {1: "ltp", 2: "full"})


async def test_a_restart_between_the_start_up_read_and_the_merge_keeps_the_stored_set(
    store: SubscriptionStore, redis: Redis, server: Server
) -> None:
    """Start-up loads the set, then merges BRIDGE_SUBSCRIBE into it: a restart in between
    (no persistence) left only BRIDGE_SUBSCRIBE's tokens."""
    await redis.hset(KEY, mapping={"1": "ltp"})
    assert await store.load() == {1: "ltp"}
    await redis.flushall()
    server.run_id = "second"
    assert await store.merge({2: "full"}) == {1: "ltp", 2: "full"}
    assert await redis.hgetall(KEY) == {b"1": b"ltp", b"2": b"full"}


def test_the_largest_instrument_token_is_accepted() -> None:
    """Kite's tokens are unsigned 32-bit: the top of the range is a valid subscription, one past
    it is not. A narrower bound would drop a real subscription as a hand-edited bad entry."""
    raw: dict[bytes | str, bytes | str] = {
        b"4294967295": b"ltp",
        b"2147483648": b"full",
        b"4294967296": b"ltp",
    }
    assert decode_subscriptions(raw) == {4294967295: "ltp", 2147483648: "full"}


async def test_exists_tells_whether_the_hash_is_there(
    store: SubscriptionStore, redis: Redis
) -> None:
    """The guard's cheap per-second check: a wrong answer either hides a lost set until the
    next full comparison or turns every round into a full HGETALL (memory growth)."""
    assert not await store.exists()
    await store.replace({1: "ltp"})
    assert await store.exists()
    await redis.delete(KEY)
    assert not await store.exists()


async def test_without_info_the_restart_guard_is_disabled_and_said_so_once(
    store: SubscriptionStore, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fakeredis refuses INFO, as an ACL or a proxy may: the bridge says once that it cannot
    tell a restart, not at every read (the guard reads every few seconds), and stops asking."""
    with capture_logs() as logs:
        await store.load()
        info = Calls(monkeypatch, redis, "info")
        await store.replace({1: "ltp"})
        await redis.delete(KEY)
        assert await store.load() == {}  # a DEL, followed: nothing tells it from a restart
        assert await store.load() == {}
    assert [e["event"] for e in logs] == ["redis_run_id_unavailable"]
    assert info.count == 0


async def test_a_restart_after_the_start_up_merge_keeps_the_merged_tokens(
    store: SubscriptionStore, redis: Redis, server: Server
) -> None:
    """The merge must remember the set it wrote: remembering the set read before it, a later
    restart without persistence wrote that back and BRIDGE_SUBSCRIBE's tokens were lost."""
    await redis.hset(KEY, mapping={"1": "ltp"})
    assert await store.merge({2: "full"}) == {1: "ltp", 2: "full"}
    assert store.known == {1: "ltp", 2: "full"}
    await redis.flushall()
    server.run_id = "second"
    assert await store.load() == {1: "ltp", 2: "full"}
    assert await redis.hgetall(KEY) == {b"1": b"ltp", b"2": b"full"}


@pytest.mark.redis
async def test_a_real_restart_without_persistence_gets_the_set_back(
    private_redis: MakeRedis,
) -> None:
    """The restart guard on a real server, with the real INFO run_id (the tests above stand it
    in): without it a restart that lost the hash passed for an operator's DEL and was followed,
    every subscription gone."""
    server = await private_redis()
    client = create_redis(server.url)
    store = SubscriptionStore(client, "restart")
    try:
        await store.load()
        await store.replace({256265: "full", 408065: "quote"})
        await server.kill()
        await server.start()
        with capture_logs() as logs:
            assert await store.load() == {256265: "full", 408065: "quote"}
        assert await client.hgetall(store.key) == {b"256265": b"full", b"408065": b"quote"}
        assert store.restored == 1
        assert [e["event"] for e in logs] == ["subscriptions_restored"]
    finally:
        await client.aclose()


@pytest.mark.redis
@pytest.mark.parametrize(
    ("policy", "restored"),
    [("noeviction", 0), ("volatile-lru", 0), ("allkeys-lru", 1)],
)
async def test_only_an_allkeys_policy_turns_a_vanished_set_into_an_eviction(
    private_redis: MakeRedis, monkeypatch: pytest.MonkeyPatch, policy: str, restored: int
) -> None:
    """A DEL while other keys were evicted: under a policy that can evict the hash it is
    written back, under one that cannot (only keys with a TTL, or nothing) the operator's DEL
    is followed; reading the policy wrong undid every `DEL` on a busy cache server."""
    server = await private_redis("--maxmemory-policy", policy)
    client = create_redis(server.url)
    store = SubscriptionStore(client, "policy")
    evicted = [0]

    async def evicted_keys() -> int:
        return evicted[0]

    monkeypatch.setattr(store, "_evicted_keys", evicted_keys)
    try:
        await store.load()
        await store.replace({1: "ltp"})
        await client.delete(store.key)
        evicted[0] += 3  # another application's keys
        assert await store.load() == ({1: "ltp"} if restored else {})
        assert store.restored == restored
    finally:
        await client.aclose()
