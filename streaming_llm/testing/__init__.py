"""Test doubles and a real-server harness that ship with the package, so tests and
``streaming-llm bench`` share one copy."""
