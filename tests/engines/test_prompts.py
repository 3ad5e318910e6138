"""How the local engine writes tools into the prompt: the chat template's own rendering when the
template is tool-aware in the Hermes ``<tool_call>`` form, the generic text form otherwise
(streaming_llm.engines.local.prompts)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from streaming_llm.engines.base import (
    ChatMessage,
    Constraint,
    EngineRequest,
    GenerationOptions,
    ToolCall,
)
from streaming_llm.engines.constraints import parse_tool_calls
from streaming_llm.engines.local.prompts import Prompts, template_tool_format
from streaming_llm.engines.tool_text import TOOLS_PREAMBLE, template_messages

from . import model_dirs as models
from .conftest import MakeEngine
from .streams import drain
from .test_constraints import TOOLS

# A tool-aware template in the Hermes form, written for the demo tokenizer's role tokens the
# way Qwen2.5's is for ChatML: the tools in the system block, each call a <tool_call> block
# after the assistant's text, results in <tool_response> (named, to show the name reaches it).
HERMES = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>\\n' }}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{% endif %}"
    "{{ '## Functions you may call\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\nCall one as <tool_call>\\n{\"name\": ..., \"arguments\": ...}\\n"
    "</tool_call><|end|>\\n' }}"
    "{% elif messages[0].role == 'system' %}"
    "{{ '<|system|>\\n' + messages[0].content + '<|end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}{{ '<|user|>\\n' + message.content + '<|end|>\\n' }}"
    "{% elif message.role == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message.content }}"
    "{% for call in message.tool_calls | default([]) %}"
    "{% if call.function is defined %}{% set call = call.function %}{% endif %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' "
    "+ (call.arguments | tojson) + '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|end|>\\n' }}"
    "{% elif message.role == 'tool' %}"
    "{{ '<|user|>\\n<tool_response name=\"' + message.name + '\">\\n' + message.content "
    "+ '\\n</tool_response><|end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Tool-aware too, but calls are bare JSON with "parameters" (Llama 3.1's way): not what the
# server constrains and parses, so the generic form is used.
BARE_JSON = HERMES.replace(
    "'\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' "
    "+ (call.arguments | tojson) + '}\\n</tool_call>'",
    "'{\"name\": \"' + call.name + '\", \"parameters\": ' + (call.arguments | tojson) + '}'")
# Names ``tools`` but renders nothing of them: searching the source would call it tool-aware.
MENTIONS_TOOLS = "{% if tools %}{% endif %}" + models.tokenizer().chat_template
# Renders tools and calls but refuses the tool role.
NO_TOOL_ROLE = HERMES.replace(
    "{% elif message.role == 'tool' %}",
    "{% elif message.role == 'tool' %}{{ raise_exception('no tool role') }}")

CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
HISTORY = [ChatMessage("system", "You are a test agent."), ChatMessage("user", "weather?"),
           ChatMessage("assistant", "Looking.", (CALL,)),
           ChatMessage("tool", "sunny", tool_call_id="call_1"),
           ChatMessage("user", "and add 2 and 3")]
REQUIRED = Constraint("tool_calls", tools=TOOLS, parallel=False)


def tokenizer(template: str | None) -> Any:
    tok = copy.deepcopy(models.tokenizer())
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.mark.parametrize(("template", "form"), [
    (None, "generic"),  # the demo template: no tools, no tool role
    (HERMES, "template"),
    (BARE_JSON, "generic"),
    (MENTIONS_TOOLS, "generic"),
    (NO_TOOL_ROLE, "generic"),
])
def test_the_template_decides_how_tools_are_written(template: str | None, form: str) -> None:
    assert template_tool_format(tokenizer(template)) == form


def test_a_tool_aware_template_renders_tools_calls_and_results_itself() -> None:
    prompts = Prompts(tokenizer(HERMES), ())
    messages, tools = prompts.chat(HISTORY, REQUIRED)
    assert tools == [{"type": "function", "function": t} for t in TOOLS]
    assert messages[2] == {"role": "assistant", "content": "Looking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1",
                           "name": "get_weather"}
    text = prompts.render(messages, generation_prompt=True, tools=tools)
    assert text.startswith("<|bos|><|system|>\nYou are a test agent.\n\n## Functions you may call\n")
    assert json.dumps({"type": "function", "function": TOOLS[0]}, ensure_ascii=False) in text
    assert ('<|assistant|>\nLooking.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|end|>\n') in text
    assert '<tool_response name="get_weather">\nsunny\n</tool_response>' in text
    assert TOOLS_PREAMBLE not in text  # nothing of the generic form
    # A turn offering no tools renders the same history without the tools' description.
    plain, none = prompts.chat(HISTORY)
    assert none is None and plain == messages
    assert "## Functions" not in prompts.render(plain, generation_prompt=True)
    # The agent's pinned prefix holds the tools the template describes in the system block.
    prefix = prompts.agent_prefix(messages, tools)
    assert prefix.endswith("</tool_call><|end|>\n") and text.startswith(prefix)


def test_other_templates_get_the_generic_form() -> None:
    for template in (None, BARE_JSON):
        prompts = Prompts(tokenizer(template), ())
        messages, tools = prompts.chat(HISTORY, REQUIRED)
        assert tools is None and messages == template_messages(HISTORY, REQUIRED)
        assert TOOLS_PREAMBLE in messages[0]["content"]


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("template", [None, HERMES])
async def test_a_tool_calling_turn_end_to_end(local_engines: MakeEngine, tmp_path: Path,
                                             template: str | None, streaming: bool) -> None:
    """Either way the engine reads the prompt rendered as above (its tokens counted) and its
    constrained answer is a call that parses and validates; in streaming mode (the agent's
    prefix pinned) and in dense mode (the prompt fitted to the context) alike."""
    engine = await local_engines(models.write_llama(tmp_path / "m", chat_template=template),
                                 streaming=streaming)
    assert engine.prompts is not None
    assert engine.prompts.tool_format == ("template" if template else "generic")
    tok = tokenizer(template)
    messages, tools = Prompts(tok, ()).chat(HISTORY, REQUIRED)
    expected = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                       tokenize=False)
    for seed in range(2):
        pieces, finished = await drain(engine.stream(EngineRequest(
            request_id=f"r{seed}", conversation_id=f"c{seed}", messages=HISTORY,
            options=GenerationOptions(temperature=0.8, seed=seed), max_new_tokens=120,
            constraint=REQUIRED)))
        assert finished.usage.prompt_tokens == len(tok(expected, add_special_tokens=False)
                                                   ["input_ids"])
        if streaming and seed:  # the second conversation starts from the first one's prefix
            prefix = Prompts(tok, ()).agent_prefix(messages, tools)
            assert "get_weather" in prefix
            assert finished.usage.cached_tokens == len(tok(prefix, add_special_tokens=False)
                                                       ["input_ids"])
        text, [call] = parse_tool_calls("".join(pieces))
        assert text == "" and finished.reason == "stop"
        tool = next(t for t in TOOLS if t["name"] == call.name)
        jsonschema.validate(call.arguments, tool["parameters"])
    # count_tokens (/v1's prompt limit) renders the history the same way, offering no tools
    plain = tok.apply_chat_template(Prompts(tok, ()).chat(HISTORY)[0],
                                    add_generation_prompt=True, tokenize=False)
    assert engine.count_tokens(HISTORY) == len(tok(plain, add_special_tokens=False)["input_ids"])
