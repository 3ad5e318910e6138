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
export const DEFAULT_BASE_URL = 'http://localhost:8000';
/** Backoff between reconnect tries, in ms; the last repeats. */
export const RECONNECT_DELAYS_MS = [100, 250, 500, 1000, 2000];
// --- errors ----------------------------------------------------------------------------------
/** A REST call failed: `status` is the HTTP status (0 when the server could not be reached). */
export class ApiError extends Error {
    status;
    code;
    constructor(status, code, message, options) {
        super(message, options);
        this.name = 'ApiError';
        this.status = status;
        this.code = code;
    }
}
/**
 * A chat turn or stream failed. `code` is the server's (`agent_not_found`, `engine_error`, ...)
 * or one of the client's own: `socket_open_failed` (a socket refused for a missing or wrong API
 * key included), `no_websocket`, `socket_closed`, `stopped`, `aborted`, `bad_frame` (the server
 * sent a frame this client cannot read).
 */
export class ChatError extends Error {
    code;
    requestId;
    /** A round's answers that ended before the error. */
    results = [];
    constructor(code, message, requestId = null, options) {
        super(message, options);
        this.name = 'ChatError';
        this.code = code;
        this.requestId = requestId;
    }
}
// --- REST ------------------------------------------------------------------------------------
export async function listAgents(baseUrl) {
    return list(await request('GET', '/agents', baseUrl), readAgent);
}
export async function getAgent(id, baseUrl) {
    return readAgent(await request('GET', `/agents/${segment(id)}`, baseUrl));
}
/** Create or replace the agent `agent.id`; resolves with the agent as stored. */
export async function updateAgent(agent, baseUrl) {
    if (!isObject(agent))
        throw new TypeError('updateAgent expects { id, name, systemPrompt?, markdownContext? }');
    const body = {
        name: agent.name,
        system_prompt: agent.systemPrompt ?? agent.system_prompt ?? '',
        markdown_context: agent.markdownContext ?? agent.markdown_context ?? '',
    };
    if (agent.tools !== undefined)
        body.tools = agent.tools;
    return readAgent(await request('PUT', `/agents/${segment(agent.id)}`, baseUrl, body));
}
export async function deleteAgent(id, baseUrl) {
    await request('DELETE', `/agents/${segment(id)}`, baseUrl);
}
/**
 * Conversations, most recently active first: all of them, one agent's (`agentId` as a string, the
 * seed's form), or as filtered by a {@link ConversationQuery} (`{ agentId?, q?, limit?, offset? }`).
 */
export async function listConversations(query, baseUrl) {
    const filters = typeof query === 'string' ? { agentId: query } : (query ?? {});
    const params = new URLSearchParams();
    if (filters.agentId !== undefined)
        params.set('agent_id', filters.agentId);
    if (filters.q)
        params.set('q', filters.q);
    if (filters.limit !== undefined)
        params.set('limit', String(filters.limit));
    if (filters.offset !== undefined)
        params.set('offset', String(filters.offset));
    const search = params.toString() === '' ? '' : `?${params}`;
    return list(await request('GET', `/conversations${search}`, baseUrl), readConversation);
}
export async function getConversation(id, baseUrl) {
    const raw = await request('GET', `/conversations/${segment(id)}`, baseUrl);
    return { ...readConversation(raw), turns: list(field(raw, 'turns', isArray), readTurn) };
}
/**
 * A new conversation of `agentIds` (several: a room, where each agent answers as itself and sees
 * the others), empty until the first message; resolves with it as stored.
 */
