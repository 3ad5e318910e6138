// Rooms on the reference page, in headless Chromium (as browser.test.mjs) against a real
// `streaming-llm serve` with the echo engine, which answers with the last message it sees: in a
// round the second agent's answer is the first agent's, named — proof that it saw it.
import assert from 'node:assert/strict'
import { existsSync } from 'node:fs'
import { after, before, test } from 'node:test'
import { chromium } from 'playwright-core'

import { getConversation, listConversations, updateAgent } from '../dist/index.js'
import { startServer } from './server.mjs'

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium'
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']

let server
let browser
let page
const problems = []
const failed = []

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium chromium-driver`)
  server = await startServer({ env: { STREAMING_LLM_ECHO_DELAY_MS: '5' } })
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 60_000 })
  page = await browser.newPage({ viewport: { width: 1100, height: 720 } })
  page.setDefaultTimeout(15_000)
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`))
  page.on('console', (msg) => {
    if (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource')) problems.push(`console: ${msg.text()}`)
  })
  page.on('response', (response) => {
    if (response.status() >= 400) failed.push(`${response.request().method()} ${new URL(response.url()).pathname} ${response.status()}`)
  })
})

after(async () => {
  await browser?.close()
  await server?.stop()
})

/** The transcript as [who, text] pairs; answers carry their agent's name and colour class. */
async function transcript() {
  return page.$$eval('#transcript .message', (items) => items.map((li) => [
    li.querySelector('.role').textContent,
    li.querySelector('.text').textContent,
    li.classList.contains('assistant') ? [...li.classList].some((c) => c.startsWith('speaker-')) : null,
  ]))
}

test('a room: create it, address one agent, then a round; answers are labelled and stored by agent', async () => {
  for (const [id, name] of [['coder', 'Coder'], ['critic', 'Critic'], ['bystander', 'Bystander']]) {
    await updateAgent({ id, name, systemPrompt: `You are ${name}.` }, server.baseUrl)
  }
  await page.goto(`${server.baseUrl}/`)
  await page.waitForSelector('body[data-ready="true"]')
  await page.selectOption('#agent-select', 'coder')

  // New room: coder (the selected agent, ticked already) and critic.
  await page.click('#new-room')
  await page.fill('#room-title', 'Parser fix')
  await page.check('#room-agents input[value="critic"]')
  await page.click('#room-create')
  await page.waitForSelector('#room-to:not([hidden])')
  const to = await page.$$eval('#room-agents-to input', (boxes) => boxes.map((b) => [b.value, b.checked]))
  assert.deepEqual(to, [['coder', true], ['critic', false]])
  assert.match(await page.textContent('#conversation-list'), /Room: Coder, Critic/)

  // One agent: the coder answers.
  await page.fill('#message', 'hello coder')
  await page.click('#send')
  await page.waitForFunction(() => document.querySelectorAll('.message.assistant[data-finish-reason]').length === 1)
  await page.waitForSelector('#stop[disabled]')

  // A round: both, in the room's order; the critic sees the coder's answer.
  await page.check('#room-agents-to input[value="critic"]')
  await page.fill('#message', 'check it')
  await page.click('#send')
  await page.waitForFunction(() => document.querySelectorAll('.message.assistant[data-finish-reason]').length === 3)
  await page.waitForSelector('#stop[disabled]')
  assert.deepEqual(await transcript(), [
    ['You', 'hello coder', null],
    ['Coder', 'hello coder', true],
    ['You', 'check it', null],
    ['Coder', 'check it', true],
    ['Critic', '[Coder]: check it', true],
  ])
  const colours = await page.$$eval('#transcript .message.assistant', (items) =>
    items.map((li) => [...li.classList].find((c) => c.startsWith('speaker-'))))
  assert.equal(colours[0], colours[1]) // one agent, one colour
  assert.notEqual(colours[1], colours[2])

  const [room] = await listConversations({ agentId: 'critic' }, server.baseUrl)
  assert.deepEqual(room.agentIds, ['coder', 'critic'])
  const stored = await getConversation(room.id, server.baseUrl)
  assert.deepEqual(stored.turns.map((t) => t.agentId), [null, 'coder', null, 'coder', 'critic'])

  // The room is listed for each of its agents, not for the others.
  await page.selectOption('#agent-select', 'bystander')
  await page.waitForFunction(() => !document.querySelector('#conversation-list').textContent.includes('Room:'))
  await page.selectOption('#agent-select', 'critic')
  await page.waitForFunction(() => document.querySelector('#conversation-list').textContent.includes('Room: Coder, Critic'))
  await page.waitForFunction(() => document.querySelectorAll('#transcript .message').length === 5)
  assert.deepEqual((await transcript()).map(([who]) => who), ['You', 'Coder', 'You', 'Coder', 'Critic'])
  assert.deepEqual(problems, [])
  assert.deepEqual(failed, [])
})
