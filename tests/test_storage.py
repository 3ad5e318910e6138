"""Alembic owns the schema: migrations run on a real SQLite file, up and down."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command

from streaming_llm.storage.database import alembic_config, upgrade_to_head


def test_upgrade_creates_schema_and_downgrade_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "db.sqlite"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade_to_head(url)
    with sqlite3.connect(path) as db:
        cols = [r[1] for r in db.execute("PRAGMA table_info(turns)")]
        assert cols[:6] == ["id", "conversation_id", "seq", "role", "content", "finish_reason"]
        assert {"prompt_tokens", "completion_tokens", "usage", "created_at"} <= set(cols)
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == ("0001",)
    upgrade_to_head(url)  # idempotent
    with alembic_config(url) as cfg:
        command.downgrade(cfg, "base")
    with sqlite3.connect(path) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert names == {"alembic_version"}


def test_models_match_migrations(tmp_path: Path) -> None:
    """Autogenerate finds nothing to do: the models and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from streaming_llm.storage.models import Base

    path = tmp_path / "db.sqlite"
    upgrade_to_head(f"sqlite+aiosqlite:///{path}")
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []
