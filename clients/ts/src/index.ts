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

export const DEFAULT_BASE_URL = 'http://localhost:8000'

// --- types -----------------------------------------------------------------------------------

export interface Agent {
  id: string
  name: string
  systemPrompt: string
  markdownContext: string
  createdAt?: string
  updatedAt?: string
  /** The functions the agent may call in its socket chats (unless a turn sends its own). */
  tools?: Tool[]
}

/** A function the model may call: its name, what it does, its arguments' JSON Schema. */
export interface Tool {
  name: string
  description?: string
  parameters?: Record<string, unknown>
}

/** A tool in OpenAI's shape, as a turn's `tools` take it. */
export interface FunctionTool {
  type: 'function'
  function: Tool
}

/** `auto` (the default): text or calls; `required`: a call; `none`: no calls; or this tool. */
export type ToolChoice = 'auto' | 'none' | 'required' | { type: 'function'; function: { name: string } }

/** A call the answer made; `arguments` is its JSON text (`JSON.parse` it). */
export interface ToolCall {
  id: string
  name: string
  arguments: string
}

/** The result of a call, sent back with the next turn. */
export interface ToolResult {
  toolCallId: string
  content: string
}

/**
 * What `updateAgent` sends. The snake_case spellings (`system_prompt`, `markdown_context`) of
 * client versions before 0.2 are still accepted.
 */
export interface AgentInput {
  id: string
  name: string
  systemPrompt?: string
  markdownContext?: string
  /** @deprecated use `systemPrompt` */
  system_prompt?: string
  /** @deprecated use `markdownContext` */
  markdown_context?: string
  tools?: Tool[]
}

/** Sampling options; unset fields fall back to the stream's defaults, then the server's. */
export interface ChatOptions {
  temperature?: number
  maxNewTokens?: number
  topP?: number
  topK?: number
  stop?: string[]
  seed?: number
  /** > 1 discourages repeating any earlier token (1 = off). */
  repetitionPenalty?: number
  /** Subtracted once from the logit of every token already generated (0 = off). */
  presencePenalty?: number
  /** Subtracted per occurrence from the logit of tokens already generated (0 = off). */
  frequencyPenalty?: number
  /** Drop tokens whose probability is below `minP` × the most likely one's (0 = off). */
  minP?: number
}

export type FinishReason = 'stop' | 'length' | 'cancelled' | 'error'

/** Token counts and timings of one answer; engine-specific fields are present when reported. */
export interface Usage {
  promptTokens: number
  completionTokens: number
  cachedTokens?: number
  evictedTokens?: number
  droppedTurns?: number
  timeToFirstTokenMs?: number
  decodeTokensPerS?: number
}

export interface ChatStartEvent {
  type: 'start'
  requestId: string
  conversationId: string
  /** The stored user turn: the message just sent. */
  userTurnId: string
  /** @deprecated the same id as `userTurnId` */
  turnId: string
  /** Who will answer, in order (several: a round in a room); empty from servers before rooms. */
  agentIds: string[]
}

export interface ChatTokenEvent {
  type: 'token'
  requestId: string
  /** The text of answer pieces `seq` … `seq + count - 1`, joined. */
  token: string
  seq: number
  /** Pieces in this event: 1, or more when they came faster than the socket took them. */
  count: number
  /** In a room: whose answer this is. */
  agentId?: string
}

export interface ChatDoneEvent {
  type: 'done'
  requestId: string
  conversationId: string
  /** The stored assistant turn: the answer. */
  answerTurnId: string
  /** @deprecated the same id as `answerTurnId` */
  turnId: string
  finishReason: FinishReason
  usage: Usage
  /** The calls the answer made (empty when none): send their results with the next turn. */
  toolCalls: ToolCall[]
  /** Who answered ('' from servers before rooms); a round sends one `done` per answer. */
  agentId: string
}

export interface ChatErrorEvent {
  type: 'error'
  requestId: string | null
  code: string
  message: string
  /** Set when the turn failed after `start`: its partial answer is stored as `answerTurnId`. */
  conversationId?: string
  answerTurnId?: string
  /** @deprecated the same id as `answerTurnId` */
  turnId?: string
  /** Whose answer failed, when one did. */
  agentId?: string
}

/**
 * The client's own event: the socket dropped and was reopened (`attempt` counts the tries); the
 * turn in flight (`requestId`, null when there was none) goes on after token `afterSeq`, with no
 * token lost or repeated.
 */
export interface ChatResumedEvent {
  type: 'resumed'
  requestId: string | null
  afterSeq: number
  attempt: number
}

/**
 * What the server sends about a turn, in order: `start`, `token`s, then `done` or `error`; and
 * `resumed` when the client reopened a dropped socket.
 */
export type ChatEvent = ChatStartEvent | ChatTokenEvent | ChatDoneEvent | ChatErrorEvent | ChatResumedEvent

export interface ChatResult {
  /** The whole answer: the tokens of this turn joined. */
  text: string
  conversationId: string
  finishReason: FinishReason
  usage: Usage
  requestId: string
  /** The stored answer. */
  answerTurnId: string
  /** @deprecated the same id as `answerTurnId` */
  turnId: string
  /** The calls the answer made (empty when none). */
  toolCalls: ToolCall[]
  /** Who answered. */
  agentId: string
}

/** A conversation as listed by `GET /conversations`. */
export interface Conversation {
  id: string
  /** The first participant. */
  agentId: string
  /** The participants in order: one, or several in a room. */
  agentIds: string[]
  title: string
  createdAt: string
  updatedAt: string
}

/**
 * One stored message of a conversation; assistant turns carry how they finished and the calls
 * they made, `tool` turns the call they answer.
 */
