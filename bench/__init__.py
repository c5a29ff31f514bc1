"""Benchmarks: slow measurements kept out of the test suite (run them as scripts, e.g. python bench/planted.py)."""
