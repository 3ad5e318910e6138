// @ts-check
// The reference chat page. Everything it says to the server goes through the streaming-llm-client
// package (the built module in vendor/), so the page and TypeScript callers share one protocol.
// Answers are Markdown: rendered with marked, sanitized with DOMPurify (model output never runs
// script), code highlighted with highlight.js; all three are pinned builds in vendor/.
import {
  ApiError,
  ChatError,
  createRoom,
  deleteAgent,
  deleteConversation,
  getAgent,
  getConversation,
  getHealth,
  listAgents,
  listConversations,
  renameConversation,
  streamChat,
  truncateConversation,
  updateAgent,
} from './vendor/streaming-llm-client.js'
import { marked } from './vendor/marked.esm.js'
import DOMPurify from './vendor/purify.es.mjs'
import hljs from './vendor/highlight.min.js'

/** @typedef {import('./vendor/streaming-llm-client.js').Agent} Agent */
/** @typedef {import('./vendor/streaming-llm-client.js').ChatStream} ChatStream */
/** @typedef {import('./vendor/streaming-llm-client.js').ChatOptions} ChatOptions */
/** @typedef {import('./vendor/streaming-llm-client.js').Conversation} Conversation */
/** @typedef {import('./vendor/streaming-llm-client.js').Turn} Turn */
/** @typedef {import('./vendor/streaming-llm-client.js').Usage} Usage */
/** @typedef {'connecting' | 'open' | 'reconnecting' | 'closed'} ConnectionState */
/** @typedef {{ item: HTMLLIElement, body: HTMLDivElement, info: HTMLDivElement, raw: string }} Bubble */

// The page is served by the backend itself: REST and socket live next to it (any path prefix kept).
const BASE = new URL('..', import.meta.url).href.replace(/\/+$/, '')
const WS_URL = `${BASE.replace(/^http/, 'ws')}/ws/chat`

// With API keys configured the server answers 401 until the page has one: it asks in the header
// and keeps the key for this tab only (sessionStorage), for REST and the socket alike.
const KEY_STORAGE = 'streaming-llm.apiKey'
const OPTIONS_STORAGE = 'streaming-llm.options.' // + agent id, in localStorage
const BACKOFF_MS = [500, 1000, 2000, 4000, 8000, 15000] // then 15 s between reconnect attempts

/** @param {string} id */
function $(id) {
  const node = document.getElementById(id)
  if (!node) throw new Error(`#${id} is missing from index.html`)
  return node
}
/** @param {string} id */
const input = (id) => /** @type {HTMLInputElement} */ ($(id))
/** @param {string} id */
const button = (id) => /** @type {HTMLButtonElement} */ ($(id))

const ui = {
  health: $('health'),
  connection: $('connection'),
  keyForm: /** @type {HTMLFormElement} */ ($('key-form')),
  keyInput: input('api-key'),
  keyError: $('key-error'),
  agentSelect: /** @type {HTMLSelectElement} */ ($('agent-select')),
  newAgent: button('new-agent'),
  editAgent: button('edit-agent'),
  deleteAgent: button('delete-agent'),
  newConversation: button('new-conversation'),
  newRoom: button('new-room'),
  roomTo: $('room-to'),
  roomAgentsTo: $('room-agents-to'),
  roomDialog: /** @type {HTMLDialogElement} */ ($('room-dialog')),
  roomForm: /** @type {HTMLFormElement} */ ($('room-form')),
  roomTitle: input('room-title'),
  roomAgents: $('room-agents'),
  roomError: $('room-error'),
  roomCancel: button('room-cancel'),
  search: input('conversation-search'),
  conversationList: $('conversation-list'),
  empty: $('empty'),
  transcript: $('transcript'),
  composer: /** @type {HTMLFormElement} */ ($('composer')),
  message: /** @type {HTMLTextAreaElement} */ ($('message')),
  options: {
    temperature: input('opt-temperature'),
    maxNewTokens: input('opt-max-new-tokens'),
    topP: input('opt-top-p'),
    topK: input('opt-top-k'),
    minP: input('opt-min-p'),
    repetitionPenalty: input('opt-repetition-penalty'),
    presencePenalty: input('opt-presence-penalty'),
    frequencyPenalty: input('opt-frequency-penalty'),
  },
  stop: /** @type {HTMLTextAreaElement} */ ($('opt-stop')),
  resetOptions: button('opt-reset'),
  status: $('status'),
  stopButton: button('stop'),
  send: button('send'),
  dialog: /** @type {HTMLDialogElement} */ ($('agent-dialog')),
  dialogTitle: $('agent-dialog-title'),
  agentForm: /** @type {HTMLFormElement} */ ($('agent-form')),
  agentId: input('agent-id'),
  agentName: input('agent-name'),
  agentSystemPrompt: /** @type {HTMLTextAreaElement} */ ($('agent-system-prompt')),
  agentMarkdownContext: /** @type {HTMLTextAreaElement} */ ($('agent-markdown-context')),
  agentError: $('agent-error'),
  agentCancel: button('agent-cancel'),
}

const state = {
  apiKey: storedKey(),
  /** @type {Agent[]} */
  agents: [],
  /** @type {string | null} */
  agentId: null,
  /** @type {string | null} null: the next message starts a new conversation */
  conversationId: null,
  /** @type {ChatStream | null} the open socket of this agent and conversation */
  stream: null,
  /** @type {ConnectionState} */
  connection: 'connecting',
  reconnectAttempt: 0,
  /** @type {ReturnType<typeof setTimeout> | null} */
  reconnectTimer: null,
  /** bumped whenever the wanted socket changes, so a late connect attempt knows it is stale */
  generation: 0,
  busy: false,
  /** @type {string | null} why the model cannot answer now (loading, failed), or null */
  modelBlocked: null,
  /** @type {Bubble | null} the assistant message waiting for its turn's tokens */
  pending: null,
  /** @type {string[]} the open conversation's agents: several in a room */
  room: [],
}