export interface Turn {
  id: string
  /** 0, 1, 2, ... within the conversation. */
  seq: number
  role: 'user' | 'assistant' | 'system' | 'tool'
  content: string
  finishReason: FinishReason | null
  usage: Usage | null
  createdAt: string
  toolCalls?: ToolCall[]
  toolCallId?: string
  /** Who spoke an answer (rooms); null for the user's turns. */
  agentId: string | null
}

/** A conversation with its turns in order, from `GET /conversations/{id}`. */
export interface ConversationDetail extends Conversation {
  turns: Turn[]
}

/** `GET /conversations` filters. */
export interface ConversationQuery {
  agentId?: string
  /** Only conversations whose title or any turn contains this text (case-insensitive). */
  q?: string
  limit?: number
  offset?: number
}

/** `GET /health`: `ready` is false while the engine is still loading. */
export interface Health {
  status: string
  engine: string
  model: string
  ready: boolean
  detail: string | null
  version: string | null
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
  baseUrl?: string
  /** Sent as `Authorization: Bearer <key>`; needed when the server has API keys configured. */
  apiKey?: string
  /** Aborts the request: it rejects with an `ApiError` of code `aborted`. */
  signal?: AbortSignal
}

export interface SendMessageRequest {
  /** May be '' when `toolResults` carries results. */
  message: string
  /** Who answers in a room (default: the stream's agent; '' : the message's `@mentions`). */
  agentId?: string
  options?: ChatOptions
  /** Tools for this turn (else the agent's own, if it declares any). */
  tools?: FunctionTool[]
  toolChoice?: ToolChoice
  /** Results of the previous answer's calls, stored before `message`. */
  toolResults?: ToolResult[]
  /** Aborting it cancels this turn (sent or still queued); the stream stays open. */
  signal?: AbortSignal
}

/** The part of the WebSocket interface the client needs; the browser's and `ws`'s both fit. */
export interface WebSocketLike {
  readonly readyState: number
  send(data: string): void
  close(code?: number, reason?: string): void
  addEventListener(type: 'open' | 'message' | 'error' | 'close', listener: (event: any) => void): void
}

/**
 * Makes a socket. `protocols` is set when the stream has an `apiKey` (`["bearer", key]`) and must
 * be passed on, e.g. `(url, protocols) => new WebSocket(url, protocols)`.
 */
export type SocketFactory = (url: string, protocols?: string[]) => WebSocketLike

/** A round: several agents of a room answer in turn, each seeing the answers before its own. */
export interface SendRoundRequest {
  message: string
  agentIds: string[]
  options?: ChatOptions
  /** Aborting it cancels the round (sent or still queued); the stream stays open. */
  signal?: AbortSignal
}

export interface StreamChatParams {
  /** The socket URL, e.g. `ws://localhost:8000/ws/chat`. */
  backendUrl: string
  /** The agent that answers; '' in a room (with `conversationId`) to name one per message. */
  agentId: string
  /** Defaults for every turn of this stream; per-call options override them field by field. */
  options?: ChatOptions
  onEvent?: (event: ChatEvent) => void
  /** Continue an existing conversation instead of starting a new one with the first turn. */
  conversationId?: string
  /** Makes the socket; defaults to the global `WebSocket`. */
  socketFactory?: SocketFactory
  /** The server's API key, offered as the subprotocols `["bearer", key]` when the socket opens. */
  apiKey?: string
  /** Aborting it closes the stream, as `stop()` does (also while the socket is still opening). */
  signal?: AbortSignal
  /**
   * Tries to reopen a socket that dropped (backoff 0.1, 0.25, 0.5, 1, 2 s, then 2 s apart) and
   * resume the answer in flight; default 5, 0 = a drop ends the stream.
   */
  reconnectAttempts?: number
}

/** Backoff between reconnect tries, in ms; the last repeats. */
export const RECONNECT_DELAYS_MS = [100, 250, 500, 1000, 2000]

export interface ChatStream {
  /** Queue a turn; resolves on its `done`, rejects with a {@link ChatError} on its `error`. */
  sendMessage(request: SendMessageRequest): Promise<ChatResult>
  /**
   * Ask several agents of a room to answer in turn; resolves with their answers in order. An
   * error ends the round: the {@link ChatError} holds the answers before it (`results`).
   */
  sendRound(request: SendRoundRequest): Promise<ChatResult[]>
  /** Close the socket; turns still pending reject with code `stopped`. */
  stop(): void
  /** Stop the current answer (it finishes with reason `cancelled`); the socket stays open. */
  cancel(): void
  /**
   * Every event from now on, as an async iterable (the same events `onEvent` gets); it ends when
   * the stream ends. Events arriving while no loop awaits are buffered.
   */
  events(): AsyncIterableIterator<ChatEvent>
  /** The conversation every turn continues: the caller's, else the one the first turn started. */
  readonly conversationId: string | undefined
}

// --- errors ----------------------------------------------------------------------------------

/** A REST call failed: `status` is the HTTP status (0 when the server could not be reached). */
export class ApiError extends Error {
  readonly status: number
  readonly code: string

  constructor(status: number, code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'ApiError'
    this.status = status
    this.code = code
  }
}

/**
 * A chat turn or stream failed. `code` is the server's (`agent_not_found`, `engine_error`, ...)
 * or one of the client's own: `socket_open_failed` (a socket refused for a missing or wrong API
 * key included), `no_websocket`, `socket_closed`, `stopped`, `aborted`, `bad_frame` (the server
 * sent a frame this client cannot read).
 */
export class ChatError extends Error {
  readonly code: string
  readonly requestId: string | null
  /** A round's answers that ended before the error. */
  results: ChatResult[] = []

  constructor(code: string, message: string, requestId: string | null = null, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'ChatError'
    this.code = code
    this.requestId = requestId
  }
}

// --- REST ------------------------------------------------------------------------------------

export async function listAgents(baseUrl?: string | ClientOptions): Promise<Agent[]> {
  return list(await request('GET', '/agents', baseUrl), readAgent)
}

