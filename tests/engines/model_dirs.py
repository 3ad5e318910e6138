"""Tiny models written to disk with the demo tokenizer, for the local engine's tests (loaded by
path with ``from_pretrained``, as a real model would be)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from streaming_llm.engines.demo_model import build_tokenizer


@cache
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _save(model: torch.nn.Module, path: Path, tok: PreTrainedTokenizerFast | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (tok or tokenizer()).save_pretrained(path)
    model.save_pretrained(path)
    return path


def _llama_config(tok: PreTrainedTokenizerFast | None = None, **overrides: object) -> LlamaConfig:
    tok = tok or tokenizer()
    values: dict[str, object] = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        initializer_range=0.1, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def write_llama(path: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str = "cpu", chat_template: str | None = None,
                **overrides: object) -> Path:
    """A random Llama whose greedy output depends on the context (no EOS bias).

    ``device`` is where the weights are drawn (a 1B model draws in seconds on a GPU, not on a
    CPU); ``dtype`` is the one they are saved in (scripts/gpu_check.py builds model-sized ones);
    ``chat_template`` replaces the demo tokenizer's.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(_llama_config(**overrides))
    _save(model.to(dtype).eval(), path)
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(chat_template)
    return path


def write_chain_model(path: Path, answer: str, added_tokens: Sequence[str] = ()) -> Path:
    """A Llama that answers ``answer`` and then EOS, whatever the prompt.

    Its layers write nothing to the residual stream, so the logits depend on the last token only
    (a bigram model): the prompt's last token (the newline after ``<|assistant|>``) leads to the
    first token of ``answer``, each answer token to the next, the last one to EOS. The answer's
    tokens must all differ, and differ from that newline. ``added_tokens`` join the demo
    tokenizer's vocabulary as plain (not special) tokens, as ``<tool_call>`` is Qwen2.5's.
    """
    tok = tokenizer()
    if added_tokens:
        tok = copy.deepcopy(tok)
        tok.add_tokens(list(added_tokens))
    prompt_end = tok("\n", add_special_tokens=False)["input_ids"]
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    chain = [*prompt_end, *ids, tok.eos_token_id]
    assert len(prompt_end) == 1 and len(set(chain)) == len(chain), "chain tokens must be distinct"
    torch.manual_seed(0)
    model = LlamaForCausalLM(_llama_config(tok, hidden_size=64, num_hidden_layers=1)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.copy_(torch.nn.functional.normalize(emb, dim=-1))
        model.lm_head.weight.zero_()
        for current, following in itertools.pairwise(chain):
            model.lm_head.weight[following] = 4.0 * emb[current]
    return _save(model, path, tok)


def write_gpt2(path: Path) -> Path:
    """GPT-2: learned absolute positions, which the sink cache cannot shift."""
    tok = tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return _save(GPT2LMHeadModel(config).eval(), path)
