"""File uploads: formats, jobs, idempotency, bad files, through HTTP."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.api.test_api import assert_error, create, search
from tests.conftest import ServerProcess
from tests.ingest.test_extract import make_docx, make_pdf, make_zip_bomb

pytestmark = pytest.mark.slow


def folder_files() -> dict[str, bytes]:
    return {
        "notes.txt": b"The lighthouse keeper logs every passing ship in a leather book.",
        "guide.md": (
            b"# Setup\n\n"
            + b"Install the tools first and check each version twice. " * 40
            + b"\n\n## Glaciers\n\nGlaciers carve U-shaped valleys over millennia.\n"
        ),
        "page.html": (
            b"<html><head><title>T</title><style>.x{color:red}</style><script>var secret='hidden';</script></head>"
            b"<body><h1>Volcanoes</h1><p>Basalt forms when lava cools quickly.</p></body></html>"
        ),
        "memo.docx": make_docx(["Quarterly memo.", "The orchard yields more apples after pruning."]),
        "paper.pdf": make_pdf(["Introduction to the study of tides.", "Page two explains that the moon drives tides."]),
    }


async def upload(client, collection: str, files: dict[str, bytes], **form) -> dict:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files.items()]
    r = await client.post(f"/v1/collections/{collection}/files", files=parts, data=form)
    assert r.status_code == 202, r.text
    return r.json()


async def wait_job(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["state"] in ("done", "failed"):
            return job
        await asyncio.sleep(0.1)
    raise TimeoutError(job)


async def test_folder_of_each_format_is_searchable(client):
    await create(client, "docs")
    job = await upload(client, "docs", folder_files(), metadata=json.dumps({"team": "alpha"}))
    assert job["state"] in ("queued", "running", "done") and job["files_total"] == 5
    job = await wait_job(client, job["id"])
    assert job["state"] == "done", job
    assert job["counts"] == {"queued": 0, "added": 5, "unchanged": 0, "failed": 0}
    assert job["files_done"] == 5 and job["chunks_done"] == job["chunks_total"] >= 5
    expected = {
        "which ships pass the lighthouse": "notes.txt",
        "how do glaciers shape valleys": "guide.md",
        "basalt from cooling lava": "page.html",
        "pruning apple orchards": "memo.docx",
        "what drives the tides": "paper.pdf",
    }
    for query, doc_id in expected.items():
        top = (await search(client, "docs", query, k=1))[0]
        assert top["document_id"] == doc_id, (query, top)
        assert top["metadata"]["team"] == "alpha" and top["metadata"]["filename"] == doc_id
    pdf_hit = (await search(client, "docs", "the moon drives tides", k=1))[0]
    assert pdf_hit["page"] in (1, 2) and pdf_hit["metadata"]["media_type"] == "application/pdf"
    md_hit = (await search(client, "docs", "U-shaped valleys", k=1))[0]
    assert md_hit["heading"] == "Glaciers"
    html = (await client.get("/v1/collections/docs/documents/page.html")).json()
    assert "secret" not in html["chunks"][0]["text"] and "color" not in html["chunks"][0]["text"]


async def test_reupload_is_a_no_op_and_an_edit_replaces_one_document(client):
    await create(client, "reup")
    files = folder_files()
    first = await wait_job(client, (await upload(client, "reup", files))["id"])
    assert first["counts"]["added"] == 5
    again = await wait_job(client, (await upload(client, "reup", files))["id"])
    assert again["state"] == "done" and again["counts"] == {"queued": 0, "added": 0, "unchanged": 5, "failed": 0}
    before = (await client.get("/v1/collections/reup/documents/memo.docx")).json()
    files["notes.txt"] = b"The lighthouse was automated in 1990 and the keeper retired."
    edited = await wait_job(client, (await upload(client, "reup", files))["id"])
    assert edited["counts"] == {"queued": 0, "added": 1, "unchanged": 4, "failed": 0}
    assert [f["filename"] for f in edited["files"] if f["state"] == "added"] == ["notes.txt"]
    hits = await search(client, "reup", "lighthouse keeper", k=10)
    texts = [h["text"] for h in hits if h["document_id"] == "notes.txt"]
    assert texts == ["The lighthouse was automated in 1990 and the keeper retired."]
    after = (await client.get("/v1/collections/reup/documents/memo.docx")).json()
    assert after["updated_at"] == before["updated_at"]  # untouched
    info = (await client.get("/v1/collections/reup")).json()
    assert info["documents"] == 5


async def test_bad_files_get_per_file_errors_and_the_rest_is_ingested(client, app_env, tmp_path):
    await create(client, "badfiles")
    bad = {
        "corrupt.docx": b"PK\x03\x04 this is not really a zip",
        "corrupt.pdf": b"%PDF-1.4\n garbage without objects",
        "bomb.docx": make_zip_bomb(150_000_000),
        "binary.txt": b"\x00\x01\x02\x03\xff\xfe" * 100,
        "empty.txt": b"",
        "blank.md": b"   \n\n  ",
        "program.exe": b"MZ\x90\x00",
        "../escape.txt": b"should never be written anywhere",
        "good.txt": b"Penguins huddle together to survive the Antarctic winter.",
    }
    job = await wait_job(client, (await upload(client, "badfiles", bad))["id"])
    by_name = {f["filename"]: f for f in job["files"]}
    assert job["state"] == "done"
    assert by_name["good.txt"]["state"] == "added"
    failed = {f["filename"]: f["error"] for f in job["files"] if f["state"] == "failed"}
    assert len(failed) == 8, job["files"]
    assert all(reason for reason in failed.values())
    assert "zip bomb" in failed["bomb.docx"]
    assert "binary" in failed["binary.txt"] and "empty" in failed["empty.txt"]
    assert "unsupported" in failed["program.exe"]
    assert any("escape" in name for name in failed)
    assert (await search(client, "badfiles", "penguins in winter", k=1))[0]["document_id"] == "good.txt"
    info = (await client.get("/v1/collections/badfiles")).json()
    assert info["documents"] == 1
    data_dir = app_env.settings.data_dir
    assert not list(data_dir.parent.rglob("escape.txt"))


async def test_a_file_past_the_extraction_limits_fails_with_its_reason_and_the_queue_moves_on(client, app_env):
    from tests.ingest.test_sandbox import SLOW_HTML

    await create(client, "poison")
    sandbox = app_env.app.state.service._jobs.sandbox
    limit, sandbox.timeout_s = sandbox.timeout_s, 0.5  # SLOW_HTML takes seconds to parse
    try:
        job = await upload(client, "poison", {"slow.html": SLOW_HTML, "fine.txt": b"Otters hold hands while sleeping."})
        job = await wait_job(client, job["id"], timeout=60)
    finally:
        sandbox.timeout_s = limit
    states = {f["filename"]: (f["state"], f["error"]) for f in job["files"]}
    assert states["slow.html"][0] == "failed" and "longer than the 0.5 s limit" in states["slow.html"][1]
    assert states["fine.txt"][0] == "added"
    assert (await search(client, "poison", "sleeping otters", k=1))[0]["document_id"] == "fine.txt"
    assert (await client.get("/ready")).status_code == 200


async def test_file_over_the_size_limit(client, app_env):
    await create(client, "bigfile")
    limit = app_env.settings.max_file_bytes
    job = await upload(client, "bigfile", {"big.txt": b"a" * (limit + 10), "ok.txt": b"Small and fine."})
    job = await wait_job(client, job["id"])
    states = {f["filename"]: (f["state"], f["error"]) for f in job["files"]}
    assert states["big.txt"][0] == "failed" and "limit" in states["big.txt"][1]
    assert states["ok.txt"][0] == "added"


async def test_upload_request_errors(client):
    await create(client, "upload-errors")
    r = await client.post("/v1/collections/upload-errors/files", data={"metadata": "{}"})
    assert_error(r, 422)  # no files
    r = await client.post(
        "/v1/collections/upload-errors/files", files=[("files", ("a.txt", b"x"))], data={"metadata": "{bad"}
    )
    assert_error(r, 422)
    r = await client.post("/v1/collections/nope/files", files=[("files", ("a.txt", b"x"))])
    assert_error(r, 404)
    assert_error(await client.get("/v1/jobs/does-not-exist"), 404)


def test_kill_9_during_an_upload_job_then_the_job_finishes_without_duplicates(tmp_path, checkpoint_dir):
    data = tmp_path / "data"
    server = ServerProcess(data, checkpoint_dir)
    server.wait_ready()
    httpx.post(server.url + "/v1/collections", json={"name": "jobs"}).raise_for_status()
    words = ["amber", "basalt", "cobalt", "dahlia", "ember", "fjord", "garnet", "harbor"]
    files = []
    for n in range(40):
        body = " ".join(f"File {n} paragraph {p} mentions {words[(n + p) % 8]} and tag{n}x{p}." for p in range(40))
        files.append(("files", (f"file-{n}.txt", body.encode(), "text/plain")))
    r = httpx.post(server.url + "/v1/collections/jobs/files", files=files, timeout=60)
    assert r.status_code == 202
    job_id = r.json()["id"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}").json()
        if job["counts"]["added"] >= 5:
            break
        time.sleep(0.05)
    assert job["state"] == "running"
    server.kill9()
    server.log.close()
    restarted = ServerProcess(data, checkpoint_dir)
    try:
        restarted.wait_ready()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            job = httpx.get(f"{restarted.url}/v1/jobs/{job_id}").json()
            if job["state"] in ("done", "failed"):
                break
            time.sleep(0.2)
        assert job["state"] == "done", job
        assert job["counts"]["added"] == 40
        docs = httpx.get(f"{restarted.url}/v1/collections/jobs/documents", params={"limit": 100}).json()
        assert docs["total"] == 40
        chunk_counts = {d["id"]: d["chunks"] for d in docs["documents"]}
        assert len(set(chunk_counts.values())) == 1  # every file split the same way: no duplicate chunks
        info = httpx.get(f"{restarted.url}/v1/collections/jobs").json()
        assert info["chunks"] == sum(chunk_counts.values())
    finally:
        restarted.stop()
