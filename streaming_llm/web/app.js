// The reference chat page. Everything it says to the server goes through the streaming-llm-client
// package (the built module in vendor/), so the page and TypeScript callers share one protocol.
import {
  ApiError,
  ChatError,
  deleteAgent,
  getAgent,
  getConversation,
  getHealth,
  listAgents,
  listConversations,
  streamChat,
  updateAgent,
} from './vendor/streaming-llm-client.js'

// The page is served by the backend itself: REST and socket live next to it (any path prefix kept).
const BASE = new URL('..', import.meta.url).href.replace(/\/+$/, '')
const WS_URL = `${BASE.replace(/^http/, 'ws')}/ws/chat`

// With API keys configured the server answers 401 until the page has one: it asks in the header
// and keeps the key for this tab only (sessionStorage), for REST and the socket alike.
const KEY_STORAGE = 'streaming-llm.apiKey'

const $ = (id) => document.getElementById(id)
const ui = {
  health: $('health'),
  keyForm: $('key-form'),
  keyInput: $('api-key'),
  keyError: $('key-error'),
  agentSelect: $('agent-select'),
  newAgent: $('new-agent'),
  editAgent: $('edit-agent'),
  deleteAgent: $('delete-agent'),
  newConversation: $('new-conversation'),
  conversationList: $('conversation-list'),
  empty: $('empty'),
  transcript: $('transcript'),
  composer: $('composer'),
  message: $('message'),
  temperature: $('opt-temperature'),
  maxNewTokens: $('opt-max-new-tokens'),
  status: $('status'),
  stop: $('stop'),
  send: $('send'),
  dialog: $('agent-dialog'),
  dialogTitle: $('agent-dialog-title'),
  agentForm: $('agent-form'),
  agentId: $('agent-id'),
  agentName: $('agent-name'),
  agentSystemPrompt: $('agent-system-prompt'),
  agentMarkdownContext: $('agent-markdown-context'),
  agentError: $('agent-error'),
  agentCancel: $('agent-cancel'),
}

const state = {
  apiKey: storedKey(),
  agents: [],
  agentId: null,
  conversationId: null, // null: the next message starts a new conversation
  chat: null, // { stream }: the open socket of this agent and conversation
  busy: false,
  pending: null, // the assistant message waiting for its turn's tokens
}

// --- API key ------------------------------------------------------------------------------------
function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE)
  } catch {
    return null // storage disabled: the key lasts until the page is left
  }
}

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

function isUnauthorized(err) {
  return err instanceof ApiError && err.status === 401
}

/** The server refused a request for want of a (valid) key: forget the key and ask for one. */
function askForKey() {
  const refused = Boolean(state.apiKey)
  storeKey(null)
  closeChat()
  delete document.body.dataset.ready
  ui.keyError.textContent = refused ? 'That key was refused.' : ''
  ui.keyForm.hidden = false
  ui.empty.textContent = 'This server needs an API key: enter it above.'
  ui.empty.hidden = false
  ui.keyInput.focus()
}

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

// --- small helpers ------------------------------------------------------------------------------
const EMPTY_TEXT = ui.empty.textContent

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props)
  node.append(...children)
  return node
}

function say(text, kind = '') {
  ui.status.textContent = text
  ui.status.className = `status ${kind}`
}

function describeError(err) {
  if (err instanceof ApiError || err instanceof ChatError) return `${err.message} (${err.code})`
  return err instanceof Error ? err.message : String(err)
}

function formatUsage(finishReason, usage) {
  const parts = [finishReason]
  const tokens = usage?.completionTokens ?? usage?.completion_tokens
  if (tokens !== undefined) parts.push(`${tokens} tokens`)
  const speed = usage?.decodeTokensPerS ?? usage?.decode_tokens_per_s
  if (speed) parts.push(`${speed} tok/s`)
  return parts.join(' · ')
}

function setBusy(busy) {
  state.busy = busy
  ui.stop.disabled = !busy
  ui.send.disabled = busy || !state.agentId
  ui.agentSelect.disabled = busy || state.agents.length === 0
  ui.newConversation.disabled = busy || !state.agentId
}

