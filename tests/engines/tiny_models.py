"""Tiny random-weight causal LMs for the cache and decoding tests (no hub access needed).

Weights are drawn with a large ``initializer_range`` so that attention is sharp: with the default
0.02 every score is near zero, attention is nearly uniform and a wrong position would hardly move
the logits, which would let a broken re-positioning pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 97

ROPE = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": 128},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
}


def tiny_config(family: str, *, layers: int = 2, rope: str = "default", **extra: Any) -> Any:
    common: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": layers, "num_attention_heads": 4,
                                  "max_position_embeddings": 4096, "initializer_range": 0.3,
                                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                  "tie_word_embeddings": False}
    common.update(extra)
    if family == "llama":
        return LlamaConfig(num_key_value_heads=2, rope_parameters=dict(ROPE[rope]), **common)
    if family == "mistral":
        common.setdefault("sliding_window", None)
        return MistralConfig(num_key_value_heads=2, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **common)
    if family == "qwen3":
        return Qwen3Config(num_key_value_heads=2, head_dim=16, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(rotary_pct=0.25, **common)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=512)
    raise ValueError(family)


_CLASSES = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM, "qwen2": Qwen2ForCausalLM,
            "qwen3": Qwen3ForCausalLM, "gpt_neox": GPTNeoXForCausalLM, "gpt2": GPT2LMHeadModel}


def tiny_model(family: str = "llama", *, layers: int = 2, rope: str = "default",
               dtype: torch.dtype = torch.float32, seed: int = 0, **extra: Any) -> Any:
    torch.manual_seed(seed)
    config = tiny_config(family, layers=layers, rope=rope, **extra)
    return _CLASSES[family](config).to(dtype).eval()


def random_ids(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def dense_forward(model: Any, ids: list[int], positions: list[int] | None = None) -> Any:
    """One cache-less forward over ``ids`` at ``positions`` (default 0..n-1).

    Returns ``(last-token float32 logits, DynamicCache)``; the cache holds every layer's keys.
    """
    from transformers import DynamicCache

    pos = list(range(len(ids))) if positions is None else positions
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), position_ids=torch.tensor([pos]),
                    past_key_values=cache, use_cache=True)
    return out.logits[0, -1].float(), cache


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
