"""Speed: decode and prefill tokens/s of the engine's decode step, per mode, and llama.cpp.

One model (the default model, or ``--model``: a folder, hub id or ``.gguf`` file, converted as the
server converts it), loaded in float32 on the CPU (``--device`` and ``--dtype`` choose others:
``--device cuda --dtype bfloat16`` is what the server runs on a GPU, and
``scripts/gpu-check.sh`` runs it so). Each mode is a decode step of
:mod:`streaming_llm.engines.step` over one conversation (bucket 1 of the scheduler's batch):

``model``
    :class:`~streaming_llm.engines.step.ModelStep`, the model's own transformers forward (the
    step before the written-out one; any architecture).
``eager``
    :class:`~streaming_llm.engines.step.LlamaStep`, what the server runs by default on CPU.
``compiled``
    The same under ``torch.compile`` (``STREAMING_LLM_COMPILE=on``); the compile time of every
    shape is reported and left out of the rates.
``fp16``, ``int8``, ``compiled-fp16``, ``compiled-int8``
    The same (eager or compiled) over fp16 or int8 weights (``STREAMING_LLM_QUANTIZE``, :mod:`~streaming_llm.engines.weights`);
    prefill keeps the model's float32 weights, as in the server.
``llama.cpp``
    The llama.cpp runtime (``STREAMING_LLM_RUNTIME``, the default for a GGUF model on CPU) on the
    GGUF file as it is: the server's step, :class:`~streaming_llm.engines.llamacpp.runner.LlamaCppRunner`
    over one :class:`~streaming_llm.engines.llamacpp.cache.SeqCache`, sampling included.

Figures per mode: decode tokens/s after 16 and after 1,000 tokens of context (``--steps`` steps,
the best of ``--repeats`` blocks) and prefill tokens/s of a 512-token prompt (one forward call
through the conversation's sink cache, best of ``--repeats``). ``--profile`` adds, per mode, the
operators that take a decode step's time (``torch.profiler``, after 16 tokens).

With ``--llama-bench PATH`` the same run also runs llama.cpp's own ``llama-bench`` (``-p 512 -n
STEPS -d 16,1000``, ``--threads`` threads) on the same weights: the GGUF file the model came
from (the default model's Q4_1), and, when ``llama-quantize`` sits beside ``llama-bench``,
F32 and F16 files made from it; then the ratios ours / llama.cpp. llama.cpp is never a
dependency of the project: build it yourself. Run ``streaming-llm bench speed --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .llama_cpp import add_binary_argument, binary_error, model_gguf

MODES = ("llama.cpp", "model", "eager", "compiled", "fp16", "int8", "compiled-fp16",
         "compiled-int8")
CONTEXTS = (16, 1000)
PREFILL = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="STREAMING_LLM_MODEL (default: the default "
                                                    "model)")
    parser.add_argument("--models-dir", default="data/models",
                        help="where a GGUF model is converted once (data/models)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated of {MODES} (all)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed block (64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the best counts (3)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and llama.cpp) threads (2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the model runs (cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the model's weights (float32)")
    add_binary_argument(parser, "llama-bench", "run on the model's GGUF file (and F32/F16 "
                        "copies) after ours, and the ratios")
    parser.add_argument("--profile", action="store_true",
                        help="print the operators that take a decode step's time, per mode")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _load(args: argparse.Namespace, log: Callable[[str], None]) -> Any:
    """The model, ``--dtype`` on ``--device`` (a GGUF file converted as the server converts it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..engines.local.loading import resolve_source
    from ..settings import Settings

    settings = Settings(model=args.model, models_dir=Path(args.models_dir).resolve())
    source = resolve_source(settings, log)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, args.dtype))
    return model.to(args.device).eval()


def _best(repeats: int, block: Callable[[], float]) -> float:
    return min(block() for _ in range(max(1, repeats)))