export async function getAgent(id: string, baseUrl?: string | ClientOptions): Promise<Agent> {
  return readAgent(await request('GET', `/agents/${segment(id)}`, baseUrl))
}

/** Create or replace the agent `agent.id`; resolves with the agent as stored. */
export async function updateAgent(agent: AgentInput, baseUrl?: string | ClientOptions): Promise<Agent> {
  if (!isObject(agent)) throw new TypeError('updateAgent expects { id, name, systemPrompt?, markdownContext? }')
  const body: Record<string, unknown> = {
    name: agent.name,
    system_prompt: agent.systemPrompt ?? agent.system_prompt ?? '',
    markdown_context: agent.markdownContext ?? agent.markdown_context ?? '',
  }
  if (agent.tools !== undefined) body.tools = agent.tools
  return readAgent(await request('PUT', `/agents/${segment(agent.id)}`, baseUrl, body))
}

export async function deleteAgent(id: string, baseUrl?: string | ClientOptions): Promise<void> {
  await request('DELETE', `/agents/${segment(id)}`, baseUrl)
}

/**
 * Conversations, most recently active first: all of them, one agent's (`agentId` as a string, the
 * seed's form), or as filtered by a {@link ConversationQuery} (`{ agentId?, q?, limit?, offset? }`).
 */
export async function listConversations(
  query?: string | ConversationQuery,
  baseUrl?: string | ClientOptions,
): Promise<Conversation[]> {
  const filters: ConversationQuery = typeof query === 'string' ? { agentId: query } : (query ?? {})
  const params = new URLSearchParams()
  if (filters.agentId !== undefined) params.set('agent_id', filters.agentId)
  if (filters.q) params.set('q', filters.q)
  if (filters.limit !== undefined) params.set('limit', String(filters.limit))
  if (filters.offset !== undefined) params.set('offset', String(filters.offset))
  const search = params.toString() === '' ? '' : `?${params}`
  return list(await request('GET', `/conversations${search}`, baseUrl), readConversation)
}

export async function getConversation(id: string, baseUrl?: string | ClientOptions): Promise<ConversationDetail> {
  const raw = await request('GET', `/conversations/${segment(id)}`, baseUrl)
  return { ...readConversation(raw), turns: list(field(raw, 'turns', isArray), readTurn) }
}

/**
 * A new conversation of `agentIds` (several: a room, where each agent answers as itself and sees
 * the others), empty until the first message; resolves with it as stored.
 */
export async function createRoom(
  agentIds: string[],
  init?: { title?: string },
  baseUrl?: string | ClientOptions,
): Promise<Conversation> {
  if (!Array.isArray(agentIds) || agentIds.length === 0) throw new TypeError('agentIds must name at least one agent')
  const body = { agent_ids: agentIds, title: init?.title ?? '' }
  return readConversation(await request('POST', '/conversations', baseUrl, body))
}

/** Set a room's participants (the new list, in order); resolves with the conversation as stored. */
export async function setRoomAgents(id: string, agentIds: string[], baseUrl?: string | ClientOptions): Promise<Conversation> {
  return readConversation(await request('PATCH', `/conversations/${segment(id)}`, baseUrl, { agent_ids: agentIds }))
}

/** Set a conversation's title (1-200 characters); resolves with the conversation as stored. */
export async function renameConversation(id: string, title: string, baseUrl?: string | ClientOptions): Promise<Conversation> {
  return readConversation(await request('PATCH', `/conversations/${segment(id)}`, baseUrl, { title }))
}

/**
 * Delete the turns from the user turn `fromSeq` on (it included). Edit-and-resend and regenerate:
 * truncate, then send the (edited) message again in the same conversation.
 */
export async function truncateConversation(id: string, fromSeq: number, baseUrl?: string | ClientOptions): Promise<void> {
  if (!Number.isInteger(fromSeq) || fromSeq < 0) throw new TypeError('fromSeq must be an integer >= 0')
  await request('DELETE', `/conversations/${segment(id)}/turns?from_seq=${fromSeq}`, baseUrl)
}

export async function deleteConversation(id: string, baseUrl?: string | ClientOptions): Promise<void> {
  await request('DELETE', `/conversations/${segment(id)}`, baseUrl)
}

/** The health report; it resolves while the engine loads too (the server answers 503 then). */
export async function getHealth(baseUrl?: string | ClientOptions): Promise<Health> {
  const raw = await request('GET', '/health', baseUrl, undefined, [503])
  const detail = isObject(raw) ? raw.detail : undefined
  const version = isObject(raw) ? raw.version : undefined
  return {
    status: field(raw, 'status', isString),
    engine: field(raw, 'engine', isString),
    model: field(raw, 'model', isString),
    ready: field(raw, 'ready', isBoolean),
    detail: typeof detail === 'string' ? detail : null,
    version: typeof version === 'string' ? version : null,
  }
}

// --- reading what the server sent: checked, never coerced --------------------------------------

/** A response or frame that lacks a field this client needs, or has it with the wrong type. */
class ShapeError extends Error {}

const isString = (v: unknown): v is string => typeof v === 'string'
const isNumber = (v: unknown): v is number => typeof v === 'number' && Number.isFinite(v)
const isBoolean = (v: unknown): v is boolean => typeof v === 'boolean'
const isArray = (v: unknown): v is unknown[] => Array.isArray(v)

function field<T>(raw: unknown, name: string, check: (v: unknown) => v is T): T {
  const value = isObject(raw) ? raw[name] : undefined
  if (!check(value)) throw new ShapeError(`field ${JSON.stringify(name)} is missing or not ${check.name.slice(2).toLowerCase()}`)
  return value
}

function optionalString(raw: unknown, name: string): string | undefined {
  const value = isObject(raw) ? raw[name] : undefined
  return typeof value === 'string' ? value : undefined
}

