"""Shared fixtures.

``redis_url`` gives tests a real Redis server:

* ``REDIS_URL`` set (as ``.ci/run`` does): that server is used, and a server that does not
  answer is a test *failure*, never a skip, so CI cannot pass without having tested anything.
* otherwise a private ``redis-server`` is started on a free port when one is on ``PATH``;
* otherwise the test is skipped with the reason, so a fresh machine without Redis still passes.

Tests share one server, so each gets its own key namespace from ``namespace``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest
import redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


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
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bridge-redis-") as tmp:
        proc = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait_for_redis(url, timeout=10)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def namespace() -> str:
    """A key prefix of this test's own, so tests sharing one Redis never see each other."""
    return f"test-{uuid.uuid4().hex[:12]}"
