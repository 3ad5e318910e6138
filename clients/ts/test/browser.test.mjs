// The reference web page in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) against a real `streaming-llm serve` with the echo engine.
// Set STREAMING_LLM_SCREENSHOT_DIR to keep screenshots of the page.
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { after, before, test } from 'node:test'
import { chromium } from 'playwright-core'

import { updateAgent } from '../dist/index.js'
import { startServer } from './server.mjs'

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium'
// The machine has no open network: without these Chromium stalls on its own background traffic.
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
]
const words = (n) => Array.from({ length: n }, (_, i) => `word${i}`).join(' ')

const API_KEY = randomBytes(24).toString('base64url')

let server
let keyedServer // the same, with STREAMING_LLM_API_KEY set
let browser
let page
const problems = [] // uncaught page errors and console errors: there must be none
const failed = [] // HTTP responses >= 400

async function screenshot(name) {
  const dir = process.env.STREAMING_LLM_SCREENSHOT_DIR
  if (!dir) return
  mkdirSync(dir, { recursive: true })
  await page.screenshot({ path: join(dir, `${name}.png`) })
}

/** A fresh page (its own context: no storage shared with the last one) reporting to problems/failed. */
async function newPage() {
  await page?.context().close()
  page = await browser.newPage({ viewport: { width: 1100, height: 720 } })
  page.setDefaultTimeout(15_000)
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`))
  page.on('console', (msg) => {
    // Failed requests are checked one by one through `failed`.
    if (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource')) problems.push(`console: ${msg.text()}`)
  })
  page.on('response', (response) => {
    if (response.status() >= 400) failed.push(`${response.request().method()} ${new URL(response.url()).pathname} ${response.status()}`)
  })
  page.on('dialog', (dialog) => dialog.accept()) // the delete confirmation
}

before(async () => {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install -y chromium chromium-driver`)
  // 15 ms a word: a short answer streams in visible steps, a long one runs long enough to stop.
  ;[server, keyedServer] = await Promise.all([
    startServer({ env: { STREAMING_LLM_ECHO_DELAY_MS: '15' } }),
    startServer({ env: { STREAMING_LLM_ECHO_DELAY_MS: '15', STREAMING_LLM_API_KEY: API_KEY } }),
  ])
  // launch() gives Chromium a fresh temporary --user-data-dir and removes it on close.
  browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 60_000 })
  await newPage()
})

after(async () => {
  await browser?.close()
  await Promise.all([server?.stop(), keyedServer?.stop()])
})

async function load() {
  problems.length = 0
  failed.length = 0
  await page.goto(`${server.baseUrl}/`)
  await page.waitForSelector('body[data-ready="true"]')
}

