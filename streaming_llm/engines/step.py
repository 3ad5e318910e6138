"""The decode step: one forward pass that advances every decoding row of a batch by one token.

The scheduler (:mod:`.scheduler`) calls a :class:`Step` once per decode iteration with the rows of
a :class:`~.batch_cache.BatchSinkCache` and the token each row feeds; it returns the next-token
logits of every row and leaves the batch advanced. Prompts are not fed here: they go through the
model's own forward (:func:`~.decoding.forward_tokens`), whose cost is arithmetic, not overhead.

C.1 Two steps
-------------
:class:`ModelStep`
    The model's own ``forward`` with the batch as ``past_key_values`` and a 4-D mask. Any model
    the sink cache serves takes it.
:class:`LlamaStep`
    The decode step of the Llama family (Llama, Mistral, Qwen2: pre-norm blocks, RoPE, grouped
    query attention, SwiGLU) written out over the batch buffers, the way nanoGPT writes its
    block. The arithmetic is the model's, in the model's dtype (RMSNorm in float32, as
    transformers does), so greedy tokens match :class:`ModelStep` (tested). What it saves is work
    around the matrix products: transformers' per-layer module calls, mask and position plumbing,
    ``repeat_kv``; and q/k/v and gate/up are each one product over a fused weight. On this
    project's CPU the step is bound by reading the weights (about 80 % of a step is ``aten::mm``
    at the machine's memory bandwidth), so what remains to win is bytes: see C.3.

Shapes of one :class:`LlamaStep` call, for ``B`` rows (the batch bucket), ``H`` hidden, ``h``
query heads, ``g`` key/value heads, ``d`` head dim, span ``S`` (:mod:`.batch_cache`, B.2)::

    x = embed[ids]                  (B, H)
    qkv = x @ Wqkv                  (B, (h + 2g) d)   one product: q, k, v side by side
    q, k  = rope(q, k, positions)   (B, h + g, d)     one rotation for both
    k, v -> batch slot lengths[b]   (B, g, 1, d)      written in place (BatchSinkCache.update)
    q viewed as (B, g, h/g, d)      a query head group per key/value head: no repeat_kv copy
    attention(q, K[:, :, :S], V[:, :, :S], mask (B, 1, 1, S)) -> (B, H)
    x += o; x += down(silu(gate) * up), gate|up one product over (2 I, H)
    logits = norm(x) @ Wout          (B, vocab)

The fused weights are built once; the model's own ``q_proj``/``k_proj``/``v_proj`` (and
``gate_proj``/``up_proj``) weights are made views of them, so prefill and the step share one copy
of every weight (no second copy of the model in memory).

C.2 Compiled
------------
``compile=True`` (the engine's default, ``STREAMING_LLM_COMPILE``) runs the written-out step
under ``torch.compile``: inductor on CPU, and with ``mode="reduce-overhead"`` (CUDA graphs) on
CUDA, where a small model's step is bound by kernel launches rather than bytes (see docs/performance.md for where it has run). On CPU:

- the graph has a C++ wrapper (``cpp_wrapper``): its ~330 kernels and products per step are
  called from C++, not from generated Python, which cost 2-3 ms of a 20 ms float32 step;
- attention is written out as two products and a softmax, which inductor fuses with the scaling
  and the mask (SDPA's kernel costs more per call at one query per row; eager keeps it);
- the span (B.2 of :mod:`.batch_cache`) is a dynamic dimension: there is one graph per batch
  bucket and buffer size (``slots``, a multiple of 512 with one spare slot, so the span's slice
  is never the whole buffer: B.1), a :data:`Shape`, instead of one per (bucket, span).

A graph takes a minute or two to build on this project's 2-core CPU. Built on its first call
(``ahead=False``, what the benchmarks do, outside their timings) it stalls the batch meanwhile;
the engine's step is ``ahead=True``: a call runs compiled only the shapes already built, runs
any other eager (SDPA's kernel) and notes it in :attr:`LlamaStep.missing`, and
:meth:`LlamaStep.prepare` builds a shape on blank buffers. :mod:`.precompile` has a child process build them into inductor's
cache on disk and the serving step take them in while idle. If compiling fails the step logs one
line and runs eager from then on. fbgemm's products (C.3) run inside the compiled step as custom
ops (:mod:`.weights`), so lighter weights gain most from it.

C.3 Lighter weights
-------------------
``quantize="fp16"`` or ``"int8"`` (CPU) gives the step its own products over fp16 or int8
copies of the fused weights (:mod:`.weights`): half or a quarter of float32's bytes per token.
Feed keeps the model's own weights (it is bound by arithmetic, and a whole chunk through
int8 products costs more quality than one row), so memory grows by the lighter copy. Rows stay
independent in both modes; the quality cost is measured by ``streaming-llm bench quality
--only steps``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import weights
from .batch_cache import BatchSinkCache

__all__ = ["LlamaStep", "ModelStep", "Step", "build_step", "llama_step_support"]

log = logging.getLogger(__name__)

QUANTIZE = weights.QUANTIZE
Product = Callable[[torch.Tensor], torch.Tensor]
Shape = tuple[int, int]  # (batch bucket, batch slots): one compiled graph each (C.2)
_LLAMA_FAMILIES = frozenset({"llama", "mistral", "qwen2"})


class Step(Protocol):
    """One decode step over a batch's rows."""

    name: str
    compile_seconds: float  # time spent compiling so far (0 eager)

    def __call__(self, batch: BatchSinkCache, tokens: Sequence[int]) -> torch.Tensor:
        """Feed ``tokens[b]`` to row ``b``; return float32 logits ``(rows, vocab)``, batch advanced."""


