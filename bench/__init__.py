"""Benchmarks: one script per area, run together by bench/all.py (see README, Performance)."""
