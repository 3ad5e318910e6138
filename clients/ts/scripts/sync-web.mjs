// Copy the built client (dist/index.js) to where the server's web page loads it from.
// `node scripts/sync-web.mjs --check` only compares, and exits 1 when the copy is stale.
import { copyFileSync, readFileSync } from 'node:fs'
import { dirname, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
export const BUILT = resolve(here, '../dist/index.js')
export const VENDORED = resolve(here, '../../../streaming_llm/web/vendor/streaming-llm-client.js')

if (process.argv.includes('--check')) {
  const same = readFileSync(BUILT, 'utf8') === readFileSync(VENDORED, 'utf8')
  console.log(same ? `${relative(process.cwd(), VENDORED)} is up to date` : `${relative(process.cwd(), VENDORED)} is stale: run make client`)
  process.exit(same ? 0 : 1)
} else {
  copyFileSync(BUILT, VENDORED)
  console.log(`copied ${relative(process.cwd(), BUILT)} -> ${relative(process.cwd(), VENDORED)}`)
}