// --- small helpers ------------------------------------------------------------------------------
const EMPTY_TEXT = ui.empty.textContent ?? ''

/**
 * @template {keyof HTMLElementTagNameMap} K
 * @param {K} tag
 * @param {Partial<HTMLElementTagNameMap[K]>} props
 * @param {(Node | string)[]} children
 * @returns {HTMLElementTagNameMap[K]}
 */
function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props)
  node.append(...children)
  return node
}

/** @param {string} text @param {'' | 'error'} kind */
function say(text, kind = '') {
  ui.status.textContent = text
  ui.status.className = `status ${kind}`
}

/** What went wrong, in words a person can act on. @param {unknown} err */
function describeError(err) {
  if (err instanceof ChatError || err instanceof ApiError) {
    switch (err.code) {
      case 'socket_open_failed':
      case 'network_error':
        return `Cannot reach the server at ${new URL(BASE).host}. Is it running? The page keeps trying to reconnect.`
      case 'socket_closed':
        return 'The connection to the server was lost. The page is reconnecting; the answer so far is kept if the server stored it.'
      case 'engine_not_ready':
        return 'The model is still loading. Send works again once it is ready.'
      case 'engine_unavailable':
        return `The model could not be loaded: ${err.message}. Check the server's log and settings.`
      case 'busy':
        return 'The server is busy with other answers. Try again in a moment.'
      case 'shutting_down':
        return 'The server is shutting down. The page reconnects when it is back.'
      case 'unauthorized':
        return 'This server needs an API key.'
      default:
        return `${err.message} (${err.code})`
    }
  }
  return err instanceof Error ? err.message : String(err)
}

/** @param {string | null} finishReason @param {Usage | null | undefined} usage */
function formatUsage(finishReason, usage) {
  const parts = [finishReason ?? '']
  if (usage) {
    parts.push(`${usage.completionTokens} tokens`)
    if (usage.decodeTokensPerS) parts.push(`${usage.decodeTokensPerS} tok/s`)
  }
  return parts.filter(Boolean).join(' · ')
}

/** Copy `text`; say so on the button. @param {HTMLButtonElement} target @param {string} text */
async function copy(target, text) {
  try {
    await navigator.clipboard.writeText(text)
    target.textContent = 'Copied'
  } catch {
    target.textContent = 'Copy failed'
  }
  target.dataset.copied = 'true'
  setTimeout(() => {
    target.textContent = target.dataset.label ?? 'Copy'
    delete target.dataset.copied
  }, 1500)
}

/** @param {string} label @param {string} title @param {() => string} text */
function copyButton(label, title, text) {
  const b = el('button', { type: 'button', className: 'copy', textContent: label, title })
  b.dataset.label = label
  b.addEventListener('click', () => copy(b, text()))
  return b
}

// --- Markdown ---------------------------------------------------------------------------------
// Model output is untrusted. DOMPurify's defaults drop script, event handlers and javascript:
// URLs; on top of that an answer may not bring what could dress it up as the page: forms and
// controls (a fake "session expired, enter your API key" form), <style>, style and class
// attributes (an overlay fixed over the window, the page's own controls hidden), ids and names
// that shadow the page's elements, frames, media, SVG and popovers. The page's
// Content-Security-Policy (no inline script or style, images from this server) backs this up.
/** @type {import('./vendor/purify.es.mjs').Config} */
const PURIFY = {
  USE_PROFILES: { html: true }, // no SVG or MathML
  FORBID_TAGS: ['style', 'link', 'meta', 'base', 'form', 'input', 'button', 'textarea', 'select', 'option',
    'optgroup', 'datalist', 'fieldset', 'dialog', 'template', 'iframe', 'frame', 'frameset', 'object',
    'embed', 'video', 'audio', 'source', 'track', 'picture', 'marquee'],
  FORBID_ATTR: ['style', 'id', 'name', 'srcset', 'background', 'poster', 'ping', 'width', 'height',
    'popover', 'popovertarget', 'popovertargetaction', 'formaction', 'action', 'autofocus', 'tabindex',
    'accesskey'],
  ALLOW_DATA_ATTR: false,
}

// Images from other sites would tell them who reads which answer (and whatever the model put in
// the URL): such an <img> keeps its address in data-remote-src and loads nothing until the
// reader clicks it, and only where the server allows it at all (STREAMING_LLM_PAGE_REMOTE_IMAGES).
const REMOTE_IMAGES = document.querySelector('meta[name="streaming-llm-remote-images"]')?.getAttribute('content') === 'click'
/** Remote images the reader chose to show, kept across re-renders of a streaming answer. */
const shownImages = new Set()

/** @param {string} src */
function isLocalImage(src) {
  if (/^data:image\//i.test(src)) return true
  try {
    return new URL(src, location.href).origin === location.origin
  } catch {
    return false
  }
}

DOMPurify.addHook('uponSanitizeAttribute', (node, data) => {
  // Classes only for a code block's language (marked's "language-python", read by highlight.js).
  if (data.attrName === 'class') data.keepAttr = node.tagName === 'CODE' && /^language-[\w+#.-]+$/.test(data.attrValue)
})
// Links open in a new tab without access to this page.
DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A' && node.hasAttribute('href')) {
    node.setAttribute('target', '_blank')
    node.setAttribute('rel', 'noopener noreferrer')
  }
  if (node.tagName === 'IMG') {
    const src = node.getAttribute('src') ?? ''
    if (!isLocalImage(src)) {
      node.removeAttribute('src') // still in DOMPurify's inert document: nothing was fetched
      if (src) node.setAttribute('data-remote-src', src)
    }
  }
})

