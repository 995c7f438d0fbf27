"""End to end: ``python -m bridge run`` as a subprocess, the Simulator in-process, real Redis.

Driven only the way users drive the bridge: ``RPUSH <ns>:control``, replies by id, and
subscribers on ``<ns>:ticks:*`` and ``<ns>:events``.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from helpers import (
    FULL_KEYS,
    INDEX_FULL_KEYS,
    INDEX_QUOTE_KEYS,
    LTP_KEYS,
    QUOTE_KEYS,
    TOKEN,
    BridgeProcess,
    Launch,
    MakeRedis,
    bridge_env,
    command,
    free_port,
    wait_until,
)
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.kite.codec import encode_raw_frame
from bridge.redis_client import acl_rules, create_redis
from bridge.simulator.server import Simulator

pytestmark = [pytest.mark.redis, pytest.mark.slow]

NIFTY, BANKNIFTY, INFY, RELIANCE, SBIN = 256265, 260105, 408065, 738561, 779521


StartBridge = Callable[..., Awaitable[BridgeProcess]]


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(
        access_tokens={TOKEN}, tick_interval=0.05, heartbeat_interval=0.3, seed=7
    ) as simulator:
        yield simulator


@pytest.fixture
def start_bridge(launch: Launch, sim: Simulator, redis_url: str) -> StartBridge:
    """``await start_bridge(**env)``: ``bridge run`` on ``sim`` and ``redis_url``, no HTTP port."""
    return functools.partial(launch, sim, redis_url, BRIDGE_HTTP_PORT="0")


@pytest.fixture
async def redis(redis_url: str, namespace: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    keys = [key async for key in client.scan_iter(f"{namespace}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


class Listener:
    """Collects everything published under ``<ns>:*`` in the background."""

    def __init__(self, url: str, namespace: str) -> None:
        self.client = Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.namespace = namespace
        self.messages: list[tuple[str, Any]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pubsub.psubscribe(f"{self.namespace}:*")
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for msg in self.pubsub.listen():
            if msg["type"] == "pmessage":
                self.messages.append((msg["channel"].decode(), orjson.loads(msg["data"])))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.client.aclose()

    def ticks(self, token: int) -> list[dict[str, Any]]:
        channel = f"{self.namespace}:ticks:{token}"
        return [data for ch, data in self.messages if ch == channel]

    def events(self, name: str) -> list[dict[str, Any]]:
        channel = f"{self.namespace}:events"
        return [d for ch, d in self.messages if ch == channel and d.get("event") == name]


@pytest.fixture
async def listener(redis_url: str, namespace: str) -> AsyncIterator[Listener]:
    listening = Listener(redis_url, namespace)
    await listening.start()
    yield listening
    await listening.close()


async def status(redis: Redis, namespace: str) -> dict[str, str]:
    raw = await redis.hgetall(f"{namespace}:status")
    return {_text(k): _text(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def test_commands_ticks_replies_dead_letters_and_reconnect(
    start_bridge: StartBridge, sim: Simulator, redis: Redis, namespace: str, listener: Listener
) -> None:
    bridge = await start_bridge()
    await sim.wait_for(lambda: bool(sim.connections), 10)

    result = await command(
        redis,
        namespace,
        {"id": "s1", "action": "subscribe", "mode": "full", "tokens": [NIFTY, INFY]},
    )
    assert result["ok"] is True
    assert result["subscriptions"] == {str(NIFTY): "full", str(INFY): "full"}
    await redis.rpush(f"{namespace}:control", f"subscribe quote {BANKNIFTY} {RELIANCE}")
    await redis.rpush(f"{namespace}:control", f"subscribe ltp {SBIN}")
    expected_keys = {
        NIFTY: set(INDEX_FULL_KEYS),
        INFY: set(FULL_KEYS),
        BANKNIFTY: set(INDEX_QUOTE_KEYS),
        RELIANCE: set(QUOTE_KEYS),
        SBIN: set(LTP_KEYS),
    }
    await wait_until(lambda: all(listener.ticks(t) for t in expected_keys), within=10)
    for token, keys in expected_keys.items():
        tick = listener.ticks(token)[-1]
        assert set(tick) == keys, token
        assert tick["instrument_token"] == token
    assert len(listener.ticks(INFY)[-1]["depth"]["buy"]) == 5

    # list + reply by id
    result = await command(redis, namespace, {"id": "l1", "action": "list"})
    assert result["subscriptions"] == {
        str(NIFTY): "full",
        str(BANKNIFTY): "quote",
        str(INFY): "full",
        str(RELIANCE): "quote",
        str(SBIN): "ltp",
    }
    await wait_until(lambda: any(e.get("id") == "l1" for e in listener.events("command")))

    # unsubscribe stops the ticks
    await command(redis, namespace, {"id": "u1", "action": "unsubscribe", "tokens": [INFY]})
    await sim.wait_for(lambda: INFY not in sim.subscriptions(), 5)
    await asyncio.sleep(0.3)  # frames already on the wire drain
    seen = len(listener.ticks(INFY))
    await asyncio.sleep(0.5)  # ten tick intervals
    assert len(listener.ticks(INFY)) == seen
    assert listener.ticks(SBIN)  # others still flow

    # a bad command: error result + dead letter, the bridge carries on
    result = await command(redis, namespace, {"id": "bad", "action": "subscribe", "tokens": ["x"]})
    assert result["ok"] is False
    assert "bad token" in result["error"]
    dead = await redis.lrange(f"{namespace}:control:dead", 0, -1)
    assert [orjson.loads(d)["error"] for d in dead] == [result["error"]]
    assert bridge.alive()

    # text frames: order updates to <ns>:orders, errors and notices as events
    await sim.send_order({"order_id": "151220000000000", "status": "COMPLETE"})
    await sim.send_text('{"type": "error", "data": "too many instruments"}')
    await sim.send_text('{"type": "message", "data": "market closes early"}')
    await sim.send_text('{"type": "notice", "data": {"segment": "NFO"}}')
    # Documented as strings; any other shape is passed on as sent, not dropped.
    await sim.send_text('{"type": "error", "data": {"code": 429}}')
    await sim.send_text('{"type": "message", "data": ["a", "b"]}')
    orders = f"{namespace}:orders"
    await wait_until(lambda: any(ch == orders for ch, _ in listener.messages))
    assert next(d for ch, d in listener.messages if ch == orders)["order_id"] == "151220000000000"
    await wait_until(lambda: len(listener.events("kite_message")) == 3)
    await wait_until(lambda: len(listener.events("kite_error")) == 2)
    assert [e["data"] for e in listener.events("kite_error")] == [
        "too many instruments",
        {"code": 429},
    ]
    assert listener.events("kite_message")[0]["data"] == "market closes early"
    assert "type" not in listener.events("kite_message")[0]
    assert listener.events("kite_message")[1]["data"] == {"segment": "NFO"}
    assert listener.events("kite_message")[1]["type"] == "notice"
    assert listener.events("kite_message")[2]["data"] == ["a", "b"]

    # drop -> reconnect -> the same subscriptions, replayed by the bridge
    desired = {NIFTY: "full", BANKNIFTY: "quote", RELIANCE: "quote", SBIN: "ltp"}
    first = max(sim.connections)
    await sim.drop()
    await sim.wait_for(lambda: bool(sim.connections) and max(sim.connections) > first, 10)
    await sim.wait_for(lambda: sim.subscriptions() == desired, 5)
    replayed = [req for cid, req in sim.received if cid == max(sim.connections)]
    assert {t for req in replayed if req["a"] == "subscribe" for t in req["v"]} == set(desired)
    await wait_until(
        lambda: bool(listener.events("connected")) and len(listener.events("connected")) >= 2
    )
    assert listener.events("disconnected")
    assert listener.events("reconnecting")[0]["attempt"] == 1
    state = await status(redis, namespace)
    assert state["state"] == "connected"
    assert state["subscriptions"] == "4"
    assert int(state["reconnects_total"]) >= 1
    assert int(state["ticks_total"]) > 0

    code, took = await bridge.stop()
    assert code == 0
    assert took < 5.0
    assert (await status(redis, namespace))["state"] == "stopped"
    await wait_until(lambda: bool(listener.events("stopped")))


async def test_restart_restores_subscriptions_and_requeues_unfinished_commands(
    start_bridge: StartBridge, sim: Simulator, redis: Redis, namespace: str, listener: Listener
) -> None:
    bridge = await start_bridge(BRIDGE_SUBSCRIBE=f"ltp:{SBIN}")
    await sim.wait_for(lambda: sim.subscriptions() == {SBIN: "ltp"}, 10)
    await command(redis, namespace, {"id": "a", "action": "subscribe", "tokens": [RELIANCE]})
    await sim.wait_for(lambda: sim.subscriptions() == {SBIN: "ltp", RELIANCE: "quote"}, 5)
    code, took = await bridge.stop(signal.SIGINT)
    assert (code, took < 5.0) == (0, True)
    await sim.wait_for(lambda: not sim.connections, 5)

    # A command a crashed run left in processing, and one queued while no bridge ran.
    await redis.rpush(f"{namespace}:control:processing", f"mode full {RELIANCE}")
    await redis.rpush(f"{namespace}:control", f"unsubscribe {SBIN}")
    handshakes = len(sim.handshakes)
    bridge = await start_bridge()

    # The first handshake already subscribes the stored set, before any command runs.
    def first_requests() -> list[dict[str, object]]:
        newest = max(sim.connections, default=None)
        return [req for cid, req in sim.received if cid == newest]

    await sim.wait_for(lambda: len(sim.handshakes) > handshakes and bool(first_requests()), 10)
    assert first_requests()[0]["a"] in ("subscribe", "mode")
    await sim.wait_for(lambda: sim.subscriptions() == {RELIANCE: "full"}, 5)
    assert await redis.llen(f"{namespace}:control:processing") == 0
    stored = await redis.hgetall(f"{namespace}:subscriptions")
    assert stored == {str(RELIANCE).encode(): b"full"}
    await wait_until(
        lambda: bool(listener.ticks(RELIANCE)) and listener.ticks(RELIANCE)[-1]["mode"] == "full",
        within=5,
    )
    code, _ = await bridge.stop()
    assert code == 0


async def test_a_hand_edit_of_the_desired_set_is_followed_within_seconds(
    start_bridge: StartBridge, sim: Simulator, redis: Redis, namespace: str
) -> None:
    """Redis owns the set: editing the hash directly moves the feed too, and is logged."""
    bridge = await start_bridge(BRIDGE_SUBSCRIBE=f"full:{NIFTY},{SBIN}")
    await sim.wait_for(lambda: sim.subscriptions() == {NIFTY: "full", SBIN: "full"}, 10)
    # After the connect's own resync from Redis, or it could be the one to pick up the edit.
    await wait_until(lambda: '"subscriptions_resynced"' in bridge.log.read_text(), within=10)
    connection = max(sim.connections)
    key = f"{namespace}:subscriptions"
    await redis.hset(key, mapping={str(RELIANCE): "ltp", str(SBIN): "quote", "junk": "full"})
    await redis.hdel(key, str(NIFTY))
    await sim.wait_for(lambda: sim.subscriptions() == {RELIANCE: "ltp", SBIN: "quote"}, 10)
    assert max(sim.connections) == connection  # no reconnect needed
    # Ordinary commands afterwards are not mistaken for outside edits.
    await command(redis, namespace, {"id": "c", "action": "unsubscribe", "tokens": [SBIN]})
    await sim.wait_for(lambda: sim.subscriptions() == {RELIANCE: "ltp"}, 5)
    for n in range(20):
        await command(
            redis,
            namespace,
            {
                "id": f"m{n}",
                "action": "mode",
                "mode": "full" if n % 2 else "ltp",
                "tokens": [RELIANCE],
            },
        )
    await asyncio.sleep(5.5)  # a full guard round or more after the commands
    # Deleting the whole hash on the same server is an edit too (not a Redis restart), and
    # noticed at the next one-second round.
    await redis.delete(key)
    await sim.wait_for(lambda: sim.subscriptions() == {}, 3)
    code, _ = await bridge.stop()
    assert code == 0
    followed = [
        orjson.loads(line)
        for line in bridge.log.read_text().splitlines()
        if '"subscriptions_followed"' in line
    ]
    assert [(f["added"], f["removed"], f["mode_changed"]) for f in followed] in (
        [(1, 1, 1), (0, 1, 0)],  # both edits seen in one guard round, then the DEL
        [(1, 0, 1), (0, 1, 0), (0, 1, 0)],  # or the HSET first, then the HDEL, then the DEL
    )
    # Which instruments, by number (not masked as if they were secrets).
    assert followed[0]["instrument_tokens"]["added"] == [RELIANCE]
    assert followed[0]["instrument_tokens"]["mode_changed"] == [SBIN]
    assert followed[-1]["instrument_tokens"] == {"removed": [RELIANCE]}
    [junk] = [
        orjson.loads(line)
        for line in bridge.log.read_text().splitlines()
        if '"subscription_entry_invalid"' in line
    ]  # once, though the guard read it every round
    assert (junk["instrument_token"], junk["mode"]) == ("junk", "full")


async def test_a_price_beyond_int32_in_a_commodity_segment_is_published_as_sent(
    start_bridge: StartBridge, sim: Simulator, redis: Redis, namespace: str, listener: Listener
) -> None:
    # NSE commodity (segment 12, prices / 10,000) silver at Rs 2,50,000.0000 per kg: 2.5e9 raw,
    # which a signed reader would publish as -1,79,496.7296.
    silver = (0x4D2 << 8) | 12
    bridge = await start_bridge(BRIDGE_SUBSCRIBE=f"full:{silver}")
    await sim.wait_for(lambda: sim.subscriptions() == {silver: "full"}, 10)
    raw = 2_500_000_000
    quote = struct.pack(">IIIIIIIIIII", silver, raw, 1, raw, 30, 5, 6, raw, raw, raw, raw - 10_000)
    depth = b"".join(struct.pack(">IIH2x", 1, raw - level * 100, 1) for level in range(10))
    await sim.send_binary(encode_raw_frame([quote + struct.pack(">IIIII", 0, 0, 0, 0, 0) + depth]))
    await wait_until(lambda: any(t["last_price"] == 250_000.0 for t in listener.ticks(silver)))
    (tick,) = [t for t in listener.ticks(silver) if t["last_price"] == 250_000.0]
    assert tick["ohlc"]["close"] == 249_999.0
    assert [level["price"] for level in tick["depth"]["sell"]] == [
        249_999.95,
        249_999.94,
        249_999.93,
        249_999.92,
        249_999.91,
    ]
    code, _ = await bridge.stop()
    assert code == 0


async def test_a_token_that_never_ticks_is_kept_and_the_feed_stays_up(
    start_bridge: StartBridge, sim: Simulator, redis: Redis, namespace: str, listener: Listener
) -> None:
    """A typo in a token: Kite accepts it and it never ticks. The subscription stands, and the
    heartbeats keep an otherwise silent connection from being called stale (liveness 1 s)."""
    typo = 40_806_500
    sim.unlisted = frozenset({typo})
    bridge = await start_bridge(BRIDGE_HTTP_PORT=str(free_port()))
    result = await command(redis, namespace, {"id": "t", "action": "subscribe", "tokens": [typo]})
    assert result["ok"] is True
    await sim.wait_for(lambda: sim.subscriptions() == {typo: "quote"}, 10)
    await asyncio.sleep(4)  # four liveness windows without a tick
    assert listener.ticks(typo) == []
    assert listener.events("stale") == []
    assert listener.events("reconnecting") == []
    assert len(sim.connections) == 1
    assert await bridge.ready()
    metrics = await bridge.metrics()
    assert metrics.get("bridge_reconnects_total", cause="stale") == 0
    code, _ = await bridge.stop()
    assert code == 0


async def test_expired_token_exits_3_quickly(
    start_bridge: StartBridge, sim: Simulator, redis: Redis, namespace: str, listener: Listener
) -> None:
    bridge = await start_bridge()
    await sim.wait_for(lambda: bool(sim.connections), 10)
    sim.expire_token(TOKEN)
    started = time.monotonic()
    await sim.drop()
    assert await bridge.wait(5) == 3
    assert time.monotonic() - started < 3
    assert len(sim.handshakes) == 2  # no retry storm after the 403
    assert (await status(redis, namespace))["state"] == "auth_failed"
    await wait_until(lambda: bool(listener.events("auth_failed")))
    assert listener.events("auth_failed")[0]["status"] == 403


async def test_a_silent_feed_is_declared_stale_and_reconnected(
    start_bridge: StartBridge, sim: Simulator, redis: Redis, namespace: str, listener: Listener
) -> None:
    bridge = await start_bridge(BRIDGE_SUBSCRIBE=f"ltp:{SBIN}")
    await sim.wait_for(lambda: sim.subscriptions() == {SBIN: "ltp"}, 10)
    first = max(sim.connections)
    sim.stall()
    await wait_until(lambda: bool(listener.events("stale")), within=5)
    sim.stall(False)
    await sim.wait_for(lambda: max(sim.connections, default=0) > first, 10)
    await sim.wait_for(lambda: sim.subscriptions() == {SBIN: "ltp"}, 5)
    assert listener.events("disconnected")[0]["code"] == 1006
    code, _ = await bridge.stop()
    assert code == 0


async def test_retries_exhausted_exits_4(start_bridge: StartBridge) -> None:
    nobody = f"ws://127.0.0.1:{free_port()}"
    bridge = await start_bridge(KITE_WS_URL=nobody, BRIDGE_MAX_RETRIES="1")
    assert await bridge.wait(10) == 4


async def test_bridge_subscribe_past_kites_limit_with_the_stored_set_exits_2(
    start_bridge: StartBridge, sim: Simulator, redis: Redis, namespace: str
) -> None:
    key = f"{namespace}:subscriptions"
    stored = {str(token): "ltp" for token in range(1, 2999)}  # 2998 tokens
    await redis.hset(key, mapping=stored)  # type: ignore[arg-type]
    bridge = await start_bridge(BRIDGE_SUBSCRIBE="full:1,5000,5001,5002")  # 1 known + 3 new
    assert await bridge.wait(10) == 2
    log = bridge.log.read_text()
    assert '"invalid_configuration"' in log
    # ... and the one line of every config error, as the last line on stderr.
    last = log.strip().splitlines()[-1]
    assert last.startswith("bridge: config error: BRIDGE_SUBSCRIBE: its 4 tokens and the 2998")
    assert "BRIDGE_SUBSCRIBE: its 4 tokens and the 2998 stored" in log
    assert "make 3001, above Kite's limit of 3000" in log
    assert await redis.hgetall(key) == {k.encode(): b"ltp" for k in stored}  # untouched
    assert not sim.handshakes  # never got as far as Kite
    # Exactly at the limit is fine.
    await redis.hdel(key, "2")
    bridge = await start_bridge(BRIDGE_SUBSCRIBE="full:1,5000,5001,5002")
    await wait_until(lambda: _equals(redis.hlen(key), 3000), within=10)
    assert (await redis.hget(key, "1")) == b"full"
    code, _ = await bridge.stop()
    assert code == 0


async def test_sigterm_while_waiting_for_redis_exits_0(start_bridge: StartBridge) -> None:
    bridge = await start_bridge(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    await wait_until(lambda: '"redis_unavailable"' in bridge.log.read_text(), within=20)
    assert bridge.alive()
    code, took = await bridge.stop()
    assert code == 0
    assert took < 5.0


async def test_a_redis_that_never_answers_is_reported_within_seconds(
    start_bridge: StartBridge,
) -> None:
    """Redis accepts the connection and never replies (a hung server, a broken proxy): the
    start-up says so in the log and in /readyz after one bounded attempt, not after redis-py's
    nested retries (82 s, silent)."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing, keep it open

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        bridge = await start_bridge(
            REDIS_URL=f"redis://127.0.0.1:{port}/0", BRIDGE_HTTP_PORT=str(free_port())
        )
        await wait_until(lambda: '"redis_unavailable"' in bridge.log.read_text(), within=20)
        (line,) = bridge.log_events("redis_unavailable")
        assert line["what"] == "startup:ping"
        assert "no answer from Redis in 10 s" in line["error"]
        code, body = await bridge.readiness()
        assert code == 503
        assert any("no answer from Redis" in reason for reason in body["reasons"])
        assert accepted  # it did reach the "server"
        code, took = await bridge.stop()
        assert code == 0
        assert took < 5.0
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_second_signal_forces_exit(
    start_bridge: StartBridge, private_redis: MakeRedis
) -> None:
    # With Redis hung the graceful shutdown waits out its budgets (flush, status, lease).
    server = await private_redis()
    bridge = await start_bridge(REDIS_URL=server.url, BRIDGE_HTTP_PORT=str(free_port()))
    await wait_until(bridge.ready, within=15)
    server.freeze()
    try:
        bridge.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert bridge.alive()
        code, took = await bridge.stop(signal.SIGINT)
    finally:
        server.thaw()
    assert code == 128 + signal.SIGINT
    assert took < 0.5
    assert '"forced exit"' in bridge.log.read_text()


