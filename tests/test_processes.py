"""Real server processes: two on one data directory, and kill -9 mid-upsert."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import ServerProcess, kill_during_writes

pytestmark = pytest.mark.slow


def search_ids(url: str, collection: str, query: str, k: int = 10) -> list[str]:
    r = httpx.post(f"{url}/v1/collections/{collection}/search", json={"query": query, "k": k}, timeout=60)
    r.raise_for_status()
    return [h["document_id"] for h in r.json()["results"]]


def test_two_processes_share_one_data_directory(tmp_path, checkpoint_dir):
    data = tmp_path / "data"
    a = ServerProcess(data, checkpoint_dir)
    b = ServerProcess(data, checkpoint_dir)
    try:
        a.wait_ready()
        b.wait_ready()
        roles = {httpx.get(s.url + "/ready").json()["writer"]["role"] for s in (a, b)}
        assert roles == {"writer", "reader"}
        httpx.post(a.url + "/v1/collections", json={"name": "shared"}).raise_for_status()
        assert search_ids(b.url, "shared", "anything") == []
        for src, dst, doc_id, text, query in (
            (a, b, "otter", "Sea otters hold hands while they sleep.", "otters sleeping"),
            (b, a, "comet", "A comet's tail always points away from the sun.", "comet tail direction"),
        ):
            r = httpx.post(
                f"{src.url}/v1/collections/shared/documents",
                json={"documents": [{"id": doc_id, "text": text}]},
                timeout=60,
            )
            assert r.status_code == 200 and r.json()["results"][0]["status"] == "indexed", r.text
            acknowledged = time.monotonic()
            while doc_id not in search_ids(dst.url, "shared", query, k=1):
                assert time.monotonic() - acknowledged < 2.0, f"{doc_id} not visible through the other process"
                time.sleep(0.05)
        # Deletes through one are seen by the other.
        assert httpx.delete(f"{b.url}/v1/collections/shared/documents/otter").status_code == 204
        assert "otter" not in search_ids(a.url, "shared", "otters sleeping")
        # When the writer process dies, the other takes over writing.
        writer = a if httpx.get(a.url + "/ready").json()["writer"]["role"] == "writer" else b
        survivor = b if writer is a else a
        writer.kill9()
        r = httpx.post(
            f"{survivor.url}/v1/collections/shared/documents",
            json={"documents": [{"id": "lynx", "text": "The lynx has tufted ears."}]},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["results"][0]["status"] == "indexed", r.text
        assert search_ids(survivor.url, "shared", "tufted ears", k=1) == ["lynx"]
    finally:
        a.stop()
        b.stop()


def test_kill_9_during_large_upserts_loses_no_acknowledged_write(tmp_path, checkpoint_dir):
    data = tmp_path / "data"
    # Small exact tier so the run crosses into PLAID and commits many segments.
    env = {"COLBERT_SERVER_EXACT_SEARCH_MAX_PASSAGES": "64"}
    server = ServerProcess(data, checkpoint_dir, env)
    server.wait_ready()
    httpx.post(server.url + "/v1/collections", json={"name": "crash"}).raise_for_status()
    words = ["amber", "basalt", "cobalt", "dahlia", "ember", "fjord", "garnet", "harbor", "indigo", "juniper"]

    def make_doc(n: int) -> dict:
        # Long enough for several passages each, so "half there" is observable.
        body = " ".join(f"Part {p} of record {n} mentions {words[(n + p) % 10]} and marker{n}x{p}." for p in range(60))
        return {"id": f"rec-{n}", "text": body}

    sent, acknowledged = kill_during_writes(server, "crash", make_doc, batch=4, at_least=24)

    restarted = ServerProcess(data, checkpoint_dir, env)
    try:
        restarted.wait_ready()
        with httpx.Client(base_url=restarted.url, timeout=120) as client:
            deadline = time.monotonic() + 300
            while client.get("/v1/collections/crash").json()["pending_documents"] and time.monotonic() < deadline:
                time.sleep(0.2)
            info = client.get("/v1/collections/crash").json()
            assert info["pending_documents"] == 0
            expected_chunks = None
            for doc_id in sent:
                r = client.get(f"/v1/collections/crash/documents/{doc_id}")
                if doc_id in acknowledged:
                    assert r.status_code == 200, f"acknowledged {doc_id} lost"
                if r.status_code != 200:
                    continue
                doc = r.json()
                assert doc["state"] == "live"
                expected_chunks = expected_chunks or len(doc["chunks"])
                assert len(doc["chunks"]) == expected_chunks > 1, f"{doc_id} is half there"
            for doc_id in acknowledged[::5]:
                n = int(doc_id.split("-")[1])
                hits = client.post(
                    "/v1/collections/crash/search", json={"query": f"record {n} marker{n}x7", "k": 100}
                ).json()["results"]
                found = [h for h in hits if h["document_id"] == doc_id]
                assert found, f"acknowledged {doc_id} is not searchable"
    finally:
        restarted.stop()


def test_a_stopped_writer_shows_as_stalled_and_acknowledged_writes_land_once_it_resumes(tmp_path, checkpoint_dir):
    import os
    import signal

    data = tmp_path / "data"
    env = {"COLBERT_SERVER_WRITER_STALL_S": "2"}
    a = ServerProcess(data, checkpoint_dir, env)
    b = ServerProcess(data, checkpoint_dir, env)
    try:
        a.wait_ready()
        b.wait_ready()
        writer, reader = (a, b) if httpx.get(a.url + "/ready").json()["writer"]["role"] == "writer" else (b, a)
        httpx.post(reader.url + "/v1/collections", json={"name": "paused"}).raise_for_status()
        os.kill(writer.proc.pid, signal.SIGSTOP)
        try:
            stopped = time.monotonic()
            r = httpx.post(
                f"{reader.url}/v1/collections/paused/documents",
                json={"documents": [{"id": "heron", "text": "Herons stand still for hours."}], "wait": False},
                timeout=60,
            )
            assert r.status_code == 202, r.text  # acknowledged while no writer runs
            while (ready := httpx.get(reader.url + "/ready", timeout=10).json())["status"] != "degraded":
                assert time.monotonic() - stopped < 15, ready
                time.sleep(0.2)
            assert ready["writer"]["stalled_s"] >= 2 and ready["writer"]["role"] == "reader"
        finally:
            os.kill(writer.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        while "heron" not in search_ids(reader.url, "paused", "bird standing still", k=1):
            assert time.monotonic() - resumed < 60, "the acknowledged write never landed"
            time.sleep(0.2)
        while httpx.get(reader.url + "/ready", timeout=10).json()["status"] != "ready":
            assert time.monotonic() - resumed < 15
            time.sleep(0.2)
    finally:
        a.stop()
        b.stop()


# Poison uploads (the review's repro and a tag soup at the file size limit).
NESTED_HEADINGS = b"<h1>level " * 24_000  # 240 KB: minutes of heading extraction before the fix
TAG_SOUP = b"<div><span><b><i>soup" * 950_000  # 19.9 MB of tags never closed


def wait_files(url: str, job_id: str, names: set[str], timeout: float) -> dict:
    """The job's files once every one of ``names`` is done or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
        files = {f["filename"]: f for f in job["files"]}
        if all(files[n]["state"] in ("added", "unchanged", "failed") for n in names):
            return files
        time.sleep(0.2)
    raise AssertionError(f"not done in {timeout} s: {job}")


