// The client against a real `streaming-llm serve` (echo engine: it answers with the user's words,
// one word per token), spoken to over real HTTP and a real WebSocket from the `ws` package.
import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'
import WebSocket from 'ws'

import {
  ApiError,
  ChatError,
  createRoom,
  setRoomAgents,
  DEFAULT_BASE_URL,
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
} from '../dist/index.js'
import { WebSocketServer } from 'ws'
import { freePort, startServer } from './server.mjs'

const wsFactory = (url) => new WebSocket(url)
const words = (n, from = 0) => Array.from({ length: n }, (_, i) => `w${i + from}`).join(' ')

let server
let base
const agent = { id: 'tester', name: 'Tester', systemPrompt: 'Answer briefly.', markdownContext: '# Notes\n\nnone' }

before(async () => {
  server = await startServer()
  base = server.baseUrl
  await updateAgent(agent, base)
})

after(async () => {
  await server?.stop()
})

/** streamChat with the `ws` factory; collects every event. */
async function open(extra = {}) {
  const events = []
  const stream = await streamChat({
    backendUrl: server.wsUrl,
    agentId: agent.id,
    socketFactory: wsFactory,
    onEvent: (event) => events.push(event),
    ...extra,
  })
  return { stream, events }
}

describe('REST', () => {
  test('updateAgent creates, getAgent and listAgents read, updateAgent edits, deleteAgent removes', async () => {
    const created = await updateAgent(
      { id: 'reviewer', name: 'Reviewer', systemPrompt: 'Review.', markdownContext: '- a\n- b' },
      base,
    )
    assert.equal(created.id, 'reviewer')
    assert.equal(created.name, 'Reviewer')
    assert.equal(created.systemPrompt, 'Review.')
    assert.equal(created.markdownContext, '- a\n- b')

    assert.deepEqual(
      (await listAgents(base)).map((a) => a.id).sort(),
      ['reviewer', 'tester'],
    )
    const edited = await updateAgent({ ...created, name: 'Strict reviewer' }, base)
    assert.equal(edited.name, 'Strict reviewer')
    assert.equal((await getAgent('reviewer', base)).name, 'Strict reviewer')

    await deleteAgent('reviewer', base)
    assert.deepEqual((await listAgents(base)).map((a) => a.id), ['tester'])
  })

  test('a missing agent rejects with ApiError 404 agent_not_found', async () => {
    for (const call of [() => getAgent('ghost', base), () => deleteAgent('ghost', base)]) {
      await assert.rejects(call, (err) => {
        assert.ok(err instanceof ApiError)
        assert.equal(err.status, 404)
        assert.equal(err.code, 'agent_not_found')
        assert.match(err.message, /ghost/)
        return true
      })
    }
  })

  test('ids are URL-encoded: a bad id reaches the server and comes back 400 invalid_id', async () => {
    await assert.rejects(getAgent('Bad Id/../x', base), (err) => {
      assert.ok(err instanceof ApiError)
      assert.equal(err.status, 400)
      assert.equal(err.code, 'invalid_id')
      return true
    })
  })

  test('an unreachable server rejects with ApiError status 0 network_error', async () => {
    const port = await freePort()
    await assert.rejects(listAgents(`http://127.0.0.1:${port}`), (err) => {
      assert.ok(err instanceof ApiError)
      assert.equal(err.status, 0)
      assert.equal(err.code, 'network_error')
      assert.match(err.message, new RegExp(`127\\.0\\.0\\.1:${port}/agents`))
      return true
    })
  })

  test('the base URL defaults to http://localhost:8000 and a trailing slash is ignored', async () => {
    const realFetch = globalThis.fetch
    const seen = []
    globalThis.fetch = async (url, init) => {
      seen.push(String(url))
      if (String(url).startsWith(base)) return realFetch(url, init)
      throw new TypeError('not this test')
    }
    try {
      await assert.rejects(listAgents(), ApiError)
      assert.equal((await listAgents(`${base}/`)).length, 1)
    } finally {
      globalThis.fetch = realFetch
    }
    assert.equal(DEFAULT_BASE_URL, 'http://localhost:8000')
    assert.deepEqual(seen, ['http://localhost:8000/agents', `${base}/agents`])
  })

  test('getHealth reports the echo engine ready', async () => {
    const health = await getHealth(base)
    assert.equal(health.status, 'ok')
    assert.equal(health.ready, true)
    assert.equal(health.engine, 'echo')
  })
})

