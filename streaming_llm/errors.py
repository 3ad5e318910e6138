"""Domain errors with stable codes.

Each maps to one HTTP status and to the body ``{"error": {"code": ..., "message": ...}}``; the chat
socket sends the same ``code``/``message`` in an ``error`` event. Only unexpected exceptions are
logged with a traceback.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class: an error a client can be told about."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(ServiceError):
    code, status = "bad_request", 400


class InvalidId(BadRequest):
    code = "invalid_id"


class InvalidConstraint(BadRequest):
    """A constraint on the answer (``response_format``, ``tools``, a grammar) that the engine
    cannot enforce: a schema that does not compile, a kind it does not support. ``param`` names
    the request field (OpenAI's ``error.param``), e.g. ``response_format``."""

    code = "invalid_response_format"

    def __init__(self, message: str, *, param: str = "response_format",
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


class ValidationFailed(ServiceError):
    """A body that breaks its type; ``field`` is the path of the bad value (``messages[0].role``)
    when there is one."""

    code, status = "validation_error", 422

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(ServiceError):
    code, status = "not_found", 404


class AgentNotFound(NotFound):
    code = "agent_not_found"


class ConversationNotFound(NotFound):
    code = "conversation_not_found"


class Conflict(ServiceError):
    code, status = "conflict", 409


class EngineError(ServiceError):
    """Raised by engines while generating; text streamed before it is stored with reason ``error``."""

    code, status = "engine_error", 502


class EngineUnavailable(EngineError):
    code, status = "engine_unavailable", 503


class EngineNotReady(EngineUnavailable):
    code = "engine_not_ready"


class ModelNotFound(EngineError):
    code, status = "model_not_found", 404


class EngineTimeout(EngineError):
    """The engine stopped answering (e.g. no chunk from Ollama within the read timeout)."""

    code, status = "engine_timeout", 504


class EngineProtocolError(EngineError):
    """The engine answered something that breaks its wire protocol (a malformed line, no end)."""

    code = "engine_protocol_error"


class Busy(ServiceError):
    """A limit on waiting work is reached (generation slots, a socket's queue): try again."""

    code, status = "busy", 503


class ShuttingDown(ServiceError):
    """The server is draining for a shutdown and starts no new turn."""

    code, status = "shutting_down", 503


class ContextTooLong(ServiceError):
    code, status = "context_too_long", 400


class AgentContextTooLong(EngineError):
    """The agent's pinned prefix (system prompt + Markdown context) leaves too little room for the
    conversation's recent window."""

    code, status = "agent_context_too_long", 400


class StorageUnavailable(ServiceError):
    """The database refused a write or a read (read-only, disk full, locked, I/O error)."""

    code, status = "storage_unavailable", 503


class StorageConflict(Conflict):
    """A constraint of the database refused the write (for example, a row made concurrently)."""

    code = "storage_conflict"


class InvalidTools(BadRequest):
    """Tools, a tool choice or a tool result the server cannot honour (an unknown tool name in
    ``tool_choice``, a result for a call that was never made, too many tools); ``param`` names
    the field, as OpenAI's errors do."""

    code = "invalid_tools"

    def __init__(self, message: str, *, param: str | None, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param
