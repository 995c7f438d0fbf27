"""``KiteFeed``: one Kite ticker websocket kept alive, with its subscriptions replayed.

The public API mirrors Aio-Trader's ``KiteFeed`` (CONTRACT §7) and adds what a production feed
needs: a liveness watchdog, replay of the subscriptions on every reconnect, a retry loop that
stops on HTTP 403 and does not reset on accept-then-close storms (``retry.py``), counters, and
handlers that can neither kill the feed nor stall the socket.

Tasks while ``connect()`` runs:

* ``connect()`` itself: the retry loop around one connection attempt at a time; per attempt a
  *reader* (socket -> inbox, never awaits user code), a *watchdog* (drops a silent connection)
  and the wait for ``close()``;
* the *dispatcher*: inbox -> decode -> handlers, in arrival order, across reconnects. Lifecycle
  events (connect, disconnect, reconnect) travel through the same inbox, so a handler sees the
  ticks of a connection before its ``on_disconnect``.

The reader never waits long for the handlers: the inbox (``inbox.py``) is bounded in frames
and bytes, and when a stuck consumer lets it fill for ``queue_timeout`` the older half of the
waiting tick frames is dropped (counted in ``stats.frames_dropped`` and logged) so the socket,
and with it the answers to the server's pings, keeps being read.
:meth:`KiteFeed.lag` tells a handler how far behind it is long before that, so one that paces
the feed (the bridge's publisher) can choose freshness in its own way first.

The dispatcher yields to the event loop at least every ``_SLICE`` seconds of work, so the
tasks a handler feeds (the bridge's publisher, its control loop) are never starved by a backlog
of frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import math
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeAlias, get_args

import structlog
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State

from bridge.kite.codec import FrameError, decode_frame
from bridge.kite.endpoint import (
    CLIENT_LOGGER,
    DEFAULT_KITE_CONNECT_URL,
    DEFAULT_KITE_WEB_URL,
    Secret,
    base_url,
    check_url,
    query_string,
)
from bridge.kite.inbox import STOP, Event, Inbox
from bridge.kite.messages import (
    InvalidText,
    KiteError,
    KiteMessage,
    OrderUpdate,
    OtherMessage,
    mode_message,
    parse_text_frame,
    subscribe_message,
    unsubscribe_message,
)
from bridge.kite.records import Mode
from bridge.kite.retry import AuthError, Backoff, RetriesExhausted, auth_error, retry_call

__all__ = [
    "CAUSES",
    "DEFAULT_KITE_CONNECT_URL",
    "DEFAULT_KITE_WEB_URL",
    "FeedError",
    "FeedStats",
    "FrameDecoder",
    "KiteFeed",
    "check_url",
]

_KITEFRONT: Final = "kitefront"
_MODES: Final[tuple[Mode, ...]] = get_args(Mode)
_UINT32_MAX: Final = 0xFFFF_FFFF
#: Kite's documented per-connection limit (kite-protocol.md §1.4); above it we only warn.
_MAX_TOKENS: Final = 3000
#: Packet count, one length prefix and the smallest packet (LTP, 8 bytes).
_SMALLEST_TICK_FRAME: Final = 2 + 2 + 8
#: Seconds a connection that delivered ticks must have stayed open to reset the retry counter.
_SERVED_FOR: Final = 1.0
#: Longest the dispatcher works through a backlog before it yields to the event loop.
_SLICE: Final = 0.005

#: Why a connection ended (``on_disconnect`` cause, ``stats.reconnects_by_cause`` keys):
#: ``dropped`` no close frame (1006), ``closed`` the server sent a close frame, ``stale`` no
#: frame for ``liveness_timeout``, ``ping_timeout`` no pong to a keepalive ping, ``error`` a
#: protocol error on our side, ``connect_failed`` the attempt never got a websocket,
#: ``client`` ``close()`` was called.
CAUSES: Final = (
    "dropped",
    "closed",
    "stale",
    "ping_timeout",
    "error",
    "connect_failed",
    "client",
)

#: What ``on_error`` receives: a server error text, an unparseable text frame, or an exception
#: (a malformed binary frame, a handler failure, a failed connection attempt, and last the
#: :class:`~bridge.kite.retry.AuthError` or :class:`~bridge.kite.retry.RetriesExhausted` that
#: ``connect()`` is about to raise).
FeedError: TypeAlias = KiteError | InvalidText | Exception

#: At most one logged traceback per handler in this many seconds (the rest are counted).
_FAILURE_LOG_INTERVAL: Final = 10.0


@dataclass(slots=True)
class FeedStats:
    """Counters of one feed since it was created; read them, do not write them."""

    #: Every websocket message, heartbeats and text included.
    frames: int = 0
    #: Ticks decoded (``parse_data=True`` only).
    ticks: int = 0
    heartbeats: int = 0
    text_messages: int = 0
    #: Binary frames that failed to decode plus text frames that are not Kite messages.
    malformed_frames: int = 0
    #: Packets of unknown length skipped inside otherwise good frames.
    skipped_packets: int = 0
    handler_errors: int = 0
    #: Frames dropped unhandled because the inbox was full (handlers too slow).
    frames_dropped: int = 0
    #: Successful handshakes.
    connections: int = 0
    #: Reconnect attempts scheduled, in total and by the cause of the failure before them.
    reconnects: int = 0
    reconnects_by_cause: dict[str, int] = field(default_factory=dict)
    #: Wall clock (epoch seconds) and ``time.monotonic()`` of the latest frame.
    last_frame_at: float | None = None
    last_frame_monotonic: float | None = None
    #: Epoch seconds when the current connection came up; ``None`` while disconnected.
    connected_since: float | None = None


class _Dropped(Exception):
    """An established connection ended; retryable."""

    def __init__(
        self, cause: str, code: int | None, reason: str, uptime: float = 0.0, served: bool = False
    ) -> None:
        self.cause = cause
        self.code = code
        self.reason = reason
        #: Seconds the connection had been open, and whether market data arrived on it: what the
        #: retry counter's reset looks at.
        self.uptime = uptime
        self.served = served
        super().__init__(f"connection {cause} (code {code}, reason {reason!r})")


def _connection_uptime(exc: Exception, elapsed: float) -> float:
    # Only an open connection counts as health: a handshake that hangs for connect_timeout is a
    # failure however long it took, or a black-holed gateway would be retried forever. And a
    # connection that delivered ticks for a second was healthy: on a link that drops every few
    # seconds the next attempt waits base_wait, not a backoff grown to a minute per drop. A
    # server that accepts and closes before any tick, or right after the first, still meets a
    # growing backoff and, in the end, RetriesExhausted.
    if not isinstance(exc, _Dropped):
        return 0.0
    return math.inf if exc.served and exc.uptime >= _SERVED_FOR else exc.uptime


def _retryable(exc: Exception) -> bool:
    # Network, timeout and handshake failures heal; anything else (a bad keyword argument, a
    # bug) would fail the same way 50 times over 45 minutes, so it is raised at once.
    return isinstance(exc, OSError | TimeoutError | EOFError | InvalidHandshake | _Dropped)


def _check_tokens(symbols: Iterable[int]) -> list[int]:
    if isinstance(symbols, str | bytes | bytearray):
        raise TypeError("symbols must be an iterable of instrument tokens, not a string")
    tokens: dict[int, None] = {}
    for token in symbols:
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"instrument token {token!r} is not an int")
        if not 0 < token <= _UINT32_MAX:
            raise ValueError(f"instrument token {token} is outside 1..{_UINT32_MAX}")
        tokens[token] = None
    return list(tokens)


def _check_mode(mode: object) -> Mode:
    for known in _MODES:
        if mode == known:
            return known
    raise ValueError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")


def _batches(tokens: list[int], size: int) -> Iterable[list[int]]:
    return (tokens[start : start + size] for start in range(0, len(tokens), size))


#: The stdlib logger a feed logs to when given none (as Aio-Trader does).
LOGGER_NAME: Final = "bridge.kite.feed"


class _StdlibRenderer:
    """structlog's last step for a stdlib logger: ``"event key=value ..."`` as the message, and
    ``exc_info`` handed to :mod:`logging` as such, so formatters and error trackers get the
    exception rather than a traceback flattened into the text."""

    def __init__(self) -> None:
        self._pairs = structlog.processors.KeyValueRenderer()

    def __call__(
        self, logger: Any, method: str, event_dict: structlog.typing.EventDict
    ) -> tuple[tuple[str], dict[str, Any]]:
        exc_info = event_dict.pop("exc_info", None)
        event = str(event_dict.pop("event", ""))
        message = f"{event} {self._pairs(logger, method, event_dict)}" if event_dict else event
        return (message,), ({"exc_info": exc_info} if exc_info else {})


def _make_logger(logger: Any) -> Any:
    """What the feed logs through: stdlib loggers (and adapters) are wrapped, anything else is
    taken to be a structlog-style logger (keyword arguments as context)."""
    if logger is None:
        logger = logging.getLogger(LOGGER_NAME)
    if isinstance(logger, logging.Logger | logging.LoggerAdapter):
        return structlog.wrap_logger(
            logger, wrapper_class=structlog.stdlib.BoundLogger, processors=[_StdlibRenderer()]
        )
    return logger


TickHandler: TypeAlias = Callable[["KiteFeed", Any], object]
#: Turns one binary frame into what ``on_tick`` gets; appends unknown packet lengths to its
#: list argument and raises :class:`~bridge.kite.codec.FrameError` on corrupt framing.
FrameDecoder: TypeAlias = Callable[[bytes, list[int]], Sequence[Any]]
OrderHandler: TypeAlias = Callable[["KiteFeed", dict[str, Any]], object]
ErrorHandler: TypeAlias = Callable[["KiteFeed", FeedError], object]
MessageHandler: TypeAlias = Callable[["KiteFeed", KiteMessage | OtherMessage], object]
ConnectHandler: TypeAlias = Callable[["KiteFeed"], object]
DisconnectHandler: TypeAlias = Callable[["KiteFeed", str, int | None, str], object]
ReconnectHandler: TypeAlias = Callable[["KiteFeed", int, float], object]


class KiteFeed:
    """A Kite ticker connection that stays up, with Aio-Trader's constructor and methods.

    Handlers are plain functions or coroutine functions, given to the constructor or assigned
    later (``feed.on_tick = fn``); all run on one dispatcher task, in arrival order, and a
    coroutine handler is awaited before the next frame is handed out. A handler that raises is
    counted in ``stats.handler_errors``, reported to ``on_error`` and logged with its traceback
    (at most once per 10 s per handler); the feed carries on.

    * ``on_tick(feed, ticks)``: a non-empty ``list[Tick]`` per binary frame, or with
      ``parse_data=False`` every frame raw, as the Aio-Trader reference does: ``bytes`` for a
      binary frame, ``str`` for a text frame, which then reaches no other handler (heartbeats
      are never delivered).
      ``decoder`` replaces :func:`~bridge.kite.codec.decode_frame` (the service passes
      ``codec.frame_payloads``); the feed still counts ticks, skipped packets and malformed
      frames;
    * ``on_order_update(feed, data)``: the ``data`` dict of an order text frame;
    * ``on_message(feed, message)``: a :class:`~bridge.kite.messages.KiteMessage`, or an
      :class:`~bridge.kite.messages.OtherMessage` for a type Kite has not documented;
    * ``on_error(feed, error)``: a :data:`FeedError`;
    * ``on_connect(feed)``: after each handshake, once the subscriptions have been replayed;
    * ``on_disconnect(feed, cause, code, reason)``: an established connection ended
      (``cause`` in :data:`CAUSES`);
    * ``on_reconnect(feed, attempt, wait)``: a retry is scheduled (``attempt`` from 1).
    """

    def __init__(
        self,
        api_key: str = _KITEFRONT,
        user_id: str | None = None,
        enctoken: str | None = None,
        access_token: str | None = None,
        parse_data: bool = True,
        logger: Any = None,
        *,
        url: str | None = None,
        max_retries: int = 50,
        base_wait: float = 2,
        max_wait: float = 60,
        reset_after: float = 30,
        liveness_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        batch_size: int = 200,
        queue_size: int = 10_000,
        queue_bytes: int = 8 * 2**20,
        queue_timeout: float = 1.0,
        decoder: FrameDecoder = decode_frame,
        on_tick: TickHandler | None = None,
        on_order_update: OrderHandler | None = None,
        on_connect: ConnectHandler | None = None,
        on_disconnect: DisconnectHandler | None = None,
        on_reconnect: ReconnectHandler | None = None,
        on_error: ErrorHandler | None = None,
        on_message: MessageHandler | None = None,
    ) -> None:
        if not (enctoken or access_token):
            raise ValueError("either access_token or enctoken is required")
        if enctoken and not user_id:
            raise ValueError("user_id is required with enctoken")
        if access_token and api_key == _KITEFRONT:
            raise ValueError(f"access_token needs your Kite Connect api_key, not {_KITEFRONT!r}")
        if not isinstance(api_key, str) or not api_key:
            # e.g. api_key=os.getenv("KITE_API_KEY") with the variable unset: say so here, not
            # as a 403 "token expired" from the server later.
            raise ValueError(f"api_key must be a non-empty string, not {api_key!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries}")
        if not liveness_timeout > 0 or not connect_timeout > 0:
            raise ValueError("liveness_timeout and connect_timeout must be > 0")
        if batch_size < 1 or queue_size < 1 or queue_bytes < 1:
            raise ValueError("batch_size, queue_size and queue_bytes must be >= 1")

        self.api_key = api_key
        self.user_id = user_id
        self.parse_data = parse_data
        self._decoder = decoder
        self.max_retries = max_retries
        self.reset_after = reset_after
        self.liveness_timeout = liveness_timeout
        self.connect_timeout = connect_timeout
        self.batch_size = batch_size
        self._backoff = Backoff(float(base_wait), float(max_wait))
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self.queue_timeout = queue_timeout
        # The access-token flavour wins when both tokens are given (as in Aio-Trader).
        if access_token:
            self._auth = "access_token"
            self._secret = Secret(access_token)
            self._base = base_url(url, DEFAULT_KITE_CONNECT_URL)
            self._headers: dict[str, str] = {"X-Kite-Version": "3"}
        else:
            assert enctoken is not None  # checked above; helps mypy
            self._auth = "enctoken"
            self._secret = Secret(enctoken)
            self._base = base_url(url, DEFAULT_KITE_WEB_URL)
            self._headers = {}

        self.on_tick = on_tick
        self.on_order_update = on_order_update
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_reconnect = on_reconnect
        self.on_error = on_error
        self.on_message = on_message

        self.stats = FeedStats()
        #: Binary frames that can hold ticks, read so far: see :func:`_connection_uptime`.
        self._tick_frames = 0
        self.connected = False
        self._log = _make_logger(logger)
        self._subs: dict[int, Mode] = {}
        self._subs_view = types.MappingProxyType(self._subs)
        self._lock = asyncio.Lock()  # one writer of subscription messages at a time
        self._ws: ClientConnection | None = None
        self._closing = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopped.set()
        self._inbox = Inbox(queue_size, queue_bytes)
        self._drop_logged_at = -1e9
        # handler name -> (when its failure was last logged, failures not logged since)
        self._failure_log: dict[str, tuple[float, int]] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self._runner: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ----------------------------------------------------------------------------------------
    # Introspection

    @property
    def subscriptions(self) -> Mapping[int, Mode]:
        """Read-only live view of the replay set: token -> mode."""
        return self._subs_view

    @property
    def redacted_url(self) -> str:
        """The connection URL with the credential replaced by ``***``: safe to log."""
        return self._url(redact=True)

    @property
    def pending(self) -> int:
        """Frames and events waiting for the dispatcher."""
        return self._inbox.qsize()

    def lag(self) -> float:
        """Seconds the oldest frame still waiting for the handlers has waited; 0 when none.

        How far behind the handlers are: a handler that paces the feed (by returning an
        awaitable) can stop pacing once this grows, rather than delay every tick behind it.
        """
        stamps = self._inbox.stamps
        return time.monotonic() - stamps[0] if stamps else 0.0

    def __repr__(self) -> str:
        return (
            f"<KiteFeed {self._auth} url={self.redacted_url!r} connected={self.connected} "
            f"subscriptions={len(self._subs)}>"
        )

    def _url(self, *, redact: bool = False) -> str:
        secret = None if redact else self._secret.reveal()
        params: list[tuple[str, str | None]]
        if self._auth == "access_token":
            params = [("api_key", self.api_key), ("access_token", secret)]
        else:
            assert self.user_id is not None
            params = [
                ("api_key", self.api_key),
                ("user_id", self.user_id),
                ("enctoken", secret),
                ("agent", "kite3-web"),
                ("version", "3.0.0"),
            ]
        return f"{self._base}?{query_string(params)}"

    def _options(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {
            "additional_headers": self._headers,
            "compression": None,  # binary ticks do not compress well; saves CPU and ~50 KiB
            "proxy": None,  # a daemon should not pick up proxies from the environment
            "open_timeout": self.connect_timeout,
            "ping_interval": 10,
            "ping_timeout": 10,
            "close_timeout": 2,  # close() must stay prompt even against a stalled server
            "max_size": 2**22,  # a full-mode frame of 3000 instruments is ~560 KB
            "logger": CLIENT_LOGGER,
        }
        options.update(overrides)
        if "additional_headers" in overrides and self._headers:
            merged = Headers(self._headers)  # keep X-Kite-Version next to the caller's headers
            merged.update(overrides["additional_headers"] or {})
            options["additional_headers"] = merged
        return options

    # ----------------------------------------------------------------------------------------
    # Subscriptions: the replay set is the truth; the socket gets the change when it is up.

    async def subscribe_symbols(self, symbols: Iterable[int], mode: Mode = "quote") -> None:
        """Subscribe ``symbols`` in ``mode`` (``subscribe`` then ``mode`` on the wire).

        Tokens already subscribed get ``mode`` alone: Kite counts a repeated ``subscribe``
        against its 3000-token limit (kite-protocol §7, pitfall 5).
        Works in any state: the replay set is updated at once and sent on every connect.
        Raises ``TypeError``/``ValueError`` for bad tokens or modes, never for the connection.
        """
        tokens = _check_tokens(symbols)
        checked = _check_mode(mode)
        if not tokens:
            return
        async with self._lock:
            known = [token for token in tokens if token in self._subs]
            new = [token for token in tokens if token not in self._subs]
            for token in tokens:
                self._subs[token] = checked
            self._warn_if_over_limit()
            messages = self._subscribe_messages({checked: new})
            messages += [mode_message(checked, batch) for batch in _batches(known, self.batch_size)]
            await self._send(messages)

    async def unsubscribe_symbols(self, symbols: Iterable[int]) -> None:
        """Drop ``symbols`` from the replay set and unsubscribe them (unknown ones are fine)."""
        tokens = _check_tokens(symbols)
        if not tokens:
            return
        async with self._lock:
            for token in tokens:
                self._subs.pop(token, None)
            await self._send(self._unsubscribe_messages(tokens))

    async def reconcile(self, desired: Mapping[int, Mode]) -> None:
        """Make the replay set equal ``desired``, sending only the difference.

        Removed tokens are unsubscribed first (room under Kite's 3000 limit), new ones get
        ``subscribe`` + ``mode`` and tokens whose mode changed get ``mode`` alone.
        All-or-nothing: one bad token or mode raises before anything changes.
        """
        target = {token: _check_mode(desired[token]) for token in _check_tokens(desired)}
        async with self._lock:
            removed = [token for token in self._subs if token not in target]
            added: dict[Mode, list[int]] = {}
            changed: dict[Mode, list[int]] = {}
            for token, mode in target.items():
                current = self._subs.get(token)
                if current is None:
                    added.setdefault(mode, []).append(token)
                elif current != mode:
                    changed.setdefault(mode, []).append(token)
            for token in removed:
                del self._subs[token]
            self._subs.update(target)
            self._warn_if_over_limit()
            messages = self._unsubscribe_messages(removed)
            messages += self._subscribe_messages(added)
            for mode, tokens in changed.items():
                messages += [
                    mode_message(mode, batch) for batch in _batches(tokens, self.batch_size)
                ]
            if messages:
                self._log.debug(
                    "reconcile",
                    removed=len(removed),
                    added=sum(map(len, added.values())),
                    changed=sum(map(len, changed.values())),
                )
            await self._send(messages)

    def _subscribe_messages(self, groups: Mapping[Mode, list[int]]) -> list[str]:
        messages = []
        for mode in _MODES:
            for batch in _batches(groups.get(mode, []), self.batch_size):
                messages.append(subscribe_message(batch))
                messages.append(mode_message(mode, batch))
        return messages

    def _unsubscribe_messages(self, tokens: list[int]) -> list[str]:
        return [unsubscribe_message(batch) for batch in _batches(tokens, self.batch_size)]

    def _warn_if_over_limit(self) -> None:
        if len(self._subs) > _MAX_TOKENS:
            self._log.warning("too_many_tokens", tokens=len(self._subs), limit=_MAX_TOKENS)

    async def _send(self, messages: list[str]) -> None:
        """Send now if connected (caller holds the lock); a dead socket is the session's job.

        Not interrupted half-way: the replay set already holds the change, so a caller
        cancelled mid-send (the service cancels a resync when the next connection is up) would
        leave Kite told only part of it, and the next reconcile would find nothing to send. A
        cancellation waits for the messages to go out (a closed socket ends that at once), then
        is raised.
        """
        ws = self._ws
        if ws is None or not messages:
            return
        sending = asyncio.ensure_future(self._send_all(ws, messages))
        cancelled = False
        while not sending.done():
            try:
                await asyncio.shield(sending)
            except asyncio.CancelledError:
                if sending.cancelled():
                    raise
                cancelled = True
        if cancelled:
            with contextlib.suppress(Exception):
                sending.result()  # retrieved: the cancellation is what the caller asked for
            raise asyncio.CancelledError
        sending.result()

    async def _send_all(self, ws: ClientConnection, messages: list[str]) -> None:
        try:
            for message in messages:
                await ws.send(message)
        except ConnectionClosed:
            self._log.debug("send_failed_will_replay", messages=len(messages))

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    async def connect(self, **kwargs: Any) -> None:
        """Connect and keep reconnecting until :meth:`close`; then return normally.

        ``kwargs`` go to :func:`websockets.asyncio.client.connect` and override our defaults
        (``compression=None``, ``proxy=None``, ``open_timeout=connect_timeout``, keepalive
        pings every 10 s with a 10 s timeout, ``close_timeout=2``, ``max_size=4 MiB``).

        Raises :class:`~bridge.kite.retry.AuthError` on an HTTP 403 handshake (no retry),
        :class:`~bridge.kite.retry.RetriesExhausted` when the retries run out, and at once any
        error that no retry can fix (e.g. a bad keyword argument).
        """
        if self._runner is not None:
            raise RuntimeError("connect() is already running")
        self._bind_loop()
        self._runner = asyncio.current_task()
        self._stopped.clear()
        self._inbox = Inbox(self._queue_size, self._queue_bytes)
        dispatcher = asyncio.create_task(self._dispatch(), name="kite-feed-dispatch")
        self._dispatcher = dispatcher
        try:
            await retry_call(
                partial(self._session, kwargs),
                max_retries=self.max_retries,
                backoff=self._backoff,
                reset_after=self.reset_after,
                retryable=_retryable,
                on_retry=self._on_retry,
                sleep=self._sleep,
                uptime=_connection_uptime,
            )
        except AuthError as exc:
            self._log.error("auth_failed", status=exc.status, url=self.redacted_url)
            self._inbox.put_nowait(Event("on_error", (exc,)))  # delivered before the drain ends
            raise
        except RetriesExhausted as exc:
            self._log.error(
                "retries_exhausted",
                attempts=exc.attempts,
                error=f"{type(exc.last_error).__name__}: {exc.last_error}",
            )
            self._inbox.put_nowait(Event("on_error", (exc,)))
            raise
        except asyncio.CancelledError:
            dispatcher.cancel()
            raise
        finally:
            self.connected = False
            self._ws = None
            if dispatcher.cancelling():
                with contextlib.suppress(asyncio.CancelledError):
                    await dispatcher
            else:
                await self._stop_dispatcher(dispatcher)
            self._dispatcher = None
            self._runner = None
            self._closing.clear()
            self._stopped.set()
        self._log.info("feed_closed", frames=self.stats.frames, reconnects=self.stats.reconnects)

    def _bind_loop(self) -> None:
        """Give a feed reused under a new event loop (a second ``asyncio.run()``) new primitives.

        asyncio's Event and Lock belong to the loop that first waited on them; reused from
        another loop they fail, and the feed would read that as a close. A pending ``close()``
        carries over.
        """
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            closing = self._closing.is_set()
            self._lock = asyncio.Lock()
            self._closing = asyncio.Event()
            if closing:
                self._closing.set()
            self._stopped = asyncio.Event()
            self._stopped.set()
        self._loop = loop

    async def close(self) -> None:
        """Stop the feed: close the socket (code 1000), stop retrying, let ``connect()`` return.

        Safe from any task, handlers included, and idempotent. Called before ``connect()``,
        it makes the next ``connect()`` return at once.
        """
        self._closing.set()
        current = asyncio.current_task()
        if self._runner is None or current in (self._runner, self._dispatcher):
            return  # waiting here would deadlock: connect() waits for the dispatcher
        await self._stopped.wait()

    async def handshake(self, **kwargs: Any) -> None:
        """Open one connection and close it at once (code 1000): the endpoint and login work.

        For preflight checks (``bridge check-config --connect``): no retry, no subscriptions,
        and no effect on a running :meth:`connect`. ``kwargs`` as for :meth:`connect`. Raises
        :class:`~bridge.kite.retry.AuthError` on HTTP 403, ``ValueError`` for a URL that is not
        a websocket URL, and otherwise the handshake's own error (``OSError``,
        ``TimeoutError``, ``InvalidHandshake``).
        """
        try:
            async with ws_connect(self._url(), **self._options(kwargs)):
                pass
        except InvalidURI:
            raise ValueError(f"invalid feed URL {self.redacted_url}") from None
        except InvalidStatus as exc:
            refused = auth_error(exc)
            if refused is None:
                raise
            raise refused from None

    async def _sleep(self, seconds: float) -> None:
        """Backoff sleep that ``close()`` cuts short."""
        # asyncio.timeout, not wait_for: on 3.11 wait_for can drop a cancellation of connect().
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    def _on_retry(self, attempt: int, wait: float, exc: Exception) -> None:
        cause = exc.cause if isinstance(exc, _Dropped) else "connect_failed"
        stats = self.stats
        stats.reconnects += 1
        stats.reconnects_by_cause[cause] = stats.reconnects_by_cause.get(cause, 0) + 1
        self._log.warning(
            "reconnecting",
            attempt=attempt,
            wait=round(wait, 3),
            cause=cause,
            error=f"{type(exc).__name__}: {exc}",
            subscriptions=len(self._subs),
        )
        if not isinstance(exc, _Dropped):
            self._inbox.put_nowait(Event("on_error", (exc,)))
        self._inbox.put_nowait(Event("on_reconnect", (attempt, wait)))

    async def _stop_dispatcher(self, dispatcher: asyncio.Task[None], drain: float = 2.0) -> None:
        """Let the dispatcher deliver what is queued (at most ``drain`` s), then stop it."""
        if not dispatcher.done():
            self._inbox.put_nowait(STOP)
            done, _ = await asyncio.wait({dispatcher}, timeout=drain)
            if not done:
                self._log.warning("dispatch_abandoned", pending=self._inbox.qsize())
                dispatcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dispatcher

    # ----------------------------------------------------------------------------------------
    # One connection

    async def _session(self, options: Mapping[str, Any]) -> None:
        """One attempt: open, replay, serve. Returns only when closing; otherwise raises."""
        if self._closing.is_set():
            return
        ws = await self._open(options)
        if ws is None:
            return
        opened = time.monotonic()
        tick_frames = self._tick_frames
        announced = False
        try:
            self.stats.connections += 1
            announced = await self._replay(ws)
            cause, code, reason = await self._serve(ws, opened)
        finally:
            self._ws = None
            self.connected = False
            self.stats.connected_since = None
            if ws.state is not State.CLOSED:
                ws.transport.abort()
        uptime = round(time.monotonic() - opened, 3)
        if announced:
            log = self._log.info if cause == "client" else self._log.warning
            log("disconnected", cause=cause, code=code, reason=reason, uptime=uptime)
            self._inbox.put_nowait(Event("on_disconnect", (cause, code, reason)))
        if cause == "client" or self._closing.is_set():
            return
        raise _Dropped(cause, code, reason, uptime, served=self._tick_frames > tick_frames)

    async def _open(self, options: Mapping[str, Any]) -> ClientConnection | None:
        """Handshake, abandoned if ``close()`` comes first."""
        try:
            opener = ws_connect(self._url(), **self._options(options))
        except InvalidURI:
            raise ValueError(f"invalid feed URL {self.redacted_url}") from None
        dial: asyncio.Future[ClientConnection] = asyncio.ensure_future(opener)
        stop = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((dial, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not dial.done():
                dial.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await dial
        if self._closing.is_set():
            if not dial.cancelled() and dial.exception() is None:
                await dial.result().close()  # the handshake won the race: undo it
            return None
        return dial.result()  # raises the handshake's error, if any

    async def _replay(self, ws: ClientConnection) -> bool:
        """Send the replay set grouped by mode; False if the socket died meanwhile."""
        async with self._lock:
            groups: dict[Mode, list[int]] = {}
            # Past Kite's limit the server refuses what comes last. Before the reconnect that
            # was the newest subscriptions; replayed grouped by mode it would be whichever mode
            # comes last, so a different instrument would go dark at every reconnect. The
            # oldest _MAX_TOKENS are replayed, the rest left out, and the same ones each time.
            for token, mode in itertools.islice(self._subs.items(), _MAX_TOKENS):
                groups.setdefault(mode, []).append(token)
            if len(self._subs) > _MAX_TOKENS:
                left_out = list(itertools.islice(self._subs, _MAX_TOKENS, None))
                self._log.warning(
                    "too_many_tokens",
                    tokens=len(self._subs),
                    limit=_MAX_TOKENS,
                    left_out=len(left_out),
                    newest_left_out=left_out[-5:],
                )
            try:
                for message in self._subscribe_messages(groups):
                    await ws.send(message)
            except ConnectionClosed:
                return False
            self._ws = ws
            self.connected = True
            self.stats.connected_since = time.time()
        self._log.info(
            "connected",
            url=self.redacted_url,
            subscriptions=len(self._subs),
            **{mode: len(tokens) for mode, tokens in groups.items()},
        )
        self._inbox.put_nowait(Event("on_connect", ()))
        return True

    async def _serve(self, ws: ClientConnection, opened: float) -> tuple[str, int | None, str]:
        """Read until the connection ends, goes stale or ``close()`` is called; say why."""
        reader = asyncio.create_task(self._read(ws), name="kite-feed-reader")
        watchdog = asyncio.create_task(self._watch(opened), name="kite-feed-watchdog")
        stop = asyncio.create_task(self._closing.wait())
        tasks = (reader, watchdog, stop)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if stop.done() and not stop.cancelled():
            # Keep reading (and discarding) during the closing handshake: with the reader gone
            # a full receive buffer would hide the server's close frame until close_timeout.
            discard = asyncio.create_task(self._discard(ws))
            await ws.close()
            discard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await discard
            return "client", 1000, ""
        if watchdog.done() and not watchdog.cancelled():
            idle = watchdog.result()
            self._log.warning("stale", idle=round(idle, 3), timeout=self.liveness_timeout)
            ws.transport.abort()  # a silent peer will not answer a close frame either
            return "stale", 1006, f"no frame for {idle:.1f}s"
        error = None if reader.cancelled() else reader.exception()
        if error is not None and not isinstance(error, ConnectionClosed):
            self._log.error("reader_failed", exc_info=error)
            return "error", None, f"{type(error).__name__}: {error}"
        return self._close_cause(ws)

    @staticmethod
    async def _discard(ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass

    @staticmethod
    def _close_cause(ws: ClientConnection) -> tuple[str, int | None, str]:
        protocol = ws.protocol
        sent, rcvd = protocol.close_sent, protocol.close_rcvd
        if sent is not None and (rcvd is None or not protocol.close_rcvd_then_sent):
            # We closed first: websockets failed the connection (keepalive, oversize frame, ...).
            cause = "ping_timeout" if "keepalive" in sent.reason else "error"
            return cause, sent.code, sent.reason
        if rcvd is not None:
            return "closed", rcvd.code, rcvd.reason
        return "dropped", 1006, ""

    async def _read(self, ws: ClientConnection) -> None:
        """The hot path: stamp, count, enqueue. Never awaits user code."""
        stats = self.stats
        inbox = self._inbox
        items, limit, max_bytes, ready = inbox.items, inbox.limit, inbox.max_bytes, inbox.ready
        monotonic = time.monotonic
        wall = time.time
        stamps = inbox.stamps
        async for message in ws:
            stats.frames += 1
            stats.last_frame_monotonic = now = monotonic()
            stats.last_frame_at = wall()
            if type(message) is bytes:
                if len(message) < 2:  # 1-byte heartbeat: liveness only
                    stats.heartbeats += 1
                    continue
                if len(message) >= _SMALLEST_TICK_FRAME and (message[0] or message[1]):
                    # Room for a packet and a packet count: market data, what resets the retry
                    # counter (an empty or cut-off frame from a failing server does not).
                    self._tick_frames += 1
            else:
                stats.text_messages += 1
            if len(items) < limit and inbox.size < max_bytes:
                inbox.size += len(message)
                stamps.append(now)
                items.append(message)
                ready.set()
            else:
                dropped = await inbox.put_frame(message, now, self.queue_timeout)
                if not dropped:
                    continue
                stats.frames_dropped += dropped
                if now - self._drop_logged_at >= 60.0:
                    self._drop_logged_at = now
                    self._log.warning(
                        "frames_dropped",
                        reason="handlers too slow: the inbox was full",
                        dropped=dropped,
                        dropped_total=stats.frames_dropped,
                    )

    async def _watch(self, opened: float) -> float:
        """Return the idle time once the server has said nothing for ``liveness_timeout``."""
        timeout = self.liveness_timeout
        stats = self.stats
        inbox = self._inbox
        grace = False
        while True:
            last = max(opened, stats.last_frame_monotonic or 0.0, inbox.waited_until)
            idle = 0.0 if inbox.waiting else time.monotonic() - last
            if idle < timeout:
                grace = False
            elif grace:
                return idle
            else:
                # Once more after a moment: if the event loop itself was blocked, frames that
                # came meanwhile wait in the socket buffer, and the reader has not had its turn.
                grace = True
                await asyncio.sleep(0.05)
                continue
            await asyncio.sleep(timeout - idle)

    # ----------------------------------------------------------------------------------------
    # Dispatch: the only place user code runs.

    async def _dispatch(self) -> None:  # noqa: C901 (the per-frame path stays in one frame)
        inbox = self._inbox
        stats = self.stats
        items = inbox.items
        skipped: list[int] = []
        decode = self._decoder
        monotonic = time.monotonic
        yield_at = monotonic() + _SLICE
        while True:
            if not items:
                await inbox.wait()
                yield_at = monotonic() + _SLICE
            elif monotonic() >= yield_at:
                await asyncio.sleep(0)  # let the reader, the publisher and the rest have a turn
                yield_at = monotonic() + _SLICE
            item = inbox.pop()
            try:
                if type(item) is bytes:
                    handler = self.on_tick
                    if self.parse_data:
                        try:
                            ticks = decode(item, skipped)
                        except FrameError as exc:
                            await self._malformed(exc, len(item))
                            continue
                        if skipped:
                            stats.skipped_packets += len(skipped)
                            skipped.clear()
                        stats.ticks += len(ticks)
                        if not ticks:
                            continue
                        payload: Any = ticks
                    else:
                        payload = item
                    if handler is not None:
                        try:
                            result = handler(self, payload)
                            if result is not None and inspect.isawaitable(result):
                                await result
                        except Exception as exc:
                            await self._handler_failed("on_tick", exc)
                elif type(item) is str:
                    if self.parse_data:
                        await self._text(item)
                    else:  # raw means every frame, as the reference's parse_data=False
                        await self._call("on_tick", item)
                elif item is STOP:
                    return
                else:
                    assert isinstance(item, Event)
                    await self._call(item.handler, *item.args)
            except Exception:  # a bug here must not stop delivery of later frames
                self._log.exception("dispatch_failed")

    async def _text(self, text: str) -> None:
        message = parse_text_frame(text)
        if isinstance(message, OrderUpdate):
            await self._call("on_order_update", message.data)
        elif isinstance(message, KiteError):
            self._log.warning("kite_error", message=message.message)
            await self._call("on_error", message)
        elif isinstance(message, KiteMessage):
            self._log.info("kite_message", message=message.message)
            await self._call("on_message", message)
        elif isinstance(message, OtherMessage):
            self._log.info("kite_message", type=message.type, size=len(text))
            await self._call("on_message", message)
        else:
            self.stats.malformed_frames += 1
            self._log.warning("invalid_text", reason=message.reason, size=len(text))
            await self._call("on_error", message)

    async def _malformed(self, exc: FrameError, size: int) -> None:
        self.stats.malformed_frames += 1
        self._log.warning("malformed_frame", error=str(exc), size=size)
        await self._call("on_error", exc)

    async def _call(self, name: str, *args: Any) -> None:
        handler: Callable[..., object] | None = getattr(self, name)
        if handler is None:
            return
        try:
            result = handler(self, *args)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            await self._handler_failed(name, exc)

    async def _handler_failed(self, name: str, exc: Exception) -> None:
        """Count, log and report a handler's exception.

        A handler that fails on every frame would log thousands of tracebacks a second: each
        handler's first failure is logged with its traceback, then at most one every
        ``_FAILURE_LOG_INTERVAL`` seconds, saying how many were not logged in between. Every
        failure is still counted and reported to ``on_error``.
        """
        self.stats.handler_errors += 1
        now = time.monotonic()
        logged_at, suppressed = self._failure_log.get(name, (-1e18, 0))
        if now - logged_at >= _FAILURE_LOG_INTERVAL:
            self._failure_log[name] = (now, 0)
            self._log.error(
                "handler_failed",
                handler=name,
                exc_info=exc,
                **({"not_logged": suppressed} if suppressed else {}),
            )
        else:
            self._failure_log[name] = (logged_at, suppressed + 1)
        if name != "on_error":
            await self._call("on_error", exc)