def measure_mode(model: Any, step: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Decode tokens/s of ``step`` at each context, and prefill tokens/s of ``model``.

    Every timed block starts from the same prefilled cache, so each block takes the same shapes;
    a warm-up block first (where a compiled step compiles its shapes, left out of the rates).
    """
    import torch

    from ..engines.batch_cache import BatchSinkCache
    from ..engines.decoding import forward_tokens
    from ..engines.sink_cache import SinkCache

    vocab = model.config.vocab_size
    # On CUDA a step returns once its kernels are queued: wait for them before reading the clock.
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    prompt = torch.randint(10, vocab, (max(*CONTEXTS, PREFILL),),
                           generator=torch.Generator().manual_seed(0)).tolist()
    window = max(*CONTEXTS) + (args.repeats + 1) * args.steps + 8
    figures: dict[str, Any] = {}
    with torch.inference_mode():
        for context in CONTEXTS:
            cache = SinkCache.from_model(model, 4, window)
            forward_tokens(model, cache, prompt[:context], chunk_size=512)
            # One batch for every block: its buffers keep their addresses, which a CUDA graph
            # replays on (a new batch per block would be a new graph's inputs each time).
            batch = BatchSinkCache(1)

            def block(cache: SinkCache = cache, batch: BatchSinkCache = batch,
                      steps: int = args.steps, around: Any = None) -> float:
                batch.clear()
                batch.join(cache)  # a copy: the cache itself stays at ``context`` tokens
                with around or contextlib.nullcontext():
                    started = time.perf_counter()
                    for _ in range(steps):
                        step(batch, [5])
                    sync()
                    return time.perf_counter() - started

            block()  # warm-up (and, compiled, the shapes of this context)
            figures[f"decode_{context}_tokens_per_s"] = round(args.steps / _best(args.repeats,
                                                                                 block), 2)
            if args.profile and context == min(CONTEXTS):
                figures["profile"] = _profile(lambda prof: block(steps=min(args.steps, 16),
                                                                 around=prof))

        def prefill() -> float:
            cache = SinkCache.from_model(model, 4, window)
            sync()
            started = time.perf_counter()
            forward_tokens(model, cache, prompt[:PREFILL], chunk_size=PREFILL)
            sync()
            return time.perf_counter() - started

        prefill()
        figures["prefill_tokens_per_s"] = round(PREFILL / _best(args.repeats, prefill), 1)
    if getattr(step, "compile_seconds", 0):
        figures["compile_s"] = round(step.compile_seconds, 1)
    return figures


def measure_llama_cpp(gguf: Path, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`measure_mode`'s figures for the llama.cpp runtime: the server's runner and cache
    on ``gguf``, greedy sampling through the server's sampler."""
    import random

    from ..engines.llamacpp.cache import SeqCache
    from ..engines.llamacpp.model import LlamaCppModel
    from ..engines.llamacpp.runner import LlamaCppRunner, ScratchRow
    from ..engines.runner import StepPlan
    from ..engines.scheduler import PREFILL_CHUNK

    window = max(*CONTEXTS) + (args.repeats + 1) * args.steps + 8
    model = LlamaCppModel(gguf)
    try:
        model.open(seqs=3, seq_capacity=-(-(window + 4) // 256) * 256, batch=PREFILL + 8,
                   threads=args.threads)
        runner = LlamaCppRunner(model)
        prompt = random.Random(0).choices(range(10, model.vocab_size), k=max(*CONTEXTS, PREFILL))

        def feed(cache: SeqCache, ids: list[int], chunk: int) -> None:
            for start in range(0, len(ids), chunk):
                part = ids[start:start + chunk]
                runner.execute(StepPlan(feed=ScratchRow(cache, next_token=5), chunk=part,
                                        sample_feed=start + chunk >= len(ids)))

        figures: dict[str, Any] = {}
        for context in CONTEXTS:
            cache = SeqCache(model, 4, window)
            feed(cache, prompt[:context], PREFILL_CHUNK)

            def block(cache: SeqCache = cache) -> float:
                rows = [ScratchRow(cache, next_token=5)]
                started = time.perf_counter()
                for _ in range(args.steps):
                    rows[0].next_token = runner.execute(StepPlan(rows=rows)).tokens[rows[0]]
                elapsed = time.perf_counter() - started
                cache.rollback(args.steps)  # back to ``context`` tokens for the next block
                return elapsed

            block()  # warm-up
            figures[f"decode_{context}_tokens_per_s"] = round(args.steps / _best(args.repeats,
                                                                                 block), 2)

        def prefill() -> float:
            cache = SeqCache(model, 4, window)
            started = time.perf_counter()
            feed(cache, prompt[:PREFILL], PREFILL)
            return time.perf_counter() - started

        prefill()
        figures["prefill_tokens_per_s"] = round(PREFILL / _best(args.repeats, prefill), 1)
        return figures
    finally:
        model.close()


def _profile(block: Callable[[Any], float]) -> list[dict[str, Any]]:
    """The operators that take ``block``'s steps' time: self CPU share, calls, ms per call (top 8).

    A compiled step shows its generated kernels and the products it calls by name
    (``--profile`` compiles with inductor's kernel profiling on).
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    block(prof)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count,
             "ms_per_call": round(e.self_cpu_time_total / max(e.count, 1) / 1000, 3)}
            for e in events[:8]]


def build_mode(model: Any, mode: str) -> tuple[Any, Any]:
    """(model, step) for ``mode``."""
    from ..engines.step import LlamaStep, ModelStep

    if mode == "model":
        return model, ModelStep(model)
    kind = mode.removeprefix("compiled-")
    return model, LlamaStep(model, quantize=kind if kind in ("fp16", "int8") else "none",
                            compile=mode.startswith("compiled"))


def llama_bench(binary: Path, gguf: Path, args: argparse.Namespace,
                log: Callable[[str], None]) -> dict[str, Any]:
    """llama-bench on ``gguf`` (and F32 / F16 copies made with llama-quantize, when beside it)."""
    results: dict[str, Any] = {}
    quantize = binary.with_name("llama-quantize")
    with tempfile.TemporaryDirectory(prefix="streaming-llm-speed-") as tmp:
        files = {"shipped": gguf}
        if quantize.is_file():
            for kind in ("F32", "F16"):
                target = Path(tmp) / f"{gguf.stem}.{kind}.gguf"
                log(f"llama-quantize: {kind}")
                subprocess.run([str(quantize), "--allow-requantize", str(gguf), str(target), kind],
                               check=True, capture_output=True)
                files[kind] = target
        for kind, path in files.items():
            log(f"llama-bench: {kind} ({path.name})")
            out = subprocess.run([str(binary), "-m", str(path), "-p", str(PREFILL), "-n",
                                  str(args.steps), "-d", ",".join(map(str, CONTEXTS)), "-t",
                                  str(args.threads), "-r", str(args.repeats), "-o", "json"],
                                 check=True, capture_output=True, text=True)
            results[kind] = parse_llama_bench(out.stdout)
    return results


def parse_llama_bench(text: str) -> dict[str, float]:
    """llama-bench's JSON (one object per test) as our figure names."""
    figures: dict[str, float] = {}
    for test in json.loads(text):
        rate = round(float(test["avg_ts"]), 2)
        if test.get("n_gen", 0) > 0:
            figures[f"decode_{test.get('n_depth', 0)}_tokens_per_s"] = rate
        elif test.get("n_prompt", 0) > 0 and test.get("n_depth", 0) == min(CONTEXTS):
            figures["prefill_tokens_per_s"] = rate
    return figures


def ratios(ours: dict[str, dict[str, Any]], peer: dict[str, dict[str, float]],
           ) -> dict[str, float]:
    out = {}
    for mode, figures in ours.items():
        for kind, theirs in peer.items():
            for key, value in figures.items():
                if isinstance(value, (int, float)) and key in theirs and theirs[key]:
                    out[f"{mode}/{kind} {key.removesuffix('_tokens_per_s')}"] = round(
                        value / theirs[key], 2)
    return out


def _table(figures: dict[str, Any]) -> str:
    keys = [f"decode_{c}_tokens_per_s" for c in CONTEXTS] + ["prefill_tokens_per_s"]
    lines = ["| decoder | " + " | ".join(k.removesuffix("_tokens_per_s").replace("_", " after ")
                                         .replace("prefill", f"prefill {PREFILL}") for k in keys)
             + " |", "|---" * (len(keys) + 1) + "|"]
    rows = {f"ours, {m}": f for m, f in figures["modes"].items()}
    rows.update({f"llama.cpp, {k}": f for k, f in figures.get("llama_cpp", {}).items()})
    for name, f in rows.items():
        lines.append(f"| {name} | " + " | ".join(str(f.get(k, "-")) for k in keys) + " |")
    for mode, f in figures["modes"].items():
        if f.get("compile_s") is not None:
            lines.append(f"\n{mode}: compiling took {f['compile_s']} s (left out of the rates)")
        if f.get("failed"):
            lines.append(f"\n{mode}: {f['failed']}")
        for row in f.get("profile", []):
            lines.append(f"{mode} profile: {row['share']:.1%} {row['op']} ({row['calls']} calls, "
                         f"{row['ms_per_call']} ms each)")
    for key, value in figures.get("ratios", {}).items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        print(f"--modes: unknown {', '.join(unknown) or '(none)'}; choose from "
              f"{', '.join(MODES)}", file=sys.stderr)
        return 2
    if error := binary_error(args.llama_bench, "llama-bench"):
        print(error, file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    if args.profile:
        # Without it a compiled step is one opaque call in the profile (the C++ wrapper).
        import torch._inductor.config

        torch._inductor.config.cpp.enable_kernel_profile = True
    gguf = model_gguf(args.model)
    model = None
    figures: dict[str, Any] = {"threads": args.threads, "steps": args.steps, "modes": {},
                               "device": args.device, "dtype": args.dtype}
    for mode in modes:
        log(f"{mode}: measuring")
        if mode == "llama.cpp":
            if gguf is None or not gguf.is_file():
                log("llama.cpp: needs the model as a GGUF file (the default model is one)")
                continue
            figures["modes"][mode] = measure_llama_cpp(gguf, args)
            continue
        if model is None:
            model = _load(args, log)
        subject, step = build_mode(model, mode)
        figures["modes"][mode] = measure_mode(subject, step, args)
        if mode.startswith("compiled") and not step.name.endswith("compiled"):
            figures["modes"][mode]["failed"] = "torch.compile failed; eager (see the log)"
    if args.llama_bench is not None:
        if gguf is None or not gguf.is_file():
            log("llama-bench needs the model as a GGUF file (the default model is one)")
        else:
            try:
                figures["llama_cpp"] = llama_bench(args.llama_bench, gguf, args, log)
            except subprocess.CalledProcessError as exc:
                log(f"llama-bench failed ({exc.returncode}): {exc.stderr}")
                return 1
            figures["ratios"] = ratios(figures["modes"], figures["llama_cpp"])
    print(json.dumps(figures, indent=2) if args.json else _table(figures))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="streaming-llm bench speed", description=__doc__)
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