@pytest.mark.parametrize("optional", [True, False], ids=["with checks", "least"])
async def test_the_documented_acl_is_all_the_bridge_needs(
    start_bridge: StartBridge,
    sim: Simulator,
    namespace: str,
    private_redis: MakeRedis,
    optional: bool,
) -> None:
    """A Redis user with only ``acl_rules`` (docs/operators.md): ticks, commands, replies,
    status and health all work, and nothing is refused along the way."""
    server = await private_redis()
    # Database 1: connecting SELECTs it, which the rules must allow.
    admin = Redis.from_url(server.url.rsplit("/", 1)[0] + "/1")
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "bridge", "on", ">pw", *acl_rules(namespace, optional=optional)
    )
    url = server.url.replace("redis://", "redis://bridge:pw@").rsplit("/", 1)[0] + "/1"
    bridge = await start_bridge(
        REDIS_URL=url, BRIDGE_HTTP_PORT=str(free_port()), BRIDGE_SUBSCRIBE=f"full:{INFY}"
    )
    listener = Listener(url.replace("bridge:pw@", ""), namespace)
    await listener.start()
    try:
        await wait_until(bridge.ready, within=20)
        await wait_until(lambda: bool(listener.ticks(INFY)), within=10)
        result = await command(
            admin, namespace, {"id": "acl", "action": "subscribe", "tokens": [RELIANCE]}
        )
        assert result["ok"] is True
        await wait_until(lambda: bool(listener.ticks(RELIANCE)), within=10)
        code, stderr = await _health(url, namespace, max_age=10)
        assert code == 0, stderr
        metrics = await bridge.metrics()
        assert metrics["bridge_control_redis_errors_total"] == 0
        assert metrics["bridge_publish_errors_total"] == 0
        assert await bridge.ready()
        # ACL LOG: every command the bridge was refused (none), whatever path it took.
        denied = await admin.acl_log()
        refused = {str(entry["object"]) for entry in denied}
        allowed_missing = {"info", "config|get", "role"} if not optional else set()
        assert refused <= allowed_missing, refused
    finally:
        await listener.close()
        await admin.aclose()
    code, _ = await bridge.stop()
    assert code == 0


