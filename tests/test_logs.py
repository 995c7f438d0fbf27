"""Logging: JSON or console, stdlib records through the same renderer, secrets never shown."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from bridge.logs import MASK, configure_logging, logging_configured, redact_text

SECRET = "Q7SECRETVALUE42"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    foreign = {name: logging.getLogger(name).level for name in ("websockets", "redis", "asyncio")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, foreign_level in foreign.items():
        logging.getLogger(name).setLevel(foreign_level)
    structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_utc_timestamp_level_and_logger() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", out)  # not a terminal: JSON
    structlog.get_logger("bridge.feed").info("connected", attempt=2)
    (line,) = json_lines(out)
    assert list(line)[:4] == ["timestamp", "level", "logger", "event"]
    assert line["level"] == "info"
    assert line["logger"] == "bridge.feed"
    assert line["event"] == "connected"
    assert line["attempt"] == 2
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)


def test_console_on_a_terminal_or_when_asked() -> None:
    for stream, fmt in ((Terminal(), "auto"), (io.StringIO(), "console")):
        configure_logging("info", fmt, stream)  # type: ignore[arg-type]
        structlog.get_logger("bridge.feed").info("connected", attempt=2)
        text = re.sub(r"\x1b\[[0-9;]*m", "", stream.getvalue())  # colours on a terminal
        assert "connected" in text
        assert "attempt=2" in text
        assert not text.startswith("{")


def test_json_even_on_a_terminal_when_asked() -> None:
    out = Terminal()
    configure_logging("info", "json", out)
    structlog.get_logger("x").info("hello")
    assert json_lines(out)[0]["event"] == "hello"


def test_level_filters_our_events() -> None:
    out = io.StringIO()
    configure_logging("WARNING", "json", out)
    log = structlog.get_logger("bridge.x")
    log.info("hidden")
    log.warning("shown")
    assert [line["event"] for line in json_lines(out)] == ["shown"]


def test_stdlib_records_use_the_same_renderer() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    logging.getLogger("websockets.client").warning("connect failed; reconnecting in %s s", 3.1)
    logging.getLogger("websockets.client").info("chatty detail")
    logging.getLogger("bridge.service").info("own stdlib info")
    lines = json_lines(out)
    assert [(line["logger"], line["level"], line["event"]) for line in lines] == [
        ("websockets.client", "warning", "connect failed; reconnecting in 3.1 s"),
        ("bridge.service", "info", "own stdlib info"),
    ]


def test_debug_lets_foreign_libraries_through() -> None:
    out = io.StringIO()
    configure_logging("debug", "json", out)
    logging.getLogger("redis.connection").debug("socket detail")
    assert json_lines(out)[0]["event"] == "socket detail"


def test_reconfiguring_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", first)
    configure_logging("info", "json", second)
    assert logging_configured()
    structlog.get_logger("x").info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging("loud")


# -- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_secret_logged_by_mistake_never_appears(fmt: Any) -> None:
    out = io.StringIO()
    configure_logging("debug", fmt, out)
    log = structlog.get_logger("bridge.oops")
    log.info("by key", access_token=SECRET, enctoken=SECRET, api_secret=SECRET, password=SECRET)
    log.info("nested", settings={"kite_access_token": SECRET, "nested": {"token": SECRET}})
    log.info("secret type", value=SecretStr(SECRET))
    log.info(f"in the message wss://ws.kite.trade?api_key=k&access_token={SECRET}")
    log.info(
        "in a value", url=f"wss://ws.zerodha.com/?api_key=kitefront&user_id=AB&enctoken={SECRET}"
    )
    log.info("redis", url=f"redis://default:{SECRET}@redis:6379/0")
    log.info("redis @", url=f"redis://default:p@ss{SECRET}@127.0.0.1:6379/6")
    log.info(f"redis space redis://:pa ss{SECRET}@h:6379/0 in the message")
    log.info("list", urls=[f"rediss://:{SECRET}@h"])
    log.info("header", headers=f"Authorization: token key:{SECRET}")
    log.info("positional %s", f"enctoken={SECRET}")
    try:
        raise ConnectionError(f"handshake to wss://x?access_token={SECRET} failed")
    except ConnectionError:
        log.exception("crashed")
    logging.getLogger("websockets.client").warning("retry wss://x/?enctoken=%s", SECRET)
    logging.getLogger("redis").error("cannot connect to redis://u:%s@h", SECRET)
    text = out.getvalue()
    assert text.count("\n") >= 14
    assert SECRET not in text
    assert SECRET[:6] not in text  # not even in part
    assert MASK in text


def test_instrument_tokens_stay_readable() -> None:
    out = io.StringIO()
    configure_logging("info", "json", out)
    structlog.get_logger("x").info("subscribed", instrument_token=256265, tokens=[1, 2], token=5)
    (line,) = json_lines(out)
    assert (line["instrument_token"], line["tokens"], line["token"]) == (256265, [1, 2], 5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "wss://ws.kite.trade?api_key=k&access_token=abc",
            "wss://ws.kite.trade?api_key=k&access_token=***",
        ),
        (
            "?user_id=AB&enctoken=a%2Bb%3D%3D&agent=kite3-web",
            "?user_id=AB&enctoken=***&agent=kite3-web",
        ),
        ("redis://user:pa55@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pa55@host", "redis://:***@host"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        # The password runs to the LAST "@" of the line (as urllib and redis-py read it), spaces
        # and "/" included: better over-masked than leaked.
        ("redis://default:p@ss@127.0.0.1:6379/6", "redis://default:***@127.0.0.1:6379/6"),
        ("redis://:pa ss@h:abc/0", "redis://:***@h:abc/0"),
        ("redis://u:pa/ss@h/0", "redis://u:***@h/0"),
        ("url=redis://us@er:pw@h:6379 up", "url=redis://***@h:6379 up"),  # odd user: all masked
        ("a redis://:p1@h1 b rediss://u:p2@h2 c", "a redis://:***@h2 c"),
        ("redis://u:p@h\nmail ops@example.com", "redis://u:***@h\nmail ops@example.com"),
        ("KITE_ACCESS_TOKEN=abc", "KITE_ACCESS_TOKEN=***"),
        ("{'password': 'x1'}", "{'password': '***'}"),
        ("instrument_token=256265", "instrument_token=256265"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@given(st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789+/=%@: ", min_size=8, max_size=40))
def test_url_passwords_are_always_masked_whatever_they_hold(secret: str) -> None:
    """Not even in part: no run of 4 characters of the password (none of them "@") survives."""
    for template in (
        "redis://user:{}@host:6379/0",
        "rediss://:{}@host",
        "connecting to redis://default:{}@127.0.0.1:6379/6 now",
        "wss://u:{}@ws.example.com/feed",
    ):
        masked = redact_text(template.format(secret))
        assert MASK in masked
        parts = (secret[i : i + 4] for i in range(len(secret) - 3))
        leaked = [part for part in parts if "@" not in part and part not in template]
        assert not [part for part in leaked if part in masked], masked


@given(st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789+/=%", min_size=8, max_size=40))
def test_query_secrets_are_always_masked(secret: str) -> None:
    for template in (
        "wss://ws.kite.trade?api_key=k&access_token={}&x=1",
        "wss://ws.zerodha.com/?enctoken={} rest",
        "redis://user:{}@host:6379",
    ):
        assert secret not in redact_text(template.format(secret))
