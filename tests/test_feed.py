"""KiteFeed against the real simulator over loopback (plus two tiny servers for storm cases)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import structlog
from helpers import BlockingSocket, free_port
from structlog.testing import LogCapture
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import InvalidStatus

from bridge.kite import (
    AuthError,
    FeedError,
    FrameError,
    InvalidText,
    KiteError,
    KiteFeed,
    KiteMessage,
    Mode,
    OtherMessage,
    RetriesExhausted,
    Tick,
    decode_frame,
    frame_payloads,
)
from bridge.kite import feed as feed_module
from bridge.kite.codec import encode_frame
from bridge.kite.inbox import Event, Inbox
from bridge.kite.records import FullTick, IndexFullTick, LtpTick, QuoteTick
from bridge.simulator.server import Simulator

KEY = "my-api-key"
TOKEN = "s3cr3t-access-t0ken"
INFY, RELIANCE, SBIN, NIFTY = 408065, 738561, 779521, 256265

# --------------------------------------------------------------------------------------------
# Helpers


class Recorder:
    """Every handler call, in order."""

    def __init__(self) -> None:
        self.ticks: list[Tick] = []
        self.frames: list[bytes | str] = []
        self.orders: list[dict[str, Any]] = []
        self.errors: list[FeedError] = []
        self.messages: list[KiteMessage | OtherMessage] = []
        self.events: list[tuple[Any, ...]] = []

    def handlers(self) -> dict[str, Any]:
        return {
            "on_tick": self.on_tick,
            "on_order_update": lambda feed, data: self.orders.append(data),
            "on_error": lambda feed, error: self.errors.append(error),
            "on_message": lambda feed, message: self.messages.append(message),
            "on_connect": lambda feed: self.events.append(("connect",)),
            "on_disconnect": lambda feed, *args: self.events.append(("disconnect", *args)),
            "on_reconnect": lambda feed, *args: self.events.append(("reconnect", *args)),
        }

    def on_tick(self, feed: KiteFeed, data: list[Tick] | bytes | str) -> None:
        if isinstance(data, bytes | str):
            self.frames.append(data)
        else:
            self.ticks.extend(data)

    def count(self, name: str) -> int:
        return sum(1 for event in self.events if event[0] == name)

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [event[1:] for event in self.events if event[0] == name]


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator(
        access_tokens={TOKEN}, api_keys={KEY}, tick_interval=0.02, heartbeat_interval=0.1, seed=7
    ) as simulator:
        yield simulator


def make_feed(url: str, recorder: Recorder | None = None, **options: Any) -> KiteFeed:
    settings: dict[str, Any] = {
        "base_wait": 0.01,
        "max_wait": 0.05,
        "liveness_timeout": 2.0,
        "connect_timeout": 2.0,
    }
    settings.update(options)
    if recorder is not None:
        settings.update(recorder.handlers())
    return KiteFeed(KEY, access_token=TOKEN, url=url, **settings)


@contextlib.asynccontextmanager
async def running(feed: KiteFeed, **kwargs: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(feed.connect(**kwargs))
    try:
        yield task
    finally:
        await asyncio.wait_for(feed.close(), 5)
        await asyncio.wait_for(task, 5)


def sent(sim: Simulator, connection: int | None = None) -> list[dict[str, Any]]:
    return [msg for cid, msg in sim.received if connection is None or cid == connection]


def modes_seen(ticks: list[Tick]) -> dict[int, set[str]]:
    seen: dict[int, set[str]] = {}
    for tick in ticks:
        seen.setdefault(tick.instrument_token, set()).add(tick.mode)
    return seen


# --------------------------------------------------------------------------------------------
# Construction: credentials, URLs, secrets


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "access_token or enctoken"),
        ({"enctoken": "e"}, "user_id"),
        ({"access_token": "t"}, "api_key"),
        ({"access_token": "t", "api_key": None}, "api_key must be a non-empty string, not None"),
        ({"access_token": "t", "api_key": ""}, "api_key must be a non-empty string"),
    ],
)
def test_credential_rules(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KiteFeed(**kwargs)


def test_kite_connect_url() -> None:
    feed = KiteFeed("K", access_token="T")
    assert feed._url() == "wss://ws.kite.trade?api_key=K&access_token=T"
    assert feed._options({})["additional_headers"] == {"X-Kite-Version": "3"}
    merged = feed._options({"additional_headers": {"User-Agent": "me"}})["additional_headers"]
    assert (merged["X-Kite-Version"], merged["User-Agent"]) == ("3", "me")


def test_kite_web_url_percent_encodes_the_enctoken() -> None:
    feed = KiteFeed(user_id="AB1234", enctoken="ab+c/d==")
    assert feed._url() == (
        "wss://ws.zerodha.com/?api_key=kitefront&user_id=AB1234&enctoken=ab%2Bc/d%3D%3D"
        "&agent=kite3-web&version=3.0.0"
    )
    assert "X-Kite-Version" not in feed._options({})["additional_headers"]


def test_url_override_replaces_only_the_base() -> None:
    web = KiteFeed(user_id="AB1234", enctoken="e", url="ws://127.0.0.1:8765")
    assert web._url().startswith("ws://127.0.0.1:8765?api_key=kitefront&user_id=AB1234&enctoken=e")
    both = KiteFeed("K", user_id="U", enctoken="e", access_token="T", url="ws://h:1/")
    assert both._url() == "ws://h:1/?api_key=K&access_token=T"  # the access token wins


@pytest.mark.parametrize("url", ["ws://h:1/?x=1", "http://h:1", "ws://h:1/#frag", "nonsense"])
def test_bad_url_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        KiteFeed("K", access_token=TOKEN, url=url)


def test_secrets_stay_out_of_repr_and_redacted_url() -> None:
    for feed in (
        KiteFeed(KEY, access_token=TOKEN),
        KiteFeed(user_id="AB1234", enctoken=TOKEN + "+/="),
    ):
        assert TOKEN not in repr(feed)
        assert TOKEN not in feed.redacted_url
        assert TOKEN not in repr(vars(feed))
        assert "=***" in feed.redacted_url
        assert TOKEN in feed._url()  # the real one does carry it


@pytest.mark.parametrize(
    ("symbols", "mode", "error"),
    [
        ([INFY], "FULL", ValueError),
        ([INFY], "depth", ValueError),
        (["408065"], "quote", TypeError),
        ([True], "quote", TypeError),
        ([0], "quote", ValueError),
        ([2**32], "quote", ValueError),
        ("408065", "quote", TypeError),
    ],
)
async def test_subscribe_validation(symbols: Any, mode: Any, error: type[Exception]) -> None:
    feed = KiteFeed(KEY, access_token=TOKEN)
    with pytest.raises(error):
        await feed.subscribe_symbols(symbols, mode)
    assert dict(feed.subscriptions) == {}


async def test_replay_set_works_offline() -> None:
    feed = KiteFeed(KEY, access_token=TOKEN)
    await feed.subscribe_symbols([INFY, RELIANCE, INFY])
    await feed.subscribe_symbols([RELIANCE], "full")
    await feed.unsubscribe_symbols([INFY, SBIN])
    assert dict(feed.subscriptions) == {RELIANCE: "full"}
    with pytest.raises(ValueError, match="mode"):
        await feed.reconcile({SBIN: "ltp", NIFTY: "bogus"})  # type: ignore[dict-item]
    assert dict(feed.subscriptions) == {RELIANCE: "full"}  # all-or-nothing
    await feed.reconcile({SBIN: "ltp", NIFTY: "full"})
    assert dict(feed.subscriptions) == {SBIN: "ltp", NIFTY: "full"}
    with pytest.raises(TypeError):
        feed.subscriptions[INFY] = "ltp"  # type: ignore[index]


# --------------------------------------------------------------------------------------------
# Data over the simulator


async def test_each_mode_delivers_ticks_of_that_mode(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    async with running(feed):
        await feed.subscribe_symbols([INFY], "ltp")
        await feed.subscribe_symbols([RELIANCE], "quote")
        await feed.subscribe_symbols([SBIN, NIFTY], "full")
        await wait_for(lambda: len(modes_seen(rec.ticks)) == 4)
        by_token = {tick.instrument_token: tick for tick in rec.ticks}
        assert type(by_token[INFY]) is LtpTick
        assert by_token[INFY].mode == "ltp"
        assert type(by_token[RELIANCE]) is QuoteTick
        assert by_token[RELIANCE].mode == "quote"
        assert type(by_token[SBIN]) is FullTick
        assert type(by_token[NIFTY]) is IndexFullTick
        assert all(tick.mode == "full" for tick in (by_token[SBIN], by_token[NIFTY]))
        assert feed.connected
        assert feed.stats.ticks >= 4
        assert feed.stats.connected_since is not None
        assert feed.stats.last_frame_at is not None
        assert abs(feed.stats.last_frame_at - time.time()) < 60


async def test_mode_change_and_unsubscribe(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    async with running(feed):
        await feed.subscribe_symbols([INFY, RELIANCE], "quote")
        await wait_for(lambda: modes_seen(rec.ticks).get(INFY) == {"quote"})
        await feed.subscribe_symbols([INFY], "full")
        await wait_for(
            lambda: any(t.instrument_token == INFY and t.mode == "full" for t in rec.ticks)
        )
        assert sim.subscriptions() == {INFY: "full", RELIANCE: "quote"}

        await feed.unsubscribe_symbols([INFY])
        await sim.wait_for(lambda: INFY not in sim.subscriptions())
        frames = feed.stats.frames
        await wait_for(lambda: feed.stats.frames >= frames + 2)  # flush frames already in flight
        rec.ticks.clear()
        await wait_for(lambda: len(rec.ticks) >= 3)
        assert {tick.instrument_token for tick in rec.ticks} == {RELIANCE}
    assert dict(feed.subscriptions) == {RELIANCE: "quote"}


async def test_subscribe_sends_subscribe_then_mode_in_batches(sim: Simulator) -> None:
    feed = make_feed(sim.url, batch_size=2)
    async with running(feed):
        await wait_for(lambda: feed.connected)
        await feed.subscribe_symbols([1, 2, 3, 4, 5], "ltp")
        await sim.wait_for(lambda: len(sim.received) == 6)
    assert sent(sim) == [
        {"a": "subscribe", "v": [1, 2]},
        {"a": "mode", "v": ["ltp", [1, 2]]},
        {"a": "subscribe", "v": [3, 4]},
        {"a": "mode", "v": ["ltp", [3, 4]]},
        {"a": "subscribe", "v": [5]},
        {"a": "mode", "v": ["ltp", [5]]},
    ]


async def test_subscribing_a_subscribed_token_sends_mode_alone(sim: Simulator) -> None:
    """A repeated ``subscribe`` counts against Kite's 3000 limit; a mode change must not."""
    feed = make_feed(sim.url)
    async with running(feed):
        await wait_for(lambda: feed.connected)
        await feed.subscribe_symbols([1, 2], "quote")
        await sim.wait_for(lambda: len(sim.received) == 2)
        await feed.subscribe_symbols([2, 3], "full")
        await sim.wait_for(lambda: len(sim.received) == 5)
    assert sent(sim) == [
        {"a": "subscribe", "v": [1, 2]},
        {"a": "mode", "v": ["quote", [1, 2]]},
        {"a": "subscribe", "v": [3]},
        {"a": "mode", "v": ["full", [3]]},
        {"a": "mode", "v": ["full", [2]]},
    ]
    assert dict(feed.subscriptions) == {1: "quote", 2: "full", 3: "full"}


