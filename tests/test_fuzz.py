"""Property tests beyond tests/test_codec_properties.py and the parsers' own "never raises":

* every packet the codec accepts becomes a CONTRACT §3 payload (a decodable tick can always be
  published, so "decoded = published + replaced + dropped" holds with dropped = 0);
* text frames are classified by the documented rule, not merely without raising;
* the text and JSON spellings of a command mean the same thing;
* the publisher loses nothing and reorders nothing, whatever fails and however it conflates;
* a live feed hands on every good tick in order, whatever garbage is interleaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any, cast

import orjson
from helpers import FULL_KEYS, INDEX_FULL_KEYS, INDEX_QUOTE_KEYS, LTP_KEYS, QUOTE_KEYS, ltp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.commands import Command, parse_command
from bridge.kite.codec import FrameError, decode_frame, encode_frame, encode_raw_frame
from bridge.kite.feed import KiteFeed
from bridge.kite.messages import (
    InvalidText,
    KiteError,
    KiteMessage,
    OrderUpdate,
    OtherMessage,
    parse_text_frame,
)
from bridge.kite.records import LtpTick, Tick
from bridge.payload import tick_json
from bridge.publisher import Publisher
from bridge.simulator.server import Simulator

PROFILE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=150)

KEYS_BY_LENGTH = {
    8: set(LTP_KEYS),
    28: set(INDEX_QUOTE_KEYS),
    32: set(INDEX_FULL_KEYS),
    44: set(QUOTE_KEYS),
    184: set(FULL_KEYS),
}

#: Packets of every accepted length with arbitrary content: random prices, timestamps, depth.
RANDOM_PACKETS = st.sampled_from(sorted(KEYS_BY_LENGTH)).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)
)


@PROFILE
@given(st.lists(RANDOM_PACKETS, min_size=1, max_size=6))
def test_every_decodable_packet_is_publishable(packets: list[bytes]) -> None:
    ticks = decode_frame(encode_raw_frame(packets))
    assert len(ticks) == len(packets)
    for packet, tick in zip(packets, ticks, strict=True):
        payload = orjson.loads(tick_json(tick))
        assert set(payload) == KEYS_BY_LENGTH[len(packet)]
        assert payload["instrument_token"] == struct.unpack_from(">I", packet)[0]
        assert isinstance(payload["last_price"], int | float)
        if "depth" in payload:
            assert [len(payload["depth"][side]) for side in ("buy", "sell")] == [5, 5]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
ENVELOPES = st.fixed_dictionaries(
    {"type": st.sampled_from(["order", "error", "message", "ORDER", "tick"]) | JSON},
    optional={"data": JSON, "extra": JSON},
)


def expected_kind(envelope: dict[str, Any]) -> type:
    """kite-protocol.md §5, written out independently of bridge.kite.messages."""
    kind, data = envelope.get("type"), envelope.get("data")
    if "data" in envelope and kind == "order" and isinstance(data, dict) and data:
        return OrderUpdate
    if "data" in envelope and kind == "error" and isinstance(data, str):
        return KiteError
    if "data" in envelope and kind == "message" and isinstance(data, str):
        return KiteMessage
    if "data" in envelope and isinstance(kind, str) and kind not in ("", "order"):
        # An undocumented type, or error/message data that is not a string: passed on as sent,
        # as Aio-Trader v0.2.0 does.
        return OtherMessage
    return InvalidText


@PROFILE
@given(ENVELOPES, st.booleans())
def test_text_frames_follow_the_documented_rule(envelope: dict[str, Any], as_bytes: bool) -> None:
    raw = orjson.dumps(envelope)
    parsed = parse_text_frame(raw if as_bytes else raw.decode())
    assert type(parsed) is expected_kind(envelope)
    if isinstance(parsed, OrderUpdate):
        assert parsed.data == envelope["data"]
    elif isinstance(parsed, KiteError | KiteMessage):
        assert parsed.message == envelope["data"]
    elif isinstance(parsed, OtherMessage):
        assert (parsed.type, parsed.data) == (envelope["type"], envelope["data"])


TOKEN_LISTS = st.lists(st.integers(1, 2**32 - 1), min_size=1, max_size=8)
MODES = st.sampled_from(["ltp", "quote", "full"])


@st.composite
def commands(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """One command as an operator would type it and as JSON."""
    action = draw(st.sampled_from(["subscribe", "mode", "unsubscribe", "unsubscribe all", "list"]))
    tokens = draw(TOKEN_LISTS)
    mode = draw(MODES)
    words = " ".join(map(str, tokens))
    if action == "subscribe":
        return f"subscribe {mode} {words}", {"action": "subscribe", "mode": mode, "tokens": tokens}
    if action == "mode":
        return f"mode {mode} {words}", {"action": "mode", "mode": mode, "tokens": tokens}
    if action == "unsubscribe":
        return f"unsubscribe {words}", {"action": "unsubscribe", "tokens": tokens}
    if action == "unsubscribe all":
        return "unsubscribe all", {"action": "unsubscribe", "all": True}
    return "list", {"action": "list"}


@PROFILE
@given(commands(), st.sampled_from(["", " ", "\n"]), st.booleans())
def test_text_and_json_commands_agree(
    command: tuple[str, dict[str, Any]], padding: str, shout: bool
) -> None:
    text, body = command
    typed = padding + (text.upper() if shout else text) + padding
    from_text = parse_command(typed)
    from_json = parse_command(orjson.dumps(body))
    assert from_text == from_json
    if "tokens" in body:  # duplicates collapse, order of first appearance is kept
        assert from_text.tokens == tuple(dict.fromkeys(body["tokens"]))
    assert isinstance(from_text, Command)


# -- publisher: nothing lost, nothing reordered ------------------------------------------------

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.lists(st.integers(1, 6), min_size=1, max_size=12)),
        st.tuples(st.just("send"), st.booleans()),  # True: this round trip fails
    ),
    max_size=40,
)


async def _drive(steps: list[tuple[str, Any]], max_pending: int, batch_max: int) -> None:
    failures: list[bool] = []
    received: list[tuple[int, int]] = []

    async def transport(flat: list[bytes], /) -> int:
        if failures and failures.pop(0):
            raise RedisConnectionError("injected")
        for channel, message in zip(flat[::2], flat[1::2], strict=True):
            token = int(channel.rsplit(b":", 1)[1])
            received.append((token, int(orjson.loads(message)["last_price"])))
        return 0

    publisher = Publisher(
        cast(Redis, None),  # only the built-in transports use the client
        "ns",
        max_pending=max_pending,
        batch_max=batch_max,
        transport=transport,
        base_wait=1e-6,
        max_wait=1e-5,
    )
    submitted: list[Tick] = []
    for step, arg in steps:
        if step == "submit":
            ticks = [ltp(token, float(len(submitted) + i)) for i, token in enumerate(arg)]
            submitted.extend(ticks)
            publisher.submit(ticks)
        else:
            failures.append(arg)
            await publisher.send_once()
    while publisher.pending:
        await publisher.send_once()

    stats = publisher.stats
    assert stats.published == len(received)
    assert stats.published + stats.replaced + stats.serialize_errors == len(submitted)
    for token in {tick.instrument_token for tick in submitted}:
        sequence = [price for t, price in received if t == token]
        assert sequence == sorted(set(sequence)), "reordered or duplicated"
        latest = max(int(t.last_price) for t in submitted if t.instrument_token == token)
        assert sequence[-1] == latest, "the newest tick of a token must always get through"


@settings(deadline=None, max_examples=200)
@given(STEPS, st.integers(1, 8), st.integers(1, 5))
def test_publisher_accounts_for_every_tick(
    steps: list[tuple[str, Any]], max_pending: int, batch_max: int
) -> None:
    asyncio.run(_drive(steps, max_pending, batch_max))


# -- a live feed: every good tick, in order, between garbage ------------------------------------

GARBAGE_BINARY = st.binary(min_size=2, max_size=300).filter(lambda data: _raises_frame_error(data))
GARBAGE_TEXT = st.text(max_size=50).filter(
    lambda text: isinstance(parse_text_frame(text), InvalidText)
)
FRAMES = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(1, 2**32 - 1)),
        st.tuples(st.just("binary"), GARBAGE_BINARY),
        st.tuples(st.just("text"), GARBAGE_TEXT),
    ),
    min_size=1,
    max_size=25,
)


def _raises_frame_error(data: bytes) -> bool:
    try:
        decode_frame(data)
    except FrameError:
        return True
    return False


async def _stream(frames: list[tuple[str, Any]]) -> None:
    got: list[Tick] = []
    errors: list[object] = []
    expected: list[Tick] = []
    async with Simulator(heartbeat_interval=0.05) as sim:
        feed = KiteFeed(
            api_key="k",
            access_token="t",
            url=sim.url,
            on_tick=lambda _feed, ticks: got.extend(ticks),
            on_error=lambda _feed, error: errors.append(error),
        )
        task = asyncio.create_task(feed.connect())
        try:
            await sim.wait_for(lambda: feed.connected, 5)
            for kind, value in frames:
                if kind == "tick":
                    tick = LtpTick(True, "ltp", value, float(len(expected)))
                    expected.append(tick)
                    await sim.send_binary(encode_frame([tick]))
                elif kind == "binary":
                    await sim.send_binary(value)
                else:
                    await sim.send_text(value)
            garbage = len(frames) - len(expected)
            await sim.wait_for(lambda: len(got) == len(expected) and len(errors) == garbage, 5)
            assert [(t.instrument_token, t.last_price) for t in got] == [
                (t.instrument_token, t.last_price) for t in expected
            ]
            assert feed.stats.malformed_frames == garbage
            assert feed.stats.connections == 1
            assert feed.connected
        finally:
            await feed.close()
            with contextlib.suppress(Exception):
                await task


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.filter_too_much])
@given(FRAMES)
def test_feed_delivers_good_ticks_in_order_between_garbage(frames: list[tuple[str, Any]]) -> None:
    asyncio.run(_stream(frames))