export async function createRoom(agentIds, init, baseUrl) {
    if (!Array.isArray(agentIds) || agentIds.length === 0)
        throw new TypeError('agentIds must name at least one agent');
    const body = { agent_ids: agentIds, title: init?.title ?? '' };
    return readConversation(await request('POST', '/conversations', baseUrl, body));
}
/** Set a room's participants (the new list, in order); resolves with the conversation as stored. */
export async function setRoomAgents(id, agentIds, baseUrl) {
    return readConversation(await request('PATCH', `/conversations/${segment(id)}`, baseUrl, { agent_ids: agentIds }));
}
/** Set a conversation's title (1-200 characters); resolves with the conversation as stored. */
export async function renameConversation(id, title, baseUrl) {
    return readConversation(await request('PATCH', `/conversations/${segment(id)}`, baseUrl, { title }));
}
/**
 * Delete the turns from the user turn `fromSeq` on (it included). Edit-and-resend and regenerate:
 * truncate, then send the (edited) message again in the same conversation.
 */
export async function truncateConversation(id, fromSeq, baseUrl) {
    if (!Number.isInteger(fromSeq) || fromSeq < 0)
        throw new TypeError('fromSeq must be an integer >= 0');
    await request('DELETE', `/conversations/${segment(id)}/turns?from_seq=${fromSeq}`, baseUrl);
}
export async function deleteConversation(id, baseUrl) {
    await request('DELETE', `/conversations/${segment(id)}`, baseUrl);
}
/** The health report; it resolves while the engine loads too (the server answers 503 then). */
export async function getHealth(baseUrl) {
    const raw = await request('GET', '/health', baseUrl, undefined, [503]);
    const detail = isObject(raw) ? raw.detail : undefined;
    const version = isObject(raw) ? raw.version : undefined;
    return {
        status: field(raw, 'status', isString),
        engine: field(raw, 'engine', isString),
        model: field(raw, 'model', isString),
        ready: field(raw, 'ready', isBoolean),
        detail: typeof detail === 'string' ? detail : null,
        version: typeof version === 'string' ? version : null,
    };
}
// --- reading what the server sent: checked, never coerced --------------------------------------
/** A response or frame that lacks a field this client needs, or has it with the wrong type. */
class ShapeError extends Error {
}
const isString = (v) => typeof v === 'string';
const isNumber = (v) => typeof v === 'number' && Number.isFinite(v);
const isBoolean = (v) => typeof v === 'boolean';
const isArray = (v) => Array.isArray(v);
function field(raw, name, check) {
    const value = isObject(raw) ? raw[name] : undefined;
    if (!check(value))
        throw new ShapeError(`field ${JSON.stringify(name)} is missing or not ${check.name.slice(2).toLowerCase()}`);
    return value;
}
function optionalString(raw, name) {
    const value = isObject(raw) ? raw[name] : undefined;
    return typeof value === 'string' ? value : undefined;
}
function list(raw, read) {
    if (!Array.isArray(raw))
        throw new ShapeError('expected a JSON array');
    return raw.map(read);
}
function readAgent(raw) {
    const agent = {
        id: field(raw, 'id', isString),
        name: field(raw, 'name', isString),
        systemPrompt: field(raw, 'system_prompt', isString),
        markdownContext: field(raw, 'markdown_context', isString),
    };
    const createdAt = optionalString(raw, 'created_at');
    const updatedAt = optionalString(raw, 'updated_at');
    if (createdAt !== undefined)
        agent.createdAt = createdAt;
    if (updatedAt !== undefined)
        agent.updatedAt = updatedAt;
    const tools = isObject(raw) ? raw.tools : undefined;
    if (Array.isArray(tools))
        agent.tools = tools.map(readTool);
    return agent;
}
function readTool(raw) {
    const tool = { name: field(raw, 'name', isString) };
    const description = optionalString(raw, 'description');
    const parameters = isObject(raw) ? raw.parameters : undefined;
    if (description !== undefined)
        tool.description = description;
    if (isObject(parameters))
        tool.parameters = parameters;
    return tool;
}
function readToolCalls(raw) {
    if (!Array.isArray(raw))
        return [];
    return raw.map((call) => ({
        id: field(call, 'id', isString),
        name: field(call, 'name', isString),
        arguments: field(call, 'arguments', isString),
    }));
}
function readConversation(raw) {
    const agentId = field(raw, 'agent_id', isString);
    const agentIds = isObject(raw) && isArray(raw.agent_ids) ? raw.agent_ids.filter(isString) : [];
    return {
        id: field(raw, 'id', isString),
        agentId,
        agentIds: agentIds.length > 0 ? agentIds : [agentId],
        title: field(raw, 'title', isString),
        createdAt: field(raw, 'created_at', isString),
        updatedAt: field(raw, 'updated_at', isString),
    };
}
const ROLES = new Set(['user', 'assistant', 'system', 'tool']);
const FINISH_REASONS = new Set(['stop', 'length', 'cancelled', 'error']);
const isRole = (v) => typeof v === 'string' && ROLES.has(v);
const isFinishReason = (v) => typeof v === 'string' && FINISH_REASONS.has(v);
function readTurn(raw) {
    const reason = isObject(raw) ? raw.finish_reason : undefined;
    const usage = isObject(raw) ? raw.usage : undefined;
    const turn = {
        id: field(raw, 'id', isString),
        seq: field(raw, 'seq', isNumber),
        role: field(raw, 'role', isRole),
        content: field(raw, 'content', isString),
        finishReason: isFinishReason(reason) ? reason : null,
        usage: isObject(usage) ? readUsage(usage) : null,
        createdAt: field(raw, 'created_at', isString),
        agentId: optionalString(raw, 'agent_id') ?? null,
    };
    const toolCalls = readToolCalls(isObject(raw) ? raw.tool_calls : undefined);
    const toolCallId = optionalString(raw, 'tool_call_id');
    if (toolCalls.length > 0)
        turn.toolCalls = toolCalls;
    if (toolCallId !== undefined)
        turn.toolCallId = toolCallId;
    return turn;
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
};
function readUsage(raw) {
    const usage = { promptTokens: 0, completionTokens: 0 };
    if (!isObject(raw))
        return usage;
    for (const [wire, name] of Object.entries(USAGE_FIELDS)) {
        const value = raw[wire];
        if (isNumber(value))
            usage[name] = value;
    }
    return usage;
}
async function request(method, path, target, body, alsoOk = []) {
    const { baseUrl, apiKey, signal } = clientOptions(target);
    const url = (baseUrl ?? DEFAULT_BASE_URL).replace(/\/+$/, '') + path;
    const headers = { accept: 'application/json' };
    if (apiKey !== undefined)
        headers.authorization = `Bearer ${apiKey}`;
    const init = { method, headers };
    if (signal !== undefined)
        init.signal = signal;
    if (body !== undefined) {
        headers['content-type'] = 'application/json';
        init.body = JSON.stringify(body);
    }
    let response;
    let text;
    try {
        response = await fetch(url, init);
        text = await response.text();
    }
    catch (err) {
        if (signal?.aborted)
            throw new ApiError(0, 'aborted', `${method} ${url} was aborted`, { cause: err });
        throw new ApiError(0, 'network_error', `${method} ${url} failed: ${describe(err)}`, { cause: err });
    }
    let parsed = undefined;
    let parseError = undefined;
    if (text) {
        try {
            parsed = JSON.parse(text);
        }
        catch (err) {
            parseError = err;
        }
    }
    if (!response.ok && !alsoOk.includes(response.status)) {
        const error = isObject(parsed) && isObject(parsed.error) ? parsed.error : {};
        const code = typeof error.code === 'string' ? error.code : 'http_error';
        const message = typeof error.message === 'string'
            ? error.message
            : `${method} ${url}: HTTP ${response.status} ${response.statusText}`.trim();
        throw new ApiError(response.status, code, message);
    }
    if (parseError !== undefined) {
        throw new ApiError(response.status, 'bad_response', `${method} ${url}: the response is not JSON`, {
            cause: parseError,
        });
    }
    return parsed;
}
function clientOptions(target) {
    if (target === undefined || target === null)
        return {};
    if (typeof target === 'string')
        return { baseUrl: target };
    if (!isObject(target))
        throw new TypeError('the last argument must be a base URL or { baseUrl?, apiKey?, signal? }');
    const { baseUrl, apiKey, signal } = target;
    if (baseUrl !== undefined && typeof baseUrl !== 'string')
        throw new TypeError('baseUrl must be a string');
    const options = { baseUrl, apiKey: checkApiKey(apiKey) };
    if (signal !== undefined)
        options.signal = signal;
    return options;
}
// The alphabet the server allows for keys: it fits a header and a subprotocol without escaping.
const API_KEY_RE = /^[A-Za-z0-9._~-]+$/;
function checkApiKey(apiKey) {
    if (apiKey === undefined || apiKey === null)
        return undefined;
    if (typeof apiKey !== 'string' || !API_KEY_RE.test(apiKey)) {
        throw new TypeError('apiKey must be a non-empty string of A-Z a-z 0-9 - _ . ~');
    }
    return apiKey;
}
function segment(id) {
    if (typeof id !== 'string' || id === '')
        throw new TypeError('id must be a non-empty string');
    return encodeURIComponent(id);
}
/** One server frame as an event; throws a {@link ShapeError} when a field is missing. */
function readEvent(frame) {
    switch (frame.type) {
        case 'start': {
            const turnId = field(frame, 'turn_id', isString);
            return {
                type: 'start',
                requestId: field(frame, 'request_id', isString),
                conversationId: field(frame, 'conversation_id', isString),
                userTurnId: optionalString(frame, 'user_turn_id') ?? turnId,
                turnId,
                agentIds: isArray(frame.agent_ids) ? frame.agent_ids.filter(isString) : [],
            };
        }
        case 'token': {
            const event = {
                type: 'token',
                requestId: field(frame, 'request_id', isString),
                token: field(frame, 'token', isString),
                seq: field(frame, 'seq', isNumber),
                count: typeof frame.count === 'number' ? frame.count : 1,
            };
            const agentId = optionalString(frame, 'agent_id');
            if (agentId !== undefined)
                event.agentId = agentId;
            return event;
        }
        case 'done': {
            const turnId = field(frame, 'turn_id', isString);
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
            };
        }
        case 'error': {
            const event = {
                type: 'error',
                requestId: optionalString(frame, 'request_id') ?? null,
                code: optionalString(frame, 'code') ?? 'error',
                message: optionalString(frame, 'message') ?? 'the server reported an error',
            };
            const conversationId = optionalString(frame, 'conversation_id');
            const answerTurnId = optionalString(frame, 'answer_turn_id') ?? optionalString(frame, 'turn_id');
            if (conversationId !== undefined)
                event.conversationId = conversationId;
            if (answerTurnId !== undefined)
                event.answerTurnId = event.turnId = answerTurnId;
            const agentId = optionalString(frame, 'agent_id');
            if (agentId !== undefined)
                event.agentId = agentId;
            return event;
        }
        default:
            return null; // pong, or a frame type added after this client was written
    }
}
/** An async iterator fed by `push`, ended by `close`; unread events wait in a buffer. */
function eventQueue(onDone) {
    const buffered = [];
    let waiting = null;
    let closed = false;
    const finish = () => {
        closed = true;
        buffered.length = 0;
        onDone();
        return { value: undefined, done: true };
    };
    const iterator = {
        next: () => {
            const event = buffered.shift();
            if (event !== undefined)
                return Promise.resolve({ value: event, done: false });
            if (closed)
                return Promise.resolve({ value: undefined, done: true });
            return new Promise((resolve) => {
                waiting = resolve;
            });
        },
        return: () => Promise.resolve(finish()),
        [Symbol.asyncIterator]() {
            return iterator;
        },
    };
    return {
        iterator,
        push: (event) => {
            if (closed)
                return;
            if (waiting) {
                const resolve = waiting;
                waiting = null;
                resolve({ value: event, done: false });
            }
            else
                buffered.push(event);
        },
        close: () => {
            closed = true;
            if (waiting) {
                const resolve = waiting;
                waiting = null;
                resolve({ value: undefined, done: true });
            }
        },
    };
}
function randomPrefix() {
    const c = globalThis.crypto;
    if (typeof c?.randomUUID !== 'function') {
        throw new ChatError('no_crypto', 'this runtime has no crypto.randomUUID (a browser page needs https or localhost)');
    }
    return c.randomUUID();
}
/**
 * Open a chat socket for one agent. Resolves once the socket is open; rejects with a
 * {@link ChatError} if it cannot be opened.
 *
 * Turns are sent one at a time, in the order `sendMessage` was called: a turn goes out when the
 * previous one has ended, so every turn after the first carries the conversation id and any
 * server error can be matched to exactly one turn.
 */
