"""Route groups, one module each, joined in :func:`streaming_llm.app.create_app`."""