describe('streamChat', () => {
  test('a stream that continues a conversation names it in the socket URL (sticky routing)', async () => {
    const { stream: first } = await open()
    const started = await first.sendMessage({ message: 'hello' })
    first.stop()
    const urls = []
    const { stream } = await open({
      conversationId: started.conversationId,
      socketFactory: (url, protocols) => (urls.push(url), wsFactory(url, protocols)),
    })
    const again = await stream.sendMessage({ message: 'again' })
    stream.stop()
    assert.equal(again.conversationId, started.conversationId)
    assert.equal(new URL(urls[0]).searchParams.get('conversation_id'), started.conversationId)
    assert.equal(new URL(urls[0]).pathname, '/ws/chat')
  })

  test('several turns on one socket continue one conversation, with events in order', async () => {
    const { stream, events } = await open({ options: { temperature: 0.2, maxNewTokens: 400 } })
    assert.equal(stream.conversationId, undefined)
    const first = await stream.sendMessage({ message: 'Summarize the latest run.' })
    assert.equal(first.text, 'Summarize the latest run.')
    assert.equal(first.finishReason, 'stop')
    assert.equal(first.usage.completionTokens, 4)
    assert.ok(first.usage.promptTokens >= 4)
    assert.equal(stream.conversationId, first.conversationId)

    const second = await stream.sendMessage({ message: 'Now give me the key risks.', options: { temperature: 0.1 } })
    assert.equal(second.text, 'Now give me the key risks.')
    assert.equal(second.conversationId, first.conversationId)
    const third = await stream.sendMessage({ message: 'Thanks' })
    assert.equal(third.conversationId, first.conversationId)
    stream.stop()

    // Every turn: one start, its tokens with seq 0..n-1, one done; all with the turn's request id.
    const byTurn = [first, second, third].map((r) => events.filter((e) => e.requestId === r.requestId))
    assert.equal(new Set([first.requestId, second.requestId, third.requestId]).size, 3)
    for (const [i, turn] of byTurn.entries()) {
      const result = [first, second, third][i]
      assert.equal(turn[0].type, 'start')
      assert.equal(turn[0].conversationId, first.conversationId)
      assert.equal(turn.at(-1).type, 'done')
      assert.equal(turn.at(-1).finishReason, 'stop')
      assert.equal(turn.at(-1).turnId, result.turnId)
      const tokens = turn.slice(1, -1)
      assert.ok(tokens.every((e) => e.type === 'token'))
      // each event starts where the last one's pieces ended (`count` > 1 when pieces queued)
      assert.deepEqual(tokens.map((e) => e.seq), tokens.map((_, k) => tokens.slice(0, k).reduce((n, e) => n + e.count, 0)))
      assert.equal(tokens.map((e) => e.token).join(''), result.text)
    }
    assert.equal(events.length, byTurn.flat().length)

    const conversation = await getConversation(first.conversationId, base)
    assert.equal(conversation.id, first.conversationId)
    assert.equal(conversation.agentId, agent.id)
    assert.deepEqual(
      conversation.turns.map((t) => [t.role, t.content]),
      [
        ['user', 'Summarize the latest run.'],
        ['assistant', 'Summarize the latest run.'],
        ['user', 'Now give me the key risks.'],
        ['assistant', 'Now give me the key risks.'],
        ['user', 'Thanks'],
        ['assistant', 'Thanks'],
      ],
    )
    const listed = await listConversations(agent.id, base)
    assert.ok(listed.some((c) => c.id === first.conversationId))
  })

  test('turns sent without waiting are queued and answered in order', async () => {
    const { stream } = await open()
    const messages = ['one two three', 'four five', 'six', 'seven eight nine ten']
    const results = await Promise.all(messages.map((message) => stream.sendMessage({ message })))
    stream.stop()
    assert.deepEqual(results.map((r) => r.text), messages)
    assert.equal(new Set(results.map((r) => r.conversationId)).size, 1)
    const turns = (await getConversation(results[0].conversationId, base)).turns
    assert.deepEqual(turns.filter((t) => t.role === 'user').map((t) => t.content), messages)
  })

  test('a caller-given conversationId is continued', async () => {
    const { stream: a } = await open()
    const first = await a.sendMessage({ message: 'first visit' })
    a.stop()
    const { stream: b } = await open({ conversationId: first.conversationId })
    assert.equal(b.conversationId, first.conversationId)
    const again = await b.sendMessage({ message: 'second visit' })
    b.stop()
    assert.equal(again.conversationId, first.conversationId)
    const turns = (await getConversation(first.conversationId, base)).turns
    assert.deepEqual(turns.map((t) => t.content), ['first visit', 'first visit', 'second visit', 'second visit'])
  })

  test('per-call options override the stream defaults, camelCase in and snake_case on the wire', async () => {
    const { stream } = await open({ options: { maxNewTokens: 3 } })
    const capped = await stream.sendMessage({ message: words(10) })
    assert.equal(capped.finishReason, 'length')
    assert.equal(capped.text, 'w0 w1 w2 ')
    const two = await stream.sendMessage({ message: words(10), options: { maxNewTokens: 2 } })
    assert.equal(two.finishReason, 'length')
    assert.equal(two.text, 'w0 w1 ')
    assert.equal(two.usage.completionTokens, 2)
    const wider = await stream.sendMessage({ message: words(5), options: { maxNewTokens: 50, topP: 0.9, topK: 5, seed: 1 } })
    assert.equal(wider.finishReason, 'stop')
    assert.equal(wider.text, words(5))
    const stopped = await stream.sendMessage({ message: 'alpha beta STOP gamma', options: { stop: ['STOP'] } })
    assert.equal(stopped.finishReason, 'stop')
    assert.equal(stopped.text, 'alpha beta ')
    // Unset per-call fields keep the stream's default.
    const back = await stream.sendMessage({ message: words(10), options: { temperature: undefined } })
    assert.equal(back.text, 'w0 w1 w2 ')

    await assert.rejects(stream.sendMessage({ message: 'x', options: { max_new_tokens: 2 } }), (err) => {
      assert.ok(err instanceof TypeError)
      assert.match(err.message, /unknown chat option "max_new_tokens"/)
      return true
    })
    // A value the server refuses rejects that turn with the server's code; the socket stays usable.
    await assert.rejects(stream.sendMessage({ message: 'x', options: { temperature: 5 } }), (err) => {
      assert.ok(err instanceof ChatError)
      assert.match(err.message, /temperature/)
      return true
    })
    assert.equal((await stream.sendMessage({ message: 'still here' })).text, 'still here')
    stream.stop()
  })

  test('cancel() stops the current answer and keeps the socket open', async () => {
    let stream
    let cancelled = false
    ;({ stream } = await open({
      onEvent: (event) => {
        if (event.type === 'token' && event.seq + event.count > 2 && !cancelled) {
          cancelled = true
          stream.cancel()
        }
      },
    }))
    const long = words(400) // 400 tokens at 5 ms: about 2 s if nothing stops it
    const result = await stream.sendMessage({ message: long })
    assert.equal(result.finishReason, 'cancelled')
    assert.ok(result.text.length > 0 && result.text.length < long.length / 2, result.text)
    assert.ok(long.startsWith(result.text))
    const after = await stream.sendMessage({ message: 'and then' })
    assert.equal(after.finishReason, 'stop')
    assert.equal(after.conversationId, result.conversationId)
    stream.cancel() // nothing running: a no-op
    stream.stop()
    const turns = (await getConversation(result.conversationId, base)).turns
    assert.deepEqual(turns.map((t) => t.finishReason).slice(1, 2), ['cancelled'])
  })

  test('a turn the server refuses rejects with its code; the next turn still runs', async () => {
    const { stream, events } = await open({ agentId: 'nobody' })
    await assert.rejects(stream.sendMessage({ message: 'hello' }), (err) => {
      assert.ok(err instanceof ChatError)
      assert.equal(err.code, 'agent_not_found')
      assert.match(err.message, /nobody/)
      return true
    })
    assert.equal(events.at(-1).type, 'error')
    assert.equal(events.at(-1).code, 'agent_not_found')
    await assert.rejects(stream.sendMessage({ message: 'again' }), { code: 'agent_not_found' })
    stream.stop()
  })

  test('stop() rejects pending turns and later sendMessage calls with code stopped', async () => {
    const { stream } = await open()
    const running = stream.sendMessage({ message: words(200) })
    const queued = stream.sendMessage({ message: 'never sent' })
    stream.stop()
    await assert.rejects(running, { name: 'ChatError', code: 'stopped' })
    await assert.rejects(queued, { name: 'ChatError', code: 'stopped' })
    await assert.rejects(stream.sendMessage({ message: 'late' }), (err) => {
      assert.ok(err instanceof ChatError)
      assert.equal(err.code, 'stopped')
      assert.match(err.message, /stopped.*streamChat/)
      return true
    })
  })

  test('with reconnect off, pending turns reject with socket_closed when the connection drops', async () => {
    let raw
    const { stream } = await open({ socketFactory: (url) => (raw = new WebSocket(url)), reconnectAttempts: 0 })
    const running = stream.sendMessage({ message: words(200) })
    const queued = stream.sendMessage({ message: 'never sent' })
    await new Promise((ok) => setTimeout(ok, 50))
    raw.terminate()
    await assert.rejects(running, { code: 'socket_closed' })
    await assert.rejects(queued, { code: 'socket_closed' })
    await assert.rejects(stream.sendMessage({ message: 'late' }), { code: 'socket_closed' })
  })

  test('rejects when the socket cannot open: refused port, bad URL', async () => {
    const port = await freePort()
    for (const backendUrl of [`ws://127.0.0.1:${port}/ws/chat`, 'not a url', `${server.wsUrl}/nowhere`]) {
      await assert.rejects(
        streamChat({ backendUrl, agentId: agent.id, socketFactory: wsFactory }),
        (err) => {
          assert.ok(err instanceof ChatError, String(err))
          assert.equal(err.code, 'socket_open_failed')
          assert.ok(err.message.includes(backendUrl), err.message)
          return true
        },
      )
    }
  })

  test('without socketFactory and without a global WebSocket it rejects clearly', async () => {
    const saved = Object.getOwnPropertyDescriptor(globalThis, 'WebSocket')
    delete globalThis.WebSocket
    try {
      await assert.rejects(streamChat({ backendUrl: server.wsUrl, agentId: agent.id }), (err) => {
        assert.ok(err instanceof ChatError)
        assert.equal(err.code, 'no_websocket')
        assert.match(err.message, /socketFactory/)
        return true
      })
    } finally {
      if (saved) Object.defineProperty(globalThis, 'WebSocket', saved)
    }
  })

  test('a global WebSocket is used when no socketFactory is given', async () => {
    const saved = Object.getOwnPropertyDescriptor(globalThis, 'WebSocket')
    globalThis.WebSocket = WebSocket
    try {
      const stream = await streamChat({ backendUrl: server.wsUrl, agentId: agent.id })
      assert.equal((await stream.sendMessage({ message: 'via the global' })).text, 'via the global')
      stream.stop()
    } finally {
      if (saved) Object.defineProperty(globalThis, 'WebSocket', saved)
      else delete globalThis.WebSocket
    }
  })

  test('bad arguments are refused before any socket is opened', async () => {
    await assert.rejects(streamChat({ backendUrl: server.wsUrl, agentId: '', socketFactory: wsFactory }), TypeError)
    await assert.rejects(
      streamChat({ backendUrl: server.wsUrl, agentId: agent.id, socketFactory: wsFactory, options: { nope: 1 } }),
      /unknown chat option "nope"/,
    )
    const { stream } = await open()
    await assert.rejects(stream.sendMessage('just a string'), TypeError)
    stream.stop()
  })
})

