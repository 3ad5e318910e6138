"""The built-in demo model, ``STREAMING_LLM_MODEL=demo``: tiny, random weights, for tests.

A tiny Llama-architecture model with random weights (fixed seed) and a byte-level BPE tokenizer
with a chat template, written into ``<data_dir>/demo-model/`` on first start and then loaded with
``from_pretrained`` like any local model. It lets a fresh machine with no hub access serve and
stream end to end; its words are meaningless. Everything is deterministic: the same version of
this module writes the same files (tokenizer merges are computed here, not by a trainer whose
tie-breaking could vary between processes; weights come from a seeded generator).

Layout of the tokenizer: the 256 byte symbols of the GPT-2 byte-level alphabet (so any text,
CJK and emoji included, is encodable and a multi-byte character often spans several tokens),
a few hundred merges learned from :data:`_CORPUS`, and the special tokens below.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DIRNAME = "demo-model"
NAME = "streaming-llm/demo"
# Bump when the files written here change, so an old copy in a data dir is rebuilt.
VERSION = "1"
_VERSION_FILE = "DEMO_MODEL_VERSION"

NOTICE = (
    "demo model: a tiny random-weight model built in, so its words are meaningless; "
    "unset STREAMING_LLM_MODEL for the bundled SmolLM2, or set it to a hub id, folder or .gguf file"
)

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)

# Every turn is "<|role|>\n" + content + "<|end|>\n"; <|end|> is also EOS, so a generated answer
# stops where the template closes the turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

N_MERGES = 256
SEED = 20240101
MODEL_CONFIG: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # larger than usual, so that what it writes depends on the context
    tie_word_embeddings=False,  # the output layer is shaped separately, see _shape_output
)
# Output shaping (see _shape_output): logit offsets per kind of token.
_BIAS_UNWANTED = -4.0  # control bytes, lone bytes of multi-byte characters, role tokens
_BIAS_WORD = 0.5  # merged tokens (pieces of English words) over single letters
_BIAS_EOS = 2.5  # ends answers after a few to a few hundred tokens

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A conversation is a list of turns: the system
prompt, then what the user says and what the assistant answers, again and again. The model
keeps the first tokens as attention sinks and a window of the most recent tokens, so it can
talk for as long as it likes without running out of memory. This is a demo model with random
weights; what it says has no meaning at all, but every token it writes travels through the
same code as the words of a real model would: the chat template, the key and value cache, the
sampler, the scheduler, the queue, the socket and the database. To serve a real model, set
the model setting to the name of a model on the hub or to a directory with its files, then
start the server again. Agents have a name, a system prompt and some context written in
Markdown. You can ask them questions, give them tasks, and read their answers as they stream.
"""

# GPT-2 style pre-tokenization: words with their leading space, numbers, punctuation, spaces.
_WORD = re.compile(r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+""")


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte maps to a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _learn_merges(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE over the byte-level symbols of ``corpus``; ties go to the smallest pair."""
    alphabet = _bytes_to_unicode()
    counts = Counter(
        tuple(alphabet[b] for b in word.encode("utf-8")) for word in _WORD.findall(corpus)
    )
    words = dict(counts)
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def build_tokenizer() -> Any:  # a transformers PreTrainedTokenizerFast
    """The demo tokenizer (byte-level BPE + special tokens + chat template), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for symbol in _bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    merges = _learn_merges(_CORPUS, N_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _write(target: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,  # type: ignore[arg-type]
    )
    # Seeded, and without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).eval()  # float32, the default
    _shape_output(model, tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    tokenizer.save_pretrained(target)
    model.save_pretrained(target)
    (target / "README.md").write_text(f"# {NAME}\n\n{NOTICE}.\n", encoding="utf-8")
    (target / _VERSION_FILE).write_text(VERSION + "\n", encoding="utf-8")


def _shape_output(model: Any, tokenizer: Any) -> None:
    """Make the random model write readable nonsense and stop now and then.

    Untouched, a random byte-level model writes control characters and broken UTF-8 (U+FFFD) that
    look like a bug. Channel 0 of the residual stream is made a constant (every embedding has 1.0
    there and no layer writes to it), so after the final norm it is a positive number whatever the
    context, and column 0 of the output layer then acts as a per-token logit offset.
    """
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        bias = torch.full((len(tokenizer),), _BIAS_UNWANTED)
        special = set(tokenizer.all_special_ids)
        for i in range(len(tokenizer)):
            text = tokenizer.decode([i])
            if i == tokenizer.eos_token_id:
                bias[i] = _BIAS_EOS
            elif i not in special and text.isascii() and (text.isprintable() or text == "\n"):
                bias[i] = _BIAS_WORD if len(text) > 1 else 0.0
        model.lm_head.weight[:, 0] = bias


def is_current(path: Path) -> bool:
    try:
        return (path / _VERSION_FILE).read_text(encoding="utf-8").strip() == VERSION
    except OSError:
        return False


def ensure_demo_model(data_dir: Path) -> Path:
    """Return ``<data_dir>/demo-model``, writing it first if it is missing or out of date.

    The files are built in a temporary directory beside the target and renamed into place, so a
    crash half-way never leaves a broken model that later starts would trust.
    """
    target = Path(data_dir) / DIRNAME
    if is_current(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing the demo model into %s (first start)", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}-", dir=target.parent))
    try:
        _write(tmp)
        if target.exists():  # an older version (or a broken leftover): move it aside first
            stale = Path(tempfile.mkdtemp(prefix=f".{DIRNAME}-old-", dir=target.parent))
            os.replace(target, stale / DIRNAME)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_current(target):  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def describe(path: Path) -> dict[str, object]:
    """A few facts about a written demo model, for logs."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings")
    return {k: config.get(k) for k in keys}