class ModelStep:
    """The model's own forward over the batch (any model the sink cache serves)."""

    name = "model"
    compile_seconds = 0.0

    def __init__(self, model: Any) -> None:
        self.model = model
        self._dtype = next(model.parameters()).dtype

    def __call__(self, batch: BatchSinkCache, tokens: Sequence[int]) -> torch.Tensor:
        inputs = batch.step_inputs(tokens, self._dtype)
        out = self.model(**inputs, past_key_values=batch, use_cache=True, logits_to_keep=1)
        batch.advance()
        return out.logits[:len(tokens), -1].float()


def llama_step_support(model: Any) -> str | None:
    """None when :class:`LlamaStep` can run ``model``, else why not (one line)."""
    cfg = model.config.get_text_config()
    kind = getattr(cfg, "model_type", None)
    if kind not in _LLAMA_FAMILIES:
        return f"model type {kind!r} is not one of {sorted(_LLAMA_FAMILIES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "the MLP is not a bias-free SwiGLU"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} has no model.layers / model.rotary_emb"
    if getattr(inner.rotary_emb, "rope_type", "default") not in ("default", "linear", "llama3",
                                                                 "yarn"):
        return f"RoPE type {inner.rotary_emb.rope_type!r}"
    return None


def build_step(model: Any, *, quantize: str = "none", compile: bool = False,
               ahead: bool = False) -> Step:
    """The best step for ``model``: :class:`LlamaStep` when it can run it, else :class:`ModelStep`.

    ``quantize`` (``fp16``/``int8``, C.3) needs the written-out step, so another architecture
    with it raises ``ValueError``.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    why = llama_step_support(model)
    if why is not None:
        if quantize != "none":
            raise ValueError(f"quantize={quantize} needs the Llama-family step: {why}")
        log.info("decode step: the model's own forward (%s)", why)
        return ModelStep(model)
    return LlamaStep(model, quantize=quantize, compile=compile, ahead=ahead)


class LlamaStep:
    """The Llama-family decode step written out over :class:`BatchSinkCache` buffers (C.1)."""

    def __init__(self, model: Any, *, quantize: str = "none", compile: bool = False,
                 ahead: bool = False) -> None:
        inner = model.model
        cfg = model.config.get_text_config()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        first = inner.layers[0].self_attn
        self.head_dim = first.head_dim
        self.scaling = float(first.scaling)
        self.eps = float(inner.norm.variance_epsilon)
        self.dtype = next(model.parameters()).dtype
        self.embed = inner.embed_tokens.weight
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float()
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.final_norm = inner.norm.weight
        products = [_fuse_layer(layer) for layer in inner.layers]
        self.norms = [(layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
                      for layer in inner.layers]
        out = model.get_output_embeddings()
        # C.3: with lighter weights the step has its own copies; the model (prefill) keeps its own.
        make: Callable[[torch.Tensor, torch.Tensor | None], Product] = (
            _Linear if quantize == "none" else lambda w, b: weights.product(quantize, w, b))
        self.name = "llama" if quantize == "none" else f"llama-{quantize}"
        self.layers: list[tuple[Product, ...]] = [tuple(make(w, b) for w, b in layer)
                                                  for layer in products]
        self.output = make(out.weight, getattr(out, "bias", None))
        self.intermediate = products[0][2][0].shape[0] // 2
        self.compile_seconds = 0.0
        self.ahead = ahead
        self.missing: set[Shape] = set()  # shapes run eager for want of a graph (ahead mode)
        self._compiled = compile
        self._shapes: set[Shape] = set()  # shapes with a compiled graph
        self._graph: Callable[..., torch.Tensor] = self.forward
        if compile:
            # One graph per batch bucket and buffer size: more than dynamo's default limit of 8
            # per function once the buckets and agents' buffer sizes add up.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            # dynamic=False: only the span, marked in _compile_call, is dynamic. Left to dynamo's
            # automatic dynamic shapes, the batch size became dynamic too, one graph for every
            # size from 2 on: 8 conversations measured 157 against 216 tokens/s (int8, compiled).
            # The graph writes attention out as products (C.2); eager keeps SDPA's kernel.
            graph = functools.partial(self.forward, products=True)
            if self.embed.device.type == "cuda":
                self._graph = torch.compile(graph, dynamic=False, mode="reduce-overhead")
            else:
                # A C++ wrapper: the generated graph calls its ~330 kernels and products per
                # step from C++ rather than Python (2-3 ms of a 20 ms float32 step here).
                self._graph = torch.compile(graph, dynamic=False, options={"cpp_wrapper": True})
            self.name += "-compiled"

    @property
    def compiled_shapes(self) -> frozenset[Shape]:
        """``(bucket, slots)`` shapes the step runs compiled."""
        return frozenset(self._shapes)

    def __call__(self, batch: BatchSinkCache, tokens: Sequence[int]) -> torch.Tensor:
        inputs = batch.step_inputs(tokens, self.dtype)
        args = (inputs["input_ids"][:, 0], inputs["position_ids"][:, 0], inputs["attention_mask"],
                batch)
        # One graph per batch bucket and buffer size, the span a dynamic dimension (C.2).
        shape = (inputs["input_ids"].shape[0], batch.slots)
        if shape in self._shapes:
            logits = self._graph(*args)
        elif self._compiled and not self.ahead:
            logits = self._compile_call(shape, args)
        else:
            if self._compiled:
                self.missing.add(shape)  # the precompiler builds it; eager meanwhile (C.2)
            logits = self.forward(*args)
        batch.advance()
        return logits[:len(tokens)].float()

    def prepare(self, rows: int, shape: Shape) -> float | None:
        """Build the graph of ``shape`` = ``(bucket, slots)`` for a batch of ``rows`` rows, on
        blank buffers of that shape (inductor's cache makes it a load when the graph was built
        before, here or in another process); the seconds it took, None if compiling failed."""
        if not self._compiled:
            return None
        if shape in self._shapes:
            return 0.0
        bucket, slots = shape
        batch = BatchSinkCache.blank(rows, slots, bucket, layers=len(self.layers),
                                     kv_heads=self.kv_heads, head_dim=self.head_dim,
                                     dtype=self.dtype, device=self.embed.device)
        inputs = batch.step_inputs([0] * bucket, self.dtype)
        args = (inputs["input_ids"][:, 0], inputs["position_ids"][:, 0], inputs["attention_mask"],
                batch)
        before = self.compile_seconds
        with torch.inference_mode():
            self._compile_call(shape, args)
        self.missing.discard(shape)
        return self.compile_seconds - before if self._compiled else None

    def _compile_call(self, shape: Shape, args: tuple[Any, ...]) -> torch.Tensor:
        """The first call of a new shape compiles; time it, fall back if it fails."""
        torch._dynamo.maybe_mark_dynamic(args[2], 3)  # the mask's span
        if self.embed.device.type == "cuda":
            # CUDA graphs replay fixed addresses: the batch buffers, written in place by every
            # step, must be static inputs.
            for t in args[3].buffers():
                torch._dynamo.mark_static_address(t)
        started = time.perf_counter()
        try:
            logits = self._graph(*args)
        except Exception as exc:  # noqa: BLE001 - a model torch.compile cannot take runs eager
            log.warning("decode step: torch.compile failed (%s: %s); running eager",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self._graph, self._compiled = self.forward, False
            self._shapes.clear()
            self.missing.clear()
            self.name = self.name.removesuffix("-compiled")
            return self.forward(*args)
        seconds = time.perf_counter() - started
        self.compile_seconds += seconds
        self._shapes.add(shape)
        log.info("decode step: compiled batch %d (%d slots) in %.1f s", shape[0], shape[1],
                 seconds)
        return logits

    def _fused_attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)

    def _attention_products(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
        """What SDPA computes, as products: ``q`` ``(B, g, h/g, d)`` against ``(B, g, S, d)``."""
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.scaling + mask
        return torch.matmul(scores.float().softmax(-1).to(values.dtype), values)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                batch: BatchSinkCache, products: bool = False) -> torch.Tensor:
        """Logits ``(B, vocab)`` for one token per row; ``ids``/``positions`` ``(B,)``;
        attention as SDPA's kernel, or written out as ``products`` (compiled, C.2)."""
        attend = self._attention_products if products else self._fused_attention
        rows, span = ids.shape[0], mask.shape[-1]
        h, g, d = self.heads, self.kv_heads, self.head_dim
        x = self.embed[ids]  # (B, H)
        angle = positions.float()[:, None] * self.inv_freq[None, :]  # (B, d/2)
        angle = torch.cat((angle, angle), dim=-1)[:, None, :]  # (B, 1, d), rotate_half layout
        cos = (angle.cos() * self.rope_scaling).to(x.dtype)
        sin = (angle.sin() * self.rope_scaling).to(x.dtype)
        for i, ((qkv_w, o_w, gate_up_w, down_w), (norm_in, norm_post)) in enumerate(
                zip(self.layers, self.norms, strict=True)):
            qkv = qkv_w(_rms_norm(x, norm_in, self.eps)).view(rows, h + 2 * g, d)
            qk = qkv[:, :h + g]
            x1, x2 = qk.chunk(2, dim=-1)
            qk = qk * cos + torch.cat((-x2, x1), dim=-1) * sin
            k = qk[:, h:, None, :]  # (B, g, 1, d)
            v = qkv[:, h + g:, None, :]
            keys, values = batch.write(k, v, i)  # the whole buffers: slots (B, g, S, d) used
            keys, values = keys[:rows, :, :span], values[:rows, :, :span]
            q = qk[:, :h].reshape(rows, g, h // g, d)  # query heads grouped by their kv head
            o = attend(q, keys, values, mask)
            x = x + o_w(o.reshape(rows, h * d))
            gate, up = gate_up_w(_rms_norm(x, norm_post, self.eps)).split(self.intermediate, -1)
            x = x + down_w(F.silu(gate) * up)
        return self.output(_rms_norm(x, self.final_norm, self.eps))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: in float32, scaled by ``weight`` in the input dtype."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


Weight = tuple[torch.Tensor, torch.Tensor | None]


def _fuse_layer(layer: Any) -> tuple[Weight, Weight, Weight, Weight]:
    """(qkv, o, gate_up, down) weights and biases of one block; q/k/v and gate/up fused.

    The model's own projection weights become row views of the fused tensors (one copy).
    """
    attn, mlp = layer.self_attn, layer.mlp
    qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
    return (qkv, (attn.o_proj.weight, attn.o_proj.bias), gate_up,
            (mlp.down_proj.weight, mlp.down_proj.bias))


def _fuse(linears: list[nn.Linear]) -> Weight:
    with torch.no_grad():
        weight = torch.cat([m.weight for m in linears]).contiguous()
        biases = [m.bias for m in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else weight.new_zeros(m.out_features)
                              for b, m in zip(biases, linears, strict=True)])
        start = 0
        for m in linears:
            n = m.out_features
            m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
            if m.bias is not None:
                assert bias is not None
                m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
            start += n
    return weight, bias


class _Linear:
    """``x @ weight.T + bias``: one float product of the step."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