describe('conversations', () => {
  test('listConversations filters by agent; deleteConversation removes one', async () => {
    await updateAgent({ ...agent, id: 'other', name: 'Other' }, base)
    const { stream } = await open({ agentId: 'other' })
    const { conversationId } = await stream.sendMessage({ message: 'hi other' })
    stream.stop()
    const mine = await listConversations('other', base)
    assert.deepEqual(mine.map((c) => c.id), [conversationId])
    assert.ok(!(await listConversations(agent.id, base)).some((c) => c.id === conversationId))
    assert.ok((await listConversations(undefined, base)).some((c) => c.id === conversationId))
    await deleteConversation(conversationId, base)
    await assert.rejects(getConversation(conversationId, base), { name: 'ApiError', status: 404, code: 'conversation_not_found' })
    assert.deepEqual(await listConversations('other', base), [])
  })

  test('renameConversation, a search by title or content, and truncateConversation; REST fields are camelCase', async () => {
    const { stream } = await open()
    const first = await stream.sendMessage({ message: 'zebracorn beta' })
    await stream.sendMessage({ message: 'quokkafish delta' })
    stream.stop()
    const id = first.conversationId
    const renamed = await renameConversation(id, 'Greek letters', base)
    assert.deepEqual(Object.keys(renamed).sort(), ['agentId', 'agentIds', 'createdAt', 'id', 'title', 'updatedAt'])
    assert.deepEqual(renamed.agentIds, [agent.id])
    assert.equal(renamed.title, 'Greek letters')
    assert.deepEqual((await listConversations({ agentId: agent.id, q: 'greek' }, base)).map((c) => c.id), [id])
    assert.deepEqual((await listConversations({ q: 'QUOKKAFISH' }, base)).map((c) => c.id), [id])
    assert.deepEqual(await listConversations({ q: 'no such words anywhere' }, base), [])
    await assert.rejects(renameConversation(id, '', base), { status: 422, code: 'validation_error' })

    const before = await getConversation(id, base)
    const answer = before.turns[1]
    assert.deepEqual(Object.keys(answer).sort(), ['agentId', 'content', 'createdAt', 'finishReason', 'id', 'role', 'seq', 'usage'])
    assert.equal(answer.agentId, agent.id)
    assert.equal(before.turns[0].agentId, null)
    assert.equal(answer.finishReason, 'stop')
    assert.equal(answer.usage.completionTokens, 2)
    assert.equal(before.turns[0].usage, null)
    await assert.rejects(truncateConversation(id, 1, base), { status: 400 }) // an answer, not a user turn
    await truncateConversation(id, 2, base)
    assert.deepEqual((await getConversation(id, base)).turns.map((t) => t.content), ['zebracorn beta', 'zebracorn beta'])
  })
})