async def test_subscriptions_made_before_connect_are_replayed_by_mode(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    await feed.subscribe_symbols([INFY, SBIN], "ltp")
    await feed.subscribe_symbols([NIFTY], "full")
    async with running(feed):
        await wait_for(lambda: rec.count("connect") == 1)
        await sim.wait_for(lambda: sim.subscriptions() == {INFY: "ltp", SBIN: "ltp", NIFTY: "full"})
    assert sent(sim) == [
        {"a": "subscribe", "v": [INFY, SBIN]},
        {"a": "mode", "v": ["ltp", [INFY, SBIN]]},
        {"a": "subscribe", "v": [NIFTY]},
        {"a": "mode", "v": ["full", [NIFTY]]},
    ]


async def test_reconcile_sends_only_the_difference(sim: Simulator) -> None:
    feed = make_feed(sim.url)
    await feed.reconcile({INFY: "quote", SBIN: "ltp", RELIANCE: "full"})
    async with running(feed):
        await sim.wait_for(lambda: len(sim.subscriptions()) == 3)
        before = len(sim.received)
        desired: dict[int, Mode] = {INFY: "quote", SBIN: "full", NIFTY: "ltp"}
        await feed.reconcile(desired)
        await sim.wait_for(lambda: sim.subscriptions() == desired)
        assert [msg for _, msg in sim.received[before:]] == [
            {"a": "unsubscribe", "v": [RELIANCE]},
            {"a": "subscribe", "v": [NIFTY]},
            {"a": "mode", "v": ["ltp", [NIFTY]]},
            {"a": "mode", "v": ["full", [SBIN]]},
        ]
        assert dict(feed.subscriptions) == desired
        before = len(sim.received)
        await feed.reconcile(desired)  # nothing to do: nothing sent
        await feed.subscribe_symbols([INFY], "quote")  # a marker message
        await sim.wait_for(lambda: len(sim.received) > before)
        assert sim.received[before][1] == {"a": "mode", "v": ["quote", [INFY]]}


async def test_raw_frames_with_parse_data_false(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec, parse_data=False)
    async with running(feed):
        await feed.subscribe_symbols([INFY], "full")
        await wait_for(lambda: len(rec.frames) >= 2)
        # Raw means every frame, as Aio-Trader's parse_data=False: text frames too, unparsed.
        order = {"order_id": "1", "status": "COMPLETE"}
        await sim.send_order(order)
        await sim.send_text('{"type": "error", "data": "too many"}')
        await wait_for(lambda: sum(isinstance(frame, str) for frame in rec.frames) == 2)
    assert rec.ticks == []
    binary = [frame for frame in rec.frames if isinstance(frame, bytes)]
    text = [frame for frame in rec.frames if isinstance(frame, str)]
    assert all(len(frame) > 1 for frame in binary)
    decoded = decode_frame(binary[0])
    assert [(tick.instrument_token, tick.mode) for tick in decoded] == [(INFY, "full")]
    assert [orjson.loads(frame)["type"] for frame in text] == ["order", "error"]
    assert orjson.loads(text[0])["data"] == order
    assert (rec.orders, rec.errors) == ([], [])  # not parsed


async def test_a_decoder_replaces_decode_frame_and_keeps_the_counting(sim: Simulator) -> None:
    """What the service does: ``decoder=frame_payloads`` hands (token, JSON) pairs to on_tick."""
    got: list[list[tuple[int, bytes]]] = []
    feed = make_feed(sim.url, decoder=frame_payloads)
    feed.on_tick = lambda _feed, payloads: got.append(payloads)
    async with running(feed):
        await feed.subscribe_symbols([INFY, SBIN], "quote")
        await wait_for(lambda: len(got) >= 3)
        await sim.send_binary(b"\x00\x02\x00\x08\x00")  # framing cut short
        await sim.send_binary(b"\x00\x01\x00\x03abc")  # one packet of an unknown length
        await wait_for(lambda: feed.stats.malformed_frames == 1 and feed.stats.skipped_packets == 1)
    pairs = [pair for frame in got for pair in frame]
    assert {token for token, _ in pairs} == {INFY, SBIN}
    for token, payload in pairs:
        tick = orjson.loads(payload)
        assert (tick["instrument_token"], tick["mode"]) == (token, "quote")
    assert feed.stats.ticks == len(pairs)


async def test_heartbeats_keep_an_idle_feed_alive(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec, liveness_timeout=0.3)
    async with running(feed):
        await wait_for(lambda: feed.stats.heartbeats >= 6)  # ~0.6 s: twice the liveness window
    assert rec.ticks == []
    assert rec.count("connect") == 1
    assert feed.stats.reconnects == 0
    assert feed.stats.frames >= feed.stats.heartbeats


async def test_text_frames_reach_their_handlers(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    async with running(feed):
        await wait_for(lambda: feed.connected)
        order = {"order_id": "1", "status": "COMPLETE", "instrument_token": SBIN}
        await sim.send_order(order)
        await sim.send_text('{"type": "error", "data": "max tokens exceeded"}')
        await sim.send_text('{"type": "message", "data": "market closes early"}')
        await sim.send_text('{"type": "notice", "data": {"level": 2}}')
        await sim.send_text("not json")
        await wait_for(lambda: len(rec.errors) == 2)
    assert rec.orders == [order]
    assert rec.messages == [
        KiteMessage("market closes early"),
        OtherMessage("notice", {"level": 2}),  # undocumented types are news, not errors
    ]
    assert rec.errors[0] == KiteError("max tokens exceeded")
    assert isinstance(rec.errors[1], InvalidText)
    assert feed.stats.text_messages == 5
    assert feed.stats.malformed_frames == 1


async def test_malformed_binary_frame_is_counted_and_skipped(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    async with running(feed):
        await feed.subscribe_symbols([INFY], "ltp")
        await wait_for(lambda: len(rec.ticks) >= 1)
        await sim.send_binary(b"\x00\x02\x00\x08\x00")  # two packets declared, one cut short
        await wait_for(lambda: len(rec.errors) == 1)
        seen = len(rec.ticks)
        await wait_for(lambda: len(rec.ticks) > seen)  # still flowing
    assert isinstance(rec.errors[0], FrameError)
    assert feed.stats.malformed_frames == 1
    assert rec.count("disconnect") == 1  # only the final close()


async def test_handler_exceptions_do_not_kill_the_feed(sim: Simulator) -> None:
    errors: list[FeedError] = []
    calls = 0

    def bad_tick(feed: KiteFeed, ticks: list[Tick]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    async def bad_order(feed: KiteFeed, data: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        raise KeyError("order")

    def bad_error_handler(feed: KiteFeed, error: FeedError) -> None:
        errors.append(error)
        raise ValueError("the error handler fails too")

    cap = LogCapture()
    feed = make_feed(
        sim.url,
        on_tick=bad_tick,
        on_order_update=bad_order,
        on_error=bad_error_handler,
        logger=structlog.wrap_logger(None, processors=[cap]),
    )
    async with running(feed):
        await feed.subscribe_symbols([INFY], "quote")
        await wait_for(lambda: calls >= 3)
        await sim.send_order()
        await wait_for(lambda: any(isinstance(error, KeyError) for error in errors))
        assert feed.connected
    assert feed.stats.reconnects == 0
    # every failure counted: on_tick x calls, on_order_update, and on_error each time it ran
    assert feed.stats.handler_errors == 2 * len(errors)
    failed = [entry for entry in cap.entries if entry["event"] == "handler_failed"]
    assert {entry["handler"] for entry in failed} == {"on_tick", "on_order_update", "on_error"}
    assert all(isinstance(entry["exc_info"], Exception) for entry in failed)


async def test_a_handler_failing_on_every_frame_does_not_flood_the_log(
    sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed_module, "_FAILURE_LOG_INTERVAL", 0.3)
    calls = 0

    def bad_tick(feed: KiteFeed, ticks: list[Tick]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("boom")

    cap = LogCapture()
    errors: list[FeedError] = []
    feed = make_feed(
        sim.url,
        on_tick=bad_tick,
        on_error=lambda feed, error: errors.append(error),
        logger=structlog.wrap_logger(None, processors=[cap]),
    )
    async with running(feed):
        await feed.subscribe_symbols([INFY], "quote")
        await wait_for(lambda: calls >= 5)
        first = [entry for entry in cap.entries if entry["event"] == "handler_failed"]
        assert len(first) == 1  # five failures, one traceback
        assert "not_logged" not in first[0]
        await asyncio.sleep(0.35)
        calls_then = calls
        await wait_for(lambda: calls > calls_then)
    failed = [entry for entry in cap.entries if entry["event"] == "handler_failed"]
    assert 2 <= len(failed) < calls
    assert failed[1]["not_logged"] >= 4  # the ones in between are counted, not lost
    assert sum(entry.get("not_logged", 0) for entry in failed) + len(failed) <= calls
    assert feed.stats.handler_errors == calls == len(errors)  # every one counted and reported


async def test_async_handlers_and_attribute_assignment(sim: Simulator) -> None:
    got: list[Tick] = []
    connects = 0

    async def on_tick(feed: KiteFeed, ticks: list[Tick]) -> None:
        await asyncio.sleep(0)
        got.extend(ticks)

    async def on_connect(feed: KiteFeed) -> None:
        nonlocal connects
        connects += 1
        await feed.subscribe_symbols([INFY], "ltp")  # the Aio-Trader pattern

    feed = make_feed(sim.url)
    feed.on_tick = on_tick
    feed.on_connect = on_connect
    async with running(feed):
        await wait_for(lambda: len(got) >= 2)
    assert connects == 1
    assert {tick.instrument_token for tick in got} == {INFY}


@pytest.mark.parametrize(
    ("mode", "bounds", "delivered_at_least", "max_pending"),
    [
        # Frame count: two frames plus at most one lifecycle event.
        ("ltp", {"queue_size": 2}, 5, 3),
        # Bytes: one full packet is 184 bytes, so at most two frames fit under 400 bytes
        # whatever queue_size (big full-mode frames must not be bounded by count alone).
        ("full", {"queue_size": 10_000, "queue_bytes": 400}, 5, 4),
    ],
    ids=["frames", "bytes"],
)
async def test_a_slow_consumer_never_blocks_the_reader_and_is_not_stale(
    sim: Simulator,
    mode: Mode,
    bounds: dict[str, Any],
    delivered_at_least: int,
    max_pending: int,
) -> None:
    sim.set_tick_interval(0.005)
    delivered = 0
    lags: list[float] = []

    async def slow(feed: KiteFeed, ticks: list[Tick]) -> None:
        nonlocal delivered
        lags.append(feed.lag())
        await asyncio.sleep(0.15)  # makes no room within queue_timeout
        delivered += 1

    # The reader waits up to queue_timeout for room, then drops; the silence is not stale.
    feed = make_feed(sim.url, on_tick=slow, liveness_timeout=0.25, queue_timeout=0.05, **bounds)
    assert feed.lag() == 0.0
    await feed.subscribe_symbols([INFY], mode)
    task = asyncio.create_task(feed.connect(close_timeout=10))
    await wait_for(lambda: feed.stats.frames_dropped >= 3 and delivered >= delivered_at_least)
    assert feed.pending <= max_pending
    # The reader never waited for long: it kept reading (and dropping the stalest frames).
    frames = feed.stats.frames
    await wait_for(lambda: feed.stats.frames > frames + 5)
    # Frames wait behind the slow handler (lag() tells), but never long: the stalest are dropped.
    assert 0.01 < max(lags) < 1.0
    # A full receive buffer must not hide the server's close frame until close_timeout.
    await asyncio.wait_for(feed.close(), 5)
    await task
    assert feed.stats.reconnects == 0


async def test_a_full_inbox_waits_briefly_then_drops_its_older_half_keeping_events() -> None:
    inbox = Inbox(limit=6, max_bytes=10_000)
    connect, disconnect = Event("on_connect", ()), Event("on_disconnect", ("dropped", 1006, ""))
    inbox.put_nowait(connect)
    for n in range(4):
        assert await inbox.put_frame(b"f%d" % n, float(n), 0.01) == 0
    inbox.put_nowait(disconnect)  # six items: full
    # Nobody makes room within the timeout: half of the four frames go, oldest first.
    assert await inbox.put_frame(b"f4", 4.0, 0.01) == 2
    assert inbox.waited_until > 0  # it waited, then gave up
    assert list(inbox.items) == [connect, b"f2", b"f3", disconnect, b"f4"]
    assert list(inbox.stamps) == [2.0, 3.0, 4.0]
    assert inbox.size == 6
    # A consumer that makes room in time loses nothing: the reader just waited.
    inbox.put_nowait(Event("on_connect", ()))  # full again
    put = asyncio.ensure_future(inbox.put_frame(b"f5", 5.0, 5.0))
    await asyncio.sleep(0.01)
    assert inbox.waiting
    inbox.pop()  # one taken: room
    assert await asyncio.wait_for(put, 1) == 0
    assert list(inbox.stamps)[-1] == 5.0
    assert inbox.qsize() == 6
    # A reader stopped while it waits still hands over the frame it had read.
    put = asyncio.ensure_future(inbox.put_frame(b"f6", 6.0, 5.0))
    await asyncio.sleep(0.01)
    put.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await put
    assert list(inbox.items)[-1] == b"f6"
    assert inbox.qsize() == 7
    # Bytes bound too: drop until at most half of max_bytes remains.
    big = Inbox(limit=100, max_bytes=100)
    for n in range(5):
        await big.put_frame(bytes(30), float(n), 0.01)  # 150 bytes: over the bound after the 4th
    assert big.size <= 100
    assert [len(item) for item in big.items if isinstance(item, bytes)] == [30] * len(big.stamps)


async def test_a_full_inbox_keeps_order_updates_and_drops_ticks() -> None:
    inbox = Inbox(limit=6, max_bytes=10_000)
    order = '{"type":"order","data":{"order_id":"1"}}'
    await inbox.put_frame(b"f0", 0.0, 0.01)
    await inbox.put_frame(order, 1.0, 0.01)  # older than most ticks
    for n in range(2, 6):
        await inbox.put_frame(b"f%d" % n, float(n), 0.01)
    # Full: the older half of the five tick frames goes, the order update stays.
    assert await inbox.put_frame(b"f6", 6.0, 0.01) == 2
    assert list(inbox.items) == [order, b"f3", b"f4", b"f5", b"f6"]
    assert list(inbox.stamps) == [1.0, 3.0, 4.0, 5.0, 6.0]
    assert inbox.size == sum(len(item) for item in inbox.items)
    assert inbox.pop() == order
    # Text frames alone filling it still cannot grow it without bound: the oldest go.
    texts = Inbox(limit=4, max_bytes=10_000)
    for n in range(4):
        await texts.put_frame(f"t{n}", float(n), 0.01)
    assert await texts.put_frame("t4", 4.0, 0.01) == 2
    assert list(texts.items) == ["t2", "t3", "t4"]
    assert list(texts.stamps) == [2.0, 3.0, 4.0]
    # The byte bound likewise.
    big = Inbox(limit=100, max_bytes=100)
    for n in range(5):
        await big.put_frame("x" * 30, float(n), 0.01)
    assert big.size <= 100
    assert len(big.items) == len(big.stamps)


async def test_an_order_update_behind_a_stuck_handler_is_delivered(sim: Simulator) -> None:
    gate = asyncio.Event()
    orders: list[str] = []

    async def stuck(feed: KiteFeed, ticks: Any) -> None:
        await gate.wait()  # e.g. the bridge's publisher while Redis is down

    feed = make_feed(
        sim.url,
        queue_size=20,
        queue_timeout=0.05,
        on_tick=stuck,
        on_order_update=lambda feed, data: orders.append(data["order_id"]),
    )
    sim.set_tick_interval(0.005)
    task = asyncio.create_task(feed.connect())
    await sim.wait_for(lambda: feed.connected)
    await feed.subscribe_symbols([408065, 738561], "full")
    await sim.wait_for(lambda: feed.pending >= 10)
    await sim.send_order({"order_id": "fill-1", "status": "COMPLETE"})
    # Ticks keep coming while the handler is stuck: the inbox overflows again and again.
    dropped = feed.stats.frames_dropped
    await sim.wait_for(lambda: feed.stats.frames_dropped > dropped + 40, 10)
    gate.set()
    await sim.wait_for(lambda: orders == ["fill-1"], 5)
    await feed.close()
    await task


# --------------------------------------------------------------------------------------------
# Faults and reconnects


async def test_past_kites_limit_the_same_oldest_3000_are_replayed_every_time() -> None:
    """Kite refuses what comes last past 3000 tokens: the newest subscription. A replay grouped
    by mode must not turn that into a different instrument going dark after each reconnect."""
    many = [(n << 8) | 1 for n in range(1, 3000)]  # 2999 NSE tokens in full
    newest_ltp, newest_quote = (5000 << 8) | 1, (5001 << 8) | 1
    async with Simulator(access_tokens={TOKEN}, tick_interval=60, heartbeat_interval=0.1) as sim:
        rec = Recorder()
        cap = LogCapture()
        feed = make_feed(sim.url, rec, logger=structlog.wrap_logger(None, processors=[cap]))
        async with running(feed):
            await feed.subscribe_symbols(many, "full")
            await feed.subscribe_symbols([newest_ltp], "ltp")
            await feed.subscribe_symbols([newest_quote], "quote")  # the 3001st: refused
            await sim.wait_for(lambda: len(sim.subscriptions()) == 3000)
            before = sim.subscriptions()
            assert newest_quote not in before
            await sim.drop()
            await wait_for(lambda: rec.count("connect") == 2)
            await sim.wait_for(lambda: len(sim.subscriptions()) == 3000)
            assert sim.subscriptions() == before  # the same 3000, in the same modes
            warnings = [e for e in cap.entries if e.get("left_out") is not None]
            assert warnings  # at every replay that had to leave some out
            assert {(w["left_out"], tuple(w["newest_left_out"])) for w in warnings} == {
                (1, (newest_quote,))
            }


async def test_abrupt_drop_reconnects_and_restores_subscriptions(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    async with running(feed):
        await feed.subscribe_symbols([INFY, SBIN], "quote")
        await feed.subscribe_symbols([NIFTY], "full")
        await feed.subscribe_symbols([RELIANCE], "ltp")
        await sim.wait_for(lambda: len(sim.subscriptions()) == 4)
        first = max(sim.connections)
        await sim.drop()
        await wait_for(lambda: rec.count("connect") == 2)
        await sim.wait_for(lambda: len(sim.subscriptions()) == 4)
        assert max(sim.connections) > first
        assert sim.subscriptions() == dict(feed.subscriptions)
        assert sent(sim, max(sim.connections)) == [
            {"a": "subscribe", "v": [RELIANCE]},
            {"a": "mode", "v": ["ltp", [RELIANCE]]},
            {"a": "subscribe", "v": [INFY, SBIN]},
            {"a": "mode", "v": ["quote", [INFY, SBIN]]},
            {"a": "subscribe", "v": [NIFTY]},
            {"a": "mode", "v": ["full", [NIFTY]]},
        ]
        count = len(rec.ticks)
        await wait_for(lambda: len(rec.ticks) > count + 4)
    assert rec.of("disconnect")[0] == ("dropped", 1006, "")
    assert rec.of("reconnect")[0][0] == 1
    assert [handshake.headers.get("X-Kite-Version") for handshake in sim.handshakes] == ["3", "3"]
    assert feed.stats.reconnects_by_cause == {"dropped": 1}
    assert feed.stats.connections == 2
    assert feed.stats.connected_since is None
    assert not feed.connected


async def test_silent_stall_is_detected_and_reconnected(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec, liveness_timeout=0.4)
    async with running(feed):
        await feed.subscribe_symbols([INFY], "full")
        await wait_for(lambda: len(rec.ticks) >= 2)
        sim.stall(True)
        stalled_at = time.monotonic()
        await wait_for(lambda: rec.count("disconnect") == 1, timeout=3)
        detected_after = time.monotonic() - stalled_at
        sim.stall(False)
        await wait_for(lambda: rec.count("connect") == 2)
        await sim.wait_for(lambda: sim.subscriptions() == {INFY: "full"})
    cause, code, reason = rec.of("disconnect")[0]
    assert (cause, code) == ("stale", 1006)
    assert "no frame" in reason
    assert detected_after >= 0.4 - 0.05  # never before the window (heartbeats every 0.1 s)
    assert feed.stats.reconnects_by_cause == {"stale": 1}


async def test_keepalive_ping_timeout(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec, liveness_timeout=30)
    async with running(feed, ping_interval=0.05, ping_timeout=0.1, close_timeout=0.1):
        await wait_for(lambda: feed.connected)
        sim.stall(True)
        await wait_for(lambda: rec.count("disconnect") == 1, timeout=3)
        sim.stall(False)
        await wait_for(lambda: rec.count("connect") == 2)
    assert rec.of("disconnect")[0][:2] == ("ping_timeout", 1011)


async def test_server_close_frame(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    async with running(feed):
        await wait_for(lambda: feed.connected)
        await sim.close(4000, "maintenance")
        await wait_for(lambda: rec.count("connect") == 2)
    assert rec.of("disconnect")[0] == ("closed", 4000, "maintenance")


async def test_403_is_final() -> None:
    rec = Recorder()
    async with Simulator(access_tokens={"another-token"}) as sim:
        feed = make_feed(sim.url, rec)
        with pytest.raises(AuthError) as caught:
            await asyncio.wait_for(feed.connect(), 5)
        assert caught.value.status == 403
        assert [handshake.status for handshake in sim.handshakes] == [403]
    assert rec.events == []
    assert rec.errors == [caught.value]  # on_error hears of the end before connect() raises
    assert feed.stats.reconnects == 0


async def test_token_expiring_while_connected_stops_the_feed(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    task = asyncio.create_task(feed.connect())
    await wait_for(lambda: feed.connected)
    sim.expire_token(TOKEN)
    await sim.drop()
    with pytest.raises(AuthError):
        await asyncio.wait_for(task, 5)
    assert [handshake.status for handshake in sim.handshakes] == [101, 403]
    assert rec.of("disconnect") == [("dropped", 1006, "")]
    assert [event[0] for event in rec.events] == ["connect", "disconnect", "reconnect"]


async def test_transient_statuses_are_retried_with_backoff(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec, base_wait=0.01, max_wait=1)
    sim.reject_next(1, 503)
    sim.reject_next(1, 429)
    sim.reject_next(1, 400)
    async with running(feed):
        await wait_for(lambda: rec.count("connect") == 1)
    assert [handshake.status for handshake in sim.handshakes] == [503, 429, 400, 101]
    retries = rec.of("reconnect")
    assert [attempt for attempt, _ in retries] == [1, 2, 3]
    for (attempt, wait), nominal in zip(retries, [0.01, 0.02, 0.04], strict=True):
        assert nominal <= wait <= nominal * 1.1, attempt
    statuses = [e.response.status_code for e in rec.errors if isinstance(e, InvalidStatus)]
    assert statuses == [503, 429, 400]
    assert feed.stats.reconnects_by_cause == {"connect_failed": 3}


async def test_retries_exhausted_when_nothing_listens() -> None:
    rec = Recorder()
    feed = make_feed(f"ws://127.0.0.1:{free_port()}", rec, max_retries=2, base_wait=0.001)
    with pytest.raises(RetriesExhausted) as caught:
        await asyncio.wait_for(feed.connect(), 5)
    assert caught.value.attempts == 3
    assert isinstance(caught.value.last_error, OSError)
    assert [attempt for attempt, _ in rec.of("reconnect")] == [1, 2]
    # Each failed attempt, then the final verdict, reach on_error.
    assert [type(error) for error in rec.errors][-1] is RetriesExhausted
    assert rec.errors[-1] is caught.value
    assert len(rec.errors) == 3


@contextlib.asynccontextmanager
async def closing_server(lifetime: float) -> AsyncIterator[str]:
    """Accepts every handshake, then closes the connection after ``lifetime`` seconds."""

    async def handler(ws: ServerConnection) -> None:
        await asyncio.sleep(lifetime)
        await ws.close(1008, "go away")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}"


async def test_accept_then_close_storm_keeps_backing_off() -> None:
    rec = Recorder()
    async with closing_server(0) as url:
        feed = make_feed(url, rec, max_retries=4, base_wait=0.002, max_wait=1, reset_after=30)
        with pytest.raises(RetriesExhausted):
            await asyncio.wait_for(feed.connect(), 5)
    retries = rec.of("reconnect")
    assert [attempt for attempt, _ in retries] == [1, 2, 3, 4]
    waits = [wait for _, wait in retries]
    assert waits == sorted(waits)
    assert waits[-1] >= 0.016
    assert feed.stats.connections == 5
    assert rec.of("disconnect")[0] == ("closed", 1008, "go away")


async def test_connections_that_stayed_up_reset_the_backoff() -> None:
    rec = Recorder()
    async with closing_server(0.1) as url:
        feed = make_feed(url, rec, max_retries=1, base_wait=0.002, reset_after=0.05)
        async with running(feed):
            await wait_for(lambda: rec.count("reconnect") >= 3)
    assert {attempt for attempt, _ in rec.of("reconnect")} == {1}


async def test_a_connection_that_delivered_ticks_resets_the_backoff(sim: Simulator) -> None:
    """A link that drops every few seconds: each connection served ticks, so each retry is the
    first (waits stay at base_wait) and the retries never run out."""
    rec = Recorder()
    feed = make_feed(sim.url, rec, max_retries=1, base_wait=0.01, max_wait=5, reset_after=30)
    async with running(feed):
        await feed.subscribe_symbols([408065], "full")
        for drops in range(1, 5):
            ticks = len(rec.ticks)
            await wait_for(lambda: feed.connected and len(rec.ticks) > ticks)  # noqa: B023
            await asyncio.sleep(1.0)  # ticks flowing for a second: a healthy connection
            await sim.drop()
            await wait_for(lambda: rec.count("reconnect") >= drops)  # noqa: B023
    assert [attempt for attempt, _ in rec.of("reconnect")] == [1, 1, 1, 1]
    assert all(wait < 0.02 for _, wait in rec.of("reconnect"))


async def test_a_server_closing_after_an_empty_frame_or_a_single_tick_still_backs_off() -> None:
    """Neither an empty binary frame nor one tick and a close at once is a healthy connection:
    the backoff grows and the retries run out, as with an accept-then-close server."""
    one_tick = encode_frame([LtpTick(True, "ltp", 408065, 1550.0)])
    for first in (b"\x00\x00", one_tick):

        async def handler(ws: ServerConnection, first: bytes = first) -> None:
            await ws.send(first)
            await ws.close(1011, "internal error")

        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            rec = Recorder()
            feed = make_feed(f"ws://127.0.0.1:{port}", rec, max_retries=3, base_wait=0.002)
            with pytest.raises(RetriesExhausted):
                await asyncio.wait_for(feed.connect(), 10)
        assert [attempt for attempt, _ in rec.of("reconnect")] == [1, 2, 3]


async def test_slow_failed_handshakes_do_not_reset_the_backoff() -> None:
    # A gateway that accepts TCP and never answers the upgrade: every attempt times out after
    # connect_timeout, longer than reset_after. Only an open connection is health.
    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    server = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rec = Recorder()
    feed = make_feed(
        f"ws://127.0.0.1:{port}",
        rec,
        max_retries=2,
        base_wait=0.01,
        reset_after=0.1,
        connect_timeout=0.2,
    )
    try:
        with pytest.raises(RetriesExhausted):
            await asyncio.wait_for(feed.connect(), 10)
    finally:
        server.close()
    assert [attempt for attempt, _ in rec.of("reconnect")] == [1, 2]
    assert feed.stats.connections == 0


async def test_unretryable_errors_are_raised_at_once(sim: Simulator) -> None:
    feed = make_feed(sim.url)
    with pytest.raises(TypeError):
        await asyncio.wait_for(feed.connect(no_such_option=1), 5)
    assert sim.handshakes == []
    assert feed.stats.reconnects == 0


# --------------------------------------------------------------------------------------------
# Closing


async def test_close_is_prompt_and_connect_returns(sim: Simulator) -> None:
    rec = Recorder()
    feed = make_feed(sim.url, rec)
    task = asyncio.create_task(feed.connect())
    await wait_for(lambda: feed.connected)
    await asyncio.wait_for(feed.close(), 2)
    assert task.done()
    assert task.result() is None
    assert rec.of("disconnect") == [("client", 1000, "")]
    assert not feed.connected
    await sim.wait_for(lambda: not sim.connections)
    await feed.close()  # idempotent


async def test_close_cuts_a_backoff_sleep_short() -> None:
    rec = Recorder()
    feed = make_feed(f"ws://127.0.0.1:{free_port()}", rec, base_wait=30, max_wait=60)
    task = asyncio.create_task(feed.connect())
    await wait_for(lambda: rec.count("reconnect") == 1)
    await asyncio.wait_for(feed.close(), 2)
    assert task.done()
    assert task.result() is None


async def test_close_from_a_handler_does_not_deadlock(sim: Simulator) -> None:
    async def on_connect(feed: KiteFeed) -> None:
        await feed.close()

    feed = make_feed(sim.url, on_connect=on_connect)
    await asyncio.wait_for(feed.connect(), 3)
    assert not feed.connected


async def test_close_before_connect_and_reuse(sim: Simulator) -> None:
    feed = make_feed(sim.url)
    await feed.close()
    await asyncio.wait_for(feed.connect(), 2)  # returns at once
    assert sim.handshakes == []
    async with running(feed):  # and the feed can be started again
        await wait_for(lambda: feed.connected)
        with pytest.raises(RuntimeError, match="already running"):
            await feed.connect()


# --------------------------------------------------------------------------------------------
# Kite Web flavour and secrets


async def test_kite_web_enctoken_survives_the_query_string() -> None:
    enctoken = "ab+cd/ef==" + TOKEN
    async with Simulator(enctokens={"AB1234": enctoken}) as sim:
        feed = KiteFeed(user_id="AB1234", enctoken=enctoken, url=sim.url)
        async with running(feed):
            await wait_for(lambda: feed.connected)
    (handshake,) = sim.handshakes
    assert handshake.status == 101
    assert handshake.params == {
        "api_key": "kitefront",
        "user_id": "AB1234",
        "enctoken": enctoken,
        "agent": "kite3-web",
        "version": "3.0.0",
    }


async def test_no_secret_in_any_log_line(sim: Simulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="websockets.client")
    caplog.set_level(logging.DEBUG, logger="websockets.server")
    cap = LogCapture()
    rec = Recorder()
    feed = make_feed(sim.url, rec, logger=structlog.wrap_logger(None, processors=[cap]))
    async with running(feed):
        await feed.subscribe_symbols([INFY], "ltp")
        await wait_for(lambda: len(rec.ticks) >= 1)
        await sim.drop()
        await wait_for(lambda: rec.count("connect") == 2)
    client = [r.getMessage() for r in caplog.records if r.name.startswith("websockets.client")]
    server = [r.getMessage() for r in caplog.records if r.name.startswith("websockets.server")]
    lines = client + server + [str(entry) for entry in cap.entries]
    assert any("> GET /?api_key=" in line for line in lines)  # websockets did log the request
    assert any("< GET /?api_key=" in line for line in server)  # and the simulator's side too
    assert any("connected" in line for line in lines)
    assert not [line for line in lines if TOKEN in line]


@pytest.mark.parametrize("kind", ["logger", "adapter", "default"])
async def test_stdlib_loggers_are_accepted(
    sim: Simulator, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """A stdlib logger (Aio-Trader's way), a LoggerAdapter, or none: stdlib logging it is."""
    name = {"logger": "aio", "adapter": "aio", "default": "bridge.kite.feed"}[kind]
    caplog.set_level(logging.INFO, logger=name)
    logger: Any = {
        "logger": logging.getLogger("aio"),
        "adapter": logging.LoggerAdapter(logging.getLogger("aio"), {"app": "x"}),
        "default": None,
    }[kind]

    def broken(feed: KiteFeed, ticks: Any) -> None:
        raise RuntimeError("strategy bug")

    feed = make_feed(sim.url, logger=logger, on_tick=broken)
    async with running(feed):
        await feed.subscribe_symbols([INFY], "ltp")
        await wait_for(lambda: feed.stats.handler_errors >= 1)
    records = [record for record in caplog.records if record.name == name]
    messages = [record.getMessage() for record in records]
    assert any(message.startswith("connected url=") for message in messages), messages
    assert not [message for message in messages if TOKEN in message]
    # A handler's exception reaches logging as exc_info, not flattened into the message.
    [failed, *_] = [record for record in records if record.getMessage().startswith("handler_")]
    assert failed.levelno == logging.ERROR
    assert failed.getMessage() == "handler_failed handler='on_tick'"
    assert failed.exc_info is not None
    assert isinstance(failed.exc_info[1], RuntimeError)


def test_a_feed_can_be_reused_under_a_new_event_loop() -> None:
    """Two ``asyncio.run()`` calls, one feed: the second connects like the first."""
    rec = Recorder()
    port = free_port()

    async def session(feed: KiteFeed | None) -> KiteFeed:
        simulator = Simulator(access_tokens={TOKEN}, api_keys={KEY}, port=port, tick_interval=0.02)
        async with simulator as sim:
            if feed is None:
                feed = make_feed(sim.url, rec)
            await feed.subscribe_symbols([SBIN], mode="ltp")
            async with running(feed):
                await wait_for(lambda: feed.connected)
                ticks = len(rec.ticks)
                await wait_for(lambda: len(rec.ticks) > ticks)
            assert sim.handshakes[-1].status == 101
        return feed

    feed = asyncio.run(session(None))
    asyncio.run(session(feed))
    assert rec.count("connect") == 2
    assert feed.stats.connections == 2


async def test_a_reconcile_cancelled_mid_send_still_tells_kite_everything() -> None:
    """The replay set changes before the messages go out: a caller cancelled between two of
    them left Kite without the rest, and the next reconcile of the same set sent nothing."""
    feed = KiteFeed(api_key="k", access_token="t", batch_size=1)
    ws = BlockingSocket()
    feed._ws = ws  # type: ignore[assignment]
    first = asyncio.create_task(feed.reconcile({1: "ltp", 2: "ltp"}))
    await asyncio.wait_for(ws.first.wait(), 5)
    first.cancel()
    await asyncio.sleep(0.01)
    assert not first.done()  # the cancellation waits for the send...
    ws.release.set()
    with pytest.raises(asyncio.CancelledError):
        await first  # ...and is then raised
    await feed.reconcile({1: "ltp", 2: "ltp"})
    assert ws.subscribed() == {1, 2}
