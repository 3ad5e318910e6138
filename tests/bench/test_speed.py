"""``streaming-llm bench speed`` on a tiny model (model, eager and int8 steps, a profile), and
llama-bench's JSON read into the same figures. Timings are not asserted; the figures' presence
and shape are. (Compiled == eager greedy is tests/engines/test_step.py.)"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from streaming_llm.bench import cache as bench_cache
from streaming_llm.bench import speed as bench
from streaming_llm.cli import build_parser

# What llama-bench -o json prints for -p 512 -n 32 -d 16,1000 (fields we read, values made up).
LLAMA_BENCH_JSON = json.dumps([
    {"n_prompt": 512, "n_gen": 0, "n_depth": 16, "avg_ts": 419.5},
    {"n_prompt": 0, "n_gen": 32, "n_depth": 16, "avg_ts": 56.2},
    {"n_prompt": 512, "n_gen": 0, "n_depth": 1000, "avg_ts": 380.1},
    {"n_prompt": 0, "n_gen": 32, "n_depth": 1000, "avg_ts": 41.4},
])


def test_cli_dispatches_bench_speed() -> None:
    args = build_parser().parse_args(["bench", "speed", "--modes", "eager"])
    assert args.bench_module is bench and args.modes == "eager"


def test_llama_bench_json_becomes_our_figures_and_ratios() -> None:
    peer = bench.parse_llama_bench(LLAMA_BENCH_JSON)
    assert peer == {"prefill_tokens_per_s": 419.5, "decode_16_tokens_per_s": 56.2,
                    "decode_1000_tokens_per_s": 41.4}
    ours = {"eager": {"decode_16_tokens_per_s": 28.1, "decode_1000_tokens_per_s": 20.7,
                      "prefill_tokens_per_s": 839.0}}
    assert bench.ratios(ours, {"F32": peer}) == {"eager/F32 decode_16": 0.5,
                                                 "eager/F32 decode_1000": 0.5,
                                                 "eager/F32 prefill": 2.0}


def test_bad_modes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--modes", "eager,warp"])) == 2
    assert "warp" in capsys.readouterr().err


def test_tiny_run_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_args = argparse.Namespace(hidden=32, intermediate=64, layers=1, heads=2, late=0,
                                    repeats=0, steps=0, prefill_chunk=0, seed=0)
    bench_cache.write_bench_model(tmp_path / "model", model_args)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--modes", "model,eager,int8",
                              "--steps", "2", "--repeats", "1", "--threads", "1", "--profile",
                              "--json"])
    assert bench.run(args) == 0
    figures = json.loads(capsys.readouterr().out)
    for mode in ("model", "eager", "int8"):
        rates = {k: v for k, v in figures["modes"][mode].items() if k != "profile"}
        assert set(rates) == {"decode_16_tokens_per_s", "decode_1000_tokens_per_s",
                              "prefill_tokens_per_s"}
        assert all(v > 0 for v in rates.values())
        ops = [row["op"] for row in figures["modes"][mode]["profile"]]
        assert ops and ("aten::mm" in ops or "aten::addmm" in ops
                        or "quantized::linear_dynamic" in ops)
    assert "| ours, int8 |" in bench._table(figures)


def test_dtype_reaches_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``--dtype`` (and ``--device``, cuda in scripts/gpu-check.sh) choose the measured model."""
    model_args = argparse.Namespace(hidden=32, intermediate=64, layers=1, heads=2, late=0,
                                    repeats=0, steps=0, prefill_chunk=0, seed=0)
    bench_cache.write_bench_model(tmp_path / "model", model_args)
    seen = []
    build = bench.build_mode

    def recording(model, mode):  # type: ignore[no-untyped-def]
        seen.append((next(model.parameters()).dtype, model.device.type))
        return build(model, mode)

    monkeypatch.setattr(bench, "build_mode", recording)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--modes", "eager",
                              "--steps", "2", "--repeats", "1", "--threads", "1",
                              "--dtype", "bfloat16", "--device", "cpu", "--json"])
    assert bench.run(args) == 0
    figures = json.loads(capsys.readouterr().out)
    assert seen == [(torch.bfloat16, "cpu")]
    assert figures["dtype"] == "bfloat16" and figures["modes"]["eager"]["prefill_tokens_per_s"] > 0


def test_the_llama_cpp_mode_runs_the_server_step_on_the_gguf_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.engines.gguf_files import write_tiny_gguf

    gguf, _ = write_tiny_gguf(tmp_path / "tiny.gguf")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", str(gguf), "--modes", "llama.cpp", "--steps", "2",
                              "--repeats", "1", "--threads", "1", "--json"])
    assert bench.run(args) == 0
    figures = json.loads(capsys.readouterr().out)["modes"]["llama.cpp"]
    assert set(figures) == {"decode_16_tokens_per_s", "decode_1000_tokens_per_s",
                            "prefill_tokens_per_s"}
    assert all(value > 0 for value in figures.values())


def test_the_llama_cpp_mode_needs_a_gguf_file(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--model", "demo", "--modes", "llama.cpp",
                                        "--json"])) == 0
    assert "needs the model as a GGUF file" in capsys.readouterr().err