// --- transcript -----------------------------------------------------------------------------
function addMessage(role, text, meta = '') {
  const body = el('div', { className: 'text' }, text)
  const info = el('div', { className: 'meta' }, meta)
  const item = el('li', { className: `message ${role}` }, el('div', { className: 'role' }, role === 'user' ? 'You' : 'Assistant'), body, info)
  ui.transcript.append(item)
  scrollDown(true)
  return { item, body, info }
}

function scrollDown(force = false) {
  const t = ui.transcript
  if (force || t.scrollHeight - t.scrollTop - t.clientHeight < 80) t.scrollTop = t.scrollHeight
}

function renderTurns(turns) {
  ui.transcript.replaceChildren()
  for (const turn of turns) {
    if (turn.role !== 'user' && turn.role !== 'assistant') continue
    const meta = turn.role === 'assistant' && turn.finish_reason ? formatUsage(turn.finish_reason, turn.usage) : ''
    const { item } = addMessage(turn.role, turn.content, meta)
    if (turn.finish_reason) item.dataset.finishReason = turn.finish_reason
  }
}

// --- agents ---------------------------------------------------------------------------------
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

async function selectAgent(agentId, conversationId = null) {
  closeChat()
  state.agentId = agentId
  ui.agentSelect.value = agentId ?? ''
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
  await openConversation(known ? conversationId : null)
}

function openAgentDialog(agent) {
  ui.dialogTitle.textContent = agent ? `Edit ${agent.name}` : 'New agent'
  ui.agentId.value = agent?.id ?? ''
  ui.agentId.readOnly = Boolean(agent)
  ui.agentName.value = agent?.name ?? ''
  ui.agentSystemPrompt.value = agent?.system_prompt ?? ''
  ui.agentMarkdownContext.value = agent?.markdown_context ?? ''
  ui.agentError.textContent = ''
  ui.dialog.showModal()
  ;(agent ? ui.agentName : ui.agentId).focus()
}

async function saveAgent(event) {
  event.preventDefault()
  ui.agentError.textContent = ''
  try {
    const saved = await updateAgent({
      id: ui.agentId.value.trim(),
      name: ui.agentName.value.trim(),
      system_prompt: ui.agentSystemPrompt.value,
      markdown_context: ui.agentMarkdownContext.value,
    }, conn())
    ui.dialog.close()
    say(`Saved agent ${saved.name}.`)
    await loadAgents(saved.id)
  } catch (err) {
    ui.agentError.textContent = describeError(err)
    if (isUnauthorized(err)) askForKey()
  }
}

async function removeAgent() {
  const agent = state.agents.find((a) => a.id === state.agentId)
  if (!agent || !confirm(`Delete agent “${agent.name}”? Its conversations stay in the database.`)) return
  try {
    await deleteAgent(agent.id, conn())
    say(`Deleted agent ${agent.name}.`)
    await loadAgents(null)
  } catch (err) {
    fail(err)
  }
}

// --- conversations --------------------------------------------------------------------------
async function loadConversations() {
  const conversations = await listConversations(state.agentId, conn())
  ui.conversationList.replaceChildren(
    ...conversations.map((c) => {
      const when = new Date(c.updated_at).toLocaleString()
      const button = el('button', { type: 'button', className: 'conversation' },
        el('span', { className: 'title' }, c.title || 'Untitled'), el('small', {}, when))
      button.dataset.id = c.id
      button.addEventListener('click', () => {
        if (!state.busy) openConversation(c.id).catch(fail)
      })
      return el('li', {}, button)
    }),
  )
  markCurrentConversation()
  return conversations
}

function markCurrentConversation() {
  for (const button of ui.conversationList.querySelectorAll('button')) {
    if (button.dataset.id === state.conversationId) button.setAttribute('aria-current', 'true')
    else button.removeAttribute('aria-current')
  }
}

async function openConversation(conversationId) {
  closeChat()
  state.conversationId = conversationId
  writeHash()
  markCurrentConversation()
  if (!conversationId) {
    ui.transcript.replaceChildren()
    return
  }
  const conversation = await getConversation(conversationId, conn())
  renderTurns(conversation.turns)
}

// --- chat -----------------------------------------------------------------------------------
function closeChat() {
  state.chat?.stream.stop()
  state.chat = null
}

function chatOptions() {
  const options = {}
  if (ui.temperature.value !== '') options.temperature = Number(ui.temperature.value)
  if (ui.maxNewTokens.value !== '') options.maxNewTokens = Number(ui.maxNewTokens.value)
  return options
}

