// Type-checked, never run (`npm run typecheck`): the README's examples, written as callers use the
// package, so a change to the public API that breaks them fails the build.
import { listAgents, getAgent, updateAgent, deleteAgent, streamChat, type Agent, type ChatEvent } from 'streaming-llm-client'
import { ApiError, ChatError, type ChatResult, type ClientOptions, type SocketFactory } from 'streaming-llm-client'
import type { ChatStream, FunctionTool } from 'streaming-llm-client'
import { createRoom } from 'streaming-llm-client'
import WebSocket from 'ws'

export async function issueExample(): Promise<void> {
  const agents = await listAgents('http://localhost:8000') // base URL optional, default http://localhost:8000
  const { sendMessage, stop } = await streamChat({
    backendUrl: 'ws://localhost:8000/ws/chat',
    agentId: agents[0].id,
    options: { temperature: 0.2, maxNewTokens: 400 },
    onEvent: (event: ChatEvent) => {
      /* 'start' | 'token' (event.token) | 'done' | 'error' (event.message) */
      if (event.type === 'token') console.log(event.token)
      if (event.type === 'error') console.error(event.message)
    },
  })
  await sendMessage({ message: 'Summarize the latest run.' })
  await sendMessage({ message: 'Now give me the key risks.', options: { temperature: 0.1 } })
  stop()

  const upserted: Agent = await updateAgent({ id: 'reviewer', name: 'Reviewer', systemPrompt: '...', markdownContext: '...' })
  const latest = await getAgent(upserted.id)
  await deleteAgent(latest.id)
}

export async function nodeExample(): Promise<ChatResult | undefined> {
  // The `ws` package's WebSocket fits `socketFactory` as it is.
  const socketFactory: SocketFactory = (url, protocols) => new WebSocket(url, protocols)
  const plain: SocketFactory = (url) => new WebSocket(url) // fine for servers without keys
  void plain
  const chat = await streamChat({ backendUrl: 'ws://localhost:8000/ws/chat', agentId: 'reviewer', socketFactory })
  try {
    const result = await chat.sendMessage({ message: 'Hello', options: { maxNewTokens: 64, stop: ['\n\n'] } })
    const reason: 'stop' | 'length' | 'cancelled' | 'error' = result.finishReason
    console.log(result.text, result.conversationId, reason, result.usage.completionTokens, chat.conversationId)
    chat.cancel()
    return result
  } catch (err) {
    if (err instanceof ChatError) console.error(err.code, err.message)
    if (err instanceof ApiError) console.error(err.status, err.code, err.message)
    return undefined
  } finally {
    chat.stop()
  }
}

export async function apiKeyExample(): Promise<void> {
  const server: ClientOptions = { baseUrl: 'https://chat.example.com', apiKey: process.env.STREAMING_LLM_API_KEY }
  const agents = await listAgents(server)
  await updateAgent({ id: 'reviewer', name: 'Reviewer', systemPrompt: '...', markdownContext: '...' }, server)
  const chat = await streamChat({ backendUrl: 'wss://chat.example.com/ws/chat', agentId: agents[0].id, apiKey: server.apiKey })
  chat.stop()
  await getAgent('reviewer', { apiKey: 'a-key-of-16-chars-or-more' }) // base URL defaults as before
  await deleteAgent('reviewer', server)
}

export async function eventsExample(): Promise<void> {
  const controller = new AbortController()
  const chat = await streamChat({ backendUrl: 'ws://127.0.0.1:8000/ws/chat', agentId: 'reviewer', signal: controller.signal })
  const reading = (async () => {
    for await (const event of chat.events()) {
      if (event.type === 'token') process.stdout.write(event.token)
      if (event.type === 'done') console.log('\n', event.finishReason, event.usage.completionTokens, event.answerTurnId)
    }
  })()
  await chat.sendMessage({ message: 'Summarize the latest run.', options: { topP: 0.9, repetitionPenalty: 1.1 } })
  controller.abort() // closes the stream, as chat.stop() does; the loop above ends
  await reading
}

export async function toolsExample(chat: ChatStream, getWeather: (city: string) => string): Promise<void> {
  const tools: FunctionTool[] = [{ type: 'function', function: {
    name: 'get_weather', description: 'The weather in a city.',
    parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
  } }]
  let result = await chat.sendMessage({ message: 'Weather in Oslo?', tools })
  while (result.toolCalls.length > 0) {
    const toolResults = result.toolCalls.map((call) =>
      ({ toolCallId: call.id, content: getWeather(JSON.parse(call.arguments).city) }))
    result = await chat.sendMessage({ message: '', tools, toolResults })
  }
  console.log(result.text)
  await updateAgent({ id: 'forecaster', name: 'Forecaster', tools: [{ name: 'get_weather', parameters: { type: 'object' } }] })
}

export async function roomExample(): Promise<void> {
  const room = await createRoom(['coder', 'reviewer'], { title: 'Parser fix' })
  const chat = await streamChat({ backendUrl: 'ws://localhost:8000/ws/chat', agentId: '', conversationId: room.id })
  const [fix, review] = await chat.sendRound({ message: 'Fix the lexer bug.', agentIds: ['coder', 'reviewer'] })
  console.log(fix.agentId, fix.text, review.agentId, review.text)
}
