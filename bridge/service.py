"""``bridge run``: wire the feed, publisher, control consumer and status together, and own the
process lifecycle of CONTRACT §6.

Start-up: connect Redis (retrying for as long as it takes), take the namespace's lease (waiting
as a standby while another live bridge holds it, bridge/lease.py), put back commands a previous
run left in processing, merge ``BRIDGE_SUBSCRIBE`` into ``<ns>:subscriptions``, load that set into
the feed *before* it connects (so the first handshake already subscribes), then run. On every
(re)connect the set is read from Redis again and the feed reconciled to it, so a restarted
bridge resumes exactly its subscriptions without any command.

Shutdown (SIGTERM/SIGINT): stop taking commands (the one in flight finishes), close the
websocket, flush pending publishes, write state ``stopped``, publish ``stopped``; every step is
bounded so the process exits within 5 s. A second signal exits at once.

Exit codes: 0 stopped by a signal, 1 crash (logged with its traceback), 2 invalid credentials
(normally caught by the config first), 3 the handshake was refused (HTTP 403), 4 reconnect
retries exhausted, 5 another bridge took the namespace over (a restart makes this one its
standby).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Final, TypeVar

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge import persistence
from bridge.cancel import cancel_and_wait, checkpoint
from bridge.commands import MAX_TOKENS
from bridge.config import UVLOOP_ENV, ConfigError, Settings
from bridge.control import ControlConsumer
from bridge.exit_codes import (
    EXIT_AUTH,
    EXIT_CONFIG,
    EXIT_CRASH,
    EXIT_LEASE_LOST,
    EXIT_OK,
    EXIT_RETRIES,
)
from bridge.kite.codec import frame_payloads
from bridge.kite.feed import LOGGER_NAME, KiteFeed
from bridge.kite.messages import KiteError, KiteMessage, OtherMessage
from bridge.kite.records import Mode
from bridge.kite.retry import AuthError, RetriesExhausted
from bridge.lease import LeaseState, NamespaceLease
from bridge.metrics import BridgeMetrics, LatencyHistogram, TimedTransport
from bridge.payload import event_json
from bridge.probes import ProbeServer, Readiness
from bridge.publisher import Publisher
from bridge.redis_client import SOCKET_TIMEOUT, Outage, Recovery, create_redis
from bridge.status import State, StatusCounters, StatusReporter
from bridge.subscriptions import SubscriptionStore
from bridge.transports import FencedTransport, UnrepliedTransport

__all__ = [
    "EXIT_AUTH",
    "EXIT_CONFIG",
    "EXIT_CRASH",
    "EXIT_LEASE_LOST",
    "EXIT_OK",
    "EXIT_RETRIES",
    "Bridge",
    "run",
]

#: Seconds between renewals of the namespace lease (its TTL is lease.DEFAULT_TTL).
LEASE_RENEW_INTERVAL: Final = 1.0
#: A standby repeats "still waiting" this often (seconds), not on every attempt.
_STANDBY_LOG_EVERY: Final = 60.0
#: Tokens of each kind named in a ``subscriptions_followed`` log line.
_FOLLOWED_SHOWN: Final = 20
#: Publishes failing this long (seconds) make ``/readyz`` say so: longer than a blip that the
#: next batch heals, shorter than anyone would want to trade on a silent feed.
PUBLISH_FAILING_AFTER: Final = 2.0
#: The same for the control consumer. Longer: a Redis restart makes one blocked BLMOVE wait
#: out its retries, and "redis not writable" already reports a Redis that is down.
CONTROL_FAILING_AFTER: Final = 5.0
#: Longest one start-up step waits for Redis before it counts as a failure (logged, and given
#: in /readyz). redis-py's retries nest (a connection's handshake retried inside a command's
#: retries, each waiting out the socket timeout): a Redis that accepts connections and never
#: answers took 82 s to fail once, in silence.
STARTUP_ATTEMPT_TIMEOUT: Final = 2 * SOCKET_TIMEOUT


_log = structlog.get_logger(__name__)
T = TypeVar("T")


def _utc(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


class _Stopping(Exception):
    """A stop was requested while start-up was still waiting for Redis."""


class _ListenFailed(Exception):
    """The HTTP endpoint could not bind its port (already logged)."""


class _InvalidConfig(Exception):
    """Settings that are valid alone but not with what Redis holds: exit 2, like bad config."""


class Bridge:
    """One bridge process: ``await Bridge(settings).run()`` returns the exit code.

    ``redis`` and ``feed`` can be injected (tests); otherwise they are built from ``settings``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        redis: Redis | None = None,
        feed: KiteFeed | None = None,
        shutdown_timeout: float = 4.0,
        redis_base_wait: float = 0.1,
        redis_max_wait: float = 5.0,
        install_signals: bool = True,
    ) -> None:
        self.settings = settings
        ns = settings.namespace
        self.redis = redis or create_redis(settings.redis_url, client_name=f"bridge:{ns}")
        self._owns_redis = redis is None
        self.store = SubscriptionStore(self.redis, ns)
        self.lease = NamespaceLease(self.redis, ns)
        #: Why the settings were refused once Redis was read (exit 2); ``run()`` raises it.
        self.config_error: str | None = None
        #: Who holds the namespace while this bridge waits as its standby; None otherwise.
        self._standby_for: str | None = None
        # Timed per batch, never per tick: the publisher exists before the metrics do.
        latency = LatencyHistogram()
        # One for every loop that retries Redis: the first back wakes the rest.
        self.recovery = Recovery()
        self.publisher = Publisher(
            self.redis,
            ns,
            transport=TimedTransport(
                FencedTransport(UnrepliedTransport(self.redis), self.lease.valid), latency
            ),
            max_lag=settings.max_lag,
            base_wait=redis_base_wait,
            max_wait=redis_max_wait,
            recovery=self.recovery,
        )
        self.feed = feed or self._make_feed()
        self._wire(self.feed)
        self.control = ControlConsumer(
            self.redis,
            ns,
            self.store,
            default_mode=settings.default_mode,
            reconcile=self._reconcile,
            base_wait=redis_base_wait,
            max_wait=redis_max_wait,
            gate=self.lease.valid,
            recovery=self.recovery,
        )
        self.status = StatusReporter(self.redis, ns, self._counters, recovery=self.recovery)
        # Successful status writes (every 0.5 s) prove Redis takes keyspace writes. Publishes
        # do not count: an OOM or read-only Redis still takes PUBLISH (see Readiness).
        self.metrics = BridgeMetrics(
            feed=self.feed,
            publisher=self.publisher,
            control=self.control,
            state=lambda: self.status.state,
            latency=latency,
            redis_counters=lambda: self.status.writes,
            lease_held=lambda: self.lease.held,
        )
        self.probes: ProbeServer | None = None
        if settings.http_port:
            readiness = Readiness(
                state=lambda: self.status.state,
                connected=lambda: self.feed.connected,
                reconciled=self._reconciled,
                last_frame_age=self._last_frame_age,
                redis_write_age=self.metrics.redis_writes.age,
                redis_error=lambda: self.status.last_error or self._startup_error,
                standby=lambda: self._standby_for,
                publishing=self._publish_problem,
                control=self._control_problem,
                max_frame_age=settings.liveness_timeout,
            )
            self.probes = ProbeServer(
                metrics=self.metrics.render,
                readiness=readiness.check,
                liveness=lambda: {"state": self.status.state, "pid": os.getpid()},
                host=settings.http_host,
                port=settings.http_port,
            )
        self._sampler: asyncio.Task[None] | None = None
        #: ``feed.stats.connections`` as of the latest successful resync with Redis.
        self._resynced_connection = -1
        self._shutdown_timeout = shutdown_timeout
        self._redis_waits = (redis_base_wait, redis_max_wait)
        #: The latest error of a start-up step still retrying, for /readyz.
        self._startup_error: str | None = None
        self._install_signals = install_signals
        self._stop = asyncio.Event()
        self._signals = 0
        self._last_tick_at: float | None = None
        # Serialises "decide the desired set, then reconcile the feed" between the control
        # consumer and the on-connect resync, so an older read can never overwrite a newer one.
        self._sync_lock = asyncio.Lock()
        self._resync_task: asyncio.Task[None] | None = None

    # -- construction -----------------------------------------------------------------------

    def _make_feed(self) -> KiteFeed:
        s = self.settings
        return KiteFeed(
            **s.feed_credentials(),
            max_retries=s.max_retries,
            base_wait=s.base_wait,
            max_wait=s.max_wait,
            liveness_timeout=s.liveness_timeout,
            decoder=frame_payloads,
            logger=structlog.get_logger(LOGGER_NAME),  # the service's JSON/console set-up
        )

    def _wire(self, feed: KiteFeed) -> None:
        feed.on_tick = self._on_tick
        feed.on_order_update = self._on_order_update
        feed.on_connect = self._on_connect
        feed.on_disconnect = self._on_disconnect
        feed.on_reconnect = self._on_reconnect
        feed.on_error = self._on_error
        feed.on_message = self._on_message

    # -- public control ---------------------------------------------------------------------

    def request_stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            _log.info("signal_received", signal=name, action="graceful shutdown")
            self.request_stop()
            return
        _log.warning("signal_received", signal=name, action="forced exit")
        os._exit(128 + signum)

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped or the feed gives up; return the exit code."""
        loop = asyncio.get_running_loop()
        if self._install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        _log.info(
            "bridge_starting",
            namespace=self.settings.namespace,
            redis=self.settings.redis_url_redacted,
            feed=self.feed.redacted_url,
            pid=os.getpid(),
        )
        self.publisher.start()
        tasks: dict[str, asyncio.Task[Any]] = {}
        code = EXIT_OK
        try:
            try:
                await self._start_http()
                await self._with_redis("ping", self.redis.ping)
                await self._hold_namespace()
                # Only the lease holder writes anything of the namespace, its status included.
                tasks["status"] = asyncio.create_task(self.status.run(), name="status")
                tasks["lease"] = asyncio.create_task(self._keep_lease(), name="lease")
                await self._prepare()
            except _Stopping:
                pass
            except _ListenFailed:
                code = EXIT_CRASH
            except _InvalidConfig as exc:
                _log.error("invalid_configuration", error=str(exc))
                self.config_error = str(exc)
                code = EXIT_CONFIG
            else:
                self.status.set_state("connecting")
                tasks["feed"] = asyncio.create_task(self.feed.connect(), name="feed")
                tasks["control"] = asyncio.create_task(self.control.run(self._stop), name="control")
                tasks["guard"] = asyncio.create_task(self._guard_subscriptions(), name="guard")
                code = await self._supervise(tasks)
        except Exception:
            _log.exception("bridge_crashed")
            code = EXIT_CRASH
        finally:
            try:
                async with asyncio.timeout(self._shutdown_timeout):
                    await self._shutdown(code, tasks)
            except TimeoutError:
                _log.error("shutdown_timeout", seconds=self._shutdown_timeout)
            except Exception:  # finish shutting down whatever went wrong
                _log.exception("shutdown_failed")
            finally:
                await self._abandon(tasks)
                if self._install_signals:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        loop.remove_signal_handler(sig)
        _log.info(
            "bridge_stopped",
            exit_code=code,
            ticks=self.publisher.stats.published,
            replaced=self.publisher.stats.replaced,
            frames_dropped=self.feed.stats.frames_dropped,
            publish_errors=self.publisher.stats.errors,
            commands=self.control.stats.applied,
            rejected=self.control.stats.rejected,
        )
        return code

    async def _start_http(self) -> None:
        """Serve /healthz, /readyz and /metrics from the start: /readyz explains the waiting."""
        if self.probes is None:
            return
        try:
            await self.probes.start()
        except OSError as exc:
            _log.error(
                "http_listen_failed",
                host=self.probes.host,
                port=self.probes.port,
                error=str(exc),
                hint="set BRIDGE_HTTP_PORT to a free port, or 0 to disable",
            )
            raise _ListenFailed from exc
        self._sampler = asyncio.create_task(self.metrics.sample(), name="metrics-sampler")

    async def _hold_namespace(self) -> None:
        """Take ``<ns>:lock``, waiting as a standby for as long as another bridge holds it."""
        waiting_since: float | None = None
        logged_at = 0.0
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while await self._with_redis("lease", self.lease.acquire) is LeaseState.TAKEN:
                now = time.monotonic()
                self._standby_for = self.lease.describe_holder()
                if waiting_since is None or now - logged_at >= _STANDBY_LOG_EVERY:
                    hint: dict[str, str] = {}
                    if self.lease.holder_is_local():
                        hint["hint"] = (
                            "the holder ran on this host: if it was killed, its lease expires"
                            f" within {self.lease.ttl:g} s"
                        )
                    _log.warning(
                        "namespace_in_use",
                        key=self.lease.key,
                        holder=self._standby_for,
                        action="waiting as standby; taking over when it stops",
                        waited=0.0 if waiting_since is None else round(now - waiting_since, 1),
                        **hint,
                    )
                    logged_at = now
                    waiting_since = waiting_since or now
                await asyncio.wait({stop_wait}, timeout=LEASE_RENEW_INTERVAL)
                if stop_wait.done():
                    raise _Stopping
        finally:
            stop_wait.cancel()
            self._standby_for = None
        if waiting_since is not None:
            _log.info(
                "namespace_taken_over",
                key=self.lease.key,
                waited=round(time.monotonic() - waiting_since, 3),
            )

    async def _keep_lease(self) -> None:
        """Renew the lease every second; return only when another bridge holds the namespace.

        A failed renewal is not a loss: the lease's own clock closes the publish gate if they
        keep failing, and the next success reopens it.
        """
        base_wait, max_wait = self._redis_waits
        outage = Outage(
            "lease", _log, base_wait=base_wait, max_wait=max_wait, recovery=self.recovery
        )
        while True:
            checkpoint()  # a cancel swallowed inside redis-py (bridge/cancel.py) ends us here
            await asyncio.sleep(LEASE_RENEW_INTERVAL)
            try:
                state = await self.lease.renew()
            except (RedisError, OSError) as exc:
                outage.failed(exc)
                continue
            outage.recovered()
            if state is LeaseState.TAKEN:
                _log.error(
                    "namespace_lost",
                    key=self.lease.key,
                    holder=self.lease.describe_holder(),
                    consequence=f"stopping without publishing more (exit {EXIT_LEASE_LOST})",
                )
                return

    async def _prepare(self) -> None:
        """Everything that needs Redis before the feed may connect, each step retried."""
        await self._with_redis("requeue", self.control.requeue)
        desired = await self._with_redis("load_subscriptions", self.store.load)
        extra = self.settings.subscribe
        if extra:
            # Only the bridge writes the set and its control loop has not started: no race.
            total = len(desired.keys() | extra.keys())
            if total > MAX_TOKENS:
                raise _InvalidConfig(
                    f"BRIDGE_SUBSCRIBE: its {len(extra)} tokens and the {len(desired)} stored in"
                    f" {self.store.key} make {total}, above Kite's limit of {MAX_TOKENS} per"
                    " connection; unsubscribe some first"
                )
            desired = await self._with_redis("merge_subscriptions", lambda: self.store.merge(extra))
            _log.info("subscriptions_merged", added=len(extra))
        await self.feed.reconcile(desired)
        _log.info("subscriptions_loaded", subscriptions=len(desired))
        kept = await self._with_redis("probe_persistence", lambda: persistence.probe(self.redis))
        if kept.durable is False:
            _log.warning("redis_not_persistent", detail=kept.detail)
        else:
            _log.info("redis_persistence", detail=kept.detail)
        evict = await self._with_redis(
            "probe_eviction", lambda: persistence.probe_eviction(self.redis)
        )
        if evict.durable is False:
            _log.warning("redis_may_evict", detail=evict.detail)

    async def _guard_subscriptions(self, interval: float = 1.0, follow_every: int = 5) -> None:
        """Keep the feed on the desired set in Redis when something bypasses the commands.

        Commands reconcile the feed themselves; this catches a Redis restart that lost the set
        or brought back an older one (the set is written back from memory) and a hand edit of
        the hash (followed, as Redis owns the set; ``subscriptions_followed``). Every
        ``interval`` one EXISTS, and a full comparison when the hash is gone or every
        ``follow_every`` rounds: comparing the whole hash every second (an HGETALL of up to
        3000 fields) measurably grew the process's memory, ~2 MiB an hour in the soak. It also
        starts the silence clock of newly subscribed tokens (metrics).
        """
        rounds = 0
        while True:
            checkpoint()
            await asyncio.sleep(interval)
            rounds += 1
            self.metrics.activity.notice(self.feed.subscriptions)
            try:
                if rounds % follow_every == 0 or not await self.store.exists():
                    await self._follow_store()
            except (RedisError, OSError):
                pass  # an outage is for the status and publish paths to report; next round
            except Exception:  # what Redis holds is input: a surprise in it must not stop us
                _log.exception("subscriptions_guard_failed")

    async def _follow_store(self) -> None:
        async with self._sync_lock:
            if self._resync_task is not None and not self._resync_task.done():
                return  # a (re)connect's resync is about to do the same
            known, desired = await self.store.reload()  # a restarted server's loss is repaired
            current = self.feed.subscriptions
            if desired == current:
                return
            if desired == known:
                # The bridge's own write, about to be reconciled by its command; or an outside
                # edit that another read took in first (a `list` or a rejected command loads
                # the set but reconciles nothing): either way the feed must follow it.
                await self.feed.reconcile(desired)
                return
            added = sorted(token for token in desired if token not in current)
            removed = sorted(token for token in current if token not in desired)
            changed = sorted(
                token for token, mode in desired.items() if current.get(token, mode) != mode
            )
            _log.warning(
                "subscriptions_followed",
                reason=f"{self.store.key} changed outside the control list",
                added=len(added),
                removed=len(removed),
                mode_changed=len(changed),
                subscriptions=len(desired),
                # Which ones, so an operator can tell a slip of the hand (the first few).
                instrument_tokens={
                    name: tokens[:_FOLLOWED_SHOWN]
                    for name, tokens in (
                        ("added", added),
                        ("removed", removed),
                        ("mode_changed", changed),
                    )
                    if tokens
                },
            )
            await self.feed.reconcile(desired)

    async def _with_redis(self, what: str, step: Callable[[], Awaitable[T]]) -> T:
        """Run ``step`` until Redis answers; a stop request interrupts it at any point."""
        base_wait, max_wait = self._redis_waits
        outage = Outage(f"startup:{what}", _log, base_wait=base_wait, max_wait=max_wait)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                attempt = asyncio.ensure_future(step())
                await asyncio.wait(
                    {attempt, stop_wait},
                    timeout=STARTUP_ATTEMPT_TIMEOUT,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not attempt.done():  # stopping (a connect to a dead host may take seconds)
                    # or Redis accepted the connection and never answered. Bounded: redis-py
                    # may swallow a cancel (bridge/cancel.py), and a stop must not wait on it.
                    await cancel_and_wait([attempt], timeout=1.0)
                    if stop_wait.done():
                        raise _Stopping
                try:
                    if not attempt.done() or attempt.cancelled():  # abandoned if still running
                        raise TimeoutError(f"no answer from Redis in {STARTUP_ATTEMPT_TIMEOUT:g} s")
                    result = attempt.result()
                except (RedisError, OSError) as exc:
                    wait = outage.failed(exc)
                    self._startup_error = outage.last_error
                    await asyncio.wait({stop_wait}, timeout=wait)
                    if stop_wait.done():
                        raise _Stopping from None
                    continue
                self._startup_error = None
                outage.recovered()
                return result
        finally:
            stop_wait.cancel()

    async def _supervise(self, tasks: dict[str, asyncio.Task[Any]]) -> int:
        """Wait for a stop request or for any task to end; map that to an exit code."""
        stop_wait = asyncio.create_task(self._stop.wait(), name="stop-wait")
        watched: set[asyncio.Task[Any]] = {stop_wait, *tasks.values()}
        publisher_task = self.publisher.start()
        watched.add(publisher_task)
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        feed_task = tasks["feed"]
        if feed_task in done:
            return self._feed_ended(feed_task)
        if tasks["lease"] in done and self.lease.lost:
            return EXIT_LEASE_LOST
        if stop_wait in done:
            return EXIT_OK
        for task in done:  # a component that should run forever ended
            error = task.exception() if not task.cancelled() else None
            _log.error("component_ended", task=task.get_name(), exc_info=error)
        return EXIT_CRASH

    def _feed_ended(self, task: asyncio.Task[Any]) -> int:
        error = task.exception() if not task.cancelled() else None
        if isinstance(error, AuthError):
            self.status.set_state("auth_failed")
            self.publisher.publish_event(event_json("auth_failed", status=error.status))
            return EXIT_AUTH
        if isinstance(error, RetriesExhausted):
            _log.error("feed_gave_up", attempts=error.attempts)
            return EXIT_RETRIES
        if error is not None:
            _log.error("feed_crashed", exc_info=error)
            return EXIT_CRASH
        if self._stop.is_set():
            return EXIT_OK
        _log.error("feed_ended_unexpectedly")
        return EXIT_CRASH

    async def _shutdown(self, code: int, tasks: dict[str, asyncio.Task[Any]]) -> None:
        # A standby, or a bridge whose namespace was taken over, must not write a thing there:
        # no last publishes, no `stopped` event, no status over the new holder's.
        owner = self.lease.held
        # A renewal after the release below would take the lease again: make sure it has ended.
        await cancel_and_wait([tasks.get("lease")], timeout=0.5)
        if self.status.state != "auth_failed":
            self.status.set_state("stopping")
        self._stop.set()
        steps: list[Awaitable[object]] = []
        if "control" in tasks:
            steps.append(asyncio.wait({tasks["control"]}, timeout=1.5))
        if "feed" in tasks and not tasks["feed"].done():
            steps.append(self._close_feed(tasks["feed"], within=2.0))
        for outcome in await asyncio.gather(*steps, return_exceptions=True):
            if isinstance(outcome, BaseException):
                _log.warning("shutdown_step_failed", error=repr(outcome))
        if self._resync_task is not None:
            self._resync_task.cancel()
        if owner:
            self.publisher.publish_event(event_json("stopped", exit_code=code))
        await self.publisher.close(timeout=1.0 if owner else 0)
        status_task = tasks.get("status")
        if status_task is not None:
            await cancel_and_wait([status_task])
        final: State = "auth_failed" if self.status.state == "auth_failed" else "stopped"
        self.status.set_state(final)
        if not owner:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await self.status.write()
        with contextlib.suppress(TimeoutError, RedisError, OSError):
            async with asyncio.timeout(0.5):
                await self.lease.release()  # a standby takes over now, not a TTL later

    async def _close_feed(self, feed_task: asyncio.Task[Any], within: float) -> None:
        async with asyncio.timeout(within):  # not wait_for: see bridge/cancel.py
            await self.feed.close()
            with contextlib.suppress(Exception):
                await feed_task

    async def _abandon(self, tasks: dict[str, asyncio.Task[Any]]) -> None:
        """Cancel whatever a bounded shutdown step left running, then close Redis."""
        stuck = await cancel_and_wait(
            (*tasks.values(), self._resync_task, self._sampler), timeout=1.0
        )
        if stuck:
            _log.error("shutdown_tasks_abandoned", tasks=sorted(t.get_name() for t in stuck))
        await self.publisher.close(timeout=0)
        if self.probes is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.probes.stop()
        if self._owns_redis:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self.redis.aclose()

    # -- status -----------------------------------------------------------------------------

    def _counters(self) -> StatusCounters:
        stats = self.feed.stats
        return StatusCounters(
            last_frame_at=_utc(stats.last_frame_at),
            last_tick_at=_utc(self._last_tick_at),
            ticks_total=stats.ticks,
            frames_total=stats.frames,
            reconnects_total=stats.reconnects,
            subscriptions=len(self.feed.subscriptions),
            publish_failing_since=_utc(self.publisher.failing_since_at),
            control_failing_since=_utc(self.control.failing_since_at),
        )

    # -- readiness --------------------------------------------------------------------------

    def _publish_problem(self) -> str | None:
        """Why ticks are not reaching Redis although the rest looks fine, if they are not."""
        failing = self.publisher.failing_for()
        if failing is not None and failing >= PUBLISH_FAILING_AFTER:
            return f"publishing failing for {failing:.1f} s ({self.publisher.last_error})"
        if self.lease.held and not self.lease.valid():
            return "namespace lease not confirmed: publishing is held (see bridge/lease.py)"
        return None

    def _control_problem(self) -> str | None:
        """Why commands are not being taken or answered, if Redis has refused that for a while."""
        failing = self.control.failing_for()
        if failing is not None and failing >= CONTROL_FAILING_AFTER:
            return f"control commands failing for {failing:.1f} s ({self.control.last_error})"
        return None

    def _reconciled(self) -> bool:
        """Whether the current connection's subscriptions were checked against Redis."""
        return self.feed.connected and self._resynced_connection == self.feed.stats.connections

    def _last_frame_age(self) -> float | None:
        last = self.feed.stats.last_frame_monotonic
        return None if last is None else time.monotonic() - last

    # -- desired set ------------------------------------------------------------------------

    async def _reconcile(self, desired: Mapping[int, Mode]) -> None:
        """The control consumer's path: Redis already holds ``desired``."""
        async with self._sync_lock:
            await self.feed.reconcile(desired)

    async def _resync(self) -> None:
        """After a (re)connect: make the feed follow Redis, which may have changed meanwhile.

        Retried with backoff while Redis is down (the feed has already replayed its last known
        set meanwhile), so /readyz does not stay red until the next reconnect.
        """
        connection = self.feed.stats.connections
        base_wait, max_wait = self._redis_waits
        outage = Outage(
            "resync", _log, base_wait=base_wait, max_wait=max_wait, recovery=self.recovery
        )
        while not self._stop.is_set():
            checkpoint()
            try:
                async with self._sync_lock:
                    desired = await self.store.load()
                    await self.feed.reconcile(desired)
            except (RedisError, OSError) as exc:
                await outage.pause(outage.failed(exc), self._stop)
                continue
            outage.recovered()
            self._resynced_connection = connection
            _log.info("subscriptions_resynced", subscriptions=len(desired))
            return

    # -- feed handlers (run on the feed's dispatcher: keep them short) -----------------------

    def _on_tick(self, feed: KiteFeed, payloads: list[tuple[int, bytes]]) -> Awaitable[None] | None:
        """One frame's ``(token, JSON)`` pairs; may ask the feed to wait (publisher's policy)."""
        self.publisher.submit_payloads(payloads)
        self.metrics.activity.observe(payloads)
        self._last_tick_at = time.time()
        return self.publisher.backpressure(feed.lag)

    def _on_order_update(self, _feed: KiteFeed, data: dict[str, Any]) -> None:
        self.publisher.publish_order(orjson.dumps(data))

    def _on_connect(self, _feed: KiteFeed) -> None:
        self.status.set_state("connected")
        self.publisher.publish_event(event_json("connected"))
        if self._resync_task is not None and not self._resync_task.done():
            self._resync_task.cancel()
        self._resync_task = asyncio.create_task(self._resync(), name="resync")

    def _on_disconnect(self, _feed: KiteFeed, cause: str, code: int | None, reason: str) -> None:
        if cause == "stale":
            self.publisher.publish_event(
                event_json("stale", seconds=self.settings.liveness_timeout, reason=reason)
            )
        self.publisher.publish_event(event_json("disconnected", code=code, reason=reason))
        if not self._stop.is_set() and cause != "client":
            self.status.set_state("reconnecting")

    def _on_reconnect(self, _feed: KiteFeed, attempt: int, wait: float) -> None:
        self.status.set_state("reconnecting")
        self.publisher.publish_event(
            event_json("reconnecting", attempt=attempt, wait=round(wait, 3))
        )

    def _on_error(self, _feed: KiteFeed, error: object) -> None:
        if isinstance(error, KiteError):
            self.publisher.publish_event(event_json("kite_error", data=error.message))

    def _on_message(self, _feed: KiteFeed, message: KiteMessage | OtherMessage) -> None:
        if isinstance(message, KiteMessage):
            self.publisher.publish_event(event_json("kite_message", data=message.message))
        elif message.type == "error":  # an error whose data is not the documented string
            self.publisher.publish_event(event_json("kite_error", data=message.data))
        elif message.type == "message":
            self.publisher.publish_event(event_json("kite_message", data=message.data))
        else:  # an undocumented type: its data as sent, and the type to tell it apart
            self.publisher.publish_event(
                event_json("kite_message", data=message.data, type=message.type)
            )


