"""llama.cpp as the yardstick: its own bench tools on the GGUF file a model came from.

``bench speed --llama-bench PATH`` and ``bench concurrency --llama-batched-bench PATH`` run
llama.cpp's ``llama-bench`` / ``llama-batched-bench`` on the same weights as ours, in the same
run, and print both. llama.cpp is never a dependency of the project: build the binaries yourself
from the ``llama-cpp-python`` sdist's ``vendor/llama.cpp`` with ``scripts/build-llama-cpp.sh DIR``
(explicit instruction-set flags; a ``GGML_NATIVE`` build crashed on AMX instructions that a
machine advertised but did not allow).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

BUILD_HINT = "build it with scripts/build-llama-cpp.sh DIR"


def add_binary_argument(parser: argparse.ArgumentParser | Any, tool: str, what: str) -> None:
    """``--<tool> PATH``: the llama.cpp binary a bench runs beside its own figures."""
    parser.add_argument(f"--{tool}", type=Path, metavar="PATH",
                        help=f"llama.cpp's {tool} binary: {what} ({BUILD_HINT})")


def binary_error(path: Path | None, tool: str) -> str | None:
    """Why ``--<tool> PATH`` cannot run (None when it can, or when it was not given)."""
    if path is None or path.is_file():
        return None
    return f"--{tool}: {path} is not a file ({BUILD_HINT})"


def model_gguf(model: str) -> Path | None:
    """The GGUF file behind a ``STREAMING_LLM_MODEL`` setting (``default`` too), as the server
    finds it; None for a folder, hub id or the demo model (llama.cpp then has nothing to run on)."""
    from ..engines.local.loading import gguf_file

    return gguf_file("" if model == "default" else model)


def batched_bench_command(binary: Path, gguf: Path, *, prompt: int, generate: int,
                          parallel: list[int], threads: int) -> list[str]:
    """``llama-batched-bench`` decoding ``generate`` tokens in each of N sequences at once (N in
    ``parallel``), each after its own ``prompt`` tokens (not shared: every conversation of ours
    has its own cache), with a context that holds the largest N (it skips a row that does not
    fit, without a word)."""
    context = max(parallel) * (prompt + generate)
    return [str(binary), "-m", str(gguf), "-c", str(context), "-b", "2048", "-ub", "512",
            "-npp", str(prompt), "-ntg", str(generate), "-npl", ",".join(map(str, parallel)),
            "-t", str(threads), "--output-format", "jsonl"]


def batched_bench(binary: Path, gguf: Path, *, prompt: int, generate: int, parallel: list[int],
                  threads: int) -> dict[int, dict[str, float]]:
    """:func:`parse_batched_bench` of one ``llama-batched-bench`` run (see
    :func:`batched_bench_command`); ``CalledProcessError`` when it fails, ``ValueError`` when a
    row is missing."""
    out = subprocess.run(batched_bench_command(binary, gguf, prompt=prompt, generate=generate,
                                               parallel=parallel, threads=threads),
                         check=True, capture_output=True, text=True)
    rows = parse_batched_bench(out.stdout)
    missing = sorted(set(parallel) - set(rows))
    if missing:
        raise ValueError(f"llama-batched-bench gave no row for {missing} sequences: "
                         f"{out.stdout[-500:]!r}")
    return rows


def parse_batched_bench(text: str) -> dict[int, dict[str, float]]:
    """``llama-batched-bench --output-format jsonl`` as figures per number of sequences:
    ``decode_tokens_per_s`` (``speed_tg``: all sequences' generated tokens over the decode
    time, the aggregate rate) and ``prefill_tokens_per_s`` (``speed_pp``). Lines that are not
    JSON objects (the performance summary it prints last) are passed over."""
    rows: dict[int, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        rows[int(row["pl"])] = {"decode_tokens_per_s": round(float(row["speed_tg"]), 2),
                                "prefill_tokens_per_s": round(float(row["speed_pp"]), 1)}
    return rows
