"""/metrics: Prometheus text that moves after a search, and /ready's details."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


async def scrape(client) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


SEARCH_ROUTE = "/v1/collections/{collection}/search"


async def test_metrics_move_after_a_search(client):
    r = await client.post("/v1/collections", json={"name": "metered"})
    assert r.status_code == 201, r.text
    docs = [
        {"id": "tea", "text": "Green tea is made from the leaves of Camellia sinensis."},
        {"id": "lava", "text": "A volcano erupts lava, ash and gases from the crust."},
    ]
    r = await client.post("/v1/collections/metered/documents", json={"documents": docs})
    assert r.status_code == 200, r.text
    before = await scrape(client)

    r = await client.post("/v1/collections/metered/search", json={"query": "green tea", "k": 1})
    assert r.status_code == 200 and r.json()["results"][0]["document_id"] == "tea"
    after = await scrape(client)

    requests = dict(method="POST", route=SEARCH_ROUTE, status="200")
    assert (
        value(after, "colbert_http_requests_total", **requests)
        == value(before, "colbert_http_requests_total", **requests) + 1
    )
    duration = "colbert_http_request_duration_seconds"
    assert value(after, f"{duration}_count", **requests) == value(before, f"{duration}_count", **requests) + 1
    assert value(after, f"{duration}_sum", **requests) > value(before, f"{duration}_sum", **requests)
    search = "colbert_search_duration_seconds"
    assert value(after, f"{search}_count", mode="colbert") == value(before, f"{search}_count", mode="colbert") + 1
    assert value(after, f"{search}_sum", mode="colbert") > value(before, f"{search}_sum", mode="colbert")
    encode = "colbert_query_encode_duration_seconds"
    assert value(after, f"{encode}_count") == value(before, f"{encode}_count") + 1
    assert value(after, f"{encode}_bucket", le="+Inf") == value(after, f"{encode}_count")

    # A keyword search is timed but encodes no query.
    r = await client.post("/v1/collections/metered/search", json={"query": "volcano", "k": 1, "mode": "keyword"})
    assert r.status_code == 200
    third = await scrape(client)
    assert value(third, f"{search}_count", mode="keyword") == value(after, f"{search}_count", mode="keyword") + 1
    assert value(third, f"{encode}_count") == value(after, f"{encode}_count")

    # Index sizes and state, read from the store at scrape time.
    assert value(third, "colbert_collection_documents", collection="metered") == 2
    assert value(third, "colbert_collection_passages", collection="metered") >= 2
    assert value(third, "colbert_collection_pending_documents", collection="metered") == 0
    assert value(third, "colbert_collection_generation", collection="metered") >= 1
    assert value(third, "colbert_models_loaded") == 1
    assert value(third, "colbert_index_writer", state="lease_held") == 1
    assert value(third, "colbert_index_writer", state="thread_alive") == 1


async def test_route_labels_are_templates_and_job_states_are_counted(client):
    r = await client.post("/v1/collections", json={"name": "jobs-metered"})
    assert r.status_code == 201
    before = await scrape(client)
    await client.get("/v1/collections/jobs-metered/documents/some%2Fodd%20id")
    await client.get("/no/such/path/at-all")
    r = await client.post(
        "/v1/collections/jobs-metered/files",
        files=[("files", ("moss.txt", b"Moss grows in damp forests.")), ("files", ("bad.exe", b"MZ"))],
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    for _ in range(300):
        if (await client.get(f"/v1/jobs/{job_id}")).json()["state"] == "done":
            break
        await asyncio.sleep(0.1)
    after = await scrape(client)
    routes = {dict(labels).get("route") for name, labels in after if name == "colbert_http_requests_total"}
    assert "/v1/collections/{collection}/documents/{document_id:path}" in routes
    assert "unmatched" in routes
    assert not any("odd" in route or "at-all" in route for route in routes)
    assert value(after, "colbert_jobs", state="done") == value(before, "colbert_jobs", state="done") + 1
    assert value(after, "colbert_job_files_queued") == 0
    assert value(after, "colbert_collection_documents", collection="jobs-metered") == 1


async def test_ready_reports_models_and_writer(client):
    r = await client.get("/ready")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and body["models_loaded"] is True
    writer = body["writer"]
    assert writer["role"] == "writer" and writer["alive"] is True
    assert writer["lease_holder_pid"] == os.getpid() and writer["last_error"] is None


CHILD = """
import sys
from app.observability import Metrics
metrics = Metrics()
metrics.requests.labels("GET", "/v1/collections", "200").inc(int(sys.argv[1]))
metrics.engine.search_seconds.labels("colbert").observe(0.01)
if len(sys.argv) > 2:
    sys.stdout.write(metrics.render().decode())
"""


def test_multiprocess_mode_sums_the_workers(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR (several uvicorn workers), a scrape of any
    worker reports the counts of all of them."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    def child(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    child("2")
    text = child("3", "render")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert value(samples, "colbert_http_requests_total", method="GET", route="/v1/collections", status="200") == 5
    assert value(samples, "colbert_search_duration_seconds_count", mode="colbert") == 2
