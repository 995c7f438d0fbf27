"""Two bridges on one namespace: one publishes, the other waits as its standby (bridge/lease.py).

Real ``bridge run`` processes, the real simulator, the shared Redis. What must never happen:
both connected to Kite and publishing at once, or the standby writing over the holder's status.
"""

from __future__ import annotations

import asyncio
import signal
import time

import orjson
from helpers import BridgeProcess, Launch, wait_until
from redis.asyncio import Redis

from bridge.simulator.server import Simulator
from chaos.harness import Listen, Listener, MakeSim

TOKEN = 408065


async def _status_pid(redis: Redis, namespace: str) -> int:
    return int(await redis.hget(f"{namespace}:status", "pid") or 0)


async def _ready_bridge(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis_url: str, mode: str
) -> tuple[Simulator, BridgeProcess, Listener]:
    """A simulator, a ready bridge subscribed to TOKEN in ``mode``, and a tick listener."""
    sim = await make_sim(tick_interval=0.05)
    bridge = await launch(sim, redis_url, BRIDGE_SUBSCRIBE=f"{mode}:{TOKEN}")
    await wait_until(bridge.ready, within=15)
    return sim, bridge, await listen(redis_url)


async def test_a_second_bridge_waits_as_standby_and_takes_over(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis: Redis, redis_url: str, namespace: str
) -> None:
    sim, first, listener = await _ready_bridge(make_sim, launch, listen, redis_url, "full")

    second = await launch(sim, redis_url)
    await wait_until(lambda: bool(second.log_events("namespace_in_use")), within=15)
    status, body = await second.readiness()
    assert status == 503
    assert body["state"] == "standby"
    [in_use] = second.log_events("namespace_in_use")
    holder = in_use["holder"]
    assert "the holder ran on this host" in in_use["hint"]  # both run here
    assert body["reasons"] == [f"standby: another bridge holds the namespace ({holder})"]
    assert f"pid {first.pid} " in body["reasons"][0]
    await asyncio.sleep(2.0)  # long enough for a standby to do damage, if it could
    assert len(sim.handshakes) == 1  # one Kite connection: the holder's
    assert await _status_pid(redis, namespace) == first.pid
    standby_metrics = await second.metrics()
    assert standby_metrics["bridge_ticks_published_total"] == 0
    assert standby_metrics["bridge_namespace_held"] == 0
    assert (await first.metrics())["bridge_namespace_held"] == 1
    assert second.alive()

    # A clean stop releases the lease: the standby takes over at its next attempt (1 s).
    code, _ = await first.stop()
    stopped_at = time.monotonic()
    assert code == 0
    await wait_until(second.ready, within=10, step=0.05)
    took_over = time.monotonic() - stopped_at
    assert await _status_pid(redis, namespace) == second.pid
    assert sim.subscriptions() == {TOKEN: "full"}  # the stored set, without a command
    before = listener.ticks[TOKEN]
    await wait_until(lambda: listener.ticks[TOKEN] > before + 10, within=5)

    # A crash releases nothing: a third bridge waits out the lease's TTL (5 s), then takes over.
    third = await launch(sim, redis_url)
    await wait_until(lambda: bool(third.log_events("namespace_in_use")), within=15)
    second.proc.send_signal(signal.SIGKILL)
    await second.wait(within=5)
    killed_at = time.monotonic()
    await wait_until(third.ready, within=15, step=0.05)
    after_crash = time.monotonic() - killed_at
    assert await _status_pid(redis, namespace) == third.pid
    assert sim.subscriptions() == {TOKEN: "full"}
    assert third.log_events("namespace_taken_over")
    print(f"takeover after a clean stop {took_over:.2f}s, after SIGKILL {after_crash:.2f}s")
    code, _ = await third.stop()
    assert code == 0


async def test_a_bridge_whose_lease_was_taken_stops_publishing_and_exits_5(
    make_sim: MakeSim, launch: Launch, listen: Listen, redis: Redis, redis_url: str, namespace: str
) -> None:
    _, bridge, listener = await _ready_bridge(make_sim, launch, listen, redis_url, "quote")
    await wait_until(lambda: listener.ticks[TOKEN] > 5, within=5)

    other = orjson.dumps({"host": "elsewhere", "pid": 7, "since": "now", "id": "x"})
    await redis.set(f"{namespace}:lock", other, px=60_000)  # as if a standby won a race
    taken_at = time.monotonic()
    code = await bridge.wait(within=5)
    took = time.monotonic() - taken_at
    assert code == 5
    [lost] = bridge.log_events("namespace_lost")
    assert lost["holder"] == "elsewhere pid 7 since now"
    assert await redis.get(f"{namespace}:lock") == other  # not released: it is not ours
    await asyncio.sleep(0.3)
    assert not listener.named("stopped")  # nothing more published for the namespace
    print(f"exit 5 {took:.2f}s after the lease was taken")