test('create an agent, stream an answer, stop one, and find the history after a reload', async () => {
  await load()
  assert.equal(await page.locator('#empty').isVisible(), true)
  await page.waitForSelector('#health[data-ready="true"]')
  assert.match(await page.locator('#health').textContent(), /echo/)

  // Create an agent, then edit it.
  await page.click('#new-agent')
  await page.fill('#agent-id', 'writer')
  await page.fill('#agent-name', 'Writer')
  await page.fill('#agent-system-prompt', 'Write plainly.')
  await page.fill('#agent-markdown-context', '# Style\n\nShort sentences.')
  await page.click('#agent-save')
  await page.waitForSelector('#agent-select option[value="writer"]', { state: 'attached' })
  assert.equal(await page.locator('#empty').isVisible(), false)
  await page.click('#edit-agent')
  await page.waitForFunction(() => document.querySelector('#agent-dialog-title').textContent === 'Edit Writer')
  assert.equal(await page.inputValue('#agent-system-prompt'), 'Write plainly.')
  assert.equal(await page.locator('#agent-id').getAttribute('readonly'), '')
  await page.fill('#agent-name', 'Plain writer')
  await page.click('#agent-save')
  await page.waitForFunction(() => document.querySelector('#agent-select').selectedOptions[0]?.textContent === 'Plain writer (writer)')
  await screenshot('1-agent')

  // Send a message: watch the answer grow token by token until it is done.
  await page.evaluate(() => {
    window.__seen = [] // lengths of the answer as it grows
    window.__stopEnabled = false // Stop could be pressed while the answer streamed
    new MutationObserver(() => {
      const text = document.querySelector('.message.assistant:last-child .text')?.textContent
      if (text !== undefined && window.__seen.at(-1) !== text.length) window.__seen.push(text.length)
      if (document.querySelector('.message.assistant.streaming') && !document.querySelector('#stop').disabled) window.__stopEnabled = true
    }).observe(document.querySelector('#transcript'), { childList: true, subtree: true, characterData: true })
  })
  const message = words(25)
  await page.fill('#message', message)
  await page.click('#send')
  const done = await page.waitForSelector('.message.assistant[data-finish-reason]')
  assert.equal(await done.getAttribute('data-finish-reason'), 'stop')
  assert.equal(await page.textContent('.message.assistant:last-child .text'), message)
  assert.match(await page.textContent('.message.assistant:last-child .meta'), /stop · 25 tokens/)
  const seen = await page.evaluate(() => window.__seen)
  const partial = seen.filter((n) => n > 0 && n < message.length)
  assert.ok(partial.length >= 5, `tokens should appear one by one, saw lengths ${seen}`)
  assert.deepEqual(partial, [...partial].sort((a, b) => a - b))
  assert.equal(await page.evaluate(() => window.__stopEnabled), true)
  await page.waitForSelector('#stop[disabled]')
  await page.waitForSelector('#conversation-list button[aria-current="true"]')
  assert.match(await page.textContent('#conversation-list'), /word0 word1/)

  // A long answer (400 words, about 6 s): press Stop once it is under way.
  const long = words(400)
  await page.fill('#message', long)
  await page.press('#message', 'Enter')
  await page.waitForFunction(() => document.querySelector('.message.assistant:last-child .text').textContent.length > 30)
  await screenshot('2-streaming')
  await page.click('#stop')
  await page.waitForSelector('.message.assistant:last-child[data-finish-reason="cancelled"]')
  assert.match(await page.textContent('.message.assistant:last-child .meta'), /cancelled/)
  const stopped = await page.textContent('.message.assistant:last-child .text')
  assert.ok(stopped.length > 30 && stopped.length < long.length / 2, `stopped after ${stopped.length} characters`)
  assert.equal(await page.inputValue('#message'), '')
  await screenshot('3-stopped')

  // Reload: the same agent and conversation come back with the whole history.
  await page.reload()
  await page.waitForSelector('body[data-ready="true"]')
  await page.waitForSelector('.message.assistant[data-finish-reason="cancelled"]')
  const history = await page.$$eval('#transcript .message', (items) =>
    items.map((li) => [li.classList.contains('user') ? 'user' : 'assistant', li.querySelector('.text').textContent, li.dataset.finishReason ?? null]))
  assert.deepEqual(history, [
    ['user', message, null],
    ['assistant', message, 'stop'],
    ['user', long, null],
    ['assistant', stopped, 'cancelled'],
  ])
  assert.equal(await page.locator('#conversation-list button').count(), 1)
  assert.equal(await page.getAttribute('#conversation-list button', 'aria-current'), 'true')
  await screenshot('4-reloaded')

  // The next message continues that conversation; a new one starts empty and shows up in the list.
  await page.fill('#message', 'one more')
  await page.click('#send')
  await page.waitForFunction(() => document.querySelectorAll('.message.assistant[data-finish-reason]').length === 3)
  assert.equal(await page.locator('#conversation-list button').count(), 1)
  await page.click('#new-conversation')
  assert.equal(await page.locator('#transcript .message').count(), 0)
  await page.fill('#message', 'fresh start')
  await page.click('#send')
  await page.waitForFunction(() => document.querySelectorAll('#conversation-list button').length === 2)
  await page.waitForSelector('#stop[disabled]') // the turn is over: conversations can be switched
  await page.click('#conversation-list li:last-child button')
  await page.waitForFunction(() => document.querySelectorAll('#transcript .message').length === 6)

  // Delete the agent: the page goes back to its empty state.
  await page.click('#delete-agent')
  await page.waitForSelector('#empty', { state: 'visible' })
  assert.equal(await page.locator('#agent-select option').count(), 0)
  assert.deepEqual(problems, [])
  assert.deepEqual(failed, [])
})

