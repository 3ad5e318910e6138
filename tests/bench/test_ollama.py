"""``streaming-llm bench ollama`` runs end to end (tiny sizes; speed is not asserted here)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest

from streaming_llm.bench import ollama as bench


@pytest.mark.e2e
def test_bench_ollama_reports_both_paths_as_json(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--tokens", "40", "--rounds", "2", "--warmup", "0", "--json"])

    assert bench.run(args) == 0

    figures = json.loads(capsys.readouterr().out)
    assert figures["tokens"] == 40 and figures["rounds"] == 2
    for path in ("direct", "service"):
        assert figures[path]["tokens_per_s"] > 0
        assert 0 < figures[path]["first_token_ms"] < figures[path]["total_ms"]
    assert 0 < figures["service"]["start_event_ms"] <= figures["service"]["first_token_ms"]
    assert figures["throughput_ratio"] > 0
    if sys.platform == "linux":  # clock-tick resolution: a run this small may read 0
        assert isinstance(figures["service_cpu_us_per_token"], float)
        assert figures["service_cpu_us_per_token"] >= 0
    assert set(figures["met"]) == {"throughput_ratio", "added_first_token_ms"}


def test_bench_ollama_refuses_bad_sizes(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--tokens", "1"])) == 2
    assert "--tokens" in capsys.readouterr().err
