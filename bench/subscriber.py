"""Counting subscriber for the end-to-end benchmark: ``PSUBSCRIBE <ns>:ticks:*`` on a raw socket.

Why not redis-py: its pub/sub ``get_message`` loop costs 10-20 us per message, which would make
the subscriber, not the bridge, the bottleneck at 100k ticks/s. Here the socket is read in
large chunks and ``hiredis.Reader`` parses the pmessage stream in C; per message only a count
and (optionally) the frame stamp are taken in Python. ``--selftest`` measures this loop's own
ceiling on a synthetic stream (docs/performance.md).

What it checks: every ``--sample``-th message is parsed fully and must be a CONTRACT §3 payload
of the instrument named by its channel (failures counted in ``bad``). With ``--stamps PATH``
it reads the frame number the firehose puts in ``volume_traded`` and writes, per frame,
``frame_no first_ns last_ns count`` (CLOCK_MONOTONIC, comparable with the sender's frame log).

Output: JSON lines on stdout: ``ready``, then ``progress`` every ``--report-interval`` seconds
(``t_ns``, ``received``, ``cpu``), then ``stopped`` on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any, Final
from urllib.parse import urlsplit

import hiredis
import orjson

__all__ = ["Counter", "main", "pmessage_stream", "selftest"]

_STAMP_KEY: Final = b'"volume_traded":'
_SLICE: Final = 64 * 1024
_BASE_KEYS: Final = frozenset({"tradable", "mode", "instrument_token", "last_price"})
_QUOTE_KEYS: Final = _BASE_KEYS | {
    "last_traded_quantity",
    "average_traded_price",
    "volume_traded",
    "total_buy_quantity",
    "total_sell_quantity",
    "ohlc",
    "change",
}
_FULL_KEYS: Final = _QUOTE_KEYS | {
    "last_trade_time",
    "oi",
    "oi_day_high",
    "oi_day_low",
    "exchange_timestamp",
    "depth",
}
_INDEX_QUOTE_KEYS: Final = _BASE_KEYS | {"ohlc", "change"}
_VALID_KEYS: Final = (
    _BASE_KEYS,
    _QUOTE_KEYS,
    _FULL_KEYS,
    _INDEX_QUOTE_KEYS,
    _INDEX_QUOTE_KEYS | {"exchange_timestamp"},
)


def _valid(channel: bytes, payload: bytes) -> bool:
    """A CONTRACT §3 payload whose ``instrument_token`` matches the channel's token."""
    try:
        tick = orjson.loads(payload)
        token = int(channel.rsplit(b":", 1)[1])
    except (orjson.JSONDecodeError, ValueError, IndexError):
        return False
    if not isinstance(tick, dict) or tick.get("instrument_token") != token:
        return False
    keys = tick.keys()
    if not any(keys == valid for valid in _VALID_KEYS):
        return False
    depth = tick.get("depth")
    return depth is None or (len(depth["buy"]) == 5 and len(depth["sell"]) == 5)


