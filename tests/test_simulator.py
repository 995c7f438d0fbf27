"""The Kite simulator over loopback, with a real websockets client, and its market model."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from helpers import free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from bridge.kite.codec import decode_frame, encode_packet, encode_raw_frame
from bridge.kite.records import (
    DepthLevel,
    FullTick,
    IndexFullTick,
    IndexQuoteTick,
    LtpTick,
    Mode,
    QuoteTick,
    Tick,
)
from bridge.simulator import HEARTBEAT, Market, Simulator
from bridge.simulator.cli import add_arguments
from bridge.simulator.market import (
    DERIVATIVE_SEGMENTS,
    divisor_of,
    is_index,
    segment_of,
    tick_size_of,
)

ROOT = Path(__file__).resolve().parent.parent
INFY, RELIANCE, NIFTY, BANKNIFTY = 408065, 738561, 256265, 260105
USDINR_CDS, BCD, NFO = 412675, 1001222, 12517890
CONNECT_QUERY = "/?api_key=key1&access_token=token1"
#: Packet length per (is index, mode): kite-protocol §3.2.
LENGTHS = {
    (False, "ltp"): 8,
    (False, "quote"): 44,
    (False, "full"): 184,
    (True, "ltp"): 8,
    (True, "quote"): 28,
    (True, "full"): 32,
}
RECORD_TYPES: dict[tuple[bool, str], type[Tick]] = {
    (False, "ltp"): LtpTick,
    (False, "quote"): QuoteTick,
    (False, "full"): FullTick,
    (True, "ltp"): LtpTick,
    (True, "quote"): IndexQuoteTick,
    (True, "full"): IndexFullTick,
}


@asynccontextmanager
async def simulator(**options: Any) -> AsyncIterator[Simulator]:
    options.setdefault("tick_interval", 0.02)
    options.setdefault("heartbeat_interval", 0.05)
    options.setdefault("seed", 7)
    async with Simulator(**options) as sim:
        yield sim


@asynccontextmanager
async def client(sim: Simulator, query: str = CONNECT_QUERY) -> AsyncIterator[ClientConnection]:
    async with connect(sim.url + query, open_timeout=2, close_timeout=1) as ws:
        yield ws


async def recv(ws: ClientConnection, within: float = 2.0) -> str | bytes:
    async with asyncio.timeout(within):
        return await ws.recv()


async def next_ticks(ws: ClientConnection, within: float = 2.0) -> list[Tick]:
    """The next frame that carries ticks (heartbeats and text skipped)."""
    async with asyncio.timeout(within):
        while True:
            message = await ws.recv()
            if isinstance(message, bytes) and len(message) > 1:
                return decode_frame(message)


async def next_text(ws: ClientConnection, within: float = 2.0) -> dict[str, Any]:
    async with asyncio.timeout(within):
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                parsed: dict[str, Any] = json.loads(message)
                return parsed


async def ticks_matching(ws: ClientConnection, predicate: Any, within: float = 2.0) -> list[Tick]:
    """Frames until one satisfies ``predicate`` (subscription changes apply asynchronously)."""
    async with asyncio.timeout(within):
        while True:
            ticks = await next_ticks(ws)
            if predicate(ticks):
                return ticks


async def closed_by_server(ws: ClientConnection) -> ConnectionClosed:
    async with asyncio.timeout(2):
        while True:
            try:
                await ws.recv()
            except ConnectionClosed as exc:
                return exc


def packet_lengths(frame: bytes) -> list[int]:
    count = int.from_bytes(frame[:2], "big")
    lengths, offset = [], 2
    for _ in range(count):
        length = int.from_bytes(frame[offset : offset + 2], "big")
        lengths.append(length)
        offset += 2 + length
    assert offset == len(frame)
    return lengths


# -- authentication ---------------------------------------------------------------------------


async def test_good_access_token_gets_ticks_and_is_recorded() -> None:
    async with (
        simulator(access_tokens={"token1"}, api_keys={"key1"}) as sim,
        client(sim) as ws,
    ):
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY]}))
        ticks = await next_ticks(ws)
        assert [tick.instrument_token for tick in ticks] == [INFY]
        record = sim.handshakes[-1]
        assert record.status == 101
        assert record.params["access_token"] == "token1"
        assert record.connection_id in sim.connections


@pytest.mark.parametrize(
    "query",
    [
        "/?api_key=key1&access_token=wrong",
        "/?api_key=other&access_token=token1",
        "/?access_token=token1",
        "/?api_key=key1",
        "/?api_key=key1&access_token=",
    ],
)
async def test_bad_credentials_get_403_without_upgrade(query: str) -> None:
    async with simulator(access_tokens={"token1"}, api_keys={"key1"}) as sim:
        with pytest.raises(InvalidStatus) as caught:
            await connect(sim.url + query, open_timeout=2)
        assert caught.value.response.status_code == 403
        assert [h.status for h in sim.handshakes] == [403]
        assert sim.connections == {}


async def test_any_non_empty_token_is_accepted_by_default() -> None:
    async with simulator() as sim, client(sim, "/?api_key=x&access_token=y&uid=1"):
        assert sim.handshakes[-1].status == 101


@pytest.mark.parametrize("path", ["", "/"])
async def test_root_path_with_or_without_slash(path: str) -> None:
    # (The websockets client itself normalises an empty path to "/".)
    async with simulator() as sim, client(sim, path + "?api_key=k&access_token=t"):
        assert sim.handshakes[-1].status == 101


async def test_other_paths_are_not_found() -> None:
    async with simulator() as sim:
        with pytest.raises(InvalidStatus) as caught:
            await connect(sim.url + "/ws?api_key=k&access_token=t", open_timeout=2)
        assert caught.value.response.status_code == 404


@pytest.mark.parametrize(
    "query", ["/?api_key=kitefront&user_id=AB1234", "/?api_key=kitefront&enctoken=abc"]
)
async def test_malformed_kite_web_query_gets_400(query: str) -> None:
    async with simulator() as sim:
        with pytest.raises(InvalidStatus) as caught:
            await connect(sim.url + query, open_timeout=2)
        assert caught.value.response.status_code == 400


async def test_enctoken_must_be_percent_encoded() -> None:
    enctoken = "ab+c/d=="
    async with simulator(enctokens={"AB1234": enctoken}) as sim:
        base = "/?api_key=kitefront&user_id=AB1234&enctoken="
        tail = "&agent=kite3-web&version=3.0.0"
        # aiohttp/yarl encoding (+ and = escaped, / kept) is accepted ...
        async with client(sim, base + quote(enctoken, safe="/") + tail) as ws:
            await ws.send(json.dumps({"a": "mode", "v": ["ltp", [INFY]]}))
            assert [t.instrument_token for t in await next_ticks(ws)] == [INFY]
        # ... a raw "+" / "=" is a malformed query: 400, as the real server answers.
        with pytest.raises(InvalidStatus) as caught:
            await connect(sim.url + base + enctoken + tail, open_timeout=2)
        assert caught.value.response.status_code == 400
        with pytest.raises(InvalidStatus) as caught:
            await connect(
                sim.url + "/?api_key=kitefront&user_id=ZZ9999&enctoken=" + quote(enctoken),
                open_timeout=2,
            )
        assert caught.value.response.status_code == 403
        assert [h.status for h in sim.handshakes] == [101, 400, 403]


@pytest.mark.parametrize("enctoken", ["ab+c/d==", "ab+c", "abc/d==", "ab%2Bc/d=="])
async def test_raw_plus_or_equals_in_enctoken_gets_400_without_upgrade(enctoken: str) -> None:
    # Any enctoken is accepted by default, yet a non-percent-encoded one is still malformed.
    async with simulator() as sim:
        with pytest.raises(InvalidStatus) as caught:
            await connect(
                sim.url + "/?api_key=kitefront&user_id=AB&enctoken=" + enctoken + "&version=3",
                open_timeout=2,
            )
        assert caught.value.response.status_code == 400
        assert [h.status for h in sim.handshakes] == [400]
        assert "percent-encoded" in sim.handshakes[0].reason
        assert sim.connections == {}


@pytest.mark.parametrize(
    ("user_id", "encoded"),
    [("AB", "ab%2Bc/d%3D%3D"), ("AB", "ab%2Bc%2Fd%3D%3D"), ("CD", "abc/d")],
)
async def test_percent_encoded_enctoken_with_or_without_raw_slash_is_accepted(
    user_id: str, encoded: str
) -> None:
    query = f"/?api_key=kitefront&user_id={user_id}&enctoken={encoded}"
    async with simulator(enctokens={"AB": "ab+c/d==", "CD": "abc/d"}) as sim, client(sim, query):
        assert [h.status for h in sim.handshakes] == [101]


async def test_reject_next_answers_the_next_handshakes_then_recovers() -> None:
    async with simulator() as sim:
        sim.reject_next(2, status=503)
        for _ in range(2):
            with pytest.raises(InvalidStatus) as caught:
                await connect(sim.url + CONNECT_QUERY, open_timeout=2)
            assert caught.value.response.status_code == 503
        async with client(sim):
            assert [h.status for h in sim.handshakes] == [503, 503, 101]


@pytest.mark.parametrize("status", [101, 200 - 1, 999])
def test_reject_next_refuses_impossible_statuses(status: int) -> None:
    with pytest.raises(ValueError, match="status"):
        Simulator().reject_next(1, status)


async def test_expire_token_forbids_later_handshakes_only_for_that_token() -> None:
    async with simulator() as sim:
        async with client(sim, "/?api_key=k&access_token=old") as ws:
            sim.expire_token("old")
            await ws.send(json.dumps({"a": "subscribe", "v": [INFY]}))
            assert await next_ticks(ws)  # the open session is not cut
        for _ in range(2):
            with pytest.raises(InvalidStatus) as caught:
                await connect(sim.url + "/?api_key=k&access_token=old", open_timeout=2)
            assert caught.value.response.status_code == 403
        sim.expire_token("enc")
        with pytest.raises(InvalidStatus):
            await connect(sim.url + "/?api_key=kitefront&user_id=U&enctoken=enc", open_timeout=2)
        async with client(sim, "/?api_key=k&access_token=new"):
            assert sim.handshakes[-1].status == 101


# -- client messages ---------------------------------------------------------------------------


async def test_subscribe_defaults_to_quote_in_any_key_order() -> None:
    async with simulator() as sim, client(sim) as ws:
        await ws.send('{ "v" : [ 408065 , 256265 ] ,\n "a" : "subscribe" }')
        frame = await recv_tick_frame(ws)
        assert packet_lengths(frame) == [44, 28]
        assert [(t.instrument_token, t.mode) for t in decode_frame(frame)] == [
            (INFY, "quote"),
            (NIFTY, "quote"),
        ]
        assert sim.subscriptions() == {INFY: "quote", NIFTY: "quote"}


async def recv_tick_frame(ws: ClientConnection, within: float = 2.0) -> bytes:
    async with asyncio.timeout(within):
        while True:
            message = await ws.recv()
            if isinstance(message, bytes) and len(message) > 1:
                return message


@pytest.mark.parametrize("mode", ["ltp", "quote", "full"])
async def test_mode_sets_packet_lengths_and_implicitly_subscribes(mode: Mode) -> None:
    tokens = [INFY, NIFTY, USDINR_CDS, BCD]
    async with simulator() as sim, client(sim) as ws:
        await ws.send(json.dumps({"v": [mode, tokens], "a": "mode"}))
        frame = await recv_tick_frame(ws)
        expected = [LENGTHS[(is_index(token), mode)] for token in tokens]
        assert packet_lengths(frame) == expected
        ticks = decode_frame(frame)
        assert [type(t) for t in ticks] == [RECORD_TYPES[(is_index(t), mode)] for t in tokens]
        assert all(t.mode == mode for t in ticks)
        assert sim.subscriptions() == dict.fromkeys(tokens, mode)


async def test_resubscribe_resets_mode_to_quote_and_unsubscribe_stops_ticks() -> None:
    async with simulator() as sim, client(sim) as ws:
        await ws.send(json.dumps({"a": "mode", "v": ["full", [INFY, RELIANCE]]}))
        await ticks_matching(ws, lambda ts: {t.mode for t in ts} == {"full"})
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY]}))
        ticks = await ticks_matching(ws, lambda ts: ts[0].mode == "quote")
        assert [(t.instrument_token, t.mode) for t in ticks] == [
            (INFY, "quote"),
            (RELIANCE, "full"),
        ]
        await ws.send(json.dumps({"a": "unsubscribe", "v": [INFY, 999]}))  # 999: never subscribed
        ticks = await ticks_matching(ws, lambda ts: len(ts) == 1)
        assert [t.instrument_token for t in ticks] == [RELIANCE]
        assert sim.subscriptions() == {RELIANCE: "full"}


async def test_received_messages_are_recorded_in_order_per_connection() -> None:
    first = {"a": "subscribe", "v": [INFY]}
    second = {"v": ["ltp", [INFY]], "a": "mode"}
    async with simulator() as sim, client(sim) as ws:
        await ws.send(json.dumps(first))
        await ws.send(json.dumps(second))
        await sim.wait_for(lambda: len(sim.received) == 2)
        connection_id = sim.handshakes[-1].connection_id
        assert sim.received == [(connection_id, first), (connection_id, second)]


async def test_empty_token_lists_are_accepted_silently() -> None:
    async with simulator() as sim, client(sim) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": []}))
        await ws.send(json.dumps({"a": "mode", "v": ["full", []]}))
        assert await recv(ws) == HEARTBEAT  # no error frame before the idle heartbeat


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[1, 2]",
        '{"a": "subscribe"}',
        '{"v": [1]}',
        '{"a": "resubscribe", "v": [1]}',
        '{"a": "subscribe", "v": 408065}',
        '{"a": "subscribe", "v": ["408065"]}',
        '{"a": "subscribe", "v": [-1]}',
        '{"a": "subscribe", "v": [4294967296]}',
        '{"a": "subscribe", "v": [true]}',
        '{"a": "mode", "v": ["bogus", [408065]]}',
        '{"a": "mode", "v": ["full"]}',
        '{"a": "mode", "v": [["full"], [408065]]}',  # unhashable modes once closed with 1011
        '{"a": "mode", "v": [{"full": 1}, [408065]]}',
        '{"a": ["subscribe"], "v": [408065]}',
        '{"a": "subscribe", "v": [[408065]]}',
        "[" * 100_000 + "]" * 100_000,  # deeper than json.loads goes: RecursionError
        b'{"a": "subscribe", "v": [408065]}',
    ],
    ids=lambda message: repr(message)[:40],
)
async def test_malformed_messages_get_an_error_frame_and_change_nothing(
    message: str | bytes,
) -> None:
    async with simulator() as sim, client(sim) as ws:
        await ws.send(message)
        reply = await next_text(ws)
        assert reply["type"] == "error"
        assert isinstance(reply["data"], str)
        assert reply["data"]
        assert sim.subscriptions() == {}
        # The connection survives and still works.
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY]}))
        assert [t.instrument_token for t in await next_ticks(ws)] == [INFY]


SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False)
JSON_VALUES = st.recursive(
    SCALARS | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)
REQUESTS = JSON_VALUES | st.fixed_dictionaries(
    {"a": st.sampled_from(["subscribe", "unsubscribe", "mode"]) | JSON_VALUES, "v": JSON_VALUES}
)


@settings(deadline=None, max_examples=25)
@given(st.lists(REQUESTS, min_size=1, max_size=20))
def test_no_request_closes_the_connection(requests: list[Any]) -> None:
    """Whatever a client sends, it gets error frames at worst, never a 1011 close."""

    async def flood() -> None:
        async with simulator() as sim, client(sim) as ws:
            for request in requests:
                await ws.send(json.dumps(request))
            await ws.send(json.dumps({"a": "mode", "v": ["ltp", [INFY]]}))
            async with asyncio.timeout(5):
                while not any(t.instrument_token == INFY for t in await next_ticks(ws)):
                    pass

    asyncio.run(flood())


async def test_token_limit_counts_duplicates_and_drops_the_excess() -> None:
    async with simulator(max_tokens=3000, tick_interval=60) as sim, client(sim) as ws:
        tokens = list(range(1_000_001, 1_000_001 + 2999))
        await ws.send(json.dumps({"a": "subscribe", "v": tokens}))
        await sim.wait_for(lambda: len(sim.subscriptions()) == 2999)
        # One more distinct token fits; its duplicate and the next token do not.
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY, INFY, RELIANCE]}))
        error = await next_text(ws)
        assert error["type"] == "error"
        assert "max tokens" in error["data"]
        state = next(iter(sim.connections.values()))
        assert state.subscribed_count == 3000
        assert INFY in state.subscriptions
        assert RELIANCE not in state.subscriptions
        # Changing the mode of subscribed tokens is not a new subscription.
        await ws.send(json.dumps({"a": "mode", "v": ["ltp", [INFY]]}))
        await sim.wait_for(lambda: sim.subscriptions()[INFY] == "ltp")
        await ws.send(json.dumps({"a": "mode", "v": ["ltp", [RELIANCE]]}))
        assert (await next_text(ws))["type"] == "error"
        assert RELIANCE not in sim.subscriptions()


async def test_unsubscribe_frees_capacity() -> None:
    async with simulator(max_tokens=2) as sim, client(sim) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY, INFY]}))
        await ws.send(json.dumps({"a": "subscribe", "v": [RELIANCE]}))
        assert (await next_text(ws))["type"] == "error"
        await ws.send(json.dumps({"a": "unsubscribe", "v": [INFY]}))
        await ws.send(json.dumps({"a": "subscribe", "v": [RELIANCE]}))
        await sim.wait_for(lambda: sim.subscriptions() == {RELIANCE: "quote"})


# -- server messages -----------------------------------------------------------------------------


async def test_heartbeat_when_nothing_is_subscribed() -> None:
    async with simulator(heartbeat_interval=0.05) as sim, client(sim) as ws:
        for _ in range(3):
            message = await recv(ws, within=1)
            assert message == HEARTBEAT
            assert decode_frame(message) == []
        assert next(iter(sim.connections.values())).heartbeats_sent >= 3


async def test_no_heartbeats_while_ticks_flow() -> None:
    async with (
        simulator(tick_interval=0.01, heartbeat_interval=0.05) as sim,
        client(sim) as ws,
    ):
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY]}))
        await next_ticks(ws)
        messages = [await recv(ws) for _ in range(20)]
        assert HEARTBEAT not in messages


@pytest.mark.parametrize("firehose", [False, True])
async def test_an_unlisted_token_is_subscribed_but_never_ticks(firehose: bool) -> None:
    """kite-protocol §1.4: tokens are not validated; an invalid one simply never ticks."""
    nobody = 999_999_999
    async with (
        simulator(unlisted={nobody}, firehose=firehose, frames_per_second=50) as sim,
        client(sim) as ws,
    ):
        await ws.send(json.dumps({"a": "mode", "v": ["full", [nobody, INFY]]}))
        tokens: set[int] = set()
        for _ in range(10):
            tokens |= {tick.instrument_token for tick in await next_ticks(ws)}
        assert tokens == {INFY}
        assert sim.subscriptions() == {nobody: "full", INFY: "full"}
        # Only the unlisted one left: the connection is idle, so heartbeats, as Kite sends.
        await ws.send(json.dumps({"a": "unsubscribe", "v": [INFY]}))
        async with asyncio.timeout(2):
            while (message := await ws.recv()) != HEARTBEAT:
                assert isinstance(message, bytes)  # ticks already on their way
        for _ in range(3):
            assert await recv(ws, within=1) == HEARTBEAT
        assert sim.subscriptions() == {nobody: "full"}


async def test_order_update_text_frames() -> None:
    async with simulator() as sim, client(sim) as ws:
        await sim.wait_for(lambda: bool(sim.connections))
        await sim.send_order()
        order = await next_text(ws)
        assert order["type"] == "order"
        for key in ("order_id", "status", "tradingsymbol", "instrument_token", "order_timestamp"):
            assert key in order["data"]
        await sim.send_order({"order_id": "1", "status": "REJECTED"})
        assert await next_text(ws) == {
            "type": "order",
            "data": {"order_id": "1", "status": "REJECTED"},
        }


async def test_raw_text_and_binary_frames_reach_every_connection() -> None:
    async with simulator(heartbeat_interval=10) as sim, client(sim) as a, client(sim) as b:
        await sim.wait_for(lambda: len(sim.connections) == 2)
        await sim.send_text('{"type":"message","data":"hello"}')
        await sim.send_binary(b"\x00\x01\x00\x03abc")
        for ws in (a, b):
            assert await recv(ws) == '{"type":"message","data":"hello"}'
            assert await recv(ws) == b"\x00\x01\x00\x03abc"


async def test_set_tick_interval_takes_effect() -> None:
    async with simulator(tick_interval=30, heartbeat_interval=30) as sim, client(sim) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY]}))
        await next_ticks(ws)  # the immediate snapshot after subscribing
        with pytest.raises(TimeoutError):
            await next_ticks(ws, within=0.2)
        sim.set_tick_interval(0.01)
        for _ in range(3):
            await next_ticks(ws, within=1)


# -- faults -----------------------------------------------------------------------------------


async def test_drop_is_an_abnormal_closure_for_the_client() -> None:
    async with simulator() as sim:
        ws = await connect(sim.url + CONNECT_QUERY, open_timeout=2)
        await sim.wait_for(lambda: bool(sim.connections))
        await sim.drop()
        assert isinstance(await closed_by_server(ws), ConnectionClosedError)
        assert ws.close_code == 1006
        assert sim.connections == {}


async def test_close_sends_a_close_frame_with_the_code() -> None:
    async with simulator() as sim, client(sim) as ws:
        await sim.wait_for(lambda: bool(sim.connections))
        await sim.close(1011, "maintenance")
        await closed_by_server(ws)
        assert ws.close_code == 1011
        assert ws.close_reason == "maintenance"


async def test_stall_sends_nothing_not_even_pongs_until_resumed() -> None:
    async with (
        simulator(tick_interval=0.01, heartbeat_interval=0.02) as sim,
        client(sim) as ws,
    ):
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY]}))
        await next_ticks(ws)
        sim.stall()
        # Drain what was in flight, then silence.
        async with asyncio.timeout(1):
            while True:
                try:
                    await recv(ws, within=0.15)
                except TimeoutError:
                    break
        pong = await ws.ping()
        await ws.send(json.dumps({"a": "mode", "v": ["full", [INFY]]}))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pong), 0.2)
        sim.stall(False)
        async with asyncio.timeout(2):
            await pong
        ticks = await ticks_matching(ws, lambda ts: ts[0].mode == "full")
        assert ticks[0].instrument_token == INFY


async def test_stall_silences_text_and_raw_frames_too() -> None:
    async with simulator(heartbeat_interval=0.02) as sim, client(sim) as ws:
        assert await recv(ws) == HEARTBEAT
        sim.stall()
        async with asyncio.timeout(1):
            while True:
                try:
                    await recv(ws, within=0.15)
                except TimeoutError:
                    break
        await sim.send_order()
        await sim.send_text('{"type":"message","data":"hello"}')
        await sim.send_binary(b"\x00\x01\x00\x03abc")
        # A liveness watchdog must see nothing at all while stalled.
        with pytest.raises(TimeoutError):
            await recv(ws, within=0.3)
        sim.stall(False)
        assert await recv(ws) == HEARTBEAT  # what was "sent" during the stall is lost
        await sim.send_order()
        assert (await next_text(ws))["type"] == "order"


async def test_connections_opened_while_stalled_stay_silent() -> None:
    async with simulator(heartbeat_interval=0.02) as sim:
        sim.stall()
        async with client(sim) as ws:
            with pytest.raises(TimeoutError):
                await recv(ws, within=0.2)
            sim.stall(False)
            assert await recv(ws) == HEARTBEAT


@pytest.mark.parametrize("code", [999, 1005, 1006, 1015, 2999, 5000])
async def test_close_refuses_codes_that_cannot_be_sent(code: int) -> None:
    async with simulator() as sim, client(sim):
        await sim.wait_for(lambda: bool(sim.connections))
        with pytest.raises(ValueError, match="close code"):
            await sim.close(code)
        assert sim.connections


async def test_history_lists_are_bounded() -> None:
    async with simulator(history_limit=3) as sim:
        sim.reject_next(4)
        for _ in range(4):
            with pytest.raises(InvalidStatus):
                await connect(sim.url + CONNECT_QUERY, open_timeout=2)
        async with client(sim) as ws:
            for token in range(5):
                await ws.send(json.dumps({"a": "subscribe", "v": [token]}))
            await sim.wait_for(lambda: bool(sim.received) and sim.received[-1][1]["v"] == [4])
        assert [h.status for h in sim.handshakes] == [403, 403, 101]
        assert [message["v"] for _, message in sim.received] == [[2], [3], [4]]
        assert isinstance(sim.handshakes, list)
        assert isinstance(sim.received, list)


async def test_market_forgets_tokens_nobody_subscribes_beyond_the_idle_limit() -> None:
    tokens = [INFY, RELIANCE, NIFTY, BANKNIFTY, NFO]

    def known() -> set[int]:
        return {token for token in tokens if token in sim.market}

    async with simulator(idle_token_limit=2) as sim:
        async with client(sim) as a:
            async with client(sim) as b:
                await a.send(json.dumps({"a": "subscribe", "v": tokens}))
                await b.send(json.dumps({"a": "subscribe", "v": [INFY]}))
                await ticks_matching(a, lambda ts: len(ts) == 5)
                await next_ticks(b)
                nifty = sim.market.instrument(NIFTY)
                await a.send(json.dumps({"a": "unsubscribe", "v": tokens[:4]}))
                # INFY is still b's; RELIANCE, NIFTY, BANKNIFTY are idle: the oldest goes.
                await sim.wait_for(lambda: RELIANCE not in sim.market)
                assert known() == {INFY, NIFTY, BANKNIFTY, NFO}
                # Within the limit a token keeps its walk: resubscribing continues it.
                await a.send(json.dumps({"a": "mode", "v": ["ltp", [NIFTY]]}))
                await ticks_matching(a, lambda ts: NIFTY in {t.instrument_token for t in ts})
                assert sim.market.instrument(NIFTY) is nifty
            await sim.wait_for(lambda: len(sim.connections) == 1)
            assert known() == {INFY, NIFTY, BANKNIFTY, NFO}  # INFY, BANKNIFTY idle: 2
        await sim.wait_for(lambda: not sim.connections)
        assert known() == {NIFTY, NFO}
        assert {token for token, _ in sim._entries} <= known()
        assert set(sim._stepped_at) <= known()


@pytest.mark.parametrize(
    "options", [{"max_tokens": 0}, {"history_limit": 0}, {"idle_token_limit": -1}]
)
def test_simulator_refuses_impossible_limits(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Simulator(**options)


async def test_state_is_forgotten_on_reconnect() -> None:
    async with simulator() as sim:
        async with client(sim) as ws:
            await ws.send(json.dumps({"a": "mode", "v": ["full", [INFY]]}))
            await next_ticks(ws)
            assert sim.subscriptions() == {INFY: "full"}
        await sim.wait_for(lambda: not sim.connections)
        assert sim.subscriptions() == {}
        async with client(sim) as ws:
            assert await recv(ws) == HEARTBEAT
            assert sim.subscriptions() == {}


async def test_connections_have_independent_subscriptions() -> None:
    async with simulator() as sim, client(sim) as a, client(sim) as b:
        await a.send(json.dumps({"a": "subscribe", "v": [INFY]}))
        await b.send(json.dumps({"a": "mode", "v": ["ltp", [NIFTY]]}))
        assert [(t.instrument_token, t.mode) for t in await next_ticks(a)] == [(INFY, "quote")]
        assert [(t.instrument_token, t.mode) for t in await next_ticks(b)] == [(NIFTY, "ltp")]
        assert sim.subscriptions() == {NIFTY: "ltp"}  # the most recent connection


async def test_wait_for_times_out() -> None:
    async with simulator() as sim:
        with pytest.raises(TimeoutError):
            await sim.wait_for(lambda: False, timeout=0.05)


# -- firehose ---------------------------------------------------------------------------------


async def test_firehose_frames_carry_their_number_and_report_send_times() -> None:
    sent: list[tuple[int, int, tuple[int, ...]]] = []
    tokens = [INFY, RELIANCE, NIFTY, NFO, BCD]
    async with (
        simulator(
            firehose=True,
            packets_per_frame=3,
            on_frame_sent=lambda n, ns, toks: sent.append((n, ns, toks)),
        ) as sim,
        client(sim) as ws,
    ):
        await ws.send(json.dumps({"a": "mode", "v": ["full", tokens]}))
        frames = [await next_ticks(ws) for _ in range(30)]
    assert all(len(frame) == 3 for frame in frames)
    by_number = {number: (ns, toks) for number, ns, toks in sent}
    seen: list[int] = []
    for frame in frames:
        numbers = {t.volume_traded for t in frame if isinstance(t, FullTick)}
        assert len(numbers) == 1  # every quote/full packet of a frame carries the same number
        number = numbers.pop()
        assert by_number[number][1] == tuple(t.instrument_token for t in frame)
        seen.append(number)
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen)
    # Round robin over the subscription list, wrapping around.
    order = [t.instrument_token for frame in frames[-10:] for t in frame]
    start = tokens.index(order[0])
    assert order == [tokens[(start + i) % len(tokens)] for i in range(len(order))]


async def test_firehose_respects_frames_per_second() -> None:
    async with (
        simulator(firehose=True, frames_per_second=20) as sim,
        client(sim) as ws,
    ):
        await ws.send(json.dumps({"a": "subscribe", "v": [INFY]}))
        await next_ticks(ws)
        with pytest.raises(TimeoutError):
            await next_ticks(ws, within=0.01)  # paced at 50 ms, not back to back
        await next_ticks(ws, within=1)
        assert sim.connections


async def test_big_subscriptions_are_split_into_frames() -> None:
    tokens = list(range(2_000_001, 2_000_001 + 25))
    async with simulator(packets_per_frame=10, tick_interval=60) as sim, client(sim) as ws:
        await ws.send(json.dumps({"a": "subscribe", "v": tokens}))
        frames = [await next_ticks(ws) for _ in range(3)]
        assert [len(frame) for frame in frames] == [10, 10, 5]
        assert [t.instrument_token for f in frames for t in f] == tokens
        assert sim.connections


# -- market model -------------------------------------------------------------------------------

MARKET_TOKENS = [INFY, RELIANCE, NIFTY, BANKNIFTY, USDINR_CDS, BCD, NFO, 3_001_007, 4_000_012]


def check_invariants(market: Market, token: int) -> None:
    inst = market.instrument(token)
    tick = inst.tick
    prices = [inst.ltp, inst.open, inst.high, inst.low, inst.close]
    prices += [p for q, p, _ in inst.bids + inst.asks if q]  # empty levels are all zero
    assert all(p % tick == 0 and 0 < p < 2**31 for p in prices)
    assert inst.high >= max(inst.open, inst.ltp)
    assert inst.low <= min(inst.open, inst.ltp)
    assert 0.79 * inst.close <= inst.ltp <= 1.21 * inst.close
    full = market.tick(token, "full")
    assert full.last_price == inst.ltp / divisor_of(token)
    assert encode_packet(full)  # every value fits the wire
    if is_index(token):
        assert isinstance(full, IndexFullTick)
        assert not full.tradable
        assert inst.volume == 0
        return
    assert isinstance(full, FullTick)
    assert len(full.depth.buy) == len(full.depth.sell) == 5
    # The quoted levels first, then empty ones (all zero) in a thin book.
    quoted = inst.levels
    assert 1 <= quoted <= 5
    empty = DepthLevel(0, 0.0, 0)
    assert full.depth.buy[quoted:] == full.depth.sell[quoted:] == [empty] * (5 - quoted)
    bids, asks = full.depth.buy[:quoted], full.depth.sell[:quoted]
    assert all(a.price > b.price for a, b in itertools.pairwise(bids))
    assert all(a.price < b.price for a, b in itertools.pairwise(asks))
    assert bids[0].price <= full.last_price <= asks[0].price
    assert bids[0].price < asks[0].price
    assert all(0 < level.orders <= level.quantity for level in bids + asks)
    assert 0 < full.volume_traded < 2**31
    assert full.last_traded_quantity > 0
    # VWAP of trades at prices within the day's range (the seeded volume traded at the open).
    assert inst.low <= inst.average_price <= inst.high
    assert full.ohlc.low <= full.average_traded_price <= full.ohlc.high
    if segment_of(token) in DERIVATIVE_SEGMENTS:
        assert full.oi_day_low <= full.oi <= full.oi_day_high
        assert full.oi > 0
    else:
        assert full.oi == full.oi_day_high == full.oi_day_low == 0


def test_one_derivative_in_five_has_a_thin_book() -> None:
    market = Market(seed=3)
    now = 1_718_176_569.0
    options = [(n << 8) | 2 for n in range(10_000, 10_500)]  # NFO
    levels = [market.instrument(token, now).levels for token in options]
    thin = [n for n in levels if n < 5]
    assert 0.1 < len(thin) / len(options) < 0.3
    assert set(thin) == {1, 2, 3, 4}
    for token in options[:50]:
        check_invariants(market, token)
        packet = encode_packet(market.tick(token, "full"))  # empty levels on the wire too
        assert decode_frame(encode_raw_frame([packet])) == [market.tick(token, "full")]
    # Equities and indices keep full books.
    assert {market.instrument(t, now).levels for t in (INFY, RELIANCE, NIFTY)} == {5}


def test_market_invariants_hold_over_many_steps() -> None:
    market = Market(seed=1)
    now = 1_718_176_569.0
    volumes: dict[int, int] = {}
    tokens = MARKET_TOKENS + [5_000_001 + 256 * i for i in range(30)]
    for step in range(400):
        for token in tokens:
            market.step(token, now + step)
            check_invariants(market, token)
            inst = market.instrument(token)
            assert inst.volume >= volumes.get(token, 0)
            volumes[token] = inst.volume
            assert inst.exchange_timestamp == int(now + step)


@settings(max_examples=40, deadline=None)
@given(
    token=st.integers(min_value=0, max_value=2**32 - 1),
    seed=st.integers(min_value=0, max_value=2**64),
    steps=st.integers(min_value=0, max_value=60),
)
def test_market_invariants_for_any_token(token: int, seed: int, steps: int) -> None:
    market = Market(seed=seed)
    for step in range(steps):
        market.step(token, 1_700_000_000 + step)
    check_invariants(market, token)


@pytest.mark.parametrize(
    ("token", "divisor", "tick"),
    [(INFY, 100, 5), (NIFTY, 100, 5), (USDINR_CDS, 10**7, 25_000), (BCD, 10**4, 25)],
)
def test_segment_divisors_and_tick_sizes(token: int, divisor: int, tick: int) -> None:
    assert (divisor_of(token), tick_size_of(token)) == (divisor, tick)
    market = Market(seed=3)
    for _ in range(50):
        inst = market.step(token, 1_700_000_000)
        raw = round(market.tick(token, "ltp").last_price * divisor)
        assert raw % tick == 0
        assert raw == inst.ltp


def test_market_ticks_round_trip_through_the_codec() -> None:
    market = Market(seed=5)
    for token in MARKET_TOKENS:
        market.step(token, 1_718_176_569)
        for mode in ("ltp", "quote", "full"):
            tick = market.tick(token, mode)
            packet = encode_packet(tick)
            assert len(packet) == LENGTHS[(is_index(token), mode)]
            frame = len(packet).to_bytes(2, "big")
            assert decode_frame(b"\x00\x01" + frame + packet) == [tick]


def test_market_forget_drops_a_token_and_replays_it_from_the_open() -> None:
    market = Market(seed=4)
    fresh = market.instrument(INFY, 1_700_000_000)
    opening = (fresh.ltp, fresh.volume, fresh.bids)
    for step in range(10):
        market.step(INFY, 1_700_000_000 + step)
    market.step(NIFTY, 1_700_000_000)
    assert len(market) == 2
    market.forget(INFY)
    market.forget(999)  # unknown tokens are ignored
    assert INFY not in market
    assert len(market) == 1
    again = market.instrument(INFY, 1_700_000_000)
    assert (again.ltp, again.volume, again.bids) == opening


def test_market_is_reproducible_per_token_whatever_else_is_traded() -> None:
    def walk(seed: int, tokens: list[int]) -> list[float]:
        market = Market(seed=seed)
        prices = []
        for step in range(30):
            for token in tokens:
                market.step(token, 1_700_000_000 + step)
            prices.append(market.tick(INFY, "ltp").last_price)
        return prices

    assert walk(9, [INFY]) == walk(9, [NIFTY, INFY, RELIANCE])
    assert walk(9, [INFY]) != walk(10, [INFY])
    assert len(set(walk(9, [INFY]))) > 5  # it does move


# -- CLI ----------------------------------------------------------------------------------------


@contextmanager
def cli_process(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.simulator", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def connect_when_up(url: str) -> ClientConnection:
    async with asyncio.timeout(10):
        while True:
            try:
                return await connect(url, open_timeout=2)
            except OSError:
                await asyncio.sleep(0.05)


async def test_cli_serves_rejects_and_stops_cleanly_on_sigterm() -> None:
    port = free_port()
    secret = "s3cret-access-token"
    with cli_process(
        "--port",
        str(port),
        "--access-token",
        secret,
        "--reject-first",
        "1",
        "--reject-status",
        "503",
        "--order-every",
        "0.05",
    ) as proc:
        url = f"ws://127.0.0.1:{port}/?api_key=k&access_token={secret}"
        with pytest.raises(InvalidStatus) as caught:
            await connect_when_up(url)
        assert caught.value.response.status_code == 503
        ws = await connect_when_up(url)
        assert (await next_text(ws))["type"] == "order"
        await ws.close()
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(proc.communicate, timeout=10)
    assert proc.returncode == 0
    assert secret.encode() not in output
    assert b"simulator ready" in output


def test_cli_rejects_enctoken_without_echoing_it() -> None:
    with cli_process("--enctoken", "no-colon-secret") as proc:
        output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert b"USER_ID:ENCTOKEN" in output
    assert b"no-colon-secret" not in output


def parse_cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_close_options_and_their_defaults() -> None:
    args = parse_cli()
    assert (args.close_every, args.close_code) == (None, 1000)
    args = parse_cli("--close-every", "2.5", "--close-code", "4000")
    assert (args.close_every, args.close_code) == (2.5, 4000)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "--close-every" in parser.format_help()
    assert "--close-code" in parser.format_help()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-tokens", "0"], "--max-tokens: must be at least 1"),
        (["--max-tokens", "-3"], "--max-tokens: must be at least 1"),
        (["--max-tokens", "many"], "--max-tokens: not an integer"),
        (["--close-code", "1006"], "--close-code: cannot be sent"),
        (["--close-code", "5000"], "--close-code: cannot be sent"),
        (["--close-code", "x"], "--close-code: not an integer"),
    ],
)
def test_cli_refuses_bad_limits_and_close_codes(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_cli(*argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


async def test_cli_close_every_closes_connections_with_the_code() -> None:
    port = free_port()
    with cli_process("--port", str(port), "--close-every", "0.3", "--close-code", "1011") as proc:
        ws = await connect_when_up(f"ws://127.0.0.1:{port}/?api_key=k&access_token=t")
        await closed_by_server(ws)
        assert ws.close_code == 1011
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(proc.communicate, timeout=10)
    assert proc.returncode == 0
    assert b"fault: closed connections" in output