function list<T>(raw: unknown, read: (item: unknown) => T): T[] {
  if (!Array.isArray(raw)) throw new ShapeError('expected a JSON array')
  return raw.map(read)
}

function readAgent(raw: unknown): Agent {
  const agent: Agent = {
    id: field(raw, 'id', isString),
    name: field(raw, 'name', isString),
    systemPrompt: field(raw, 'system_prompt', isString),
    markdownContext: field(raw, 'markdown_context', isString),
  }
  const createdAt = optionalString(raw, 'created_at')
  const updatedAt = optionalString(raw, 'updated_at')
  if (createdAt !== undefined) agent.createdAt = createdAt
  if (updatedAt !== undefined) agent.updatedAt = updatedAt
  const tools = isObject(raw) ? raw.tools : undefined
  if (Array.isArray(tools)) agent.tools = tools.map(readTool)
  return agent
}

function readTool(raw: unknown): Tool {
  const tool: Tool = { name: field(raw, 'name', isString) }
  const description = optionalString(raw, 'description')
  const parameters = isObject(raw) ? raw.parameters : undefined
  if (description !== undefined) tool.description = description
  if (isObject(parameters)) tool.parameters = parameters
  return tool
}

function readToolCalls(raw: unknown): ToolCall[] {
  if (!Array.isArray(raw)) return []
  return raw.map((call) => ({
    id: field(call, 'id', isString),
    name: field(call, 'name', isString),
    arguments: field(call, 'arguments', isString),
  }))
}

function readConversation(raw: unknown): Conversation {
  const agentId = field(raw, 'agent_id', isString)
  const agentIds = isObject(raw) && isArray(raw.agent_ids) ? raw.agent_ids.filter(isString) : []
  return {
    id: field(raw, 'id', isString),
    agentId,
    agentIds: agentIds.length > 0 ? agentIds : [agentId],
    title: field(raw, 'title', isString),
    createdAt: field(raw, 'created_at', isString),
    updatedAt: field(raw, 'updated_at', isString),
  }
}

const ROLES = new Set(['user', 'assistant', 'system', 'tool'])
const FINISH_REASONS = new Set(['stop', 'length', 'cancelled', 'error'])
const isRole = (v: unknown): v is Turn['role'] => typeof v === 'string' && ROLES.has(v)
const isFinishReason = (v: unknown): v is FinishReason => typeof v === 'string' && FINISH_REASONS.has(v)

function readTurn(raw: unknown): Turn {
  const reason = isObject(raw) ? raw.finish_reason : undefined
  const usage = isObject(raw) ? raw.usage : undefined
  const turn: Turn = {
    id: field(raw, 'id', isString),
    seq: field(raw, 'seq', isNumber),
    role: field(raw, 'role', isRole),
    content: field(raw, 'content', isString),
    finishReason: isFinishReason(reason) ? reason : null,
    usage: isObject(usage) ? readUsage(usage) : null,
    createdAt: field(raw, 'created_at', isString),
    agentId: optionalString(raw, 'agent_id') ?? null,
  }
  const toolCalls = readToolCalls(isObject(raw) ? raw.tool_calls : undefined)
  const toolCallId = optionalString(raw, 'tool_call_id')
  if (toolCalls.length > 0) turn.toolCalls = toolCalls
  if (toolCallId !== undefined) turn.toolCallId = toolCallId
  return turn
}

/** The wire's usage fields and their names here: only these are read (`Usage` is closed). */
const USAGE_FIELDS = {
  prompt_tokens: 'promptTokens',
  completion_tokens: 'completionTokens',
  cached_tokens: 'cachedTokens',
  evicted_tokens: 'evictedTokens',
  dropped_turns: 'droppedTurns',
  time_to_first_token_ms: 'timeToFirstTokenMs',
  decode_tokens_per_s: 'decodeTokensPerS',
} as const satisfies Record<string, keyof Usage>

function readUsage(raw: unknown): Usage {
  const usage: Usage = { promptTokens: 0, completionTokens: 0 }
  if (!isObject(raw)) return usage
  for (const [wire, name] of Object.entries(USAGE_FIELDS)) {
    const value = raw[wire]
    if (isNumber(value)) usage[name] = value
  }
  return usage
}

async function request(
  method: string,
  path: string,
  target: string | ClientOptions | undefined,
  body?: unknown,
  alsoOk: number[] = [],
): Promise<unknown> {
  const { baseUrl, apiKey, signal } = clientOptions(target)
  const url = (baseUrl ?? DEFAULT_BASE_URL).replace(/\/+$/, '') + path
  const headers: Record<string, string> = { accept: 'application/json' }
  if (apiKey !== undefined) headers.authorization = `Bearer ${apiKey}`
  const init: RequestInit = { method, headers }
  if (signal !== undefined) init.signal = signal
  if (body !== undefined) {
    headers['content-type'] = 'application/json'
    init.body = JSON.stringify(body)
  }
  let response: Response
  let text: string
  try {
    response = await fetch(url, init)
    text = await response.text()
  } catch (err) {
    if (signal?.aborted) throw new ApiError(0, 'aborted', `${method} ${url} was aborted`, { cause: err })
    throw new ApiError(0, 'network_error', `${method} ${url} failed: ${describe(err)}`, { cause: err })
  }
  let parsed: unknown = undefined
  let parseError: unknown = undefined
  if (text) {
    try {
      parsed = JSON.parse(text)
    } catch (err) {
      parseError = err
    }
  }
  if (!response.ok && !alsoOk.includes(response.status)) {
    const error = isObject(parsed) && isObject(parsed.error) ? parsed.error : {}
    const code = typeof error.code === 'string' ? error.code : 'http_error'
    const message =
      typeof error.message === 'string'
        ? error.message
        : `${method} ${url}: HTTP ${response.status} ${response.statusText}`.trim()
    throw new ApiError(response.status, code, message)
  }
  if (parseError !== undefined) {
    throw new ApiError(response.status, 'bad_response', `${method} ${url}: the response is not JSON`, {
      cause: parseError,
    })
  }
  return parsed
}

