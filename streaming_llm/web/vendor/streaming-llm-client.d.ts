/**
 * streaming-llm-client: agents over REST and streaming chat over the `/ws/chat` WebSocket.
 *
 * No runtime dependencies: it uses the global `fetch` and `WebSocket` (Node callers without a
 * global `WebSocket` pass `socketFactory`, e.g. one built on the `ws` package).
 *
 * API keys: a server with keys configured wants one on every call. REST helpers take it in their
 * last argument, `{ baseUrl, apiKey }` instead of the plain base URL, and send it as
 * `Authorization: Bearer <key>`; `streamChat({ apiKey })` offers it as the WebSocket subprotocols
 * `["bearer", key]` (browsers cannot set headers on a socket; the server answers `bearer`).
 *
 * Naming: everything this package hands you or takes is camelCase (`Agent.systemPrompt`,
 * `Turn.finishReason`, `ChatDoneEvent.usage.completionTokens`, options); the client translates to
 * and from the wire's snake_case. REST resources and socket events share the same `Usage` type.
 *
 * Rooms (several agents in one conversation): `createRoom(['coder', 'reviewer'])` makes one; a
 * stream on it (`streamChat({ backendUrl, agentId: '', conversationId: room.id })`) sends to one
 * agent (`sendMessage({ message, agentId: 'reviewer' })`, or an `@mention`) or to several in turn
 * (`sendRound({ message, agentIds: [...] })`: one result per answer); events name the agent.
 */
export declare const DEFAULT_BASE_URL = "http://localhost:8000";
export interface Agent {
    id: string;
    name: string;
    systemPrompt: string;
    markdownContext: string;
    createdAt?: string;
    updatedAt?: string;
    /** The functions the agent may call in its socket chats (unless a turn sends its own). */
    tools?: Tool[];
}
/** A function the model may call: its name, what it does, its arguments' JSON Schema. */
export interface Tool {
    name: string;
    description?: string;
    parameters?: Record<string, unknown>;
}
/** A tool in OpenAI's shape, as a turn's `tools` take it. */
export interface FunctionTool {
    type: 'function';
    function: Tool;
}
/** `auto` (the default): text or calls; `required`: a call; `none`: no calls; or this tool. */
export type ToolChoice = 'auto' | 'none' | 'required' | {
    type: 'function';
    function: {
        name: string;
    };
};
/** A call the answer made; `arguments` is its JSON text (`JSON.parse` it). */
export interface ToolCall {
    id: string;
    name: string;
    arguments: string;
}
/** The result of a call, sent back with the next turn. */
export interface ToolResult {
    toolCallId: string;
    content: string;
}
/**
 * What `updateAgent` sends. The snake_case spellings (`system_prompt`, `markdown_context`) of
 * client versions before 0.2 are still accepted.
 */
