"""Chaos on the Kite side: repeated drops, a silent stall, a token expiring, SIGTERM under load.

Each test asserts "nothing lost" concretely: every command's reply, the stored and the
simulator's subscriptions, the bridge's own tick accounting (decoded = published + replaced +
dropped) and what a subscriber received.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import random
import signal
import statistics
import time
from functools import partial
from typing import Any

import orjson
from helpers import TOKEN, BridgeProcess, Launch, MakeRedis, Metrics, wait_until
from redis.asyncio import Redis

from bridge.simulator.server import Simulator
from chaos.harness import Listen, MakeSim, RawCounter, scaled, tcp_queues

#: NSE-segment tokens (token & 0xFF == 1) the command producer draws from.
POOL = [(4000 + i) * 256 + 1 for i in range(40)]
MODES = ("ltp", "quote", "full")
INFY, RELIANCE = 408065, 738561


async def quiesce(sim: Simulator, bridge: BridgeProcess) -> Metrics:
    """Stop the ticks and wait until the bridge has nothing left in flight; return a scrape."""
    sim.set_tick_interval(3600)
    last: list[Metrics] = []

    async def settled() -> bool:
        metrics = await bridge.metrics()
        last.append(metrics)
        if len(last) < 2:
            return False
        before = last[-2]
        return (
            metrics["bridge_feed_pending"] == 0
            and metrics["bridge_publish_pending"] == 0
            and metrics["bridge_ticks_total"] == before["bridge_ticks_total"]
            and metrics["bridge_ticks_published_total"] == before["bridge_ticks_published_total"]
        )

    await wait_until(settled, within=10, step=0.3)
    return last[-1]


def assert_ticks_accounted(metrics: Metrics) -> None:
    """Inside the bridge nothing vanishes: every decoded tick was published or conflated."""
    decoded = metrics["bridge_ticks_total"]
    published = metrics["bridge_ticks_published_total"]
    replaced = metrics["bridge_ticks_replaced_total"]
    dropped = metrics.get("bridge_ticks_dropped_total", reason="serialize_error")
    assert decoded > 0
    assert decoded == published + replaced + dropped, (decoded, published, replaced, dropped)


def apply(model: dict[int, str], command: dict[str, Any]) -> None:
    """What a valid subscribe / mode / unsubscribe command does to the set (CONTRACT §2)."""
    if command["action"] == "unsubscribe":
        for token in command["tokens"]:
            model.pop(token, None)
    else:
        model.update(dict.fromkeys(command["tokens"], command["mode"]))


class Producer:
    """Random subscribe / mode / unsubscribe commands with ids, and the set they must leave.

    The set after each command depends on every command before it, in order; each reply
    reports the set right after its command, so ``check_replies`` finds any command lost,
    applied twice out of turn or reordered.
    """

    def __init__(
        self, redis: Redis, namespace: str, seed: int, initial: dict[int, str] | None = None
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self.key = f"{namespace}:control"
        self.rng = random.Random(seed)
        self.initial = dict(initial or {})
        self.model: dict[int, str] = dict(self.initial)
        self.sent: list[dict[str, Any]] = []

    @property
    def ids(self) -> list[str]:
        return [command["id"] for command in self.sent]

    def next_command(self) -> dict[str, Any]:
        rng = self.rng
        cid = f"c{len(self.sent)}"
        ours = sorted(token for token in self.model if token in POOL)
        roll = rng.random()
        command: dict[str, Any]
        if not ours or roll < 0.5:
            tokens = rng.sample(POOL, rng.randint(1, 3))
            command = {"id": cid, "action": "subscribe", "mode": rng.choice(MODES)}
        elif roll < 0.75:
            tokens = rng.sample(ours, min(len(ours), rng.randint(1, 2)))
            command = {"id": cid, "action": "mode", "mode": rng.choice(MODES)}
        else:
            tokens = rng.sample(ours, 1)
            command = {"id": cid, "action": "unsubscribe"}
        command["tokens"] = tokens
        return command

    async def push_one(self) -> None:
        command = self.next_command()
        await self.redis.rpush(self.key, orjson.dumps(command))
        self.sent.append(command)
        apply(self.model, command)

    async def run(self, stop: asyncio.Event, every: float) -> None:
        while not stop.is_set():
            await self.push_one()
            await asyncio.sleep(every)

    async def check_replies(self, count: int) -> dict[int, str]:
        """The first ``count`` commands answered exactly once, ok, each reporting the set it
        had to leave; returns the set after them."""
        model = dict(self.initial)
        async with self.redis.pipeline(transaction=False) as pipe:
            for command in self.sent[:count]:
                pipe.lrange(f"{self.namespace}:reply:{command['id']}", 0, -1)
            answers = await pipe.execute()
        for command, replies in zip(self.sent, answers, strict=False):
            apply(model, command)
            assert len(replies) == 1, (command, replies)
            reply = orjson.loads(replies[0])
            assert (reply["ok"], reply["id"]) == (True, command["id"]), reply
            assert reply["subscriptions"] == {str(t): model[t] for t in sorted(model)}, command
        return model


#: linux/sockios.h: bytes in a socket's send queue not yet sent.
_SIOCOUTQNSD = 0x894B
#: Lowest byte count of one tick on the wire: an ltp packet (8) with its length prefix (2).
_MIN_TICK_BYTES = 10


def unread_by_bridge(sim: Simulator, connection: int) -> int:
    """Bytes of ``connection`` the simulator had sent that the bridge had not read yet.

    Read the instant before the abort: in the simulator's transport buffer (discarded by the
    abort), in its kernel's send queue not yet sent (``SIOCOUTQNSD``; on loopback whatever was
    sent is already in the bridge's receive queue), and in the bridge's receive queue not yet
    read (``/proc/net/tcp``). The last two are delivered after an orderly close and discarded
    when the abort turns into a reset. Zero means every frame sent on this connection reaches
    the bridge however the connection ends.
    """
    transport = sim.connections[connection].websocket.transport
    sock = transport.get_extra_info("socket")
    unsent = bytearray(4)
    fcntl.ioctl(sock.fileno(), _SIOCOUTQNSD, unsent)
    ours, theirs = sock.getsockname(), sock.getpeername()
    unread = tcp_queues()[(theirs, ours)][1]
    return int(transport.get_write_buffer_size()) + int.from_bytes(unsent, "little") + unread


async def test_drops_every_two_seconds_while_commands_arrive(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis: Redis, redis_url: str, namespace: str
) -> None:
    duration = scaled("CHAOS_DROP_SECONDS", 60)
    planned = int(duration // 2)
    sent = [0]
    sim = await make_sim(
        on_frame_sent=lambda _no, _ns, tokens: sent.__setitem__(0, sent[0] + len(tokens))
    )
    bridge = await launch(sim, redis_url)
    listener = await listen(redis_url)
    await wait_until(bridge.ready, within=15)

    stop = asyncio.Event()
    producer = Producer(redis, namespace, seed=1)
    reconnect_times: list[float] = []
    #: Bytes not yet read by the bridge at each abort (see ``unread_by_bridge``).
    in_flight: list[int] = []

    async def dropper() -> None:
        started = time.monotonic()
        for tick in range(1, planned + 1):  # a drop every 2 s, on a fixed grid
            await asyncio.sleep(max(0.0, started + 2.0 * tick - time.monotonic()))
            # The previous reconnect was awaited below, so a connection is always up here.
            newest = max(sim.connections)
            in_flight.append(unread_by_bridge(sim, newest))
            dropped_at = time.monotonic()
            await sim.drop()  # aborts synchronously, before its first await
            with contextlib.suppress(TimeoutError):  # counted below, not asserted on time
                await sim.wait_for(partial(_newer_connection, sim, newest), 1.9)
                reconnect_times.append(time.monotonic() - dropped_at)
        stop.set()

    await asyncio.gather(dropper(), producer.run(stop, every=0.1))
    drops = len(in_flight)
    assert drops == planned  # no drop skipped
    assert len(reconnect_times) == drops  # each drop was healed before the next one
    assert len(producer.ids) > duration * 5

    # Every command answered exactly once, reporting the set it had to leave: all applied, in
    # the order sent, none twice.
    async def all_replied() -> bool:
        async with redis.pipeline(transaction=False) as pipe:
            for cid in producer.ids:
                pipe.llen(f"{namespace}:reply:{cid}")
            counts = await pipe.execute()
        return all(counts)

    await wait_until(all_replied, within=15, step=0.2)
    assert await producer.check_replies(len(producer.sent)) == producer.model
    expected = {str(token).encode(): mode.encode() for token, mode in producer.model.items()}
    assert await redis.hgetall(f"{namespace}:subscriptions") == expected
    await sim.wait_for(lambda: sim.subscriptions() == producer.model, 10)
    assert await redis.llen(f"{namespace}:control") == 0
    assert await redis.llen(f"{namespace}:control:processing") == 0
    assert await redis.llen(f"{namespace}:control:dead") == 0

    # Ticks: nothing lost inside the bridge or between it and a subscriber.
    metrics = await quiesce(sim, bridge)
    assert_ticks_accounted(metrics)
    published = metrics["bridge_ticks_published_total"]
    await wait_until(lambda: listener.total_ticks >= published, within=10)
    assert listener.total_ticks == published
    # On the wire, only bytes the bridge had not read when a connection was aborted can be
    # lost (TCP cannot hand them over and Kite has no replay). A drop with nothing unread
    # loses nothing, so the allowance is exact: 0 unless some drop caught bytes in flight,
    # and then at most the ticks those bytes can hold plus the frame they cut in two.
    allowed = sum(b // _MIN_TICK_BYTES + len(POOL) for b in in_flight if b)
    lost_on_wire = sent[0] - metrics["bridge_ticks_total"]
    assert 0 <= lost_on_wire <= allowed, (sent[0], lost_on_wire, in_flight)
    assert metrics.get("bridge_reconnects_total", cause="dropped") == drops
    assert metrics["bridge_connections_total"] == drops + 1
    assert metrics.get("bridge_commands_total", result="applied") == len(producer.ids)
    print(f"drops={drops} commands={len(producer.ids)} ticks={published:.0f}", end=" ")
    print(f"drops_with_bytes_in_flight={sum(1 for b in in_flight if b)}", end=" ")
    print(f"lost_on_wire={lost_on_wire:.0f}")
    median, worst = statistics.median(reconnect_times), max(reconnect_times)
    print(f"reconnect_s median={median:.2f} max={worst:.2f}")

    assert bridge.alive()
    await wait_until(bridge.ready, within=5)
    code, took = await bridge.stop()
    assert (code, took < 5) == (0, True)


async def test_silent_stall_is_detected_within_the_liveness_window(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis_url: str
) -> None:
    liveness = 1.0
    sim = await make_sim()
    bridge = await launch(sim, redis_url, BRIDGE_SUBSCRIBE=f"quote:{INFY},{RELIANCE}")
    listener = await listen(redis_url)
    await wait_until(bridge.ready, within=15)
    first = max(sim.connections)

    stalled_at = time.monotonic()
    sim.stall()
    await wait_until(lambda: bool(listener.named("stale")), within=liveness + 3)
    detected = time.monotonic() - stalled_at
    status, body = await bridge.readiness()
    assert status == 503
    assert body["ready"] is False
    assert listener.named("stale")[0]["seconds"] == liveness
    await asyncio.sleep(0.5)  # the reconnect lands on a server that is still silent

    resumed_at = time.monotonic()
    ticks_before = listener.total_ticks
    sim.stall(False)
    await wait_until(bridge.ready, within=10, step=0.05)
    recovered = time.monotonic() - resumed_at
    await wait_until(lambda: listener.total_ticks > ticks_before + 10, within=5)
    assert max(sim.connections) > first
    assert sim.subscriptions() == {INFY: "quote", RELIANCE: "quote"}

    metrics = await bridge.metrics()
    stale = metrics.get("bridge_reconnects_total", cause="stale")
    assert stale >= 1
    await wait_until(lambda: len(listener.named("stale")) == stale, within=5)
    print(f"stale detected after {detected:.2f}s (liveness {liveness}s);", end=" ")
    print(f"ready {recovered:.2f}s after resume")
    assert detected <= liveness + 1.5
    code, _ = await bridge.stop()
    assert code == 0


async def test_token_expiring_mid_session_is_final_and_loses_no_command(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis: Redis, redis_url: str, namespace: str
) -> None:
    sim = await make_sim()
    bridge = await launch(sim, redis_url, BRIDGE_SUBSCRIBE=f"ltp:{INFY}")
    listener = await listen(redis_url)
    await wait_until(bridge.ready, within=15)

    sim.expire_token(TOKEN)
    started = time.monotonic()
    await sim.drop()
    assert await bridge.wait(5) == 3
    took = time.monotonic() - started
    # One refused handshake, then nothing: no retry storm.
    assert [h.status for h in sim.handshakes] == [101, 403]
    state = await redis.hget(f"{namespace}:status", "state")
    assert state == b"auth_failed"
    await wait_until(lambda: bool(listener.named("auth_failed")), within=5)
    assert listener.named("auth_failed")[0]["status"] == 403
    assert [e["exit_code"] for e in listener.named("stopped")] == [3]

    # A command sent while no bridge runs waits in the list; the next bridge (a fresh token)
    # applies it on top of the stored set.
    await redis.rpush(f"{namespace}:control", f"subscribe full {RELIANCE}")
    bridge = await launch(sim, redis_url, KITE_ACCESS_TOKEN="fresh-access-token")
    await sim.wait_for(lambda: sim.subscriptions() == {INFY: "ltp", RELIANCE: "full"}, 15)
    await wait_until(bridge.ready, within=10)
    print(f"exit 3 {took:.2f}s after the drop; handshakes {[h.status for h in sim.handshakes]}")
    code, _ = await bridge.stop()
    assert code == 0


async def test_sigterm_under_full_load_exits_0_within_5_seconds(
    make_sim: MakeSim, launch: Launch, private_redis: MakeRedis, namespace: str
) -> None:
    """Firehose ticks, commands arriving every 10 ms, a subscriber: SIGTERM loses nothing.

    A Redis of the test's own, so that ``INFO commandstats`` counts exactly the bridge's
    PUBLISHes, with an unlimited pub/sub output buffer so that the subscriber, which may lag
    behind the firehose, is never cut off.
    """
    server = await private_redis()
    admin = Redis.from_url(server.url)
    await admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
    ticks_pattern, events_channel = f"{namespace}:ticks:*", f"{namespace}:events"
    subscriber = RawCounter("127.0.0.1", server.port, ticks_pattern, events_channel)
    await subscriber.start()
    try:
        sizes: list[int] = []  # ticks per frame, in the order sent
        sim = await make_sim(
            firehose=True,
            packets_per_frame=500,
            tick_interval=0.5,
            on_frame_sent=lambda _no, _ns, tokens: sizes.append(len(tokens)),
        )
        initial = dict.fromkeys(range(1_000_001, 1_001_001), "full")
        bridge = await launch(
            sim, server.url, BRIDGE_SUBSCRIBE="full:" + ",".join(map(str, initial))
        )
        await wait_until(bridge.ready, within=15)
        [connection] = sim.connections.values()  # kept: its counters outlive the connection
        producer = Producer(admin, namespace, seed=3, initial=initial)
        stop = asyncio.Event()
        pushing = asyncio.create_task(producer.run(stop, every=0.01))
        await wait_until(lambda: _published(bridge, 50_000), within=30, step=0.25)
        first = await bridge.metrics()
        await asyncio.sleep(1.0)
        second = await bridge.metrics()
        rate = second["bridge_ticks_published_total"] - first["bridge_ticks_published_total"]
        decoding = second["bridge_ticks_total"] - first["bridge_ticks_total"]
        applied_before = second.get("bridge_commands_total", result="applied")

        # Commands keep arriving while the bridge shuts down.
        code, took = await bridge.stop(signal.SIGTERM, within=5)
        stop.set()
        await pushing
        assert code == 0
        assert took < 5
        assert decoding > 20_000  # under load: the firehose, not an idle feed
        assert applied_before > 0

        # Ticks. Every frame the bridge read was decoded: none dropped for a full inbox, none
        # abandoned at shutdown. What it read is the first frames the simulator sent
        # (heartbeats, counted by the simulator, are the only frames without ticks; they come
        # first, while nothing is subscribed yet). Every decoded tick was published or, under
        # the BRIDGE_MAX_LAG policy (a firehose outruns any bridge), conflated and counted;
        # none was left pending. Every published tick reached Redis (INFO commandstats) and
        # the subscriber.
        [summary] = bridge.log_events("bridge_stopped")
        assert summary["exit_code"] == 0
        status = await admin.hgetall(f"{namespace}:status")
        assert status[b"state"] == b"stopped"
        # The final status write comes after the feed closed and the publisher flushed.
        decoded, frames = int(status[b"ticks_total"]), int(status[b"frames_total"])
        assert [h.status for h in sim.handshakes] == [101]  # one connection throughout
        assert decoded == sum(sizes[: frames - connection.heartbeats_sent]) > 0
        published, replaced = int(summary["ticks"]), int(summary["replaced"])
        assert decoded == published + replaced
        assert not bridge.log_events("publish_flush_incomplete")
        # The simulator sent more: frames in flight when the bridge stopped reading (it reads and
        # discards until the server's close frame) were never decoded.
        assert connection.ticks_sent == sum(sizes) >= decoded

        async def subscriber_caught_up() -> bool:
            return subscriber.counts[ticks_pattern] >= published

        await wait_until(subscriber_caught_up, within=60, step=0.2)
        await asyncio.sleep(0.5)  # nothing more arrives
        assert subscriber.counts[ticks_pattern] == published
        events = subscriber.counts[events_channel]
        stats = await admin.info("commandstats")
        assert stats["cmdstat_publish"]["calls"] == published + events

        # Commands: each one pushed was applied in order, answered once with the set it had to
        # leave, or is still queued for the next start, in order; none is anywhere else.
        applied = summary["commands"]
        assert summary["rejected"] == 0
        model = await producer.check_replies(applied)
        leftover = [
            *await admin.lrange(f"{namespace}:control:processing", 0, -1),
            *await admin.lrange(f"{namespace}:control", 0, -1),
        ]
        assert leftover == [orjson.dumps(command) for command in producer.sent[applied:]]
        for command in producer.sent[applied:]:
            assert not await admin.exists(f"{namespace}:reply:{command['id']}"), command
        stored = await admin.hgetall(f"{namespace}:subscriptions")
        assert stored == {str(token).encode(): mode.encode() for token, mode in model.items()}
        print(
            f"SIGTERM at ~{decoding:.0f} ticks/s decoded, ~{rate:.0f} published: exit 0 after "
            f"{took:.2f}s; "
            f"{frames} frames read, {decoded} ticks decoded = {published} published "
            f"(= received = PUBLISH calls - {events} events) + {replaced} conflated; "
            f"simulator sent {connection.ticks_sent}; commands {len(producer.sent)} pushed, "
            f"{applied} applied, {len(leftover)} still queued"
        )
    finally:
        await subscriber.close()
        await admin.aclose()


def _newer_connection(sim: Simulator, than: int) -> bool:
    return max(sim.connections, default=0) > than


async def _published(bridge: BridgeProcess, at_least: float) -> bool:
    return (await bridge.metrics())["bridge_ticks_published_total"] >= at_least
