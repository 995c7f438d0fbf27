"""Scratch experiments on the bridge, measured with ``bench.e2e --bridge-command``."""
