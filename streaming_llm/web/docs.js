// @ts-check
// `/docs`: the OpenAPI document of this server (/openapi.json) through the vendored swagger-ui.
// On a server with API keys, the chat page's key (kept for the tab in sessionStorage) is sent
// with the document request and with every "Try it out" call; "Authorize" takes another.
const KEY_STORAGE = 'streaming-llm.apiKey'
const base = new URL('.', location.href).href.replace(/\/+$/, '')

/** @returns {string | null} */
function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE)
  } catch {
    return null
  }
}

/** @param {{ headers: Record<string, string> }} request */
function withKey(request) {
  const key = storedKey()
  if (key && !request.headers.Authorization) request.headers.Authorization = `Bearer ${key}`
  return request
}

async function main() {
  const key = storedKey()
  const response = await fetch(`${base}/openapi.json`, { headers: key ? { authorization: `Bearer ${key}` } : {} })
  if (!response.ok) {
    const error = /** @type {HTMLElement} */ (document.getElementById('docs-error'))
    error.hidden = false
    error.textContent = response.status === 401
      ? 'This server needs an API key: enter it on the chat page (/), then come back here.'
      : `Could not load /openapi.json (HTTP ${response.status}).`
    return
  }
  const spec = await response.json()
  // @ts-expect-error: SwaggerUIBundle is the vendored bundle's global
  window.ui = SwaggerUIBundle({ spec, dom_id: '#swagger-ui', requestInterceptor: withKey, deepLinking: true })
  document.body.dataset.ready = 'true'
}

main().catch((err) => {
  const error = /** @type {HTMLElement} */ (document.getElementById('docs-error'))
  error.hidden = false
  error.textContent = `Could not show the API description: ${err instanceof Error ? err.message : err}`
})
