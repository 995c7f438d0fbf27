"""Chaos on the Redis side: the server killed and restarted mid-stream, a subscriber that stalls.

Both use a redis-server of their own (a free port, ``appendfsync always``) so that it can be
killed with SIGKILL and reconfigured without touching the shared server.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from typing import Any

import orjson
import pytest
from helpers import Launch, MakeRedis, free_port, redis_up, wait_until
from helpers import command as send_command
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.redis_client import create_redis
from chaos.harness import Listen, MakeSim, scaled
from chaos.test_feed_faults import MODES, apply, assert_ticks_accounted, quiesce

BASE_TOKEN = 5000 * 256 + 1  # NSE segment; 500 consecutive tokens from here
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class ExactlyOncePusher:
    """RPUSHes each command exactly once although the server may die mid-request.

    A push whose reply was lost is ambiguous: it may have landed. Before pushing again we look
    for it where it can be by now, in the order it moves: the control list, the processing
    list, its reply. With ``appendfsync always`` an acknowledged or landed push survives the
    kill, so "not found anywhere" means "never landed".
    """

    def __init__(self, url: str, namespace: str) -> None:
        self.url = url
        self.client = Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2)
        self.control = f"{namespace}:control"
        self.processing = f"{namespace}:control:processing"
        self.reply = f"{namespace}:reply:"
        self.ambiguous = 0

    async def push(self, cid: str, raw: bytes) -> None:
        while True:
            try:
                await self.client.rpush(self.control, raw)
                return
            except _UNAVAILABLE:
                self.ambiguous += 1
            if await self._landed(cid, raw):
                return

    async def _landed(self, cid: str, raw: bytes) -> bool:
        """Wait for the server, then look for the command; retried if it dies meanwhile."""
        while True:
            await wait_until(lambda: redis_up(self.url), within=30, step=0.05)
            try:
                return await self._find(cid, raw)
            except _UNAVAILABLE:
                continue

    async def _find(self, cid: str, raw: bytes) -> bool:
        return (
            await self.client.lpos(self.control, raw.decode()) is not None
            or await self.client.lpos(self.processing, raw.decode()) is not None
            or bool(await self.client.exists(self.reply + cid))
        )


def command_mix(count: int, rng: random.Random) -> list[dict[str, Any]]:
    """Commands over ``count`` tokens whose final set depends on their order.

    Every token is subscribed once in a random mode; in between come mode changes of 1-3
    subscribed tokens and unsubscribes, each unsubscribed token subscribed again (in a random
    mode) a few commands later. The end state is all ``count`` tokens, each in the mode
    of its LAST command: a lost, repeated-out-of-turn or reordered command leaves a token in
    the wrong mode or missing, and the set each reply reports differs from the model's.
    """
    commands: list[dict[str, Any]] = []
    subscribed: list[int] = []
    comeback: list[tuple[int, int]] = []  # (due at command number, token)

    def add(action: str, tokens: list[int], mode: str | None = None) -> None:
        command: dict[str, Any] = {"id": f"c{len(commands)}", "action": action, "tokens": tokens}
        if mode is not None:
            command["mode"] = mode
        commands.append(command)

    for i in range(count):
        token = BASE_TOKEN + i
        add("subscribe", [token], rng.choice(MODES))
        subscribed.append(token)
        if rng.random() < 0.3:
            add("mode", rng.sample(subscribed, min(len(subscribed), rng.randint(1, 3))),
                rng.choice(MODES))  # fmt: skip
        if rng.random() < 0.15 and len(subscribed) > 1:
            gone = subscribed.pop(rng.randrange(len(subscribed)))
            add("unsubscribe", [gone])
            comeback.append((len(commands) + rng.randint(1, 5), gone))
        for due, back in [c for c in comeback if c[0] <= len(commands)]:
            comeback.remove((due, back))
            add("subscribe", [back], rng.choice(MODES))
            subscribed.append(back)
    for _, back in comeback:
        add("subscribe", [back], rng.choice(MODES))
    return commands


async def test_redis_killed_twice_while_500_commands_arrive(
    make_sim: MakeSim, launch: Launch, listen: Listen, private_redis: MakeRedis, namespace: str
) -> None:
    count = int(scaled("CHAOS_REDIS_COMMANDS", 500))  # tokens; ~1.6 commands each
    server = await private_redis(durable=True)
    sim = await make_sim(tick_interval=0.5)
    bridge = await launch(sim, server.url)
    listener = await listen(server.url)
    await wait_until(bridge.ready, within=15)
    pusher = ExactlyOncePusher(server.url, namespace)
    commands = command_mix(count, random.Random(11))
    outages: list[float] = []

    async def produce() -> None:
        for command in commands:
            await pusher.push(command["id"], orjson.dumps(command))
            await asyncio.sleep(0.01)

    async def kill_twice() -> None:
        for _ in range(2):
            await asyncio.sleep(2.5)
            started = time.monotonic()
            await server.kill()
            await asyncio.sleep(1.5)  # longer than redis-py's own quick retries
            assert bridge.alive()
            await server.start()
            outages.append(time.monotonic() - started)

    await asyncio.gather(produce(), kill_twice())
    client = pusher.client

    async def all_replied() -> bool:
        try:
            async with client.pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.exists(f"{namespace}:reply:{command['id']}")
                return all(await pipe.execute())
        except _UNAVAILABLE:
            return False

    try:
        await wait_until(all_replied, within=30, step=0.25)
    except AssertionError:
        missing = [
            c["id"] for c in commands if not await client.exists(f"{namespace}:reply:{c['id']}")
        ]
        processing = await client.lrange(f"{namespace}:control:processing", 0, -1)
        queued = await client.llen(f"{namespace}:control")
        raise AssertionError(
            f"no reply to {missing}; in processing: {processing}; {queued} still queued"
        ) from None
    # Each command's effect, in order: its reply reports the set right after it.
    model: dict[int, str] = {}
    extra_replies = 0
    for command in commands:
        apply(model, command)
        replies = await client.lrange(f"{namespace}:reply:{command['id']}", 0, -1)
        reply = orjson.loads(replies[0])
        assert (reply["ok"], reply["id"]) == (True, command["id"]), reply
        assert reply["subscriptions"] == {str(t): model[t] for t in sorted(model)}, command
        # At-least-once results, inherent to the design (bridge/control.py): one MULTI/EXEC
        # writes the set, the reply and the acknowledgement. When Redis dies after executing
        # and persisting it but before the bridge reads its answer, the bridge cannot tell
        # "applied" from "not applied" and runs the same transaction again: the same set, an
        # identical second reply. Only a command committing at a kill can be hit, so at most
        # one per outage, byte for byte the same result.
        assert all(other == replies[0] for other in replies[1:]), replies
        extra_replies += len(replies) - 1
    assert extra_replies <= len(outages)
    assert sorted(model) == [BASE_TOKEN + i for i in range(count)]
    stored = await client.hgetall(f"{namespace}:subscriptions")
    assert stored == {str(token).encode(): mode.encode() for token, mode in model.items()}
    await sim.wait_for(lambda: sim.subscriptions() == model, 15)
    for key in ("control", "control:processing", "control:dead"):
        assert await client.llen(f"{namespace}:{key}") == 0, key

    # Ticks flow again to a subscriber that came back with the server, and the bridge
    # accounted for every tick it decoded.
    await wait_until(lambda: listener.reconnects >= 2, within=10)
    before = listener.total_ticks
    await wait_until(lambda: listener.total_ticks > before + count, within=10)
    metrics = await bridge.metrics()
    assert metrics.get("bridge_commands_total", result="applied") == len(commands)
    assert metrics.get("bridge_commands_total", result="rejected") == 0
    assert metrics["bridge_publish_errors_total"] > 0  # the outages were felt...
    assert metrics.get("bridge_reconnects_total", cause="dropped") == 0  # ...not by the feed
    await wait_until(bridge.ready, within=10)
    assert_ticks_accounted(await quiesce(sim, bridge))
    print(
        f"outages={[round(o, 2) for o in outages]} tokens={count} commands={len(commands)} "
        f"ambiguous_pushes={pusher.ambiguous} extra_replies={extra_replies}"
    )
    code, took = await bridge.stop()
    assert (code, took < 5) == (0, True)
    await client.aclose()


def _resp(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def test_a_subscriber_that_stops_reading_is_cut_off_not_the_bridge(
    make_sim: MakeSim, launch: Launch, listen: Listen, private_redis: MakeRedis, namespace: str
) -> None:
    server = await private_redis(durable=True)
    admin = Redis.from_url(server.url)
    await admin.config_set("client-output-buffer-limit", "pubsub 256kb 64kb 1")
    tokens = ",".join(str(BASE_TOKEN + i) for i in range(50))
    sim = await make_sim(tick_interval=0.05)
    bridge = await launch(sim, server.url, BRIDGE_SUBSCRIBE=f"full:{tokens}")
    listener = await listen(server.url)
    await wait_until(bridge.ready, within=15)

    # A subscriber that never reads: tiny receive buffer, so Redis's output buffer grows.
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", server.port))
    slow.sendall(_resp("CLIENT", "SETNAME", "slowpoke") + _resp("PSUBSCRIBE", f"{namespace}:*"))
    try:

        async def slow_is_connected() -> bool:
            return any(c.get("name") == "slowpoke" for c in await admin.client_list())

        await wait_until(slow_is_connected, within=5)
        cut_at = time.monotonic()
        await wait_until(lambda: _not(slow_is_connected()), within=20, step=0.1)
        took = time.monotonic() - cut_at
    finally:
        slow.close()

    before = listener.total_ticks
    await wait_until(lambda: listener.total_ticks > before + 200, within=5)
    assert bridge.alive()
    metrics = await quiesce(sim, bridge)
    assert metrics["bridge_publish_errors_total"] == 0
    assert_ticks_accounted(metrics)
    published = metrics["bridge_ticks_published_total"]
    await wait_until(lambda: listener.total_ticks >= published, within=10)
    assert listener.total_ticks == published  # the healthy subscriber missed nothing
    print(f"slow subscriber cut off after {took:.1f}s; {published:.0f} ticks all delivered")
    code, _ = await bridge.stop()
    assert code == 0
    await admin.aclose()


async def _not(check: object) -> bool:
    assert asyncio.iscoroutine(check)
    return not await check


async def test_a_hung_redis_under_load_never_stalls_the_websocket(
    make_sim: MakeSim, launch: Launch, listen: Listen, private_redis: MakeRedis
) -> None:
    """Backpressure only while Redis makes progress: a hung server ends it, ticks conflate."""
    server = await private_redis()
    tokens = ",".join(str(BASE_TOKEN + i) for i in range(200))
    sim = await make_sim(tick_interval=0.02)  # 200 full-mode tokens: ~10,000 ticks/s
    bridge = await launch(sim, server.url, BRIDGE_SUBSCRIBE=f"full:{tokens}")
    listener = await listen(server.url)
    await wait_until(bridge.ready, within=15)
    await wait_until(lambda: listener.total_ticks > 5000, within=10)

    server.freeze()
    try:
        before = await bridge.metrics()
        await asyncio.sleep(3.0)  # far longer than the 0.5 s stall timeout
        during = await bridge.metrics()
    finally:
        server.thaw()
    # The feed kept reading at the simulator's rate while Redis answered nothing...
    frames = during["bridge_frames_total"] - before["bridge_frames_total"]
    assert frames > 0.7 * 3.0 / 0.02, frames
    assert during["bridge_publish_stalls_total"] >= 1
    assert during["bridge_ticks_replaced_total"] > 0  # ...and conflated what it could not send
    assert during["bridge_publish_pending"] <= 10_000 + 200

    # Redis answers again: ticks flow, nothing was dropped by the feed, nothing unaccounted.
    before_ticks = listener.total_ticks
    await wait_until(lambda: listener.total_ticks > before_ticks + 5000, within=10)
    metrics = await quiesce(sim, bridge)
    reconnects = [v for (name, _), v in metrics.values.items() if name == "bridge_reconnects_total"]
    assert reconnects
    assert sum(reconnects) == 0
    assert_ticks_accounted(metrics)
    print(
        f"frozen 3 s: {frames:.0f} frames read, "
        f"{during['bridge_ticks_replaced_total']:.0f} ticks conflated, "
        f"stalls={during['bridge_publish_stalls_total']:.0f}"
    )
    code, _ = await bridge.stop()
    assert code == 0


async def test_commands_pushed_while_redis_hangs_past_the_socket_timeout_apply_in_order(
    make_sim: MakeSim, launch: Launch, private_redis: MakeRedis, namespace: str
) -> None:
    """The consumer blocks in BLMOVE; Redis hangs for longer than the 5 s socket timeout, so
    redis-py retries the BLMOVE on a new connection; an operator's RPUSH of subscribe X then
    unsubscribe X waits in the frozen server. When it wakes, the abandoned BLMOVE takes X and
    the retry takes Y: applied as taken, the instrument would stay subscribed."""
    server = await private_redis()
    sim = await make_sim()
    bridge = await launch(sim, server.url)
    client = Redis.from_url(server.url)
    token = BASE_TOKEN + 7
    x = orjson.dumps({"id": "x", "action": "subscribe", "mode": "full", "tokens": [token]})
    y = orjson.dumps({"id": "y", "action": "unsubscribe", "tokens": [token]})
    try:
        await wait_until(bridge.ready, within=15)
        await asyncio.sleep(0.3)  # the consumer is inside its 1 s BLMOVE
        # An operator's connection, open before the hang, with its RPUSH sent into it.
        with socket.create_connection(("127.0.0.1", server.port)) as operator:
            operator.sendall(b"PING\r\n")
            assert operator.recv(100) == b"+PONG\r\n"
            server.freeze()
            try:
                parts = [b"RPUSH", f"{namespace}:control".encode(), x, y]
                operator.sendall(
                    b"*%d\r\n" % len(parts)
                    + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)
                )
                await asyncio.sleep(6.5)  # past the bridge's 5 s socket timeout
            finally:
                server.thaw()
            assert operator.recv(100) == b":2\r\n"
        replies = {}
        for cid in ("x", "y"):
            reply = await client.blpop([f"{namespace}:reply:{cid}"], 10)
            assert reply is not None, cid
            replies[cid] = orjson.loads(reply[1])
        assert replies["x"]["subscriptions"] == {str(token): "full"}
        assert replies["y"]["subscriptions"] == {}
        assert replies["x"]["at"] <= replies["y"]["at"]  # X applied first
        assert await client.hgetall(f"{namespace}:subscriptions") == {}
        await sim.wait_for(lambda: token not in sim.subscriptions(), 5)
        assert await client.llen(f"{namespace}:control:processing") == 0
        assert bridge.alive()
    finally:
        await client.aclose()
    code, _ = await bridge.stop()
    assert code == 0


async def test_a_redis_restart_with_a_standby_waiting_loses_no_subscription(
    make_sim: MakeSim, launch: Launch, private_redis: MakeRedis, namespace: str
) -> None:
    """Holder and standby on one namespace; Redis (no persistence) killed and restarted at once.
    The restart empties the lock: a standby that took it would start from the empty set while
    the holder, which remembers the set, exits 5."""
    server = await private_redis()
    sim = await make_sim()
    holder = await launch(sim, server.url)
    tokens = [BASE_TOKEN + i for i in range(3)]
    client = create_redis(server.url)
    try:
        await wait_until(holder.ready, within=15)
        for i, token in enumerate(tokens):
            body = {"id": f"s{i}", "action": "subscribe", "mode": "full", "tokens": [token]}
            assert (await send_command(client, namespace, body))["ok"] is True
        standby = await launch(sim, server.url)
        await wait_until(lambda: '"namespace_in_use"' in standby.log.read_text(), within=15)
        # The holder paused across the restart (a busy host, a GC pause): without the grace
        # the standby would find the key free and take it before the holder's next renewal.
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            await server.kill()
            await server.start()
            await asyncio.sleep(1.5)  # well inside one lease TTL (5 s)
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        expected = {str(token).encode(): b"full" for token in tokens}

        async def settled() -> bool:
            try:
                lock = await client.get(f"{namespace}:lock")
                stored = await client.hgetall(f"{namespace}:subscriptions")
            except (RedisConnectionError, RedisTimeoutError):
                return False
            return lock is not None and stored == expected

        await wait_until(settled, within=15)
        await asyncio.sleep(5.0 + 1.0)  # past a lease TTL: nothing changes hands after all
        lock = await client.get(f"{namespace}:lock")
        assert lock is not None
        assert orjson.loads(lock)["pid"] == holder.pid  # the holder kept the namespace
        assert holder.alive()
        assert standby.alive()
        assert await client.hgetall(f"{namespace}:subscriptions") == expected
        await sim.wait_for(lambda: set(tokens) <= set(sim.subscriptions()), 5)
        assert '"lease_restart_grace"' in standby.log.read_text()
    finally:
        await client.aclose()
    for bridge in (standby, holder):
        code, _ = await bridge.stop()
        assert code == 0


@pytest.mark.parametrize("refusal", ["oom", "readonly"])
async def test_redis_refusing_writes_is_not_ready(
    refusal: str,
    make_sim: MakeSim,
    launch: Launch,
    listen: Listen,
    private_redis: MakeRedis,
    namespace: str,
) -> None:
    """Out of memory, or demoted to a replica: PUBLISH still works, keyspace writes do not.

    Ticks keep flowing, but the bridge can neither apply a command nor keep its status, so
    ``/readyz`` must say 503 with Redis's own words, and be 200 again once Redis takes writes.
    """
    server = await private_redis()
    admin = Redis.from_url(server.url)
    sim = await make_sim(tick_interval=0.05)
    bridge = await launch(sim, server.url, BRIDGE_SUBSCRIBE=f"quote:{BASE_TOKEN}")
    listener = await listen(server.url)
    await wait_until(bridge.ready, within=15)

    if refusal == "oom":
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        words = "command not allowed when used memory"
    else:
        await admin.replicaof("127.0.0.1", free_port())  # nobody there
        words = "read only replica"
    refused_at = time.monotonic()
    try:
        reports: list[dict[str, Any]] = []

        async def refused() -> bool:
            status, body = await bridge.readiness()
            reports.append(body)
            return status == 503

        await wait_until(refused, within=10, step=0.25)
        not_ready_after = time.monotonic() - refused_at
        reasons = reports[-1]["reasons"]
        assert len(reasons) == 1, reasons
        assert reasons[0].startswith("redis not writable"), reasons
        assert words in reasons[0], reasons
        before = listener.total_ticks
        await wait_until(lambda: listener.total_ticks > before + 20, within=5)  # still flowing
        assert bridge.alive()
    finally:
        if refusal == "oom":
            await admin.config_set("maxmemory", "0")
        else:
            await admin.replicaof("NO", "ONE")

    lifted_at = time.monotonic()
    await wait_until(bridge.ready, within=10)
    ready_after = time.monotonic() - lifted_at
    reply = await send_command(
        admin, namespace, {"id": "after", "action": "subscribe", "mode": "ltp", "tokens": [1]}
    )
    assert reply["ok"], reply
    assert reply["subscriptions"] == {str(BASE_TOKEN): "quote", "1": "ltp"}
    print(f"{refusal}: 503 after {not_ready_after:.2f}s ({reasons[0]}); ready {ready_after:.2f}s")
    code, _ = await bridge.stop()
    assert code == 0
    await admin.aclose()
