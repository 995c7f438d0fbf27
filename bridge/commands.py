"""Control commands: parse, validate and apply them to the desired subscription set.

Pure (no I/O) so that every rule of CONTRACT §4 is tested directly and the consumer in
``bridge.control`` stays a thin loop. Operators type these by hand in ``redis-cli``, so every
rejection carries a reason written for them, and anything that could be read as two different
requests is rejected rather than guessed at.

Decisions beyond the contract:

* Tokens are decimal ``1..4294967295`` (an unsigned 32-bit instrument token; ``0`` is never a
  real instrument). In plain text, commas separate tokens like spaces do. In JSON, tokens are
  integers or strings of decimal digits (``true``/``false`` and floats are rejected).
* A token repeated within one command counts once.
* JSON keys other than ``id``, ``action``, ``mode``, ``tokens`` and ``all`` are rejected, so a
  typo such as ``"mdoe"`` cannot silently fall back to the default mode; so is a key given
  twice, which JSON parsers would silently resolve to the last value.
* A command is at most 256 KiB.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, cast, get_args

import orjson

from bridge.kite.records import Mode

__all__ = [
    "ACTIONS",
    "MAX_COMMAND_BYTES",
    "MAX_TOKENS",
    "MODES",
    "Action",
    "Command",
    "CommandError",
    "apply_command",
    "parse_command",
    "parse_mode",
    "parse_token",
]

Action: TypeAlias = Literal["subscribe", "unsubscribe", "mode", "list"]

ACTIONS: Final[tuple[Action, ...]] = get_args(Action)
MODES: Final[tuple[Mode, ...]] = get_args(Mode)
#: Kite's limit of instruments per websocket connection.
MAX_TOKENS: Final = 3000
#: Longest accepted command: 3000 tokens take ~33 KB as compact JSON and ~66 KB pretty-printed
#: as strings (``json.dumps(..., indent=4)``), so 4x that, and still small enough to never hurt
#: the consumer. Longer pushes are not parsed at all (no reply: their id is not read).
MAX_COMMAND_BYTES: Final = 256 * 1024
MAX_TOKEN: Final = 2**32 - 1

_ID_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TOKEN_RE: Final = re.compile(r"[0-9]{1,10}")  # ASCII only: str.isdigit() also takes "٣"
_SEPARATORS: Final = re.compile(r"[\s,]+")
_JSON_KEYS: Final = frozenset({"id", "action", "mode", "tokens", "all"})


class CommandError(ValueError):
    """A command was rejected; ``reason`` is written for the operator who sent it.

    ``id`` is the command's id when one could be read, so that the rejection still reaches
    ``<ns>:reply:<id>``.
    """

    def __init__(self, reason: str, id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.id = id


@dataclass(frozen=True)
class Command:
    """One validated command. ``mode`` is resolved for ``subscribe`` (default mode applied)."""

    action: Action
    tokens: tuple[int, ...] = ()
    mode: Mode | None = None
    all: bool = False
    id: str | None = None


def _show(value: object) -> str:
    """Quote user input for a reason, short enough to keep the reason one readable line."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 40:
        text = text[:40] + "..."
    return repr(text) if isinstance(value, str) else text


def parse_mode(value: object) -> Mode:
    """``ltp``, ``quote`` or ``full``, in any case."""
    if isinstance(value, str) and value.strip().lower() in MODES:
        return cast(Mode, value.strip().lower())
    raise CommandError(f"unknown mode {_show(value)}: expected ltp, quote or full")


def parse_token(value: object) -> int:
    """An instrument token: an int or a string of decimal digits, in ``1..4294967295``."""
    token: int
    if isinstance(value, int) and not isinstance(value, bool):
        token = value
    elif isinstance(value, str) and _TOKEN_RE.fullmatch(value):
        token = int(value)
    else:
        raise CommandError(f"bad token {_show(value)}: expected a decimal instrument token")
    if not 1 <= token <= MAX_TOKEN:
        raise CommandError(f"bad token {token}: expected 1..{MAX_TOKEN}")
    return token


def _tokens(values: Iterable[object]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(parse_token(value) for value in values))


def _build(
    action: str,
    mode: Mode | None,
    tokens: tuple[int, ...],
    all_: bool,
    default_mode: Mode,
) -> Command:
    """Check that the arguments fit the action; the one place both syntaxes' rules live."""
    if action not in ACTIONS:
        raise CommandError(
            f"unknown command {_show(action)}: expected subscribe, unsubscribe, mode or list"
        )
    verb = action
    if verb in ("unsubscribe", "list") and mode is not None:
        raise CommandError(f"{verb} takes no mode")
    if all_ and verb != "unsubscribe":
        raise CommandError(f"{verb} does not take 'all'")
    if verb == "list":
        if tokens:
            raise CommandError("list takes no tokens")
        return Command("list")
    if verb == "unsubscribe" and all_:
        if tokens:
            raise CommandError("unsubscribe takes either 'all' or tokens, not both")
        return Command("unsubscribe", all=True)
    if not tokens:
        usage = {
            "subscribe": "subscribe [ltp|quote|full] TOKEN...",
            "mode": "mode ltp|quote|full TOKEN...",
            "unsubscribe": "unsubscribe TOKEN... | unsubscribe all",
        }[verb]
        raise CommandError(f"{verb} needs instrument tokens: {usage}")
    if verb == "mode" and mode is None:
        raise CommandError("mode needs a mode: mode ltp|quote|full TOKEN...")
    if verb == "subscribe" and mode is None:
        mode = default_mode
    return Command(verb, tokens, mode)


