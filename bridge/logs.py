"""Logging set-up: structlog for our events, the same renderer for stdlib loggers, secrets masked.

One pipeline for everything: our structlog events and the stdlib records of ``websockets``,
``redis`` and ``asyncio`` go through one ``ProcessorFormatter`` on one stream, so a reconnect
line from ``websockets.client`` comes out as the same JSON as ours. JSON lines when the stream
is not a terminal (containers, files), a console layout on a terminal.

Redaction runs last before rendering, on every record, because a secret can arrive by any path:
a mis-named keyword, an exception message quoting a URL with ``access_token=``, a Redis URL with
its password. Tracebacks are rendered to text before redaction for the same reason, which costs
the console renderer its pretty tracebacks.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from datetime import date, datetime
from typing import Any, Final, Literal, TextIO

import orjson
import structlog
from pydantic import SecretBytes, SecretStr
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "FOREIGN_LOGGERS",
    "LOG_LEVELS",
    "MASK",
    "configure_logging",
    "logging_configured",
    "redact_secrets",
    "redact_text",
]

MASK: Final = "***"
LOG_LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
#: Chatty libraries kept at WARNING unless the level is debug.
FOREIGN_LOGGERS: Final = ("websockets", "redis", "asyncio")

_SECRET_KEY: Final = re.compile(
    r"token|secret|password|passwd|authori[sz]ation|cookie|credential", re.IGNORECASE
)
#: Keys that match the pattern above but hold instrument tokens, which are public numbers.
_PUBLIC_KEYS: Final = frozenset({"instrument_token", "instrument_tokens", "tokens"})
_TEXT_RULES: Final = (
    # key=value / "key": "value" pairs, as in query strings, env dumps and reprs of dicts.
    re.compile(
        r"""((?:access_token|enctoken|api_secret|request_token|refresh_token|password|passwd)"""
        r"""["']?\s*[:=]\s*["']?)([^\s"'&,;}<>]+)""",
        re.IGNORECASE,
    ),
    # Kite's REST header: "Authorization: token api_key:access_token" (or enctoken ...).
    re.compile(r"(authorization[\"']?\s*[:=]\s*[\"']?(?:token|enctoken|bearer)\s+)(\S+)", re.I),
)
#: The start of a URL's userinfo (``redis://``, ``wss://user:``...), matched in the text before
#: the last "@" of a line. A plain user name followed by ":" stays readable; any other userinfo
#: (a user name with "@", "/" or a space) is masked whole. The look-behind starts a scheme at
#: a word start only, so a long run of letters costs linear rather than quadratic time.
_URL_USERINFO: Final = re.compile(
    r"((?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://(?:[^\s:/@]*:)?).*\Z", re.IGNORECASE | re.DOTALL
)
_HANDLER_MARK: Final = "_bridge_log_handler"


def _mask_userinfo(text: str) -> str:
    """Mask a URL's password: everything from ``scheme://user:`` to the LAST "@" of the line.

    urllib, and so redis-py, read the password up to the last "@" of the netloc, and people do
    write "@", "/" and spaces unescaped in passwords: stopping at the first "@" or at a space
    would print the rest. Over-masking (a host, a port, a later e-mail address on the same line)
    is the price, and a fair one.
    """
    if "@" not in text:
        return text
    lines = text.split("\n")
    for index, line in enumerate(lines):
        at = line.rfind("@")
        if at >= 0:
            head = _URL_USERINFO.sub(lambda match: match.group(1) + MASK, line[:at], count=1)
            lines[index] = head + line[at:]
    return "\n".join(lines)


def redact_text(text: str) -> str:
    """Mask credentials inside free text: ``access_token=``/``enctoken=`` values, URL passwords."""
    for rule in _TEXT_RULES:
        text = rule.sub(lambda match: match.group(1) + MASK, text)
    return _mask_userinfo(text)


def _is_public_number(value: object) -> bool:
    if isinstance(value, int):
        return True
    return isinstance(value, list | tuple | set | frozenset) and all(
        isinstance(item, int) for item in value
    )


def _redact(key: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | float | datetime | date):
        return value
    if _SECRET_KEY.search(key) and key.lower() not in _PUBLIC_KEYS:
        return value if _is_public_number(value) else MASK
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, SecretStr | SecretBytes):
        return MASK
    if isinstance(value, Mapping):
        return {str(k): _redact(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(key, item) for item in value]
    # Anything else is rendered as text, so redact the text it will render as.
    return redact_text(str(value))


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: mask secret-looking keys and credentials inside values."""
    return {key: _redact(key, value) for key, value in event_dict.items()}


_FIRST_KEYS: Final = ("timestamp", "level", "logger", "event")


def _json_lines(event_dict: MutableMapping[str, Any], **kwargs: Any) -> str:
    """orjson, with the fixed keys first so the lines read well with ``jq`` or by eye."""
    ordered = {key: event_dict.pop(key) for key in _FIRST_KEYS if key in event_dict}
    ordered.update(event_dict)
    return orjson.dumps(ordered, **kwargs).decode()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def logging_configured() -> bool:
    """Whether :func:`configure_logging` has set up the root logger in this process."""
    return any(getattr(handler, _HANDLER_MARK, False) for handler in logging.getLogger().handlers)


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Route structlog and stdlib logging to ``stream`` (default: ``sys.stderr``).

    ``fmt="auto"`` picks the console layout on a terminal and JSON lines otherwise. Calling it
    again replaces the previous set-up (loggers are not cached, so reconfiguring takes effect).
    """
    numeric = LOG_LEVELS.get(level.strip().lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
    out = sys.stderr if stream is None else stream
    tty = _is_tty(out)
    renderer: Processor
    if fmt == "console" or (fmt == "auto" and tty):
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_json_lines)

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_secrets,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    foreign_level = logging.NOTSET if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    for name in FOREIGN_LOGGERS:
        logging.getLogger(name).setLevel(foreign_level)

    structlog.configure(
        processors=[
            structlog.stdlib.PositionalArgumentsFormatter(),
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Not cached: tests and the CLI reconfigure, and cached loggers would ignore that.
        cache_logger_on_first_use=False,
    )
