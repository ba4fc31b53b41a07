"""API keys, CORS, request body limits, request ids in logs, and names that
cannot escape the data directory: the real app with keys configured.

The `../name` upload case is in tests/api/test_files.py
(test_bad_files_get_per_file_errors_and_the_rest_is_ingested); here absolute
and backslash names, nested `../`, and ids and collection names shaped like
paths.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.api.security import Access, required_access
from app.observability import build_log_handler
from tests.conftest import RunningApp, make_settings

pytestmark = pytest.mark.slow

RW_KEY = "rw-" + uuid.uuid4().hex
RO_KEY = "ro-" + uuid.uuid4().hex
ALLOWED_ORIGIN = "https://search.example.org"
MAX_REQUEST = 4096
MAX_UPLOAD = 16384
RW = {"Authorization": f"Bearer {RW_KEY}"}
RO = {"Authorization": f"Bearer {RO_KEY}"}


@pytest.fixture(scope="module")
async def secured(tmp_path_factory, checkpoint_dir):
    settings = make_settings(
        tmp_path_factory.mktemp("secured") / "data",
        checkpoint_dir,
        exact_search_max_passages=16,
        api_keys=RW_KEY,  # a plain string, as the environment variable gives it
        read_only_api_keys=[RO_KEY],
        cors_origins=[ALLOWED_ORIGIN],
        max_request_bytes=MAX_REQUEST,
        max_upload_bytes=MAX_UPLOAD,
        log_format="json",
        answer_preload=False,
    )
    settings.log_level = "INFO"  # the access log lines (make_settings sets WARNING)
    running = RunningApp(settings)
    await running.start()
    r = await running.client.post("/v1/collections", json={"name": "kept"}, headers=RW)
    assert r.status_code == 201, r.text
    r = await running.client.post(
        "/v1/collections/kept/documents",
        json={"documents": [{"id": "tea", "text": "Green tea is made from the leaves of Camellia sinensis."}]},
        headers=RW,
    )
    assert r.status_code == 200, r.text
    yield running
    await running.stop()


@pytest.fixture
def log_lines():
    """JSON log lines of the app's own format, captured from the root logger."""
    buffer = io.StringIO()
    handler = build_log_handler(make_settings(Path("."), Path("."), log_format="json"), buffer)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    finally:
        root.removeHandler(handler)