export interface AgentInput {
    id: string;
    name: string;
    systemPrompt?: string;
    markdownContext?: string;
    /** @deprecated use `systemPrompt` */
    system_prompt?: string;
    /** @deprecated use `markdownContext` */
    markdown_context?: string;
    tools?: Tool[];
}
/** Sampling options; unset fields fall back to the stream's defaults, then the server's. */
export interface ChatOptions {
    temperature?: number;
    maxNewTokens?: number;
    topP?: number;
    topK?: number;
    stop?: string[];
    seed?: number;
    /** > 1 discourages repeating any earlier token (1 = off). */
    repetitionPenalty?: number;
    /** Subtracted once from the logit of every token already generated (0 = off). */
    presencePenalty?: number;
    /** Subtracted per occurrence from the logit of tokens already generated (0 = off). */
    frequencyPenalty?: number;
    /** Drop tokens whose probability is below `minP` × the most likely one's (0 = off). */
    minP?: number;
}
export type FinishReason = 'stop' | 'length' | 'cancelled' | 'error';
/** Token counts and timings of one answer; engine-specific fields are present when reported. */
export interface Usage {
    promptTokens: number;
    completionTokens: number;
    cachedTokens?: number;
    evictedTokens?: number;
    droppedTurns?: number;
    timeToFirstTokenMs?: number;
    decodeTokensPerS?: number;
}
export interface ChatStartEvent {
    type: 'start';
    requestId: string;
    conversationId: string;
    /** The stored user turn: the message just sent. */
    userTurnId: string;
    /** @deprecated the same id as `userTurnId` */
    turnId: string;
    /** Who will answer, in order (several: a round in a room); empty from servers before rooms. */
    agentIds: string[];
}
export interface ChatTokenEvent {
    type: 'token';
    requestId: string;
    /** The text of answer pieces `seq` … `seq + count - 1`, joined. */
    token: string;
    seq: number;
    /** Pieces in this event: 1, or more when they came faster than the socket took them. */
    count: number;
    /** In a room: whose answer this is. */
    agentId?: string;
}
export interface ChatDoneEvent {
    type: 'done';
    requestId: string;
    conversationId: string;
    /** The stored assistant turn: the answer. */
    answerTurnId: string;
    /** @deprecated the same id as `answerTurnId` */
    turnId: string;
    finishReason: FinishReason;
    usage: Usage;
    /** The calls the answer made (empty when none): send their results with the next turn. */
    toolCalls: ToolCall[];
    /** Who answered ('' from servers before rooms); a round sends one `done` per answer. */
    agentId: string;
}
export interface ChatErrorEvent {
    type: 'error';
    requestId: string | null;
    code: string;
    message: string;
    /** Set when the turn failed after `start`: its partial answer is stored as `answerTurnId`. */
    conversationId?: string;
    answerTurnId?: string;
    /** @deprecated the same id as `answerTurnId` */
    turnId?: string;
    /** Whose answer failed, when one did. */
    agentId?: string;
}
/**
 * The client's own event: the socket dropped and was reopened (`attempt` counts the tries); the
 * turn in flight (`requestId`, null when there was none) goes on after token `afterSeq`, with no
 * token lost or repeated.
 */
export interface ChatResumedEvent {
    type: 'resumed';
    requestId: string | null;
    afterSeq: number;
    attempt: number;
}
/**
 * What the server sends about a turn, in order: `start`, `token`s, then `done` or `error`; and
 * `resumed` when the client reopened a dropped socket.
 */
export type ChatEvent = ChatStartEvent | ChatTokenEvent | ChatDoneEvent | ChatErrorEvent | ChatResumedEvent;
export interface ChatResult {
    /** The whole answer: the tokens of this turn joined. */
    text: string;
    conversationId: string;
    finishReason: FinishReason;
    usage: Usage;
    requestId: string;
    /** The stored answer. */
    answerTurnId: string;
    /** @deprecated the same id as `answerTurnId` */
    turnId: string;
    /** The calls the answer made (empty when none). */
    toolCalls: ToolCall[];
    /** Who answered. */
    agentId: string;
}
/** A conversation as listed by `GET /conversations`. */
export interface Conversation {
    id: string;
    /** The first participant. */
    agentId: string;
    /** The participants in order: one, or several in a room. */
    agentIds: string[];
    title: string;
    createdAt: string;
    updatedAt: string;
}
/**
 * One stored message of a conversation; assistant turns carry how they finished and the calls
 * they made, `tool` turns the call they answer.
 */
export interface Turn {
    id: string;
    /** 0, 1, 2, ... within the conversation. */
    seq: number;
    role: 'user' | 'assistant' | 'system' | 'tool';
    content: string;
    finishReason: FinishReason | null;
    usage: Usage | null;
    createdAt: string;
    toolCalls?: ToolCall[];
    toolCallId?: string;
    /** Who spoke an answer (rooms); null for the user's turns. */
    agentId: string | null;
}
/** A conversation with its turns in order, from `GET /conversations/{id}`. */
export interface ConversationDetail extends Conversation {
    turns: Turn[];
}
/** `GET /conversations` filters. */
export interface ConversationQuery {
    agentId?: string;
    /** Only conversations whose title or any turn contains this text (case-insensitive). */
    q?: string;
    limit?: number;
    offset?: number;
}
/** `GET /health`: `ready` is false while the engine is still loading. */
export interface Health {
    status: string;
    engine: string;
    model: string;
    ready: boolean;
    detail: string | null;
    version: string | null;
}
/**
 * Where and how the REST helpers reach the server: their last argument is this object or just the
 * base URL (a string).
 */
