"""The local engine's llama.cpp runtime: GGUF weights run by llama.cpp's library.

The local engine has two ways to run a model, chosen by ``STREAMING_LLM_RUNTIME``:

``torch``
    transformers + torch (:mod:`..step`, :mod:`..sink_cache`): any model transformers loads, on
    CPU or CUDA. A GGUF file is dequantized to float32 once.
``llama.cpp``
    llama.cpp's library through ``llama-cpp-python`` (built from its sdist by ``make install``,
    never a downloaded binary), on the GGUF file as it is: its quantized kernels read 4-5 bits a
    weight where torch's CPU path reads 16 (fp16) and has no fast int4 product on AVX2
    (docs/performance.md). ``auto`` takes it for a GGUF model on CPU with streaming on.

What stays the same is everything above the forward pass: the scheduler (:mod:`..scheduler`)
plans every step, :class:`~..local.caches.Caches` plans every cache, turns render, sample (one
call over all rows, with the constrained-decoding masks) and stream the same events. What this
package provides is what a step touches:

:mod:`.model`
    :class:`LlamaCppModel`: the weights, one llama.cpp context whose KV memory holds ``seqs``
    sequences, and the sequences' residency (:class:`SeqPool`).
:mod:`.cache`
    :class:`SeqCache`: one conversation's cache, the sink cache's semantics (pinned sinks +
    recent window, eviction by shifting positions as llama.cpp's context shift does, rollback,
    copies, bounded rebuilds) over a llama.cpp sequence, or parked as bytes while no sequence
    holds it.
:mod:`.runner`
    :class:`LlamaCppRunner`: executes the scheduler's plan as one ``llama_decode`` per step: the
    joining prompt's chunk and every decoding row in one batch.
"""
