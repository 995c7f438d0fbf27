"""The service keeps the feed, the desired set in Redis and the commands in step (fakeredis).

Interleavings found by reading the code (an audit after a stale-read race, 2026-11-26): each
test drives one of them deterministically and fails without its fix.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from helpers import BlockingSocket, wait_until
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from bridge.config import Settings
from bridge.kite.records import Mode
from bridge.service import Bridge

NS = "r"
KEY = f"{NS}:subscriptions"


@pytest.fixture
def bridge(redis: Redis) -> Bridge:  # ``redis``: fakeredis, from tests/conftest.py
    settings = Settings(
        kite_api_key="k",
        kite_access_token=SecretStr("t"),
        kite_ws_url="ws://127.0.0.1:1",
        namespace=NS,
        http_port=0,
    )
    return Bridge(settings, redis=redis, install_signals=False)


@pytest.mark.parametrize(
    "command",
    [b'{"action": "list"}', b'{"action": "subscribe", "tokens": ["x"]}'],
    ids=["list", "rejected"],
)
async def test_a_hand_edit_read_first_by_a_command_that_changes_nothing_is_still_followed(
    bridge: Bridge, redis: Redis, command: bytes
) -> None:
    """`list` and a rejected command load the set (so the store knows the edit) but reconcile
    nothing: the guard's next full round, finding the hash equal to what the store knows,
    returned without ever subscribing the hand-added token."""
    bridge.control._gate = lambda: True  # the lease is held
    await bridge.store.replace({1: "ltp"})
    await bridge.feed.reconcile({1: "ltp"})
    await redis.hset(KEY, "2", "full")  # the operator's hand edit
    await bridge.control.handle(command)  # before the guard's next full comparison
    await bridge._follow_store()
    assert dict(bridge.feed.subscriptions) == {1: "ltp", 2: "full"}


async def test_a_resync_cancelled_by_the_next_connect_mid_send_leaves_nothing_unsent(
    bridge: Bridge, redis: Redis
) -> None:
    """One connection's resync is sending its diff when the next connection's on_connect
    cancels it: the replay set already held the new tokens, so the next resync found nothing
    to send and token 3 was never subscribed on Kite (until a later reconnect)."""
    bridge.feed.batch_size = 1
    await bridge.feed.reconcile({1: "ltp"})
    await redis.hset(KEY, mapping={"1": "ltp", "2": "ltp", "3": "ltp"})
    ws = BlockingSocket()
    bridge.feed._ws = ws  # type: ignore[assignment]
    bridge._on_connect(bridge.feed)
    old = bridge._resync_task
    assert old is not None
    await asyncio.wait_for(ws.first.wait(), 5)
    await asyncio.sleep(0.01)  # blocked sending the rest
    bridge._on_connect(bridge.feed)  # the next connection is up
    new = bridge._resync_task
    assert new is not None
    assert new is not old
    ws.release.set()
    await asyncio.wait({old})
    await new
    assert ws.subscribed() == {2, 3}


async def test_a_hand_edit_nobody_read_is_followed_and_named_in_the_log(
    bridge: Bridge, redis: Redis
) -> None:
    """The guard's main job: an operator edits the hash by hand. The feed must follow it, and
    ``subscriptions_followed`` must say exactly what changed (operators tell a slip of the hand
    from it); a completed resync of the current connection must not hold the guard back."""
    await bridge.store.replace({1: "ltp", 3: "ltp"})
    bridge._on_connect(bridge.feed)
    assert bridge._resync_task is not None
    await bridge._resync_task  # done: the guard is free to compare again
    await redis.hset(KEY, mapping={"1": "quote", "2": "full"})
    await redis.hdel(KEY, "3")
    with capture_logs() as logs:
        await bridge._follow_store()
    assert dict(bridge.feed.subscriptions) == {1: "quote", 2: "full"}
    [followed] = [e for e in logs if e["event"] == "subscriptions_followed"]
    assert (followed["added"], followed["removed"], followed["mode_changed"]) == (1, 1, 1)
    assert followed["subscriptions"] == 2
    assert followed["instrument_tokens"] == {"added": [2], "removed": [3], "mode_changed": [1]}


async def test_the_bridges_own_write_is_followed_without_calling_it_an_outside_edit(
    bridge: Bridge,
) -> None:
    """A command's commit the feed has not been reconciled to yet: followed quietly, since a
    ``subscriptions_followed`` warning would blame an operator for the bridge's own write."""
    await bridge.store.replace({1: "ltp"})
    await bridge.feed.reconcile({1: "ltp"})
    await bridge.store.replace({1: "ltp", 5: "full"})  # committed, remembered, not reconciled
    with capture_logs() as logs:
        await bridge._follow_store()
    assert dict(bridge.feed.subscriptions) == {1: "ltp", 5: "full"}
    assert [e["event"] for e in logs if e["event"] == "subscriptions_followed"] == []


