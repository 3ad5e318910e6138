// Copy the built client (dist/index.js) to where the server's web page loads it from:
// streaming_llm/web/vendor/streaming-llm-client.js, committed so the server needs no Node.js.
// `node scripts/sync-web.mjs --check` only compares, and exits 1 when the copy is stale.
import { copyFileSync, readFileSync } from 'node:fs'
import { dirname, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
export const BUILT = resolve(here, '../dist/index.js')
export const VENDORED = resolve(here, '../../../streaming_llm/web/vendor/streaming-llm-client.js')

function main(check) {
  const shown = relative(process.cwd(), VENDORED)
  if (check) {
    const same = readFileSync(BUILT, 'utf8') === readFileSync(VENDORED, 'utf8')
    console.log(same ? `${shown} is up to date` : `${shown} is stale: run "npm run sync-web" in clients/ts and commit it`)
    return same ? 0 : 1
  }
  copyFileSync(BUILT, VENDORED)
  console.log(`copied ${relative(process.cwd(), BUILT)} -> ${shown}`)
  return 0
}

if (process.argv[1] === fileURLToPath(import.meta.url)) process.exitCode = main(process.argv.includes('--check'))
