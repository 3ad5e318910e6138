"""Settings: one frozen object read from ``STREAMING_LLM_*`` environment variables.

Every field has a default, a one-line description and, where one makes sense, bounds. The
environment variable of a field is ``STREAMING_LLM_`` + the field name in upper case. A bad value
raises :class:`SettingsError` naming the variable, so the server refuses to start with a message a
person can act on.

Tests build their own ``Settings(...)`` instead of editing ``os.environ``; ``.env.sidecar.example``
is checked against :func:`describe` so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "STREAMING_LLM_"

ENGINES = ("local", "ollama", "openai", "echo")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("auto", "none", "fp16", "int8")
RUNTIMES = ("auto", "torch", "llama.cpp")


class SettingsError(ValueError):
    """A setting has a value the service cannot use."""


def _f(default: Any, doc: str, *, ge: float | None = None, le: float | None = None,
       choices: tuple[str, ...] | None = None) -> Any:
    return field(default=default, metadata={"doc": doc, "ge": ge, "le": le, "choices": choices})


@dataclass(frozen=True, kw_only=True)
class Settings:
    # --- server -------------------------------------------------------------------------------
    host: str = _f("127.0.0.1", "Address the server listens on.")
    port: int = _f(8000, "TCP port the server listens on.", ge=0, le=65535)
    data_dir: Path = _f(Path("./data"), "Directory for the database, agents and demo model.")
    database_url: str = _f("", "SQLAlchemy URL of the database; empty = sqlite file <data_dir>/streaming_llm.db.")
    agents_dir: Path | None = _f(None, "Directory mirroring agents as Markdown files; empty = <data_dir>/agents.")
    log_level: str = _f("info", "Log level.", choices=LOG_LEVELS)
    log_dir: Path | None = _f(None, "Directory for a log file streaming-llm.log besides stderr; empty = stderr only.")
    shutdown_grace_s: float = _f(10.0, "Seconds running turns may go on after SIGTERM before they are cancelled.", ge=0, le=3600)
    resume_grace_s: float = _f(30.0, "Seconds a turn whose chat socket dropped keeps generating, waiting for the client to reconnect and send resume; then it is cancelled and stored as cancelled. It holds its generation slot meanwhile. 0 = cancel at once.", ge=0, le=3600)
    resume_max_chars: int = _f(16_000_000, "Characters of ended answers kept for a resume across the server (each is kept STREAMING_LLM_RESUME_GRACE_S after it ended); past it the oldest are forgotten early (still stored, no longer resumable).", ge=0, le=1 << 40)
    engine: str = _f("local", "Generation engine: local (Hugging Face model), ollama, openai (any OpenAI-compatible server), or echo (tests only).", choices=ENGINES)
    echo_delay_ms: float = _f(10.0, "Delay between words of the echo test engine, in milliseconds.", ge=0, le=60_000)
    db_busy_timeout_ms: int = _f(5000, "SQLite busy timeout in milliseconds.", ge=0, le=600_000)
    transcripts_dir: Path | None = _f(None, "Directory where a Markdown transcript of every conversation is kept up to date after each answer; empty = off.")

    # --- access -------------------------------------------------------------------------------
    api_key: str = _f("", "API key(s) clients must send, comma-separated (generate with secrets.token_urlsafe(32)); empty = no authentication.")
    api_key_file: Path | None = _f(None, "File of API keys, one per line (# starts a comment); adds to STREAMING_LLM_API_KEY.")
    allowed_origins: str = _f("", "Browser origins allowed to call the API and open the socket, comma-separated (https://app.example.com), or *; empty = same-origin pages and non-browser clients only.")
    allowed_hosts: str = _f("", "Host names clients may use in the Host header, comma-separated (api.example.com, *.example.com), or *; others get 400 host_not_allowed (DNS rebinding); empty = the listen address plus localhost, 127.0.0.1 and ::1 (and this machine's name on 0.0.0.0/::).")
    trusted_proxies: str = _f("", "Reverse proxies (IP addresses or CIDR networks, comma-separated: 127.0.0.1, 10.0.0.0/8) whose X-Forwarded-For and X-Forwarded-Proto are believed; from any other peer they are ignored and the client address (per-client limits, logs) is the connection's. Empty = none.")
    page_remote_images: bool = _f(False, "Let the chat page show images from other sites in answers, each only when the reader clicks it (its Content-Security-Policy then allows https: images); off = such images are never loaded, a link stands in.")

    # --- limits -------------------------------------------------------------------------------
    max_body_bytes: int = _f(16 * 1024 * 1024, "Largest HTTP request body in bytes (the default fits the largest valid agent, every character JSON-escaped); larger ones get 413 payload_too_large.", ge=1024, le=1 << 30)
    max_frame_bytes: int = _f(1024 * 1024, "Largest chat socket frame in bytes; larger ones get frame_too_large (4x this closes the socket).", ge=1024, le=1 << 28)
    max_message_chars: int = _f(200_000, "Longest chat message in characters; longer ones get message_too_large.", ge=1, le=100_000_000)
    max_request_chars: int = _f(200_000, "Characters in all the messages of one /v1/chat/completions request together (the caller's history); more get request_too_large.", ge=1, le=100_000_000)
    max_messages: int = _f(1000, "Messages in one /v1/chat/completions request; more get too_many_messages.", ge=1, le=1_000_000)
    max_prompt_tokens: int = _f(32_768, "Prompt tokens in the messages of one /v1/chat/completions request without a conversation (the caller's history), counted with the engine's tokenizer where it has one (local, echo); more get prompt_too_large.", ge=1, le=100_000_000)
    max_tools: int = _f(64, "Tools one request (or one agent) may offer the model; more get 400 too_many_tools.", ge=1, le=10_000)
    max_tool_schema_bytes: int = _f(65_536, "Bytes of all tool definitions of one request together (names, descriptions, JSON Schemas, as JSON); more get 400 tools_too_large.", ge=256, le=1 << 26)
    max_schema_bytes: int = _f(65_536, "Largest response_format JSON schema, regex or grammar in bytes (compact JSON); larger ones get 400 invalid_response_format.", ge=64, le=1 << 26)
    max_new_tokens_limit: int = _f(4096, "Ceiling for a chat's options.max_new_tokens; above it the chat gets max_new_tokens_too_large.", ge=1, le=1_000_000)
    max_queued_turns: int = _f(8, "Chat turns one socket may queue behind the one it runs; more get busy.", ge=0, le=10_000)
    max_concurrent_generations: int = _f(64, "Answers generated at once across the server; further turns wait for a slot. An engine that reports its batch (the local engine's STREAMING_LLM_MAX_BATCH) lowers it to that batch.", ge=1, le=100_000)
    max_waiting_generations: int = _f(256, "Turns waiting for a generation slot across the server; more get busy.", ge=0, le=1_000_000)
    max_generations_per_client: int = _f(8, "Generation slots one client address may hold at once; its further turns wait while other addresses' turns go ahead.", ge=1, le=100_000)
    send_timeout_s: float = _f(30.0, "Seconds a chat socket may go without taking a frame (a client that stopped reading); then its turn is cancelled and stored as cancelled, its slot freed and the socket closed with 1008.", ge=0.1, le=3600)
    max_connections: int = _f(1000, "Open TCP connections (HTTP and sockets) across the server; more get 503 too_many_connections. Keep it below the descriptor limit (systemd LimitNOFILE).", ge=1, le=1_000_000)
    max_connections_per_address: int = _f(100, "Open TCP connections from one client address; more get 503 too_many_connections. Behind a reverse proxy every client shares its address: raise it to max_connections.", ge=1, le=1_000_000)
    header_timeout_s: float = _f(10.0, "Seconds a connection has to send a request's headers (from connect, or from the request's first byte); then it is closed (slowloris).", ge=0.1, le=3600)
    body_timeout_s: float = _f(60.0, "Seconds a request has to send its whole body once the headers are in; then 408 request_timeout and the connection closes.", ge=0.1, le=3600)
    idle_timeout_s: int = _f(5, "Seconds an idle keep-alive HTTP connection stays open between requests.", ge=1, le=3600)

    # --- local engine -------------------------------------------------------------------------
    model: str = _f("", "Model: a hub id, a local folder or a .gguf file; empty = the bundled SmolLM2-135M-Instruct (Q4_1 GGUF); demo = a tiny random-weight model (tests).")
    models_dir: Path | None = _f(None, "Directory for GGUF files converted to safetensors (one folder per file content); empty = <data_dir>/models.")
    runtime: str = _f("auto", "What runs the local engine's model: llama.cpp (a GGUF file as it is, its quantized CPU kernels, through llama-cpp-python built from source by make install), torch (transformers: any model, CPU or CUDA; a GGUF file is dequantized once), or auto = llama.cpp for a GGUF model on CPU with streaming on, torch otherwise. Both serve the same sink cache, batching, disk tier and events (docs/engines.md).", choices=RUNTIMES)
    device: str = _f("auto", "Torch device for the local engine (auto = cuda when present, else cpu).", choices=DEVICES)
    dtype: str = _f("auto", "Weights dtype for the local engine (auto = bfloat16 on CUDA, float32 on CPU).", choices=DTYPES)
    quantize: str = _f("auto", "Lighter weights for the local engine's decode step on CPU: none (the dtype above), fp16 (half the bytes per token, perplexity unchanged) or int8 (a quarter, each input row quantized on its own, +6 to 8 % perplexity); auto = fp16 for float32 Llama-family weights on CPU, else none. Prefill keeps the model's weights. See bench speed and bench quality --only steps.", choices=QUANTIZE)
    compile: bool = _f(True, "Run the decode step under torch.compile (CUDA graphs on CUDA), built ahead of use: the engine serves the eager step at once while a niced child process compiles one graph per batch bucket (minutes on a 2-core CPU, the first time), and takes each graph in while no conversation decodes. Graphs persist under <data_dir>/compile/ (keyed by torch, CPU capability, model, weights mode), so a restart loads them in seconds. A failure logs one warning and serves eager.")
    streaming: bool = _f(True, "Use the StreamingLLM attention-sink KV cache (off = dense cache, oldest turns dropped).")
    sink_tokens: int = _f(4, "Attention-sink tokens kept at the start of the KV cache.", ge=0, le=1024)
    window_tokens: int = _f(2000, "Recent tokens kept in the KV cache (clamped below the model's trained context).", ge=16, le=1_048_576)
    pin_agent_prefix: bool = _f(True, "Pin the whole rendered agent prefix (system prompt + Markdown context) as the cache's sinks, never evicted; off = only sink_tokens sinks, as in the StreamingLLM paper.")
    shared_prefixes: int = _f(4, "Agent prefixes whose KV cache is kept and copied into each new conversation (0 = prefill every time).", ge=0, le=1000)
    max_batch: int = _f(0, "Conversations the local engine decodes together in one batch; more wait their turn in arrival order (0 = 8 on CPU, 32 on CUDA).", ge=0, le=4096)
    cached_conversations: int = _f(8, "Conversation KV caches kept in memory at most (least recently used leave first, for the disk tier); see also kv_memory_bytes.", ge=0, le=10_000)
    kv_memory_bytes: int = _f(0, "Bytes of conversation KV caches kept in memory (least recently used leave first, for the disk tier); 0 = a quarter of the machine's memory.", ge=0, le=2**50)
    kv_disk_bytes: int = _f(-1, "Bytes of conversation KV cache files under <data_dir>/kv/<instance_id> (least recently used removed first); -1 = a quarter of the free disk there at start, at most 64 GiB; 0 = no disk tier (a conversation that left memory or a restart rebuilds from its last window).", ge=-1, le=2**50)
    instance_id: str = _f("", "This instance's name for its own files: its KV cache folder is <data_dir>/kv/<instance_id>, locked while it serves; empty = <hostname>-<port>. Give each instance sharing a data dir its own.")
    max_new_tokens: int = _f(512, "Default max_new_tokens when a chat frame does not set it.", ge=1, le=1_000_000)

    # --- ollama engine ------------------------------------------------------------------------
    ollama_url: str = _f("http://127.0.0.1:11434", "Base URL of the Ollama server; a comma-separated list spreads turns over several.")
    ollama_model: str = _f("llama3.2", "Ollama model name used for chats.")
    ollama_keep_alive: str = _f("5m", "Ollama keep_alive for the model (e.g. 5m, 1h, -1).")
    ollama_connect_timeout_s: float = _f(5.0, "Timeout to connect to Ollama, in seconds.", ge=0.1, le=600)
    ollama_read_timeout_s: float = _f(120.0, "Longest wait for the next chunk from Ollama, in seconds.", ge=0.1, le=3600)
    ollama_num_ctx: int = _f(0, "Context size passed to Ollama as options.num_ctx; 0 = Ollama's default.", ge=0, le=1_048_576)

    # --- openai engine ------------------------------------------------------------------------
    openai_base_url: str = _f("http://127.0.0.1:8080/v1", "Base URL (ending in /v1) of an OpenAI-compatible server: vLLM, llama-server, another streaming-llm; a comma-separated list spreads turns over several.")
    openai_model: str = _f("", "Model name sent upstream; empty = the first model the server lists at /v1/models.")
    openai_api_key: str = _f("", "API key sent upstream as Authorization: Bearer (never logged); empty = none.")
    openai_connect_timeout_s: float = _f(5.0, "Timeout to connect to the OpenAI-compatible server, in seconds.", ge=0.1, le=600)
    openai_read_timeout_s: float = _f(120.0, "Longest wait for the next event from the OpenAI-compatible server, in seconds.", ge=0.1, le=3600)

    # --- what is read from an upstream (ollama, openai), after decompression -------------------
    upstream_max_line_bytes: int = _f(1_048_576, "Longest line (Ollama) or event (server-sent events) an upstream may send, and longest tool call it may assemble from an event's pieces; a longer one ends the turn with engine_protocol_error.", ge=1024, le=1_073_741_824)
    upstream_max_body_bytes: int = _f(1_048_576, "Most bytes read of an upstream's error answer (the rest is dropped) or health-probe answer (a longer one fails the probe).", ge=1024, le=1_073_741_824)
    upstream_max_answer_bytes: int = _f(16_777_216, "Most bytes read from an upstream for one answer; past them the answer ends with finish_reason length and the connection is closed.", ge=1024, le=1_073_741_824)

    # --- several backends (a list in OLLAMA_URL or OPENAI_BASE_URL) ---------------------------
    backend_retry_s: float = _f(1.0, "First wait before a backend that refused connections is probed again; doubles each failed probe.", ge=0.01, le=3600)
    backend_retry_max_s: float = _f(30.0, "Longest wait between probes of a backend that is down.", ge=0.01, le=3600)

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise SettingsError(
                f"STREAMING_LLM_MAX_NEW_TOKENS={self.max_new_tokens} is not valid: must be <= "
                f"STREAMING_LLM_MAX_NEW_TOKENS_LIMIT ({self.max_new_tokens_limit})")
        if self.instance_id and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", self.instance_id):
            raise SettingsError(f"STREAMING_LLM_INSTANCE_ID={self.instance_id!r} is not valid: "
                                "letters, digits, '.', '_' and '-', at most 64, a letter or "
                                "digit first (it names a folder)")
        for name in ("ollama_url", "openai_base_url"):
            for url in url_list(getattr(self, name)):
                if not url.startswith(("http://", "https://")):
                    raise SettingsError(f"{env_name(name)}={url!r} is not valid: expected "
                                        "http://... or https://... (comma-separated for several)")

    @property
    def resolved_agents_dir(self) -> Path:
        return self.agents_dir if self.agents_dir is not None else self.data_dir / "agents"

    @property
    def models_path(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def kv_path(self) -> Path:
        """This instance's KV cache folder (the disk tier)."""
        name = self.instance_id or re.sub(r"[^A-Za-z0-9._-]", "_",
                                          f"{socket.gethostname()}-{self.port}")[:64]
        return self.data_dir / "kv" / name

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'streaming_llm.db').resolve()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from ``STREAMING_LLM_<NAME>``; ``overrides`` win over the environment."""
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = env_name(f.name)
            if var in env:
                values[f.name] = _cast(var, hints[f.name], env[var])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def url_list(text: str) -> list[str]:
    """The URLs of a comma-separated setting, blanks dropped and trailing slashes removed."""
    return [url.strip().rstrip("/") for url in text.split(",") if url.strip()] or [""]


def env_name(field_name: str) -> str:
    return PREFIX + field_name.upper()


def describe() -> Iterator[tuple[str, str, str]]:
    """Yield ``(VARIABLE, default as written in an env file, description)`` for every setting."""
    for f in dataclasses.fields(Settings):
        default = f.default
        if default is None:
            text = ""
        elif isinstance(default, bool):
            text = "true" if default else "false"
        else:
            text = str(default)
        yield env_name(f.name), text, f.metadata["doc"]


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _cast(var: str, hint: Any, raw: str) -> Any:
    raw = raw.strip()
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if optional and raw == "":
        return None
    try:
        if base is bool:
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected one of true/false/1/0/yes/no/on/off")
        if base is int:
            return int(raw)
        if base is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("must be a finite number")
            return value
        if base is Path:
            return Path(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"{var}={raw!r} is not valid: {exc}") from None


def _check(f: dataclasses.Field[Any], value: Any) -> None:
    var = env_name(f.name)
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise SettingsError(f"{var}={value!r} is not valid: expected one of {', '.join(meta['choices'])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("ge") is not None and value < meta["ge"]:
            raise SettingsError(f"{var}={value!r} is not valid: must be >= {meta['ge']}")
        if meta.get("le") is not None and value > meta["le"]:
            raise SettingsError(f"{var}={value!r} is not valid: must be <= {meta['le']}")