export interface ClientOptions {
    /**
     * The server, e.g. `http://127.0.0.1:8000` (scheme, host, port, and a path prefix if it is
     * served under one). Default {@link DEFAULT_BASE_URL}, `http://localhost:8000`: pass it whenever
     * the server runs elsewhere, on another port (`STREAMING_LLM_PORT`) included.
     */
    baseUrl?: string;
    /** Sent as `Authorization: Bearer <key>`; needed when the server has API keys configured. */
    apiKey?: string;
    /** Aborts the request: it rejects with an `ApiError` of code `aborted`. */
    signal?: AbortSignal;
}
export interface SendMessageRequest {
    /** May be '' when `toolResults` carries results. */
    message: string;
    /** Who answers in a room (default: the stream's agent; '' : the message's `@mentions`). */
    agentId?: string;
    options?: ChatOptions;
    /** Tools for this turn (else the agent's own, if it declares any). */
    tools?: FunctionTool[];
    toolChoice?: ToolChoice;
    /** Results of the previous answer's calls, stored before `message`. */
    toolResults?: ToolResult[];
    /** Aborting it cancels this turn (sent or still queued); the stream stays open. */
    signal?: AbortSignal;
}
/** The part of the WebSocket interface the client needs; the browser's and `ws`'s both fit. */
export interface WebSocketLike {
    readonly readyState: number;
    send(data: string): void;
    close(code?: number, reason?: string): void;
    addEventListener(type: 'open' | 'message' | 'error' | 'close', listener: (event: any) => void): void;
}
/**
 * Makes a socket. `protocols` is set when the stream has an `apiKey` (`["bearer", key]`) and must
 * be passed on, e.g. `(url, protocols) => new WebSocket(url, protocols)`.
 */
export type SocketFactory = (url: string, protocols?: string[]) => WebSocketLike;
/** A round: several agents of a room answer in turn, each seeing the answers before its own. */
export interface SendRoundRequest {
    message: string;
    agentIds: string[];
    options?: ChatOptions;
    /** Aborting it cancels the round (sent or still queued); the stream stays open. */
    signal?: AbortSignal;
}
export interface StreamChatParams {
    /** The socket URL, e.g. `ws://localhost:8000/ws/chat`. */
    backendUrl: string;
    /** The agent that answers; '' in a room (with `conversationId`) to name one per message. */
    agentId: string;
    /** Defaults for every turn of this stream; per-call options override them field by field. */
    options?: ChatOptions;
    onEvent?: (event: ChatEvent) => void;
    /** Continue an existing conversation instead of starting a new one with the first turn. */
    conversationId?: string;
    /** Makes the socket; defaults to the global `WebSocket`. */
    socketFactory?: SocketFactory;
    /** The server's API key, offered as the subprotocols `["bearer", key]` when the socket opens. */
    apiKey?: string;
    /** Aborting it closes the stream, as `stop()` does (also while the socket is still opening). */
    signal?: AbortSignal;
    /**
     * Tries to reopen a socket that dropped (backoff 0.1, 0.25, 0.5, 1, 2 s, then 2 s apart) and
     * resume the answer in flight; default 5, 0 = a drop ends the stream.
     */
    reconnectAttempts?: number;
}
/** Backoff between reconnect tries, in ms; the last repeats. */
export declare const RECONNECT_DELAYS_MS: number[];
export interface ChatStream {
    /** Queue a turn; resolves on its `done`, rejects with a {@link ChatError} on its `error`. */
    sendMessage(request: SendMessageRequest): Promise<ChatResult>;
    /**
     * Ask several agents of a room to answer in turn; resolves with their answers in order. An
     * error ends the round: the {@link ChatError} holds the answers before it (`results`).
     */
    sendRound(request: SendRoundRequest): Promise<ChatResult[]>;
    /** Close the socket; turns still pending reject with code `stopped`. */
    stop(): void;
    /** Stop the current answer (it finishes with reason `cancelled`); the socket stays open. */
    cancel(): void;
    /**
     * Every event from now on, as an async iterable (the same events `onEvent` gets); it ends when
     * the stream ends. Events arriving while no loop awaits are buffered.
     */
    events(): AsyncIterableIterator<ChatEvent>;
    /** The conversation every turn continues: the caller's, else the one the first turn started. */
    readonly conversationId: string | undefined;
}
/** A REST call failed: `status` is the HTTP status (0 when the server could not be reached). */
export declare class ApiError extends Error {
    readonly status: number;
    readonly code: string;
    constructor(status: number, code: string, message: string, options?: {
        cause?: unknown;
    });
}
/**
 * A chat turn or stream failed. `code` is the server's (`agent_not_found`, `engine_error`, ...)
 * or one of the client's own: `socket_open_failed` (a socket refused for a missing or wrong API
 * key included), `no_websocket`, `socket_closed`, `stopped`, `aborted`, `bad_frame` (the server
 * sent a frame this client cannot read).
 */