test('a bad agent id is refused in the dialog with the server message', async () => {
  await load()
  await page.click('#new-agent')
  await page.$eval('#agent-id', (input) => input.removeAttribute('pattern')) // let the server judge
  await page.fill('#agent-id', 'Bad Id')
  await page.fill('#agent-name', 'Bad')
  await page.click('#agent-save')
  await page.waitForFunction(() => document.querySelector('#agent-error').textContent !== '')
  assert.match(await page.textContent('#agent-error'), /invalid agent id.*\(invalid_id\)/)
  assert.equal(await page.locator('#agent-dialog').isVisible(), true)
  await page.click('#agent-cancel')
  assert.deepEqual(problems, [])
  assert.deepEqual(failed, ['PUT /agents/Bad%20Id 400'])
})

test('a keyed server: the page asks for the API key, keeps it for the tab, and uses it for REST and the socket', async () => {
  await newPage()
  problems.length = 0
  failed.length = 0
  const keyed = { baseUrl: keyedServer.baseUrl, apiKey: API_KEY }
  await updateAgent({ id: 'guarded', name: 'Guarded', system_prompt: 'Be brief.', markdown_context: '' }, keyed)

  // No key yet: /agents answers 401 and the page asks for one.
  await page.goto(`${keyedServer.baseUrl}/`)
  await page.waitForSelector('#key-form', { state: 'visible' })
  assert.match(await page.textContent('#empty'), /needs an API key/)
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'api-key')
  assert.equal(await page.textContent('#key-error'), '')
  assert.equal(await page.textContent('#status'), '')
  await page.waitForSelector('#health[data-ready="true"]') // /health is public
  await screenshot('5-key-prompt')

  // A wrong key (well formed) is refused and forgotten; the prompt says so.
  await page.fill('#api-key', `${API_KEY.slice(0, -1)}${API_KEY.endsWith('A') ? 'B' : 'A'}`)
  await page.click('#key-save')
  await page.waitForFunction(() => document.querySelector('#key-error').textContent === 'That key was refused.')
  assert.equal(await page.locator('#key-form').isVisible(), true)
  assert.equal(await page.evaluate(() => sessionStorage.getItem('streaming-llm.apiKey')), null)

  // The right key: the agents load, and a message streams over the keyed socket.
  await page.fill('#api-key', API_KEY)
  await page.press('#api-key', 'Enter')
  await page.waitForSelector('body[data-ready="true"]')
  assert.equal(await page.locator('#key-form').isVisible(), false)
  assert.equal(await page.inputValue('#agent-select'), 'guarded')
  assert.equal(await page.evaluate(() => sessionStorage.getItem('streaming-llm.apiKey')), API_KEY)
  await page.fill('#message', words(8))
  await page.click('#send')
  await page.waitForSelector('.message.assistant[data-finish-reason="stop"]')
  assert.equal(await page.textContent('.message.assistant:last-child .text'), words(8))
  await screenshot('6-keyed-chat')

  // A reload keeps the key for this tab: no prompt, the conversation comes back.
  await page.reload()
  await page.waitForSelector('body[data-ready="true"]')
  await page.waitForSelector('.message.assistant[data-finish-reason="stop"]')
  assert.equal(await page.locator('#key-form').isVisible(), false)
  assert.deepEqual(problems, [])
  assert.deepEqual(failed, ['GET /agents 401', 'GET /agents 401'])
})