async def _unready_for(bridge: BridgeProcess, reason: str) -> bool:
    """Whether /readyz answers 503 with a reason containing ``reason`` (False until it listens)."""
    try:
        code, body = await bridge.readiness()
    except OSError:
        return False
    return code == 503 and any(reason in r for r in body["reasons"])


async def _health(url: str, namespace: str, max_age: float) -> tuple[int | None, bytes]:
    """``bridge health --max-age`` as the HEALTHCHECK runs it: exit code and stderr."""
    health = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "health", "--max-age", str(max_age),
        env=bridge_env(REDIS_URL=url, BRIDGE_NAMESPACE=namespace),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await health.communicate()
    return health.returncode, stderr


async def _refused_yet_connected(
    bridge: BridgeProcess, url: str, namespace: str, reason: str, unhealthy: bytes
) -> None:
    """/readyz fails with ``reason`` (Redis's NOPERM) while all else looks fine, and so does
    ``bridge health`` once the failure is older than its ``--max-age``."""
    await wait_until(lambda: _unready_for(bridge, reason), within=20)
    _, body = await bridge.readiness()
    assert body["state"] == "connected"
    assert any("NoPermissionError" in r for r in body["reasons"])
    await asyncio.sleep(1.5)
    code, stderr = await _health(url, namespace, max_age=3)
    assert code == 1
    assert unhealthy in stderr