export async function streamChat(params) {
    const { backendUrl, agentId, onEvent, signal } = params;
    if (typeof agentId !== 'string' || (agentId === '' && params.conversationId === undefined)) {
        throw new TypeError('agentId must be a non-empty string (or continue a room: conversationId)');
    }
    const defaults = wireOptions(params.options);
    const apiKey = checkApiKey(params.apiKey);
    const protocols = apiKey === undefined ? undefined : ['bearer', apiKey];
    if (signal?.aborted)
        throw new ChatError('aborted', 'the chat stream was aborted before it opened');
    const prefix = randomPrefix();
    const factory = params.socketFactory ?? globalSocketFactory();
    const reconnectAttempts = params.reconnectAttempts ?? RECONNECT_DELAYS_MS.length;
    let conversationId = params.conversationId;
    // A stream that continues a conversation names it in the socket URL, so that a proxy routing
    // by it (deploy/nginx) sends every socket of the conversation to the same instance.
    let socket = await openSocket(conversationUrl(backendUrl, conversationId), protocols, factory, signal);
    let ended = null;
    let queue = [];
    let counter = 0;
    const listeners = new Set();
    const emit = (event) => {
        for (const listener of listeners)
            listener.push(event);
        if (!onEvent)
            return;
        try {
            onEvent(event);
        }
        catch (err) {
            // Report it like a throwing DOM listener, without breaking the turn bookkeeping.
            setTimeout(() => {
                throw err;
            });
        }
    };
    const end = (error) => {
        if (ended)
            return;
        ended = error;
        const pending = queue;
        queue = [];
        for (const turn of pending)
            turn.reject(error);
        for (const listener of listeners)
            listener.close();
        listeners.clear();
        signal?.removeEventListener('abort', onAbort);
    };
    const pump = () => {
        const turn = queue[0];
        if (ended || !turn || turn.sent)
            return;
        if (conversationId !== undefined)
            turn.frame.conversation_id = conversationId;
        turn.sent = true;
        try {
            socket.send(JSON.stringify(turn.frame));
        }
        catch (err) {
            end(new ChatError('socket_closed', `could not send on the chat socket: ${describe(err)}`, null, { cause: err }));
        }
    };
    /** The current turn has ended: send the next one. */
    const next = () => {
        queue.shift();
        pump();
    };
    const close = (error, code, reason) => {
        end(error);
        try {
            socket.close(code, reason);
        }
        catch {
            // already closing
        }
    };
    const onMessage = (message) => {
        const frame = parseFrame(message.data);
        if (!frame)
            return;
        let event;
        try {
            event = readEvent(frame);
        }
        catch (err) {
            if (!(err instanceof ShapeError))
                throw err;
            close(new ChatError('bad_frame', `the server sent a ${String(frame.type)} frame this client cannot read: ${err.message}`), 1002, 'bad frame');
            return;
        }
        if (event === null)
            return;
        const current = queue[0];
        const mine = (id) => current !== undefined && current.sent && id === current.requestId;
        switch (event.type) {
            case 'start':
                if (conversationId === undefined)
                    conversationId = event.conversationId;
                if (mine(event.requestId)) {
                    current.started = true;
                    current.expected = Math.max(event.agentIds.length, 1);
                }
                emit(event);
                return;
            case 'token':
                if (mine(event.requestId)) {
                    current.resuming = false;
                    if (event.seq !== current.received)
                        return; // already had it
                    current.text += event.token;
                    current.received += event.count;
                }
                emit(event);
                return;
            case 'done': {
                if (conversationId === undefined)
                    conversationId = event.conversationId;
                emit(event);
                if (mine(event.requestId)) {
                    const turn = current;
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
                    });
                    turn.text = '';
                    // A round's answers before the last; the server starts no further speaker after an
                    // answer that did not end normally.
                    const normal = event.finishReason === 'stop' || event.finishReason === 'length';
                    if (turn.results.length < turn.expected && normal)
                        return;
                    turn.resolve(turn.results);
                    next();
                }
                return;
            }
            case 'error':
                if (mine(event.requestId) && current.resuming && !current.started && event.code === 'unknown_request') {
                    // It was dropped before it started (nothing stored): send it again.
                    current.resuming = false;
                    try {
                        socket.send(JSON.stringify(current.frame));
                    }
                    catch {
                        // the close handler reconnects again
                    }
                    return;
                }
                emit(event);
                // An error without a request id answers a frame the server could not read; only the
                // current turn's frame is in flight, so it is that turn's.
                if (mine(event.requestId) || (event.requestId === null && current?.sent)) {
                    const turn = current;
                    const error = new ChatError(event.code, event.message, turn.requestId);
                    error.results = turn.results;
                    turn.reject(error);
                    next();
                }
                return;
        }
    };
    const onClose = (event) => {
        if (ended)
            return;
        const detail = event.code ? ` (code ${event.code}${event.reason ? `: ${event.reason}` : ''})` : '';
        void reconnect().then((ok) => {
            if (!ok)
                end(new ChatError('socket_closed', `the chat socket closed${detail}`));
        });
    };
    const listen = (sock) => {
        sock.addEventListener('message', (message) => {
            if (sock === socket)
                onMessage(message);
        });
        sock.addEventListener('close', (event) => {
            if (sock === socket)
                onClose(event);
        });
    };
    listen(socket);
    /** Reopen the dropped socket (bounded backoff) and resume the turn in flight. */
    const reconnect = async () => {
        for (let attempt = 1; attempt <= reconnectAttempts; attempt++) {
            const delay = RECONNECT_DELAYS_MS[Math.min(attempt, RECONNECT_DELAYS_MS.length) - 1];
            await new Promise((resolve) => setTimeout(resolve, delay));
            if (ended)
                return false;
            let fresh;
            try {
                fresh = await openSocket(conversationUrl(backendUrl, conversationId), protocols, factory, signal);
            }
            catch {
                continue;
            }
            if (ended) {
                fresh.close(1000, 'stopped');
                return false;
            }
            socket = fresh;
            listen(fresh);
            const current = queue[0];
            let afterSeq = -1;
            try {
                if (current?.sent) {
                    afterSeq = current.received - 1;
                    current.resuming = true;
                    fresh.send(JSON.stringify({ type: 'resume', request_id: current.requestId, after_seq: afterSeq }));
                }
            }
            catch {
                continue;
            }
            emit({ type: 'resumed', requestId: current?.sent ? current.requestId : null, afterSeq, attempt });
            pump();
            return true;
        }
        return false;
    };
    const cancelTurn = (requestId) => {
        const index = queue.findIndex((turn) => turn.requestId === requestId);
        if (ended || index < 0)
            return;
        const turn = queue[index];
        if (!turn.sent) {
            queue.splice(index, 1);
            turn.reject(new ChatError('aborted', 'the turn was aborted before it was sent', requestId));
            return;
        }
        try {
            socket.send(JSON.stringify({ type: 'cancel', request_id: requestId }));
        }
        catch {
            // the close handler rejects the turn
        }
    };
    const sendMessage = (req) => {
        if (isObject(req) && req.agentId !== undefined && typeof req.agentId !== 'string') {
            return Promise.reject(new TypeError('agentId must be a string'));
        }
        const speaker = isObject(req) && req.agentId !== undefined ? req.agentId : agentId;
        return queueTurn(req, speaker === '' ? {} : { agent_id: speaker }).then((results) => results[results.length - 1]);
    };
    const sendRound = (req) => {
        if (!isObject(req) || !Array.isArray(req.agentIds) || req.agentIds.length === 0 || !req.agentIds.every(isString)) {
            return Promise.reject(new TypeError('sendRound expects { message: string, agentIds: string[] (at least one) }'));
        }
        return queueTurn(req, { agent_ids: [...req.agentIds] });
    };
    const queueTurn = (req, speakers) => new Promise((resolve, reject) => {
        if (ended) {
            reject(new ChatError(ended.code, ended.message));
            return;
        }
        if (!isObject(req) || typeof req.message !== 'string') {
            reject(new TypeError('sendMessage expects { message: string, options?: ChatOptions, signal?: AbortSignal }'));
            return;
        }
        let options;
        try {
            options = { ...defaults, ...wireOptions(req.options) };
        }
        catch (err) {
            reject(err);
            return;
        }
        const requestId = `${prefix}-${++counter}`;
        if (req.signal?.aborted) {
            reject(new ChatError('aborted', 'the turn was aborted before it was sent', requestId));
            return;
        }
        const frame = { type: 'chat', ...speakers, message: req.message, request_id: requestId };
        if (Object.keys(options).length > 0)
            frame.options = options;
        if (!('agentIds' in req)) { // a single turn (a round offers no tools)
            const one = req;
            if (one.tools !== undefined)
                frame.tools = one.tools;
            if (one.toolChoice !== undefined)
                frame.tool_choice = one.toolChoice;
            if (one.toolResults !== undefined) {
                frame.tool_results = one.toolResults.map((r) => ({ tool_call_id: r.toolCallId, content: r.content }));
            }
        }
        const abort = () => cancelTurn(requestId);
        req.signal?.addEventListener('abort', abort, { once: true });
        const settle = () => req.signal?.removeEventListener('abort', abort);
        queue.push({
            requestId,
            frame,
            resolve: (result) => {
                settle();
                resolve(result);
            },
            reject: (error) => {
                settle();
                reject(error);
            },
            text: '',
            results: [],
            expected: 1,
            received: 0,
            sent: false,
            started: false,
            resuming: false,
        });
        pump();
    });
    const stop = () => {
        close(new ChatError('stopped', 'the chat stream was stopped; call streamChat() again to chat'), 1000, 'stop');
    };
    function onAbort() {
        close(new ChatError('aborted', 'the chat stream was aborted'), 1000, 'aborted');
    }
    signal?.addEventListener('abort', onAbort, { once: true });
    const cancel = () => {
        const current = queue[0];
        if (current?.sent)
            cancelTurn(current.requestId);
    };
    const events = () => {
        const listener = eventQueue(() => listeners.delete(listener));
        if (ended)
            listener.close();
        else
            listeners.add(listener);
        return listener.iterator;
    };
    return {
        sendMessage,
        sendRound,
        stop,
        cancel,
        events,
        get conversationId() {
            return conversationId;
        },
    };
}
function globalSocketFactory() {
    const Ctor = globalThis.WebSocket;
    if (typeof Ctor !== 'function') {
        throw new ChatError('no_websocket', 'this runtime has no global WebSocket (Node.js before 22): pass socketFactory, ' +
            "e.g. (url, protocols) => new WebSocket(url, protocols) with WebSocket from the 'ws' package");
    }
    return (url, protocols) => (protocols ? new Ctor(url, protocols) : new Ctor(url));
}
/** `url` with `?conversation_id=` set (other query parameters kept); `url` itself without one. */
export function conversationUrl(url, conversationId) {
    if (conversationId === undefined)
        return url;
    const parsed = new URL(url);
    parsed.searchParams.set('conversation_id', conversationId);
    return parsed.toString();
}
function openSocket(url, protocols, factory, signal) {
    return new Promise((resolve, reject) => {
        let socket;
        try {
            socket = protocols ? factory(url, protocols) : factory(url);
        }
        catch (err) {
            reject(new ChatError('socket_open_failed', `cannot open a chat socket to ${url}: ${describe(err)}`, null, { cause: err }));
            return;
        }
        let settled = false;
        const closeQuietly = () => {
            try {
                socket.close();
            }
            catch {
                // never opened
            }
        };
        const onAbort = () => {
            if (settled)
                return;
            settled = true;
            reject(new ChatError('aborted', 'the chat stream was aborted while its socket opened'));
            closeQuietly();
        };
        signal?.addEventListener('abort', onAbort, { once: true });
        const fail = (event) => {
            if (settled)
                return;
            settled = true;
            signal?.removeEventListener('abort', onAbort);
            closeQuietly();
            const why = event.error ?? event.message;
            const detail = why ? `: ${describe(why)}` : event.code ? ` (code ${event.code})` : '';
            // The server refuses a socket before accepting it (HTTP 403) for a missing or wrong key, a
            // foreign origin, or a path that is not the chat socket. Browsers hide the status.
            const refused = why !== undefined && /\b40[134]\b/.test(describe(why));
            refusalHint(url, refused, protocols !== undefined).then((hint) => reject(new ChatError('socket_open_failed', `could not connect to ${url}${detail}${hint}`)));
        };
        socket.addEventListener('open', () => {
            if (settled)
                return;
            settled = true;
            signal?.removeEventListener('abort', onAbort);
            resolve(socket);
        });
        socket.addEventListener('error', fail);
        socket.addEventListener('close', fail);
    });
}
/**
 * Why a refused socket was refused, as far as can be told: a key is only mentioned when the server
 * has keys configured (its REST side answers 401 without one), a path when it is not /ws/chat.
 */
