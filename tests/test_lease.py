"""The namespace lease (bridge/lease.py), on both of its paths.

``script``: a real Redis, where the renewal and release are Lua scripts (the path production
takes). ``watch``: fakeredis, which refuses scripting, so the lease falls back to
``WATCH``/``MULTI`` after logging it once. Every behaviour must hold on both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import orjson
import pytest
from helpers import MakeRedis
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from structlog.testing import capture_logs

from bridge.lease import DEFAULT_TTL, LeaseState, NamespaceLease
from bridge.redis_client import create_redis
from bridge.transports import FencedTransport, NotLeaseholder


@pytest.fixture(params=["script", "watch"])
async def client(
    request: pytest.FixtureRequest, server: fakeredis.FakeServer, namespace: str
) -> AsyncIterator[Redis]:
    if request.param == "script":
        redis: Redis = Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        redis = fakeredis.FakeAsyncRedis(server=server)
    yield redis
    await redis.delete(f"{namespace}:lock")
    await redis.aclose()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_the_first_holds_the_second_waits(client: Redis, namespace: str) -> None:
    first, second = NamespaceLease(client, namespace), NamespaceLease(client, namespace)
    assert await first.acquire() is LeaseState.HELD
    assert first.held
    assert first.valid()
    assert await second.acquire() is LeaseState.TAKEN
    assert not second.held
    assert not second.valid()
    assert second.holder == first.identity
    who = orjson.loads(first.identity)
    assert second.describe_holder() == f"{who['host']} pid {who['pid']} since {who['since']}"
    assert second.holder_is_local()  # same machine
    assert await client.get(f"{namespace}:lock") == first.identity
    assert 0 < await client.pttl(f"{namespace}:lock") <= DEFAULT_TTL * 1000


async def test_renew_extends_only_our_own_lease(client: Redis, namespace: str) -> None:
    lease = NamespaceLease(client, namespace, ttl=60)
    assert await lease.acquire() is LeaseState.HELD
    await client.pexpire(lease.key, 500)
    assert await lease.renew() is LeaseState.HELD
    assert await client.pttl(lease.key) > 50_000


async def test_a_vanished_lease_is_taken_again(client: Redis, namespace: str) -> None:
    """Redis restarted without the key, or it expired while Redis was out of reach."""
    lease = NamespaceLease(client, namespace)
    assert await lease.acquire() is LeaseState.HELD
    await client.delete(lease.key)
    assert await lease.renew() is LeaseState.HELD
    assert await client.get(lease.key) == lease.identity


async def test_a_lease_taken_by_another_is_lost_for_good(client: Redis, namespace: str) -> None:
    lease = NamespaceLease(client, namespace)
    assert await lease.acquire() is LeaseState.HELD
    await client.set(lease.key, b"someone else")
    assert await lease.renew() is LeaseState.TAKEN
    assert lease.lost
    assert not lease.held
    assert not lease.valid()
    assert lease.describe_holder() == "someone else"  # not our JSON: shown as it is
    assert not lease.holder_is_local()
    assert not await lease.release()  # never deletes another holder's lease
    assert await client.get(lease.key) == b"someone else"
    await client.delete(lease.key)
    assert await lease.renew() is LeaseState.HELD  # a standby may hold it again later...
    assert lease.lost
    assert not lease.valid()


async def test_a_lost_set_reply_still_holds(client: Redis, namespace: str) -> None:
    """redis-py retried a SET NX whose reply was lost: the key is already ours."""
    lease = NamespaceLease(client, namespace)
    await client.set(lease.key, lease.identity, px=5000)
    assert await lease.acquire() is LeaseState.HELD


async def test_release_frees_it_for_the_standby_at_once(client: Redis, namespace: str) -> None:
    first, second = NamespaceLease(client, namespace), NamespaceLease(client, namespace)
    assert await first.acquire() is LeaseState.HELD
    assert await first.release()
    assert not first.held
    assert not first.valid()
    assert await client.exists(first.key) == 0
    assert await second.acquire() is LeaseState.HELD


async def test_the_gate_closes_before_redis_would_expire_the_lease(
    client: Redis, namespace: str
) -> None:
    clock = Clock()
    lease = NamespaceLease(client, namespace, ttl=5.0, clock=clock)
    assert not lease.valid()  # never confirmed
    assert await lease.acquire() is LeaseState.HELD
    clock.now += 3.9
    assert lease.valid()
    clock.now += 0.2  # 4.1 s without a confirmed renewal: 80 % of the TTL
    assert not lease.valid()
    assert await lease.renew() is LeaseState.HELD  # confirmed again: open
    assert lease.valid()


async def test_scripting_refused_falls_back_once(
    server: fakeredis.FakeServer, namespace: str
) -> None:
    redis = fakeredis.FakeAsyncRedis(server=server)
    lease = NamespaceLease(redis, namespace)
    with capture_logs() as logs:
        for _ in range(3):
            assert await lease.acquire() is LeaseState.HELD
        assert await lease.release()
    assert [e["event"] for e in logs] == ["lease_scripting_refused"]
    await redis.aclose()


async def test_the_fenced_transport_sends_only_through_an_open_gate() -> None:
    sent: list[list[bytes]] = []

    async def inner(flat: list[bytes]) -> int:
        sent.append(flat)
        return 0

    gate = [False]
    fenced = FencedTransport(inner, lambda: gate[0])
    with pytest.raises(NotLeaseholder):
        await fenced([b"ch", b"msg"])
    assert sent == []
    gate[0] = True
    assert await fenced([b"ch", b"msg"]) == 0
    assert sent == [[b"ch", b"msg"]]


@pytest.mark.redis
async def test_after_a_redis_restart_the_standby_lets_the_holder_reclaim(
    private_redis: MakeRedis, namespace: str
) -> None:
    """Redis restarts empty: the key is gone but its holder lives. A standby that took it at once
    would start with the restarted server's empty subscription set while the holder, which
    would have written its set back, exits 5. The standby waits one TTL instead."""
    server = await private_redis()
    clock = Clock()
    # Clients that retry, as the bridge's do: the first call after the restart finds its
    # connection closed.
    holder_client, standby_client = create_redis(server.url), create_redis(server.url)
    holder = NamespaceLease(holder_client, namespace, clock=clock)
    standby = NamespaceLease(standby_client, namespace, clock=clock)
    try:
        assert await holder.acquire() is LeaseState.HELD
        assert await standby.acquire() is LeaseState.TAKEN
        await server.kill()
        await server.start()
        with capture_logs() as logs:
            assert await standby.acquire() is LeaseState.TAKEN  # free, but left alone
        assert [log["event"] for log in logs] == ["lease_restart_grace"]
        assert await standby_client.get(f"{namespace}:lock") is None
        clock.now += 1.0
        assert await holder.renew() is LeaseState.HELD  # re-claimed within a second
        assert await standby.acquire() is LeaseState.TAKEN
        assert standby.holder == holder.identity
        # A holder that died with the restart is replaced one TTL later, as if it had expired.
        await server.kill()
        await server.start()
        assert await standby.acquire() is LeaseState.TAKEN
        clock.now += DEFAULT_TTL - 0.1
        assert await standby.acquire() is LeaseState.TAKEN
        clock.now += 0.1
        assert await standby.acquire() is LeaseState.HELD
        assert await standby.renew() is LeaseState.HELD
        assert await holder.renew() is LeaseState.TAKEN
        assert holder.lost
    finally:
        await holder_client.aclose()
        await standby_client.aclose()


async def test_without_info_a_standby_takes_a_free_lease_at_once(
    server: fakeredis.FakeServer, namespace: str
) -> None:
    """Where INFO is refused (fakeredis here, an ACL or a proxy) a restart cannot be told from a
    release: the free lease is taken at once, as before."""
    redis = fakeredis.FakeAsyncRedis(server=server)
    first, second = NamespaceLease(redis, namespace), NamespaceLease(redis, namespace)
    assert await first.acquire() is LeaseState.HELD
    assert await second.acquire() is LeaseState.TAKEN
    await redis.delete(f"{namespace}:lock")
    assert await second.acquire() is LeaseState.HELD
    await redis.aclose()


@pytest.mark.redis
async def test_a_redis_that_cannot_persist_keeps_the_gate_open(
    private_redis: MakeRedis, namespace: str
) -> None:
    """MISCONF (a failed save; a full disk under appendonly yes) refuses writes to everyone but
    still takes PUBLISH: like out of memory, nobody can take the lease, so the ticks flow."""
    server = await private_redis("--save", "3600 1", "--dir", "/proc")  # no file can go there
    client = create_redis(server.url)
    clock = Clock()
    lease = NamespaceLease(client, namespace, clock=clock)
    try:
        assert await lease.acquire() is LeaseState.HELD
        await client.bgsave()
        for _ in range(100):  # the failed save makes the server refuse writes
            if (await client.info("persistence"))["rdb_last_bgsave_status"] == "err":
                break
            await asyncio.sleep(0.05)
        for _ in range(10):  # ten renewals, each refused with MISCONF
            clock.now += 1.0
            with pytest.raises(ResponseError, match=r"^MISCONF"):
                await lease.renew()
            assert lease.valid()
        assert await client.publish(f"{namespace}:ticks:1", b"x") == 0  # accepted
    finally:
        await client.aclose()


async def test_a_standby_that_saw_the_holder_takes_over_at_once_after_a_clean_stop(
    client: Redis, namespace: str
) -> None:
    """A rolling update: the standby has seen the holder (same server, no restart), the holder
    stops cleanly. The standby takes over at its next attempt, not a TTL later, and publishes:
    having waited as a standby is not having lost the lease."""
    first, second = NamespaceLease(client, namespace), NamespaceLease(client, namespace)
    assert not second.held
    assert second.describe_holder() == "unknown"
    assert await first.acquire() is LeaseState.HELD
    assert await second.acquire() is LeaseState.TAKEN
    assert await second.acquire() is LeaseState.TAKEN
    assert not second.lost
    assert await first.release()
    with capture_logs() as logs:
        assert await second.acquire() is LeaseState.HELD
    assert logs == []  # no restart grace on the same server
    assert second.valid()
    assert not second.lost
    assert second.holder == second.identity


async def test_a_watched_renewal_of_our_own_lease_takes_one_round(
    server: fakeredis.FakeServer, namespace: str
) -> None:
    """Without scripting the renewal extends our key under WATCH; it must not loop until the
    key expires (the gate would close and a standby could step in meanwhile)."""
    redis = fakeredis.FakeAsyncRedis(server=server)
    lease = NamespaceLease(redis, namespace, ttl=60)
    try:
        assert await lease.acquire() is LeaseState.HELD
        await redis.pexpire(lease.key, 30_000)
        async with asyncio.timeout(1):
            assert await lease.renew() is LeaseState.HELD
        assert await redis.pttl(lease.key) > 50_000
    finally:
        await redis.aclose()


async def test_a_watched_renewal_never_overwrites_a_lease_taken_meanwhile(
    server: fakeredis.FakeServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our key expired; a standby takes it between our GET and our SET: ours must be SET NX,
    or two bridges would both publish."""
    redis = fakeredis.FakeAsyncRedis(server=server)
    lease = NamespaceLease(redis, namespace)
    try:
        assert await lease.acquire() is LeaseState.HELD
        await redis.delete(lease.key)
        real_set = redis.set

        async def standby_first(*args: Any, **kwargs: Any) -> Any:
            await real_set(lease.key, b"standby", nx=True)
            return await real_set(*args, **kwargs)

        monkeypatch.setattr(redis, "set", standby_first)
        assert await lease.renew() is LeaseState.TAKEN
        assert lease.lost
        assert await redis.get(lease.key) == b"standby"
    finally:
        await redis.aclose()


