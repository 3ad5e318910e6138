"""``streaming-llm bench structured``: the independent validity check, and a tiny run through the
real engine on the demo model (random weights: every complete answer must still be valid)."""

from __future__ import annotations

import argparse
import json

import pytest

from streaming_llm.bench import structured as bench
from streaming_llm.cli import build_parser


def test_cli_dispatches_bench_structured() -> None:
    args = build_parser().parse_args(["bench", "structured", "--answers", "5"])
    assert args.bench_module is bench and args.answers == 5 and args.temperature == 0.8


@pytest.mark.parametrize(("kind", "text", "ok"), [
    ("schema", '{"name": "Ada", "age": 36, "city": "Lima", "likes_tea": false}', True),
    ("schema", '{"name": "Ada", "age": 360, "city": "Lima", "likes_tea": false}', False),
    ("schema", '{"name": "Ada"', False),
    ("object", '{"a": [1]}', True),
    ("object", "[1]", False),
    ("regex", "07:30", True),
    ("regex", "7:30", False),
    ("tool", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', True),
    ("tool", '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', False),
    ("tool", '<tool_call>\n{"name": "sub", "arguments": {"a": 1, "b": 2}}\n</tool_call>', False),
])
def test_validity_is_checked_without_the_grammar_library(kind: str, text: str, ok: bool) -> None:
    assert bench.valid(kind, text) is ok


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for bad in (["--kinds", "schema,yaml"], ["--answers", "0"], ["--temperature", "3"]):
        assert bench.run(parser.parse_args(bad)) == 2, bad
        assert "bench structured" in capsys.readouterr().err


def test_tiny_run_through_the_engine(capsys: pytest.CaptureFixture[str], tmp_path: object,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMING_LLM_DATA_DIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", "demo", "--answers", "3", "--batch", "2",
                              "--max-new-tokens", "48", "--speed-turns", "1", "--compiles", "1",
                              "--threads", "0", "--json"])
    assert bench.run(args) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["model"] == "streaming-llm/demo"
    assert set(figures["validity"]) == set(bench.KINDS)
    for kind, v in figures["validity"].items():
        assert v["answers"] == 3 and v["valid"] == v["complete"], kind
    assert set(figures["speed"]) == {"1", "2"}
    assert all(s["free"] > 0 and s["constrained"] > 0 for s in figures["speed"].values())
    assert figures["compile_cold_ms"] > figures["compile_cached_ms"] > 0
    assert bench._table(figures).count("\n| ") >= 6