/** What stands in for a remote image: a button that shows it, or a note that it is not shown.
 * @param {HTMLImageElement} img */
function remoteImage(img) {
  const src = img.dataset.remoteSrc ?? ''
  const alt = img.getAttribute('alt') || 'image'
  let url = null
  try {
    url = new URL(src)
  } catch {
    // not a URL at all: shown as not loaded
  }
  if (!REMOTE_IMAGES || url?.protocol !== 'https:') {
    return el('span', { className: 'remote-image', textContent: `[image: ${alt}]`,
      title: `Not loaded: ${src}${REMOTE_IMAGES ? ' (only https: images can be shown)' : ' (remote images are off on this server)'}` })
  }
  if (shownImages.has(src)) return el('img', { src, alt })
  const show = el('button', { type: 'button', className: 'remote-image', textContent: `Show image: ${alt} (${url.host})`,
    title: `Load ${src}: its site learns that you read this` })
  show.addEventListener('click', () => {
    shownImages.add(src)
    show.replaceWith(el('img', { src, alt }))
  })
  return show
}

/** Render Markdown into `target`, safely, with highlighted code and a copy button per block.
 * @param {HTMLElement} target @param {string} markdown */
function renderMarkdown(target, markdown) {
  const html = /** @type {string} */ (marked.parse(markdown, { async: false, gfm: true, breaks: true }))
  target.innerHTML = DOMPurify.sanitize(html.trimEnd(), PURIFY)
  for (const img of target.querySelectorAll('img[data-remote-src]')) img.replaceWith(remoteImage(/** @type {HTMLImageElement} */ (img)))
  for (const code of target.querySelectorAll('pre > code')) {
    hljs.highlightElement(/** @type {HTMLElement} */ (code))
    const pre = /** @type {HTMLElement} */ (code.parentElement)
    pre.prepend(copyButton('Copy', 'Copy this code', () => (code.textContent ?? '').replace(/\n$/, '')))
  }
}

/** Re-render the streaming answer at most once per animation frame, not once per token. */
const frames = {
  /** @type {Set<Bubble>} */
  dirty: new Set(),
  scheduled: false,
  /** @param {Bubble} bubble */
  mark(bubble) {
    this.dirty.add(bubble)
    if (this.scheduled) return
    this.scheduled = true
    requestAnimationFrame(() => {
      this.scheduled = false
      for (const b of this.dirty) renderMarkdown(b.body, b.raw)
      this.dirty.clear()
      scrollDown()
    })
  },
}

// --- API key ------------------------------------------------------------------------------------
function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE)
  } catch {
    return null // storage disabled: the key lasts until the page is left
  }
}

/** @param {string | null} key */
function storeKey(key) {
  state.apiKey = key
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key)
    else sessionStorage.removeItem(KEY_STORAGE)
  } catch {
    // storage disabled
  }
}

/** The last argument of every REST helper: this server, with the key when there is one. */
function conn() {
  return { baseUrl: BASE, apiKey: state.apiKey ?? undefined }
}

/** @param {unknown} err */
function isUnauthorized(err) {
  return err instanceof ApiError && err.status === 401
}

/** The server refused a request for want of a (valid) key: forget the key and ask for one. */
function askForKey() {
  const refused = Boolean(state.apiKey)
  storeKey(null)
  disconnect('closed')
  delete document.body.dataset.ready
  ui.keyError.textContent = refused ? 'That key was refused.' : ''
  ui.keyForm.hidden = false
  ui.empty.textContent = 'This server needs an API key: enter it above.'
  ui.empty.hidden = false
  ui.keyInput.focus()
}

/** @param {SubmitEvent} event */
function useKey(event) {
  event.preventDefault()
  storeKey(ui.keyInput.value.trim())
  ui.keyInput.value = ''
  ui.keyForm.hidden = true
  ui.empty.textContent = EMPTY_TEXT
  say('')
  start().catch(fail)
}

// --- location hash: #agent=<id>&conversation=<id> survives a reload ---------------------------
function readHash() {
  const params = new URLSearchParams(location.hash.slice(1))
  return { agent: params.get('agent'), conversation: params.get('conversation') }
}

function writeHash() {
  const params = new URLSearchParams()
  if (state.agentId) params.set('agent', state.agentId)
  if (state.conversationId) params.set('conversation', state.conversationId)
  history.replaceState(null, '', `#${params}`)
}

// --- what can be pressed now ------------------------------------------------------------------
function refreshControls() {
  const idle = !state.busy
  const blocked = state.modelBlocked ?? (state.connection === 'open' ? null : connectionWords())
  ui.stopButton.disabled = !state.busy
  ui.send.disabled = state.busy || !state.agentId || blocked !== null
  ui.send.title = blocked ?? ''
  ui.agentSelect.disabled = state.busy || state.agents.length === 0
  ui.newConversation.disabled = state.busy || !state.agentId
  ui.newRoom.disabled = state.busy || state.agents.length < 2
  ui.search.disabled = !state.agentId
  for (const b of ui.transcript.querySelectorAll('button.turn-action')) {
    /** @type {HTMLButtonElement} */ (b).disabled = !idle || blocked !== null
  }
  for (const b of ui.conversationList.querySelectorAll('button')) /** @type {HTMLButtonElement} */ (b).disabled = !idle
  if (!state.busy && blocked !== null && state.agentId) say(blocked, state.modelBlocked ? '' : 'error')
  else if (!state.busy && ui.status.dataset.reason === 'blocked') say('')
  ui.status.dataset.reason = !state.busy && blocked !== null ? 'blocked' : ''
}

