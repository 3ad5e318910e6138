"""``streaming-llm bench cold`` on the demo model: every case runs and reports where the cache
came from (the bench asserts each turn's ``cache_source``). Timings are not asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streaming_llm.bench import cold as bench
from streaming_llm.cli import build_parser

pytestmark = pytest.mark.slow


def test_bench_cold_measures_every_case_on_the_demo_model(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cold.json"
    args = build_parser().parse_args([
        "bench", "cold", "--model", "demo", "--models-dir", str(tmp_path / "models"),
        "--histories", "150,400", "--window-tokens", "64", "--chunk-tokens", "80",
        "--repeats", "1", "--json", str(out)])
    assert args.bench_module is bench
    assert bench.run(args) == 0
    rows = json.loads(out.read_text())
    assert [r["history_tokens"] > h for r, h in zip(rows, (150, 400), strict=True)] == [True, True]
    for row in rows:
        assert row["file_bytes"] > 0 and row["warm_x"] == 1.0
        assert {"evicted_ms", "restart_ms", "rebuilt_ms", "load_ms", "write_ms",
                "window_prefill_ms", "rebuilt_vs_window"} <= set(row)
    assert "| history (tokens) |" in capsys.readouterr().out