/** The open stream for this agent and conversation, opened on first use. */
async function chat() {
  if (state.chat) return state.chat.stream
  const bubbles = new Map() // request id -> the assistant message being streamed
  const stream = await streamChat({
    backendUrl: WS_URL,
    agentId: state.agentId,
    conversationId: state.conversationId ?? undefined,
    apiKey: state.apiKey ?? undefined,
    onEvent: (event) => {
      const bubble = state.pending
      if (event.type === 'start' && bubble) bubbles.set(event.requestId, bubble)
      const target = bubbles.get(event.requestId)
      if (event.type === 'token' && target) {
        target.body.append(event.token)
        scrollDown()
      }
    },
  })
  state.chat = { stream }
  return stream
}

async function send(event) {
  event?.preventDefault()
  const message = ui.message.value
  if (!message.trim() || state.busy || !state.agentId) return
  setBusy(true)
  ui.message.value = ''
  addMessage('user', message)
  const bubble = addMessage('assistant', '')
  bubble.item.classList.add('streaming')
  bubble.item.setAttribute('aria-busy', 'true')
  state.pending = bubble
  say('Generating…')
  try {
    const stream = await chat()
    const result = await stream.sendMessage({ message, options: chatOptions() })
    bubble.body.textContent = result.text
    bubble.info.textContent = formatUsage(result.finishReason, result.usage)
    bubble.item.dataset.finishReason = result.finishReason
    say(result.finishReason === 'cancelled' ? 'Stopped.' : '')
    if (state.conversationId !== result.conversationId) {
      state.conversationId = result.conversationId
      writeHash()
    }
    await loadConversations()
  } catch (err) {
    bubble.info.textContent = describeError(err)
    bubble.item.dataset.finishReason = 'error'
    bubble.item.classList.add('failed')
    say(describeError(err), 'error')
    if (err instanceof ChatError && ['socket_closed', 'socket_open_failed'].includes(err.code)) state.chat = null
    // Browsers do not say why a socket was refused: ask the REST side whether the key went stale.
    if (err instanceof ChatError && err.code === 'socket_open_failed') listAgents(conn()).catch(fail)
  } finally {
    state.pending = null
    bubble.item.classList.remove('streaming')
    bubble.item.removeAttribute('aria-busy')
    setBusy(false)
    ui.message.focus()
  }
}

// --- wiring ---------------------------------------------------------------------------------
function fail(err) {
  if (isUnauthorized(err)) askForKey() // the key prompt says it
  else say(describeError(err), 'error')
}

async function showHealth() {
  try {
    const health = await getHealth(BASE)
    const names = health.model && health.model !== health.engine ? `${health.engine} · ${health.model}` : health.engine
    ui.health.textContent = `${names} · ${health.status}`
    ui.health.title = health.detail ?? ''
    ui.health.dataset.ready = String(health.ready)
    if (!health.ready && health.status === 'loading') setTimeout(showHealth, 2000)
  } catch (err) {
    ui.health.textContent = 'server unreachable'
    ui.health.dataset.ready = 'false'
    ui.health.title = describeError(err)
  }
}

ui.keyForm.addEventListener('submit', useKey)
ui.agentSelect.addEventListener('change', () => selectAgent(ui.agentSelect.value).catch(fail))
ui.newAgent.addEventListener('click', () => openAgentDialog(null))
ui.editAgent.addEventListener('click', async () => {
  try {
    openAgentDialog(await getAgent(state.agentId, conn()))
  } catch (err) {
    fail(err)
  }
})
ui.deleteAgent.addEventListener('click', () => removeAgent())
ui.agentForm.addEventListener('submit', (event) => saveAgent(event))
ui.agentCancel.addEventListener('click', () => ui.dialog.close())
ui.newConversation.addEventListener('click', () => openConversation(null).catch(fail))
ui.composer.addEventListener('submit', send)
ui.message.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) send(event)
})
ui.stop.addEventListener('click', () => state.chat?.stream.cancel())

async function start() {
  const wanted = readHash()
  await loadAgents(wanted.agent, wanted.conversation)
  document.body.dataset.ready = 'true'
}

showHealth()
start().catch(fail)
