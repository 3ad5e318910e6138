"""README and ``docs/``: the generated settings page is current, and every link lands.

``docs/settings.md`` is generated from :mod:`streaming_llm.settings` like ``.env.sidecar.example``
(``tests/test_env_example.py``); the snippets of README and the pages run in ``test_readme.py``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from streaming_llm import cli
from streaming_llm.env_example import DEPLOY_VARIABLES, render_markdown
from streaming_llm.settings import Settings, describe

from .server import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
SETTINGS_PAGE = DOCS / "settings.md"
REGENERATE = ("regenerate it: make docs "
              "(python -m streaming_llm env-example --format markdown -o docs/settings.md)")
PAGES = ("protocol.md", "api.md", "security.md", "performance.md", "architecture.md", "deploy.md",
         "settings.md", "engines.md", "clients.md", "storage.md")


def test_settings_page_is_the_generated_text() -> None:
    assert SETTINGS_PAGE.read_text() == render_markdown(), "docs/settings.md differs; " + REGENERATE


def test_settings_page_has_one_row_per_setting_with_its_default() -> None:
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|",
                                            SETTINGS_PAGE.read_text(), re.M)}
    expected = {var: f"`{default}`" if default else "empty" for var, default, _ in describe()}
    expected |= {var: f"`{default}`" if default else "empty" for var, default, _ in DEPLOY_VARIABLES}
    assert rows == expected, REGENERATE


def test_settings_page_covers_a_new_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another helper's new field shows up with no change here, its text escaped for Markdown.
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class More(Settings):
        future_knob: int = dataclasses.field(default=3, metadata={
            "doc": "Rows per <batch> | *at most*.", "ge": 1, "le": 9, "choices": None})

    monkeypatch.setattr("streaming_llm.settings.Settings", More)
    text = render_markdown()
    assert ("| `STREAMING_LLM_FUTURE_KNOB` | `3` | 1 to 9 | Rows per &lt;batch&gt; \\| \\*at most\\*. |"
            in text)
    assert "STREAMING_LLM_FUTURE_KNOB" not in SETTINGS_PAGE.read_text()  # the first test would fail


def test_cli_writes_the_settings_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMING_LLM_PORT", "not-a-port")  # documents the settings, needs none
    out = tmp_path / "settings.md"
    assert cli.main(["env-example", "--format", "markdown", "-o", str(out)]) == 0
    assert out.read_text() == render_markdown()


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to ``-``."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    out, fence = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#+ (.*)", line)):
            out.add(anchor(m[1]))
    return out


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("document", documents(), ids=lambda p: p.name)
def test_every_relative_link_lands(document: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", document.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http://, https://, mailto:
        file, _, fragment = target.partition("#")
        path = (document.parent / file).resolve() if file else document
        if not path.exists():
            broken.append(target)
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            broken.append(target)
    assert not broken, f"{document.name}: links to nothing: {broken}"


def test_readme_is_short_and_points_to_every_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 400, "README is the front page: put details in docs/"
    missing = [page for page in PAGES if f"(docs/{page}" not in text]
    assert not missing, f"README does not link {missing}"
    assert all((DOCS / page).exists() for page in PAGES)
