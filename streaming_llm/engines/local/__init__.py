"""``local``: a Hugging Face model run in this process, with a KV cache kept per conversation.

One module per concept:

``loading``
    The tokenizer and model, loaded once at start-up off the event loop.
``prompts``
    Rendering a conversation with the chat template, and tokenizing it reusing what is known.
``store``
    The LRU of per-conversation caches kept between turns.
``engine``
    :class:`LocalEngine`: loading, the bridge to the event loop, cache bookkeeping; every turn
    runs on the batched scheduler (:mod:`..scheduler`).
``turn``
    A chat turn as the scheduler runs it (prompt, streaming text, usage, closing the turn).
"""

from .engine import LocalEngine

__all__ = ["LocalEngine"]