async def test_a_resync_retried_through_an_outage_marks_its_connection_reconciled(
    bridge: Bridge, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz stays red until the current connection's subscriptions were checked against
    Redis: a resync that succeeds after retrying must record it, and say so in the log."""
    await redis.hset(KEY, "7", "full")
    load = bridge.store.load
    failures = [RedisConnectionError("Redis restarting")]

    async def flaky_load() -> dict[int, Mode]:
        if failures:
            raise failures.pop()
        return await load()

    monkeypatch.setattr(bridge.store, "load", flaky_load)
    bridge.feed.stats.connections = 3
    with capture_logs() as logs:
        bridge._on_connect(bridge.feed)
        assert bridge._resync_task is not None
        await asyncio.wait_for(bridge._resync_task, 5)
    assert bridge._resynced_connection == 3
    assert dict(bridge.feed.subscriptions) == {7: "full"}
    events = [(e["event"], e.get("what")) for e in logs]
    assert ("redis_unavailable", "resync") in events
    assert ("redis_recovered", "resync") in events
    [resynced] = [e for e in logs if e["event"] == "subscriptions_resynced"]
    assert resynced["subscriptions"] == 1


async def test_a_connect_says_so_and_cancels_the_previous_connections_resync(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operators and /readyz see ``connected`` (state and event). A previous connection's
    resync still waiting on Redis is cancelled: finishing later, it would mark the older
    connection reconciled over the newer one."""
    events: list[bytes] = []
    monkeypatch.setattr(bridge.publisher, "publish_event", events.append)
    stuck = asyncio.Event()

    async def waiting_load() -> dict[int, Mode]:
        await stuck.wait()
        return {}

    monkeypatch.setattr(bridge.store, "load", waiting_load)
    bridge._on_connect(bridge.feed)
    assert bridge.status.state == "connected"
    assert [orjson.loads(e)["event"] for e in events] == ["connected"]
    old = bridge._resync_task
    assert old is not None
    await asyncio.sleep(0.01)
    bridge._on_connect(bridge.feed)
    await asyncio.wait({old}, timeout=1)
    assert old.cancelled()
    stuck.set()
    assert bridge._resync_task is not None
    await bridge._resync_task


async def test_the_guard_checks_existence_each_round_and_compares_in_full_every_few(
    bridge: Bridge, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One cheap EXISTS a round and a full comparison every ``follow_every`` rounds (a full
    HGETALL every second grew memory); a vanished hash is compared at once, and a DEL on the
    same server is followed."""
    await bridge.store.replace({1: "ltp"})
    await bridge.feed.reconcile({1: "ltp"})
    seen: list[str] = []
    exists, follow = bridge.store.exists, bridge._follow_store

    async def counted_exists() -> bool:
        seen.append("exists")
        return await exists()

    async def counted_follow() -> None:
        seen.append("follow")
        await follow()

    monkeypatch.setattr(bridge.store, "exists", counted_exists)
    monkeypatch.setattr(bridge, "_follow_store", counted_follow)
    guard = asyncio.create_task(bridge._guard_subscriptions(interval=0.001, follow_every=3))
    try:
        await wait_until(lambda: len(seen) >= 6)
        assert seen[:6] == ["exists", "exists", "follow", "exists", "exists", "follow"]
        await redis.delete(KEY)  # an operator's DEL
        await wait_until(lambda: not bridge.feed.subscriptions)
    finally:
        guard.cancel()
        await asyncio.wait({guard})
    assert await redis.exists(KEY) == 0  # followed, not written back


async def test_the_guard_waits_between_rounds_and_survives_a_surprise(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard sleeps its interval between rounds (not a busy loop on Redis), and an
    unexpected error in a round is logged and the guard goes on."""
    rounds = 0

    async def surprising_exists() -> bool:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            raise ValueError("something odd in Redis")
        return True

    monkeypatch.setattr(bridge.store, "exists", surprising_exists)
    started = time.monotonic()
    with capture_logs() as logs:
        guard = asyncio.create_task(bridge._guard_subscriptions(interval=0.05, follow_every=1000))
        await wait_until(lambda: rounds >= 3)  # it went on after the surprise
        elapsed = time.monotonic() - started
        guard.cancel()
        await asyncio.wait({guard})
    assert elapsed >= 0.14  # three rounds, each after a 0.05 s wait (load only slows it)
    assert [e["event"] for e in logs] == ["subscriptions_guard_failed"]