/** @param {boolean} busy */
function setBusy(busy) {
  state.busy = busy
  refreshControls()
}

// --- the connection: connecting → open → (reconnecting → open)* ; closed when there is none -----
function connectionWords() {
  switch (state.connection) {
    case 'connecting':
      return 'Connecting to the server…'
    case 'reconnecting':
      return `The connection to the server is lost. Reconnecting (attempt ${state.reconnectAttempt})…`
    case 'closed':
      return 'Not connected.'
    default:
      return ''
  }
}

/** @param {ConnectionState} next */
function setConnection(next) {
  state.connection = next
  ui.connection.dataset.state = next
  ui.connection.textContent = {
    connecting: 'connecting…',
    open: 'connected',
    reconnecting: `reconnecting (attempt ${state.reconnectAttempt})…`,
    closed: 'not connected',
  }[next]
  ui.connection.title = next === 'open' ? `chat socket ${WS_URL}` : connectionWords()
  refreshControls()
}

/** Close the socket on purpose (another agent or conversation, a missing key). @param {ConnectionState} next */
function disconnect(next = 'closed') {
  state.generation += 1
  if (state.reconnectTimer !== null) clearTimeout(state.reconnectTimer)
  state.reconnectTimer = null
  const stream = state.stream
  state.stream = null
  stream?.stop()
  setConnection(next)
}

/** Open the socket for the current agent and conversation; on failure, retry with backoff. */
async function connect() {
  if (!state.agentId) return
  const generation = ++state.generation
  if (state.connection !== 'reconnecting') setConnection('connecting')
  try {
    const stream = await streamChat({
      backendUrl: WS_URL,
      agentId: state.agentId,
      conversationId: state.conversationId ?? undefined,
      apiKey: state.apiKey ?? undefined,
      onEvent,
    })
    if (generation !== state.generation) {
      stream.stop() // the page moved on while this one opened
      return
    }
    state.stream = stream
    const wasReconnecting = state.connection === 'reconnecting'
    state.reconnectAttempt = 0
    setConnection('open')
    watch(stream, generation)
    if (wasReconnecting) {
      say('Reconnected.')
      showHealth()
      if (state.conversationId && !state.busy) await showConversation(state.conversationId)
    }
  } catch (err) {
    if (generation !== state.generation) return
    // Browsers do not say why a socket was refused: ask the REST side whether the key went stale.
    try {
      await listAgents(conn())
    } catch (rest) {
      if (isUnauthorized(rest)) {
        askForKey()
        return
      }
    }
    scheduleReconnect(err)
  }
}

/** Notice a socket that dies under us (server restart, network): reconnect. @param {ChatStream} stream @param {number} generation */
async function watch(stream, generation) {
  for await (const _ of stream.events()) {
    // events() ends when the stream does
  }
  if (generation !== state.generation || state.stream !== stream) return // closed on purpose
  state.stream = null
  scheduleReconnect(new ChatError('socket_closed', 'the chat socket closed'))
}

/** @param {unknown} err */
function scheduleReconnect(err) {
  const delay = BACKOFF_MS[Math.min(state.reconnectAttempt, BACKOFF_MS.length - 1)]
  state.reconnectAttempt += 1
  showHealth() // the header's model status: a server on its way down may still have answered "ok"
  setConnection('reconnecting')
  ui.connection.title = `${describeError(err)} Next attempt in ${Math.round((delay ?? 0) / 100) / 10} s.`
  const generation = state.generation
  state.reconnectTimer = setTimeout(() => {
    state.reconnectTimer = null
    if (generation === state.generation) connect().catch(fail)
  }, delay)
}

// --- transcript -----------------------------------------------------------------------------
/** @param {'user' | 'assistant'} role @param {string} text @param {string} meta
 * @param {string | null} speaker in a room: the agent whose answer this is
 * @returns {Bubble} */
function addMessage(role, text, meta = '', speaker = null) {
  const body = el('div', { className: 'text' })
  const info = el('div', { className: 'meta' })
  info.append(el('span', { className: 'usage' }, meta))
  const label = role === 'user' ? 'You' : speaker ? agentName(speaker) : 'Assistant'
  const item = el('li', { className: `message ${role}` }, el('div', { className: 'role' }, label), body, info)
  if (role === 'assistant' && speaker) {
    item.classList.add(speakerClass(speaker))
    item.dataset.agent = speaker
  }
  /** @type {Bubble} */
  const bubble = { item, body, info, raw: text }
  if (role === 'assistant') renderMarkdown(body, text)
  else body.textContent = text
  ui.transcript.append(item)
  scrollDown(true)
  return bubble
}

/** @param {Bubble} bubble @param {string} text */
function setMeta(bubble, text) {
  const usage = bubble.info.querySelector('.usage')
  if (usage) usage.textContent = text
}

function scrollDown(force = false) {
  const t = ui.transcript
  if (force || t.scrollHeight - t.scrollTop - t.clientHeight < 80) t.scrollTop = t.scrollHeight
}

