"""``streaming-llm bench sampling``: the loop measures, and a tiny run through the real engine."""

from __future__ import annotations

import argparse
import json

import pytest

from streaming_llm.bench import sampling as bench
from streaming_llm.cli import build_parser


def test_cli_dispatches_bench_sampling() -> None:
    args = build_parser().parse_args(["bench", "sampling", "--prompts", "2"])
    assert args.bench_module is bench and args.prompts == 2 and args.temperatures == "0.2,0.7"


def test_repeated_ngrams_counts_4grams_seen_before() -> None:
    assert bench.repeated_ngrams([1, 2, 3, 4, 5, 6, 7]) == 0
    assert bench.repeated_ngrams([1, 2, 3]) == 0  # no 4-gram at all
    # 1 2 3 4 1 2 3 4: five 4-grams, the last one (1 2 3 4) seen before
    assert bench.repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert bench.repeated_ngrams([7] * 20) == pytest.approx(16 / 17)


def test_longest_loop_is_the_longest_periodic_stretch() -> None:
    assert bench.longest_loop([1, 2, 3, 4, 5]) == 0
    assert bench.longest_loop([9, 1, 2, 3, 1, 2, 3, 1, 2, 3, 8]) == 6  # period 3, 3 times
    assert bench.longest_loop([5] * 10) == 9
    assert bench.longest_loop(list(range(40)) * 2, max_period=32) == 0  # period 40: not a loop
    assert bench.longest_loop(list(range(40)) * 2, max_period=40) == 40


def test_bad_settings_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for bad in (["--settings", "x=1.1"], ["--settings", "x=3:0"], ["--prompts", "9"],
                ["--temperatures", "5"], ["--only", "loops,nonsense"], ["--seeds", "0"]):
        assert bench.run(parser.parse_args(bad)) == 2, bad
        assert "bench sampling" in capsys.readouterr().err


def test_tiny_run_through_the_engine(capsys: pytest.CaptureFixture[str],
                                     tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMING_LLM_DATA_DIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", "demo", "--prompts", "2", "--max-new-tokens", "12",
                              "--answer-tokens", "3", "--temperatures", "0,0.7",
                              "--settings", "off=1:0,on=2:0.05", "--seeds", "2", "--threads", "0",
                              "--json"])
    assert bench.run(args) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["model"] == "streaming-llm/demo"
    rows = {(r["temperature"], r["setting"]): r for r in figures["rows"]}
    assert set(rows) == {(0.0, "off"), (0.0, "on"), (0.7, "off"), (0.7, "on")}
    for row in rows.values():
        assert row["prompts"] == 2 == len(row["answers"]) and row["facts"] == 4 * 2
        assert row["knowledge"] == len(bench.KNOWLEDGE) * 2
        assert {a["seed"] for a in row["knowledge_answers"]} == {1, 2}
        assert 0 <= row["repeated_4grams"] <= 1 and row["longest_loop"] >= 0
        for answer in row["answers"]:
            assert answer["tokens"] > 0  # the answer text, tokenized again
    # Greedy: penalties change what the model picks, so the two settings differ.
    assert rows[(0.0, "off")]["answers"] != rows[(0.0, "on")]["answers"]
    table = bench._table(figures)
    assert "repeated 4-grams" in table and "longest loop" in table and "knowledge 0/6" in table


def test_only_the_short_questions(capsys: pytest.CaptureFixture[str], tmp_path: object,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMING_LLM_DATA_DIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--model", "demo", "--only", "knowledge", "--answer-tokens", "2",
                              "--temperatures", "0.2", "--settings", "d=1.1:0.05", "--json"])
    assert bench.run(args) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["prompts"] == 0 and "facts" not in row and row["knowledge"] == 3
