// Auto-resume: a TCP proxy in front of a real `streaming-llm serve` (echo engine) resets the
// client's first socket mid-answer; the client reopens one, sends `resume`, and the answer comes
// out whole, every token once, with a `resumed` event saying it happened.
import assert from 'node:assert/strict'
import net from 'node:net'
import { after, before, test } from 'node:test'
import WebSocket from 'ws'

import { streamChat, updateAgent } from '../dist/index.js'
import { startServer } from './server.mjs'

const words = (n) => Array.from({ length: n }, (_, i) => `w${i}`).join(' ')

let server

before(async () => {
  server = await startServer({ env: { STREAMING_LLM_ECHO_DELAY_MS: '5' } })
  await updateAgent({ id: 'tester', name: 'Tester' }, server.baseUrl)
})

after(async () => {
  await server?.stop()
})

/** Forwards to the server; the first connection is reset after `cutAfter` bytes came down it. */
function cuttingProxy(port, cutAfter) {
  let connections = 0
  const proxy = net.createServer((client) => {
    connections += 1
    const cut = connections === 1
    const upstream = net.connect(port, '127.0.0.1')
    let moved = 0
    client.pipe(upstream)
    upstream.on('data', (chunk) => {
      client.write(chunk)
      moved += chunk.length
      if (cut && moved >= cutAfter) {
        client.resetAndDestroy()
        upstream.resetAndDestroy()
      }
    })
    const drop = () => {
      client.destroy()
      upstream.destroy()
    }
    client.on('error', drop).on('close', drop)
    upstream.on('error', drop).on('close', drop)
  })
  return new Promise((resolve) => proxy.listen(0, '127.0.0.1', () => resolve(proxy)))
}

test('a socket reset mid-answer is reopened and the answer resumed, every token once', async () => {
  const proxy = await cuttingProxy(server.port, 900)
  try {
    const events = []
    const urls = []
    const stream = await streamChat({
      backendUrl: `ws://127.0.0.1:${proxy.address().port}/ws/chat`,
      agentId: 'tester',
      socketFactory: (url) => (urls.push(url), new WebSocket(url)),
      onEvent: (event) => events.push(event),
    })
    const message = words(300)
    const result = await stream.sendMessage({ message })
    const resumed = events.filter((e) => e.type === 'resumed')
    assert.equal(resumed.length, 1)
    assert.equal(resumed[0].requestId, result.requestId)
    assert.ok(resumed[0].afterSeq < 299) // cut before the end (what came before the reset may be lost with it)
    assert.equal(result.text, message)
    assert.equal(result.finishReason, 'stop')
    let next = 0 // none repeated, none missing: each event starts where the last one's pieces ended
    for (const event of events.filter((e) => e.type === 'token')) {
      assert.equal(event.seq, next)
      next += event.count
    }
    const again = await stream.sendMessage({ message: 'and on the new socket' })
    assert.equal(again.text, 'and on the new socket')
    assert.equal(again.conversationId, result.conversationId)
    // the first socket knew no conversation; the reopened one names it, for sticky routing
    assert.equal(new URL(urls[0]).searchParams.get('conversation_id'), null)
    assert.equal(new URL(urls.at(-1)).searchParams.get('conversation_id'), result.conversationId)
    stream.stop()
  } finally {
    proxy.close()
  }
})
