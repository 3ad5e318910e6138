"""write_atomically: the target is replaced whole, and no temp file outlives a failed write."""

from __future__ import annotations

from pathlib import Path

import pytest

from streaming_llm.files import write_atomically


def test_writes_and_replaces_leaving_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "new" / "a.md"
    write_atomically(target, b"first")
    write_atomically(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["a.md"]


def test_a_failed_rename_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "a.md"
    (target / "inside").mkdir(parents=True)  # a non-empty directory: the rename over it fails
    with pytest.raises(OSError):
        write_atomically(target, b"new", temp_prefix=".a.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.md"]
    assert target.is_dir()
