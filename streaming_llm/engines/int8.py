"""Int8 weights for CPU decoding: the model's linear layers as int8 matrix products.

A decode step of a small model reads every weight once per token, so its cost is the bytes of
the weights, and int8 weights are a quarter of float32's. :func:`quantize_int8` converts every
``nn.Linear`` (the output layer included: a tied output layer is the largest matrix of a small
model) with torch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``, fbgemm):
weights int8, symmetric, one float32 scale per output channel; at every call the activations
entering the product are quantized to 8 bits with a scale and zero point taken from that call's
values; the product is accumulated in int32 and returned as float32. Everything else (embeddings, norms, attention, the KV cache) stays float32.

Why not weight-only (float32 activations times int8 weights dequantized inside the product):
torch's CPU kernel for that, ``torch._weight_int8pack_mm``, measured 2.5x *slower* than the
float32 product for SmolLM2's output layer on this machine, while fbgemm's int8 product was 4-7x
faster. Opt-in (``streaming-llm bench speed --modes int8``); the cost in quality is what
``streaming-llm bench quality`` measures on the converted model.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

__all__ = ["quantize_int8"]


def quantize_int8(model: Any) -> Any:
    """Return ``model`` with every ``nn.Linear`` converted to int8 (CPU; in place)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 layers run on CPU; the model is elsewhere")
    if getattr(model.config, "tie_word_embeddings", False):
        # The output layer gets its own int8 copy; the input embedding stays float32.
        model.config.tie_word_embeddings = False
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; the API still ships with torch.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
