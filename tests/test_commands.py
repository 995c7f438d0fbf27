"""Control commands (CONTRACT §4): grammar, rejections, all-or-nothing application."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.commands import (
    ACTIONS,
    MAX_COMMAND_BYTES,
    MAX_TOKENS,
    MODES,
    Command,
    CommandError,
    apply_command,
    parse_command,
)
from bridge.kite.records import Mode


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("subscribe full 256265 408065", Command("subscribe", (256265, 408065), "full")),
        ("subscribe 256265", Command("subscribe", (256265,), "quote")),
        ("  SUBSCRIBE   Ltp\t1,2 ,3\n", Command("subscribe", (1, 2, 3), "ltp")),
        ("subscribe quote 5 5 6 5", Command("subscribe", (5, 6), "quote")),
        ("subscribe 4294967295", Command("subscribe", (4294967295,), "quote")),
        ("mode ltp 408065", Command("mode", (408065,), "ltp")),
        ("MODE FULL 1 2", Command("mode", (1, 2), "full")),
        ("unsubscribe 408065", Command("unsubscribe", (408065,))),
        ("unsubscribe all", Command("unsubscribe", all=True)),
        ("Unsubscribe ALL", Command("unsubscribe", all=True)),
        ("list", Command("list")),
        (b"LIST\r\n", Command("list")),
        (b"subscribe full 256265", Command("subscribe", (256265,), "full")),
    ],
)
def test_plain_text_commands(raw: str | bytes, expected: Command) -> None:
    assert parse_command(raw) == expected


def test_subscribe_without_mode_uses_the_default_mode() -> None:
    assert parse_command("subscribe 1 2", default_mode="full") == Command(
        "subscribe", (1, 2), "full"
    )
    assert parse_command("subscribe ltp 1", default_mode="full").mode == "ltp"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            {"id": "a1", "action": "subscribe", "mode": "full", "tokens": [256265]},
            Command("subscribe", (256265,), "full", id="a1"),
        ),
        ({"action": "SUBSCRIBE", "tokens": [1, "2"]}, Command("subscribe", (1, 2), "quote")),
        ({"action": "mode", "mode": "LTP", "tokens": [7]}, Command("mode", (7,), "ltp")),
        ({"action": "unsubscribe", "tokens": [7], "mode": None}, Command("unsubscribe", (7,))),
        (
            {"id": "x.Y_z-9", "action": "unsubscribe", "all": True},
            Command("unsubscribe", all=True, id="x.Y_z-9"),
        ),
        ({"id": "l", "action": "list"}, Command("list", id="l")),
        ({"action": "list", "tokens": []}, Command("list")),
        ({"id": "a" * 64, "action": "list"}, Command("list", id="a" * 64)),
    ],
)
def test_json_commands(payload: dict[str, object], expected: Command) -> None:
    assert parse_command(orjson.dumps(payload)) == expected
    assert parse_command(orjson.dumps(payload).decode()) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty command"),
        (" \t\n ", "empty command"),
        (b"subscribe \xff 1", "not valid UTF-8"),
        ("subscrib 1", "unknown command 'subscrib'"),
        ("subscribe fulll 1", "unknown mode 'fulll'"),
        ("subscribe", "subscribe needs instrument tokens"),
        ("subscribe full", "subscribe needs instrument tokens"),
        ("subscribe 0", "bad token 0"),
        ("subscribe 4294967296", "bad token 4294967296"),
        ("subscribe 12345678901", "bad token '12345678901'"),
        ("subscribe -5", "bad token '-5'"),
        ("subscribe 1.5", "bad token '1.5'"),
        ("subscribe 1_000", "bad token '1_000'"),
        ("subscribe ١٢٣", "bad token '١٢٣'"),
        ("subscribe 1 x", "bad token 'x'"),
        ("subscribe all", "unknown mode 'all'"),
        ("mode 408065", "mode needs a mode"),
        ("mode full", "mode needs instrument tokens"),
        ("mode bogus 1", "unknown mode 'bogus'"),
        ("unsubscribe", "unsubscribe needs instrument tokens"),
        ("unsubscribe all 1", "bad token 'all'"),
        ("unsubscribe full 1", "bad token 'full'"),
        ("list 1", "list takes no tokens"),
        ("{", "invalid JSON"),
        ('{"action": "subscribe", "tokens": [1]', "invalid JSON"),
        ('{"tokens": [1]}', "missing 'action'"),
        ('{"action": 5}', "missing 'action'"),
        ('{"action": "jump", "tokens": [1]}', "unknown command 'jump'"),
        ('{"action": "subscribe", "tokens": 1}', "'tokens' must be a list"),
        ('{"action": "subscribe", "tokens": [true]}', "bad token True"),
        ('{"action": "subscribe", "tokens": [1.0]}', "bad token 1.0"),
        ('{"action": "subscribe", "tokens": [" 1"]}', "bad token ' 1'"),
        ('{"action": "subscribe", "tokens": []}', "subscribe needs instrument tokens"),
        ('{"action": "subscribe", "mode": 3, "tokens": [1]}', "unknown mode 3"),
        ('{"action": "subscribe", "mdoe": "full", "tokens": [1]}', "unknown key 'mdoe'"),
        ('{"action": "subscribe", "all": true}', "subscribe does not take 'all'"),
        ('{"action": "unsubscribe", "all": "yes"}', "'all' must be true or false"),
        ('{"action": "unsubscribe", "all": true, "tokens": [1]}', "either 'all' or tokens"),
        ('{"action": "unsubscribe", "mode": "full", "tokens": [1]}', "unsubscribe takes no mode"),
        ('{"action": "list", "mode": "full"}', "list takes no mode"),
        ('{"id": "has space", "action": "list"}', "bad id 'has space'"),
        ('{"id": 5, "action": "list"}', "bad id 5"),
        (
            '{"action": "subscribe", "tokens": [1], "action": "unsubscribe"}',
            "duplicate key 'action'",
        ),
        ('{"id": "x", "id": "y", "action": "list"}', "duplicate key 'id'"),
        ('{"id": "' + "a" * 65 + '", "action": "list"}', "bad id"),
    ],
)
def test_rejections_give_a_reason(raw: str | bytes, reason: str) -> None:
    with pytest.raises(CommandError) as caught:
        parse_command(raw)
    assert reason in caught.value.reason
    assert str(caught.value) == caught.value.reason
    assert "\n" not in caught.value.reason


def test_rejection_keeps_a_readable_id_so_the_reply_reaches_the_sender() -> None:
    with pytest.raises(CommandError) as caught:
        parse_command('{"id": "a1", "action": "subscribe", "mode": "fulll", "tokens": [1]}')
    assert caught.value.id == "a1"
    with pytest.raises(CommandError) as bad_id:
        parse_command('{"id": "a 1", "action": "list"}')
    assert bad_id.value.id is None
    with pytest.raises(CommandError) as text:
        parse_command("subscribe fulll 1")
    assert text.value.id is None
    # A key given twice is refused, but the sender still hears why, unless the key is the id.
    with pytest.raises(CommandError) as twice:
        parse_command('{"id": "d1", "action": "list", "action": "list"}')
    assert twice.value.id == "d1"
    assert twice.value.reason == "duplicate key 'action': give each key once"
    with pytest.raises(CommandError) as two_ids:
        parse_command('{"id": "d1", "id": "d2", "action": "list"}')
    assert two_ids.value.id is None
    # Whichever duplicate comes first: two top-level ids never get a reply...
    with pytest.raises(CommandError) as later_ids:
        parse_command('{"action": "list", "action": "list", "id": "a", "id": "b"}')
    assert later_ids.value.id is None
    # ...and an "id" repeated inside another value does not hide the real one.
    with pytest.raises(CommandError) as nested:
        parse_command('{"id": "x", "action": "list", "mode": {"id": 1, "id": 2}}')
    assert (nested.value.id, nested.value.reason) == ("x", "duplicate key 'id': give each key once")


def test_the_largest_subscribe_fits_however_it_is_formatted() -> None:
    tokens = [4_000_000_000 + n for n in range(MAX_TOKENS)]
    loose = {"id": "big", "action": "subscribe", "mode": "full", "tokens": [str(t) for t in tokens]}
    raw = json.dumps(loose, indent=8)
    assert len(raw) > 90_000
    assert parse_command(raw) == Command("subscribe", tuple(tokens), "full", id="big")
    text = "subscribe full\n" + "\n".join(f"  {t} ," for t in tokens)
    assert parse_command(text) == Command("subscribe", tuple(tokens), "full")


def test_over_long_commands_are_rejected_before_parsing() -> None:
    tokens = " ".join(["256265"] * (MAX_COMMAND_BYTES // 7 + 1))
    raw = f"subscribe {tokens}"
    assert len(raw) > MAX_COMMAND_BYTES
    for value in (raw, raw.encode()):
        with pytest.raises(CommandError, match="command too long"):
            parse_command(value)
    # The longest command that fits is parsed normally.
    fits = ("list" + " " * MAX_COMMAND_BYTES)[:MAX_COMMAND_BYTES]
    assert parse_command(fits.encode()) == Command("list")


def test_command_is_frozen() -> None:
    command = parse_command("list")
    with pytest.raises(AttributeError):
        command.action = "subscribe"  # type: ignore[misc]


# -- apply ---------------------------------------------------------------------------------------


def apply(current: dict[int, Mode], raw: str, max_tokens: int = MAX_TOKENS) -> dict[int, Mode]:
    return apply_command(current, parse_command(raw), max_tokens=max_tokens)


def test_subscribe_adds_and_changes_mode_of_subscribed_tokens() -> None:
    current: dict[int, Mode] = {1: "ltp"}
    assert apply(current, "subscribe full 1 2") == {1: "full", 2: "full"}
    assert current == {1: "ltp"}


def test_subscribe_is_idempotent() -> None:
    once = apply({}, "subscribe full 1 2")
    assert apply(once, "subscribe full 1 2") == once


def test_mode_changes_subscribed_tokens() -> None:
    assert apply({1: "quote", 2: "quote"}, "mode ltp 2") == {1: "quote", 2: "ltp"}


def test_mode_on_an_unsubscribed_token_rejects_the_whole_command() -> None:
    current: dict[int, Mode] = {1: "quote"}
    command = parse_command('{"id": "m1", "action": "mode", "mode": "full", "tokens": [1, 9, 8]}')
    with pytest.raises(CommandError) as caught:
        apply_command(current, command)
    assert "not subscribed: 9, 8" in caught.value.reason
    assert caught.value.id == "m1"
    assert current == {1: "quote"}


def test_mode_error_lists_at_most_five_missing_tokens() -> None:
    with pytest.raises(CommandError, match=r"1, 2, 3, 4, 5 \(\+2 more\)"):
        apply({}, "mode full 1 2 3 4 5 6 7")


def test_unsubscribe_removes_and_ignores_unknown_tokens() -> None:
    current: dict[int, Mode] = {1: "quote", 2: "full"}
    assert apply(current, "unsubscribe 2 3") == {1: "quote"}
    assert apply({}, "unsubscribe 3") == {}
    assert apply(current, "unsubscribe all") == {}
    assert current == {1: "quote", 2: "full"}


def test_list_returns_a_copy() -> None:
    current: dict[int, Mode] = {1: "quote"}
    result = apply(current, "list")
    assert result == current
    assert result is not current


def test_subscribe_above_the_limit_rejects_the_whole_command() -> None:
    current: dict[int, Mode] = dict.fromkeys(range(1, 4), "quote")
    assert apply(current, "subscribe 3 4", max_tokens=4) == {
        1: "quote",
        2: "quote",
        3: "quote",
        4: "quote",
    }
    with pytest.raises(CommandError, match="leave 5 tokens subscribed, above the limit of 4"):
        apply(current, "subscribe 4 5", max_tokens=4)
    assert len(current) == 3


def test_the_default_limit_is_kites_3000() -> None:
    full: dict[int, Mode] = dict.fromkeys(range(1, MAX_TOKENS + 1), "ltp")
    assert apply(full, "subscribe full 1") == {**full, 1: "full"}
    with pytest.raises(CommandError, match="above the limit of 3000"):
        apply(full, f"subscribe {MAX_TOKENS + 1}")


# -- properties ----------------------------------------------------------------------------------

_words = st.sampled_from(
    [
        "subscribe",
        "unsubscribe",
        "mode",
        "list",
        "all",
        *MODES,
        "FULL",
        "0",
        "1",
        "2",
        "3",
        "4294967295",
        "4294967296",
        "-1",
        "x",
        ",",
        "{",
        "}",
        '"',
        "[",
        "]",
        ":",
        "id",
    ]
)
_texts = st.lists(_words, max_size=8).map(" ".join)
_tokens = st.integers(min_value=1, max_value=40)
_modes = st.sampled_from(MODES)
_json_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can encode
_current = st.dictionaries(_tokens, _modes, max_size=12)
_commands = st.one_of(
    st.builds(
        lambda m, t: f"subscribe {m} {' '.join(map(str, t))}",
        _modes,
        st.lists(_tokens, min_size=1, max_size=10),
    ),
    st.builds(
        lambda m, t: f"mode {m} {' '.join(map(str, t))}",
        _modes,
        st.lists(_tokens, min_size=1, max_size=5),
    ),
    st.builds(
        lambda t: f"unsubscribe {' '.join(map(str, t))}", st.lists(_tokens, min_size=1, max_size=5)
    ),
    st.just("unsubscribe all"),
    st.just("list"),
)


def parse_or_reason(raw: str | bytes) -> Command | str:
    """The command, or the rejection's reason; any other exception fails the test."""
    try:
        return parse_command(raw)
    except CommandError as exc:
        return exc.reason


