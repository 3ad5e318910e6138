// The pages load committed copies (so `make run` needs no Node.js and no CDN): the built client
// must be byte-for-byte what `tsc` builds from src/ now, and every third-party file what the
// pinned npm package ships.
import assert from 'node:assert/strict'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { tmpdir } from 'node:os'
import { dirname, join, resolve } from 'node:path'
import { test } from 'node:test'
import { fileURLToPath } from 'node:url'

import { BUILT, VENDORED, vendorFiles } from '../scripts/sync-web.mjs'

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..')
const tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc')

test('the vendored client and dist/ match a fresh tsc build of src/', () => {
  const out = mkdtempSync(join(tmpdir(), 'streaming-llm-client-build-'))
  try {
    execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.json'), '--outDir', out], { stdio: 'pipe' })
    const fresh = readFileSync(join(out, 'index.js'), 'utf8')
    assert.ok(fresh.includes('export async function streamChat('))
    assert.equal(readFileSync(VENDORED, 'utf8'), fresh, `${VENDORED} is stale: run "npm run sync-web" in clients/ts and commit it`)
    assert.equal(readFileSync(BUILT, 'utf8'), fresh, 'dist/ is stale: run npm run build')
  } finally {
    rmSync(out, { recursive: true, force: true })
  }
})

test('every vendored third-party file is the pinned package\'s own, with its licence', () => {
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
  for (const name of ['marked', 'dompurify', '@highlightjs/cdn-assets', 'swagger-ui-dist']) {
    assert.match(pkg.devDependencies[name], /^\d+\.\d+\.\d+$/, `${name} must be pinned exactly`)
  }
  const files = vendorFiles()
  assert.ok(files.some(([, target]) => target.endsWith('LICENSE.dompurify.txt')))
  for (const [source, target, text] of files) {
    if (source === BUILT) continue
    assert.equal(readFileSync(target, 'utf8'), text ?? readFileSync(source, 'utf8'), `${target} is stale: npm run sync-web`)
  }
})
