"""``local``: a Hugging Face model run in this process, with a KV cache kept per conversation.

One module per concept:

``loading``
    The tokenizer and model, loaded once at start-up off the event loop.
``prompts``
    Rendering a conversation with the chat template, and tokenizing it reusing what is known.
``store``
    The LRU of per-conversation caches kept between turns, and the agents' pinned prefixes.
``caches``
    Cache planning, the one owner of the caches: layout, pin, fresh, plan / roll back, keep.
``turn``
    A chat turn as the scheduler runs it (prompt, streaming text, usage, closing the turn).
``engine``
    :class:`LocalEngine`: lifecycle, health and the bridge to the event loop; every turn runs
    on the batched scheduler (:mod:`..scheduler`). Imports run one way: engine → turn → caches
    → store.
"""

from .engine import LocalEngine

__all__ = ["LocalEngine"]