function clientOptions(target: string | ClientOptions | undefined | null): ClientOptions {
  if (target === undefined || target === null) return {}
  if (typeof target === 'string') return { baseUrl: target }
  if (!isObject(target)) throw new TypeError('the last argument must be a base URL or { baseUrl?, apiKey?, signal? }')
  const { baseUrl, apiKey, signal } = target as ClientOptions
  if (baseUrl !== undefined && typeof baseUrl !== 'string') throw new TypeError('baseUrl must be a string')
  const options: ClientOptions = { baseUrl, apiKey: checkApiKey(apiKey) }
  if (signal !== undefined) options.signal = signal
  return options
}

// The alphabet the server allows for keys: it fits a header and a subprotocol without escaping.
const API_KEY_RE = /^[A-Za-z0-9._~-]+$/

function checkApiKey(apiKey: unknown): string | undefined {
  if (apiKey === undefined || apiKey === null) return undefined
  if (typeof apiKey !== 'string' || !API_KEY_RE.test(apiKey)) {
    throw new TypeError('apiKey must be a non-empty string of A-Z a-z 0-9 - _ . ~')
  }
  return apiKey
}

function segment(id: string): string {
  if (typeof id !== 'string' || id === '') throw new TypeError('id must be a non-empty string')
  return encodeURIComponent(id)
}

// --- chat ------------------------------------------------------------------------------------

interface PendingTurn {
  requestId: string
  frame: Record<string, unknown>
  resolve: (results: ChatResult[]) => void
  reject: (error: Error) => void
  /** The answer in progress. */
  text: string
  /** Answers ended (a round: several). */
  results: ChatResult[]
  /** Answers to wait for: the `start` event's `agentIds`. */
  expected: number
  /** Tokens received: the next expected `seq`. */
  received: number
  sent: boolean
  started: boolean
  /** A `resume` for it is out and not answered yet. */
  resuming: boolean
}

/** One server frame as an event; throws a {@link ShapeError} when a field is missing. */
function readEvent(frame: Record<string, unknown>): ChatEvent | null {
  switch (frame.type) {
    case 'start': {
      const turnId = field(frame, 'turn_id', isString)
      return {
        type: 'start',
        requestId: field(frame, 'request_id', isString),
        conversationId: field(frame, 'conversation_id', isString),
        userTurnId: optionalString(frame, 'user_turn_id') ?? turnId,
        turnId,
        agentIds: isArray(frame.agent_ids) ? frame.agent_ids.filter(isString) : [],
      }
    }
    case 'token': {
      const event: ChatTokenEvent = {
        type: 'token',
        requestId: field(frame, 'request_id', isString),
        token: field(frame, 'token', isString),
        seq: field(frame, 'seq', isNumber),
        count: typeof frame.count === 'number' ? frame.count : 1,
      }
      const agentId = optionalString(frame, 'agent_id')
      if (agentId !== undefined) event.agentId = agentId
      return event
    }
    case 'done': {
      const turnId = field(frame, 'turn_id', isString)
      return {
        type: 'done',
        requestId: field(frame, 'request_id', isString),
        conversationId: field(frame, 'conversation_id', isString),
        answerTurnId: optionalString(frame, 'answer_turn_id') ?? turnId,
        turnId,
        finishReason: field(frame, 'finish_reason', isFinishReason),
        usage: readUsage(frame.usage),
        toolCalls: readToolCalls(frame.tool_calls),
        agentId: optionalString(frame, 'agent_id') ?? '',
      }
    }
    case 'error': {
      const event: ChatErrorEvent = {
        type: 'error',
        requestId: optionalString(frame, 'request_id') ?? null,
        code: optionalString(frame, 'code') ?? 'error',
        message: optionalString(frame, 'message') ?? 'the server reported an error',
      }
      const conversationId = optionalString(frame, 'conversation_id')
      const answerTurnId = optionalString(frame, 'answer_turn_id') ?? optionalString(frame, 'turn_id')
      if (conversationId !== undefined) event.conversationId = conversationId
      if (answerTurnId !== undefined) event.answerTurnId = event.turnId = answerTurnId
      const agentId = optionalString(frame, 'agent_id')
      if (agentId !== undefined) event.agentId = agentId
      return event
    }
    default:
      return null // pong, or a frame type added after this client was written
  }
}

/** An async iterator fed by `push`, ended by `close`; unread events wait in a buffer. */
function eventQueue(onDone: () => void): {
  iterator: AsyncIterableIterator<ChatEvent>
  push: (event: ChatEvent) => void
  close: () => void
} {
  const buffered: ChatEvent[] = []
  let waiting: ((result: IteratorResult<ChatEvent>) => void) | null = null
  let closed = false
  const finish = (): IteratorResult<ChatEvent> => {
    closed = true
    buffered.length = 0
    onDone()
    return { value: undefined, done: true }
  }
  const iterator: AsyncIterableIterator<ChatEvent> = {
    next: () => {
      const event = buffered.shift()
      if (event !== undefined) return Promise.resolve({ value: event, done: false })
      if (closed) return Promise.resolve({ value: undefined, done: true })
      return new Promise((resolve) => {
        waiting = resolve
      })
    },
    return: () => Promise.resolve(finish()),
    [Symbol.asyncIterator]() {
      return iterator
    },
  }
  return {
    iterator,
    push: (event) => {
      if (closed) return
      if (waiting) {
        const resolve = waiting
        waiting = null
        resolve({ value: event, done: false })
      } else buffered.push(event)
    },
    close: () => {
      closed = true
      if (waiting) {
        const resolve = waiting
        waiting = null
        resolve({ value: undefined, done: true })
      }
    },
  }
}

