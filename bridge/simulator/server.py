"""A protocol-faithful Kite ticker server for tests, demos and benchmarks (kite-protocol §9).

Authentication happens in the HTTP upgrade (``process_request``), so a bad token gets a real
HTTP 403 and no websocket at all, exactly what clients must be able to tell apart from a drop.
Each connection runs two tasks: the websockets handler reads client JSON, and a sender task emits
tick frames, heartbeats and nothing else. Fault injection acts on the transports directly
(``abort`` for drops, ``pause_reading`` for stalls) so clients see what a broken network shows.

Memory stays bounded in long runs: the ``handshakes`` and ``received`` records keep only the
newest ``history_limit`` entries, and the market forgets the oldest instruments that no connection
subscribes any more once there are more than ``idle_token_limit`` of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Final, TypeVar, get_args
from urllib.parse import parse_qs, unquote_plus, urlsplit

import structlog
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import EXTERNAL_CLOSE_CODES
from websockets.http11 import Request, Response

from bridge.kite.codec import FULL_LENGTH, QUOTE_LENGTH, encode_packet
from bridge.kite.endpoint import RedactingAdapter
from bridge.kite.records import IST, Mode
from bridge.simulator.market import Market

__all__ = [
    "HEARTBEAT",
    "ConnectionState",
    "FrameHook",
    "HandshakeRecord",
    "Simulator",
    "check_close_code",
    "sample_order",
]

log = structlog.get_logger(__name__)

#: The idle heartbeat: a one-byte binary frame (kite-protocol §4).
HEARTBEAT: Final = b"\x00"
#: Kite Web sessions authenticate with this api_key plus ``user_id`` and ``enctoken``.
KITE_WEB_API_KEY: Final = "kitefront"

#: ``on_frame_sent(frame_no, monotonic_ns, tokens)``: called after every tick frame is sent.
FrameHook = Callable[[int, int, tuple[int, ...]], None]

_MODES: Final = frozenset(get_args(Mode))
_UINT32_MAX: Final = 0xFFFF_FFFF
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
#: In firehose mode the frame number goes into ``volume_traded`` (packet bytes [16, 20)).
_VOLUME_OFFSET: Final = 2 + 16
_SEQUENCE_MODULUS: Final = 2**31
_MAX_ERROR_ECHO: Final = 80
#: Characters that must reach the server percent-encoded in an enctoken (kite-protocol §1.2): a
#: raw ``+`` would decode to a space and a raw ``=`` is ambiguous; ``/`` is sent raw by aiohttp.
_RAW_ENCTOKEN_CHARS: Final = frozenset("+=")

_T = TypeVar("_T")


@dataclass
class HandshakeRecord:
    """One upgrade attempt as the server saw it. ``params`` holds secrets: never log it."""

    status: int
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    connection_id: int | None
    reason: str
    at: float


@dataclass(eq=False)
class ConnectionState:
    """What the server knows about one open connection; dropped when the connection closes."""

    id: int
    params: dict[str, str]
    websocket: ServerConnection = field(repr=False)
    subscriptions: dict[int, Mode] = field(default_factory=dict)
    #: Subscribe requests per token: Kite counts duplicates against the per-connection limit.
    counts: Counter[int] = field(default_factory=Counter)
    frames_sent: int = 0
    ticks_sent: int = 0
    heartbeats_sent: int = 0
    opened_at: float = field(default_factory=time.time)
    wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    flush: bool = field(default=False, repr=False)
    next_frame_at: float = field(default=0.0, repr=False)
    cursor: int = field(default=0, repr=False)
    layout: list[tuple[int, Mode]] | None = field(default=None, repr=False)

    @property
    def subscribed_count(self) -> int:
        return sum(self.counts.values())


class _BadMessage(ValueError):
    """A client message the server answers with an error text frame."""


class Simulator:
    """A local Kite ticker: ``async with Simulator() as sim: connect(sim.url + "?api_key=...")``.

    ``access_tokens``, ``enctokens`` (user_id → enctoken) and ``api_keys`` restrict who may
    connect; ``None`` accepts any non-empty value. ``firehose`` replaces the paced tick loop
    with back-to-back frames of up to ``packets_per_frame`` packets (optionally limited to
    ``frames_per_second``), each quote/full packet carrying the frame number in
    ``volume_traded``; ``on_frame_sent`` reports when each frame left. See docs/simulator.md.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_tokens: Collection[str] | None = None,
        enctokens: Mapping[str, str] | None = None,
        api_keys: Collection[str] | None = None,
        tick_interval: float = 0.2,
        heartbeat_interval: float = 1.0,
        max_tokens: int = 3000,
        seed: int | None = None,
        firehose: bool = False,
        packets_per_frame: int = 500,
        frames_per_second: float | None = None,
        on_frame_sent: FrameHook | None = None,
        compression: bool = False,
        history_limit: int = 1000,
        idle_token_limit: int = 10_000,
        unlisted: Collection[int] = (),
    ) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if history_limit < 1:
            raise ValueError("history_limit must be at least 1")
        if idle_token_limit < 0:
            raise ValueError("idle_token_limit must be at least 0")
        if not 1 <= packets_per_frame <= 0xFFFF:
            raise ValueError("packets_per_frame must be between 1 and 65535")
        if tick_interval <= 0 or heartbeat_interval <= 0:
            raise ValueError("tick_interval and heartbeat_interval must be positive")
        if frames_per_second is not None and frames_per_second <= 0:
            raise ValueError("frames_per_second must be positive")
        self.host = host
        self.port = port
        self.access_tokens = None if access_tokens is None else frozenset(access_tokens)
        self.enctokens = None if enctokens is None else dict(enctokens)
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.tick_interval = tick_interval
        self.heartbeat_interval = heartbeat_interval
        self.max_tokens = max_tokens
        self.firehose = firehose
        self.packets_per_frame = packets_per_frame
        self.frames_per_second = frames_per_second
        self.on_frame_sent = on_frame_sent
        self.compression = compression
        self.history_limit = history_limit
        self.idle_token_limit = idle_token_limit
        #: Tokens of no instrument: subscribed like any other (Kite does not validate tokens,
        #: kite-protocol §1.4), but they never tick. A typo in an operator's command looks so.
        self.unlisted = frozenset(unlisted)
        self.market = Market(seed)

        #: The newest ``history_limit`` client messages and upgrade attempts, oldest first.
        self.received: list[tuple[int, dict[str, Any]]] = []
        self.handshakes: list[HandshakeRecord] = []
        self.connections: dict[int, ConnectionState] = {}

        self._server: Server | None = None
        self._next_id = 0
        self._frame_no = 0
        self._pending: dict[ServerConnection, tuple[int, dict[str, str]]] = {}
        self._rejections: list[int] = []
        self._expired: set[str] = set()
        self._stalled = False
        # token -> monotonic time of its last walk step; (token, mode) -> (version, entry)
        self._stepped_at: dict[int, float] = {}
        self._entries: dict[tuple[int, Mode], tuple[int, bytes]] = {}
        # token -> connections subscribing it; market tokens nobody subscribes, oldest first
        self._watchers: Counter[int] = Counter()
        self._idle: dict[int, None] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen; ``port=0`` picks a free port, readable from ``port`` and ``url`` after this."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            compression="deflate" if self.compression else None,
            # The real server is not known to ping; clients' own pings are still answered.
            ping_interval=None,
            close_timeout=2,
            max_size=2**22,
            logger=RedactingAdapter(logging.getLogger("websockets.server"), {}),
        )
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1]
        log.info("simulator listening", url=self.url, firehose=self.firehose)

    async def stop(self) -> None:
        """Close every connection (1001) and stop listening."""
        server, self._server = self._server, None
        if server is None:
            return
        self.stall(False)  # paused transports could not complete the closing handshake
        server.close()
        await server.wait_closed()
        log.info("simulator stopped")

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """``ws://host:port`` without a path or query; append ``/?api_key=...``."""
        if self._server is None:
            raise RuntimeError("simulator not started")
        return f"ws://{self.host}:{self.port}"

    # -- observation -------------------------------------------------------------------------

    def subscriptions(self) -> dict[int, Mode]:
        """Subscriptions of the most recently opened connection still open (``{}`` if none)."""
        if not self.connections:
            return {}
        return dict(self.connections[max(self.connections)].subscriptions)

    # The timeout parameter is part of the API other tests use (a one-line poll-with-deadline).
    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Poll ``predicate`` until it holds; raise ``TimeoutError`` after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            if loop.time() >= deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.005)

    # -- fault injection ---------------------------------------------------------------------

    async def drop(self) -> None:
        """Abort every TCP connection without a close frame: clients see 1006."""
        dropped = list(self.connections)
        for state in list(self.connections.values()):
            state.websocket.transport.abort()
        if dropped:
            log.info("fault: dropped connections", count=len(dropped))
        await self.wait_for(lambda: not any(cid in self.connections for cid in dropped), 5.0)

    def stall(self, on: bool = True) -> None:
        """Go silent: no ticks, heartbeats or pongs, client input left unread until resumed.

        Applies to open connections and to those opened while stalled. Reading is paused so
        that client pings go unanswered too, like a black-holed network path.
        """
        if on == self._stalled:
            return
        self._stalled = on
        for state in self.connections.values():
            transport = state.websocket.transport
            if on:
                transport.pause_reading()
            elif not transport.is_closing():
                transport.resume_reading()
            state.flush = True
            state.wake.set()
        log.info("fault: stall", on=on)

    def reject_next(self, count: int = 1, status: int = 403) -> None:
        """Answer the next ``count`` handshakes with ``status`` whatever their credentials."""
        _http_status(status)
        self._rejections.extend([status] * count)

    def expire_token(self, token: str) -> None:
        """Reject this access token or enctoken with 403 from now on; open sessions stay open."""
        self._expired.add(token)
        log.info("fault: token expired")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close every connection with a close frame carrying ``code`` and ``reason``."""
        check_close_code(code)
        states = list(self.connections.values())
        if states:
            log.info("fault: closed connections", count=len(states), code=code)
        await asyncio.gather(
            *(state.websocket.close(code, reason) for state in states), return_exceptions=True
        )

    async def send_order(self, data: dict[str, Any] | None = None) -> None:
        """Send ``{"type": "order", "data": ...}`` (default: a fresh realistic postback)."""
        await self.send_text(_dumps({"type": "order", "data": data or sample_order()}))

    async def send_text(self, text: str) -> None:
        """Send a raw text frame to every open connection."""
        await self._broadcast(text)

    async def send_binary(self, data: bytes) -> None:
        """Send a raw binary frame to every open connection (fuzzing, crafted frames)."""
        await self._broadcast(data)

    def set_tick_interval(self, seconds: float) -> None:
        """Change the pause between tick frames (and the walk's step period) at once."""
        if seconds <= 0:
            raise ValueError("tick interval must be positive")
        self.tick_interval = seconds
        now = asyncio.get_running_loop().time()
        for state in self.connections.values():
            state.next_frame_at = min(state.next_frame_at, now + seconds)
            state.wake.set()

    async def _broadcast(self, message: str | bytes) -> None:
        if self._stalled:  # a stall is total silence: the frame is lost, not queued
            log.debug("stalled: broadcast dropped")
            return
        states = list(self.connections.values())
        await asyncio.gather(
            *(state.websocket.send(message) for state in states), return_exceptions=True
        )

    # -- handshake ---------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        params = {
            name: values[0] for name, values in parse_qs(url.query, keep_blank_values=True).items()
        }
        status, reason = self._authorise(url.path, params, url.query)
        connection_id = None
        if status == http.HTTPStatus.SWITCHING_PROTOCOLS:
            self._next_id += 1
            connection_id = self._next_id
            self._pending[connection] = (connection_id, params)
        record = HandshakeRecord(
            status=status,
            path=url.path,
            params=params,
            headers=dict(request.headers.raw_items()),
            connection_id=connection_id,
            reason=reason,
            at=time.time(),
        )
        _append_bounded(self.handshakes, record, self.history_limit)
        if connection_id is not None:
            return None
        log.info("handshake rejected", status=status, reason=reason)
        return connection.respond(status, f"{reason}\n")

    def _authorise(self, path: str, params: dict[str, str], query: str) -> tuple[int, str]:
        """(status, reason) for one upgrade request (``query`` still encoded); 101 = accept."""
        if self._rejections:
            status = self._rejections.pop(0)
            return status, f"{_http_status(status).phrase} (injected)"
        if path not in ("", "/"):
            return 404, "Not Found"
        forbidden = 403, "Forbidden: invalid or expired credentials"
        api_key = params.get("api_key", "")
        if api_key == KITE_WEB_API_KEY:
            user_id, enctoken = params.get("user_id", ""), params.get("enctoken", "")
            if not user_id or not enctoken:
                return 400, "Bad Request: Kite Web needs user_id and enctoken"
            # Checked on the raw query: parse_qs has already turned a raw "+" into a space.
            if not _RAW_ENCTOKEN_CHARS.isdisjoint(_raw_param(query, "enctoken") or ""):
                return 400, "Bad Request: the enctoken must be percent-encoded"
            if enctoken in self._expired:
                return forbidden
            if self.enctokens is not None and self.enctokens.get(user_id) != enctoken:
                return forbidden
            return 101, "Switching Protocols"
        token = params.get("access_token", "")
        if not api_key or (self.api_keys is not None and api_key not in self.api_keys):
            return forbidden
        if not token or token in self._expired:
            return forbidden
        if self.access_tokens is not None and token not in self.access_tokens:
            return forbidden
        return 101, "Switching Protocols"

    # -- connection --------------------------------------------------------------------------

    async def _handle(self, websocket: ServerConnection) -> None:
        connection_id, params = self._pending.pop(websocket)
        state = ConnectionState(connection_id, params, websocket)
        self.connections[connection_id] = state
        if self._stalled:
            websocket.transport.pause_reading()
        log.info("connection opened", connection=connection_id)
        sender = asyncio.create_task(self._send_loop(state))
        sender.add_done_callback(lambda task: _sender_done(task, websocket))
        try:
            async for message in websocket:
                await self._on_message(state, message)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            # A failed sender was logged by its callback; the connection is going away anyway.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            del self.connections[connection_id]
            self._unwatch(state.subscriptions)
            log.info(
                "connection closed",
                connection=connection_id,
                code=None if websocket.close_code is None else int(websocket.close_code),
                frames=state.frames_sent,
            )

    async def _on_message(self, state: ConnectionState, message: str | bytes) -> None:
        try:
            if isinstance(message, bytes):
                raise _BadMessage("binary messages are not accepted; send JSON text")
            try:
                request = json.loads(message)
            except (ValueError, RecursionError):  # RecursionError: nested deeper than json goes
                raise _BadMessage(f"invalid JSON: {message[:_MAX_ERROR_ECHO]!r}") from None
            if isinstance(request, dict):
                _append_bounded(self.received, (state.id, request), self.history_limit)
            errors = self._apply(state, request)
        except _BadMessage as exc:
            errors = [str(exc)]
        if self._stalled:  # a message read just before the stall began gets no answer
            return
        for error in errors:
            await state.websocket.send(_dumps({"type": "error", "data": error}))

    def _apply(self, state: ConnectionState, request: object) -> list[str]:
        """Apply one client request; returns error texts for the client."""
        if not isinstance(request, dict) or "a" not in request or "v" not in request:
            raise _BadMessage('expected a JSON object {"a": action, "v": value}')
        action, value = request["a"], request["v"]
        if action == "subscribe":
            tokens = _tokens(value)
            refused = [token for token in tokens if not self._subscribe(state, token, "quote")]
        elif action == "unsubscribe":
            dropped = []
            for token in _tokens(value):
                if state.subscriptions.pop(token, None) is not None:
                    dropped.append(token)
                state.counts.pop(token, None)
            self._unwatch(dropped)
            refused = []
        elif action == "mode":
            if not isinstance(value, list) or len(value) != 2 or not _is_mode(value[0]):
                raise _BadMessage('mode expects ["ltp"|"quote"|"full", [tokens]]')
            mode: Mode = value[0]
            tokens = _tokens(value[1])
            refused = []
            for token in tokens:
                if token in state.subscriptions:
                    state.subscriptions[token] = mode
                elif not self._subscribe(state, token, mode):
                    refused.append(token)
        else:
            raise _BadMessage(f"unknown action {str(action)[:_MAX_ERROR_ECHO]!r}")
        state.layout = None
        state.flush = True
        state.wake.set()
        if not refused:
            return []
        return [
            f"max tokens exceeded: {self.max_tokens} instruments per connection;"
            f" {len(refused)} not subscribed"
        ]

    def _subscribe(self, state: ConnectionState, token: int, mode: Mode) -> bool:
        if state.subscribed_count >= self.max_tokens:
            return False
        state.counts[token] += 1
        if token not in state.subscriptions:
            self._watchers[token] += 1
            self._idle.pop(token, None)
        state.subscriptions[token] = mode
        return True

    def _unwatch(self, tokens: Iterable[int]) -> None:
        """These tokens lost a subscriber; forget the oldest idle ones beyond the limit."""
        for token in tokens:
            self._watchers[token] -= 1
            if self._watchers[token] > 0:
                continue
            del self._watchers[token]
            if token in self.market:
                self._idle[token] = None
        while len(self._idle) > self.idle_token_limit:
            token = next(iter(self._idle))
            del self._idle[token]
            self.market.forget(token)
            self._stepped_at.pop(token, None)
            for mode in _MODES:
                self._entries.pop((token, mode), None)

    # -- sending -----------------------------------------------------------------------------

    async def _send_loop(self, state: ConnectionState) -> None:
        """Tick frames while subscribed, heartbeats when idle, nothing while stalled."""
        loop = asyncio.get_running_loop()
        websocket = state.websocket
        last_sent = loop.time()
        state.next_frame_at = last_sent
        while True:
            state.wake.clear()
            if self._stalled:
                await state.wake.wait()
                last_sent = loop.time()
                continue
            now = loop.time()
            if state.subscriptions and (state.flush or now >= state.next_frame_at):
                flushed, state.flush = state.flush, False
                if not self._tickable(state):
                    # Only instruments that never tick: the connection is idle, so the
                    # heartbeats below go on as they would with nothing subscribed.
                    state.next_frame_at = now + self.tick_interval
                elif self.firehose:
                    await self._send_firehose_frame(state)
                    fps = self.frames_per_second
                    pause = 1 / fps if fps else 0.0
                    # Drift-free schedule, restarted after a subscription change or a lag
                    # rather than catching up in a burst.
                    scheduled = state.next_frame_at + pause
                    restart = flushed or scheduled < now
                    state.next_frame_at = now + pause if restart else scheduled
                    # send() does not yield while the write buffer has room: let others run.
                    await asyncio.sleep(0)
                else:
                    await self._send_tick_frames(state)
                    state.next_frame_at = now + self.tick_interval
                if self._tickable(state):
                    last_sent = loop.time()
                    continue
            if now - last_sent >= self.heartbeat_interval:
                await websocket.send(HEARTBEAT)
                state.heartbeats_sent += 1
                last_sent = now
                continue
            deadline = last_sent + self.heartbeat_interval
            if state.subscriptions:
                deadline = min(deadline, state.next_frame_at)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.wake.wait(), deadline - now)

    def _tickable(self, state: ConnectionState) -> bool:
        unlisted = self.unlisted
        return not unlisted or any(token not in unlisted for token in state.subscriptions)

    def _listed(self, state: ConnectionState) -> list[tuple[int, Mode]]:
        unlisted = self.unlisted
        return [item for item in state.subscriptions.items() if item[0] not in unlisted]

    async def _send_tick_frames(self, state: ConnectionState) -> None:
        items = self._listed(state)
        size = self.packets_per_frame
        for start in range(0, len(items), size):
            if state.flush:  # subscriptions changed (or a stall began): the loop starts over
                return
            chunk = items[start : start + size]
            await self._send_frame(state, self._next_frame_no(), self._frame(chunk), chunk)

    async def _send_firehose_frame(self, state: ConnectionState) -> None:
        """Send the next window of the subscription list, stamped with its frame number."""
        if state.layout is None:
            state.layout = self._listed(state)
            state.cursor = 0
        layout = state.layout
        size = min(self.packets_per_frame, len(layout))
        start = state.cursor % len(layout)
        chunk = layout[start : start + size]
        if len(chunk) < size:
            chunk += layout[: size - len(chunk)]
        state.cursor = start + size
        frame_no = self._next_frame_no()
        frame = self._frame(chunk)
        stamp = frame_no % _SEQUENCE_MODULUS
        offset = 2
        for _ in chunk:
            (length,) = _U16.unpack_from(frame, offset)
            if length in (QUOTE_LENGTH, FULL_LENGTH):  # ltp and index packets have no volume
                _U32.pack_into(frame, offset + _VOLUME_OFFSET, stamp)
            offset += 2 + length
        await self._send_frame(state, frame_no, frame, chunk)

    def _next_frame_no(self) -> int:
        self._frame_no += 1
        return self._frame_no

    async def _send_frame(
        self,
        state: ConnectionState,
        frame_no: int,
        frame: bytearray,
        chunk: list[tuple[int, Mode]],
    ) -> None:
        sent_ns = time.monotonic_ns()
        await state.websocket.send(frame)  # raises ConnectionClosed once the close is known
        if state.websocket.transport.is_closing():
            return  # aborted (a drop fault) before this write: it vanished, it was not "sent"
        state.frames_sent += 1
        state.ticks_sent += len(chunk)
        if self.on_frame_sent is not None:
            self.on_frame_sent(frame_no, sent_ns, tuple(token for token, _ in chunk))

    def _frame(self, chunk: list[tuple[int, Mode]]) -> bytearray:
        mono, wall = time.monotonic(), time.time()
        entry = self._entry
        parts = [_U16.pack(len(chunk))]
        parts.extend(entry(token, mode, mono, wall) for token, mode in chunk)
        return bytearray(b"".join(parts))

    def _entry(self, token: int, mode: Mode, mono: float, wall: float) -> bytes:
        """Length-prefixed packet for ``token`` in ``mode``, re-encoded only after a walk step."""
        # Steps are paced by wall time, not by frames, so concurrent connections and the
        # firehose all see one coherent walk and encoded packets are reused between steps.
        last = self._stepped_at.get(token)
        if last is None or mono - last >= self.tick_interval * 0.9:
            inst = self.market.step(token, wall)
            self._stepped_at[token] = mono
        else:
            inst = self.market.instrument(token, wall)
        key = (token, mode)
        cached = self._entries.get(key)
        if cached is not None and cached[0] == inst.version:
            return cached[1]
        packet = encode_packet(self.market.tick(token, mode))
        entry = _U16.pack(len(packet)) + packet
        self._entries[key] = (inst.version, entry)
        return entry


