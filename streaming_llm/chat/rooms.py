"""Rooms: several agents in one conversation, each itself, each seeing the others.

A room is a conversation with more than one participant (``conversation_agents``). This module
holds the rules a room adds to a chat turn; :class:`~streaming_llm.chat.conversations.ConversationManager`
calls them and stores the turns.

**Who speaks** (:func:`pick_speakers`): the chat frame's ``agent_ids`` (a round: each answers in
turn and sees the answers before its own), else its ``agent_id``, else the participants the
message ``@mentions`` (in the order mentioned), else — in a plain conversation — its one agent.
Every speaker must be a participant: ``agent_not_in_conversation`` (in a plain conversation the
older ``conversation_agent_mismatch``), and nothing is stored.

**What a speaker sees** (:func:`speaker_messages`): its own system message (system prompt +
Markdown context), never another agent's; then the shared transcript from its point of view —
its own answers as ``assistant`` messages, the user's as ``user`` messages as in any
conversation, and the other agents' answers as ``user`` messages prefixed with their speaker,
``[Name]: ``. (SmolLM2's chat template, like most, has no ``name`` field: a prefix in the text
works with every template and every engine.) For a plain conversation the result is exactly the
message list it always had.

**Caches** (:func:`cache_key`): in a room each participant's engine state is keyed
``<conversation id>:<agent id>``, so each keeps its own pinned prefix and its own cache of the
transcript; when it speaks again only the turns since its last answer are new to it (the local
engine reports the rest as ``cached_tokens``). A plain conversation keeps its id as the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..engines.base import ChatMessage, ToolCall
from ..errors import BadRequest, Conflict

#: Participants a room may have, and so speakers a round may ask for.
MAX_PARTICIPANTS = 16
# "@alice", "(@alice," or "@Alice" (ids are lower-case; a mention is read case-blind), but not
# "bob@alice.com": a mention starts a word, and the id runs to the first character no id has.
MENTION = re.compile(r"(?<![\w@.])@([A-Za-z0-9_-]{1,64})(?![A-Za-z0-9_-])")


class NotInConversation(Conflict):
    code = "agent_not_in_conversation"


class NoSpeaker(BadRequest):
    code = "no_speaker"


@dataclass(frozen=True)
class Said:
    """One stored turn as the transcript shows it: who said what."""

    role: str  # user | assistant | tool
    agent_id: str | None  # the assistant turn's speaker; None for the user's
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


def is_room(participants: Sequence[str]) -> bool:
    return len(participants) > 1


def cache_key(conversation_id: str, agent_id: str, participants: Sequence[str]) -> str:
    """The engine's key for ``agent_id``'s state of the conversation (see the module docstring)."""
    return f"{conversation_id}:{agent_id}" if is_room(participants) else conversation_id


def cache_keys(conversation_id: str, participants: Iterable[str]) -> list[str]:
    """Every key the engine may hold for the conversation with those participants (plain or
    room): what a delete or a change of participants makes it forget."""
    return [conversation_id, *(f"{conversation_id}:{agent_id}" for agent_id in participants)]


def check_participants(agent_ids: Sequence[str]) -> list[str]:
    """A room's participant list: 1 to :data:`MAX_PARTICIPANTS` distinct agents."""
    if not agent_ids:
        raise BadRequest("agent_ids must name at least one agent")
    if len(agent_ids) > MAX_PARTICIPANTS:
        raise BadRequest(f"a room has at most {MAX_PARTICIPANTS} agents, not {len(agent_ids)}")
    if len(set(agent_ids)) != len(agent_ids):
        raise BadRequest("agent_ids names an agent twice")
    return list(agent_ids)


def mentions(message: str, participants: Sequence[str]) -> list[str]:
    """The participants ``@mentioned`` in ``message``, each once, in the order first mentioned."""
    found: list[str] = []
    for match in MENTION.finditer(message):
        agent_id = match.group(1).lower()
        if agent_id in participants and agent_id not in found:
            found.append(agent_id)
    return found


def pick_speakers(participants: Sequence[str], *, conversation_id: str, agent_id: str,
                  agent_ids: Sequence[str], message: str) -> list[str]:
    """Who answers a chat frame in an existing conversation, in order (see the module docstring).

    Raises :class:`NoSpeaker` for a room frame that names nobody, :class:`NotInConversation`
    (or, for a plain conversation, ``conversation_agent_mismatch``) for a speaker who is no
    participant.
    """
    if agent_ids:
        speakers = check_participants(agent_ids)
    elif agent_id:
        speakers = [agent_id]
    elif is_room(participants):
        speakers = mentions(message, participants)
        if not speakers:
            raise NoSpeaker(f"conversation {conversation_id!r} is a room of "
                            f"{', '.join(participants)}: name agent_id or agent_ids, or "
                            "@mention a participant")
    else:
        speakers = list(participants)
    for speaker in speakers:
        check_speaker(participants, conversation_id, speaker)
    return speakers


def check_speaker(participants: Sequence[str], conversation_id: str, agent_id: str) -> None:
    if agent_id in participants:
        return
    if not is_room(participants):  # a plain conversation answers as it always did
        raise Conflict(
            f"conversation {conversation_id!r} belongs to agent {participants[0]!r}, "
            f"not {agent_id!r}", code="conversation_agent_mismatch")
    raise NotInConversation(f"agent {agent_id!r} is not in conversation {conversation_id!r} "
                            f"(its agents: {', '.join(participants)})")


def speaker_prefix(name: str) -> str:
    """How another speaker's words start, e.g. ``[Bob]: ``."""
    return f"[{' '.join(name.split()) or '?'}]: "


def speaker_messages(agent_id: str, system: str, transcript: Sequence[Said],
                     names: Mapping[str, str]) -> list[ChatMessage]:
    """``agent_id``'s prompt: its system message, then ``transcript`` from its point of view
    (see the module docstring). ``names`` maps agent ids to display names (a deleted agent is
    shown by its id). An assistant turn without a speaker (stored before rooms, or the empty
    answer put in for one never stored) counts as the speaker's own, as it always did."""
    messages = [ChatMessage("system", system)] if system else []
    for said in transcript:
        if said.role == "user":
            messages.append(ChatMessage("user", said.content))
        elif said.role == "tool":  # a call's result: the calling turn's, passed on as it is
            messages.append(ChatMessage("tool", said.content, (), said.tool_call_id))
        elif said.role != "assistant":
            continue
        elif said.agent_id is None or said.agent_id == agent_id:
            messages.append(ChatMessage("assistant", said.content, said.tool_calls))
        elif said.content:  # another agent's empty (failed, cancelled) answer said nothing
            name = names.get(said.agent_id, said.agent_id)
            messages.append(ChatMessage("user", speaker_prefix(name) + said.content))
    return messages
