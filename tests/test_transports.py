"""The publish transports against a real Redis: order, replies switched off, fallbacks, failures."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import fakeredis
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import NoPermissionError
from structlog.testing import capture_logs

from bridge import transports
from bridge.transports import LuaTransport, PipelineTransport, UnrepliedTransport


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def listener(redis_url: str, namespace: str) -> AsyncIterator[PubSub]:
    client = Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{namespace}:*")
    await pubsub.get_message(timeout=1.0)
    yield pubsub
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()


async def received(pubsub: PubSub, count: int) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    async with asyncio.timeout(5):
        while len(out) < count:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if msg is not None:
                out.append((msg["channel"], msg["data"]))
    assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1) is None
    return out


def batch(namespace: str, start: int, count: int, tokens: int = 7) -> list[bytes]:
    """Flat (channel, message) pairs; messages numbered so order and loss are visible."""
    flat: list[bytes] = []
    for n in range(start, start + count):
        flat += [f"{namespace}:ticks:{n % tokens}".encode(), b'{"n":%d,"pad":"%b"}' % (n, b"x" * n)]
    return flat


def pairs(flat: list[bytes]) -> list[tuple[bytes, bytes]]:
    it = iter(flat)
    return list(zip(it, it, strict=True))


async def reply_calls(admin: Redis) -> int:
    stats = await admin.info("commandstats")
    entry = stats.get("cmdstat_client|reply", {})
    return int(entry.get("calls", 0)) if isinstance(entry, dict) else 0


@pytest.mark.redis
async def test_batches_arrive_in_order_and_only_the_first_waits_for_every_reply(
    redis_url: str, namespace: str, admin: Redis, listener: PubSub
) -> None:
    client = Redis.from_url(redis_url)
    transport = UnrepliedTransport(client)
    first, second = batch(namespace, 0, 5), batch(namespace, 5, 300)
    third = batch(namespace, 305, 1)
    calls = await reply_calls(admin)
    # The first batch is sent with replies, so what nobody hears is counted: only the
    # pattern listener hears these, so none is unheard.
    assert await transport(first) == 0
    assert await reply_calls(admin) == calls + 1  # the CLIENT REPLY ON probe
    assert await transport(second) == 0
    assert await transport(third) == 0
    assert await reply_calls(admin) == calls + 1 + 4  # OFF ... ON around each later batch
    assert await received(listener, 306) == pairs(first + second + third)
    # The connection is the transport's own; the client's pool still serves normal commands.
    assert await client.ping()
    await transport.aclose()
    await client.aclose()


@pytest.mark.redis
async def test_first_batch_counts_messages_nobody_hears(redis_url: str, namespace: str) -> None:
    client = Redis.from_url(redis_url)
    transport = UnrepliedTransport(client)
    assert await transport(batch(namespace, 0, 3)) == 3  # no subscriber at all
    await transport.aclose()
    await client.aclose()


@pytest.mark.redis
async def test_a_killed_connection_fails_the_batch_then_recovers_on_a_new_one(
    redis_url: str, namespace: str, admin: Redis, listener: PubSub
) -> None:
    client = Redis.from_url(redis_url, client_name=f"transport-{namespace}")
    transport = UnrepliedTransport(client)
    assert await transport(batch(namespace, 0, 2)) == 0
    ours = [c["id"] for c in await admin.client_list() if c["name"] == f"transport-{namespace}"]
    assert len(ours) == 1
    assert await admin.client_kill_filter(_id=ours[0]) == 1
    sent = batch(namespace, 2, 3)
    failures = 0
    while True:  # what the publisher does: retry the same batch until it lands
        try:
            await transport(sent)
            break
        except Exception:
            failures += 1
            assert failures < 5
    assert failures >= 1  # the kill was noticed, not papered over
    got = await received(listener, 5)
    assert got == pairs(batch(namespace, 0, 2) + sent)
    await transport.aclose()
    await client.aclose()


@pytest.fixture
async def acl_user(admin: Redis) -> AsyncIterator[tuple[str, str]]:
    """A throwaway ACL user; the test sets its rules."""
    name, password = f"t-{uuid.uuid4().hex[:10]}", uuid.uuid4().hex
    yield name, password
    await admin.acl_deluser(name)


@pytest.mark.redis
async def test_a_server_refusing_client_reply_gets_lua(
    redis_url: str,
    namespace: str,
    admin: Redis,
    listener: PubSub,
    acl_user: tuple[str, str],
) -> None:
    name, password = acl_user
    await admin.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-client"],
    )
    client = Redis.from_url(redis_url, username=name, password=password)
    transport = UnrepliedTransport(client)
    with capture_logs() as logs:
        await transport(batch(namespace, 0, 4))
        await transport(batch(namespace, 4, 4))
    assert [e["fallback"] for e in logs if e["event"] == "publish_transport_fallback"] == ["lua"]
    assert await received(listener, 8) == pairs(batch(namespace, 0, 8))
    await client.aclose()


async def channel_restricted(
    redis_url: str, admin: Redis, acl_user: tuple[str, str], channels: list[str]
) -> Redis:
    """A client of ``acl_user`` allowed everything but channels other than ``channels``."""
    name, password = acl_user
    await admin.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        reset_channels=True,
        channels=channels,
        commands=["+@all"],
    )
    return Redis.from_url(redis_url, username=name, password=password)


@pytest.mark.redis
async def test_a_denied_tick_channel_raises_instead_of_vanishing(
    redis_url: str, namespace: str, admin: Redis, acl_user: tuple[str, str]
) -> None:
    client = await channel_restricted(redis_url, admin, acl_user, ["other:*"])
    transport = UnrepliedTransport(client)
    for _ in range(2):  # and again on the retry: never switched to replies-off unchecked
        with pytest.raises(NoPermissionError):
            await transport(batch(namespace, 0, 2))
    await client.aclose()


@pytest.mark.redis
async def test_a_tick_channel_denied_after_an_allowed_first_batch_is_found_within_seconds(
    redis_url: str, namespace: str, admin: Redis, acl_user: tuple[str, str]
) -> None:
    """The first batch on a connection often holds only the ``connected`` event: an ACL that
    allows ``<ns>:events`` but not the tick channels passed that check, and every later batch,
    sent with replies off, was refused in silence. One batch every ``verify_every`` is checked."""
    client = await channel_restricted(redis_url, admin, acl_user, [f"{namespace}:events"])
    now = [100.0]
    transport = UnrepliedTransport(client, verify_every=5.0, clock=lambda: now[0])
    event = [f"{namespace}:events".encode(), b'{"event":"connected"}']
    assert await transport(event) == 1  # checked, allowed (nobody listens)
    now[0] += 4.9
    assert await transport(batch(namespace, 0, 2)) == 0  # unchecked: refused unseen
    now[0] += 0.1
    with pytest.raises(NoPermissionError):
        await transport(batch(namespace, 2, 2))
    await client.aclose()


@pytest.mark.redis
@pytest.mark.parametrize("kind", [LuaTransport, PipelineTransport, UnrepliedTransport])
async def test_every_transport_publishes_the_same(
    redis_url: str, namespace: str, listener: PubSub, kind: type[UnrepliedTransport]
) -> None:
    client = Redis.from_url(redis_url)
    transport = kind(client)
    for start in (0, 10):
        await transport(batch(namespace, start, 10))
    assert await received(listener, 20) == pairs(batch(namespace, 0, 20))
    await client.aclose()


async def test_fakeredis_takes_the_unreplied_path_too() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeAsyncRedis(server=server)
    sub = fakeredis.FakeAsyncRedis(server=server).pubsub()
    await sub.subscribe("t:ticks:1")
    await sub.get_message(timeout=0.5)
    transport = UnrepliedTransport(client)
    flat = [b"t:ticks:1", b"a", b"t:ticks:2", b"b"]
    assert await transport(flat) == 1
    assert await transport(flat) == 0  # replies off: nothing is counted
    got = []
    for _ in range(2):
        msg = await sub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        assert msg is not None
        got.append(msg["data"])
    assert got == [b"a", b"a"]
    assert transport._fallback is None


@pytest.mark.redis
async def test_a_server_ignoring_client_reply_off_gets_lua_not_a_loop(
    redis_url: str, namespace: str, listener: PubSub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for a proxy that accepts CLIENT REPLY but forwards replies anyway: the "OFF"
    # becomes a PING, so every command of the batch answers and the first answer is PONG.
    monkeypatch.setattr(transports, "_REPLY_OFF", b"*1\r\n$4\r\nPING\r\n")
    client = Redis.from_url(redis_url)
    transport = UnrepliedTransport(client)
    first, second, third = (batch(namespace, start, 3) for start in (0, 3, 6))
    with capture_logs() as logs:
        await transport(first)  # checked batch, replies on: fine
        await transport(second)  # answers out of step: switch to Lua and send it again
        await transport(third)
    fallbacks = [e for e in logs if e["event"] == "publish_transport_fallback"]
    assert [e["fallback"] for e in fallbacks] == ["lua"]
    assert "CLIENT REPLY OFF ignored" in fallbacks[0]["error"]
    # At-least-once: the second batch twice, in order, then the third once.
    assert await received(listener, 12) == pairs(first + second + second + third)
    assert await client.ping()
    await client.aclose()
