// Start a real `streaming-llm serve` (echo engine) on a free loopback port for the tests.
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../../..')

/** A loopback port nothing listens on (right now). */
export function freePort() {
  return new Promise((ok, fail) => {
    const server = createServer()
    server.on('error', fail)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => ok(port))
    })
  })
}

/**
 * Spawn `python -m streaming_llm serve` (python from STREAMING_LLM_PYTHON, default python3) with
 * the echo engine and a temporary data directory; resolve once /health answers 200.
 */
export async function startServer({ env = {}, timeoutMs = 60_000, port: wantedPort, dataDir: wantedDir, keepData = false } = {}) {
  // A restart test passes the port and data directory of the server it replaces.
  const port = wantedPort ?? (await freePort())
  const dataDir = wantedDir ?? mkdtempSync(join(tmpdir(), 'streaming-llm-client-'))
  const python = process.env.STREAMING_LLM_PYTHON || 'python3'
  const proc = spawn(python, ['-m', 'streaming_llm', 'serve', '--host', '127.0.0.1', '--port', String(port)], {
    cwd: REPO_ROOT,
    env: {
      // Only this test's settings: none leak in from the caller's environment.
      ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('STREAMING_LLM_'))),
      STREAMING_LLM_ENGINE: 'echo',
      STREAMING_LLM_ECHO_DELAY_MS: '5',
      STREAMING_LLM_DATA_DIR: dataDir,
      STREAMING_LLM_LOG_LEVEL: 'warning',
      ...env,
    },
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let output = ''
  const keep = (chunk) => {
    output = (output + chunk).slice(-8000)
  }
  proc.stdout.on('data', keep)
  proc.stderr.on('data', keep)
  const exited = new Promise((ok) => proc.once('exit', (code, signal) => ok({ code, signal })))

  const baseUrl = `http://127.0.0.1:${port}`
  const deadline = Date.now() + timeoutMs
  let ready = false
  while (!ready) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(`${python} -m streaming_llm serve exited (${proc.exitCode ?? proc.signalCode}):\n${output}`)
    }
    if (Date.now() > deadline) {
      proc.kill('SIGKILL')
      throw new Error(`the server did not become healthy within ${timeoutMs} ms:\n${output}`)
    }
    try {
      ready = (await fetch(`${baseUrl}/health`)).status === 200
    } catch {
      // not listening yet
    }
    if (!ready) await new Promise((ok) => setTimeout(ok, 100))
  }

  return {
    port,
    baseUrl,
    wsUrl: `ws://127.0.0.1:${port}/ws/chat`,
    dataDir,
    proc,
    output: () => output,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGTERM')
        const timer = setTimeout(() => proc.kill('SIGKILL'), 10_000)
        await exited
        clearTimeout(timer)
      }
      if (!keepData) rmSync(dataDir, { recursive: true, force: true })
    },
  }
}
