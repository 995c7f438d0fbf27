"""Fixtures of the chaos tests: the real simulator, the real ``bridge run``, real Redis.

Every test here is marked ``redis`` and ``slow``; they still run in the default suite. Long
variants are opt-in through environment variables (see docs/reliability.md). ``launch`` and
``private_redis`` come from tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from bridge.simulator.server import Simulator
from chaos.harness import Listen, Listener, MakeSim


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
    for sim in sims:  # bounded: a failed test must not hang the suite in teardown
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sim.stop(), 15)


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
