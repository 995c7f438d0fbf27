"""Fixtures of the chaos tests: the real simulator, the real ``bridge run``, real Redis.

Every test here is marked ``redis`` and ``slow``; they still run in the default suite. Long
variants are opt-in through environment variables (see docs/reliability.md).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bridge.simulator.server import Simulator
from chaos.harness import (
    BridgeProcess,
    Launch,
    Listen,
    Listener,
    MakeRedis,
    MakeSim,
    PrivateRedis,
    bridge_env,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.redis)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
async def make_sim() -> AsyncIterator[MakeSim]:
    sims: list[Simulator] = []

    async def make(**options: Any) -> Simulator:
        options.setdefault("tick_interval", 0.05)
        options.setdefault("heartbeat_interval", 0.25)
        options.setdefault("seed", 7)
        sim = Simulator(**options)
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


@pytest.fixture
async def launch(tmp_path: Path, namespace: str) -> AsyncIterator[Launch]:
    """``await launch(sim, redis_url, **env)`` starts ``bridge run`` against them."""
    started: list[BridgeProcess] = []

    async def start(sim: Simulator, redis_url: str, **env: str) -> BridgeProcess:
        environment = bridge_env(
            KITE_WS_URL=sim.url, REDIS_URL=redis_url, BRIDGE_NAMESPACE=namespace, **env
        )
        log = tmp_path / f"bridge-{len(started)}.log"
        bridge = await BridgeProcess.start(environment, log, tmp_path)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        if bridge.alive():
            bridge.proc.kill()
            await bridge.proc.wait()
    for bridge in started:  # shown by pytest when the test failed
        print(f"--- {bridge.log.name} (exit {bridge.proc.returncode})")
        print(bridge.log.read_text(errors="replace")[-8000:])


@pytest.fixture(autouse=True)
async def redis(redis_url: str, namespace: str) -> AsyncIterator[Redis]:
    """A client of the shared server; this test's keys are deleted afterwards (always)."""
    client = Redis.from_url(redis_url)
    yield client
    keys = [key async for key in client.scan_iter(f"{namespace}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.delete(*keys[start : start + 1000])
    await client.aclose()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[MakeRedis]:
    """``await private_redis(*args)``: a killable redis-server of this test's own."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not on PATH: this test must kill and restart Redis")
    servers: list[PrivateRedis] = []

    async def make(*extra: str) -> PrivateRedis:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        instance = PrivateRedis(server, directory, *extra)
        await instance.start()
        servers.append(instance)
        return instance

    yield make
    for instance in servers:
        await instance.kill()


@pytest.fixture
async def listen(namespace: str) -> AsyncIterator[Listen]:
    listeners: list[Listener] = []

    async def start(url: str) -> Listener:
        listener = Listener(url, namespace)
        await listener.start()
        listeners.append(listener)
        return listener

    yield start
    for listener in listeners:
        await listener.close()
