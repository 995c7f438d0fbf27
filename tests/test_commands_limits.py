"""Command rules the mutation audit found unpinned: the size limit, mode spelling, separators."""

from __future__ import annotations

import json

import pytest

from bridge.commands import Command, CommandError, parse_command, parse_mode, parse_token

#: The documented limit (docs/operators.md "Size"), spelled out rather than imported so that a
#: change of the constant is a change the tests notice.
LIMIT = 256 * 1024


def test_a_command_of_exactly_256_kib_is_parsed_one_more_is_refused() -> None:
    fits = "list" + " " * (LIMIT - 4)
    assert parse_command(fits) == Command("list")
    assert parse_command(fits.encode()) == Command("list")
    with pytest.raises(CommandError, match=f"command too long: {LIMIT + 1} characters"):
        parse_command(fits + " ")
    with pytest.raises(CommandError, match=f"command too long: {LIMIT + 1} bytes"):
        parse_command(fits.encode() + b" ")


@pytest.mark.parametrize("spelled", [" full ", "\tFULL", "Full\n"])
def test_a_mode_with_surrounding_blanks_resolves_to_the_bare_mode(spelled: str) -> None:
    assert parse_mode(spelled) == "full"
    command = parse_command(json.dumps({"action": "subscribe", "mode": spelled, "tokens": [1]}))
    assert command.mode == "full"


def test_any_whitespace_separates_the_verb() -> None:
    assert parse_command("subscribe\tfull\t1") == Command("subscribe", (1,), "full")
    assert parse_command("unsubscribe\n1") == Command("unsubscribe", (1,))


def test_long_bad_input_is_cut_to_40_characters_in_the_reason() -> None:
    with pytest.raises(CommandError) as caught:
        parse_token("x" * 41)
    assert caught.value.reason.startswith(f"bad token {'x' * 40 + '...'!r}: ")
    with pytest.raises(CommandError) as exact:
        parse_token("y" * 40)
    assert exact.value.reason.startswith(f"bad token {'y' * 40!r}: ")