/** The stored turns, with the actions that act on them. @param {Turn[]} turns */
function renderTurns(turns) {
  ui.transcript.replaceChildren()
  const shown = turns.filter((t) => t.role === 'user' || t.role === 'assistant')
  const lastUser = shown.findLast((t) => t.role === 'user')
  /** Tool results by the call they answer: shown in that call's block. */
  const results = new Map(turns.filter((t) => t.role === 'tool').map((t) => [t.toolCallId, t.content]))
  for (const turn of shown) {
    const role = /** @type {'user' | 'assistant'} */ (turn.role)
    const meta = role === 'assistant' && turn.finishReason ? formatUsage(turn.finishReason, turn.usage) : ''
    const bubble = addMessage(role, turn.content, meta, isRoom() ? turn.agentId : null)
    bubble.item.dataset.seq = String(turn.seq)
    if (turn.finishReason) bubble.item.dataset.finishReason = turn.finishReason
    if (turn.finishReason === 'error') bubble.item.classList.add('failed')
    for (const call of turn.toolCalls ?? []) bubble.item.insertBefore(toolCallBlock(call, results.get(call.id)), bubble.info)
    if (role === 'assistant') {
      bubble.info.append(copyButton('Copy', 'Copy this answer as Markdown', () => turn.content))
    } else {
      bubble.info.append(actionButton('Edit', 'Edit this message and send it again', 'edit', () => editTurn(bubble, turn)))
    }
  }
  // Regenerate: the last answer, when the conversation ends with one.
  const last = shown.at(-1)
  if (last?.role === 'assistant' && lastUser) {
    const item = ui.transcript.lastElementChild
    item?.querySelector('.meta')?.append(actionButton('Regenerate', 'Answer the last message again', 'regenerate',
      () => resend(lastUser.seq, lastUser.content)))
  }
  refreshControls()
}

/**
 * A call the answer made and its result, compact: `name({arguments})`, then `→ result` (text
 * only, never markup).
 * @param {import('./vendor/streaming-llm-client.js').ToolCall} call @param {string | undefined} result
 */
function toolCallBlock(call, result) {
  const block = el('div', { className: 'tool-call', title: `Tool call ${call.id}` },
    el('code', { className: 'tool-head' }, `${call.name}(${call.arguments})`),
    el('div', { className: 'tool-result' }, result === undefined ? 'no result yet' : `→ ${result}`))
  block.dataset.toolCallId = call.id
  if (result === undefined) block.classList.add('pending')
  return block
}

/** @param {string} label @param {string} title @param {string} action @param {() => void} run */
function actionButton(label, title, action, run) {
  const b = el('button', { type: 'button', className: 'turn-action', textContent: label, title })
  b.dataset.action = action
  b.addEventListener('click', () => {
    if (!state.busy) run()
  })
  return b
}

/** Edit a user turn in place; "Send" truncates the conversation there and sends the new text.
 * @param {Bubble} bubble @param {Turn} turn */
function editTurn(bubble, turn) {
  const editor = el('textarea', { className: 'edit', value: turn.content, rows: 3 })
  editor.setAttribute('aria-label', 'Edited message')
  const sendEdit = el('button', { type: 'button', className: 'primary', textContent: 'Send edited' })
  const cancel = el('button', { type: 'button', textContent: 'Cancel' })
  const form = el('div', { className: 'editing' }, editor, el('div', { className: 'row end' }, cancel, sendEdit))
  bubble.body.replaceWith(form)
  editor.focus()
  const restore = () => form.replaceWith(bubble.body)
  cancel.addEventListener('click', restore)
  editor.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') restore()
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault()
      sendEdit.click()
    }
  })
  sendEdit.addEventListener('click', () => {
    const text = editor.value
    if (!text.trim()) return
    resend(turn.seq, text)
  })
}

/** Edit-and-resend and regenerate: delete the turns from user turn `seq` on, then send `message`
 * in the same conversation. @param {number} seq @param {string} message */
async function resend(seq, message) {
  // Only when the message can go out right away: never cut a conversation that cannot continue.
  if (!state.conversationId || state.busy || !state.stream || state.modelBlocked) return
  setBusy(true)
  try {
    await truncateConversation(state.conversationId, seq, conn())
  } catch (err) {
    setBusy(false)
    fail(err)
    return
  }
  await showConversation(state.conversationId)
  setBusy(false)
  await send(message)
}

// --- agents ---------------------------------------------------------------------------------
/** @param {string | null} preferred @param {string | null} conversationId */
async function loadAgents(preferred, conversationId = null) {
  state.agents = await listAgents(conn())
  ui.agentSelect.replaceChildren(...state.agents.map((a) => el('option', { value: a.id, textContent: `${a.name} (${a.id})` })))
  const hasAgents = state.agents.length > 0
  ui.empty.hidden = hasAgents
  ui.message.disabled = !hasAgents
  ui.editAgent.disabled = ui.deleteAgent.disabled = !hasAgents
  const pick = state.agents.find((a) => a.id === preferred) ?? state.agents[0]
  await selectAgent(pick?.id ?? null, pick && pick.id === preferred ? conversationId : null)
}

/** Switch agent: its options, and its latest conversation (or the one asked for).
 * @param {string | null} agentId @param {string | null} conversationId */
async function selectAgent(agentId, conversationId = null) {
  disconnect(agentId ? 'connecting' : 'closed')
  state.agentId = agentId
  state.conversationId = null // until this agent's conversations are known
  writeHash() // a reload from here on comes back to this agent
  ui.agentSelect.value = agentId ?? ''
  ui.search.value = ''
  loadOptions()
  setBusy(false)
  ui.transcript.replaceChildren()
  if (!agentId) {
    state.conversationId = null
    ui.conversationList.replaceChildren()
    writeHash()
    return
  }
  const conversations = await loadConversations()
  const known = conversationId && conversations.some((c) => c.id === conversationId)
  await openConversation(known ? conversationId : (conversations[0]?.id ?? null))
}

