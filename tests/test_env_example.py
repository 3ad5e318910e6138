"""``.env.sidecar.example`` against the settings: same variables, same defaults, same text."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streaming_llm import cli
from streaming_llm.env_example import DEPLOY_VARIABLES, render
from streaming_llm.settings import Settings, describe

from .server import ROOT

EXAMPLE = ROOT / ".env.sidecar.example"
REGENERATE = "regenerate it: python -m streaming_llm env-example -o .env.sidecar.example"


def assignments(text: str) -> dict[str, str]:
    """``KEY=value`` lines, commented out (``#KEY=value``) or not."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        body = line.removeprefix("#")
        key, eq, value = body.partition("=")
        if eq and key.isupper() and key.replace("_", "").isalnum():
            assert key not in out, f"{key} is listed twice"
            out[key] = value
    return out


def test_example_lists_every_setting_and_nothing_else() -> None:
    listed = set(assignments(EXAMPLE.read_text()))
    expected = {var for var, _, _ in describe()} | {var for var, _, _ in DEPLOY_VARIABLES}
    missing, unknown = sorted(expected - listed), sorted(listed - expected)
    assert not missing and not unknown, (
        f".env.sidecar.example is out of date (missing {missing}, not a setting {unknown}); "
        + REGENERATE)


def test_example_is_the_generated_text() -> None:
    assert EXAMPLE.read_text() == render(), ".env.sidecar.example differs; " + REGENERATE


def test_example_defaults_are_the_settings_defaults() -> None:
    # Uncommenting every line must change nothing: each value parses to the field's default.
    values = {k: v for k, v in assignments(EXAMPLE.read_text()).items()
              if k.startswith("STREAMING_LLM_")}
    assert Settings.from_env(values) == Settings()
    assert all(not line or line.startswith("#") for line in EXAMPLE.read_text().splitlines()), \
        "every line of the example is a comment: a copy changes nothing until edited"


def test_example_covers_a_new_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    # What another helper's new setting looks like: render() picks it up with no other change.
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class More(Settings):
        api_key: str = dataclasses.field(default="", metadata={
            "doc": "Key clients must send; empty = no key.", "ge": None, "le": None,
            "choices": None})

    monkeypatch.setattr("streaming_llm.settings.Settings", More)
    text = render()
    assert "# Key clients must send; empty = no key.\n#STREAMING_LLM_API_KEY=\n" in text
    assert "STREAMING_LLM_API_KEY" not in EXAMPLE.read_text()  # so the tests above would fail


def test_cli_prints_and_writes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # A broken setting in the environment must not stop the example from being generated.
    monkeypatch.setenv("STREAMING_LLM_PORT", "not-a-port")
    assert cli.main(["env-example"]) == 0
    assert capsys.readouterr().out == render()
    out = tmp_path / "example"
    assert cli.main(["env-example", "-o", str(out)]) == 0
    assert out.read_text() == render()
