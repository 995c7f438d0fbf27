"""Shared fixtures.

``redis_url`` gives tests a real Redis server:

* ``REDIS_URL`` set (as ``.ci/run`` does): that server is used, and a server that does not
  answer is a test *failure*, never a skip, so CI cannot pass without having tested anything.
* otherwise a private ``redis-server`` is started on a free port when one is on ``PATH``;
* otherwise the test is skipped with the reason, so a fresh machine without Redis still passes.

Tests share one server, so each gets its own key namespace from ``namespace``.

``server`` and ``redis`` are a fresh fakeredis server of the test's own and an async client of
it; the tests on a real server (tests/chaos, the service integration) override ``redis``.
``private_redis`` starts killable redis-servers of the test's own, ``launch`` ``bridge run``
subprocesses (tests/helpers.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import fakeredis
import pytest
import redis
from helpers import BridgeProcess, Launch, MakeRedis, PrivateRedis, bridge_env
from redis.asyncio import Redis

from bridge.simulator.server import Simulator


def _wait_for_redis(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        try:
            _wait_for_redis(url, timeout=5)
        except redis.ConnectionError as exc:
            pytest.fail(f"REDIS_URL={url} is set but Redis does not answer: {exc}")
        yield url
        return
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("needs Redis: set REDIS_URL or put redis-server on PATH")
    with tempfile.TemporaryDirectory(prefix="bridge-redis-") as tmp:
        instance = PrivateRedis(server, Path(tmp))
        instance.spawn()
        try:
            _wait_for_redis(instance.url, timeout=10)
            yield instance.url
        finally:
            instance.stop()


@pytest.fixture
def namespace() -> str:
    """A key prefix of this test's own, so tests sharing one Redis never see each other."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture(name="redis")
async def fake_redis(server: fakeredis.FakeServer) -> AsyncIterator[Redis]:
    client = fakeredis.FakeAsyncRedis(server=server)
    yield client
    await client.aclose()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[MakeRedis]:
    """``await private_redis(*args, durable=False)``: a killable redis-server of this test's own."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server not on PATH: this test must kill and restart Redis")
    servers: list[PrivateRedis] = []

    async def make(*extra: str, durable: bool = False) -> PrivateRedis:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        instance = PrivateRedis(server, directory, *extra, durable=durable)
        await instance.start()
        servers.append(instance)
        return instance

    yield make
    for instance in servers:
        await instance.kill()


@pytest.fixture
async def launch(tmp_path: Path, namespace: str) -> AsyncIterator[Launch]:
    """``await launch(sim, redis_url, **env)`` starts ``bridge run`` against them."""
    started: list[BridgeProcess] = []

    async def start(sim: Simulator, redis_url: str, **env: str) -> BridgeProcess:
        environment = bridge_env(
            **{"KITE_WS_URL": sim.url, "REDIS_URL": redis_url, "BRIDGE_NAMESPACE": namespace, **env}
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