function randomPrefix(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto
  if (typeof c?.randomUUID !== 'function') {
    throw new ChatError('no_crypto', 'this runtime has no crypto.randomUUID (a browser page needs https or localhost)')
  }
  return c.randomUUID()
}

/**
 * Open a chat socket for one agent. Resolves once the socket is open; rejects with a
 * {@link ChatError} if it cannot be opened.
 *
 * Turns are sent one at a time, in the order `sendMessage` was called: a turn goes out when the
 * previous one has ended, so every turn after the first carries the conversation id and any
 * server error can be matched to exactly one turn.
 */
export async function streamChat(params: StreamChatParams): Promise<ChatStream> {
  const { backendUrl, agentId, onEvent, signal } = params
  if (typeof agentId !== 'string' || (agentId === '' && params.conversationId === undefined)) {
    throw new TypeError('agentId must be a non-empty string (or continue a room: conversationId)')
  }
  const defaults = wireOptions(params.options)
  const apiKey = checkApiKey(params.apiKey)
  const protocols = apiKey === undefined ? undefined : ['bearer', apiKey]
  if (signal?.aborted) throw new ChatError('aborted', 'the chat stream was aborted before it opened')
  const prefix = randomPrefix()
  const factory = params.socketFactory ?? globalSocketFactory()
  const reconnectAttempts = params.reconnectAttempts ?? RECONNECT_DELAYS_MS.length
  let conversationId = params.conversationId
  // A stream that continues a conversation names it in the socket URL, so that a proxy routing
  // by it (deploy/nginx) sends every socket of the conversation to the same instance.
  let socket = await openSocket(conversationUrl(backendUrl, conversationId), protocols, factory, signal)

  let ended: ChatError | null = null
  let queue: PendingTurn[] = []
  let counter = 0
  const listeners = new Set<ReturnType<typeof eventQueue>>()

  const emit = (event: ChatEvent): void => {
    for (const listener of listeners) listener.push(event)
    if (!onEvent) return
    try {
      onEvent(event)
    } catch (err) {
      // Report it like a throwing DOM listener, without breaking the turn bookkeeping.
      setTimeout(() => {
        throw err
      })
    }
  }

  const end = (error: ChatError): void => {
    if (ended) return
    ended = error
    const pending = queue
    queue = []
    for (const turn of pending) turn.reject(error)
    for (const listener of listeners) listener.close()
    listeners.clear()
    signal?.removeEventListener('abort', onAbort)
  }

  const pump = (): void => {
    const turn = queue[0]
    if (ended || !turn || turn.sent) return
    if (conversationId !== undefined) turn.frame.conversation_id = conversationId
    turn.sent = true
    try {
      socket.send(JSON.stringify(turn.frame))
    } catch (err) {
      end(new ChatError('socket_closed', `could not send on the chat socket: ${describe(err)}`, null, { cause: err }))
    }
  }

  /** The current turn has ended: send the next one. */
  const next = (): void => {
    queue.shift()
    pump()
  }

  const close = (error: ChatError, code: number, reason: string): void => {
    end(error)
    try {
      socket.close(code, reason)
    } catch {
      // already closing
    }
  }

  const onMessage = (message: { data: unknown }): void => {
    const frame = parseFrame(message.data)
    if (!frame) return
    let event: ChatEvent | null
    try {
      event = readEvent(frame)
    } catch (err) {
      if (!(err instanceof ShapeError)) throw err
      close(new ChatError('bad_frame', `the server sent a ${String(frame.type)} frame this client cannot read: ${err.message}`), 1002, 'bad frame')
      return
    }
    if (event === null) return
    const current = queue[0]
    const mine = (id: string | null) => current !== undefined && current.sent && id === current.requestId
    switch (event.type) {
      case 'start':
        if (conversationId === undefined) conversationId = event.conversationId
        if (mine(event.requestId)) {
          current!.started = true
          current!.expected = Math.max(event.agentIds.length, 1)
        }
        emit(event)
        return
      case 'token':
        if (mine(event.requestId)) {
          current!.resuming = false
          if (event.seq !== current!.received) return // already had it
          current!.text += event.token
          current!.received += event.count
        }
        emit(event)
        return
      case 'done': {
        if (conversationId === undefined) conversationId = event.conversationId
        emit(event)
        if (mine(event.requestId)) {
          const turn = current!
          turn.results.push({
            text: turn.text,
            conversationId: event.conversationId,
            finishReason: event.finishReason,
            usage: event.usage,
            requestId: turn.requestId,
            answerTurnId: event.answerTurnId,
            turnId: event.answerTurnId,
            toolCalls: event.toolCalls,
            agentId: event.agentId,
          })
          turn.text = ''
          // A round's answers before the last; the server starts no further speaker after an
          // answer that did not end normally.
          const normal = event.finishReason === 'stop' || event.finishReason === 'length'
          if (turn.results.length < turn.expected && normal) return
          turn.resolve(turn.results)
          next()
        }
        return
      }
      case 'error':
        if (mine(event.requestId) && current!.resuming && !current!.started && event.code === 'unknown_request') {
          // It was dropped before it started (nothing stored): send it again.
          current!.resuming = false
          try {
            socket.send(JSON.stringify(current!.frame))
          } catch {
            // the close handler reconnects again
          }
          return
        }
        emit(event)
        // An error without a request id answers a frame the server could not read; only the
        // current turn's frame is in flight, so it is that turn's.
        if (mine(event.requestId) || (event.requestId === null && current?.sent)) {
          const turn = current!
          const error = new ChatError(event.code, event.message, turn.requestId)
          error.results = turn.results
          turn.reject(error)
          next()
        }
        return
    }
  }

  const onClose = (event: { code?: number; reason?: string }): void => {
    if (ended) return
    const detail = event.code ? ` (code ${event.code}${event.reason ? `: ${event.reason}` : ''})` : ''
    void reconnect().then((ok) => {
      if (!ok) end(new ChatError('socket_closed', `the chat socket closed${detail}`))
    })
  }

  const listen = (sock: WebSocketLike): void => {
    sock.addEventListener('message', (message: { data: unknown }) => {
      if (sock === socket) onMessage(message)
    })
    sock.addEventListener('close', (event: { code?: number; reason?: string }) => {
      if (sock === socket) onClose(event)
    })
  }
  listen(socket)

  /** Reopen the dropped socket (bounded backoff) and resume the turn in flight. */
  const reconnect = async (): Promise<boolean> => {
    for (let attempt = 1; attempt <= reconnectAttempts; attempt++) {
      const delay = RECONNECT_DELAYS_MS[Math.min(attempt, RECONNECT_DELAYS_MS.length) - 1]!
      await new Promise((resolve) => setTimeout(resolve, delay))
      if (ended) return false
      let fresh: WebSocketLike
      try {
        fresh = await openSocket(conversationUrl(backendUrl, conversationId), protocols, factory, signal)
      } catch {
        continue
      }
      if (ended) {
        fresh.close(1000, 'stopped')
        return false
      }
      socket = fresh
      listen(fresh)
      const current = queue[0]
      let afterSeq = -1
      try {
        if (current?.sent) {
          afterSeq = current.received - 1
          current.resuming = true
          fresh.send(JSON.stringify({ type: 'resume', request_id: current.requestId, after_seq: afterSeq }))
        }
      } catch {
        continue
      }
      emit({ type: 'resumed', requestId: current?.sent ? current.requestId : null, afterSeq, attempt })
      pump()
      return true
    }
    return false
  }

  const cancelTurn = (requestId: string): void => {
    const index = queue.findIndex((turn) => turn.requestId === requestId)
    if (ended || index < 0) return
    const turn = queue[index]!
    if (!turn.sent) {
      queue.splice(index, 1)
      turn.reject(new ChatError('aborted', 'the turn was aborted before it was sent', requestId))
      return
    }
    try {
      socket.send(JSON.stringify({ type: 'cancel', request_id: requestId }))
    } catch {
      // the close handler rejects the turn
    }
  }

  const sendMessage = (req: SendMessageRequest): Promise<ChatResult> => {
    if (isObject(req) && req.agentId !== undefined && typeof req.agentId !== 'string') {
      return Promise.reject(new TypeError('agentId must be a string'))
    }
    const speaker = isObject(req) && req.agentId !== undefined ? req.agentId : agentId
    return queueTurn(req, speaker === '' ? {} : { agent_id: speaker }).then((results) => results[results.length - 1]!)
  }

  const sendRound = (req: SendRoundRequest): Promise<ChatResult[]> => {
    if (!isObject(req) || !Array.isArray(req.agentIds) || req.agentIds.length === 0 || !req.agentIds.every(isString)) {
      return Promise.reject(new TypeError('sendRound expects { message: string, agentIds: string[] (at least one) }'))
    }
    return queueTurn(req, { agent_ids: [...req.agentIds] })
  }

  const queueTurn = (req: SendMessageRequest | SendRoundRequest, speakers: Record<string, unknown>): Promise<ChatResult[]> =>
    new Promise<ChatResult[]>((resolve, reject) => {
      if (ended) {
        reject(new ChatError(ended.code, ended.message))
        return
      }
      if (!isObject(req) || typeof req.message !== 'string') {
        reject(new TypeError('sendMessage expects { message: string, options?: ChatOptions, signal?: AbortSignal }'))
        return
      }
      let options: Record<string, unknown>
      try {
        options = { ...defaults, ...wireOptions(req.options) }
      } catch (err) {
        reject(err)
        return
      }
      const requestId = `${prefix}-${++counter}`
      if (req.signal?.aborted) {
        reject(new ChatError('aborted', 'the turn was aborted before it was sent', requestId))
        return
      }
      const frame: Record<string, unknown> = { type: 'chat', ...speakers, message: req.message, request_id: requestId }
      if (Object.keys(options).length > 0) frame.options = options
      if (!('agentIds' in req)) {  // a single turn (a round offers no tools)
        const one = req as SendMessageRequest
        if (one.tools !== undefined) frame.tools = one.tools
        if (one.toolChoice !== undefined) frame.tool_choice = one.toolChoice
        if (one.toolResults !== undefined) {
          frame.tool_results = one.toolResults.map((r) => ({ tool_call_id: r.toolCallId, content: r.content }))
        }
      }
      const abort = () => cancelTurn(requestId)
      req.signal?.addEventListener('abort', abort, { once: true })
      const settle = () => req.signal?.removeEventListener('abort', abort)
      queue.push({
        requestId,
        frame,
        resolve: (result) => {
          settle()
          resolve(result)
        },
        reject: (error) => {
          settle()
          reject(error)
        },
        text: '',
        results: [],
        expected: 1,
        received: 0,
        sent: false,
        started: false,
        resuming: false,
      })
      pump()
    })

  const stop = (): void => {
    close(new ChatError('stopped', 'the chat stream was stopped; call streamChat() again to chat'), 1000, 'stop')
  }

  function onAbort(): void {
    close(new ChatError('aborted', 'the chat stream was aborted'), 1000, 'aborted')
  }
  signal?.addEventListener('abort', onAbort, { once: true })

  const cancel = (): void => {
    const current = queue[0]
    if (current?.sent) cancelTurn(current.requestId)
  }

  const events = (): AsyncIterableIterator<ChatEvent> => {
    const listener = eventQueue(() => listeners.delete(listener))
    if (ended) listener.close()
    else listeners.add(listener)
    return listener.iterator
  }

  return {
    sendMessage,
    sendRound,
    stop,
    cancel,
    events,
    get conversationId() {
      return conversationId
    },
  }
}