async def _main(settings: Settings) -> int:
    try:
        bridge = Bridge(settings)
    except ValueError as exc:  # the feed's credential rules (normally caught by the config)
        _log.error("invalid_configuration", error=str(exc))
        raise ConfigError(str(exc)) from None
    code = await bridge.run()
    if bridge.config_error is not None:  # stopped cleanly; the CLI prints the one line
        raise ConfigError(bridge.config_error)
    return code


#: Young-generation threshold while running (CPython's default is 700). See ``_tune_gc``.
GC_GEN0_THRESHOLD: Final = 50_000


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap on the tick path.

    A full-mode frame decodes into ~14 container objects per tick (hundreds of ticks per frame)
    that all die by reference counting moments later; the collector would still walk them every
    700 allocations, and walk every long-lived object of the process on each older-generation
    pass. Freezing what start-up allocated and collecting the young generation every 50,000
    allocations instead cut the per-tick CPU of decode + serialise by ~40 % (measured: 12.8 ->
    7.5 µs per full tick, docs/performance.md). The bridge creates few reference cycles, so the
    memory cost is nil.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


@contextlib.contextmanager
def _abandoned_threads(runner: asyncio.Runner) -> Iterator[None]:
    """Let the loop close without waiting for the threads of its default executor.

    asyncio runs ``getaddrinfo`` there, and a lookup cannot be cancelled: with DNS unreachable
    it blocks for the resolver's timeout (10 s and more), and ``Runner.close()`` would wait for
    it after the bridge has stopped, past the 5 s SIGTERM promise. The executor is shut down
    without waiting and swapped for an empty one that the close has nothing to wait for; the
    process entry (``bridge.process``) then exits without joining what is left.
    """
    loop = runner.get_loop()
    executor = ThreadPoolExecutor(thread_name_prefix="bridge-blocking")
    loop.set_default_executor(executor)
    try:
        yield
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))


def run(settings: Settings) -> int:
    """Run the bridge on a fresh event loop until it stops; return the process exit code.

    Raises :class:`~bridge.config.ConfigError` (exit 2, one line naming the setting, printed by
    the CLI) for settings that only turn out invalid against what Redis holds.
    """
    _tune_gc()
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if os.environ.get(UVLOOP_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            _log.warning("uvloop_unavailable", hint="pip install 'kite-redis-bridge[uvloop]'")
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner, _abandoned_threads(runner):
            return runner.run(_main(settings))
    except ConfigError:
        raise
    except Exception:
        _log.exception("bridge_crashed")
        return EXIT_CRASH
