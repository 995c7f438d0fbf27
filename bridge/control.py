"""The ``<ns>:control`` consumer: take a command, apply it, answer it, acknowledge it.

Reliable-queue pattern, at-least-once:

1. ``BLMOVE <ns>:control <ns>:control:processing 1 LEFT RIGHT`` takes the oldest command and
   parks it in the processing list in the same atomic step, so a crash can only leave it there.
2. The command is parsed and applied (pure, ``bridge.commands``) to the desired set read from
   Redis. The outcome is computed ONCE per command.
3. ONE MULTI/EXEC writes the new desired set, publishes the result event, pushes the reply (and
   the dead letter when rejected), and removes the command from processing. Either all of it
   happens or none of it, so an acknowledged command has always taken effect and an
   unacknowledged one has not.
4. The feed is reconciled to the new set. Redis is written first: a crash before this step is
   repaired by the reconcile every start and every (re)connect does from Redis.

A Redis error at step 2 or 3 leaves the command in processing; it is retried with backoff from
memory (the same outcome, so the same writes) until Redis answers. If the EXEC reached Redis but
its reply was lost, the retry writes the same full set again, publishes one more identical
result and finds nothing left to remove: a duplicate reply, never a different effect. At
start-up anything still in processing goes back to the head of ``<ns>:control`` in its original
order. Commands are idempotent, so replaying one that was applied just before a crash is safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.commands import CommandError, apply_command, parse_command
from bridge.kite.records import Mode
from bridge.payload import command_result, dead_letter
from bridge.redis_client import Outage
from bridge.subscriptions import SubscriptionStore

__all__ = ["ControlConsumer", "ControlStats", "Outcome"]

_log = structlog.get_logger(__name__)

#: Errors that mean "Redis is not answering right now" rather than "this request is wrong".
_UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError)
_PREVIEW: Final = 200

Reconcile = Callable[[Mapping[int, Mode]], Awaitable[None]]


def _preview(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "…"


async def _pause(delay: float, stop: asyncio.Event | None) -> None:
    """Sleep ``delay``, cut short by ``stop`` so a retry loop never holds up shutdown."""
    if stop is None:
        await asyncio.sleep(delay)
        return
    try:
        async with asyncio.timeout(delay):
            await stop.wait()
    except TimeoutError:
        pass


@dataclass(frozen=True)
class Outcome:
    """Everything one command leads to, decided before any write."""

    ok: bool
    result: bytes  #: the §4 result JSON (event and reply)
    desired: dict[int, Mode]  #: the set after the command (unchanged when rejected)
    changed: bool  #: whether ``desired`` differs from what Redis held
    action: str | None = None
    id: str | None = None
    error: str | None = None
    dead: bytes | None = None  #: dead-letter JSON when rejected


@dataclass
class ControlStats:
    applied: int = 0
    rejected: int = 0
    redis_errors: int = 0
    requeued: int = 0
    by_action: dict[str, int] = field(default_factory=dict)


class ControlConsumer:
    """Consumes ``<ns>:control`` one command at a time; see the module docstring."""

    def __init__(
        self,
        redis: Redis,
        namespace: str,
        store: SubscriptionStore,
        *,
        default_mode: Mode,
        reconcile: Reconcile | None = None,
        max_tokens: int = 3000,
        block_timeout: int = 1,
        idle_sleep: float = 0.05,
        base_wait: float = 0.1,
        max_wait: float = 5.0,
        dead_max: int = 1000,
        reply_ttl: int = 300,
    ) -> None:
        self.stats = ControlStats()
        self.control_key = f"{namespace}:control"
        self.processing_key = f"{namespace}:control:processing"
        self.dead_key = f"{namespace}:control:dead"
        self.events_channel = f"{namespace}:events"
        self._reply_prefix = f"{namespace}:reply:"
        self._redis = redis
        self._store = store
        self._default_mode = default_mode
        self._reconcile = reconcile
        self._max_tokens = max_tokens
        # Must stay well under the client's socket_timeout (ecosystem-notes §2b).
        self._block_timeout = block_timeout
        # fakeredis's BLMOVE returns at once on an empty list: never busy-spin on it.
        self._idle_sleep = idle_sleep
        self._outage = Outage("control", _log, base_wait=base_wait, max_wait=max_wait)
        self._dead_max = dead_max
        self._reply_ttl = reply_ttl

    # -- start-up --------------------------------------------------------------------------

    async def requeue(self) -> int:
        """Move everything left in processing back to the head of control, order kept.

        Each LMOVE takes the newest leftover and pushes it on the head, so after the loop the
        oldest leftover is first in line. Every step is atomic: a crash half-way loses nothing.
        """
        moved = 0
        while await self._redis.lmove(self.processing_key, self.control_key, "RIGHT", "LEFT"):
            moved += 1
        if moved:
            self.stats.requeued += moved
            _log.warning("control_requeued", count=moved, key=self.control_key)
        return moved

    # -- the loop --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; the command in flight is finished first."""
        stop_wait = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                try:
                    raw = await self._take(stop_wait)
                except _UNAVAILABLE as exc:
                    self.stats.redis_errors += 1
                    await self._sleep(self._outage.failed(exc), stop_wait)
                    continue
                except RedisError as exc:  # e.g. WRONGTYPE: an operator broke a key
                    self.stats.redis_errors += 1
                    _log.error("control_take_failed", error=str(exc), key=self.control_key)
                    await self._sleep(self._outage.failed(exc), stop_wait)
                    continue
                self._outage.recovered()
                if raw is None:
                    if not stop.is_set():
                        await self._sleep(self._idle_sleep, stop_wait)
                    continue
                await self.handle(raw, stop)
        finally:
            stop_wait.cancel()

    async def _take(self, stop_wait: asyncio.Future[Any]) -> bytes | None:
        """BLMOVE one command, giving up early (without losing it) when stop is requested."""
        take = asyncio.ensure_future(
            self._redis.blmove(
                self.control_key,
                self.processing_key,
                self._block_timeout,
                "LEFT",
                "RIGHT",
            )
        )
        await asyncio.wait({take, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not take.done():
            # A command moved just as we cancel stays in processing: re-queued next start.
            take.cancel()
            await asyncio.wait({take})
        if take.cancelled():
            return None
        raw = take.result()
        if raw is None:
            return None
        return raw if isinstance(raw, bytes) else str(raw).encode()

    async def _sleep(self, delay: float, stop_wait: asyncio.Future[Any]) -> None:
        await asyncio.wait({stop_wait}, timeout=delay)

    # -- one command -----------------------------------------------------------------------

    async def handle(self, raw: bytes, stop: asyncio.Event | None = None) -> Outcome | None:
        """Apply, answer and acknowledge one command taken into processing.

        Returns None only when Redis failed while a stop was requested: the command then stays
        in processing for the next start.
        """
        log = _log.bind(command=_preview(raw))
        outcome: Outcome | None = None
        while True:
            try:
                if outcome is None:
                    current = await self._store.load()
                    outcome = self.decide(raw, current)
                await self._commit(raw, outcome)
                break
            except _UNAVAILABLE as exc:
                self.stats.redis_errors += 1
                if stop is not None and stop.is_set():
                    log.warning("command_left_in_processing", error=str(exc))
                    return None
                await _pause(self._outage.failed(exc), stop)
            except RedisError as exc:
                # Not an outage: a key of ours holds the wrong type. Retrying cannot help
                # until an operator fixes it; keep the command in processing meanwhile.
                self.stats.redis_errors += 1
                log.error("command_redis_error", error=f"{type(exc).__name__}: {exc}")
                if stop is not None and stop.is_set():
                    return None
                await _pause(self._outage.failed(exc), stop)
        self._outage.recovered()
        self._count(outcome)
        if outcome.ok:
            log.info(
                "command_applied",
                id=outcome.id,
                action=outcome.action,
                subscriptions=len(outcome.desired),
            )
            if outcome.action != "list":
                await self._apply_to_feed(outcome.desired, log)
        else:
            log.warning("command_rejected", id=outcome.id, error=outcome.error)
        return outcome

    def decide(self, raw: bytes, current: Mapping[int, Mode]) -> Outcome:
        """Parse and apply ``raw`` to ``current``: pure, never raises."""
        snapshot = dict(current)
        try:
            command = parse_command(raw, self._default_mode)
            desired = apply_command(snapshot, command, max_tokens=self._max_tokens)
        except CommandError as exc:
            return self._rejected(raw, snapshot, exc.reason, exc.id)
        except Exception as exc:
            # A bug in the parser must not turn one bad command into a poison pill.
            _log.exception("command_internal_error", command=_preview(raw))
            return self._rejected(raw, snapshot, f"internal error: {type(exc).__name__}", None)
        result = command_result(raw, ok=True, id=command.id, subscriptions=desired)
        return Outcome(
            ok=True,
            result=result,
            desired=desired,
            changed=desired != snapshot,
            action=command.action,
            id=command.id,
        )

    def _rejected(
        self, raw: bytes, current: dict[int, Mode], reason: str, command_id: str | None
    ) -> Outcome:
        result = command_result(raw, ok=False, id=command_id, error=reason, subscriptions=current)
        return Outcome(
            ok=False,
            result=result,
            desired=current,
            changed=False,
            id=command_id,
            error=reason,
            dead=dead_letter(raw, reason),
        )

    async def _commit(self, raw: bytes, outcome: Outcome) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            if outcome.changed:
                self._store.queue_replace(pipe, outcome.desired)
            pipe.publish(self.events_channel, outcome.result)
            if outcome.id is not None:
                reply_key = self._reply_prefix + outcome.id
                pipe.rpush(reply_key, outcome.result)
                pipe.expire(reply_key, self._reply_ttl)
            if outcome.dead is not None:
                pipe.rpush(self.dead_key, outcome.dead)
                pipe.ltrim(self.dead_key, -self._dead_max, -1)
            pipe.lrem(self.processing_key, 1, raw)  # type: ignore[arg-type]  # bytes are fine
            await pipe.execute()
        if outcome.changed:
            self._store.remember(outcome.desired)

    async def _apply_to_feed(self, desired: dict[int, Mode], log: Any) -> None:
        if self._reconcile is None:
            return
        try:
            await self._reconcile(desired)
        except Exception:
            # Redis already holds the new set; the next (re)connect reconciles from it.
            log.exception("feed_reconcile_failed", subscriptions=len(desired))

    def _count(self, outcome: Outcome) -> None:
        if outcome.ok:
            self.stats.applied += 1
        else:
            self.stats.rejected += 1
        key = outcome.action or "invalid"
        self.stats.by_action[key] = self.stats.by_action.get(key, 0) + 1