describe('events(), AbortSignal, and what the server sends', () => {
  test('events() yields every event of the stream as an async iterable, and ends with it', async () => {
    const { stream, events } = await open()
    const seen = []
    const reading = (async () => {
      for await (const event of stream.events()) seen.push(event)
    })()
    const result = await stream.sendMessage({ message: 'one two three' })
    stream.stop()
    await reading // ended with the stream
    assert.deepEqual(seen, events)
    assert.deepEqual(seen.map((e) => e.type), ['start', 'token', 'token', 'token', 'done'])
    assert.equal(seen[0].userTurnId, seen[0].turnId)
    assert.equal(seen.at(-1).answerTurnId, result.answerTurnId)
    assert.notEqual(seen[0].userTurnId, result.answerTurnId)
    assert.deepEqual(Object.keys(result.usage).filter((k) => /_/.test(k)), []) // camelCase only
  })

  test('a turn signal cancels that turn; a stream signal closes the stream', async () => {
    const { stream } = await open()
    const controller = new AbortController()
    const turn = stream.sendMessage({ message: words(300), signal: controller.signal })
    const queued = new AbortController()
    const later = stream.sendMessage({ message: 'never sent', signal: queued.signal })
    queued.abort()
    await assert.rejects(later, { name: 'ChatError', code: 'aborted' })
    await new Promise((ok) => setTimeout(ok, 30))
    controller.abort()
    const result = await turn
    assert.equal(result.finishReason, 'cancelled')
    assert.ok(result.usage.promptTokens >= 300, `prompt tokens of a cancelled turn: ${result.usage.promptTokens}`)
    const after = await stream.sendMessage({ message: 'still open' })
    assert.equal(after.text, 'still open')

    const streamAbort = new AbortController()
    const { stream: second } = await open({ signal: streamAbort.signal })
    const pending = second.sendMessage({ message: words(300) })
    streamAbort.abort()
    await assert.rejects(pending, { code: 'aborted' })
    await assert.rejects(second.sendMessage({ message: 'x' }), { code: 'aborted' })
    stream.stop()

    const early = new AbortController()
    early.abort()
    await assert.rejects(open({ signal: early.signal }), { code: 'aborted' })
  })

  test('a wrong socket path says so, and mentions API keys only when the server has them', async () => {
    const wrong = server.wsUrl.replace('/ws/chat', '/ws/chatt')
    const err = await open({ backendUrl: wrong }).catch((e) => e)
    assert.equal(err.code, 'socket_open_failed')
    assert.match(err.message, /the chat socket is at \/ws\/chat/)
    assert.doesNotMatch(err.message, /API key/)
  })

  test('a frame missing a field ends the stream with bad_frame instead of inventing a value', async () => {
    const port = await freePort()
    const fake = new WebSocketServer({ host: '127.0.0.1', port })
    fake.on('connection', (socket) => {
      socket.on('message', (data) => {
        const frame = JSON.parse(String(data))
        socket.send(JSON.stringify({ type: 'start', request_id: frame.request_id, turn_id: 't1' })) // no conversation_id
      })
    })
    try {
      const stream = await streamChat({ backendUrl: `ws://127.0.0.1:${port}/ws/chat`, agentId: 'x', socketFactory: wsFactory })
      await assert.rejects(stream.sendMessage({ message: 'hi' }), (e) => {
        assert.equal(e.code, 'bad_frame')
        assert.match(e.message, /conversation_id/)
        return true
      })
    } finally {
      await new Promise((ok) => fake.close(ok))
    }
  })
})

