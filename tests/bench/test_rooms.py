"""``streaming-llm bench rooms`` end to end on the tiny demo model: a real server, a room of
three agents, two rounds. Timings are not asserted (speed belongs to the benchmark); what is:
every agent answered in every round, in order, the figures add up, and from the second round on
each speaker's cache served part of its prompt."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from streaming_llm.bench import rooms as bench
from streaming_llm.cli import build_parser

pytestmark = pytest.mark.e2e


def test_cli_dispatches_bench_rooms() -> None:
    args = build_parser().parse_args(["bench", "rooms", "--rounds", "3"])
    assert args.bench_module is bench and args.rounds == 3 and args.agents == 4


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--agents", "9"])) == 2
    assert "--agents" in capsys.readouterr().err


def test_smoke_run_on_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--agents", "3", "--rounds", "3", "--max-new-tokens", "4",
                              "--model", "demo", "--threads", "1", "--timeout-s", "300",
                              "--compile", "false", "--json"])
    assert bench.run(args) == 0
    figures = json.loads(capsys.readouterr().out)
    rounds = figures["rounds_table"]
    assert [r["round"] for r in rounds] == [1, 2, 3] and not figures["errors"]
    for r in rounds:
        assert list(r["first_token_ms"]) == ["ada", "boris", "chloe"]
        assert all(ms is not None and ms > 0 for ms in r["first_token_ms"].values())
    assert figures["round_last_over_round_2"] is not None
    prefill = figures["prefill"]
    assert prefill["copied_transcript_tokens"] == sum(r["prompt_tokens"] for r in rounds)
    assert prefill["room_tokens"] == sum(r["prefilled_tokens"] for r in rounds)
    # Later rounds prefill only what is new to each speaker: less than their whole prompts.
    assert rounds[-1]["prefilled_tokens"] < rounds[-1]["prompt_tokens"]
    assert prefill["saved_tokens"] > 0
    # The last speaker's cache may still be closing its answer when /health is read.
    assert figures["kv_bytes"] > 0 and figures["cached_conversations"] in (2, 3)
    assert figures["stored_bytes"] > 0
    assert "over round 2" in bench._table(figures)
