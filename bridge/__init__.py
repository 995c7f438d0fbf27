"""Zerodha Kite ticker → Redis pub/sub bridge."""

__version__ = "0.1.0"
