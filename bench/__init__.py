"""Benchmarks, run as scripts (``python bench/throughput.py``); this package holds their shared parts."""