describe('tools', () => {
  const call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
  const weather = { name: 'get_weather', description: 'The weather in a city.', parameters: { type: 'object' } }

  test('an agent declares tools; a call comes back in toolCalls and its result continues the chat', async () => {
    const stored = await updateAgent({ id: 'caller', name: 'Caller', tools: [weather] }, base)
    assert.deepEqual(stored.tools, [weather])
    assert.deepEqual((await getAgent('caller', base)).tools, [weather])
    const { stream } = await open({ agentId: 'caller' })
    // The echo engine repeats the user's words: a message holding a call is answered with it.
    const result = await stream.sendMessage({ message: call })
    assert.equal(result.toolCalls.length, 1)
    const [made] = result.toolCalls
    assert.equal(made.name, 'get_weather')
    assert.deepEqual(JSON.parse(made.arguments), { city: 'Oslo' })
    const answer = await stream.sendMessage({ message: '', toolResults: [{ toolCallId: made.id, content: 'snow' }] })
    assert.equal(answer.text, 'snow')
    assert.deepEqual(answer.toolCalls, [])
    stream.stop()
    const detail = await getConversation(answer.conversationId, base)
    assert.deepEqual(detail.turns.map((t) => t.role), ['user', 'assistant', 'tool', 'assistant'])
    assert.deepEqual(detail.turns[1].toolCalls, [made])
    assert.equal(detail.turns[2].toolCallId, made.id)
  })

  test('a turn offers its own tools, with a tool choice', async () => {
    const { stream } = await open()
    const tools = [{ type: 'function', function: weather }]
    const result = await stream.sendMessage({ message: call, tools, toolChoice: { type: 'function', function: { name: 'get_weather' } } })
    assert.equal(result.toolCalls[0].name, 'get_weather')
    await assert.rejects(stream.sendMessage({ message: 'x', tools, toolChoice: { type: 'function', function: { name: 'nope' } } }),
      (e) => e.code === 'unknown_tool')
    const plain = await stream.sendMessage({ message: call })  // no tools: the text stays text
    assert.deepEqual(plain.toolCalls, [])
    assert.equal(plain.text, call)
    stream.stop()
  })
})

