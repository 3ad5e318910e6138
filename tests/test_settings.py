from pathlib import Path

import pytest

from streaming_llm.settings import Settings, SettingsError, describe, url_list


def test_defaults() -> None:
    s = Settings.from_env({})
    assert (s.host, s.port, s.engine) == ("127.0.0.1", 8000, "local")
    assert s.data_dir == Path("./data")
    assert s.resolved_agents_dir == Path("./data/agents")
    assert s.resolved_database_url.startswith("sqlite+aiosqlite:///")
    assert s.resolved_database_url.endswith("/data/streaming_llm.db")


def test_reads_and_casts_environment() -> None:
    s = Settings.from_env({
        "STREAMING_LLM_PORT": "9001", "STREAMING_LLM_DATA_DIR": "/srv/x",
        "STREAMING_LLM_STREAMING": "off", "STREAMING_LLM_ECHO_DELAY_MS": "2.5",
        "STREAMING_LLM_AGENTS_DIR": "/srv/agents", "STREAMING_LLM_ENGINE": "echo",
    })
    assert s.port == 9001 and s.streaming is False and s.echo_delay_ms == 2.5
    assert s.resolved_agents_dir == Path("/srv/agents") and s.engine == "echo"
    assert s.resolved_database_url == "sqlite+aiosqlite:////srv/x/streaming_llm.db"


def test_overrides_win_over_environment() -> None:
    s = Settings.from_env({"STREAMING_LLM_PORT": "9001"}, port=9002, host=None)
    assert s.port == 9002 and s.host == "127.0.0.1"


@pytest.mark.parametrize(("var", "value", "expected"), [
    ("STREAMING_LLM_PORT", "eighty", "STREAMING_LLM_PORT='eighty' is not valid"),
    ("STREAMING_LLM_PORT", "70000", "STREAMING_LLM_PORT=70000 is not valid: must be <= 65535"),
    ("STREAMING_LLM_ENGINE", "gpt5", "expected one of local, ollama, openai, echo"),
    ("STREAMING_LLM_OLLAMA_URL", "http://a:11434,b:11434", "STREAMING_LLM_OLLAMA_URL='b:11434'"),
    ("STREAMING_LLM_OPENAI_BASE_URL", "", "STREAMING_LLM_OPENAI_BASE_URL='' is not valid"),
    ("STREAMING_LLM_OPENAI_BASE_URL", "localhost:8080/v1", "expected http://... or https://..."),
    ("STREAMING_LLM_LOG_LEVEL", "loud", "STREAMING_LLM_LOG_LEVEL='loud'"),
    ("STREAMING_LLM_STREAMING", "maybe", "STREAMING_LLM_STREAMING='maybe'"),
    ("STREAMING_LLM_ECHO_DELAY_MS", "nan", "must be a finite number"),
    ("STREAMING_LLM_SINK_TOKENS", "-1", "must be >= 0"),
])
def test_bad_values_name_the_variable(var: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected.replace("(", r"\(")):
        Settings.from_env({var: value})


def test_url_settings_take_a_comma_separated_list() -> None:
    s = Settings.from_env({"STREAMING_LLM_OLLAMA_URL": " http://a:11434/, https://b ,,"})
    assert url_list(s.ollama_url) == ["http://a:11434", "https://b"]
    assert url_list(Settings().openai_base_url) == ["http://127.0.0.1:8080/v1"]


def test_every_setting_is_described() -> None:
    rows = list(describe())
    assert len(rows) == len({r[0] for r in rows})
    for var, _default, doc in rows:
        assert var.startswith("STREAMING_LLM_") and doc.endswith(".")


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_cli_refuses_bad_setting(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from streaming_llm.cli import main

    monkeypatch.setenv("STREAMING_LLM_PORT", "nope")
    assert main(["serve"]) == 2
    assert "STREAMING_LLM_PORT" in capsys.readouterr().err
