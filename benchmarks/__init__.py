"""Benchmarks of adamerge: quality tables and performance measurements; run each with `python -m benchmarks.NAME`."""