def wait_live(url: str, collection: str, document_id: str, timeout: float = 60) -> str:
    """The document's state once it is live (files are indexed after they are added), or at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/v1/collections/{collection}/documents/{document_id}", timeout=30)
        state = r.json().get("state") if r.status_code == 200 else str(r.status_code)
        if state == "live" or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_poison_uploads_fail_with_their_reason_while_normal_files_are_served_and_a_restart_does_not_stall(
    tmp_path, checkpoint_dir
):
    data = tmp_path / "data"
    limits = {"COLBERT_SERVER_EXTRACT_TIMEOUT_S": "4"}
    server = ServerProcess(data, checkpoint_dir, limits)
    restarted = None
    try:
        server.wait_ready()
        httpx.post(server.url + "/v1/collections", json={"name": "poison"}).raise_for_status()
        files = [
            ("files", ("soup.html", TAG_SOUP, "text/html")),
            ("files", ("nested.html", NESTED_HEADINGS, "text/html")),
            ("files", ("normal.txt", b"Sea otters hold hands while they sleep.", "text/plain")),
        ]
        started = time.monotonic()
        r = httpx.post(server.url + "/v1/collections/poison/files", files=files, timeout=120)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        done = wait_files(server.url, job, {"normal.txt"}, timeout=60)
        assert done["normal.txt"]["state"] == "added" and time.monotonic() - started < 60
        done = wait_files(server.url, job, {"soup.html", "nested.html"}, timeout=60)
        assert done["soup.html"]["state"] == "failed" and "4 s limit" in done["soup.html"]["error"]
        assert done["nested.html"]["state"] == "added"  # linear now: no longer poison
        assert httpx.get(server.url + "/ready").status_code == 200
        assert wait_live(server.url, "poison", "normal.txt") == "live"
        assert search_ids(server.url, "poison", "otters sleeping", k=1) == ["normal.txt"]

        # Killed while the poison file is in extraction: the attempt was
        # counted before it ran, so the restart neither stalls on it nor
        # holds back the uploads behind it.
        r = httpx.post(
            server.url + "/v1/collections/poison/files",
            files=[("files", ("soup-again.html", TAG_SOUP, "text/html"))],
            timeout=120,
        )
        again = r.json()["id"]
        time.sleep(2)  # in extraction
        server.kill9()
        server.log.close()
        restarted = ServerProcess(data, checkpoint_dir, limits)
        restarted.wait_ready()
        started = time.monotonic()
        r = httpx.post(
            restarted.url + "/v1/collections/poison/files",
            files=[("files", ("after.txt", b"A comet's tail points away from the sun.", "text/plain"))],
            timeout=120,
        )
        assert r.status_code == 202, (r.status_code, r.text, restarted.log_tail())
        after = wait_files(restarted.url, r.json()["id"], {"after.txt"}, timeout=60)
        assert after["after.txt"]["state"] == "added" and time.monotonic() - started < 60
        soup = wait_files(restarted.url, again, {"soup-again.html"}, timeout=120)["soup-again.html"]
        assert soup["state"] == "failed", soup
        assert wait_live(restarted.url, "poison", "after.txt") == "live"
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()
