"""``streaming-llm bench concurrency`` end to end: a real server with the local engine on a tiny
random model, real sockets, 1 and 3 conversations and a joiner. Timings are not asserted (speed
belongs to the benchmark); what is: every turn streams and ends, the conversations really ran in
one batch, and every figure the table shows is in the JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from streaming_llm.bench import cache as bench_cache
from streaming_llm.bench import concurrency as bench
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
                                               "--compile"]))
    assert env["STREAMING_LLM_DEVICE"] == "cuda" and env["STREAMING_LLM_DTYPE"] == "bfloat16"
    assert env["STREAMING_LLM_COMPILE"] == "true"
    assert "STREAMING_LLM_DEVICE" not in bench._server_env(parser.parse_args([]))
