"""Lighter weights for the CPU decode step: the step's matrix products in fp16 or int8.

A decode step of a small model reads every weight once per token, so on a CPU its cost is the
bytes of the weights (:mod:`.step`, C.1). ``STREAMING_LLM_QUANTIZE`` gives the decode step
(:class:`~.step.LlamaStep`) products over lighter copies of its fused weights; the model itself,
and so prefill (compute-bound, not byte-bound), stays in the model's dtype. Both kinds are
fbgemm's prepacked CPU kernels that ship with torch (``torch.ops.quantized``).

``fp16`` (:class:`Fp16Product`)
    Weights stored as float16, half of float32's bytes; the input stays float32 and the product
    accumulates in float32: weight-only, so the only error is the weights' rounding to fp16
    (relative ~2e-4 per product here). Rows are independent.
``int8`` (:class:`Int8Product`)
    Weights int8 with one float32 scale per output row, a quarter of float32's bytes; each input
    row is quantized to 8 bits on the fly and the product accumulates in int32. fbgemm quantizes
    a whole input with one scale and zero point, which would make one conversation's answer
    depend on the other rows of its batch (and a prompt's outlier token spoil a whole chunk), so
    every row is first mapped affinely onto [-1, 1] (``x = c + s * u``, per row ``c = (max + min)
    / 2``, ``s = (max - min) / 2``): every row of ``u`` spans exactly [-1, 1], fbgemm's scale is the
    same for every row, and ``x @ W.T = s * (u @ W.T) + c * W.sum(1)``. That is per-row
    asymmetric quantization, with integer accumulation, so a row's result does not depend on the
    rows beside it (tested: batched == alone, exactly).

Why not int8 weight-only (float inputs times int8 weights): torch's CPU kernel for it
(``torch._weight_int8pack_mm``) measured 8x *slower* than float32 for one row here. What each
mode costs in quality is measured by ``streaming-llm bench quality --only steps``.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from typing import Any

import torch

__all__ = ["QUANTIZE", "Fp16Product", "Int8Product", "product"]

QUANTIZE = ("none", "fp16", "int8")


# fbgemm's packed weights, by key: torch.compile cannot trace fbgemm's products, so under it
# they run as two custom ops (opaque to the compiler, shapes known), which take tensors and
# numbers only; the packed weights of live products stay here. Registered on first use (no
# import-time effects).
_PACKED: dict[int, Any] = {}
_KEYS = itertools.count()
_OPS: dict[str, Any] = {}


def _register(owner: object, packed: Any) -> int:
    """Keep ``packed`` under a new key while ``owner`` (its product) lives."""
    key = next(_KEYS)
    _PACKED[key] = packed
    weakref.finalize(owner, _PACKED.pop, key, None)
    return key


def _ops() -> dict[str, Any]:
    if not _OPS:
        # Defined through torch.library.Library with a plain CPU kernel rather than
        # torch.library.custom_op: custom_op's Python wrapper cost ~30 us a call (measured: 62
        # against 38 us for a 576 x 576 product, 32 us direct), a quarter of a compiled fp16
        # step's time at 121 products per step.
        lib = torch.library.Library("streaming_llm", "DEF")
        _OPS["lib"] = lib  # the registrations live as long as the library object
        for name in ("int8_product", "fp16_product"):
            lib.define(f"{name}(Tensor x, int index, int out_features) -> Tensor")
            torch.library.register_fake(f"streaming_llm::{name}", lib=lib)(
                lambda x, index, out_features: x.new_empty((x.shape[0], out_features)))

        def int8_product(u: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic(u, _PACKED[index], True)

        def fp16_product(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic_fp16(x, _PACKED[index])

        lib.impl("int8_product", int8_product, "CPU")
        lib.impl("fp16_product", fp16_product, "CPU")
        _OPS.update(int8=torch.ops.streaming_llm.int8_product,
                    fp16=torch.ops.streaming_llm.fp16_product)
    return _OPS


class Fp16Product:
    """``x @ weight.T + bias`` over float16 weights (fbgemm), float32 in and out."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(
            weight.detach().float().contiguous(), None if bias is None else bias.detach().float())
        self.index, self.out_features = _register(self, self.packed), weight.shape[0]
        self._op = _ops()["fp16"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            rows = x.reshape(-1, x.shape[-1])
            y = self._op(rows, self.index, self.out_features)
            return y.reshape(*x.shape[:-1], self.out_features)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


class Int8Product:
    """``x @ weight.T + bias`` over int8 weights (per output row scales), each input row
    quantized on its own (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # symmetric, one per output row
        with warnings.catch_warnings():
            # torch announces the end of quantized tensors (for torchao); 2.13 still ships them.
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scales.double(),
                                           torch.zeros_like(scales, dtype=torch.long), axis=0,
                                           dtype=torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
        # Sum over the input of the weights as the kernel sees them (dequantized), for the
        # row offsets c: (out,)
        self.row_sums = q.dequantize().sum(dim=1)
        self.bias = None if bias is None else bias.detach().float()
        # A row holding -1 and +1 goes in with the inputs: the input's range is then exactly
        # [-1, 1] whatever the rows' rounding, so fbgemm's scale never depends on the batch.
        self.pin = torch.zeros((1, w.shape[1]))
        self.pin[0, 0], self.pin[0, -1] = -1.0, 1.0
        self.index, self.out_features = _register(self, self.packed), w.shape[0]
        self._op = _ops()["int8"]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        top, bottom = rows.amax(dim=-1, keepdim=True), rows.amin(dim=-1, keepdim=True)
        centre, half = (top + bottom) / 2, ((top - bottom) / 2).clamp_min(1e-12)
        u = ((rows - centre) / half).clamp_(-1.0, 1.0)  # every row spans [-1, 1]
        u = torch.cat((u, self.pin))
        if torch.compiler.is_compiling():
            y = self._op(u, self.index, self.out_features)[:-1]
        else:  # reduce_range: fbgemm's setting on x86
            y = torch.ops.quantized.linear_dynamic(u, self.packed, True)[:-1]
        y = torch.addcmul(half * y, centre, self.row_sums)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def product(kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Fp16Product | Int8Product:
    """The ``kind`` ("fp16" or "int8") product for ``weight`` ``(out, in)`` and ``bias``."""
    if weight.device.type != "cpu":
        raise ValueError(f"{kind} weights (quantize={kind}) run on the CPU; the model is on "
                         f"{weight.device}, where it keeps its own (bfloat16) weights")
    if kind == "fp16":
        return Fp16Product(weight, bias)
    if kind == "int8":
        return Int8Product(weight, bias)
    raise ValueError(f"quantize must be one of {QUANTIZE}, got {kind!r}")