function globalSocketFactory(): SocketFactory {
  const Ctor = (globalThis as { WebSocket?: new (url: string, protocols?: string[]) => WebSocketLike }).WebSocket
  if (typeof Ctor !== 'function') {
    throw new ChatError(
      'no_websocket',
      'this runtime has no global WebSocket (Node.js before 22): pass socketFactory, ' +
        "e.g. (url, protocols) => new WebSocket(url, protocols) with WebSocket from the 'ws' package",
    )
  }
  return (url, protocols) => (protocols ? new Ctor(url, protocols) : new Ctor(url))
}

/** `url` with `?conversation_id=` set (other query parameters kept); `url` itself without one. */
export function conversationUrl(url: string, conversationId: string | undefined): string {
  if (conversationId === undefined) return url
  const parsed = new URL(url)
  parsed.searchParams.set('conversation_id', conversationId)
  return parsed.toString()
}

function openSocket(
  url: string,
  protocols: string[] | undefined,
  factory: SocketFactory,
  signal: AbortSignal | undefined,
): Promise<WebSocketLike> {
  return new Promise((resolve, reject) => {
    let socket: WebSocketLike
    try {
      socket = protocols ? factory(url, protocols) : factory(url)
    } catch (err) {
      reject(new ChatError('socket_open_failed', `cannot open a chat socket to ${url}: ${describe(err)}`, null, { cause: err }))
      return
    }
    let settled = false
    const closeQuietly = () => {
      try {
        socket.close()
      } catch {
        // never opened
      }
    }
    const onAbort = () => {
      if (settled) return
      settled = true
      reject(new ChatError('aborted', 'the chat stream was aborted while its socket opened'))
      closeQuietly()
    }
    signal?.addEventListener('abort', onAbort, { once: true })
    const fail = (event: { code?: number; message?: string; error?: unknown }) => {
      if (settled) return
      settled = true
      signal?.removeEventListener('abort', onAbort)
      closeQuietly()
      const why = event.error ?? event.message
      const detail = why ? `: ${describe(why)}` : event.code ? ` (code ${event.code})` : ''
      // The server refuses a socket before accepting it (HTTP 403) for a missing or wrong key, a
      // foreign origin, or a path that is not the chat socket. Browsers hide the status.
      const refused = why !== undefined && /\b40[134]\b/.test(describe(why))
      refusalHint(url, refused, protocols !== undefined).then((hint) =>
        reject(new ChatError('socket_open_failed', `could not connect to ${url}${detail}${hint}`)),
      )
    }
    socket.addEventListener('open', () => {
      if (settled) return
      settled = true
      signal?.removeEventListener('abort', onAbort)
      resolve(socket)
    })
    socket.addEventListener('error', fail)
    socket.addEventListener('close', fail)
  })
}

