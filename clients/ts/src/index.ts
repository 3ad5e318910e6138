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
 * Naming: REST resources (`Agent`, `Conversation`, `Turn`) mirror the server's JSON, so their
 * fields are snake_case; everything the client builds itself (options, events, results, usage)
 * is camelCase, and is translated to and from snake_case on the wire.
 */

export const DEFAULT_BASE_URL = 'http://localhost:8000'

// --- types -----------------------------------------------------------------------------------

export interface Agent {
  id: string
  name: string
  system_prompt: string
  markdown_context: string
  created_at?: string
  updated_at?: string
}

/** Sampling options; unset fields fall back to the stream's defaults, then the server's. */
export interface ChatOptions {
  temperature?: number
  maxNewTokens?: number
  topP?: number
  topK?: number
  stop?: string[]
  seed?: number
  /** Against repetition loops (Ollama / llama.cpp meanings): 1 = off; default 1.1 on the local engine. */
  repetitionPenalty?: number
  presencePenalty?: number
  frequencyPenalty?: number
  /** Drop tokens less likely than minP × the most likely one (0 = off). */
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
  [field: string]: number | undefined
}

export interface ChatStartEvent {
  type: 'start'
  requestId: string
  conversationId: string
  turnId: string
}

export interface ChatTokenEvent {
  type: 'token'
  requestId: string
  token: string
  seq: number
}

export interface ChatDoneEvent {
  type: 'done'
  requestId: string
  conversationId: string
  turnId: string
  finishReason: FinishReason
  usage: Usage
}

export interface ChatErrorEvent {
  type: 'error'
  requestId: string | null
  code: string
  message: string
  /** Set when the turn failed after `start`: its partial answer is stored as `turnId`. */
  conversationId?: string
  turnId?: string
}

/** What the server sends about a turn, in order: `start`, `token`s, then `done` or `error`. */
export type ChatEvent = ChatStartEvent | ChatTokenEvent | ChatDoneEvent | ChatErrorEvent

export interface ChatResult {
  /** The whole answer: the tokens of this turn joined. */
  text: string
  conversationId: string
  finishReason: FinishReason
  usage: Usage
  requestId: string
  turnId: string
}

/** A conversation as listed by `GET /conversations`. */
export interface Conversation {
  id: string
  agent_id: string
  title?: string | null
  created_at?: string
  updated_at?: string
  [field: string]: unknown
}

/** One stored message of a conversation; assistant turns carry how they finished. */
export interface Turn {
  id: string
  seq: number
  role: 'user' | 'assistant' | 'system'
  content: string
  finish_reason?: FinishReason | null
  usage?: Record<string, unknown> | null
  created_at?: string
  [field: string]: unknown
}

/** A conversation with its turns in order, from `GET /conversations/{id}`. */
export interface ConversationDetail extends Conversation {
  turns: Turn[]
}

/** `GET /health`: `ready` is false while the engine is still loading. */
export interface Health {
  status: string
  engine: string
  model: string
  ready: boolean
  detail?: string | null
  [field: string]: unknown
}

/**
 * Where and how the REST helpers reach the server: their last argument is this object or just the
 * base URL (a string).
 */
export interface ClientOptions {
  /** Default `http://localhost:8000`. */
  baseUrl?: string
  /** Sent as `Authorization: Bearer <key>`; needed when the server has API keys configured. */
  apiKey?: string
}

export interface SendMessageRequest {
  message: string
  options?: ChatOptions
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

export interface StreamChatParams {
  /** The socket URL, e.g. `ws://localhost:8000/ws/chat`. */
  backendUrl: string
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
}

export interface ChatStream {
  /** Queue a turn; resolves on its `done`, rejects with a {@link ChatError} on its `error`. */
  sendMessage(request: SendMessageRequest): Promise<ChatResult>
  /** Close the socket; turns still pending reject with code `stopped`. */
  stop(): void
  /** Stop the current answer (it finishes with reason `cancelled`); the socket stays open. */
  cancel(): void
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
 * key included), `no_websocket`, `socket_closed`, `stopped`.
 */
export class ChatError extends Error {
  readonly code: string
  readonly requestId: string | null