/** @param {Agent | null} agent */
function openAgentDialog(agent) {
  ui.dialogTitle.textContent = agent ? `Edit ${agent.name}` : 'New agent'
  ui.agentId.value = agent?.id ?? ''
  ui.agentId.readOnly = Boolean(agent)
  ui.agentName.value = agent?.name ?? ''
  ui.agentSystemPrompt.value = agent?.systemPrompt ?? ''
  ui.agentMarkdownContext.value = agent?.markdownContext ?? ''
  ui.agentError.textContent = ''
  ui.dialog.showModal()
  ;(agent ? ui.agentName : ui.agentId).focus()
}

/** @param {SubmitEvent} event */
async function saveAgent(event) {
  event.preventDefault()
  ui.agentError.textContent = ''
  try {
    const saved = await updateAgent({
      id: ui.agentId.value.trim(),
      name: ui.agentName.value.trim(),
      systemPrompt: ui.agentSystemPrompt.value,
      markdownContext: ui.agentMarkdownContext.value,
    }, conn())
    ui.dialog.close()
    say(`Saved agent ${saved.name}.`)
    await loadAgents(saved.id, saved.id === state.agentId ? state.conversationId : null)
  } catch (err) {
    ui.agentError.textContent = describeError(err)
    if (isUnauthorized(err)) askForKey()
  }
}

async function removeAgent() {
  const agent = state.agents.find((a) => a.id === state.agentId)
  if (!agent || !confirm(`Delete agent “${agent.name}”? Its conversations stay stored (GET /conversations?agent_id=${agent.id}) and come back if an agent with this id is created again.`)) return
  try {
    await deleteAgent(agent.id, conn())
    say(`Deleted agent ${agent.name}.`)
    await loadAgents(null)
  } catch (err) {
    fail(err)
  }
}

// --- options, remembered per agent (localStorage) --------------------------------------------
/** @returns {Record<string, string>} */
function readOptionFields() {
  /** @type {Record<string, string>} */
  const fields = {}
  for (const [name, field] of Object.entries(ui.options)) if (field.value !== '') fields[name] = field.value
  if (ui.stop.value.trim() !== '') fields.stop = ui.stop.value
  return fields
}

function saveOptions() {
  if (!state.agentId) return
  try {
    localStorage.setItem(OPTIONS_STORAGE + state.agentId, JSON.stringify(readOptionFields()))
  } catch {
    // storage disabled: the options last until the page is left
  }
}

function loadOptions() {
  /** @type {Record<string, unknown>} */
  let saved = {}
  try {
    const raw = state.agentId ? localStorage.getItem(OPTIONS_STORAGE + state.agentId) : null
    const parsed = raw ? JSON.parse(raw) : {}
    if (parsed && typeof parsed === 'object') saved = parsed
  } catch {
    // unreadable: defaults
  }
  for (const [name, field] of Object.entries(ui.options)) field.value = typeof saved[name] === 'string' ? saved[name] : ''
  ui.stop.value = typeof saved.stop === 'string' ? saved.stop : ''
}

/** @returns {ChatOptions} */
function chatOptions() {
  /** @type {ChatOptions} */
  const options = {}
  for (const [name, value] of Object.entries(readOptionFields())) {
    if (name === 'stop') {
      const stops = value.split('\n').filter((s) => s !== '')
      if (stops.length > 0) options.stop = stops
    } else {
      /** @type {Record<string, number>} */ (options)[name] = Number(value)
    }
  }
  return options
}

// --- conversations --------------------------------------------------------------------------
async function loadConversations() {
  const q = ui.search.value.trim()
  const conversations = await listConversations({ agentId: state.agentId ?? undefined, q: q || undefined }, conn())
  ui.conversationList.replaceChildren(...conversations.map(conversationItem))
  if (conversations.length === 0 && q) ui.conversationList.append(el('li', { className: 'none' }, `Nothing matches “${q}”.`))
  markCurrentConversation()
  refreshControls()
  return conversations
}

/** @param {Conversation} c */
function conversationItem(c) {
  const when = new Date(c.updatedAt).toLocaleString()
  const open = el('button', { type: 'button', className: 'conversation' },
    el('span', { className: 'title' }, c.title || 'Untitled'), el('small', {}, when))
  if (c.agentIds.length > 1) {
    open.append(el('small', { className: 'participants' }, `Room: ${c.agentIds.map(agentName).join(', ')}`))
  }
  open.dataset.id = c.id
  open.addEventListener('click', () => {
    if (!state.busy) openConversation(c.id).catch(fail)
  })
  const rename = el('button', { type: 'button', className: 'rename', textContent: '✎', title: `Rename “${c.title}”` })
  rename.setAttribute('aria-label', `Rename conversation ${c.title}`)
  rename.addEventListener('click', async () => {
    const title = prompt('New title for this conversation', c.title)?.trim()
    if (!title || title === c.title) return
    try {
      await renameConversation(c.id, title, conn())
      say(`Renamed to “${title}”.`)
      await loadConversations()
    } catch (err) {
      fail(err)
    }
  })
  const remove = el('button', { type: 'button', className: 'remove danger', textContent: '✕', title: `Delete “${c.title}”` })
  remove.setAttribute('aria-label', `Delete conversation ${c.title}`)
  remove.addEventListener('click', async () => {
    if (!confirm(`Delete the conversation “${c.title}” and all its messages?`)) return
    try {
      await deleteConversation(c.id, conn())
      say(`Deleted “${c.title}”.`)
      const wasOpen = c.id === state.conversationId
      const rest = await loadConversations()
      if (wasOpen) await openConversation(rest[0]?.id ?? null)
    } catch (err) {
      fail(err)
    }
  })
  const item = el('li', {}, open, rename, remove)
  item.dataset.id = c.id
  return item
}

