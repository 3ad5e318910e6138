"""Logging set-up: plain readable lines to stderr (journald adds timestamps)."""

from __future__ import annotations

import logging


def configure(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # Alembic announces every plugin at INFO; its migration lines are the ones worth keeping.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
