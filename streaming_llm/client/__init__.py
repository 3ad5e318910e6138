"""The Python client (:mod:`streaming_llm.client.api`) and the terminal chat
(:mod:`streaming_llm.client.chat_cli`, ``streaming-llm chat``).

``from streaming_llm.client import stream_chat, list_agents, ...`` is the public import path; the
names below are those of :mod:`streaming_llm.client.api`. Only msgspec and aiohttp are imported.
"""

from ..protocol import Done, Error, Start, Token
from ..wire import Agent, FinishReason, GenerationOptions, Tool, ToolCall, Usage
from .api import (
    DEFAULT_BASE_URL,
    ApiError,
    ChatError,
    ChatEvent,
    ChatResult,
    ChatStream,
    Options,
    Resumed,
    Room,
    conversation_url,
    create_room,
    delete_agent,
    get_agent,
    list_agents,
    socket_url,
    stream_chat,
    update_agent,
    update_room,
)

__all__ = [
    "DEFAULT_BASE_URL", "Agent", "ApiError", "ChatError", "ChatEvent", "ChatResult", "ChatStream",
    "Done", "Error", "FinishReason", "GenerationOptions", "Options", "Resumed", "Room", "Start",
    "Token", "Tool", "ToolCall", "Usage",
    "conversation_url", "create_room", "delete_agent", "get_agent", "list_agents", "socket_url",
    "stream_chat", "update_agent", "update_room",
]