describe('rooms', () => {
  test('createRoom, one agent or a round; events and results name the agent', async () => {
    await updateAgent({ ...agent, id: 'coder', name: 'Coder' }, base)
    await updateAgent({ ...agent, id: 'critic', name: 'Critic' }, base)
    const room = await createRoom(['coder', 'critic'], { title: 'Fix' }, base)
    assert.deepEqual(room.agentIds, ['coder', 'critic'])
    const { stream, events } = await open({ agentId: '', conversationId: room.id })
    const one = await stream.sendMessage({ message: 'hello coder', agentId: 'coder' })
    assert.deepEqual([one.agentId, one.text], ['coder', 'hello coder'])
    // The echo engine repeats the last message it sees: the critic sees the coder's answer.
    const [first, second] = await stream.sendRound({ message: 'check it', agentIds: ['coder', 'critic'] })
    assert.deepEqual([first.agentId, first.text], ['coder', 'check it'])
    assert.deepEqual([second.agentId, second.text], ['critic', '[Coder]: check it'])
    const mentioned = await stream.sendMessage({ message: '@critic again?' })
    assert.equal(mentioned.agentId, 'critic')
    await assert.rejects(stream.sendMessage({ message: 'hi', agentId: agent.id }), {
      name: 'ChatError', code: 'agent_not_in_conversation' })
    stream.stop()
    const roundStart = events.find((e) => e.type === 'start' && e.requestId === first.requestId)
    assert.deepEqual(roundStart.agentIds, ['coder', 'critic'])
    const tokens = events.filter((e) => e.type === 'token' && e.requestId === first.requestId)
    assert.deepEqual([...new Set(tokens.map((e) => e.agentId))], ['coder', 'critic'])
    assert.deepEqual(events.filter((e) => e.type === 'done').map((e) => e.agentId), ['coder', 'coder', 'critic', 'critic'])
    const detail = await getConversation(room.id, base)
    assert.deepEqual(detail.turns.map((t) => t.agentId), [null, 'coder', null, 'coder', 'critic', null, 'critic'])
    assert.deepEqual((await setRoomAgents(room.id, ['critic'], base)).agentIds, ['critic'])
    await assert.rejects(createRoom(['coder', 'nobody'], {}, base), { name: 'ApiError', status: 404, code: 'agent_not_found' })
  })
})