/**
 * Why a refused socket was refused, as far as can be told: a key is only mentioned when the server
 * has keys configured (its REST side answers 401 without one), a path when it is not /ws/chat.
 */
async function refusalHint(url: string, refused: boolean, keySent: boolean): Promise<string> {
  if (!refused) return ''
  let parsed: URL
  try {
    parsed = new URL(url)
  } catch {
    return ''
  }
  if (!/\/ws\/chat\/?$/.test(parsed.pathname)) return ` (the chat socket is at /ws/chat, not ${parsed.pathname})`
  if (keySent) return ' (was the API key right?)'
  const base = `${parsed.protocol === 'wss:' ? 'https:' : 'http:'}//${parsed.host}${parsed.pathname.replace(/\/ws\/chat\/?$/, '')}`
  try {
    const response = await fetch(`${base}/agents`, { method: 'GET', headers: { accept: 'application/json' } })
    if (response.status === 401) return ' (the server wants an API key: pass apiKey)'
  } catch {
    // the REST side is unreachable too: nothing more to say
  }
  return ''
}

const OPTION_NAMES: Record<keyof ChatOptions, string> = {
  temperature: 'temperature',
  maxNewTokens: 'max_new_tokens',
  topP: 'top_p',
  topK: 'top_k',
  stop: 'stop',
  seed: 'seed',
  repetitionPenalty: 'repetition_penalty',
  presencePenalty: 'presence_penalty',
  frequencyPenalty: 'frequency_penalty',
  minP: 'min_p',
}

/** camelCase options → the wire's snake_case, leaving out unset fields. Unknown keys throw. */
function wireOptions(options: ChatOptions | undefined): Record<string, unknown> {
  const wire: Record<string, unknown> = {}
  if (options === undefined || options === null) return wire
  if (!isObject(options)) throw new TypeError('options must be an object')
  for (const [key, value] of Object.entries(options)) {
    if (!Object.prototype.hasOwnProperty.call(OPTION_NAMES, key)) {
      throw new TypeError(`unknown chat option ${JSON.stringify(key)}; known: ${Object.keys(OPTION_NAMES).join(', ')}`)
    }
    if (value !== undefined) wire[OPTION_NAMES[key as keyof ChatOptions]] = value
  }
  return wire
}

function parseFrame(data: unknown): Record<string, unknown> | null {
  let text: string
  if (typeof data === 'string') text = data
  else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data)) text = new TextDecoder().decode(data)
  else return null
  try {
    const frame: unknown = JSON.parse(text)
    return isObject(frame) ? frame : null
  } catch {
    return null
  }
}

function isObject(value: unknown): value is Record<string, any> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

function describe(err: unknown): string {
  if (err instanceof Error) {
    const cause = (err as { cause?: unknown }).cause
    return cause instanceof Error && cause.message ? `${err.message} (${cause.message})` : err.message
  }
  return String(err)
}