class Counter:
    """The per-message work: count, sample-check, and optionally record frame stamps."""

    def __init__(self, sample: int = 1000, stamps: bool = False) -> None:
        self.reader = hiredis.Reader()
        self.received = 0
        self.checked = 0
        self.bad = 0
        self.unstamped = 0
        self.sample = sample
        #: frame_no -> [first_ns, last_ns, count]
        self.frames: dict[int, list[int]] | None = {} if stamps else None

    def feed(self, data: bytes | bytearray, now_ns: int, size: int | None = None) -> None:
        """Parse every complete message in ``data[:size]`` (plus what an earlier call left).

        Fed in 64 KiB slices: hiredis compacts its buffer (a memmove of what is left) once
        per message after the first KiB is consumed, so one big feed costs quadratic time.
        """
        end = len(data) if size is None else size
        for start in range(0, end, _SLICE):
            self._feed(data, start, min(_SLICE, end - start), now_ns)

    def _feed(self, data: bytes | bytearray, start: int, length: int, now_ns: int) -> None:
        reader = self.reader
        # hiredis reads any buffer; its stubs only say bytes, and copying a slice would cost.
        reader.feed(data, start, length)  # type: ignore[arg-type]
        gets = reader.gets
        frames = self.frames
        sample = self.sample
        received = self.received
        message = gets()
        while message is not False:
            received += 1
            if received % sample == 0:
                self.checked += 1
                if message[0] != b"pmessage" or not _valid(message[2], message[3]):
                    self.bad += 1
            if frames is not None:
                payload = message[3]
                start = payload.find(_STAMP_KEY)
                if start < 0:
                    self.unstamped += 1
                else:
                    start += len(_STAMP_KEY)
                    frame_no = int(payload[start : payload.index(b",", start)])
                    entry = frames.get(frame_no)
                    if entry is None:
                        frames[frame_no] = [now_ns, now_ns, 1]
                    else:
                        entry[1] = now_ns
                        entry[2] += 1
            message = gets()
        self.received = received


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def _connect(url: str, pattern: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    if parts.password:
        sock.sendall(_resp("AUTH", parts.username or "default", parts.password))
    sock.sendall(_resp("PSUBSCRIBE", pattern))
    reader = hiredis.Reader()
    replies: list[Any] = []
    expected = 2 if parts.password else 1
    while len(replies) < expected:
        reader.feed(sock.recv(4096))
        reply = reader.gets()
        while reply is not False:
            replies.append(reply)
            reply = reader.gets()
    if isinstance(replies[-1], Exception) or replies[-1][0] != b"psubscribe":
        raise SystemExit(f"subscriber: unexpected reply {replies[-1]!r}")
    return sock


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sock = _connect(args.redis_url, args.pattern)
    sock.settimeout(args.report_interval)
    counter = Counter(args.sample, stamps=args.stamps is not None)
    buffer = bytearray(1 << 20)
    _emit("ready", pattern=args.pattern, pid=os.getpid())
    next_report = time.monotonic() + args.report_interval
    while not stopping:
        try:
            size = sock.recv_into(buffer)
        except TimeoutError:
            size = -1
        if size == 0:
            break
        now_ns = time.monotonic_ns()
        if size > 0:
            counter.feed(buffer, now_ns, size)
        if now_ns / 1e9 >= next_report:
            next_report += args.report_interval
            _emit("progress", t_ns=now_ns, received=counter.received, cpu=_cpu())
    sock.close()
    if args.stamps is not None and counter.frames is not None:
        with open(args.stamps, "w") as out:
            for frame_no, (first, last, count) in counter.frames.items():
                out.write(f"{frame_no} {first} {last} {count}\n")
    _emit(
        "stopped",
        t_ns=time.monotonic_ns(),
        received=counter.received,
        checked=counter.checked,
        bad=counter.bad,
        unstamped=counter.unstamped,
        frames=None if counter.frames is None else len(counter.frames),
        cpu=_cpu(),
    )
    return 0


# -- self test: the ceiling of the parse/count loop, no Redis involved ---------------------------


def pmessage_stream(pattern: bytes, channel: bytes, payload: bytes, count: int) -> bytes:
    """``count`` RESP2 pmessage pushes, exactly as Redis writes them to a pattern subscriber."""
    one = b"*4\r\n$8\r\npmessage\r\n" + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in (pattern, channel, payload)
    )
    return one * count


def selftest(messages: int, stamps: bool, repeats: int) -> list[float]:
    """Messages per second of :class:`Counter` over a synthetic stream of full-tick payloads."""
    from bench.decode import make_frames
    from bridge.kite.codec import decode_frame
    from bridge.payload import tick_json

    tick = decode_frame(make_frames(1, 1)[0])[0]
    payload = tick_json(tick)
    channel = b"bench:ticks:%d" % tick.instrument_token
    stream = pmessage_stream(b"bench:ticks:*", channel, payload, messages)
    rates = []
    for _ in range(repeats):
        counter = Counter(1000, stamps)
        began = time.perf_counter()
        for offset in range(0, len(stream), 1 << 20):
            counter.feed(stream[offset : offset + (1 << 20)], time.monotonic_ns())
        elapsed = time.perf_counter() - began
        if counter.received != messages or counter.bad:
            raise SystemExit(f"selftest: {counter.received} parsed, {counter.bad} bad")
        rates.append(messages / elapsed)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.subscriber", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--pattern", default="kite:ticks:*")
    parser.add_argument("--sample", type=int, default=1000, help="check every Nth message")
    parser.add_argument("--stamps", metavar="PATH", help="record frame stamps (latency, loss)")
    parser.add_argument("--report-interval", type=float, default=0.25, metavar="SECONDS")
    parser.add_argument(
        "--selftest",
        type=int,
        metavar="MESSAGES",
        help="measure the parse loop on MESSAGES synthetic full ticks and exit",
    )
    args = parser.parse_args(argv)
    if args.selftest:
        for stamps in (False, True):
            rates = sorted(selftest(args.selftest, stamps, 5))
            label = "count + sample check" + (" + stamps" if stamps else "")
            print(f"subscriber ceiling, {label}: {rates[2]:,.0f} msg/s (median of 5)")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
