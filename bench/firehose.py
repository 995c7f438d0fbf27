"""A minimal Kite ticker server that replays pre-encoded frames, for the end-to-end benchmark.

Why not ``bridge simulate --firehose``: it is fast enough to an idle reader (450k-680k full
ticks/s measured with ``bench.sink``), but its random walk re-encodes every subscribed token each
``--tick-interval``: with 3000 tokens that is ~0.4 of a core whatever the send rate (measured:
0.83 CPU s per 100k ticks at 50k ticks/s, against 0.02 here), taken from the bridge and Redis on
a 2-core machine. This server keeps the protocol the bridge depends on (query-string auth with
HTTP 403, ``subscribe``/``mode``/``unsubscribe`` JSON, 1-byte heartbeats when idle) but builds
its frames once per subscription change, from the simulator's own ``Market`` and
``bridge.kite.codec``, and then only stamps and sends them.

Frame stamping is the simulator's convention (docs/simulator.md): every quote/full packet of
frame number ``n`` carries ``n % 2**31`` in ``volume_traded``, and ``--frame-log`` gets one line
``frame_no monotonic_ns packets`` per frame, timestamped just before the frame is handed to the
socket, so a subscriber can measure latency and loss per frame.

Run: ``.venv/bin/python -m bench.firehose --port 0 --frame-log /tmp/frames.log``; it prints a
JSON ``ready`` line with its URL, and a JSON summary on SIGTERM/SIGINT. SIGUSR1 stops the frames
(heartbeats only) without closing anything, so the harness can let the bridge drain first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import json
import signal
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Final, get_args
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from bridge.kite.codec import FULL_LENGTH, QUOTE_LENGTH, encode_packet
from bridge.kite.records import Mode
from bridge.simulator.market import Market

__all__ = ["Firehose", "FrameSet", "build_frames", "main"]

HEARTBEAT: Final = b"\x00"
SEQUENCE_MODULUS: Final = 2**31
_MODES: Final = frozenset(get_args(Mode))
_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
#: ``volume_traded`` sits at packet bytes [16, 20) of quote and full packets.
_VOLUME_OFFSET: Final = 16


@dataclass
class FrameSet:
    """Ready-to-stamp frames and, per frame, the byte offsets of its ``volume_traded`` fields."""

    frames: list[bytearray]
    stamps: list[list[int]]
    packets: list[int]


def build_frames(
    layout: Sequence[tuple[int, Mode]],
    packets_per_frame: int,
    variants: int,
    market: Market,
    cache: dict[tuple[int, Mode, int], bytes],
) -> FrameSet:
    """Windows of ``layout`` (wrapping, so all frames are full), in ``variants`` price states.

    Frame ``v * windows + w`` is window ``w`` at walk step ``v``: cycling through the list
    moves every instrument through ``variants`` distinct prices, as a live feed would.
    """
    size = min(packets_per_frame, len(layout))
    windows = -(-len(layout) // size)
    entries: dict[tuple[int, Mode, int], bytes] = {}
    for variant in range(variants):
        now = time.time() + variant
        for token, mode in layout:
            key = (token, mode, variant)
            packet = cache.get(key)
            if packet is None:
                market.step(token, now)
                packet = cache[key] = encode_packet(market.tick(token, mode, now))
            entries[key] = _U16.pack(len(packet)) + packet
    frames: list[bytearray] = []
    stamps: list[list[int]] = []
    packets: list[int] = []
    for variant in range(variants):
        for window in range(windows):
            start = window * size
            chunk = [layout[(start + i) % len(layout)] for i in range(size)]
            frame = bytearray(_U16.pack(len(chunk)))
            offsets: list[int] = []
            for token, mode in chunk:
                entry = entries[(token, mode, variant)]
                if len(entry) - 2 in (QUOTE_LENGTH, FULL_LENGTH):
                    offsets.append(len(frame) + 2 + _VOLUME_OFFSET)
                frame += entry
            frames.append(frame)
            stamps.append(offsets)
            packets.append(len(chunk))
    return FrameSet(frames, stamps, packets)


@dataclass(eq=False)
class _Connection:
    websocket: ServerConnection
    subscriptions: dict[int, Mode] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Firehose:
    """Serves frames back to back (or at ``frames_per_second``) to every subscribed client."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        packets_per_frame: int = 500,
        frames_per_second: float | None = None,
        variants: int = 8,
        access_token: str | None = None,
        frame_log: IO[str] | None = None,
        heartbeat_interval: float = 1.0,
    ) -> None:
        if not 1 <= packets_per_frame <= 0xFFFF or variants < 1:
            raise ValueError("packets_per_frame must be in [1, 65535] and variants positive")
        self.host = host
        self.port = port
        self.packets_per_frame = packets_per_frame
        self.frames_per_second = frames_per_second
        self.variants = variants
        self.access_token = access_token
        self.frame_log = frame_log
        self.heartbeat_interval = heartbeat_interval
        self.frames_sent = 0
        self.ticks_sent = 0
        self.connections = 0
        self._market = Market(seed=7)
        self._cache: dict[tuple[int, Mode, int], bytes] = {}
        self._frame_no = 0
        self._server: Server | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            compression=None,
            ping_interval=None,
            close_timeout=2,
            max_size=2**22,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def pause(self) -> None:
        """Stop sending frames but keep connections open, so clients can drain what was sent.

        Closing instead would reset connections whose client is behind, and the kernel then
        discards data the client had not read yet: "lost" ticks the bridge never saw.
        """
        self._paused = True
        if self.frame_log is not None:
            self.frame_log.flush()

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def _process_request(self, _connection: ServerConnection, request: Request) -> Response | None:
        params = {k: v[0] for k, v in parse_qs(urlsplit(request.path).query).items()}
        token = params.get("access_token", "")
        if not params.get("api_key") or not token:
            return _connection.respond(http.HTTPStatus.FORBIDDEN, "missing credentials\n")
        if self.access_token is not None and token != self.access_token:
            return _connection.respond(http.HTTPStatus.FORBIDDEN, "invalid access token\n")
        return None

    async def _handle(self, websocket: ServerConnection) -> None:
        self.connections += 1
        conn = _Connection(websocket)
        sender = asyncio.create_task(self._send_loop(conn))
        try:
            async for message in websocket:
                if isinstance(message, str):
                    self._apply(conn, message)
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender

    def _apply(self, conn: _Connection, message: str) -> None:
        """Kite semantics (kite-protocol §2): default quote; ``mode`` subscribes if needed."""
        try:
            request = json.loads(message)
            action, value = request["a"], request["v"]
            if action == "subscribe":
                for token in value:
                    conn.subscriptions[int(token)] = "quote"
            elif action == "unsubscribe":
                for token in value:
                    conn.subscriptions.pop(int(token), None)
            elif action == "mode" and value[0] in _MODES:
                for token in value[1]:
                    conn.subscriptions[int(token)] = value[0]
            else:
                return
        except (ValueError, KeyError, TypeError, IndexError):
            return
        conn.changed.set()

    async def _send_loop(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        websocket = conn.websocket
        frames: FrameSet | None = None
        index = 0
        next_at = loop.time()
        pause = 1 / self.frames_per_second if self.frames_per_second else 0.0
        while True:
            if conn.changed.is_set():
                await asyncio.sleep(0.05)  # coalesce subscribe + mode bursts
                conn.changed.clear()
                layout = list(conn.subscriptions.items())
                frames = (
                    build_frames(
                        layout, self.packets_per_frame, self.variants, self._market, self._cache
                    )
                    if layout
                    else None
                )
                index = 0
                next_at = loop.time()
            if frames is None or self._paused:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.heartbeat_interval):
                        await conn.changed.wait()
                if not conn.changed.is_set():
                    await websocket.send(HEARTBEAT)
                continue
            slot = index % len(frames.frames)
            index += 1
            frame = frames.frames[slot]
            self._frame_no += 1
            stamp = self._frame_no % SEQUENCE_MODULUS
            pack_into = _U32.pack_into
            for offset in frames.stamps[slot]:
                pack_into(frame, offset, stamp)
            data = bytes(frame)  # the template is re-stamped while this one may still be queued
            sent_ns = time.monotonic_ns()
            try:
                await websocket.send(data)
            except asyncio.CancelledError:  # only drain() can be cancelled: the frame is out
                self._record(sent_ns, frames.packets[slot])
                raise
            self._record(sent_ns, frames.packets[slot])
            if pause:
                next_at += pause
                delay = next_at - loop.time()
                if delay < -pause:  # never burst to catch up after a stall
                    next_at = loop.time()
                await asyncio.sleep(max(delay, 0.0))
            else:
                await asyncio.sleep(0)  # send() does not yield while the buffer has room

    def _record(self, sent_ns: int, count: int) -> None:
        self.frames_sent += 1
        self.ticks_sent += count
        if self.frame_log is not None:
            self.frame_log.write(f"{self._frame_no} {sent_ns} {count}\n")


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.firehose", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port (default)")
    parser.add_argument("--packets-per-frame", type=int, default=500, metavar="N")
    parser.add_argument(
        "--frames-per-second", type=_positive, metavar="RATE", help="pace (default: unpaced)"
    )
    parser.add_argument(
        "--variants", type=int, default=8, help="price states per instrument (default 8)"
    )
    parser.add_argument("--access-token", help="the only accepted token (default: any)")
    parser.add_argument(
        "--frame-log", metavar="PATH", help="'frame_no monotonic_ns packets' per frame"
    )
    return parser


async def _serve(args: argparse.Namespace, log: IO[str] | None) -> int:
    firehose = Firehose(
        host=args.host,
        port=args.port,
        packets_per_frame=args.packets_per_frame,
        frames_per_second=args.frames_per_second,
        variants=args.variants,
        access_token=args.access_token,
        frame_log=log,
    )
    await firehose.start()
    print(json.dumps({"event": "ready", "url": firehose.url}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, firehose.pause)
    await stop.wait()
    await firehose.stop()
    summary = {
        "event": "stopped",
        "frames": firehose.frames_sent,
        "ticks": firehose.ticks_sent,
        "connections": firehose.connections,
    }
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.frame_log is None:
        return asyncio.run(_serve(args, None))
    with open(args.frame_log, "w") as log:
        return asyncio.run(_serve(args, log))


if __name__ == "__main__":
    sys.exit(main())
