"""Small builders and waiters shared by the service-core tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from bridge.kite.records import LtpTick, Ohlc, QuoteTick

__all__ = ["ltp", "quote", "wait_until"]


def ltp(token: int, price: float = 100.0) -> LtpTick:
    return LtpTick(tradable=True, mode="ltp", instrument_token=token, last_price=price)


def quote(token: int, price: float = 100.0) -> QuoteTick:
    return QuoteTick(
        tradable=True,
        mode="quote",
        instrument_token=token,
        last_price=price,
        last_traded_quantity=1,
        average_traded_price=price,
        volume_traded=10,
        total_buy_quantity=5,
        total_sell_quantity=6,
        ohlc=Ohlc(open=price, high=price, low=price, close=price),
        change=0.0,
    )


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], within: float = 5.0, step: float = 0.01
) -> None:
    """Poll ``predicate`` (sync or async) until true; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(step)
