"""Echo caps the mutation audit found unpinned: the limit is inclusive, dead letters are capped."""

from __future__ import annotations

import orjson

from bridge.commands import MAX_COMMAND_BYTES
from bridge.payload import command_text, dead_letter


def test_a_command_of_exactly_the_limit_is_echoed_whole() -> None:
    fits = "x" * MAX_COMMAND_BYTES
    assert command_text(fits) == fits
    assert command_text(fits.encode()) == fits


def test_dead_letter_caps_an_oversized_command() -> None:
    raw = b"y" * (MAX_COMMAND_BYTES + 10)
    entry = orjson.loads(dead_letter(raw, "command too long", at="t"))
    assert entry["command"] == "y" * MAX_COMMAND_BYTES + "...[truncated]"
    assert (entry["error"], entry["at"]) == ("command too long", "t")