def _is_mode(value: object) -> bool:
    return isinstance(value, str) and value in _MODES  # a list or object is not hashable


def _tokens(value: object) -> list[int]:
    if not isinstance(value, list):
        raise _BadMessage("expected a list of instrument tokens")
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= _UINT32_MAX:
            raise _BadMessage(f"invalid instrument token {str(token)[:_MAX_ERROR_ECHO]!r}")
    return value


def check_close_code(code: int) -> int:
    """``code`` if a server may send it in a close frame, else ``ValueError``."""
    if code in EXTERNAL_CLOSE_CODES or 3000 <= code < 5000:
        return code
    raise ValueError(
        f"close code {code} cannot be sent in a close frame (use 1000-1003, 1007-1014 or 3000-4999)"
    )


def _raw_param(query: str, name: str) -> str | None:
    """The first value of ``name`` in ``query`` as sent, before any percent-decoding."""
    for piece in query.split("&"):
        key, _, value = piece.partition("=")
        if unquote_plus(key) == name:
            return value
    return None


def _append_bounded(items: list[_T], item: _T, limit: int) -> None:
    items.append(item)
    if len(items) > limit:
        del items[: len(items) - limit]


def _http_status(status: int) -> http.HTTPStatus:
    try:
        parsed = http.HTTPStatus(status)
    except ValueError:
        raise ValueError(f"not an HTTP status: {status}") from None
    if parsed < 200:
        raise ValueError(f"cannot reject a handshake with status {status}")
    return parsed


