"""Benchmarks: perf_analyzer sweeps (perf.py) and per-stage timings (stages.py)."""