def _parse_text(text: str, default_mode: Mode) -> Command:
    verb, *rest = text.split(maxsplit=1)  # text is stripped and not empty
    args = [part for part in _SEPARATORS.split(rest[0]) if part] if rest else []
    action = verb.lower()
    mode: Mode | None = None
    # A leading word of letters is meant as a mode: say "unknown mode", not "bad token".
    if action in ("subscribe", "mode") and args and args[0].isalpha():
        mode = parse_mode(args.pop(0))
    if action == "unsubscribe" and [arg.lower() for arg in args] == ["all"]:
        return _build(action, None, (), True, default_mode)
    return _build(action, mode, _tokens(args), False, default_mode)


def _json_id(obj: Mapping[str, Any]) -> str | None:
    raw_id = obj.get("id")
    if raw_id is None:
        return None
    if isinstance(raw_id, str) and _ID_RE.fullmatch(raw_id):
        return raw_id
    raise CommandError(f"bad id {_show(raw_id)}: at most 64 characters of A-Z a-z 0-9 _ . -")


def _duplicate_keys(text: str) -> tuple[str | None, bool]:
    """The first key given twice in any object of ``text`` (valid JSON), or None; and whether
    the top-level object gives ``id`` twice (the object hook sees the top level last)."""
    repeated: list[list[str]] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        counts = Counter(key for key, _ in pairs)
        repeated.append([key for key, _ in pairs if counts[key] > 1])
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    first = next((keys[0] for keys in repeated if keys), None)
    return first, bool(repeated) and "id" in repeated[-1]


def _parse_json(text: str, default_mode: Mode) -> Command:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CommandError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CommandError("a JSON command must be an object")
    duplicate, two_ids = _duplicate_keys(text)
    if two_ids:  # which one to answer is a guess: neither is
        raise CommandError("duplicate key 'id': give each key once")
    command_id = _json_id(obj)
    if duplicate is not None:
        # {"action": "subscribe", ..., "action": "unsubscribe"}: JSON parsers keep the last,
        # the operator may have meant the first. Refuse rather than guess.
        raise CommandError(f"duplicate key {_show(duplicate)}: give each key once", command_id)
    try:
        unknown = sorted(set(obj) - _JSON_KEYS)
        if unknown:
            raise CommandError(
                f"unknown key {_show(unknown[0])}: expected id, action, mode, tokens, all"
            )
        action = obj.get("action")
        if not isinstance(action, str):
            raise CommandError("missing 'action': subscribe, unsubscribe, mode or list")
        raw_mode = obj.get("mode")
        mode = None if raw_mode is None else parse_mode(raw_mode)
        raw_tokens = obj.get("tokens")
        if raw_tokens is None:
            raw_tokens = []
        if not isinstance(raw_tokens, list):
            raise CommandError("'tokens' must be a list of instrument tokens")
        all_ = obj.get("all", False)
        if not isinstance(all_, bool):
            raise CommandError("'all' must be true or false")
        command = _build(action.lower(), mode, _tokens(raw_tokens), all_, default_mode)
    except CommandError as exc:
        raise CommandError(exc.reason, command_id) from None
    return Command(command.action, command.tokens, command.mode, command.all, command_id)


def parse_command(raw: str | bytes, default_mode: Mode = "quote") -> Command:
    """Parse one command as pushed to ``<ns>:control``: plain text or a JSON object.

    Raises:
        CommandError: for anything that is not exactly one valid command.
    """
    if len(raw) > MAX_COMMAND_BYTES:
        unit = "bytes" if isinstance(raw, bytes) else "characters"
        raise CommandError(f"command too long: {len(raw)} {unit}, the limit is {MAX_COMMAND_BYTES}")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("command is not valid UTF-8") from None
    text = raw.strip()
    if not text:
        raise CommandError("empty command")
    if text.startswith("{"):
        return _parse_json(text, default_mode)
    return _parse_text(text, default_mode)


def apply_command(
    current: Mapping[int, Mode], command: Command, max_tokens: int = MAX_TOKENS
) -> dict[int, Mode]:
    """Return the desired set after ``command``; ``current`` is never modified.

    All-or-nothing: either every token of the command is applied, or ``CommandError`` is raised.

    Raises:
        CommandError: ``mode`` names a token that is not subscribed, or ``subscribe`` would
            leave more than ``max_tokens`` tokens subscribed.
    """
    result = dict(current)
    if command.action == "subscribe":
        assert command.mode is not None  # parse_command resolves the default mode
        result.update(dict.fromkeys(command.tokens, command.mode))
        if len(result) > max_tokens:
            raise CommandError(
                f"subscribe would leave {len(result)} tokens subscribed, "
                f"above the limit of {max_tokens}",
                command.id,
            )
    elif command.action == "mode":
        assert command.mode is not None  # parse_command requires it
        missing = [token for token in command.tokens if token not in current]
        if missing:
            shown = ", ".join(map(str, missing[:5]))
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CommandError(
                f"mode: not subscribed: {shown}{more}; subscribe them first", command.id
            )
        result.update(dict.fromkeys(command.tokens, command.mode))
    elif command.action == "unsubscribe":
        if command.all:
            result.clear()
        for token in command.tokens:
            result.pop(token, None)
    return result