def _sender_done(task: asyncio.Task[None], websocket: ServerConnection) -> None:
    if task.cancelled() or isinstance(task.exception(), ConnectionClosed):
        return
    log.error("sender failed", exc_info=task.exception())
    websocket.transport.abort()


def _dumps(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def sample_order() -> dict[str, Any]:
    """A realistic order postback (kite-mocks postback.json shape) stamped with the time now."""
    now = datetime.now(IST).replace(microsecond=0, tzinfo=None)
    stamp = now.strftime("%Y-%m-%d %H:%M:%S")
    order_id = f"{now:%y%m%d}{random.randrange(10**9):09d}"
    return {
        "user_id": "AB1234",
        "unfilled_quantity": 0,
        "app_id": 1234,
        "checksum": "",
        "placed_by": "AB1234",
        "order_id": order_id,
        "exchange_order_id": f"10000000{random.randrange(10**8):08d}",
        "parent_order_id": None,
        "status": "COMPLETE",
        "status_message": None,
        "status_message_raw": None,
        "order_timestamp": (now - timedelta(seconds=1)).strftime("%Y-%m-%d %H:%M:%S"),
        "exchange_update_timestamp": stamp,
        "exchange_timestamp": stamp,
        "variety": "regular",
        "exchange": "NSE",
        "tradingsymbol": "SBIN",
        "instrument_token": 779521,
        "order_type": "MARKET",
        "transaction_type": "BUY",
        "validity": "DAY",
        "product": "CNC",
        "quantity": 1,
        "disclosed_quantity": 0,
        "price": 0,
        "trigger_price": 0,
        "average_price": 470,
        "filled_quantity": 1,
        "pending_quantity": 0,
        "cancelled_quantity": 0,
        "market_protection": 0,
        "meta": {},
        "tag": None,
        "guid": f"{random.randrange(16**12):012x}",
    }