@given(st.binary(max_size=200))
def test_random_bytes_give_a_command_or_a_command_error(raw: bytes) -> None:
    outcome = parse_or_reason(raw)
    assert outcome if isinstance(outcome, str) else outcome.action in ACTIONS


@given(st.one_of(_texts, st.text(max_size=100)))
def test_random_text_gives_a_command_or_a_command_error(raw: str) -> None:
    outcome = parse_or_reason(raw)
    assert outcome if isinstance(outcome, str) else outcome.action in ACTIONS


@given(
    st.dictionaries(
        st.sampled_from(["id", "action", "mode", "tokens", "all", "x"]),
        st.one_of(
            st.none(),
            st.booleans(),
            _json_ints,
            st.text(max_size=5),
            st.lists(_json_ints, max_size=3),
        ),
    )
)
def test_random_json_objects_give_a_command_or_a_command_error(obj: dict[str, object]) -> None:
    outcome = parse_or_reason(orjson.dumps(obj))
    assert outcome if isinstance(outcome, str) else outcome.action in ACTIONS


@given(_current, _commands, st.integers(min_value=0, max_value=15))
def test_apply_never_mutates_and_never_exceeds_the_limit(
    current: dict[int, Mode], raw: str, max_tokens: int
) -> None:
    current = dict(list(current.items())[:max_tokens])
    before = dict(current)
    command = parse_command(raw)
    try:
        result = apply_command(current, command, max_tokens=max_tokens)
    except CommandError:
        assert current == before
        return
    assert current == before
    assert len(result) <= max_tokens
    if command.action in ("subscribe", "mode"):
        assert all(result[token] == command.mode for token in command.tokens)
    if command.action == "unsubscribe":
        assert not set(command.tokens) & set(result)
        assert set(result) <= set(current)
