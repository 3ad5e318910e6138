"""``streaming-llm bench concurrency`` end to end: a real server with the local engine on a tiny
random model, real sockets, 1 and 3 conversations and a joiner. Timings are not asserted (speed
belongs to the benchmark); what is: every turn streams and ends, the conversations really ran in
one batch, and every figure the table shows is in the JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from streaming_llm.bench import cache as bench_cache
from streaming_llm.bench import concurrency as bench
from streaming_llm.bench import llama_cpp
from streaming_llm.cli import build_parser


def test_cli_dispatches_bench_concurrency() -> None:
    args = build_parser().parse_args(["bench", "concurrency", "--conversations", "1,4"])
    assert args.bench_module is bench and args.conversations == "1,4"


def test_bad_conversation_list_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--conversations", "1,x"])) == 2
    assert "--conversations" in capsys.readouterr().err


@pytest.mark.e2e
def test_smoke_run_on_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_args = argparse.Namespace(hidden=32, intermediate=64, layers=1, heads=2, late=0,
                                    repeats=0, steps=0, prefill_chunk=0, seed=0)
    bench_cache.write_bench_model(tmp_path / "model", model_args)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--conversations", "1,3", "--max-new-tokens", "12", "--model",
                              str(tmp_path / "model"), "--threads", "1", "--timeout-s", "300",
                              "--compile", "false",
                              "--json"])
    assert bench.run(args) == 0
    figures = json.loads(capsys.readouterr().out)
    one, three = figures["rows"]
    assert (one["conversations"], three["conversations"]) == (1, 3)
    assert one["tokens"] == 12 and three["tokens"] == 36  # the tiny model never stops early
    assert one["batch_size"] == 1 and three["batch_size"] == 3
    assert not one["errors"] and not three["errors"]
    joiner = figures["joiner"]
    assert joiner["joined_first_token_ms"] > 0 and not joiner["errors"]
    assert set(figures["ratios"]) >= {"aggregate_3_over_1", "per_conversation_min_3_over_1",
                                      "joiner_first_token_over_alone"}
    table = bench._table(figures)
    assert "| 3 |" in table and "joiner" in table


def test_device_and_dtype_reach_the_spawned_server() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    env = bench._server_env(parser.parse_args(["--device", "cuda", "--dtype", "bfloat16",
                                               "--compile", "false", "--threads", "3"]))
    assert env["STREAMING_LLM_DEVICE"] == "cuda" and env["STREAMING_LLM_DTYPE"] == "bfloat16"
    assert env["STREAMING_LLM_COMPILE"] == "false" and env["OMP_NUM_THREADS"] == "3"
    assert env["STREAMING_LLM_ENGINE"] == "local"
    assert env["STREAMING_LLM_MAX_CONCURRENT_GENERATIONS"] == "64"
    default = bench._server_env(parser.parse_args([]))
    assert "STREAMING_LLM_DEVICE" not in default and "STREAMING_LLM_COMPILE" not in default


# What `llama-batched-bench -m SmolLM2-135M-Instruct.Q4_1.gguf -c 1024 -b 2048 -ub 512 -npp 64
# -ntg 64 -npl 1,8 -t 2 --output-format jsonl` printed on its stdout, as it was (llama.cpp from
# the llama-cpp-python 0.3.36 sdist, built as scripts/build-llama-cpp.sh builds it; the 2-core
# box at load 1.0; the log and the performance summary go to stderr).
BATCHED_BENCH_STDOUT = (
    '{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, '
    '"is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, '
    '"pp": 64, "tg": 64, "pl": 1, "n_kv": 128, "t_pp": 0.212529, "speed_pp": 301.135376, '
    '"t_tg": 0.467221, "speed_tg": 136.980148, "t": 0.679750, "speed": 188.304535}\n'
    '{"n_kv_max": 2048, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, '
    '"is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, '
    '"pp": 64, "tg": 64, "pl": 8, "n_kv": 1024, "t_pp": 1.857920, '
    '"speed_pp": 275.576996, "t_tg": 2.901439, "speed_tg": 176.464157, "t": 4.759359, '
    '"speed": 215.155029}\n'
    "\n"
)


def test_batched_bench_jsonl_becomes_figures_per_sequences() -> None:
    rows = llama_cpp.parse_batched_bench(BATCHED_BENCH_STDOUT)
    assert set(rows) == {1, 8}
    for n, row in rows.items():
        line = next(json.loads(x) for x in BATCHED_BENCH_STDOUT.splitlines()
                    if x.startswith("{") and json.loads(x)["pl"] == n)
        assert row == {"decode_tokens_per_s": round(line["speed_tg"], 2),
                       "prefill_tokens_per_s": round(line["speed_pp"], 1)}
    assert rows[8]["decode_tokens_per_s"] > rows[1]["decode_tokens_per_s"]


def _fake_batched_bench(tmp_path: Path, stdout: str) -> Path:
    """A stand-in for the llama.cpp binary (never a dependency of the project): records its
    arguments, prints what the real one printed."""
    (tmp_path / "stdout").write_text(stdout)
    binary = tmp_path / "llama-batched-bench"
    binary.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\ncat {tmp_path}/stdout\n')
    binary.chmod(0o755)
    return binary


def _ours() -> dict[str, Any]:
    rows = [{"conversations": n, "prompt_tokens": p, "aggregate_tokens_per_s": a,
             "steady_tokens_per_s": s, "per_conversation_min_tokens_per_s": 1.0,
             "per_conversation_median_tokens_per_s": 1.0, "first_token_p50_ms": 1.0,
             "first_token_p99_ms": 1.0, "batch_size": n, "answer_tokens": [64] * n, "errors": []}
            for n, p, a, s in ((1, 60, 30.0, 30.0), (8, 62, 80.0, 120.0))]
    return {"rows": rows, "joiner": {}, "ratios": bench._ratios(rows, {})}


@pytest.mark.process
def test_llama_batched_bench_runs_at_our_shape_and_stands_beside_ours(tmp_path: Path) -> None:
    binary = _fake_batched_bench(tmp_path, BATCHED_BENCH_STDOUT)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--max-new-tokens", "64", "--threads", "2"])
    figures, gguf = _ours(), tmp_path / "model.gguf"
    bench._beside_llama_cpp(figures, binary, gguf, args, [1, 8], lambda message: None)

    # Our longest prompt, our answer length, our threads, every N of ours, room for all N.
    argv = (tmp_path / "argv").read_text().split()
    assert argv == ["-m", str(gguf), "-c", str(8 * (62 + 64)), "-b", "2048", "-ub", "512",
                    "-npp", "62", "-ntg", "64", "-npl", "1,8", "-t", "2", "--output-format",
                    "jsonl"]
    theirs = llama_cpp.parse_batched_bench(BATCHED_BENCH_STDOUT)
    one, eight = figures["rows"]
    assert one["llama_cpp_tokens_per_s"] == theirs[1]["decode_tokens_per_s"]
    assert eight["llama_cpp_tokens_per_s"] == theirs[8]["decode_tokens_per_s"]
    ratios = figures["ratios"]
    assert ratios["aggregate_8_over_llama_cpp"] == round(80.0 / eight["llama_cpp_tokens_per_s"], 2)
    assert ratios["steady_8_over_llama_cpp"] == round(120.0 / eight["llama_cpp_tokens_per_s"], 2)
    assert ratios["llama_cpp_8_over_1"] == round(theirs[8]["decode_tokens_per_s"]
                                                 / theirs[1]["decode_tokens_per_s"], 2)
    assert ratios["aggregate_8_over_1"] == 2.67  # ours stay
    assert figures["llama_cpp"]["prompt_tokens"] == 62 and figures["llama_cpp"]["threads"] == 2
    table = bench._table(figures)
    assert "llama.cpp tok/s | aggregate ÷ llama.cpp |" in table
    assert (f"| {eight['llama_cpp_tokens_per_s']} | {ratios['aggregate_8_over_llama_cpp']} |"
            in table.splitlines()[3])
    assert "llama.cpp" not in bench._table(_ours())


@pytest.mark.process
def test_a_missing_row_of_llama_batched_bench_is_an_error(tmp_path: Path) -> None:
    only_one = "\n".join(line for line in BATCHED_BENCH_STDOUT.splitlines()
                         if '"pl": 8' not in line)
    binary = _fake_batched_bench(tmp_path, only_one)
    with pytest.raises(ValueError, match=r"no row for \[8\]"):
        llama_cpp.batched_bench(binary, tmp_path / "model.gguf", prompt=62, generate=64,
                                parallel=[1, 8], threads=2)


@pytest.mark.parametrize(("extra", "message"), [
    (["--llama-batched-bench", "/nonexistent/llama-batched-bench"], "is not a file"),
    (["--llama-batched-bench", __file__, "--model", "demo"], "GGUF file"),
])
def test_llama_batched_bench_needs_a_binary_and_a_gguf_model(
        extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(extra)) == 2
    assert message in capsys.readouterr().err