async def test_ticks_refused_by_an_acl_make_the_bridge_unready_and_unhealthy(
    start_bridge: StartBridge, sim: Simulator, namespace: str, private_redis: MakeRedis
) -> None:
    """An ACL that lets the bridge write its keys and publish events but not the tick channels:
    every tick is refused while the status stays fresh and "connected". /readyz and the
    HEALTHCHECK must say so, and recover when the ACL is fixed."""
    server = await private_redis()
    admin = Redis.from_url(server.url)
    rules = ["on", ">pw", f"~{namespace}:*", "+@all", "resetchannels"]
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "bridge", *rules, f"&{namespace}:events", f"&{namespace}:orders"
    )
    url = server.url.replace("redis://", "redis://bridge:pw@")
    bridge = await start_bridge(
        REDIS_URL=url, BRIDGE_HTTP_PORT=str(free_port()), BRIDGE_SUBSCRIBE=f"full:{INFY}"
    )
    try:
        await _refused_yet_connected(
            bridge, url, namespace, "publishing failing", b"publishing has failed"
        )
        # The ACL fixed: publishing resumes by itself and the bridge is ready again.
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "bridge", "allchannels"
        )

        await wait_until(bridge.ready, within=20)
        assert bridge.alive()
    finally:
        await admin.aclose()
    code, _ = await bridge.stop()
    assert code == 0


