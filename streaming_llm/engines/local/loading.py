"""Loading the tokenizer and model of the local engine (worker thread, once, at start-up).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ...settings import Settings

log = logging.getLogger("streaming_llm.engines.local")

# A sink cache never shows the model a position beyond sinks + window - 1, so the window only has
# to fit below the trained context; no extra headroom is needed.
HEADROOM = 0

# For tokenizers that ship without a chat template (base models).
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    device: str
    dtype: str  # e.g. "float32"
    context: int  # positions the model was trained on
    window: int  # recent-window tokens, clamped below the context (streaming)
    eos_ids: frozenset[int]
    boundaries: tuple[str, ...]  # special tokens that start a fresh tokenization


def load_model(settings: Settings, source: str, name: str) -> LoadedModel:
    """Load ``source`` (a hub id or a folder) as configured by ``settings``; ``name`` is for logs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    s = settings
    device = resolve_device(s.device, torch)
    dtype = resolve_dtype(s.dtype, device, torch)
    dtype_name = str(dtype).removeprefix("torch.")
    log.info("local engine: loading %s (device %s, dtype %s)", name, device, dtype_name)

    config = AutoConfig.from_pretrained(source)
    if s.streaming:
        from ..sink_cache import check_streaming_support

        check_streaming_support(config)  # before the weights: fail fast
    context = context_length(config)

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.chat_template is None:
        log.warning("local engine: %s has no chat template; using a plain one", name)
        tokenizer.chat_template = FALLBACK_TEMPLATE
    log.info("local engine: tokenizer ready (%d tokens)", len(tokenizer))

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device.startswith("cuda"):
        kwargs["device_map"] = device  # load the weights straight onto the GPU
    model: Any = AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
    model.to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("local engine: model ready in %.1f s (%s, %.1fM parameters, %d positions)",
             time.perf_counter() - started, config.model_type, n_params / 1e6, context)

    window = s.window_tokens
    if s.streaming:
        limit = context - s.sink_tokens - HEADROOM
        if limit < 1:
            raise ValueError(f"the model's context ({context} positions) is too short "
                             f"for {s.sink_tokens} sink tokens")
        window = min(s.window_tokens, limit)
        if window < s.window_tokens:
            log.warning("local engine: window clamped from %d to %d tokens (the model was "
                        "trained on %d positions; %d are sinks)", s.window_tokens, window,
                        context, s.sink_tokens)
        log.info("local engine: streaming cache, %d sink + %d recent tokens", s.sink_tokens,
                 window)
    else:
        log.info("local engine: dense cache; oldest turns are dropped beyond %d tokens", context)

    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    return LoadedModel(
        model=model, tokenizer=tokenizer, device=device, dtype=dtype_name, context=context,
        window=window, eos_ids=frozenset(i for i in eos if i is not None),
        boundaries=tuple(t.content for t in added if t.special and not t.lstrip),
    )


def load_error(name: str, exc: Exception) -> str:
    """The start-up error people read for a failed load of model ``name``."""
    from ..sink_cache import UnsupportedModel

    if isinstance(exc, UnsupportedModel):
        message = f"{name}: {exc}"
        if "STREAMING_LLM_STREAMING=false" not in message:
            message += ("; set STREAMING_LLM_STREAMING=false to serve it with a dense cache "
                        "(the oldest turns are dropped to fit its context)")
        return message
    return f"could not load model {name!r}: {type(exc).__name__}: {exc}"


def context_length(config: Any) -> int:
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def resolve_device(setting: str, torch: Any) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("STREAMING_LLM_DEVICE=cuda but torch sees no CUDA device")
    if setting == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("STREAMING_LLM_DEVICE=mps but torch sees no MPS device")
    return setting


def resolve_dtype(setting: str, device: str, torch: Any) -> Any:
    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)
