"""Whether Redis keeps the stored subscriptions across its restart (bridge/persistence.py)."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import MakeRedis
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bridge.persistence import judge, judge_eviction, probe, probe_eviction


@pytest.mark.parametrize(
    ("aof", "save", "durable", "words"),
    [
        (True, None, True, "append-only file on"),
        (True, "", True, "append-only file on"),
        (False, "3600 1 300 100", True, "RDB snapshots only (save '3600 1 300 100')"),
        (None, "900 1", True, "RDB snapshots only"),
        (False, "", False, "none (no append-only file, no RDB snapshots)"),
        (None, "", None, "unknown"),
        (False, None, None, "unknown"),
        (None, None, None, "unknown"),
    ],
)
def test_judge(aof: bool | None, save: str | None, durable: bool | None, words: str) -> None:
    verdict = judge(aof, save)
    assert verdict.durable is durable
    assert words in verdict.detail


class Stub:
    """Answers INFO persistence and CONFIG GET save, or refuses them like an ACL would."""

    def __init__(self, info: dict[str, Any] | Exception, save: object) -> None:
        self._info = info
        self._save = save
        self.config_asked = False

    async def info(self, section: str) -> dict[str, Any]:
        assert section == "persistence"
        if isinstance(self._info, Exception):
            raise self._info
        return self._info

    async def config_get(self, pattern: str) -> dict[str, object]:
        assert pattern == "save"
        self.config_asked = True
        if isinstance(self._save, Exception):
            raise self._save
        return {"save": self._save}


async def test_probe_reads_info_then_config() -> None:
    aof = Stub({"aof_enabled": 1}, ResponseError("not asked"))
    assert (await probe(aof)).durable is True  # type: ignore[arg-type]
    assert not aof.config_asked  # AOF settles it
    assert (await probe(Stub({"aof_enabled": 0}, b""))).durable is False  # type: ignore[arg-type]
    rdb = await probe(Stub({"aof_enabled": 0}, b"60 1"))  # type: ignore[arg-type]
    assert (rdb.durable, "save '60 1'" in rdb.detail) == (True, True)
    denied = ResponseError("NOPERM this user has no permissions to run the 'config' command")
    assert (await probe(Stub({"aof_enabled": 0}, denied))).durable is None  # type: ignore[arg-type]
    refused = ResponseError("unknown command 'info'")
    assert (await probe(Stub(refused, denied))).durable is None  # type: ignore[arg-type]


@pytest.mark.redis
async def test_probe_against_real_servers(private_redis: MakeRedis) -> None:
    for durable in (False, True):
        server = await private_redis(durable=durable)
        client = Redis.from_url(server.url)
        try:
            assert (await probe(client)).durable is durable
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    ("policy", "maxmemory", "safe", "words"),
    [
        ("noeviction", 0, True, "never evicted"),
        ("volatile-lru", 1 << 30, False, "keys with a TTL: the namespace lease"),
        ("volatile-ttl", 0, False, "no maxmemory set yet"),
        ("allkeys-lru", 1 << 20, False, "allkeys-lru (maxmemory 1048576 bytes)"),
        ("allkeys-random", 0, False, "no maxmemory set yet"),
        (None, None, None, "unknown"),
    ],
)
def test_judge_eviction(
    policy: str | None, maxmemory: int | None, safe: bool | None, words: str
) -> None:
    verdict = judge_eviction(policy, maxmemory)
    assert verdict.durable is safe
    assert words in verdict.detail


@pytest.mark.redis
async def test_probe_eviction_against_a_real_server(private_redis: MakeRedis) -> None:
    server = await private_redis("--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lfu")
    client = Redis.from_url(server.url)
    try:
        verdict = await probe_eviction(client)
    finally:
        await client.aclose()
    assert verdict.durable is False
    assert "allkeys-lfu (maxmemory 8388608 bytes)" in verdict.detail
