"""Chaos on the Kite side: repeated drops, a silent stall, a token expiring, SIGTERM under load.

Each test asserts "nothing lost" concretely: every command's reply, the stored and the
simulator's subscriptions, the bridge's own tick accounting (decoded = published + replaced +
dropped) and what a subscriber received.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import statistics
import time
from functools import partial
from typing import Any

import orjson
from helpers import TOKEN, BridgeProcess, Launch, Metrics, wait_until
from redis.asyncio import Redis

from bridge.simulator.server import Simulator
from chaos.harness import Listen, MakeSim, scaled

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


class Producer:
    """Random subscribe / mode / unsubscribe commands with ids, and the set they must leave."""

    def __init__(self, redis: Redis, namespace: str, seed: int) -> None:
        self.redis = redis
        self.key = f"{namespace}:control"
        self.rng = random.Random(seed)
        self.model: dict[int, str] = {}
        self.ids: list[str] = []

    def next_command(self) -> dict[str, Any]:
        rng, model = self.rng, self.model
        cid = f"c{len(self.ids)}"
        roll = rng.random()
        if not model or roll < 0.5:
            tokens = rng.sample(POOL, rng.randint(1, 3))
            mode = rng.choice(MODES)
            model.update(dict.fromkeys(tokens, mode))
            return {"id": cid, "action": "subscribe", "mode": mode, "tokens": tokens}
        if roll < 0.75:
            tokens = rng.sample(sorted(model), min(len(model), rng.randint(1, 2)))
            mode = rng.choice(MODES)
            model.update(dict.fromkeys(tokens, mode))
            return {"id": cid, "action": "mode", "mode": mode, "tokens": tokens}
        tokens = rng.sample(sorted(model), 1)
        del model[tokens[0]]
        return {"id": cid, "action": "unsubscribe", "tokens": tokens}

    async def run(self, stop: asyncio.Event, every: float) -> None:
        while not stop.is_set():
            command = self.next_command()
            self.ids.append(command["id"])
            await self.redis.rpush(self.key, orjson.dumps(command))
            await asyncio.sleep(every)


async def test_drops_every_two_seconds_while_commands_arrive(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis: Redis, redis_url: str, namespace: str
) -> None:
    duration = scaled("CHAOS_DROP_SECONDS", 16)
    sent = [0]
    sim = await make_sim(
        on_frame_sent=lambda _no, _ns, tokens: sent.__setitem__(0, sent[0] + len(tokens))
    )
    bridge = await launch(sim, redis_url)
    listener = await listen(redis_url)
    await wait_until(bridge.ready, within=15)

    stop = asyncio.Event()
    producer = Producer(redis, namespace, seed=1)
    drops = 0

    reconnect_times: list[float] = []

    async def dropper() -> None:
        nonlocal drops
        started = time.monotonic()
        for tick in range(1, int(duration // 2) + 1):  # a drop every 2 s, on a fixed grid
            await asyncio.sleep(max(0.0, started + 2.0 * tick - time.monotonic()))
            if not sim.connections:
                continue
            newest = max(sim.connections)
            dropped_at = time.monotonic()
            drops += 1
            await sim.drop()
            with contextlib.suppress(TimeoutError):  # counted below, not asserted on time
                await sim.wait_for(partial(_newer_connection, sim, newest), 1.9)
                reconnect_times.append(time.monotonic() - dropped_at)
        stop.set()

    await asyncio.gather(dropper(), producer.run(stop, every=0.1))
    assert drops >= duration // 2 - 1  # a drop finding no connection is skipped
    assert len(reconnect_times) == drops  # each drop was healed before the next one
    assert len(producer.ids) > duration * 5

    # Every command answered exactly once, and all of them applied.
    async def all_replied() -> bool:
        async with redis.pipeline(transaction=False) as pipe:
            for cid in producer.ids:
                pipe.llen(f"{namespace}:reply:{cid}")
            counts = await pipe.execute()
        return all(counts)

    await wait_until(all_replied, within=15, step=0.2)
    for cid in producer.ids:
        replies = await redis.lrange(f"{namespace}:reply:{cid}", 0, -1)
        assert len(replies) == 1, cid
        assert orjson.loads(replies[0])["ok"] is True, replies[0]
    expected = {str(token).encode(): mode.encode() for token, mode in producer.model.items()}
    assert await redis.hgetall(f"{namespace}:subscriptions") == expected
    await sim.wait_for(lambda: sim.subscriptions() == producer.model, 10)
    assert await redis.llen(f"{namespace}:control") == 0
    assert await redis.llen(f"{namespace}:control:processing") == 0
    assert await redis.llen(f"{namespace}:control:dead") == 0

    # Ticks: nothing lost inside the bridge or between it and a subscriber; what the drops cut
    # off on the wire is bounded by the frames in flight at each drop.
    metrics = await quiesce(sim, bridge)
    assert_ticks_accounted(metrics)
    published = metrics["bridge_ticks_published_total"]
    await wait_until(lambda: listener.total_ticks >= published, within=10)
    assert listener.total_ticks == published
    lost_on_wire = sent[0] - metrics["bridge_ticks_total"]
    assert 0 <= lost_on_wire <= drops * 20 * len(POOL), (sent[0], lost_on_wire)
    assert metrics.get("bridge_reconnects_total", cause="dropped") == drops
    assert metrics["bridge_connections_total"] == drops + 1
    assert metrics.get("bridge_commands_total", result="applied") == len(producer.ids)
    print(f"drops={drops} commands={len(producer.ids)} ticks={published:.0f}", end=" ")
    print(f"lost_on_wire={lost_on_wire:.0f}", end=" ")
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
    make_sim: MakeSim, launch: Launch, redis: Redis, redis_url: str, namespace: str
) -> None:
    sim = await make_sim(firehose=True, packets_per_frame=500, tick_interval=0.5)
    tokens = ",".join(str(token) for token in range(1_000_001, 1_001_001))
    bridge = await launch(sim, redis_url, BRIDGE_SUBSCRIBE=f"full:{tokens}")
    await wait_until(bridge.ready, within=15)
    await wait_until(lambda: _published(bridge, 50_000), within=30, step=0.25)
    first = await bridge.metrics()
    await asyncio.sleep(1.0)
    second = await bridge.metrics()
    rate = second["bridge_ticks_published_total"] - first["bridge_ticks_published_total"]

    code, took = await bridge.stop(signal.SIGTERM, within=5)
    assert code == 0
    assert took < 5
    assert await redis.hget(f"{namespace}:status", "state") == b"stopped"
    [summary] = bridge.log_events("bridge_stopped")
    assert summary["exit_code"] == 0
    assert summary["ticks"] >= second["bridge_ticks_published_total"]
    print(f"SIGTERM at ~{rate:.0f} ticks/s published: exit 0 after {took:.2f}s")


def _newer_connection(sim: Simulator, than: int) -> bool:
    return max(sim.connections, default=0) > than


async def _published(bridge: BridgeProcess, at_least: float) -> bool:
    return (await bridge.metrics())["bridge_ticks_published_total"] >= at_least
