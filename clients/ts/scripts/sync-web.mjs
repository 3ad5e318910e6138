// Copy what the server's pages load into streaming_llm/web/vendor/, committed so the server
// needs no Node.js and no CDN:
//   - the built client (dist/index.js) as streaming-llm-client.js;
//   - the pinned browser builds of marked, DOMPurify, highlight.js (the chat page's Markdown) and
//     swagger-ui (the /docs page), straight from node_modules, each with its licence.
// The versions are the exact ones in package.json (devDependencies, pinned): to upgrade one,
// `npm install --save-exact <name>@<version>`, then `npm run sync-web` and commit.
// `node scripts/sync-web.mjs --check` only compares, and exits 1 when a copy is stale.
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, relative, resolve } from 'node:path'
import { fileURLToPath } from 'node:url'

const here = dirname(fileURLToPath(import.meta.url))
const modules = resolve(here, '../node_modules')
export const BUILT = resolve(here, '../dist/index.js')
export const VENDOR_DIR = resolve(here, '../../../streaming_llm/web/vendor')
export const VENDORED = resolve(VENDOR_DIR, 'streaming-llm-client.js')

/** [package, file inside it, name under vendor/] */
const THIRD_PARTY = [
  ['marked', 'lib/marked.esm.js', 'marked.esm.js'],
  ['marked', 'lib/marked.d.ts', 'marked.esm.d.ts'],
  ['marked', 'LICENSE', 'LICENSE.marked.txt'],
  ['dompurify', 'dist/purify.es.mjs', 'purify.es.mjs'],
  ['dompurify', 'dist/purify.es.d.mts', 'purify.es.d.mts'],
  ['dompurify', 'LICENSE', 'LICENSE.dompurify.txt'],
  ['@highlightjs/cdn-assets', 'es/highlight.min.js', 'highlight.min.js'],
  ['@highlightjs/cdn-assets', 'styles/github.min.css', 'highlight-github.min.css'],
  ['@highlightjs/cdn-assets', 'LICENSE', 'LICENSE.highlight.js.txt'],
  ['swagger-ui-dist', 'swagger-ui-bundle.js', 'swagger-ui-bundle.js'],
  ['swagger-ui-dist', 'swagger-ui.css', 'swagger-ui.css'],
  ['swagger-ui-dist', 'LICENSE', 'LICENSE.swagger-ui.txt'],
  ['swagger-ui-dist', 'NOTICE', 'NOTICE.swagger-ui.txt'],
]

function version(name) {
  return JSON.parse(readFileSync(resolve(modules, name, 'package.json'), 'utf8')).version
}

function manifest() {
  const lines = [
    '# Vendored browser files',
    '',
    'Copied by `clients/ts/scripts/sync-web.mjs` (`npm run sync-web`); do not edit by hand.',
    '`npm test` in clients/ts fails when a copy differs from its source. The `.d.ts` / `.d.mts`',
    'files are type declarations the page script is checked against (`npm run typecheck`).',
    '',
    '| file | from | version | licence |',
    '|---|---|---|---|',
    '| streaming-llm-client.js | clients/ts (tsc build) | this repository | MIT |',
  ]
  for (const [name, file, as] of THIRD_PARTY) {
    if (as.startsWith('LICENSE') || as.startsWith('NOTICE') || /\.d\.m?ts$/.test(as)) continue
    const licence = THIRD_PARTY.filter(([n, , a]) => n === name && /^(LICENSE|NOTICE)/.test(a)).map(([, , a]) => a)
    lines.push(`| ${as} | npm ${name} (${file}) | ${version(name)} | ${licence.join(', ')} |`)
  }
  return lines.join('\n') + '\n'
}

/** Every vendored file: [source path or null for generated, destination, generated text]. */
export function vendorFiles() {
  return [
    [BUILT, VENDORED, null],
    [BUILT.replace(/\.js$/, '.d.ts'), VENDORED.replace(/\.js$/, '.d.ts'), null],
    ...THIRD_PARTY.map(([name, file, as]) => [resolve(modules, name, file), resolve(VENDOR_DIR, as), null]),
    [null, resolve(VENDOR_DIR, 'README.md'), manifest()],
  ]
}

function main(check) {
  let stale = 0
  for (const [source, target, text] of vendorFiles()) {
    const wanted = text ?? readFileSync(source, 'utf8')
    const shown = relative(process.cwd(), target)
    if (check) {
      let have = null
      try {
        have = readFileSync(target, 'utf8')
      } catch {
        // missing
      }
      if (have !== wanted) {
        stale += 1
        console.log(`${shown} is stale: run "npm run sync-web" in clients/ts and commit it`)
      }
    } else if (text !== null) {
      writeFileSync(target, text)
      console.log(`wrote ${shown}`)
    } else {
      copyFileSync(source, target)
      console.log(`copied ${relative(process.cwd(), source)} -> ${shown}`)
    }
  }
  if (check && stale === 0) console.log('streaming_llm/web/vendor is up to date')
  return stale === 0 ? 0 : 1
}

if (process.argv[1] === fileURLToPath(import.meta.url)) process.exitCode = main(process.argv.includes('--check'))
