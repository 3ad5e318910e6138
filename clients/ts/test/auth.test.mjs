// The client against a real server with an API key configured (STREAMING_LLM_API_KEY): REST sends
// it as `Authorization: Bearer`, the socket offers it as the subprotocols ["bearer", key].
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { after, before, test } from 'node:test'
import WebSocket from 'ws'

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
} from '../dist/index.js'
import { startServer } from './server.mjs'

const KEY = randomBytes(24).toString('base64url') // 32 characters of A-Z a-z 0-9 - _
const WRONG = `${KEY.slice(0, -1)}${KEY.endsWith('A') ? 'B' : 'A'}`
const agent = { id: 'keyed', name: 'Keyed', systemPrompt: 'Answer briefly.', markdownContext: '' }
// Passes the protocols on, as a factory must for apiKey to reach the server.
const wsFactory = (url, protocols) => new WebSocket(url, protocols)

let server
let keyed // { baseUrl, apiKey }

before(async () => {
  server = await startServer({ env: { STREAMING_LLM_API_KEY: KEY } })
  keyed = { baseUrl: server.baseUrl, apiKey: KEY }
})

after(async () => {
  await server?.stop()
})

const unauthorized = (err) => {
  assert.ok(err instanceof ApiError, String(err))
  assert.equal(err.status, 401)
  assert.equal(err.code, 'unauthorized')
  return true
}

test('with the key: every REST helper and a chat turn work', async () => {
  assert.deepEqual(await listAgents(keyed), [])
  const created = await updateAgent(agent, keyed)
  assert.equal(created.name, 'Keyed')
  assert.equal((await getAgent(agent.id, keyed)).id, agent.id)
  assert.deepEqual((await listAgents(keyed)).map((a) => a.id), [agent.id])

  let raw
  const events = []
  const stream = await streamChat({
    backendUrl: server.wsUrl,
    agentId: agent.id,
    apiKey: KEY,
    socketFactory: (url, protocols) => (raw = wsFactory(url, protocols)),
    onEvent: (event) => events.push(event.type),
  })
  // The server picked the plain `bearer` protocol: the key is never echoed back.
  assert.equal(raw.protocol, 'bearer')
  const result = await stream.sendMessage({ message: 'keyed hello there' })
  stream.stop()
  assert.equal(result.text, 'keyed hello there')
  assert.equal(result.finishReason, 'stop')
  assert.deepEqual([events[0], events.at(-1)], ['start', 'done'])

  const conversation = await getConversation(result.conversationId, keyed)
  assert.deepEqual(conversation.turns.map((t) => t.content), ['keyed hello there', 'keyed hello there'])
  assert.deepEqual((await listConversations(agent.id, keyed)).map((c) => c.id), [result.conversationId])
  assert.equal((await getHealth(keyed)).ready, true)
  await deleteAgent(agent.id, keyed)
  assert.deepEqual(await listAgents(keyed), [])
})

test('without the key or with a wrong one: REST rejects with ApiError 401 unauthorized', async () => {
  await updateAgent(agent, keyed)
  for (const target of [server.baseUrl, { baseUrl: server.baseUrl }, { baseUrl: server.baseUrl, apiKey: WRONG }]) {
    await assert.rejects(listAgents(target), unauthorized)
    await assert.rejects(getAgent(agent.id, target), unauthorized)
    await assert.rejects(updateAgent({ ...agent, name: 'Hijacked' }, target), unauthorized)
    await assert.rejects(deleteAgent(agent.id, target), unauthorized)
    await assert.rejects(listConversations(undefined, target), unauthorized)
  }
  await assert.rejects(listAgents(server.baseUrl), /missing API key/)
  await assert.rejects(listAgents({ baseUrl: server.baseUrl, apiKey: WRONG }), /invalid API key/)
  // Nothing changed, and /health stays public.
  assert.equal((await getAgent(agent.id, keyed)).name, 'Keyed')
  assert.equal((await getHealth(server.baseUrl)).ready, true)
})

test('without the key or with a wrong one: streamChat rejects with socket_open_failed', async () => {
  for (const apiKey of [undefined, WRONG]) {
    await assert.rejects(
      streamChat({ backendUrl: server.wsUrl, agentId: agent.id, apiKey, socketFactory: wsFactory }),
      (err) => {
        assert.ok(err instanceof ChatError, String(err))
        assert.equal(err.code, 'socket_open_failed')
        assert.match(err.message, /403/)
        assert.match(err.message, apiKey ? /was the API key right/ : /pass apiKey/)
        return true
      },
    )
  }
})

test('a malformed apiKey or options object is a TypeError before any request', async () => {
  for (const apiKey of ['', 'has space', 'ünïcode-key-0123456789', 42]) {
    await assert.rejects(listAgents({ baseUrl: server.baseUrl, apiKey }), TypeError)
    await assert.rejects(streamChat({ backendUrl: server.wsUrl, agentId: agent.id, apiKey, socketFactory: wsFactory }), /apiKey must be/)
  }
  await assert.rejects(listAgents(['http://127.0.0.1:1']), /base URL or \{ baseUrl\?, apiKey\?, signal\? \}/)
  await assert.rejects(listAgents({ baseUrl: 8000 }), /baseUrl must be a string/)
})
