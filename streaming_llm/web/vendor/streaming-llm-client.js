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
export const DEFAULT_BASE_URL = 'http://localhost:8000';
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
 * key included), `no_websocket`, `socket_closed`, `stopped`.
 */
export class ChatError extends Error {
    code;
    requestId;
    constructor(code, message, requestId = null, options) {
        super(message, options);
        this.name = 'ChatError';
        this.code = code;
        this.requestId = requestId;
    }
}
// --- REST ------------------------------------------------------------------------------------
export function listAgents(baseUrl) {
    return request('GET', '/agents', baseUrl);
}
export function getAgent(id, baseUrl) {
    return request('GET', `/agents/${segment(id)}`, baseUrl);
}
/** Create or replace the agent `agent.id`; resolves with the agent as stored. */
export function updateAgent(agent, baseUrl) {
    const { name, system_prompt, markdown_context } = agent;
    return request('PUT', `/agents/${segment(agent.id)}`, baseUrl, {
        name,
        system_prompt,
        markdown_context,
    });
}
export async function deleteAgent(id, baseUrl) {
    await request('DELETE', `/agents/${segment(id)}`, baseUrl);
}
/** Conversations, newest first; only the agent's when `agentId` is given. */
export function listConversations(agentId, baseUrl) {
    const query = agentId === undefined ? '' : `?agent_id=${encodeURIComponent(agentId)}`;
    return request('GET', `/conversations${query}`, baseUrl);
}
export function getConversation(id, baseUrl) {
    return request('GET', `/conversations/${segment(id)}`, baseUrl);
}
export async function deleteConversation(id, baseUrl) {
    await request('DELETE', `/conversations/${segment(id)}`, baseUrl);
}
/** The health report; it resolves while the engine loads too (the server answers 503 then). */
export function getHealth(baseUrl) {
    return request('GET', '/health', baseUrl, undefined, [503]);
}
async function request(method, path, target, body, alsoOk = []) {
    const { baseUrl, apiKey } = clientOptions(target);
    const url = (baseUrl ?? DEFAULT_BASE_URL).replace(/\/+$/, '') + path;
    const headers = { accept: 'application/json' };
    if (apiKey !== undefined)
        headers.authorization = `Bearer ${apiKey}`;
    const init = { method, headers };
    if (body !== undefined) {
        headers['content-type'] = 'application/json';
        init.body = JSON.stringify(body);
    }
    let response;
    try {
        response = await fetch(url, init);
    }
    catch (err) {
        throw new ApiError(0, 'network_error', `${method} ${url} failed: ${describe(err)}`, { cause: err });
    }
    const text = await response.text();
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
        throw new TypeError('the last argument must be a base URL or { baseUrl?, apiKey? }');
    const { baseUrl, apiKey } = target;
    if (baseUrl !== undefined && typeof baseUrl !== 'string')
        throw new TypeError('baseUrl must be a string');
    return { baseUrl, apiKey: checkApiKey(apiKey) };
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
/**
 * Open a chat socket for one agent. Resolves once the socket is open; rejects with a
 * {@link ChatError} if it cannot be opened.
 *
 * Turns are sent one at a time, in the order `sendMessage` was called: a turn goes out when the
 * previous one has ended, so every turn after the first carries the conversation id and any
 * server error can be matched to exactly one turn.
 */
export async function streamChat(params) {
    const { backendUrl, agentId, onEvent } = params;
    if (typeof agentId !== 'string' || agentId === '')
        throw new TypeError('agentId must be a non-empty string');
    const defaults = wireOptions(params.options);
    const apiKey = checkApiKey(params.apiKey);
    const protocols = apiKey === undefined ? undefined : ['bearer', apiKey];
    const socket = await openSocket(backendUrl, protocols, params.socketFactory ?? globalSocketFactory());
    let conversationId = params.conversationId;
    let ended = null;
    let queue = [];
    const prefix = Math.random().toString(36).slice(2, 10);
    let counter = 0;
    const emit = (event) => {
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
    socket.addEventListener('message', (event) => {
        const frame = parseFrame(event.data);
        if (!frame)
            return;
        const current = queue[0];
        const mine = (id) => current !== undefined && current.sent && id === current.requestId;
        switch (frame.type) {
            case 'start': {
                if (conversationId === undefined && typeof frame.conversation_id === 'string') {
                    conversationId = frame.conversation_id;
                }
                emit({
                    type: 'start',
                    requestId: String(frame.request_id),
                    conversationId: String(frame.conversation_id),
                    turnId: String(frame.turn_id),
                });
                return;
            }
            case 'token': {
                const token = typeof frame.token === 'string' ? frame.token : '';
                if (mine(frame.request_id))
                    current.text += token;
                emit({ type: 'token', requestId: String(frame.request_id), token, seq: Number(frame.seq) });
                return;
            }
            case 'done': {
                const event = {
                    type: 'done',
                    requestId: String(frame.request_id),
                    conversationId: String(frame.conversation_id),
                    turnId: String(frame.turn_id),
                    finishReason: frame.finish_reason,
                    usage: camelUsage(frame.usage),
                };
                if (conversationId === undefined)
                    conversationId = event.conversationId;
                emit(event);
                if (mine(frame.request_id)) {
                    const turn = current;
                    turn.resolve({
                        text: turn.text,
                        conversationId: event.conversationId,
                        finishReason: event.finishReason,
                        usage: event.usage,
                        requestId: turn.requestId,
                        turnId: event.turnId,
                    });
                    next();
                }
                return;
            }
            case 'error': {
                const requestId = typeof frame.request_id === 'string' ? frame.request_id : null;
                const code = typeof frame.code === 'string' ? frame.code : 'error';
                const message = typeof frame.message === 'string' ? frame.message : 'the server reported an error';
                const event = { type: 'error', requestId, code, message };
                if (typeof frame.conversation_id === 'string')
                    event.conversationId = frame.conversation_id;
                if (typeof frame.turn_id === 'string')
                    event.turnId = frame.turn_id;
                emit(event);
                // An error without a request id answers a frame the server could not read; only the
                // current turn's frame is in flight, so it is that turn's.
                if (mine(requestId) || (requestId === null && current?.sent)) {
                    const turn = current;
                    turn.reject(new ChatError(code, message, turn.requestId));
                    next();
                }
                return;
            }
            default:
                return; // pong, or a frame type added after this client was written
        }
    });
    socket.addEventListener('close', (event) => {
        const detail = event.code ? ` (code ${event.code}${event.reason ? `: ${event.reason}` : ''})` : '';
        end(new ChatError('socket_closed', `the chat socket closed${detail}`));
    });
    const sendMessage = (req) => new Promise((resolve, reject) => {
        if (ended) {
            reject(new ChatError(ended.code, ended.message));
            return;
        }
        if (!isObject(req) || typeof req.message !== 'string') {
            reject(new TypeError('sendMessage expects { message: string, options?: ChatOptions }'));
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
        const frame = { type: 'chat', agent_id: agentId, message: req.message, request_id: requestId };
        if (Object.keys(options).length > 0)
            frame.options = options;
        queue.push({ requestId, frame, resolve, reject, text: '', sent: false });
        pump();
    });
    const stop = () => {
        end(new ChatError('stopped', 'the chat stream was stopped; call streamChat() again to chat'));
        try {
            socket.close(1000, 'stop');
        }
        catch {
            // already closing
        }
    };
    const cancel = () => {
        const current = queue[0];
        if (ended || !current?.sent)
            return;
        try {
            socket.send(JSON.stringify({ type: 'cancel', request_id: current.requestId }));
        }
        catch {
            // the close handler rejects the turn
        }
    };
    return {
        sendMessage,
        stop,
        cancel,
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
function openSocket(url, protocols, factory) {
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
        const fail = (event) => {
            if (settled)
                return;
            settled = true;
            const why = event.error ?? event.message;
            const detail = why ? `: ${describe(why)}` : event.code ? ` (code ${event.code})` : '';
            // The server refuses a socket before accepting it (HTTP 403) for a missing or wrong key or a
            // foreign origin. Browsers hide the status, so the hint goes by whether a key was sent.
            const refused = why !== undefined && /\b40[13]\b/.test(describe(why));
            const hint = refused
                ? protocols
                    ? ' (was the API key right?)'
                    : ' (does the server want an API key? pass apiKey)'
                : '';
            reject(new ChatError('socket_open_failed', `could not connect to ${url}${detail}${hint}`));
            try {
                socket.close();
            }
            catch {
                // never opened
            }
        };
        socket.addEventListener('open', () => {
            if (settled)
                return;
            settled = true;
            resolve(socket);
        });
        socket.addEventListener('error', fail);
        socket.addEventListener('close', fail);
    });
}
const OPTION_NAMES = {
    temperature: 'temperature',
    maxNewTokens: 'max_new_tokens',
    topP: 'top_p',
    topK: 'top_k',
    stop: 'stop',
    seed: 'seed',
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
function camelUsage(raw) {
    const usage = { promptTokens: 0, completionTokens: 0 };
    if (!isObject(raw))
        return usage;
    for (const [key, value] of Object.entries(raw)) {
        if (typeof value === 'number')
            usage[key.replace(/_([a-z])/g, (_, c) => c.toUpperCase())] = value;
    }
    return usage;
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