@pytest.mark.parametrize("refusal", [OutOfMemoryError, ReadOnlyError])
async def test_a_redis_refusing_writes_to_everyone_keeps_the_gate_open(
    server: fakeredis.FakeServer, namespace: str, refusal: type[ResponseError]
) -> None:
    """Out of memory or a read-only replica: nobody can take the lease, PUBLISH still works, so
    the ticks keep flowing; the renewal still raises (a failure to report)."""
    redis = fakeredis.FakeAsyncRedis(server=server)
    clock = Clock()
    lease = NamespaceLease(redis, namespace, clock=clock)

    async def refused(**_: Any) -> Any:
        raise refusal("refused")

    try:
        assert await lease.acquire() is LeaseState.HELD
        lease._renew_script = refused  # type: ignore[assignment]
        for _ in range(10):
            clock.now += 1.0
            with pytest.raises(refusal):
                await lease.renew()
            assert lease.valid()
    finally:
        await redis.aclose()


async def test_another_script_error_is_raised_not_taken_for_scripting_refused(
    server: fakeredis.FakeServer, namespace: str
) -> None:
    """Only NOPERM or an unknown command means scripting is unavailable for good; any other
    error is raised, and the next renewal uses the script again."""
    redis = fakeredis.FakeAsyncRedis(server=server)
    lease = NamespaceLease(redis, namespace)

    async def failing(**_: Any) -> Any:
        raise ResponseError("ERR Error running script: something transient")

    try:
        assert await lease.acquire() is LeaseState.HELD
        lease._renew_script = failing  # type: ignore[assignment]
        lease._release_script = failing  # type: ignore[assignment]
        with pytest.raises(ResponseError, match="transient"):
            await lease.renew()
        with pytest.raises(ResponseError, match="transient"):
            await lease.release()
        assert lease._scripting
    finally:
        await redis.aclose()
