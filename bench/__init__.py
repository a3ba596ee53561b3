"""Benchmarks for depproxy-pyramid, run by hand (not part of the test suite).

Entry point: ``.venv/bin/python -m bench.run`` (see ``docs/benchmarks.md``).
"""
