"""Where the feed connects and how it says who it is: endpoint URLs, the credential query string,
and the redaction that keeps those credentials out of every log line.

Kite takes its credentials in the websocket URL's query string (kite-protocol.md §1), so the
URL itself is a secret: it is built here, percent-encoded as Kite's own clients do, and shown
anywhere only with the values masked.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final
from urllib.parse import quote, urlsplit

from websockets.exceptions import InvalidURI
from websockets.uri import parse_uri

__all__ = [
    "CLIENT_LOGGER",
    "DEFAULT_KITE_CONNECT_URL",
    "DEFAULT_KITE_WEB_URL",
    "RedactingAdapter",
    "Secret",
    "base_url",
    "check_url",
    "query_string",
    "redact_query",
]

DEFAULT_KITE_CONNECT_URL: Final = "wss://ws.kite.trade"
DEFAULT_KITE_WEB_URL: Final = "wss://ws.zerodha.com/"

_SECRET_QUERY = re.compile(r"((?:access_token|enctoken)=)[^&\s\"']+")


def redact_query(text: str) -> str:
    """Mask the credential values of a query string wherever it appears in ``text``."""
    return _SECRET_QUERY.sub(r"\1***", text)


class RedactingAdapter(logging.LoggerAdapter[logging.Logger]):
    """websockets logs the request line at DEBUG, query string (our credentials) included.

    The simulator's server logs through one too: tokens pointed at it may be real."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            clean = tuple(redact_query(arg) if isinstance(arg, str) else arg for arg in args)
            text = redact_query(msg) if isinstance(msg, str) else msg
            self.logger.log(level, text, *clean, **kwargs)


CLIENT_LOGGER: Final = RedactingAdapter(logging.getLogger("websockets.client"), {})


class Secret:
    """Holds a credential so that no repr, log line or attribute dump shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"


def check_url(url: str) -> str:
    """``url`` if it can be the feed's endpoint (``KITE_WS_URL``), else a ``ValueError`` saying
    why; the configuration checks with it too, so a bad URL is a config error, not a crash."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("url must not carry a query or fragment: KiteFeed adds the credentials")
    try:
        parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(f"url is not a websocket URL: {exc}") from None
    return url


def base_url(url: str | None, default: str) -> str:
    return default if url is None else check_url(url)


def query_string(params: list[tuple[str, str | None]]) -> str:
    """Percent-encode like aiohttp/yarl (kite-protocol.md §1.2): "+" -> %2B, "=" -> %3D, "/" kept.

    A raw "+" would reach the server as a space and the handshake fail with 400. ``None`` stands
    for a redacted secret and renders as a literal ``***``.
    """
    return "&".join(
        f"{name}={'***' if value is None else quote(value, safe='/')}" for name, value in params
    )