function markCurrentConversation() {
  for (const b of ui.conversationList.querySelectorAll('button.conversation')) {
    if (/** @type {HTMLElement} */ (b).dataset.id === state.conversationId) b.setAttribute('aria-current', 'true')
    else b.removeAttribute('aria-current')
  }
}

/** @param {string | null} conversationId */
async function openConversation(conversationId) {
  disconnect('connecting')
  state.conversationId = conversationId
  writeHash()
  markCurrentConversation()
  if (conversationId) await showConversation(conversationId)
  else {
    ui.transcript.replaceChildren()
    showRoom([])
  }
  await connect()
}

/** @param {string} conversationId */
async function showConversation(conversationId) {
  const conversation = await getConversation(conversationId, conn())
  if (conversationId !== state.conversationId) return
  showRoom(conversation.agentIds)
  renderTurns(conversation.turns)
}

// --- rooms: several agents in one conversation -------------------------------------------------
function isRoom() {
  return state.room.length > 1
}

/** @param {string} agentId */
function agentName(agentId) {
  return state.agents.find((a) => a.id === agentId)?.name ?? agentId
}

/** One of eight colours per agent id (style.css `.speaker-N`), the same on every page load.
 * @param {string} agentId */
function speakerClass(agentId) {
  let hash = 0
  for (const ch of agentId) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0
  return `speaker-${hash % 8}`
}

/** The "To" boxes of a room: who answers the next message (several: in turn, each seeing the
 * answers before its own; none: the message's @mentions decide). @param {string[]} agentIds */
function showRoom(agentIds) {
  const before = new Set(addressed())
  state.room = agentIds
  ui.roomTo.hidden = !isRoom()
  if (!isRoom()) {
    ui.roomAgentsTo.replaceChildren()
    return
  }
  const keep = agentIds.some((a) => before.has(a))
  ui.roomAgentsTo.replaceChildren(...agentIds.map((agentId, i) => {
    const box = el('input', { type: 'checkbox', value: agentId })
    box.checked = keep ? before.has(agentId) : agentId === state.agentId || (!agentIds.includes(state.agentId ?? '') && i === 0)
    const label = el('label', { className: speakerClass(agentId) }, box, agentName(agentId))
    label.title = `@${agentId}`
    return label
  }))
}

/** The room's agents ticked in "To", in the room's order. */
function addressed() {
  return [...ui.roomAgentsTo.querySelectorAll('input[type="checkbox"]')]
    .map((b) => /** @type {HTMLInputElement} */ (b))
    .filter((b) => b.checked)
    .map((b) => b.value)
}

function openRoomDialog() {
  ui.roomError.textContent = ''
  ui.roomTitle.value = ''
  ui.roomAgents.replaceChildren(...state.agents.map((a) => {
    const box = el('input', { type: 'checkbox', value: a.id })
    box.checked = a.id === state.agentId
    return el('label', {}, box, `${a.name} (${a.id})`)
  }))
  ui.roomDialog.showModal()
}

/** @param {SubmitEvent} event */
async function saveRoom(event) {
  event.preventDefault()
  const agentIds = [...ui.roomAgents.querySelectorAll('input[type="checkbox"]')]
    .map((b) => /** @type {HTMLInputElement} */ (b))
    .filter((b) => b.checked)
    .map((b) => b.value)
  if (agentIds.length < 2) {
    ui.roomError.textContent = 'Pick at least two agents.'
    return
  }
  try {
    const room = await createRoom(agentIds, { title: ui.roomTitle.value.trim() }, conn())
    ui.roomDialog.close()
    say(`Room with ${agentIds.map(agentName).join(', ')}: address one or several with "To" or @mentions.`)
    // The list shows the selected agent's conversations: be one of the room's agents.
    if (!state.agentId || !agentIds.includes(state.agentId)) await selectAgent(agentIds[0] ?? null, room.id)
    else {
      await loadConversations()
      await openConversation(room.id)
    }
  } catch (err) {
    ui.roomError.textContent = describeError(err)
  }
}

// --- chat -----------------------------------------------------------------------------------
/** @type {Map<string, Bubble>} request id -> the assistant message being streamed */
const bubbles = new Map()

/** @param {import('./vendor/streaming-llm-client.js').ChatEvent} event */
function onEvent(event) {
  if (event.requestId === null) return
  if (event.type === 'start' && state.pending) {
    bubbles.set(event.requestId, state.pending)
    // A room: the answers come one agent after another; label each bubble with its agent.
    if (isRoom() && event.agentIds.length > 0) {
      speakers.set(event.requestId, event.agentIds.slice(1))
      label(state.pending, event.agentIds[0] ?? '')
    }
  }
  const target = bubbles.get(event.requestId)
  if (!target) return
  if (event.type === 'token') {
    target.raw += event.token
    frames.mark(target)
  } else if (event.type === 'done' && (speakers.get(event.requestId)?.length ?? 0) > 0
             && (event.finishReason === 'stop' || event.finishReason === 'length')) {
    const [next, ...rest] = speakers.get(event.requestId) ?? []
    speakers.set(event.requestId, rest)
    setMeta(target, formatUsage(event.finishReason, event.usage))
    target.item.classList.remove('streaming')
    target.item.removeAttribute('aria-busy')
    const bubble = addMessage('assistant', '', '', next ?? null)
    bubble.item.classList.add('streaming')
    bubble.item.setAttribute('aria-busy', 'true')
    bubbles.set(event.requestId, bubble)
    if (state.pending === target) state.pending = bubble
  } else if (event.type === 'done' || event.type === 'error') {
    bubbles.delete(event.requestId)
    speakers.delete(event.requestId)
  }
}

