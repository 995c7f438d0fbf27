"""The ``<ns>:control`` consumer: take a command, apply it, acknowledge it, answer it.

Reliable-queue pattern, at-least-once:

1. ``BLMOVE <ns>:control <ns>:control:processing 1 LEFT RIGHT`` takes the oldest command and
   parks it in the processing list in the same atomic step, so a crash can only leave it there.
2. The command is parsed and applied (pure, ``bridge.commands``) to the desired set read from
   Redis. The outcome is computed ONCE per command.
3. The *state* transaction, one MULTI/EXEC: the new desired set (when it changed), the dead
   letter (when rejected) and the removal of the command from processing. An acknowledged
   command has taken effect; a command still in processing has not (or is replayed, which is
   harmless: commands are idempotent).
4. The *answer*, a separate best-effort pipeline: the result event on ``<ns>:events`` and, with
   an id, the reply on ``<ns>:reply:<id>``. It comes after the state, so a bad reply key can
   never hold up or undo a state change; the price is that a crash between 3 and 4 loses the
   reply, never the state change or the command.
5. The feed is reconciled to the new set. Redis is written first: a crash before this step is
   repaired by the reconcile every start and every (re)connect does from Redis.

Redis does not roll a transaction back: when one command inside EXEC fails, the others are
applied all the same. So errors are told apart, and a transaction that ran is never re-run:

* The request as a whole failed: a connection error or timeout (nothing applied, or EXEC's
  outcome unknown), or EXECABORT (a command refused while queued, e.g. OOM under
  ``maxmemory-policy noeviction``: nothing applied). The command stays in processing and the
  state transaction is retried from memory with backoff until Redis takes it: the same writes,
  so a retry of an EXEC that did run only finds nothing left to remove. EXECABORT and other
  refusals of a whole request (e.g. NOPERM on reading the set) are logged as errors
  (``command_transaction_aborted`` / ``command_redis_error``), outages once per outage.
* One command failed while the others ran, inside the state EXEC or in the answer pipeline
  (``execute(raise_on_error=False)`` shows every result), e.g. a foreign value of the wrong
  type at one of our keys. Nothing is re-run:
  - a failed dead letter, acknowledgement, result event or reply: the command's effect stands,
    it is not repeated and the queue moves on; logged as ``command_write_failed`` with the key
    and the error, counted in ``write_errors``. A foreign value at ``<ns>:reply:<id>`` keeps its
    value but gets the reply's TTL, so that name frees itself.
  - a failed write of the desired set itself: the command is not silently dropped, it is
    REJECTED: an ``ok: false`` result saying it was not stored (``subscriptions: null``, as the
    set Redis holds is then unknown), a dead letter to re-drive it from, an error log
    (``command_not_stored``), ``store_errors`` counted, and no reconcile. (The set is replaced
    by DEL then HSET, so a wrong type cannot cause this; it takes e.g. an ACL changed between
    MULTI and EXEC.)
* The desired set cannot be read because ``<ns>:subscriptions`` holds the wrong type: the
  command is rejected the same way (``command_store_unusable``), so every producer gets an
  immediate answer naming the key, the commands can be re-driven from ``<ns>:control:dead``
  once the key is fixed, and one bad key never stops the queue. The key is left as it is and
  the feed keeps its subscriptions. Blocking instead would leave every operator's ``BLPOP``
  timing out with no reason given while commands pile up behind the one in processing.

A failure to answer because Redis is unreachable is retried with backoff (the result is owed;
nothing else could proceed anyway), giving up only when a stop is requested. At start-up
anything still in processing goes back to the head of ``<ns>:control`` in its original order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import structlog
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.cancel import checkpoint
from bridge.commands import CommandError, apply_command, parse_command
from bridge.kite.records import Mode
from bridge.payload import command_result, dead_letter
from bridge.redis_client import Outage, Recovery
from bridge.subscriptions import SubscriptionStore

__all__ = ["ControlConsumer", "ControlStats", "Outcome", "WriteFailure"]

_log = structlog.get_logger(__name__)

#: Errors that mean "Redis is not answering right now" rather than "this request is wrong".
_UNAVAILABLE: Final = (RedisConnectionError, RedisTimeoutError, OSError)
_PREVIEW: Final = 200

#: The writes of one command, by what they are for (``WriteFailure.write``).
SUBSCRIPTIONS: Final = "subscriptions"
DEAD_LETTER: Final = "dead_letter"
ACKNOWLEDGEMENT: Final = "acknowledgement"
EVENT: Final = "event"
REPLY: Final = "reply"
ANSWER: Final = "answer"  #: the answer pipeline as a whole

Reconcile = Callable[[Mapping[int, Mode]], Awaitable[None]]


def _preview(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return text if len(text) <= _PREVIEW else text[:_PREVIEW] + "…"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _aborted(exc: BaseException) -> bool:
    """EXECABORT: redis-py raises the queued command's error ``from`` the ExecAbortError."""
    return isinstance(exc, ExecAbortError) or isinstance(exc.__cause__, ExecAbortError)


