"""Schemathesis against ``/openapi.json`` of a real server: every documented operation, with
generated valid and invalid requests, answers as the document says and never with a 5xx.

Budgeted for ``make test``: 25 cases per operation and mode, the same every run;
``SCHEMATHESIS_EXAMPLES=N`` runs N new random ones."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.auths import GLOBAL_AUTH_STORAGE
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .server import start_server

pytestmark = pytest.mark.e2e

KEY = "schemathesis-key-0123456789"


class BearerKey:
    def get(self, case: Any, ctx: Any) -> str:
        return KEY

    def set(self, case: Any, data: str, ctx: Any) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    env = {"STREAMING_LLM_ENGINE": "echo", "STREAMING_LLM_ECHO_DELAY_MS": "0",
           "STREAMING_LLM_API_KEY": KEY}
    with start_server(tmp_path_factory.mktemp("schemathesis"), env) as server:
        req = urllib.request.Request(
            f"{server.base_url}/agents/helper", method="PUT",
            data=json.dumps({"name": "Helper", "system_prompt": "Echo."}).encode(),
            headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=10):
            pass
        schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json",
                                               headers={"authorization": f"Bearer {KEY}"})
        schema.base_url = server.base_url  # type: ignore[misc]
        # Through schemathesis' auth, so that its auth check can also send each request
        # without the key and expect 401.
        schemathesis.auth()(BearerKey)
        try:
            yield schema
        finally:
            GLOBAL_AUTH_STORAGE.unregister()
        assert server.proc.poll() is None, "the server died under schemathesis"
        log = server.log()
        assert "Traceback" not in log, log[-4000:]


EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "25"))
# Rules the document cannot state, so "schema-valid" data may still be refused with a clear 400:
# the OpenAI endpoint mirrors OpenAI's request type and refuses the features it lacks (tools,
# n > 1, a last message that is not the user's, ...); so does the Anthropic one (its blocks).
SEMANTIC_400 = {"POST /v1/chat/completions", "POST /v1/messages"}


def _agent_rules(case: Any) -> Any:
    """``PUT /agents/{agent_id}``: a body ``id``, when present, must repeat the path's, the
    name must not be blank (Python's idea of blank, which no JSON Schema pattern can state), and
    the agent's tools must have distinct names (``uniqueItems`` compares whole items)."""
    if isinstance(case.body, dict):
        if "id" in case.body:
            case.body["id"] = case.path_parameters["agent_id"]
        if isinstance(case.body.get("name"), str) and not case.body["name"].strip():
            case.body["name"] += "x"
        tools = case.body.get("tools")
        if isinstance(tools, list):
            for i, tool in enumerate(tools):
                if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                    tool["name"] = f"{tool['name'][:60]}_{i}"
    return case


def exercise(operation: Any, mode: GenerationMode) -> None:
    """One hypothesis run of ``operation`` in ``mode``, every applicable check on each case."""
    excluded = [positive_data_acceptance] if operation.label in SEMANTIC_400 else []
    strategy = operation.as_strategy(generation_mode=mode)
    if operation.label == "PUT /agents/{agent_id}" and mode is GenerationMode.POSITIVE:
        strategy = strategy.map(_agent_rules)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck),
              derandomize="SCHEMATHESIS_EXAMPLES" not in os.environ)  # make test: same cases
    @given(case=strategy)
    def check(case: Any) -> None:
        case.call_and_validate(excluded_checks=excluded)

    check()


def test_openapi_operations(api_schema: Any) -> None:
    # Driven by hand rather than with schemathesis' pytest plugin, whose fixture loader does not
    # work with pytest 9: one hypothesis run per operation and generation mode.
    failures: list[str] = []
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10, [op.label for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                exercise(operation, mode)
            except Unsatisfiable:
                continue  # no parameters or body to make invalid: nothing to send in this mode
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - reported below
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    assert not failures, "\n\n".join(failures)