async def test_commands_refused_by_an_acl_make_the_bridge_unready_and_unhealthy(
    start_bridge: StartBridge, namespace: str, private_redis: MakeRedis
) -> None:
    """An ACL without BLMOVE: ticks flow, the status stays fresh and "connected", yet no command
    is ever taken. /readyz and the HEALTHCHECK must say so, and the command waiting in the list
    must be applied once the ACL is fixed."""
    server = await private_redis()
    admin = Redis.from_url(server.url)
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "bridge", "on", ">pw", f"~{namespace}:*", "allchannels", "+@all",
        "-blmove",
    )  # fmt: skip
    url = server.url.replace("redis://", "redis://bridge:pw@")
    bridge = await start_bridge(REDIS_URL=url, BRIDGE_HTTP_PORT=str(free_port()))
    try:
        await admin.rpush(
            f"{namespace}:control", f'{{"id": "w1", "action": "subscribe", "tokens": [{INFY}]}}'
        )
        await _refused_yet_connected(
            bridge, url, namespace, "control commands failing", b"taking control commands"
        )
        assert await admin.llen(f"{namespace}:control") == 1  # waiting, not lost
        # The ACL fixed: the waiting command is applied and answered, and the bridge is ready.
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "bridge", "+blmove"
        )
        reply = await admin.blpop([f"{namespace}:reply:w1"], timeout=15)
        assert reply is not None
        assert orjson.loads(reply[1])["ok"] is True
        assert await admin.hgetall(f"{namespace}:subscriptions") == {str(INFY).encode(): b"quote"}
        await wait_until(bridge.ready, within=20)
    finally:
        await admin.aclose()
    code, _ = await bridge.stop()
    assert code == 0


