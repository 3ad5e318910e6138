"""Generation engines behind one small Protocol (see :mod:`streaming_llm.engines.base`)."""
