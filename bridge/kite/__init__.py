"""The Kite ticker as a library, with no Redis in it (CONTRACT §7).

``from bridge.kite import KiteFeed, retry, decode_frame, frame_payloads``.
"""

from __future__ import annotations

from bridge.kite.codec import FrameError, decode_frame, frame_payloads
from bridge.kite.feed import CAUSES, FeedError, FeedStats, KiteFeed
from bridge.kite.messages import InvalidText, KiteError, KiteMessage, OrderUpdate, OtherMessage
from bridge.kite.records import Mode, Tick
from bridge.kite.retry import AuthError, Backoff, RetriesExhausted, retry

__all__ = [
    "CAUSES",
    "AuthError",
    "Backoff",
    "FeedError",
    "FeedStats",
    "FrameError",
    "InvalidText",
    "KiteError",
    "KiteFeed",
    "KiteMessage",
    "Mode",
    "OrderUpdate",
    "OtherMessage",
    "RetriesExhausted",
    "Tick",
    "decode_frame",
    "frame_payloads",
    "retry",
]