async def test_redis_restart_mid_stream_recovers(
    start_bridge: StartBridge, sim: Simulator, namespace: str, private_redis: MakeRedis
) -> None:
    server = await private_redis()
    client = create_redis(server.url)  # retries, like the bridge's own client
    await wait_until(lambda: _try(client.ping()), within=5)
    bridge = await start_bridge(REDIS_URL=server.url)
    listener = Listener(server.url, namespace)
    await listener.start()
    try:
        result = await command(
            client, namespace, {"id": "a", "action": "subscribe", "tokens": [RELIANCE]}
        )
        assert result["ok"] is True
        await wait_until(lambda: bool(listener.ticks(RELIANCE)), within=5)
        await listener.close()
        connection = max(sim.connections)
        # It said at start-up that this Redis keeps nothing across a restart.
        (warning,) = [
            orjson.loads(line)
            for line in bridge.log.read_text().splitlines()
            if '"redis_not_persistent"' in line
        ]
        assert warning["level"] == "warning"
        assert "appendonly yes" in warning["detail"]

        await server.kill()  # kill -9: nothing persisted, every connection reset
        await asyncio.sleep(1.5)  # long enough to outlast redis-py's own quick retries
        assert bridge.alive()
        await server.start()

        listener = Listener(server.url, namespace)
        await wait_until(lambda: _try(listener.start()), within=5)
        # The unpersisted Redis lost the stored set; the bridge writes it back by itself, with
        # no command or reconnect to prompt it, so a bridge restarted now would still find it.
        subscriptions = f"{namespace}:subscriptions"
        await wait_until(lambda: _try(client.ping()), within=5)
        await wait_until(
            lambda: _equals(client.hgetall(subscriptions), {str(RELIANCE).encode(): b"quote"}),
            within=5,
        )
        await wait_until(lambda: bool(listener.ticks(RELIANCE)), within=10)
        # Commands work again. The unpersisted Redis lost the stored set, but the bridge
        # noticed the new server and wrote its set back instead of unsubscribing everything.
        result = await command(
            client, namespace, {"id": "b", "action": "subscribe", "tokens": [SBIN]}
        )
        assert result["ok"] is True
        assert result["subscriptions"] == {str(RELIANCE): "quote", str(SBIN): "quote"}
        assert await client.hgetall(f"{namespace}:subscriptions") == {
            str(RELIANCE).encode(): b"quote",
            str(SBIN).encode(): b"quote",
        }
        await wait_until(lambda: bool(listener.ticks(SBIN)), within=5)
        seen = len(listener.ticks(RELIANCE))
        await wait_until(lambda: len(listener.ticks(RELIANCE)) > seen, within=5)
        assert sim.subscriptions() == {RELIANCE: "quote", SBIN: "quote"}
        # The websocket stayed up through the outage.
        assert max(sim.connections) == connection
        code, _ = await bridge.stop()
        assert code == 0
        log = bridge.log.read_text()
        assert '"redis_unavailable"' in log
        assert '"redis_recovered"' in log
        assert '"subscriptions_restored"' in log
    finally:
        await listener.close()
        await client.aclose()


async def _equals(step: Awaitable[object], expected: object) -> bool:
    try:
        return await step == expected
    except (OSError, RedisConnectionError):
        return False


async def _try(step: Awaitable[object]) -> bool:
    """True once ``step`` succeeds; False while the server refuses connections."""
    try:
        await step
    except (OSError, RedisConnectionError):
        return False
    return True
