"""``bridge check-config --connect``: Redis and the Kite login checked once, nothing written."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from helpers import MakeRedis, bridge_env, free_port, wait_until
from pydantic import SecretStr
from redis.asyncio import Redis

from bridge.config import Settings
from bridge.preflight import Check, check_kite, check_redis, exit_code, preflight
from bridge.simulator.server import Simulator


def settings(**fields: Any) -> Settings:
    fields.setdefault("kite_api_key", "key")
    fields.setdefault("kite_access_token", "good")
    return Settings(**fields)


@pytest.mark.parametrize(
    ("checks", "code"),
    [
        ([Check("redis", True, ""), Check("kite", True, "")], 0),
        ([Check("redis", False, ""), Check("kite", True, "")], 1),
        ([Check("redis", True, ""), Check("kite", False, "", 400)], 1),
        ([Check("redis", False, ""), Check("kite", False, "", 403)], 3),
    ],
)
def test_exit_code_says_what_failed(checks: list[Check], code: int) -> None:
    assert exit_code(checks) == code


async def test_accepted_login_leaves_nothing_behind() -> None:
    async with Simulator(access_tokens={"good"}) as sim:
        check = await check_kite(settings(kite_ws_url=sim.url))
        assert check.ok, check.detail
        assert [h.status for h in sim.handshakes] == [101]
        await wait_until(lambda: not sim.connections)
        assert sim.received == []  # nothing subscribed
    assert "good" not in check.detail


async def test_expired_token_is_a_403_without_retry() -> None:
    async with Simulator(access_tokens={"good"}) as sim:
        sim.expire_token("good")
        check = await check_kite(settings(kite_ws_url=sim.url))
    assert (check.ok, check.status) == (False, 403)
    assert "expired or invalid" in check.detail
    assert [h.status for h in sim.handshakes] == [403]
    assert "good" not in check.detail


async def test_kite_web_login_is_checked_too() -> None:
    async with Simulator(enctokens={"AB1234": "enc+tok/en=="}) as sim:
        web = {"kite_api_key": "kitefront", "kite_access_token": None, "kite_ws_url": sim.url}
        good = await check_kite(
            settings(kite_user_id="AB1234", kite_enctoken=SecretStr("enc+tok/en=="), **web)
        )
        bad = await check_kite(
            settings(kite_user_id="AB1234", kite_enctoken=SecretStr("other"), **web)
        )
    assert good.ok, good.detail
    assert (bad.ok, bad.status) == (False, 403)


async def test_other_refusals_are_failures_but_not_auth() -> None:
    async with Simulator() as sim:
        sim.reject_next(1, status=503)
        check = await check_kite(settings(kite_ws_url=sim.url))
    assert (check.ok, check.status) == (False, None)
    assert "503" in check.detail


async def test_unreachable_feed_fails_within_the_bound() -> None:
    check = await check_kite(settings(kite_ws_url=f"ws://127.0.0.1:{free_port()}"), within=2)
    assert not check.ok
    assert "ConnectionRefusedError" in check.detail


async def test_redis_reachable_and_namespace_free(redis_url: str, namespace: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        await client.hset(f"{namespace}:subscriptions", mapping={"256265": "full", "1": "ltp"})
        checks = await check_redis(settings(redis_url=redis_url, namespace=namespace))
        keys = sorted(await client.keys(f"{namespace}:*"))
    finally:
        await client.delete(f"{namespace}:subscriptions")
        await client.aclose()
    assert [(c.check, c.ok) for c in checks] == [
        ("redis", True),
        ("namespace", True),
        ("persistence", True),
        ("eviction", True),
    ]
    assert f"2 stored subscriptions in {namespace}" in checks[0].detail
    assert checks[1].detail == f"{namespace} is free"
    assert keys == [f"{namespace}:subscriptions".encode()]  # the check wrote nothing


async def test_a_held_namespace_is_reported_not_failed(redis_url: str, namespace: str) -> None:
    holder = {"host": "box", "pid": 7, "since": "2026-11-26T09:00:00+00:00", "id": "x"}
    client = Redis.from_url(redis_url)
    try:
        await client.set(f"{namespace}:lock", orjson.dumps(holder), px=10_000)
        checks = await check_redis(settings(redis_url=redis_url, namespace=namespace))
    finally:
        await client.delete(f"{namespace}:lock")
        await client.aclose()
    assert checks[1].ok
    assert "held by a running bridge (box pid 7 since 2026-11-26T09:00:00+00:00)" in (
        checks[1].detail
    )


async def test_a_replica_is_refused(private_redis: MakeRedis) -> None:
    replica = await private_redis("--replicaof", "127.0.0.1", str(free_port()))
    checks = await check_redis(settings(redis_url=replica.url))
    assert [(c.check, c.ok) for c in checks] == [("redis", False)]
    assert "is a replica" in checks[0].detail


async def test_an_acl_refusing_role_is_let_through(private_redis: MakeRedis) -> None:
    """The bridge never needs ROLE; an ACL without it must not fail the check."""
    server = await private_redis()
    admin = Redis.from_url(server.url)
    try:
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "bridge", "on", ">s3cret", "~*", "&*", "+@all", "-role"
        )
    finally:
        await admin.aclose()
    url = server.url.replace("redis://", "redis://bridge:s3cret@")
    checks = await check_redis(settings(redis_url=url))
    assert [(c.check, c.ok) for c in checks] == [
        ("redis", True),
        ("namespace", True),
        ("persistence", True),
        ("eviction", True),
    ]
    assert "s3cret" not in checks[0].detail


async def test_a_redis_that_keeps_nothing_is_a_warning(private_redis: MakeRedis) -> None:
    volatile, durable = await private_redis(), await private_redis(durable=True)
    (*_, kept, _) = await check_redis(settings(redis_url=volatile.url))
    assert (kept.check, kept.ok, kept.warning) == ("persistence", True, True)
    assert "a Redis restart while no bridge runs" in kept.detail
    (*_, kept, _) = await check_redis(settings(redis_url=durable.url))
    assert (kept.check, kept.ok, kept.warning) == ("persistence", True, False)
    assert kept.detail.startswith("append-only file on")


async def test_a_redis_that_may_evict_the_bridges_keys_is_a_warning(
    private_redis: MakeRedis,
) -> None:
    lru = await private_redis("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    (*_, evict) = await check_redis(settings(redis_url=lru.url))
    assert (evict.check, evict.ok, evict.warning) == ("eviction", True, True)
    assert "allkeys-lru (maxmemory 67108864 bytes)" in evict.detail
    volatile = await private_redis("--maxmemory-policy", "volatile-lru")
    (*_, evict) = await check_redis(settings(redis_url=volatile.url))
    assert (evict.check, evict.ok, evict.warning) == ("eviction", True, True)
    assert "the namespace lease" in evict.detail
    safe = await private_redis("--maxmemory-policy", "noeviction")
    (*_, evict) = await check_redis(settings(redis_url=safe.url))
    assert (evict.check, evict.ok, evict.warning) == ("eviction", True, False)


async def test_unreachable_redis_fails_and_hides_the_password() -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    checks = await check_redis(settings(redis_url=url), within=2)
    assert [(c.check, c.ok) for c in checks] == [("redis", False)]
    assert "hunter2" not in checks[0].detail
    assert "ConnectionError" in checks[0].detail


async def test_preflight_runs_every_check(redis_url: str, namespace: str) -> None:
    async with Simulator() as sim:
        checks = await preflight(settings(kite_ws_url=sim.url, redis_url=redis_url))
    assert [c.check for c in checks] == ["redis", "namespace", "persistence", "eviction", "kite"]
    assert all(c.ok for c in checks), checks


async def test_cli_exit_3_and_one_line_for_an_expired_token(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """The command as an operator runs it: JSON on stdout, the failure on stderr, exit 3."""
    async with Simulator(access_tokens={"good"}) as sim:
        env = bridge_env(
            KITE_WS_URL=sim.url,
            KITE_ACCESS_TOKEN="expired-token",
            REDIS_URL=redis_url,
            BRIDGE_NAMESPACE=namespace,
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge",
            "check-config",
            "--connect",
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3, stderr
    shown = orjson.loads(stdout)
    assert [(c["check"], c["ok"]) for c in shown["checks"]] == [
        ("redis", True),
        ("namespace", True),
        ("persistence", True),
        ("eviction", True),
        ("kite", False),
    ]
    lines = stderr.decode().splitlines()
    assert [line for line in lines if "check failed" in line] == [lines[-1]]
    assert lines[-1].startswith("bridge: check failed: kite: ")
    # A Redis that keeps nothing is said so (a warning), whatever else is wrong.
    warnings = [line for line in lines if line.startswith("bridge: warning: ")]
    assert lines == [*warnings, lines[-1]]
    expected = [c["check"] for c in shown["checks"][2:4] if c["warning"]]
    assert [line.split(": ")[2] for line in warnings] == expected
    assert b"expired-token" not in stdout + stderr
