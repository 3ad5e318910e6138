"""The Python half of ``scripts/gpu-check.sh``: the wheels it fetches, the models it builds, the
table it prints.

``requirements``
    The packages the GPU machine lacks, one requirement a line: the project's dependencies
    (pyproject.toml) less what the GPU image already has (torch, transformers and the rest of
    :data:`GPU_IMAGE`) and less ``gguf`` (the check builds safetensors folders, never reads a GGUF
    file), plus the test tools that the CUDA tests and the benches import (:data:`TEST_TOOLS`).
``build DIR SHAPE...``
    A random-weight Llama of each of the :data:`SHAPES` named, in ``DIR/SHAPE``, with the demo model's tokenizer
    (no hub), padded with plain added tokens to the model's vocabulary so that every id the model
    can pick decodes to text (the concurrency bench counts token frames). Speed does not depend
    on the weights.
``table DIR``
    One Markdown table from the benches' JSON files in ``DIR`` (see gpu-check.sh).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Installed on the GPU machines' image (torch 2.11 with CUDA 13, transformers 5.17, ...).
GPU_IMAGE = frozenset({"torch", "transformers", "tokenizers", "safetensors", "accelerate",
                       "aiohttp", "numpy"})
#: Dependencies the check does not need there.
NOT_NEEDED = frozenset({"gguf"})
#: From the ``test`` extra: what the CUDA tests' conftest and the concurrency bench's client import.
TEST_TOOLS = frozenset({"pytest", "pytest-asyncio", "pytest-timeout", "httpx", "websockets"})

#: Model shapes: the real models' (SmolLM2-135M, Llama-3.2-1B) and tiny ones for the CPU dry run.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152),
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                     num_key_value_heads=8, intermediate_size=8192, vocab_size=128256),
    "tiny-a": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=128, vocab_size=1024),
    "tiny-b": dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, vocab_size=512),
}


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def requirements(pyproject: Path = ROOT / "pyproject.toml", *, pinned: bool = False) -> list[str]:
    """What the GPU machine must install; ``pinned``: each at the version installed here, where
    it is (so the GPU run tests what the tests here passed with)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    serving = [r for r in project["dependencies"] if _name(r) not in GPU_IMAGE | NOT_NEEDED]
    tools = [r for r in project["optional-dependencies"]["test"] if _name(r) in TEST_TOOLS]
    missing = TEST_TOOLS - {_name(r) for r in tools}
    assert not missing, f"not in the test extra: {sorted(missing)}"
    return [_pin(r) if pinned else r for r in serving + tools]


def _pin(requirement: str) -> str:
    match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^]]*\])?", requirement)
    assert match, requirement
    try:
        return f"{match.group(0)}=={importlib.metadata.version(match.group(1))}"
    except importlib.metadata.PackageNotFoundError:
        return requirement


def build(target: Path, shape: str, device: str, dtype: str) -> None:
    import torch

    from streaming_llm.engines.demo_model import build_tokenizer
    from tests.engines.model_dirs import write_llama

    values = dict(SHAPES[shape])
    # Both real models tie the output to the embeddings; a small spread keeps bf16 activations
    # in range through 30 layers of random weights.
    write_llama(target, dtype=getattr(torch, dtype), device=device, tie_word_embeddings=True,
                initializer_range=0.02, max_position_embeddings=8192, **values)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([f"<x{i}>" for i in range(len(tokenizer), values["vocab_size"])])
    tokenizer.save_pretrained(target)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def table(results: Path) -> str:
    """The table of one run: a row per model shape and mode, "timed out" / "failed" where a
    stage did (``status`` holds each stage's exit code, written by gpu-check.sh)."""
    status: dict[str, int] = {}
    if (results / "status").is_file():
        for line in (results / "status").read_text().splitlines():
            stage, _, code = line.rpartition(" ")
            status[stage] = int(code)

    def load(stage: str) -> tuple[dict[str, Any] | None, str]:
        path = results / f"{stage}.out"
        code = status.get(stage)
        if code is None:
            return None, "not run"
        if code in (124, 137):
            return None, "timed out"
        if code != 0 or not path.is_file():
            return None, f"failed ({code})"
        try:
            return json.loads(path.read_text()), ""
        except json.JSONDecodeError:
            return None, "bad output"

    shapes = [s for s in SHAPES if any(k.startswith(f"{s}-") for k in status)]
    most = max([int(n) for n in (results / "conversations").read_text().split(",")]
               if (results / "conversations").is_file() else [8])
    lines = [f"| model | mode | decode after 16 tok/s | decode after 1000 tok/s | prefill 512 "
             f"tok/s | {most} conversations, aggregate tok/s | compile s |",
             "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        speed, speed_why = load(f"{shape}-speed")
        for mode in ("eager", "compiled"):
            figures = (speed or {}).get("modes", {}).get(mode)
            rates = ([_cell(figures.get(k)) for k in ("decode_16_tokens_per_s",
                                                       "decode_1000_tokens_per_s",
                                                       "prefill_tokens_per_s")]
                     if figures else [speed_why or "not run"] * 3)
            if figures and figures.get("failed"):
                rates[0] += " (compile failed: eager)"
            together, why = load(f"{shape}-{mode}-concurrency")
            rows = {r["conversations"]: r for r in (together or {}).get("rows", [])}
            aggregate = (_cell(rows[most]["aggregate_tokens_per_s"]) if most in rows
                         else why or "not run")
            compile_s = _cell(figures.get("compile_s")) if figures and mode == "compiled" else "-"
            lines.append(f"| {shape} | {mode} | " + " | ".join(rates)
                         + f" | {aggregate} | {compile_s} |")
    tests = status.get("cuda-tests")
    output = results / "cuda-tests.out"
    summary = ([line for line in output.read_text().splitlines() if line.strip()] or ["-"])[-1] \
        if output.is_file() else "-"
    lines.append("")
    lines.append("CUDA tests (pytest -m cuda): " + ("not run" if tests is None else
                                                    f"exit {tests}, {summary}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    r = commands.add_parser("requirements")
    r.add_argument("--pinned", action="store_true", help="at the versions installed here")
    b = commands.add_parser("build")
    b.add_argument("models", type=Path)
    b.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default="float32")
    t = commands.add_parser("table")
    t.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "requirements":
        print("\n".join(requirements(pinned=args.pinned)))
    elif args.command == "build":
        for shape in args.shapes:
            build(args.models / shape, shape, args.device, args.dtype)
    else:
        print(table(args.results))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # streaming_llm and tests.engines.model_dirs, from a checkout
    sys.exit(main())
