"""``streaming-llm bench quality`` end to end on the tiny random demo model.

Perplexities of random weights mean nothing; what must hold whatever the weights: the table and
the JSON carry every configuration, and before anything is evicted a sink cache (with or without
sinks) computes exactly what a dense cache computes, while after eviction it does not.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from streaming_llm.bench import quality as bench
from streaming_llm.cli import build_parser
from streaming_llm.engines.demo_model import ensure_demo_model

# The demo tokenizer spends 172 tokens on the agent prefix, so the window must be larger.
TINY = ["--tokens", "260", "--window-tokens", "200", "--recompute-stride", "8",
        "--recall-evicted", "300", "--answer-tokens", "3", "--step-tokens", "240", "--json"]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("quality"))


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    code = bench.run(parser.parse_args(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_dispatches_bench_quality() -> None:
    args = build_parser().parse_args(["bench", "quality", "--tokens", "100"])
    assert args.bench_module is bench and args.tokens == 100 and args.window_tokens == 512


def test_packaged_text_is_long_enough() -> None:
    text = bench.read_text(None)
    assert text.count("Alice") > 300 and len(text.split()) > 20_000


def test_tiny_run_reports_every_configuration(demo_model: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--model", str(demo_model), *TINY], capsys)
    assert code == 0
    figures = json.loads(out)
    ppl = figures["ppl"]
    assert ppl["evicting_from"] == 4 + 200 and ppl["tokens"] == 260
    configs = ppl["configs"]
    assert list(configs) == list(bench.CONFIGS)
    for name, row in configs.items():
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1, name
        assert row["ms_per_token"] > 0, name
    assert configs["dense"]["scored_tokens"] == 260 - 204
    assert configs["recompute"]["scored_tokens"] == len(range(204, 260, 8))
    assert configs["pinned"]["sink_tokens"] == configs["pinned"]["prefix_tokens"] > 4

    # Before any eviction the sink caches hold exactly the dense cache's keys and values.
    dense_before = configs["dense"]["ppl_before_eviction"]
    for name in ("window", "sinks"):
        assert configs[name]["ppl_before_eviction"] == pytest.approx(dense_before, rel=1e-5), name
    # ... and once they evict, they no longer do (so the check above compared something).
    assert configs["window"]["ppl"] != pytest.approx(configs["dense"]["ppl"], rel=1e-3)
    # The pinned run reads the agent prefix first, so even its early tokens differ.
    assert configs["pinned"]["ppl_before_eviction"] != pytest.approx(dense_before, rel=1e-3)

    recall = figures["recall"]["rows"]
    assert [(r["config"], r["filler_tokens"]) for r in recall] == [
        ("dense", 300), ("sinks", 300), ("pinned", 300)]
    by_config = {r["config"]: r for r in recall}
    assert by_config["dense"]["evicted_tokens"] == 0
    assert by_config["sinks"]["evicted_tokens"] > 0 and by_config["pinned"]["evicted_tokens"] > 0
    for row in recall:
        assert row["total"] == len(bench.FACTS) == len(row["answers"])
        assert row["correct"] == sum(a["correct"] for a in row["answers"])

    steps = figures["steps"]  # 240 tokens through a 4 + 200 cache: the step evicts too
    assert steps["tokens"] == 240 and list(steps["kinds"]) == ["none", "fp16", "int8"]
    assert [row["step"] for row in steps["kinds"].values()] == ["llama", "llama-fp16",
                                                                "llama-int8"]
    assert steps["kinds"]["none"]["vs_none"] == 0
    for row in steps["kinds"].values():
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1
    assert steps["kinds"]["int8"]["ppl"] != steps["kinds"]["none"]["ppl"]

    table = bench._table(figures)
    assert "through the decode step" in table and "llama-int8" in table
    for name in bench.CONFIGS:
        assert f"\n{name} " in table
    assert "ms/token" in table and "recall of 4 facts" in table


def test_bad_arguments_are_refused(demo_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["--only", "ppl,nonsense"], capsys)
    assert code == 2 and "nonsense" in err
    code, _, err = _run(["--model", str(demo_model), "--tokens", "5000", "--only", "ppl"], capsys)
    assert code == 2 and "trained context of 4096" in err
    code, _, err = _run(["--model", str(demo_model), "--tokens", "60", "--window-tokens", "40",
                         "--only", "ppl"], capsys)
    assert code == 2 and "agent prefix (172 tokens) does not fit" in err
    code, _, err = _run(["--model", str(demo_model), "--tokens", "210", "--window-tokens", "200",
                         "--only", "ppl"], capsys)
    assert code == 2 and "nothing to score" in err


def test_chunked_stream_matches_dense_before_eviction(demo_model: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["--model", str(demo_model), *TINY, "--only", "ppl", "--chunk", "8"],
                        capsys)
    assert code == 0
    configs = json.loads(out)["ppl"]["configs"]
    dense = configs["dense"]["ppl_before_eviction"]
    for name in ("window", "sinks"):
        assert configs[name]["ppl_before_eviction"] == pytest.approx(dense, rel=1e-5), name
    assert configs["window"]["ppl"] != pytest.approx(configs["dense"]["ppl"], rel=1e-5)


def test_steps_of_a_gguf_model_include_the_llama_cpp_runtime(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny GGUF file holds float32 weights: llama.cpp scores the text as the reference path
    does (within float32 rounding), through a cache that evicts (100 tokens, 4 + 48 cells)."""
    from tests.engines.gguf_files import write_tiny_gguf

    gguf, _ = write_tiny_gguf(tmp_path / "tiny.gguf")
    code, out, err = _run(["--model", str(gguf), "--models-dir", str(tmp_path / "models"),
                           "--only", "steps", "--tokens", "100", "--step-tokens", "100",
                           "--window-tokens", "48",
                           "--json"], capsys)
    assert code == 0, err
    kinds = json.loads(out)["steps"]["kinds"]
    assert list(kinds) == ["none", "fp16", "int8", "llama.cpp"]
    assert kinds["llama.cpp"]["step"] == "llama.cpp"
    assert abs(kinds["llama.cpp"]["vs_none"]) < 0.01
