"""The service keeps the feed, the desired set in Redis and the commands in step (fakeredis).

Interleavings found by reading the code (an audit after a stale-read race, 2026-11-26): each
test drives one of them deterministically and fails without its fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import fakeredis
import orjson
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from bridge.config import Settings
from bridge.service import Bridge

NS = "r"
KEY = f"{NS}:subscriptions"


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = fakeredis.FakeAsyncRedis()
    yield client
    await client.aclose()


@pytest.fixture
def bridge(redis: Redis) -> Bridge:
    settings = Settings(
        kite_api_key="k",
        kite_access_token=SecretStr("t"),
        kite_ws_url="ws://127.0.0.1:1",
        namespace=NS,
        http_port=0,
    )
    return Bridge(settings, redis=redis, install_signals=False)


class SlowSocket:
    """A websocket whose sends block after the first message (a full write buffer)."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.first = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, message: str) -> None:
        if self.sent:
            await self.release.wait()
        self.sent.append(message)
        self.first.set()

    def subscribed(self) -> set[int]:
        messages = [orjson.loads(m) for m in self.sent]
        return {token for m in messages if m["a"] == "subscribe" for token in m["v"]}


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
    ws = SlowSocket()
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