export declare class ChatError extends Error {
    readonly code: string;
    readonly requestId: string | null;
    /** A round's answers that ended before the error. */
    results: ChatResult[];
    constructor(code: string, message: string, requestId?: string | null, options?: {
        cause?: unknown;
    });
}
export declare function listAgents(baseUrl?: string | ClientOptions): Promise<Agent[]>;
export declare function getAgent(id: string, baseUrl?: string | ClientOptions): Promise<Agent>;
/** Create or replace the agent `agent.id`; resolves with the agent as stored. */
export declare function updateAgent(agent: AgentInput, baseUrl?: string | ClientOptions): Promise<Agent>;
export declare function deleteAgent(id: string, baseUrl?: string | ClientOptions): Promise<void>;
/**
 * Conversations, most recently active first: all of them, one agent's (`agentId` as a string, the
 * seed's form), or as filtered by a {@link ConversationQuery} (`{ agentId?, q?, limit?, offset? }`).
 */
export declare function listConversations(query?: string | ConversationQuery, baseUrl?: string | ClientOptions): Promise<Conversation[]>;
export declare function getConversation(id: string, baseUrl?: string | ClientOptions): Promise<ConversationDetail>;
/**
 * A new conversation of `agentIds` (several: a room, where each agent answers as itself and sees
 * the others), empty until the first message; resolves with it as stored.
 */
export declare function createRoom(agentIds: string[], init?: {
    title?: string;
}, baseUrl?: string | ClientOptions): Promise<Conversation>;
/** Set a room's participants (the new list, in order); resolves with the conversation as stored. */
export declare function setRoomAgents(id: string, agentIds: string[], baseUrl?: string | ClientOptions): Promise<Conversation>;
/** Set a conversation's title (1-200 characters); resolves with the conversation as stored. */
export declare function renameConversation(id: string, title: string, baseUrl?: string | ClientOptions): Promise<Conversation>;
/**
 * Delete the turns from the user turn `fromSeq` on (it included). Edit-and-resend and regenerate:
 * truncate, then send the (edited) message again in the same conversation.
 */
export declare function truncateConversation(id: string, fromSeq: number, baseUrl?: string | ClientOptions): Promise<void>;
export declare function deleteConversation(id: string, baseUrl?: string | ClientOptions): Promise<void>;
/** The health report; it resolves while the engine loads too (the server answers 503 then). */
export declare function getHealth(baseUrl?: string | ClientOptions): Promise<Health>;
/**
 * Open a chat socket for one agent. Resolves once the socket is open; rejects with a
 * {@link ChatError} if it cannot be opened.
 *
 * Turns are sent one at a time, in the order `sendMessage` was called: a turn goes out when the
 * previous one has ended, so every turn after the first carries the conversation id and any
 * server error can be matched to exactly one turn.
 */
export declare function streamChat(params: StreamChatParams): Promise<ChatStream>;
/** `url` with `?conversation_id=` set (other query parameters kept); `url` itself without one. */
export declare function conversationUrl(url: string, conversationId: string | undefined): string;
