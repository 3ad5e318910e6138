"""``streaming-llm bench cache`` runs end to end on a tiny model and reports what it claims.

Timings are not asserted (speed belongs to the benchmark itself); what is deterministic is: the
sink cache holds the same bytes early and late while the dense cache grows, and every figure the
table shows is in the JSON.
"""

from __future__ import annotations

import argparse
import json

import pytest

from streaming_llm.bench import cache as bench
from streaming_llm.cli import build_parser

TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "64",
        "--window-tokens", "60", "--early", "40", "--late", "300", "--steps", "4",
        "--repeats", "1", "--recompute-sizes", "32", "--threads", "0", "--only", "decode,recompute", "--json"]


def test_cli_dispatches_bench_cache() -> None:
    args = build_parser().parse_args(["bench", "cache", *TINY])
    assert args.bench_module is bench and args.window_tokens == 60


def test_tiny_run_reports_flat_sink_bytes_and_growing_dense_bytes(
        capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(TINY)) == 0
    figures = json.loads(capsys.readouterr().out)
    decode = figures["decode"]
    assert set(decode) == {"sink_evict_1", "sink_evict_3", "dense"}
    for name in ("sink_evict_1", "sink_evict_3"):
        assert decode[name]["early_kv_bytes"] == decode[name]["late_kv_bytes"] > 0
        assert decode[name]["late_stored_tokens"] <= 4 + 60
    assert decode["dense"]["late_kv_bytes"] > 5 * decode["dense"]["early_kv_bytes"]
    assert decode["dense"]["late_stored_tokens"] > 300
    recompute = figures["recompute"]["32"]
    assert recompute["speedup_evict_1"] > 0 and recompute["evict_chunk"] == 1
    table = bench._table(figures)
    assert "speed-up over recomputation, cache 32" in table and "KV bytes" in table


def test_unknown_part_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--only", "decode,nonsense"])) == 2
    assert "nonsense" in capsys.readouterr().err


def test_prefix_part_times_first_and_next_conversation(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--only", "prefix", "--prefix-model", "demo", "--prefix-tokens",
                              "200", "--repeats", "1", "--window-tokens", "256", "--layers", "1",
                              "--hidden", "32", "--heads", "2", "--intermediate", "64", "--json"])
    assert bench.run(args) == 0
    prefix = json.loads(capsys.readouterr().out)["prefix"]
    assert prefix["prefix_tokens"] >= 200 and prefix["model"] == "streaming-llm/demo"
    assert prefix["first_ms"] > 0 and prefix["next_ms"] > 0 and prefix["speedup"] > 0
    assert "first vs next" in bench._table({"model": {"threads": 1, "layers": 1, "hidden": 32,
                                                      "parameters": 1, "dtype": "float32",
                                                      "device": "cpu"},
                                            "sink_tokens": 4, "window_tokens": 256,
                                            "prefix": prefix})


def test_model_option_loads_a_real_model_through_the_engine_loader(
        capsys: pytest.CaptureFixture[str], tmp_path: object,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMING_LLM_DATA_DIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", "demo", "--window-tokens", "60", "--early", "40",
                              "--late", "200", "--steps", "2", "--repeats", "1",
                              "--recompute-sizes", "32", "--threads", "0", "--turns", "2",
                              "--answer-tokens", "2", "--only", "decode,turns", "--json"])
    assert bench.run(args) == 0
    figures = json.loads(capsys.readouterr().out)
    model = figures["model"]
    assert model["name"] == "streaming-llm/demo" and model["layers"] == 2  # not the --layers 8
    assert figures["decode"]["sink_evict_3"]["late_stored_tokens"] <= 4 + 60
    assert figures["turns"]["turns"] == 2 and figures["turns"]["reuse_first_ms"] > 0
    assert "streaming-llm/demo" in bench._table(figures)
