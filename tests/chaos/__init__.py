"""Chaos tests: the real bridge process against injected faults (docs/reliability.md)."""
