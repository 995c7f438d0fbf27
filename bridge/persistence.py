"""Does the Redis server keep what the bridge stores there: across its restart, and under memory
pressure?

The desired subscriptions (``<ns>:subscriptions``) and the queued commands live in Redis; pub/sub
itself needs no persistence. A Redis that keeps nothing (``--save "" --appendonly no``) loses
them whenever it restarts while no bridge runs to write the set back: a host reboot, a
``docker compose down`` / ``up``. The bridge then starts with no subscriptions and strategies
get no data, silently. A ``maxmemory`` policy other than ``noeviction`` can drop keys at any
time: any of them under ``allkeys-*``, the namespace lease and replies (which expire) under
``volatile-*``. The bridge cannot prevent either, but it can
say so at start-up and in ``bridge check-config --connect``.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bridge.redis_client import InfoRefused, info_field

__all__ = ["Persistence", "judge", "judge_eviction", "probe", "probe_eviction"]


@dataclass(frozen=True, slots=True)
class Persistence:
    """``durable`` is ``None`` when the server would not say (``CONFIG`` denied, a proxy)."""

    durable: bool | None
    detail: str


def judge(aof_enabled: bool | None, save: str | None) -> Persistence:
    """Pure verdict from ``INFO persistence``'s ``aof_enabled`` and ``CONFIG GET save``."""
    if aof_enabled:
        return Persistence(True, "append-only file on: stored keys survive a Redis restart")
    if save:
        return Persistence(
            True,
            f"RDB snapshots only (save {save!r}): a Redis restart loses the commands and"
            " subscription changes since the last snapshot; appendonly yes loses at most 1 s",
        )
    if aof_enabled is None or save is None:
        return Persistence(None, "unknown: the server did not report its persistence settings")
    return Persistence(
        False,
        "none (no append-only file, no RDB snapshots): a Redis restart while no bridge runs"
        " (a host reboot, compose down/up) empties the desired subscriptions and queued"
        " commands; set appendonly yes (REDIS_APPENDONLY=yes with the bundled compose file)",
    )


async def probe(redis: Redis) -> Persistence:
    """Ask the server; commands it refuses (ACLs, proxies, fakeredis) leave the verdict open."""
    aof: bool | None
    save: str | None
    try:
        aof = bool(int(await info_field(redis, "persistence", "aof_enabled") or 0))
    except (InfoRefused, ValueError):
        aof = None
    if aof:
        return judge(aof, None)
    try:
        raw = (await redis.config_get("save")).get("save")
        save = raw.decode() if isinstance(raw, bytes) else raw
    except ResponseError:
        save = None
    return judge(aof, save)


def judge_eviction(policy: str | None, maxmemory: int | None) -> Persistence:
    """Pure verdict from ``CONFIG GET maxmemory-policy`` and ``maxmemory``: ``durable`` is
    whether none of the bridge's keys can be evicted."""
    if policy is None:
        return Persistence(None, "unknown: the server did not report its maxmemory policy")
    if policy == "noeviction":
        return Persistence(True, "maxmemory-policy noeviction: the bridge's keys are never evicted")
    limit = "no maxmemory set yet" if not maxmemory else f"maxmemory {maxmemory} bytes"
    if policy.startswith("volatile-"):
        return Persistence(
            False,
            f"maxmemory-policy {policy} ({limit}): under memory pressure Redis may evict keys"
            " with a TTL: the namespace lease (a standby would take over and this bridge exit 5)"
            " and command replies; use noeviction",
        )
    return Persistence(
        False,
        f"maxmemory-policy {policy} ({limit}): under memory pressure Redis may evict any key:"
        " the desired subscriptions (written back by the bridge), queued commands, the"
        " namespace lease and replies; use noeviction",
    )


async def probe_eviction(redis: Redis) -> Persistence:
    """Ask the server for its eviction policy; a refused ``CONFIG`` leaves the verdict open."""
    try:
        config = await redis.config_get("maxmemory*")
    except ResponseError:
        return judge_eviction(None, None)
    policy, maxmemory = config.get("maxmemory-policy"), config.get("maxmemory")
    text = policy.decode() if isinstance(policy, bytes) else policy
    try:
        limit = None if maxmemory is None else int(maxmemory)
    except ValueError:
        limit = None
    return judge_eviction(None if text is None else str(text), limit)
