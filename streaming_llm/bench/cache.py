"""Sink cache benchmark: decode cost over a long stream, vs a dense cache and vs recomputation.

One run, one model: a random-weight Llama built here (8 layers x 512 hidden by default, large
enough that attention cost shows on a CPU). Figures, each with the issue's goal:

* decode latency per token late in a stream (16k tokens seen) vs early (1k), for the sink cache
  (evicting every token, and evicting in chunks as a long generation does) and for a dense cache,
  and the KV bytes each holds at both points (goal: sink ratio <= 1.15, KV bytes flat);
* per-token speed-up of the sink cache over a sliding window with re-computation (each token
  re-encodes the last L tokens from scratch) at cache sizes 256 and 1024 (goal >= 20x at 1024).

Caches are filled by prefill chunks of random tokens, then ``--steps`` decode steps are timed.
Run ``python -m streaming_llm.bench.cache --help`` (or ``streaming-llm bench cache``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

# torch and transformers are imported inside run(): the CLI imports this module to build its
# parser, and `streaming-llm serve` must not pay for that.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (random weights)")
    model.add_argument("--layers", type=int, default=8)
    model.add_argument("--hidden", type=int, default=512)
    model.add_argument("--heads", type=int, default=8)
    model.add_argument("--intermediate", type=int, default=1376)
    model.add_argument("--vocab", type=int, default=4096)
    run = parser.add_argument_group("run")
    run.add_argument("--sink-tokens", type=int, default=4)
    run.add_argument("--window-tokens", type=int, default=1020)
    run.add_argument("--early", type=int, default=1000, help="tokens seen at the early point")
    run.add_argument("--late", type=int, default=16000, help="tokens seen at the late point")
    run.add_argument("--steps", type=int, default=64, help="decode steps timed at each point")
    run.add_argument("--evict-chunk", type=int, default=64,
                     help="tokens evicted at once in the chunked-eviction sink run")
    run.add_argument("--recompute-sizes", default="256,1024",
                     help="cache sizes for the sliding-window-with-recomputation comparison")
    run.add_argument("--recompute-steps", type=int, default=4,
                     help="tokens timed for the recomputation baseline")
    run.add_argument("--prefill-chunk", type=int, default=512)
    run.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--skip-dense", action="store_true", help="skip the (slow) dense run")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def build_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(4096, args.late + 2 * args.steps + args.prefill_chunk))
    return LlamaForCausalLM(config).eval()


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kv_bytes(cache: Any) -> int:
    from ..engines.sink_cache import SinkCache

    if isinstance(cache, SinkCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.keys.numel())


def _decode_ms(model: Any, cache: Any, tokens: list[int], evict_chunk: int) -> float:
    """Mean wall time of one decode step (ms), eviction included, over ``tokens``."""
    from ..engines.decoding import forward_tokens
    from ..engines.sink_cache import SinkCache

    sink = isinstance(cache, SinkCache)
    forward_tokens(model, cache, tokens[:1])  # warm-up step, not timed
    start = time.perf_counter()
    for token in tokens[1:]:
        if sink and cache.get_seq_length() + 1 > cache.capacity:
            cache.make_room(min(evict_chunk, cache.window_tokens))
        forward_tokens(model, cache, [token])
    return (time.perf_counter() - start) * 1000 / (len(tokens) - 1)


def _fill(model: Any, cache: Any, tokens: list[int], chunk: int) -> None:
    from ..engines.decoding import forward_tokens

    if tokens:
        forward_tokens(model, cache, tokens, chunk_size=chunk)


def decode_late_vs_early(model: Any, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from transformers import DynamicCache

    from ..engines.sink_cache import SinkCache

    stream = _ids(args.late + 2 * (args.steps + 1), args.vocab, args.seed + 1)
    runs: dict[str, Any] = {
        "sink": (lambda: SinkCache.from_model(model, args.sink_tokens, args.window_tokens), 1),
        f"sink_evict_{args.evict_chunk}": (
            lambda: SinkCache.from_model(model, args.sink_tokens, args.window_tokens),
            args.evict_chunk),
    }
    if not args.skip_dense:
        runs["dense"] = (DynamicCache, 1)
    results: dict[str, Any] = {}
    for name, (make, evict_chunk) in runs.items():
        cache = make()
        chunk = min(args.prefill_chunk, getattr(cache, "window_tokens", args.prefill_chunk))
        fed = 0
        figures: dict[str, Any] = {}
        for point, seen in (("early", args.early), ("late", args.late)):
            t0 = time.perf_counter()
            _fill(model, cache, stream[fed:seen], chunk)
            fed = max(fed, seen)
            log(f"{name}: filled to {fed} tokens in {time.perf_counter() - t0:.1f}s")
            steps = stream[fed:fed + args.steps + 1]
            figures[f"{point}_ms_per_token"] = _decode_ms(model, cache, steps, evict_chunk)
            fed += len(steps)
            figures[f"{point}_kv_bytes"] = _kv_bytes(cache)
            figures[f"{point}_stored_tokens"] = cache.get_seq_length()
        figures["latency_ratio"] = figures["late_ms_per_token"] / figures["early_ms_per_token"]
        figures["kv_bytes_ratio"] = figures["late_kv_bytes"] / figures["early_kv_bytes"]
        results[name] = figures
    return results


def recompute_speedup(model: Any, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    import torch

    from ..engines.sink_cache import SinkCache

    results: dict[str, Any] = {}
    for size in (int(s) for s in args.recompute_sizes.split(",") if s.strip()):
        stream = _ids(size + args.steps + args.recompute_steps + 2, args.vocab, args.seed + size)
        # Sliding window with re-computation: every token re-encodes the last `size` tokens.
        times = []
        with torch.inference_mode():
            for i in range(args.recompute_steps + 1):
                window = torch.tensor([stream[i + 1:i + 1 + size]])
                t0 = time.perf_counter()
                model(input_ids=window, use_cache=False, logits_to_keep=1)
                times.append(time.perf_counter() - t0)
        recompute_ms = statistics.mean(times[1:]) * 1000  # first one is warm-up
        # The sink cache at the same size, full and evicting every token.
        cache = SinkCache.from_model(model, args.sink_tokens, size - args.sink_tokens)
        _fill(model, cache, stream[:size], min(args.prefill_chunk, cache.window_tokens))
        sink_ms = _decode_ms(model, cache, stream[size:size + args.steps + 1], 1)
        results[str(size)] = {"recompute_ms_per_token": recompute_ms,
                              "sink_ms_per_token": sink_ms, "speedup": recompute_ms / sink_ms}
        log(f"cache {size}: recompute {recompute_ms:.1f} ms, sink {sink_ms:.2f} ms per token")
    return results


def _table(figures: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    for name, f in figures["decode"].items():
        goal = "<= 1.15" if name.startswith("sink") else "grows"
        rows.append((f"{name}: ms/token early -> late",
                     f"{f['early_ms_per_token']:.2f} -> {f['late_ms_per_token']:.2f} "
                     f"(x{f['latency_ratio']:.2f})", goal))
        rows.append((f"{name}: KV bytes early -> late",
                     f"{f['early_kv_bytes'] / 2**20:.1f} -> {f['late_kv_bytes'] / 2**20:.1f} MiB "
                     f"(x{f['kv_bytes_ratio']:.2f})", "flat" if name.startswith("sink") else ""))
    for size, f in figures["recompute"].items():
        rows.append((f"speed-up over recomputation, cache {size}",
                     f"x{f['speedup']:.1f} ({f['recompute_ms_per_token']:.1f} vs "
                     f"{f['sink_ms_per_token']:.2f} ms/token)",
                     ">= 20" if size == "1024" else ""))
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    lines = [f"{'figure':<{width}}  {'measured':<{vwidth}}  goal", "-" * (width + vwidth + 10)]
    lines += [f"{a:<{width}}  {b:<{vwidth}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    figures: dict[str, Any] = {
        "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "parameters": params, "dtype": "float32", "device": "cpu",
                  "threads": torch.get_num_threads()},
        "sink_tokens": args.sink_tokens, "window_tokens": args.window_tokens,
        "early_tokens": args.early, "late_tokens": args.late, "steps": args.steps,
    }
    log(f"model: {args.layers} layers x {args.hidden} hidden, {params / 1e6:.1f}M parameters, "
        f"{torch.get_num_threads()} threads")
    figures["decode"] = decode_late_vs_early(model, args, log)
    figures["recompute"] = recompute_speedup(model, args, log)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(_table(figures))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streaming_llm.bench.cache",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
