"""The web page at ``/`` in real headless Chromium (Debian's chromium + chromium-driver).

One test drives the real server process: create a collection, upload files
through the file input, watch the job finish, search, open a document. The
answer UI is tested against ``FakeAnswerServer``, a tiny stand-in that serves
the same page and streams a scripted answer, so the test does not wait for the
real LM to load.

On failure a screenshot, the page source and the browser console land in
``test-output/`` at the repository root; the paths are printed and attached to
the error. Without chromium the tests skip, except in CI (``CI`` set), where
they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from app.api.routes.web import install_web
from tests.conftest import ROOT, ServerProcess, free_port

OUTPUT_DIR = ROOT / "test-output"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def require_browser() -> None:
    """Skip without chromium, except in CI, where the browser test must run."""
    if CHROMIUM and CHROMEDRIVER:
        return
    reason = "chromium and chromium-driver are not installed (scripts/setup-browser.sh installs them)"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser test")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    require_browser()
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1400",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver path is given, so selenium-manager never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@contextmanager
def artifacts_on_failure(driver, name: str, server_log: Path | None = None):
    """Keep a screenshot, the page source, the console (and the server log) of a failure."""
    try:
        yield
    except Exception as exc:
        OUTPUT_DIR.mkdir(exist_ok=True)
        saved = []
        try:
            shot = OUTPUT_DIR / f"{name}.png"
            driver.save_screenshot(str(shot))
            saved.append(shot)
            source = OUTPUT_DIR / f"{name}.html"
            source.write_text(driver.page_source)
            saved.append(source)
            console = OUTPUT_DIR / f"{name}.console.txt"
            console.write_text("\n".join(f"{e['level']} {e['message']}" for e in driver.get_log("browser")))
            saved.append(console)
        except Exception as save_error:  # the browser may be gone; the original error matters more
            print(f"could not save browser state: {save_error!r}")
        if server_log is not None and server_log.exists():
            copy = OUTPUT_DIR / f"{name}.server.log"
            shutil.copyfile(server_log, copy)
            saved.append(copy)
        note = "browser test artifacts: " + ", ".join(str(p) for p in saved)
        print(note)
        exc.add_note(note)
        raise


def wait_for(driver, condition, timeout: float = 30, what: str = ""):
    # The page re-renders lists while the test reads them: retry on stale elements.
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(condition, message=what)


def by_id(driver, element_id: str):
    return driver.find_element(By.ID, element_id)


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    wait_for(
        driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", what="page ready"
    )


def fill(driver, element_id: str, text: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(text)


def submit(driver, form_id: str) -> None:
    by_id(driver, form_id).find_element(By.CSS_SELECTOR, "button[type=submit]").click()


def shown_error(driver, element_id: str, timeout: float = 30) -> str:
    box = by_id(driver, element_id)
    wait_for(driver, lambda d: box.is_displayed() and box.text, timeout, f"#{element_id} shown")
    return box.text


def hits(driver, list_id: str) -> list[dict]:
    out = []
    for item in by_id(driver, list_id).find_elements(By.CSS_SELECTOR, "li.hit"):
        out.append(
            {
                "document_id": item.get_attribute("data-document-id"),
                "rank": item.find_element(By.CSS_SELECTOR, ".rank").text,
                "score": item.find_element(By.CSS_SELECTOR, ".score").text,
                "link": item.find_element(By.CSS_SELECTOR, "a.doc-link"),
                "where": " ".join(e.text for e in item.find_elements(By.CSS_SELECTOR, ".where")),
                "text": item.find_element(By.CSS_SELECTOR, ".hit-text").text,
            }
        )
    return out


# ---------------------------------------------------------------- the real server

LIGHTHOUSE = (
    "The keeper of the Skerryvore lighthouse climbs one hundred and fifty steps every evening "
    "to trim the wick and wind the clockwork that turns the great lens."
)
BAKERY = "The bakery on Rue Mouffetard proofs its sourdough overnight and sells the first loaves at six."


@pytest.mark.slow
def test_upload_watch_job_and_search_in_the_page(browser, tmp_path, checkpoint_dir):
    files = {
        "lighthouse.txt": LIGHTHOUSE + "\n\nStorms off the Hebrides can keep the relief boat away for weeks.",
        "bakery.txt": BAKERY + "\n\nQueues form early on Saturdays.",
        "empty.txt": "",
    }
    folder = tmp_path / "upload"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)

    # This test asks nothing: the answer LM need not load beside it.
    server = ServerProcess(tmp_path / "data", checkpoint_dir, {"COLBERT_SERVER_ANSWER_PRELOAD": "false"})
    try:
        with (
            artifacts_on_failure(browser, "test_upload_watch_job_and_search", Path(server.log.name)),
            httpx.Client(base_url=server.url, timeout=60) as api,
        ):
            server.wait_ready()
            open_page(browser, server.url)

            # An API error is shown with the API's own message.
            expected = api.post("/v1/collections", json={"name": "Not Valid!"}).json()["error"]["message"]
            fill(browser, "new-collection", "Not Valid!")
            submit(browser, "create-form")
            assert expected in shown_error(browser, "collections-error")

            fill(browser, "new-collection", "notes")
            submit(browser, "create-form")
            wait_for(
                browser, lambda d: Select(by_id(d, "collection")).first_selected_option.text == "notes", what="picked"
            )
            assert not by_id(browser, "collections-error").is_displayed()
            assert [c["name"] for c in api.get("/v1/collections").json()["collections"]] == ["notes"]

            # Upload through the file input and watch the job to its end.
            by_id(browser, "files").send_keys("\n".join(str(folder / name) for name in files))
            submit(browser, "upload-form")
            job_box = by_id(browser, "job")
            wait_for(browser, lambda d: job_box.get_attribute("data-state") in ("done", "failed"), 180, "job ends")
            job = api.get(f"/v1/jobs/{by_id(browser, 'job-id').text}").json()
            assert job["state"] == "done" == by_id(browser, "job-state").text
            assert by_id(browser, "job-files").text == f"{job['files_done']}/{job['files_total']}" == "3/3"
            assert by_id(browser, "job-chunks").text == f"{job['chunks_done']}/{job['chunks_total']}"
            rows = {}
            for row in by_id(browser, "job-table").find_elements(By.CSS_SELECTOR, "tbody tr"):
                cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
                rows[cells[0]] = cells
            assert set(rows) == set(files)
            for f in job["files"]:
                assert rows[f["filename"]] == [
                    f["filename"],
                    f["document_id"],
                    f["state"],
                    str(f["chunks"]),
                    f["error"] or "",
                ]
            assert rows["lighthouse.txt"][2] == "added" and int(rows["lighthouse.txt"][3]) >= 1
            assert rows["empty.txt"][2] == "failed" and rows["empty.txt"][4]
            wait_for(browser, lambda d: "2 documents" in by_id(d, "collection-info").text, what="counts refreshed")

            # Search: the page shows what the API returns, best first.
            searches = [
                ("colbert", "who climbs the lighthouse steps to wind the clockwork", "lighthouse.txt", LIGHTHOUSE),
                ("keyword", "sourdough loaves", "bakery.txt", BAKERY),
            ]
            for mode, query, top_document, top_text in searches:
                fill(browser, "query", query)
                Select(by_id(browser, "mode")).select_by_value(mode)
                fill(browser, "search-k", "2")
                submit(browser, "search-form")
                wait_for(browser, lambda d, m=mode: f"({m})" in by_id(d, "search-summary").text, what=f"{mode} results")
                body = {"query": query, "k": 2, "mode": mode}
                expected = api.post("/v1/collections/notes/search", json=body).json()["results"]
                shown = hits(browser, "results")
                assert [h["document_id"] for h in shown] == [r["document_id"] for r in expected]
                assert [h["text"] for h in shown] == [r["text"].strip() for r in expected]
                assert [h["rank"] for h in shown] == [f"#{r['rank']}" for r in expected]
                assert [h["score"] for h in shown] == [f"{r['score']:.3f}" for r in expected]
                assert shown[0]["document_id"] == top_document
                assert top_text in shown[0]["text"]

            # A result's link opens its document.
            fill(browser, "search-k", "1")
            submit(browser, "search-form")
            wait_for(browser, lambda d: len(hits(d, "results")) == 1, what="one result")
            hits(browser, "results")[0]["link"].click()
            dialog = by_id(browser, "document-dialog")
            wait_for(browser, lambda d: dialog.is_displayed() and by_id(d, "document-chunks").text, what="document")
            assert BAKERY in by_id(browser, "document-chunks").text
            dialog.find_element(By.CSS_SELECTOR, "button.close").click()
            wait_for(browser, lambda d: not dialog.is_displayed(), what="dialog closed")

            # An error from search shows the API's message: the collection is
            # deleted behind the page's back.
            assert api.delete("/v1/collections/notes").status_code == 204
            message = api.post("/v1/collections/notes/search", json={"query": query}).json()["error"]["message"]
            submit(browser, "search-form")
            assert message in shown_error(browser, "search-error")
            assert not hits(browser, "results")
    finally:
        server.stop()


# ---------------------------------------------------------------- answers, against a fake


class FakeAnswerServer:
    """A stand-in serving the real page plus a scripted ``/answer`` stream.

    It records each request's Authorization header and body, and holds the
    stream after the first tokens until ``release`` is set, so the test can
    see the answer grow while it streams.
    """

    COLLECTION = "handbook"
    DOCUMENT_ID = "policies/leave & holidays?.md"
    TOKENS = ["Staff get ", "<b>25</b> days ", "of leave."]

    def __init__(self):
        self.requests: list[dict] = []
        self.release = threading.Event()
        app = FastAPI()
        install_web(app)
        citation = {
            "document_id": self.DOCUMENT_ID,
            "chunk_id": 7,
            "title": "Leave policy",
            "text": "Every employee has 25 days of paid leave a year.",
            "score": 0.8123,
            "rank": 1,
            "metadata": {},
            "page": 2,
            "heading": "Annual leave",
        }
        check = {
            "score": 0.91,
            "label": "supported",
            "threshold": 0.5,
            "sentences": [{"text": "Staff get <b>25</b> days of leave.", "score": 0.91, "label": "supported"}],
        }
        full = {"answer": "".join(self.TOKENS), "citations": [citation], "hallucination": check, "model": "fake-lm"}

        def record(request: Request, body=None):
            self.requests.append({"path": request.url.path, "auth": request.headers.get("authorization"), "body": body})

        @app.get("/v1/collections")
        async def collections(request: Request):
            record(request)
            now = time.time()
            row = {"name": self.COLLECTION, "description": None, "created_at": now, "generation": 1}
            counts = {"documents": 1, "pending_documents": 0, "chunks": 1, "checkpoint": "policies-tuned-1"}
            reindex = {"state": "running", "checkpoint": None, "progress": 0.42, "error": None}
            return {"collections": [{**row, **counts, "reindex": reindex}]}

        @app.get("/v1/collections/{collection}/documents/{document_id:path}")
        async def document(collection: str, document_id: str, request: Request):
            record(request, document_id)
            chunk = {"chunk_id": 7, "chunk_index": 0, "text": citation["text"], "char_start": 0, "char_end": 48}
            now = time.time()
            return {
                "id": document_id,
                "title": "Leave policy",
                "metadata": {"team": "people"},
                "state": "live",
                "created_at": now,
                "updated_at": now,
                "chunks": [chunk],
            }

        @app.post("/v1/collections/{collection}/answer")
        async def answer(collection: str, request: Request):
            body = await request.json()
            record(request, body)
            if body["question"] == "bad":
                error = {"error": {"code": "invalid_input", "message": "question is too vague"}}
                return JSONResponse(error, status_code=422)

            async def events():
                def event(name, data):
                    return f"event: {name}\ndata: {json.dumps(data)}\n\n"

                if body["question"] == "fail":
                    yield event("token", {"text": "Half an"})
                    yield event("error", {"error": {"code": "lm_failed", "message": "the LM stopped"}})
                    return
                yield event("token", {"text": self.TOKENS[0]})
                yield event("token", {"text": self.TOKENS[1]})
                for _ in range(600):
                    if self.release.is_set():
                        break
                    await asyncio.sleep(0.05)
                yield event("token", {"text": self.TOKENS[2]})
                yield event("citations", [citation])
                yield event("hallucination", check)
                yield event("done", full)

            return StreamingResponse(events(), media_type="text/event-stream")

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeAnswerServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake answer server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.should_exit = True
        self.thread.join(30)


def test_answer_streams_with_citations_and_score_and_sends_the_api_key(browser):
    with FakeAnswerServer() as fake, artifacts_on_failure(browser, "test_answer_streams"):
        open_page(browser, fake.url)
        browser.execute_script("localStorage.clear()")
        open_page(browser, fake.url)
        wait_for(browser, lambda d: Select(by_id(d, "collection")).first_selected_option.text == fake.COLLECTION)
        assert fake.requests[-1]["auth"] is None
        before_key = len(fake.requests)
        # The collection's checkpoint and a re-index under way show beside its counts.
        info = by_id(browser, "collection-info").text
        assert "checkpoint policies-tuned-1" in info and "re-indexing with the configured checkpoint: 42%" in info

        # The key is kept in the browser and sent as a bearer token.
        fill(browser, "api-key", "secret-key-1")
        submit(browser, "key-form")
        open_page(browser, fake.url)
        assert by_id(browser, "api-key").get_attribute("value") == "secret-key-1"

        fill(browser, "question", "How many days of leave?")
        fill(browser, "answer-k", "3")
        submit(browser, "answer-form")
        text = by_id(browser, "answer-text")
        # The first tokens show while the stream is held open.
        streamed = "".join(fake.TOKENS[:2]).strip()
        wait_for(browser, lambda d: text.text.strip() == streamed, what="streamed tokens")
        assert by_id(browser, "answer-output").get_attribute("data-state") == "streaming"
        fake.release.set()
        wait_for(browser, lambda d: by_id(d, "answer-output").get_attribute("data-state") == "done", what="done")

        asked = [r for r in fake.requests if r["path"].endswith("/answer")][-1]
        assert asked["auth"] == "Bearer secret-key-1"
        assert asked["body"] == {"question": "How many days of leave?", "k": 3, "stream": True}
        assert all(r["auth"] == "Bearer secret-key-1" for r in fake.requests[before_key:])

        # Markup in the answer is shown as text, never parsed.
        assert text.text == "".join(fake.TOKENS)
        assert not text.find_elements(By.CSS_SELECTOR, "b")
        assert by_id(browser, "hallucination-label").text == "supported"
        assert by_id(browser, "hallucination-score").text == "0.910"
        assert by_id(browser, "hallucination-threshold").text == "0.500"
        assert "fake-lm" in by_id(browser, "answer-model").text
        assert "Staff get <b>25</b> days of leave." in by_id(browser, "sentences").text
        (cited,) = hits(browser, "citations")
        assert cited["document_id"] == fake.DOCUMENT_ID
        assert (cited["rank"], cited["score"]) == ("#1", "0.812")
        assert cited["link"].text == "Leave policy"
        assert cited["where"] == "page 2 · Annual leave"
        assert cited["text"] == "Every employee has 25 days of paid leave a year."

        # The citation links to its document; the id travels URL-encoded.
        href = cited["link"].get_attribute("href")
        assert re.search(r"/documents/policies%2Fleave%20%26%20holidays%3F\.md$", href), href
        cited["link"].click()
        wait_for(browser, lambda d: "25 days of paid leave" in by_id(d, "document-chunks").text, what="document")
        assert [r["body"] for r in fake.requests if "/documents/" in r["path"]] == [fake.DOCUMENT_ID]
        assert '"team": "people"' in by_id(browser, "document-metadata").text
        by_id(browser, "document-dialog").find_element(By.CSS_SELECTOR, "button.close").click()

        # A non-2xx answer and an error event both show their message.
        fill(browser, "question", "bad")
        submit(browser, "answer-form")
        assert "question is too vague" in shown_error(browser, "answer-error")
        fill(browser, "question", "fail")
        submit(browser, "answer-form")
        assert "the LM stopped" in shown_error(browser, "answer-error")
        assert by_id(browser, "answer-output").get_attribute("data-state") == "failed"


def test_a_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(f"{__name__}.CHROMIUM", None)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI must run the browser test"):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_browser()


# ---------------------------------------------------------------- documents with fields, on the fake encoder


class FakeEngineServer:
    """The real app (routes, store, writer, search) over the fake encoder and
    the in-memory backend, served by uvicorn on a thread: the page against
    the real API in seconds, without the model."""

    def __init__(self, data_dir: Path):
        from app.factory import create_app
        from app.service import SearchService
        from app.settings import Settings
        from tests.fakes import FakeEncoder, FakeInMemoryBackend

        settings = Settings(
            _env_file=None, environment="test", data_dir=data_dir, log_level="WARNING", answer_preload=False
        )
        service = SearchService(settings, encoder=FakeEncoder(), backend_factory=lambda s, e: FakeInMemoryBackend())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(settings, service=service)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeEngineServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the fake engine server did not become ready")
            time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def hit_fields(driver, list_id: str) -> list[tuple[str, str]]:
    """(document id, field badge) of each hit shown."""
    return [
        (item.get_attribute("data-document-id"), item.find_element(By.CSS_SELECTOR, ".field").text)
        for item in by_id(driver, list_id).find_elements(By.CSS_SELECTOR, "li.hit")
    ]


def test_a_document_with_fields_is_added_and_searched_by_field_in_the_page(browser, tmp_path):
    with (
        FakeEngineServer(tmp_path / "data") as server,
        artifacts_on_failure(browser, "test_fields_in_the_page"),
        httpx.Client(base_url=server.url, timeout=30) as api,
    ):
        assert api.post("/v1/collections", json={"name": "port"}).status_code == 201
        other = {"id": "ocean", "text": "Containers ship goods across the ocean."}
        assert api.post("/v1/collections/port/documents", json={"documents": [other]}).status_code == 200
        open_page(browser, server.url)
        browser.execute_script("localStorage.clear()")
        open_page(browser, server.url)
        wait_for(browser, lambda d: Select(by_id(d, "collection")).first_selected_option.text == "port")

        # A bad field name: the API's message, nothing added.
        fill(browser, "doc-text", "Nothing.")
        by_id(browser, "add-field").click()
        row = by_id(browser, "field-rows").find_elements(By.CSS_SELECTOR, ".field-row")[-1]
        row.find_element(By.CSS_SELECTOR, ".field-name").send_keys("Bad Name")
        row.find_element(By.CSS_SELECTOR, ".field-text").send_keys("x")
        submit(browser, "document-form")
        assert "Bad Name" in shown_error(browser, "add-error")
        row.find_element(By.CSS_SELECTOR, ".remove-field").click()
        assert not by_id(browser, "field-rows").find_elements(By.CSS_SELECTOR, ".field-row")

        # A document with two fields.
        fill(browser, "doc-id", "harbour")
        fill(browser, "doc-text", "The crane lifts steel containers onto ships at dawn.")
        for name, text in (("title", "Harbour logistics"), ("summary", "Cranes and containers at the port.")):
            by_id(browser, "add-field").click()
            row = by_id(browser, "field-rows").find_elements(By.CSS_SELECTOR, ".field-row")[-1]
            row.find_element(By.CSS_SELECTOR, ".field-name").send_keys(name)
            row.find_element(By.CSS_SELECTOR, ".field-text").send_keys(text)
        submit(browser, "document-form")
        wait_for(browser, lambda d: by_id(d, "add-status").text == "harbour: indexed", what="added")
        assert not by_id(browser, "add-error").is_displayed()
        doc = api.get("/v1/collections/port/documents/harbour").json()
        assert doc["fields"] == {"title": "Harbour logistics", "summary": "Cranes and containers at the port."}
        assert doc["title"] == "Harbour logistics"
        wait_for(browser, lambda d: "2 documents, 4 chunks" in by_id(d, "collection-info").text, what="counts")

        # Search: every hit shows its field; a field choice keeps to it.
        for fields in ("", "summary", "title, text"):
            fill(browser, "query", "containers at the port")
            Select(by_id(browser, "mode")).select_by_value("colbert")
            fill(browser, "search-fields", fields)
            fill(browser, "search-k", "10")
            browser.execute_script("document.getElementById('search-summary').textContent = ''")
            submit(browser, "search-form")
            wait_for(browser, lambda d: "(colbert)" in by_id(d, "search-summary").text, what=f"results of {fields!r}")
            body = {"query": "containers at the port", "k": 10, "mode": "colbert"}
            if fields:
                body["fields"] = [f.strip() for f in fields.split(",")]
            expected = api.post("/v1/collections/port/search", json=body).json()["results"]
            assert hit_fields(browser, "results") == [(r["document_id"], r["field"]) for r in expected]
            if fields:
                assert {f for _, f in hit_fields(browser, "results")} == set(body["fields"])
            else:
                assert len(expected) == 4
        assert [r["document_id"] for r in expected if r["field"] == "title"] == ["harbour"]

        # The document shows its fields, and each chunk its field.
        fill(browser, "search-fields", "summary")
        fill(browser, "search-k", "1")
        submit(browser, "search-form")
        wait_for(browser, lambda d: hit_fields(d, "results") == [("harbour", "summary")], what="the summary hit")
        hits(browser, "results")[0]["link"].click()
        dialog = by_id(browser, "document-dialog")
        wait_for(browser, lambda d: dialog.is_displayed() and by_id(d, "document-chunks").text, what="document")
        shown = by_id(browser, "document-fields").text
        assert "summary" in shown and "Cranes and containers at the port." in shown
        chunks = by_id(browser, "document-chunks").find_elements(By.TAG_NAME, "li")
        assert [c.get_attribute("data-field") for c in chunks] == ["text", "title", "summary"]
        dialog.find_element(By.CSS_SELECTOR, "button.close").click()
