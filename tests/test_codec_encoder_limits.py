"""Encoder limits the mutation audit found unpinned: uint16 boundaries, depth sides, tzinfo."""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo

import pytest
from test_codec import full_tick

from bridge.kite.codec import decode_frame, encode_packet, encode_raw_frame
from bridge.kite.records import Depth


def test_a_packet_of_65535_bytes_fits_the_length_prefix() -> None:
    frame = encode_raw_frame([b"\x00" * 65535])
    assert frame[:4] == b"\x00\x01\xff\xff"
    assert len(frame) == 4 + 65535
    skipped: list[int] = []
    assert decode_frame(frame, skipped) == []
    assert skipped == [65535]


def test_65535_packets_fit_the_packet_count_one_more_does_not() -> None:
    frame = encode_raw_frame([b""] * 65535)
    assert frame[:2] == b"\xff\xff"
    assert len(frame) == 2 + 2 * 65535
    with pytest.raises(ValueError, match="65536 packets exceed the uint16 packet count"):
        encode_raw_frame([b""] * 65536)


@pytest.mark.parametrize(("buy", "sell"), [(4, 6), (5, 4), (4, 5)])
def test_a_full_tick_needs_5_levels_on_each_side_not_10_in_all(buy: int, sell: int) -> None:
    levels = [*full_tick().depth.buy, *full_tick().depth.sell]
    lopsided = Depth(levels[:buy], levels[buy : buy + sell])
    with pytest.raises(ValueError, match="carries exactly 5 buy and 5 sell depth levels"):
        encode_packet(full_tick(depth=lopsided))


class _NoOffset(tzinfo):
    """A tzinfo that knows no offset: the datetime is naive in all but name."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None

    def dst(self, dt: datetime | None) -> timedelta | None:
        return None

    def tzname(self, dt: datetime | None) -> str | None:
        return None


def test_a_datetime_whose_tzinfo_has_no_offset_is_naive() -> None:
    moment = datetime(2024, 6, 12, 12, 0, tzinfo=_NoOffset())
    with pytest.raises(ValueError, match="naive"):
        encode_packet(full_tick(exchange_timestamp=moment))