  constructor(code: string, message: string, requestId: string | null = null, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'ChatError'
    this.code = code
    this.requestId = requestId
  }
}

// --- REST ------------------------------------------------------------------------------------

export function listAgents(baseUrl?: string | ClientOptions): Promise<Agent[]> {
  return request<Agent[]>('GET', '/agents', baseUrl)
}

export function getAgent(id: string, baseUrl?: string | ClientOptions): Promise<Agent> {
  return request<Agent>('GET', `/agents/${segment(id)}`, baseUrl)
}

/** Create or replace the agent `agent.id`; resolves with the agent as stored. */
export function updateAgent(agent: Agent, baseUrl?: string | ClientOptions): Promise<Agent> {
  const { name, system_prompt, markdown_context } = agent
  return request<Agent>('PUT', `/agents/${segment(agent.id)}`, baseUrl, {
    name,
    system_prompt,
    markdown_context,
  })
}

export async function deleteAgent(id: string, baseUrl?: string | ClientOptions): Promise<void> {
  await request<unknown>('DELETE', `/agents/${segment(id)}`, baseUrl)
}

/** Conversations, newest first; only the agent's when `agentId` is given. */
export function listConversations(agentId?: string, baseUrl?: string | ClientOptions): Promise<Conversation[]> {
  const query = agentId === undefined ? '' : `?agent_id=${encodeURIComponent(agentId)}`
  return request<Conversation[]>('GET', `/conversations${query}`, baseUrl)
}

export function getConversation(id: string, baseUrl?: string | ClientOptions): Promise<ConversationDetail> {
  return request<ConversationDetail>('GET', `/conversations/${segment(id)}`, baseUrl)
}

export async function deleteConversation(id: string, baseUrl?: string | ClientOptions): Promise<void> {
  await request<unknown>('DELETE', `/conversations/${segment(id)}`, baseUrl)
}

/** The health report; it resolves while the engine loads too (the server answers 503 then). */
export function getHealth(baseUrl?: string | ClientOptions): Promise<Health> {
  return request<Health>('GET', '/health', baseUrl, undefined, [503])
}

async function request<T>(
  method: string,
  path: string,
  target: string | ClientOptions | undefined,
  body?: unknown,
  alsoOk: number[] = [],
): Promise<T> {
  const { baseUrl, apiKey } = clientOptions(target)
  const url = (baseUrl ?? DEFAULT_BASE_URL).replace(/\/+$/, '') + path
  const headers: Record<string, string> = { accept: 'application/json' }
  if (apiKey !== undefined) headers.authorization = `Bearer ${apiKey}`
  const init: RequestInit = { method, headers }
  if (body !== undefined) {
    headers['content-type'] = 'application/json'
    init.body = JSON.stringify(body)
  }
  let response: Response
  try {
    response = await fetch(url, init)
  } catch (err) {
    throw new ApiError(0, 'network_error', `${method} ${url} failed: ${describe(err)}`, { cause: err })
  }
  const text = await response.text()
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
  return parsed as T
}

function clientOptions(target: string | ClientOptions | undefined | null): ClientOptions {
  if (target === undefined || target === null) return {}
  if (typeof target === 'string') return { baseUrl: target }
  if (!isObject(target)) throw new TypeError('the last argument must be a base URL or { baseUrl?, apiKey? }')
  const { baseUrl, apiKey } = target
  if (baseUrl !== undefined && typeof baseUrl !== 'string') throw new TypeError('baseUrl must be a string')
  return { baseUrl, apiKey: checkApiKey(apiKey) }
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
  resolve: (result: ChatResult) => void
  reject: (error: Error) => void
  text: string
  sent: boolean
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
  const { backendUrl, agentId, onEvent } = params
  if (typeof agentId !== 'string' || agentId === '') throw new TypeError('agentId must be a non-empty string')
  const defaults = wireOptions(params.options)
  const apiKey = checkApiKey(params.apiKey)
  const protocols = apiKey === undefined ? undefined : ['bearer', apiKey]
  const socket = await openSocket(backendUrl, protocols, params.socketFactory ?? globalSocketFactory())

  let conversationId = params.conversationId
  let ended: ChatError | null = null
  let queue: PendingTurn[] = []
  const prefix = Math.random().toString(36).slice(2, 10)
  let counter = 0

  const emit = (event: ChatEvent): void => {
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

  socket.addEventListener('message', (event: { data: unknown }) => {
    const frame = parseFrame(event.data)
    if (!frame) return
    const current = queue[0]
    const mine = (id: unknown) => current !== undefined && current.sent && id === current.requestId
    switch (frame.type) {
      case 'start': {
        if (conversationId === undefined && typeof frame.conversation_id === 'string') {
          conversationId = frame.conversation_id
        }
        emit({
          type: 'start',
          requestId: String(frame.request_id),
          conversationId: String(frame.conversation_id),
          turnId: String(frame.turn_id),
        })
        return
      }
      case 'token': {
        const token = typeof frame.token === 'string' ? frame.token : ''
        if (mine(frame.request_id)) current!.text += token
        emit({ type: 'token', requestId: String(frame.request_id), token, seq: Number(frame.seq) })
        return
      }
      case 'done': {
        const event: ChatDoneEvent = {
          type: 'done',
          requestId: String(frame.request_id),
          conversationId: String(frame.conversation_id),
          turnId: String(frame.turn_id),
          finishReason: frame.finish_reason as FinishReason,
          usage: camelUsage(frame.usage),
        }
        if (conversationId === undefined) conversationId = event.conversationId
        emit(event)
        if (mine(frame.request_id)) {
          const turn = current!
          turn.resolve({
            text: turn.text,
            conversationId: event.conversationId,
            finishReason: event.finishReason,
            usage: event.usage,
            requestId: turn.requestId,
            turnId: event.turnId,
          })
          next()
        }
        return
      }
      case 'error': {
        const requestId = typeof frame.request_id === 'string' ? frame.request_id : null
        const code = typeof frame.code === 'string' ? frame.code : 'error'
        const message = typeof frame.message === 'string' ? frame.message : 'the server reported an error'
        const event: ChatErrorEvent = { type: 'error', requestId, code, message }
        if (typeof frame.conversation_id === 'string') event.conversationId = frame.conversation_id
        if (typeof frame.turn_id === 'string') event.turnId = frame.turn_id
        emit(event)
        // An error without a request id answers a frame the server could not read; only the
        // current turn's frame is in flight, so it is that turn's.
        if (mine(requestId) || (requestId === null && current?.sent)) {
          const turn = current!
          turn.reject(new ChatError(code, message, turn.requestId))
          next()
        }
        return
      }
      default:
        return // pong, or a frame type added after this client was written
    }
  })

  socket.addEventListener('close', (event: { code?: number; reason?: string }) => {
    const detail = event.code ? ` (code ${event.code}${event.reason ? `: ${event.reason}` : ''})` : ''
    end(new ChatError('socket_closed', `the chat socket closed${detail}`))
  })

  const sendMessage = (req: SendMessageRequest): Promise<ChatResult> =>
    new Promise<ChatResult>((resolve, reject) => {
      if (ended) {
        reject(new ChatError(ended.code, ended.message))
        return
      }
      if (!isObject(req) || typeof req.message !== 'string') {
        reject(new TypeError('sendMessage expects { message: string, options?: ChatOptions }'))
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
      const frame: Record<string, unknown> = { type: 'chat', agent_id: agentId, message: req.message, request_id: requestId }
      if (Object.keys(options).length > 0) frame.options = options
      queue.push({ requestId, frame, resolve, reject, text: '', sent: false })
      pump()
    })

  const stop = (): void => {
    end(new ChatError('stopped', 'the chat stream was stopped; call streamChat() again to chat'))
    try {
      socket.close(1000, 'stop')
    } catch {
      // already closing
    }
  }

  const cancel = (): void => {
    const current = queue[0]
    if (ended || !current?.sent) return
    try {
      socket.send(JSON.stringify({ type: 'cancel', request_id: current.requestId }))
    } catch {
      // the close handler rejects the turn
    }
  }

  return {
    sendMessage,
    stop,
    cancel,
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

function openSocket(url: string, protocols: string[] | undefined, factory: SocketFactory): Promise<WebSocketLike> {
  return new Promise((resolve, reject) => {
    let socket: WebSocketLike
    try {
      socket = protocols ? factory(url, protocols) : factory(url)
    } catch (err) {
      reject(new ChatError('socket_open_failed', `cannot open a chat socket to ${url}: ${describe(err)}`, null, { cause: err }))
      return
    }
    let settled = false
    const fail = (event: { code?: number; message?: string; error?: unknown }) => {
      if (settled) return
      settled = true
      const why = event.error ?? event.message
      const detail = why ? `: ${describe(why)}` : event.code ? ` (code ${event.code})` : ''
      // The server refuses a socket before accepting it (HTTP 403) for a missing or wrong key or a
      // foreign origin. Browsers hide the status, so the hint goes by whether a key was sent.
      const refused = why !== undefined && /\b40[13]\b/.test(describe(why))
      const hint = refused
        ? protocols
          ? ' (was the API key right?)'
          : ' (does the server want an API key? pass apiKey)'
        : ''
      reject(new ChatError('socket_open_failed', `could not connect to ${url}${detail}${hint}`))
      try {
        socket.close()
      } catch {
        // never opened
      }
    }
    socket.addEventListener('open', () => {
      if (settled) return
      settled = true
      resolve(socket)
    })
    socket.addEventListener('error', fail)
    socket.addEventListener('close', fail)
  })
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

function camelUsage(raw: unknown): Usage {
  const usage: Usage = { promptTokens: 0, completionTokens: 0 }
  if (!isObject(raw)) return usage
  for (const [key, value] of Object.entries(raw)) {
    if (typeof value === 'number') usage[key.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase())] = value
  }
  return usage
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
