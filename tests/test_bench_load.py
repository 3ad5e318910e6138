"""The load benchmark as a correctness check (not timed): a small run against a real server, and
its storage verification on databases that did lose and reorder turns."""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

import pytest

from streaming_llm.bench import load
from streaming_llm.cli import build_parser


@pytest.mark.e2e
def test_small_run_stores_every_turn_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["bench", "load", "--sockets", "20", "--turns", "3", "--words", "6", "--ramp-s", "0",
         "--think-ms", "0", "--json"])
    assert args.bench_module is load
    assert load.run(args) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["turns_done"] == figures["turns_expected"] == 60
    assert (figures["errors"], figures["lost"], figures["reordered"]) == (0, 0, 0)
    assert figures["first_token_p50_ms"] > 0 and figures["tokens_per_s"] > 0


def _db(tmp_path: Path, rows: list[tuple[str, int, str, str]]) -> Path:
    tmp_path.mkdir()
    path = tmp_path / "turns.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE turns (conversation_id TEXT, seq INTEGER, role TEXT, content TEXT)")
        db.executemany("INSERT INTO turns VALUES (?, ?, ?, ?)", rows)
    return path


def _result(conversation: str, turns: int) -> load.SocketResult:
    r = load.SocketResult(conversation_id=conversation)
    for t in range(turns):
        r.sent.append(f"m{t}")
        r.answers.append(f"a{t}")
    return r


def test_verify_counts_lost_and_reordered_turns(tmp_path: Path) -> None:
    good = [("c1", 0, "user", "m0"), ("c1", 1, "assistant", "a0"),
            ("c1", 2, "user", "m1"), ("c1", 3, "assistant", "a1")]
    assert load.verify(_db(tmp_path / "ok", good), [_result("c1", 2)]) == {"lost": 0, "reordered": 0}
    lost = good[:3]  # the last answer never reached the database
    assert load.verify(_db(tmp_path / "lost", lost), [_result("c1", 2)]) == {"lost": 1, "reordered": 0}
    swapped = [("c1", 0, "user", "m1"), ("c1", 1, "assistant", "a1"),
               ("c1", 2, "user", "m0"), ("c1", 3, "assistant", "a0")]
    assert load.verify(_db(tmp_path / "swap", swapped), [_result("c1", 2)])["reordered"] == 1
    gap = [("c1", 0, "user", "m0"), ("c1", 2, "assistant", "a0")]
    assert load.verify(_db(tmp_path / "gap", gap), [_result("c1", 1)])["reordered"] == 1


def test_arguments_have_the_issue_defaults() -> None:
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.sockets, args.turns, args.ramp_s, args.think_ms) == (200, 5, 2.0, 1000.0)