/** @type {Map<string, string[]>} request id -> the round's agents still to answer */
const speakers = new Map()

/** @param {Bubble} bubble @param {string} agentId */
function label(bubble, agentId) {
  if (!agentId) return
  const role = bubble.item.querySelector('.role')
  if (role) role.textContent = agentName(agentId)
  bubble.item.classList.add(speakerClass(agentId))
  bubble.item.dataset.agent = agentId
}

/** @param {string} message */
async function send(message) {
  if (!message.trim() || state.busy || !state.agentId || !state.stream || state.modelBlocked) return
  const stream = state.stream
  setBusy(true)
  ui.message.value = ''
  addMessage('user', message)
  const bubble = addMessage('assistant', '')
  bubble.item.classList.add('streaming')
  bubble.item.setAttribute('aria-busy', 'true')
  state.pending = bubble
  say('Generating… (Esc or Stop to stop)')
  let conversationId = state.conversationId
  try {
    const to = isRoom() ? addressed() : [state.agentId]
    const result = to.length > 1
      ? (await stream.sendRound({ message, agentIds: to, options: chatOptions() })).at(-1)
      : await stream.sendMessage({ message, agentId: to[0] ?? '', options: chatOptions() })
    conversationId = result?.conversationId ?? conversationId
    say(result?.finishReason === 'cancelled' ? 'Stopped.' : '')
  } catch (err) {
    bubble.item.classList.add('failed')
    bubble.item.dataset.finishReason = 'error'
    setMeta(bubble, describeError(err))
    say(describeError(err), 'error')
  } finally {
    state.pending = null
    bubble.item.classList.remove('streaming')
    bubble.item.removeAttribute('aria-busy')
  }
  // What is stored is the truth: show it (with its seq numbers, for edit and regenerate).
  try {
    if (conversationId && conversationId !== state.conversationId) {
      state.conversationId = conversationId
      writeHash()
    }
    if (conversationId && !bubble.item.classList.contains('failed')) await showConversation(conversationId)
    await loadConversations()
  } catch (err) {
    fail(err)
  } finally {
    setBusy(false)
    ui.message.focus()
  }
}

// --- health: which model, and whether it can answer ------------------------------------------
/** @type {ReturnType<typeof setTimeout> | undefined} */
let healthTimer

/** Ask /health again in `ms` (one pending check at most). @param {number} ms */
function pollHealth(ms) {
  clearTimeout(healthTimer)
  healthTimer = setTimeout(showHealth, ms)
}

async function showHealth() {
  clearTimeout(healthTimer)
  try {
    const health = await getHealth(BASE)
    const names = health.model && health.model !== health.engine ? `${health.engine} · ${health.model}` : health.engine
    ui.health.textContent = `${names} · ${health.status}`
    ui.health.title = health.detail ?? ''
    ui.health.dataset.ready = String(health.ready)
    state.modelBlocked = health.ready
      ? null
      : health.status === 'loading'
        ? `The model is loading${health.detail ? ` (${health.detail})` : ''}. Send is enabled once it is ready.`
        : `The model is not available: ${health.detail ?? health.status}. Check the server's log.`
    if (!health.ready && health.status === 'loading') pollHealth(2000)
  } catch (err) {
    ui.health.textContent = 'server unreachable'
    ui.health.dataset.ready = 'false'
    ui.health.title = describeError(err)
    state.modelBlocked = null // the connection state says it
    pollHealth(5000)
  }
  refreshControls()
}

// --- wiring ---------------------------------------------------------------------------------
/** @param {unknown} err */
function fail(err) {
  if (isUnauthorized(err)) askForKey() // the key prompt says it
  else say(describeError(err), 'error')
}

/** @type {ReturnType<typeof setTimeout> | undefined} */
let searchTimer
ui.search.addEventListener('input', () => {
  clearTimeout(searchTimer)
  searchTimer = setTimeout(() => loadConversations().catch(fail), 200)
})
ui.keyForm.addEventListener('submit', useKey)
ui.agentSelect.addEventListener('change', () => selectAgent(ui.agentSelect.value).catch(fail))
ui.newAgent.addEventListener('click', () => openAgentDialog(null))
ui.editAgent.addEventListener('click', async () => {
  try {
    if (state.agentId) openAgentDialog(await getAgent(state.agentId, conn()))
  } catch (err) {
    fail(err)
  }
})
ui.deleteAgent.addEventListener('click', () => removeAgent())
ui.agentForm.addEventListener('submit', (event) => saveAgent(event))
ui.agentCancel.addEventListener('click', () => ui.dialog.close())
ui.newConversation.addEventListener('click', () => openConversation(null).catch(fail))
ui.newRoom.addEventListener('click', () => openRoomDialog())
ui.roomForm.addEventListener('submit', (event) => saveRoom(event))
ui.roomCancel.addEventListener('click', () => ui.roomDialog.close())
ui.composer.addEventListener('submit', (event) => {
  event.preventDefault()
  send(ui.message.value)
})
ui.message.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault()
    send(ui.message.value)
  }
})
document.addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && state.busy && !ui.dialog.open) state.stream?.cancel()
})
ui.stopButton.addEventListener('click', () => state.stream?.cancel())
for (const field of [...Object.values(ui.options), ui.stop]) field.addEventListener('change', saveOptions)
ui.resetOptions.addEventListener('click', () => {
  for (const field of Object.values(ui.options)) field.value = ''
  ui.stop.value = ''
  saveOptions()
})

async function start() {
  const wanted = readHash()
  await loadAgents(wanted.agent, wanted.conversation)
  document.body.dataset.ready = 'true'
}

setConnection('connecting')
showHealth()
start().catch(fail)