async function refusalHint(url, refused, keySent) {
    if (!refused)
        return '';
    let parsed;
    try {
        parsed = new URL(url);
    }
    catch {
        return '';
    }
    if (!/\/ws\/chat\/?$/.test(parsed.pathname))
        return ` (the chat socket is at /ws/chat, not ${parsed.pathname})`;
    if (keySent)
        return ' (was the API key right?)';
    const base = `${parsed.protocol === 'wss:' ? 'https:' : 'http:'}//${parsed.host}${parsed.pathname.replace(/\/ws\/chat\/?$/, '')}`;
    try {
        const response = await fetch(`${base}/agents`, { method: 'GET', headers: { accept: 'application/json' } });
        if (response.status === 401)
            return ' (the server wants an API key: pass apiKey)';
    }
    catch {
        // the REST side is unreachable too: nothing more to say
    }
    return '';
}
const OPTION_NAMES = {
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
};
/** camelCase options → the wire's snake_case, leaving out unset fields. Unknown keys throw. */
function wireOptions(options) {
    const wire = {};
    if (options === undefined || options === null)
        return wire;
    if (!isObject(options))
        throw new TypeError('options must be an object');
    for (const [key, value] of Object.entries(options)) {
        if (!Object.prototype.hasOwnProperty.call(OPTION_NAMES, key)) {
            throw new TypeError(`unknown chat option ${JSON.stringify(key)}; known: ${Object.keys(OPTION_NAMES).join(', ')}`);
        }
        if (value !== undefined)
            wire[OPTION_NAMES[key]] = value;
    }
    return wire;
}
function parseFrame(data) {
    let text;
    if (typeof data === 'string')
        text = data;
    else if (data instanceof ArrayBuffer || ArrayBuffer.isView(data))
        text = new TextDecoder().decode(data);
    else
        return null;
    try {
        const frame = JSON.parse(text);
        return isObject(frame) ? frame : null;
    }
    catch {
        return null;
    }
}
function isObject(value) {
    return typeof value === 'object' && value !== null && !Array.isArray(value);
}
function describe(err) {
    if (err instanceof Error) {
        const cause = err.cause;
        return cause instanceof Error && cause.message ? `${err.message} (${cause.message})` : err.message;
    }
    return String(err);
}