def assert_error(r, status: int, code: str | None = None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body


def test_required_access_by_method_and_path():
    assert required_access("GET", "/v1/collections/a/documents/x") is Access.READ
    assert required_access("POST", "/v1/collections/a/search") is Access.READ
    assert required_access("POST", "/v1/collections/a/answer") is Access.READ
    assert required_access("POST", "/v1/rerank") is Access.READ
    assert required_access("POST", "/api/search") is Access.READ
    assert required_access("POST", "/v1/collections/a/documents") is Access.WRITE
    assert required_access("POST", "/v1/collections/a/files") is Access.WRITE
    assert required_access("POST", "/v1/collections") is Access.WRITE
    assert required_access("DELETE", "/v1/collections/a/documents/search") is Access.WRITE
    assert required_access("POST", "/v1/collections/a/search/more") is Access.WRITE  # a future route: write
    assert required_access("PUT", "/v1/collections/a/search") is Access.WRITE


async def test_probes_page_and_docs_need_no_key(secured):
    client = secured.client
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/ready")).status_code == 200
    assert (await client.get("/")).status_code == 200
    assert (await client.get("/ui/app.js")).status_code == 200
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "security" not in spec["paths"]["/v1/collections/{collection}/search"]["post"]  # inherits the global one


async def test_missing_or_wrong_key_gets_401(secured):
    client = secured.client
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {RW_KEY}"}, {"Authorization": ""}):
        r = await client.get("/v1/collections", headers=headers)
        assert_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert_error(await client.get("/metrics"), 401)
    assert_error(await client.get("/v1/jobs/nope"), 401)
    assert_error(await client.get("/no/such/route"), 401)  # unknown paths reveal nothing either
    r = await client.post("/v1/collections/kept/documents", json={"documents": [{"id": "x", "text": "y"}]})
    assert_error(r, 401)
    r = await client.post("/v1/collections/kept/search", json={"query": "tea"}, headers={"Authorization": RO_KEY})
    assert_error(r, 401)  # the key without the Bearer scheme
    assert (await client.get("/v1/collections", headers=RW)).status_code == 200
    r = await client.get("/metrics", headers=RO)
    assert r.status_code == 200
    # Refused before routing, still counted under the route template.
    refused = [
        s.labels
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
        if s.name == "colbert_http_requests_total" and s.labels["status"] == "401"
    ]
    assert {"method": "GET", "route": "/v1/collections", "status": "401"} in refused
    assert {"method": "POST", "route": "/v1/collections/{collection}/documents", "status": "401"} in refused


async def test_read_only_key_reads_and_searches_but_cannot_write(secured):
    client = secured.client
    r = await client.post("/v1/collections/kept/search", json={"query": "green tea leaves", "k": 1}, headers=RO)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["document_id"] == "tea"
    r = await client.get("/api/search", params={"query": "tea", "k": 1, "collection": "kept"}, headers=RO)
    assert r.status_code == 200 and r.json()["topk"]
    r = await client.post("/v1/rerank", json={"query": "tea", "documents": ["tea leaves", "volcano"]}, headers=RO)
    assert r.status_code == 200
    assert (await client.get("/v1/collections/kept/documents/tea", headers=RO)).status_code == 200

    writes = [
        client.post(
            "/v1/collections/kept/documents", json={"documents": [{"id": "ro", "text": "must not land"}]}, headers=RO
        ),
        client.delete("/v1/collections/kept/documents/tea", headers=RO),
        client.delete("/v1/collections/kept", headers=RO),
        client.post("/v1/collections", json={"name": "ro-made"}, headers=RO),
        client.post("/v1/collections/kept/files", files=[("files", ("ro.txt", b"must not land"))], headers=RO),
    ]
    for r in await asyncio.gather(*writes):
        assert_error(r, 403, "forbidden")
    docs = (await client.get("/v1/collections/kept/documents", headers=RO)).json()
    assert [d["id"] for d in docs["documents"]] == ["tea"]
    names = [c["name"] for c in (await client.get("/v1/collections", headers=RO)).json()["collections"]]
    assert "ro-made" not in names and "kept" in names
    r = await client.post(
        "/v1/collections/kept/search", json={"query": "green tea", "k": 1}, headers=RO
    )  # the document survived the refused delete
    assert r.json()["results"][0]["document_id"] == "tea"


async def test_cors_preflight_allowed_and_disallowed_origin(secured):
    client = secured.client
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = await client.options("/v1/collections/kept/search", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert r.status_code == 200, r.text  # no key needed: browsers send none on a preflight
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = await client.options("/v1/collections/kept/search", headers={"Origin": "https://evil.example", **preflight})
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers
    # Actual requests: allowed origin gets the header (on a 401 too, so the page can read it).
    r = await client.get("/v1/collections", headers={"Origin": ALLOWED_ORIGIN, **RO})
    assert r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = await client.get("/v1/collections", headers={"Origin": ALLOWED_ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    r = await client.get("/v1/collections", headers={"Origin": "https://evil.example", **RO})
    assert "access-control-allow-origin" not in r.headers


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


async def test_body_over_the_limit_gets_413_and_stores_nothing(secured):
    client = secured.client
    assert (await client.post("/v1/collections", json={"name": "limits"}, headers=RW)).status_code == 201
    big = {"documents": [{"id": "big", "text": "word " * MAX_REQUEST}]}
    r = await client.post("/v1/collections/limits/documents", json=big, headers=RW)
    assert_error(r, 413, "payload_too_large")
    # Chunked: no Content-Length, the body grows past the limit as it streams.
    body = json.dumps(big).encode()
    parts = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    r = await client.post(
        "/v1/collections/limits/documents",
        content=_chunks(*parts),
        headers={**RW, "Content-Type": "application/json"},
    )
    assert "content-length" not in r.request.headers
    assert_error(r, 413, "payload_too_large")
    # Uploads have their own limit: over it, refused; under it (but over the JSON limit), accepted.
    r = await client.post(
        "/v1/collections/limits/files", files=[("files", ("big.txt", b"x " * MAX_UPLOAD))], headers=RW
    )
    assert_error(r, 413, "payload_too_large")
    boundary = "b" + uuid.uuid4().hex
    multipart = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.txt"\r\n'
        f"Content-Type: text/plain\r\n\r\n".encode()
        + b"x " * MAX_UPLOAD
        + f"\r\n--{boundary}--\r\n".encode()
    )
    r = await client.post(
        "/v1/collections/limits/files",
        content=_chunks(*[multipart[i : i + 4096] for i in range(0, len(multipart), 4096)]),
        headers={**RW, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert_error(r, 413, "payload_too_large")
    info = (await client.get("/v1/collections/limits", headers=RW)).json()
    assert info["documents"] == 0 and info["pending_documents"] == 0
    # Under the upload limit but over the JSON one: accepted.
    text = b"Moss grows on the north side of trees in damp forests. " * 100
    assert MAX_REQUEST < len(text) < MAX_UPLOAD
    r = await client.post("/v1/collections/limits/files", files=[("files", ("moss.txt", text))], headers=RW)
    assert r.status_code == 202, r.text
    # The upload limit belongs to the files route: declaring multipart elsewhere buys nothing.
    r = await client.post("/v1/collections/limits/documents", files=[("files", ("moss.txt", text))], headers=RW)
    assert_error(r, 413, "payload_too_large")
    # Without a key, an oversized body is refused for the key first, unread.
    assert_error(await client.post("/v1/collections/limits/documents", json=big), 401)


async def test_request_id_is_echoed_and_on_the_log_lines(secured, log_lines):
    client = secured.client
    r = await client.post(
        "/v1/collections/kept/search", json={"query": "tea", "k": 1}, headers={**RO, "X-Request-ID": "req-42.a:b"}
    )
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "req-42.a:b"
    r = await client.get("/v1/collections/nope", headers={**RO, "X-Request-ID": "not sane " + "x" * 200})
    generated = r.headers["X-Request-ID"]
    assert r.status_code == 404 and generated != "" and " " not in generated
    r = await client.get("/v1/collections", headers={"X-Request-ID": "no-key-1"})
    assert r.status_code == 401 and r.headers["X-Request-ID"] == "no-key-1"

    lines = log_lines()
    access = [line for line in lines if line.get("logger") == "app.access"]
    ours = [line for line in access if line["request_id"] == "req-42.a:b"]
    assert len(ours) == 1, access
    assert ours[0]["route"] == "/v1/collections/{collection}/search"
    assert ours[0]["method"] == "POST" and ours[0]["status"] == 200 and ours[0]["duration_ms"] > 0
    assert {"time", "level", "message"} <= set(ours[0])
    assert any(line["request_id"] == generated and line["status"] == 404 for line in access)
    assert any(line["request_id"] == "no-key-1" and line["status"] == 401 for line in access)
    text = "\n".join(json.dumps(line) for line in lines)
    assert RW_KEY not in text and RO_KEY not in text
    assert RW_KEY not in repr(secured.settings) and RO_KEY not in str(secured.settings.model_dump())


async def test_names_never_escape_the_data_directory(secured, tmp_path):
    client = secured.client
    data_dir = secured.settings.data_dir
    marker = uuid.uuid4().hex
    outside = tmp_path / f"abs-{marker}.txt"
    names = [
        str(outside),  # absolute
        f"../../../{marker}-up.txt",
        f"..\\..\\{marker}-win.txt",
        f"sub/../../{marker}-nested.txt",
    ]
    r = await client.post(
        "/v1/collections/kept/files",
        files=[("files", (name, b"Escaping text that must stay in SQLite.")) for name in names],
        headers=RW,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for _ in range(300):
        job = (await client.get(f"/v1/jobs/{job_id}", headers=RW)).json()
        if job["state"] in ("done", "failed"):
            break
        await asyncio.sleep(0.1)
    assert job["state"] == "failed", job
    assert all(f["state"] == "failed" and f["error"] for f in job["files"]), job["files"]
    # Ids and collection names shaped like paths: ids live in SQLite only, names are refused.
    r = await client.post(
        "/v1/collections/kept/documents",
        json={"documents": [{"id": f"../../{marker}-id", "text": "An id shaped like a path."}]},
        headers=RW,
    )
    assert r.status_code == 200, r.text
    r = await client.get(f"/v1/collections/kept/documents/{quote(f'../../{marker}-id', safe='')}", headers=RW)
    assert r.status_code == 200 and r.json()["id"] == f"../../{marker}-id"
    for name in ("../escape", "..", "a/b", "/abs"):
        r = await client.post("/v1/collections", json={"name": name}, headers=RW)
        assert_error(r, 422)
    assert not outside.exists()
    assert not [p for p in data_dir.parent.parent.rglob(f"*{marker}*")]  # the whole pytest temp tree
    for folder in (Path.cwd(), *Path.cwd().parents[:2], data_dir.parent):
        assert not [p for p in folder.glob(f"*{marker}*")], f"a file escaped into {folder}"
    assert not [p for p in data_dir.rglob(f"*{marker}*")]  # not even inside: files stay in SQLite


async def test_a_state_changing_request_from_a_foreign_site_is_refused(secured):
    client = secured.client
    evil = {"Origin": "https://evil.example", **RW}
    r = await client.post("/v1/collections", json={"name": "csrf"}, headers=evil)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    files = [("files", ("a.txt", b"planted text", "text/plain"))]
    r = await client.post("/v1/collections/kept/files", files=files, headers={"Origin": "null", **RW})
    assert r.status_code == 403  # sandboxed frames and file:// pages send "null"
    r = await client.delete("/v1/collections/kept", headers=evil)
    assert r.status_code == 403
    assert (await client.get("/v1/collections/kept", headers=RO)).status_code == 200  # nothing changed
    # Reads are CORS's business; the allowed origin, this server's own page and non-browser clients may write.
    assert (await client.get("/v1/collections", headers={"Origin": "https://evil.example", **RO})).status_code == 200
    behind_a_proxy = {"Origin": "https://search.example", "X-Forwarded-Host": "search.example", **RW}
    for headers in ({"Origin": ALLOWED_ORIGIN, **RW}, {"Origin": "http://localhost", **RW}, behind_a_proxy, RW):
        r = await client.post("/v1/collections/kept/search", json={"query": "x"}, headers=headers)
        assert r.status_code == 200, (headers, r.text)


async def test_a_host_this_server_was_not_told_to_answer_to_gets_400(secured):
    client = secured.client
    # A page on evil.example whose name now resolves to 127.0.0.1 (DNS
    # rebinding) calls the API "same-origin": its Host header gives it away.
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
        r = await client.get("/v1/collections", headers={"Host": host, **RO})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
        r = await client.post("/v1/collections", json={"name": "rebound"}, headers={"Host": host, **RW})
        assert r.status_code == 400, host
    assert (await client.get("/v1/collections/rebound", headers=RO)).status_code == 404
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST"):
        assert (await client.get("/v1/collections", headers={"Host": host, **RO})).status_code == 200, host
    for probe in ("/health", "/ready"):  # a platform's probes come by address
        assert (await client.get(probe, headers={"Host": "10.1.2.3:8000"})).status_code == 200


def test_allowed_hosts_take_names_wildcard_domains_and_any():
    from app.api.middleware import TrustedHostMiddleware, host_name

    assert (
        host_name("[::1]:8000") == "::1" and host_name("Example.org:80") == "example.org" and host_name("::1") == "::1"
    )
    check = TrustedHostMiddleware(None, ["search.example.org", "*.corp.example", "[::1]"])
    assert check.allowed("search.example.org:443") and check.allowed("a.b.corp.example") and check.allowed("[::1]")
    assert not check.allowed("corp.example") and not check.allowed("evilcorp.example") and not check.allowed("x")
    assert TrustedHostMiddleware(None, ["*"]).any_host
    from app.api.security import app_path

    assert app_path({"path": "/search-api/health", "root_path": "/search-api"}) == "/health"
    assert app_path({"path": "/v1/rerank", "root_path": ""}) == "/v1/rerank"


async def test_search_answer_and_rerank_bodies_have_the_small_limit(tmp_path, checkpoint_dir):
    running = RunningApp(make_settings(tmp_path / "data", checkpoint_dir, max_query_bytes=2048, answer_preload=False))
    await running.start()
    try:
        client = running.client
        assert (await client.post("/v1/collections", json={"name": "small"})).status_code == 201
        text = "words " * 1000  # 6,000 bytes: over the query limit, well under the request limit
        r = await client.post("/v1/collections/small/documents", json={"documents": [{"id": "a", "text": text}]})
        assert r.status_code == 200, r.text
        for path, body in (
            ("/v1/collections/small/search", {"query": text}),
            ("/v1/collections/small/answer", {"question": text}),
            ("/v1/rerank", {"query": "words", "documents": [text]}),
        ):
            r = await client.post(path, json=body)
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", path
        assert (await client.post("/v1/collections/small/search", json={"query": "words"})).status_code == 200
    finally:
        await running.stop()


async def test_each_kind_of_expensive_route_has_a_bound_and_says_when_to_retry():
    from app.api.middleware import ConcurrencyLimitMiddleware

    release = asyncio.Event()
    started = 0

    async def slow_route(scope, receive, send):
        nonlocal started
        started += 1
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    limited = ConcurrencyLimitMiddleware(slow_route, searches=2, answers=1, writes=1)
    sent: list[dict] = []

    async def call(method, path):
        out: list[dict] = []

        async def send(message):
            out.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": []}
        await limited(scope, None, send)
        sent.append({"path": path, "status": out[0]["status"], "headers": dict(out[0]["headers"])})

    held = [
        asyncio.create_task(call("POST", "/v1/collections/a/search")),
        asyncio.create_task(call("POST", "/v1/rerank")),
        asyncio.create_task(call("POST", "/v1/collections/a/answer")),
        asyncio.create_task(call("POST", "/v1/collections/a/documents")),
    ]
    while started < 4:
        await asyncio.sleep(0.01)
    for method, path in (
        ("GET", "/api/search"),
        ("POST", "/v1/collections/b/answer"),
        ("DELETE", "/v1/collections/a/documents/x"),
    ):
        await call(method, path)
    refused = sent[-3:]
    assert [r["status"] for r in refused] == [503, 503, 503]
    assert all(r["headers"][b"retry-after"] == b"1" for r in refused)
    held.append(asyncio.create_task(call("GET", "/v1/collections/a/documents")))  # cheap reads have no bound
    while started < 5:
        await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(*held)
    assert [r["status"] for r in sent[-5:]] == [200] * 5
    assert limited.in_progress == {"search": 0, "answer": 0, "write": 0}
    await call("POST", "/v1/collections/a/search")  # places are given back
    assert sent[-1]["status"] == 200


async def test_pages_carry_a_content_security_policy_and_the_docs_load_nothing_from_elsewhere(secured):
    import base64
    import hashlib
    import re

    client = secured.client
    page = await client.get("/")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for path in ("/docs", "/redoc"):
        r = await client.get(path)
        assert r.status_code == 200
        assert not re.findall(r"(?:src|href)=[\"']?(?:https?:)?//", r.text), f"{path} loads from another site"
        for asset in re.findall(r"/docs-assets/[\w.-]+", r.text):
            assert (await client.get(asset)).status_code == 200, asset  # no key needed: they hold no data
        inline = re.findall(r"<script>(.*?)</script>", r.text, re.S)
        policy = r.headers["content-security-policy"]
        for script in inline:
            digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in policy
        assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0]


def test_serving_a_public_address_without_keys_warns_once(caplog):
    from app.api.middleware import OpenBindWarningMiddleware

    async def ok(scope, receive, send):
        return None

    warn = OpenBindWarningMiddleware(ok)
    with caplog.at_level(logging.WARNING, logger="app.api"):
        for server in (("127.0.0.1", 8000), ("::1", 8000), ("10.1.2.3", 8000), ("10.1.2.3", 8000)):
            asyncio.run(warn({"type": "http", "server": server}, None, None))
    warnings = [r for r in caplog.records if "without API keys" in r.getMessage()]
    assert len(warnings) == 1 and "10.1.2.3" in warnings[0].getMessage()
