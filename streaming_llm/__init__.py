"""streaming-llm: a self-hosted chat backend for multi-agent LLM work."""

__version__ = "0.2.0"
