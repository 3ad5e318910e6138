"""Benchmarks: ``streaming-llm bench <name>``; each prints a table, ``--json`` the same figures."""
