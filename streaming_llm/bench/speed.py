"""Speed: decode and prefill tokens/s of the engine's step, eager / int8 / compiled, and llama.cpp.

One model (the default model, or ``--model``: a folder, hub id or ``.gguf`` file, converted as the
server converts it), loaded in float32 on the CPU. For each mode in ``--modes``:

``eager``
    The step the local engine runs: one conversation in the batch of the scheduler
    (:class:`~streaming_llm.engines.batch_cache.BatchSinkCache`, bucket 1), HF forward.
``int8``
    The same with every linear layer int8 (:mod:`streaming_llm.engines.int8`).
``compiled``
    The same decode step with the model's forward under ``torch.compile`` (inductor, static
    shapes: one graph per attention span the steps meet, compiled in a warm-up block left out of
    the rates; the first compile's time is reported; a model or device where it fails is
    reported as such). Prefill stays eager.

Figures per mode: decode tokens/s after 16 and after 1,000 tokens of context (``--steps`` steps,
the best of ``--repeats`` blocks) and prefill tokens/s of a 512-token prompt (one forward call
through the conversation's sink cache, best of ``--repeats``).

With ``--llama-bench PATH`` the same run also runs llama.cpp's own ``llama-bench`` (``-p 512 -n
STEPS -d 16,1000``, ``--threads`` threads) on the same weights: the GGUF file the model came
from (the default model's Q4_1), and, when ``llama-quantize`` sits beside ``llama-bench``,
F32 and F16 files made from it; then the ratios ours / llama.cpp. llama.cpp is never a
dependency of the project: build it yourself. Run ``streaming-llm bench speed --help``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ("eager", "int8", "compiled")
CONTEXTS = (16, 1000)
PREFILL = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="STREAMING_LLM_MODEL (default: the default "
                                                    "model)")
    parser.add_argument("--models-dir", default="data/models",
                        help="where a GGUF model is converted once (data/models)")
    parser.add_argument("--modes", default="eager,int8", help=f"comma-separated of {MODES} "
                                                                "(eager,int8)")
    parser.add_argument("--steps", type=int, default=64, help="decode steps per timed block (64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks; the best counts (3)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and llama.cpp) threads (2)")
    parser.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def _load(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[Any, Path | None]:
    """The float32 model, and the GGUF file it came from (None for a folder or hub id)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..engines.local.loading import default_model_file, resolve_source
    from ..settings import Settings

    settings = Settings(model=args.model, models_dir=Path(args.models_dir).resolve())
    source = resolve_source(settings, log)
    gguf = (default_model_file() if not args.model
            else Path(args.model) if args.model.endswith(".gguf") else None)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return model, gguf


def _best(repeats: int, block: Callable[[], float]) -> float:
    return min(block() for _ in range(max(1, repeats)))


def measure_mode(model: Any, args: argparse.Namespace, step: Any = None) -> dict[str, Any]:
    """Decode tokens/s at each context and prefill tokens/s for ``model`` (one mode).

    ``step``: what runs the decode steps (a compiled forward), default ``model``; prefill is
    measured only for the model itself. Every timed block starts from the same prefilled cache,
    so each block takes the same shapes.
    """
    import torch

    from ..engines.batch_cache import BatchSinkCache
    from ..engines.decoding import forward_tokens
    from ..engines.sink_cache import SinkCache

    vocab = model.config.vocab_size
    prompt = torch.randint(10, vocab, (max(*CONTEXTS, PREFILL),),
                           generator=torch.Generator().manual_seed(0)).tolist()
    window = max(*CONTEXTS) + (args.repeats + 1) * args.steps + 8
    figures: dict[str, Any] = {}
    with torch.inference_mode():
        for context in CONTEXTS:
            cache = SinkCache.from_model(model, 4, window)
            forward_tokens(model, cache, prompt[:context], chunk_size=512)

            def block(cache: SinkCache = cache) -> float:
                batch = BatchSinkCache(1)
                batch.join(cache)  # a copy: the cache itself stays at ``context`` tokens
                run = step if step is not None else model
                started = time.perf_counter()
                for _ in range(args.steps):
                    inputs = batch.step_inputs([5], torch.float32)
                    run(**inputs, past_key_values=batch, use_cache=True, logits_to_keep=1)
                    batch.advance()
                return time.perf_counter() - started

            block()  # warm-up (and, compiled, the shapes of this context)
            figures[f"decode_{context}_tokens_per_s"] = round(args.steps / _best(args.repeats,
                                                                                 block), 2)

        def prefill() -> float:
            cache = SinkCache.from_model(model, 4, window)
            started = time.perf_counter()
            forward_tokens(model, cache, prompt[:PREFILL], chunk_size=PREFILL)
            return time.perf_counter() - started

        if step is None:
            prefill()
            figures["prefill_tokens_per_s"] = round(PREFILL / _best(args.repeats, prefill), 1)
    return figures


def _compiled(model: Any, log: Callable[[str], None]) -> tuple[Any, float | str]:
    """``model``'s forward compiled, and the compile time of a first step (or why not)."""
    import torch

    compiled = torch.compile(model.forward, dynamic=False)
    started = time.perf_counter()
    try:
        from ..engines.batch_cache import BatchSinkCache
        from ..engines.decoding import forward_tokens
        from ..engines.sink_cache import SinkCache

        with torch.inference_mode():
            cache = SinkCache.from_model(model, 4, 64)
            forward_tokens(model, cache, [5, 6, 7])
            batch = BatchSinkCache(1)
            batch.join(cache)
            compiled(**batch.step_inputs([5], torch.float32), past_key_values=batch,
                     use_cache=True, logits_to_keep=1)
    except Exception as exc:  # noqa: BLE001 - a model torch.compile cannot take is a figure
        log(f"compiled: torch.compile failed ({type(exc).__name__}: {exc}); eager only")
        return None, f"failed: {type(exc).__name__}"
    seconds = time.perf_counter() - started
    log(f"compiled: first step compiled in {seconds:.1f} s (left out of the rates)")
    return compiled, round(seconds, 1)


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
                if isinstance(value, (int, float)) and theirs.get(key):
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
    if figures.get("compile_s") is not None:
        lines.append(f"\ncompile: {figures['compile_s']}")
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
    if args.llama_bench is not None and not args.llama_bench.is_file():
        print(f"--llama-bench: {args.llama_bench} is not a file", file=sys.stderr)
        return 2

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    model, gguf = _load(args, log)
    figures: dict[str, Any] = {"threads": args.threads, "steps": args.steps, "modes": {}}
    for mode in modes:
        subject = model
        if mode == "int8":
            from ..engines.int8 import quantize_int8

            subject = quantize_int8(copy.deepcopy(model))
        elif mode == "compiled":
            subject, figures["compile_s"] = _compiled(model, log)
            if subject is None:
                continue
        log(f"{mode}: measuring")
        if mode == "compiled":
            figures["modes"][mode] = measure_mode(model, args, step=subject)
        else:
            figures["modes"][mode] = measure_mode(subject, args)
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