def _wrong_type(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def _stopping(stop: asyncio.Event | None) -> bool:
    return stop is not None and stop.is_set()


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


class WriteFailure(NamedTuple):
    """One command of a transaction or pipeline that Redis refused while running the rest."""

    #: What it was for: SUBSCRIPTIONS, DEAD_LETTER, ACKNOWLEDGEMENT, EVENT, REPLY or ANSWER.
    write: str
    key: str
    error: Exception


@dataclass
class ControlStats:
    applied: int = 0
    rejected: int = 0
    #: Every Redis error met, whatever its kind (the ones below included).
    redis_errors: int = 0
    #: Dead letters, acknowledgements, result events and replies Redis refused (not retried).
    write_errors: int = 0
    #: Commands rejected because the desired set could not be read or written.
    store_errors: int = 0
    requeued: int = 0
    by_action: dict[str, int] = field(default_factory=dict)


class _Writes:
    """Queues commands on a pipeline and remembers what each one is for."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._purposes: list[tuple[str, str]] = []

    def tag(self, write: str, key: str) -> None:
        """Label every command queued since the last tag."""
        self._purposes += [(write, key)] * (len(self.pipe) - len(self._purposes))

    def failures(self, results: list[Any]) -> list[WriteFailure]:
        """The first refused command of each purpose, in queue order."""
        found: dict[str, WriteFailure] = {}
        for (write, key), result in zip(self._purposes, results, strict=True):
            if isinstance(result, Exception) and write not in found:
                found[write] = WriteFailure(write, key, result)
        return list(found.values())


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
        gate: Callable[[], bool] = lambda: True,
        recovery: Recovery | None = None,
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
        self._outage = Outage(
            "control", _log, base_wait=base_wait, max_wait=max_wait, recovery=recovery
        )
        self._dead_max = dead_max
        self._reply_ttl = reply_ttl
        #: Whether this bridge may take commands now: the namespace lease is confirmed. A holder
        #: cut off for longer than the lease, about to find it taken and exit, must not re-queue
        #: the command the new holder has in processing, nor take the next one.
        self._gate = gate

    # -- health ----------------------------------------------------------------------------

    def failing_for(self) -> float | None:
        """Seconds since the steps this consumer retries began failing in a row (taking a
        command, applying it to the stored set; and sending its result while Redis is
        unreachable); ``None`` while they work. A refusal that never heals (an ACL without
        ``BLMOVE``, a ``WRONGTYPE`` control key) leaves every command unanswered in the list
        while ticks flow, so readiness and ``bridge health`` report it. Single writes Redis
        refuses inside an applied command (a reply, a dead letter) are not retried and not
        counted here: they are logged and in ``bridge_control_write_errors_total``."""
        return self._outage.failing_for()

    @property
    def failing_since_at(self) -> float | None:
        """``time.time()`` of the same moment."""
        return self._outage.since_at

    @property
    def last_error(self) -> str | None:
        return self._outage.last_error

    # -- start-up --------------------------------------------------------------------------

    async def requeue(self) -> int:
        """Move everything left in processing back to the head of control, order kept.

        At start-up (a previous run's leftovers) and before every take (orphans of a lost
        BLMOVE reply; see :meth:`run`).

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
                checkpoint()  # a cancel swallowed inside redis-py (bridge/cancel.py) ends us here
                if not self._gate():
                    await self._sleep(self._idle_sleep, stop_wait)
                    continue
                try:
                    # A BLMOVE whose reply was lost may still have moved a command into
                    # processing: a connection error, or a timeout that redis-py retried on a
                    # new connection without telling us while the server, hung, ran the first
                    # one later. One command at a time is in flight here and it has been
                    # acknowledged by now, so anything in processing is such an orphan: back
                    # to the head of the queue (one LMOVE when there is none).
                    await self.requeue()
                    raw = await self._take(stop_wait)
                    if raw is not None and await self._redis.llen(self.processing_key) > 1:
                        # An orphan moved there while we waited, by the BLMOVE redis-py gave up
                        # on: it was taken from the queue before ours, so it goes first. Both
                        # back to the head, order kept, and take again.
                        await self.requeue()
                        continue
                except _UNAVAILABLE as exc:
                    self.stats.redis_errors += 1
                    await self._outage.pause(self._outage.failed(exc), stop)
                    continue
                except RedisError as exc:  # e.g. WRONGTYPE, OOM, READONLY
                    self.stats.redis_errors += 1
                    if not self._outage.active:  # once per outage, not on every retry
                        _log.error("control_take_failed", error=str(exc), key=self.control_key)
                    await self._outage.pause(self._outage.failed(exc), stop)
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
        """Apply, acknowledge and answer one command taken into processing.

        Returns None only when Redis failed before the state transaction ran while a stop was
        requested: the command then stays in processing for the next start.
        """
        log = _log.bind(command=_preview(raw))
        outcome: Outcome | None = None
        failures: list[WriteFailure] = []
        while True:
            if not self._gate():
                # Cut off from Redis for longer than the lease allows: another bridge may have
                # taken over, re-queued this command and applied newer ones. A commit now
                # would write this bridge's older set over theirs.
                if _stopping(stop):
                    log.warning("command_left_in_processing", error="namespace lease not held")
                    return None
                await self._outage.pause(self._idle_sleep, stop)
                continue
            try:
                if outcome is None:
                    outcome = await self._decide_from_redis(raw, log)
                failures = await self._commit(raw, outcome)
                break
            except _UNAVAILABLE as exc:
                self.stats.redis_errors += 1
                if _stopping(stop):
                    log.warning("command_left_in_processing", error=_describe(exc))
                    return None
                await self._outage.pause(self._outage.failed(exc), stop)
            except RedisError as exc:
                # Refused as a whole, nothing applied: EXECABORT (e.g. OOM under noeviction,
                # NOPERM) or another refusal of the request. A server condition: wait it out.
                self.stats.redis_errors += 1
                log.error(
                    "command_transaction_aborted" if _aborted(exc) else "command_redis_error",
                    error=_describe(exc),
                    consequence="nothing applied; the command stays in processing, retrying",
                )
                if _stopping(stop):
                    log.warning("command_left_in_processing", error=_describe(exc))
                    return None
                await self._outage.pause(self._outage.failed(exc), stop)
        self._outage.recovered()

        # The state transaction ran: from here on nothing of it is ever re-run.
        dead_pending = False
        for failure in failures:
            if failure.write == SUBSCRIPTIONS:
                outcome = self._not_stored(raw, outcome, failure, log)
                dead_pending = True
            else:
                self._write_failed(failure, log)
        await self._send_result(outcome, dead_pending, stop, log)

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

    async def _decide_from_redis(self, raw: bytes, log: Any) -> Outcome:
        try:
            current = await self._store.load()
        except ResponseError as exc:
            if not _wrong_type(exc):
                raise
            # Deterministic until an operator fixes the key: answer now, keep the queue moving.
            self.stats.redis_errors += 1
            self.stats.store_errors += 1
            log.error(
                "command_store_unusable",
                key=self._store.key,
                error=_describe(exc),
                consequence="command rejected and dead-lettered; the feed keeps its set",
            )
            reason = (
                f"not applied: the desired set {self._store.key} cannot be read ({exc}); "
                "it must be a hash: fix or delete it, then re-send the command"
            )
            return self._unknown_set(raw, reason)
        return self.decide(raw, current)

    def decide(self, raw: bytes, current: Mapping[int, Mode]) -> Outcome:
        """Parse and apply ``raw`` to ``current``: pure, never raises."""
        snapshot = dict(current)
        command = None
        try:
            command = parse_command(raw, self._default_mode)
            desired = apply_command(snapshot, command, max_tokens=self._max_tokens)
        except CommandError as exc:
            # A well-formed command refused by the rules (e.g. the 3000 limit) keeps its action.
            action = command.action if command is not None else None
            return self._rejected(raw, snapshot, exc.reason, exc.id, action)
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

    def _unknown_set(self, raw: bytes, reason: str, command_id: str | None = None) -> Outcome:
        """A rejection when the set Redis holds is unknown (``subscriptions: null``).

        A command that is itself invalid is rejected for that reason instead.
        """
        try:
            command = parse_command(raw, self._default_mode)
        except CommandError as exc:
            return self._rejected(raw, None, exc.reason, exc.id)
        except Exception as exc:
            _log.exception("command_internal_error", command=_preview(raw))
            return self._rejected(raw, None, f"internal error: {type(exc).__name__}", None)
        return self._rejected(raw, None, reason, command.id or command_id, command.action)

    def _rejected(
        self,
        raw: bytes,
        current: dict[int, Mode] | None,
        reason: str,
        command_id: str | None,
        action: str | None = None,
    ) -> Outcome:
        result = command_result(raw, ok=False, id=command_id, error=reason, subscriptions=current)
        return Outcome(
            ok=False,
            result=result,
            desired={} if current is None else current,
            changed=False,
            action=action,
            id=command_id,
            error=reason,
            dead=dead_letter(raw, reason),
        )

    def _not_stored(self, raw: bytes, outcome: Outcome, failure: WriteFailure, log: Any) -> Outcome:
        """The desired set was refused inside an EXEC that removed the command from processing."""
        self.stats.redis_errors += 1
        self.stats.store_errors += 1
        log.error(
            "command_not_stored",
            id=outcome.id,
            key=failure.key,
            error=_describe(failure.error),
            intended=len(outcome.desired),
            consequence=f"command rejected and dead-lettered; {failure.key} may be partial",
        )
        reason = f"not applied: writing {failure.key} failed ({failure.error})"
        return self._unknown_set(raw, reason, outcome.id)

    def _write_failed(self, failure: WriteFailure, log: Any) -> None:
        self.stats.redis_errors += 1
        self.stats.write_errors += 1
        log.error(
            "command_write_failed",
            write=failure.write,
            key=failure.key,
            error=_describe(failure.error),
            consequence="not retried; the command's effect stands",
        )

    async def _commit(self, raw: bytes, outcome: Outcome) -> list[WriteFailure]:
        """The state transaction; returns the commands Redis refused while applying the rest.

        Idempotent: a replay writes the same set and finds nothing left to remove.
        """
        async with self._store.lock, self._redis.pipeline(transaction=True) as pipe:
            writes = _Writes(pipe)
            if outcome.changed:
                self._store.queue_replace(pipe, outcome.desired)
                writes.tag(SUBSCRIPTIONS, self._store.key)
            if outcome.dead is not None:
                self._queue_dead_letter(pipe, outcome.dead)
                writes.tag(DEAD_LETTER, self.dead_key)
            pipe.lrem(self.processing_key, 1, raw)  # type: ignore[arg-type]  # bytes are fine
            writes.tag(ACKNOWLEDGEMENT, self.processing_key)
            failures = writes.failures(await pipe.execute(raise_on_error=False))
            # Before any other await: the subscriptions guard must not take our own write
            # for an outside edit.
            if outcome.changed and not any(f.write == SUBSCRIPTIONS for f in failures):
                self._store.remember(outcome.desired)
        return failures

    def _queue_dead_letter(self, pipe: Pipeline, dead: bytes) -> None:
        pipe.rpush(self.dead_key, dead)
        pipe.ltrim(self.dead_key, -self._dead_max, -1)

    async def _answer(self, outcome: Outcome, dead: bool) -> list[WriteFailure]:
        """Result event, reply and (``dead``) a dead letter: independent best-effort writes."""
        async with self._redis.pipeline(transaction=False) as pipe:
            writes = _Writes(pipe)
            pipe.publish(self.events_channel, outcome.result)
            writes.tag(EVENT, self.events_channel)
            if outcome.id is not None:
                reply_key = self._reply_prefix + outcome.id
                pipe.rpush(reply_key, outcome.result)
                pipe.expire(reply_key, self._reply_ttl)
                writes.tag(REPLY, reply_key)
            if dead and outcome.dead is not None:
                self._queue_dead_letter(pipe, outcome.dead)
                writes.tag(DEAD_LETTER, self.dead_key)
            return writes.failures(await pipe.execute(raise_on_error=False))

    async def _send_result(
        self, outcome: Outcome, dead: bool, stop: asyncio.Event | None, log: Any
    ) -> None:
        """Answer the command; retried only while Redis is unreachable, never on a refusal."""
        while True:
            try:
                failures = await self._answer(outcome, dead)
                break
            except _UNAVAILABLE as exc:
                self.stats.redis_errors += 1
                if _stopping(stop):
                    log.warning("command_result_unsent", id=outcome.id, error=_describe(exc))
                    return
                await self._outage.pause(self._outage.failed(exc), stop)
            except RedisError as exc:
                self._write_failed(WriteFailure(ANSWER, self.events_channel, exc), log)
                return
        self._outage.recovered()
        for failure in failures:
            self._write_failed(failure, log)

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
