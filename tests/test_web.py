"""The reference web page: served at ``/`` with its static files, talking only through the client.

The page itself is exercised in a real browser by ``clients/ts/test/browser.test.mjs``; these
tests check what the Python package ships and serves.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from starlette.testclient import TestClient

from streaming_llm.app import create_app
from streaming_llm.http.headers import API_POLICY, DOCS_POLICY, page_policy
from streaming_llm.settings import Settings

WEB = Path(__file__).resolve().parents[1] / "streaming_llm" / "web"


def test_index_is_served_without_caching(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.headers["cache-control"] == "no-cache"
    assert '<script type="module" src="static/app.js"></script>' in resp.text


def test_every_file_the_pages_reference_is_served(client: TestClient) -> None:
    html = client.get("/").text
    refs = re.findall(r'(?:src|href)="(static/[^"]+)"', html)
    assert sorted(refs) == ["static/app.js", "static/style.css",
                            "static/vendor/highlight-github.min.css"]
    app_js = client.get("/static/app.js")
    imports = re.findall(r"from '(\./[^']+)'", app_js.text)
    assert imports == ["./vendor/streaming-llm-client.js", "./vendor/marked.esm.js",
                       "./vendor/purify.es.mjs", "./vendor/highlight.min.js"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    docs_refs = re.findall(r'(?:src|href)="(static/[^"]+)"', docs.text)
    assert sorted(docs_refs) == ["static/docs.js", "static/vendor/swagger-ui-bundle.js",
                                 "static/vendor/swagger-ui.css"]
    for path in {*refs, *docs_refs, *(f"static/{i.removeprefix('./')}" for i in imports)}:
        resp = client.get(f"/{path}")
        assert resp.status_code == 200, path
        assert resp.headers["cache-control"] == "no-cache"
        assert resp.content == (WEB / path.removeprefix("static/")).read_bytes()
        kind = "text/css" if path.endswith(".css") else "text/javascript"
        assert resp.headers["content-type"].startswith(kind), (path, resp.headers["content-type"])


def test_vendored_files_ship_in_the_package_with_their_licences() -> None:
    import tomllib

    data = tomllib.loads((WEB.parents[1] / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["streaming_llm"]
    vendor = WEB / "vendor"
    served = {f.name for f in vendor.iterdir()
              if not f.name.endswith((".d.ts", ".d.mts"))}  # type declarations: not served
    shipped = {f.name for pattern in patterns if pattern.startswith("web/vendor/")
               for f in vendor.glob(pattern.removeprefix("web/vendor/"))}
    assert served <= shipped, served - shipped
    for licence in ("LICENSE.marked.txt", "LICENSE.dompurify.txt", "LICENSE.highlight.js.txt",
                    "LICENSE.swagger-ui.txt"):
        assert licence in shipped


def test_missing_static_file_is_a_json_404(client: TestClient) -> None:
    resp = client.get("/static/missing.js")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"
    assert client.get("/static/../app.py").status_code == 404


def test_page_speaks_to_the_server_only_through_the_client_package() -> None:
    app_js = (WEB / "app.js").read_text()
    vendored = (WEB / "vendor" / "streaming-llm-client.js").read_text()
    # No second copy of the protocol: no raw fetch, sockets or wire field names in the page.
    for needle in ("fetch(", "WebSocket(", "request_id", "max_new_tokens"):
        assert needle not in app_js, needle
    (names,) = re.findall(r"import \{([^}]*)\} from '\./vendor/streaming-llm-client\.js'", app_js)
    exported = set(re.findall(r"^export (?:async )?(?:function|class|const) (\w+)", vendored,
                              re.MULTILINE))
    imported = {n.strip() for n in names.split(",") if n.strip()}
    assert imported and imported <= exported, imported - exported


def test_security_headers_on_the_page_the_docs_the_api_and_refusals(
        client: TestClient) -> None:
    page = client.get("/")
    policy = page.headers["content-security-policy"]
    assert policy == page_policy(False)
    for directive in ("default-src 'none'", "script-src 'self';", "style-src 'self';",
                      "img-src 'self' data:;", "connect-src 'self';", "frame-ancestors 'none'"):
        assert directive in policy, directive
    assert "unsafe" not in policy and "https:" not in policy
    assert '<meta name="streaming-llm-remote-images" content="off">' in page.text
    assert client.get("/docs").headers["content-security-policy"] == DOCS_POLICY
    assert "'unsafe-eval'" not in DOCS_POLICY
    refused = client.get("/agents", headers={"host": "evil.example"})  # the host guard's 400
    assert refused.status_code == 400
    for resp in (page, client.get("/docs"), client.get("/static/app.js"), client.get("/agents"),
                 client.get("/nowhere"), refused):
        assert resp.headers["x-frame-options"] == "DENY", resp.url
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in resp.headers["content-security-policy"]
    assert client.get("/agents").headers["content-security-policy"] == API_POLICY


def test_remote_images_setting_reaches_the_page_and_its_policy(
        make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(page_remote_images=True), )) as c:
        page = c.get("/")
    assert "img-src 'self' data: https:;" in page.headers["content-security-policy"]
    assert '<meta name="streaming-llm-remote-images" content="click">' in page.text


def test_the_pages_need_nothing_their_policy_refuses() -> None:
    """No inline script, style or handler in the HTML, no eval or style attribute written by
    the page's own scripts: all of it would be refused by the pages' Content-Security-Policy."""
    for page in ("index.html", "docs.html"):
        html = (WEB / page).read_text()
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == [], page  # inline scripts
        assert "<style" not in html and not re.search(r"\sstyle=", html), page
        assert not re.search(r"\son[a-z]+=", html), page
    for script in ("app.js", "docs.js"):
        code = (WEB / script).read_text()
        assert not re.search(r"\beval\(|new Function\(|setAttribute\('style'|\.innerHTML = (?!DOMPurify)",
                             code), script
