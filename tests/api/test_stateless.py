"""The stateless tier: two server instances, each with its own data
directory, over one Qdrant store (qdrant-client's local mode, shared in this
process; with QDRANT_URL, a real server), through HTTP with the real model.
Each sees the other's writes at once, and one restarting loses nothing."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import pytest

from tests.api.test_api import assert_error
from tests.api.test_files import upload, wait_job
from tests.api.test_qdrant import docs
from tests.conftest import RunningApp, make_settings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
async def pair(tmp_path_factory, checkpoint_dir, shared_models_dir, fake_lm):
    """Instances a and b over one Qdrant store (answers from a fake OpenAI-compatible LM)."""
    store = tmp_path_factory.mktemp("qdrant-store")
    if os.environ.get("QDRANT_URL"):
        qdrant = {"qdrant_url": os.environ["QDRANT_URL"], "qdrant_api_key": os.environ.get("QDRANT_API_KEY", "")}
    else:
        qdrant = {"qdrant_path": store}
    common = {"index_backend": "qdrant", "stateless": True, "qdrant_prefix": f"t{uuid.uuid4().hex[:8]}", **qdrant}
    answers = {
        "models_dir": shared_models_dir,
        "answer_lm": "openai/fake-model",
        "answer_lm_base_url": fake_lm.base_url,
        "answer_lm_api_key": "fake",
    }
    apps = {}
    for name in ("a", "b"):
        settings = make_settings(tmp_path_factory.mktemp(f"instance-{name}"), checkpoint_dir, **common, **answers)
        apps[name] = RunningApp(settings)
        await apps[name].start()
    yield apps
    for app in apps.values():
        await app.stop()


async def search(client, collection: str, **body) -> list[dict]:
    r = await client.post(f"/v1/collections/{collection}/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


async def test_each_instance_sees_the_others_writes_at_once(pair):
    a, b = pair["a"].client, pair["b"].client
    assert (await a.post("/v1/collections", json={"name": "shared"})).status_code == 201
    assert_error(await b.post("/v1/collections", json={"name": "shared"}), 409)
    r = await a.post("/v1/collections/shared/documents", json={"documents": docs(60)})
    assert r.status_code == 200, r.text
    assert {x["status"] for x in r.json()["results"]} == {"indexed"}
    for mode in ("colbert", "dense", "keyword", "hybrid"):  # through b, right after a's acknowledgement
        hits = await search(b, "shared", query="Report 37 covers geology", k=5, mode=mode)
        assert len(hits) == 5, mode
        assert hits[0]["document_id"] == "doc-37", (mode, hits[:2])
    for fusion in ("normalized", "sum", "rescore"):
        body = {"mode": "hybrid", "fusion": fusion, "weights": {"colbert": 1, "dense": 1, "keyword": 1}}
        hits = await search(b, "shared", query="Report 37 covers geology", k=5, **body)
        assert hits[0]["document_id"] == "doc-37", (fusion, hits[:2])
    r = await b.post("/v1/collections/shared/answer", json={"question": "What does report 37 cover?", "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["context"][0]["document_id"] == "doc-37"
    assert r.json()["citations"][0]["document_id"] == "doc-37"
    info = (await b.get("/v1/collections/shared")).json()
    assert info["documents"] == 60 and info["index"]["kind"] == "qdrant"
    assert [c["name"] for c in (await b.get("/v1/collections")).json()["collections"]] == ["shared"]
    doc = (await b.get("/v1/collections/shared/documents/doc-5")).json()
    assert doc["metadata"]["year"] == 2005 and doc["chunks"][0]["text"].startswith("Report 5 covers")
    page = (await b.get("/v1/collections/shared/documents", params={"limit": 25, "offset": 50})).json()
    assert page["total"] == 60 and len(page["documents"]) == 10
    r = await b.post("/v1/collections/shared/documents", json={"documents": docs(60)})  # the same content again
    assert {x["status"] for x in r.json()["results"]} == {"unchanged"}

    # b replaces one and deletes another: a sees both at once.
    r = await b.post(
        "/v1/collections/shared/documents",
        json={"documents": [{"id": "doc-5", "text": "Zeppelins are airships held up by lifting gas."}]},
    )
    assert r.status_code == 200, r.text
    assert (await b.delete("/v1/collections/shared/documents/doc-6")).status_code == 204
    hits = await search(a, "shared", query="airships and lifting gas", k=3)
    assert hits[0]["document_id"] == "doc-5" and "Zeppelins" in hits[0]["text"]
    assert len([h for h in hits if h["document_id"] == "doc-5"]) == 1  # the old chunk is gone
    hits = await search(a, "shared", query="Report 6 covers sailing", k=60, mode="keyword")
    assert "doc-6" not in {h["document_id"] for h in hits}
    assert_error(await a.get("/v1/collections/shared/documents/doc-6"), 404)
    assert (await a.get("/v1/collections/shared")).json()["documents"] == 59


async def test_filters_and_fields_hold_on_both(pair):
    a, b = pair["a"].client, pair["b"].client
    assert (await a.post("/v1/collections", json={"name": "filtered"})).status_code == 201
    assert (await a.post("/v1/collections/filtered/documents", json={"documents": docs(80)})).status_code == 200
    by_id = {d["id"]: d["metadata"] for d in docs(80)}
    cases = [
        ({"lang": "de", "year": {"$gte": 2010}}, lambda m: m["lang"] == "de" and m["year"] >= 2010),
        ({"lang": {"$in": ["de"]}, "public": True}, lambda m: m["lang"] == "de" and m["public"]),
        ({"$or": [{"year": 2001}, {"year": {"$gt": 2017}}]}, lambda m: m["year"] == 2001 or m["year"] > 2017),
        ({"lang": {"$nin": ["en"]}, "year": {"$lte": 2003}}, lambda m: m["lang"] != "en" and m["year"] <= 2003),
        ({"year": {"$ne": 2004}, "public": False}, lambda m: m["year"] != 2004 and not m["public"]),
        ({"$document_id": ["doc-1", "doc-2", "doc-79"]}, lambda m: False),
    ]
    for where, predicate in cases:
        expected = {i for i, m in by_id.items() if predicate(m)} or {"doc-1", "doc-2", "doc-79"}
        for mode in ("colbert", "keyword", "hybrid"):
            hits = await search(b, "filtered", query="the committee report", k=20, mode=mode, filter=where)
            assert len(hits) == min(20, len(expected)), (where, mode)
            assert {h["document_id"] for h in hits} <= expected, (where, mode)
    assert_error(await b.post("/v1/collections/filtered/search", json={"query": "x", "filter": {"$not": {}}}), 422)
    r = await a.post(
        "/v1/collections/filtered/documents",
        json={"documents": [{"id": "f", "text": "A plain body.", "fields": {"summary": "Glaciers carve fjords."}}]},
    )
    assert r.status_code == 200, r.text
    hits = await search(b, "filtered", query="glaciers and fjords", k=3, fields=["summary"])
    assert [(h["document_id"], h["field"]) for h in hits] == [("f", "summary")]


async def test_an_instance_restarting_loses_nothing_and_uploads_land_for_both(pair):
    a, b = pair["a"], pair["b"]
    before = await search(b.client, "shared", query="the chemistry committee in 2003", k=10)
    await a.stop()
    assert len(await search(b.client, "shared", query="the chemistry committee in 2003", k=10)) == 10
    await a.start()
    after = await search(a.client, "shared", query="the chemistry committee in 2003", k=10)
    assert [h["document_id"] for h in after] == [h["document_id"] for h in before]
    assert [h["score"] for h in after] == pytest.approx([h["score"] for h in before], abs=1e-3)

    files = {"lighthouse.txt": b"The lighthouse keeper climbed 217 steps each night to light the lamp."}
    job = await wait_job(a.client, (await upload(a.client, "shared", files, metadata=json.dumps({"t": 1})))["id"])
    assert job["state"] == "done" and job["counts"]["added"] == 1, job
    metrics = (await a.client.get("/metrics")).text
    assert 'colbert_jobs{state="done"} 1.0' in metrics
    assert 'colbert_collection_documents{collection="shared"}' not in metrics  # its figures are Qdrant's
    hits = await search(b.client, "shared", query="how many steps did the lighthouse keeper climb", k=1)
    assert hits[0]["document_id"] == job["files"][0]["document_id"]
    assert hits[0]["metadata"]["t"] == 1


async def test_reindexing_is_refused_and_deleting_a_collection_is_seen_by_both(pair):
    a, b = pair["a"].client, pair["b"].client
    assert_error(await a.post("/v1/collections/filtered/reindex", json={}), 409)
    assert_error(await a.post("/v1/collections/missing/reindex", json={}), 404)
    assert (await b.delete("/v1/collections/filtered")).status_code == 204
    assert_error(await a.get("/v1/collections/filtered"), 404)
    assert_error(await a.post("/v1/collections/filtered/search", json={"query": "committee"}), 404)
    assert (await a.post("/v1/collections", json={"name": "filtered"})).status_code == 201
    assert (await b.get("/v1/collections/filtered")).json()["documents"] == 0


async def test_an_unreachable_cluster_is_a_503_with_its_reason(tmp_path, checkpoint_dir):
    from tests.conftest import free_port

    settings = make_settings(
        tmp_path, checkpoint_dir, index_backend="qdrant", stateless=True, qdrant_url=f"http://127.0.0.1:{free_port()}"
    )
    running = RunningApp(settings)
    with pytest.raises(TimeoutError):  # never ready: it waits for the cluster
        await running.start(ready_timeout=3)
    client = running.client
    assert (await client.get("/health")).status_code == 200
    r = await client.get("/ready")
    assert_error(r, 503)
    assert "waiting for the index backend" in r.json()["error"]["message"]
    assert_error(await client.post("/v1/collections/x/search", json={"query": "q"}), 503)
    for method, path, body in (
        ("GET", "/v1/collections", None),
        ("POST", "/v1/collections", {"name": "x"}),
        ("GET", "/v1/collections/x", None),
        ("GET", "/v1/collections/x/documents", None),
        ("DELETE", "/v1/collections/x/documents/d", None),
        ("POST", "/v1/collections/x/documents", {"documents": [{"id": "d", "text": "t"}]}),
    ):
        assert_error(await client.request(method, path, json=body), 503)
    await running.stop()


async def test_roles_split_serving_from_ingest_over_one_data_directory(tmp_path, checkpoint_dir, pair):
    """An api process queues an upload on the data directory it shares with
    an ingest process, which writes it to Qdrant: both then serve it."""
    common = {**pair["a"].settings.model_dump(include={"index_backend", "stateless", "qdrant_prefix"})}
    store = pair["a"].settings.qdrant_path
    qdrant = {"qdrant_path": store} if store else {"qdrant_url": pair["a"].settings.qdrant_url}
    api = RunningApp(make_settings(tmp_path, checkpoint_dir, server_role="api", **common, **qdrant))
    await api.start()
    assert (await api.client.post("/v1/collections", json={"name": "roles"})).status_code == 201
    job = await upload(api.client, "roles", {"roles.txt": b"The api role queues; the ingest role drains the queue."})
    await asyncio.sleep(1.5)
    assert (await api.client.get(f"/v1/jobs/{job['id']}")).json()["state"] == "queued"  # nobody drains it yet
    ingest = RunningApp(make_settings(tmp_path, checkpoint_dir, server_role="ingest", **common, **qdrant))
    await ingest.start()
    try:
        job = await wait_job(api.client, job["id"])
        assert job["state"] == "done", job
        hits = await search(pair["b"].client, "roles", query="which role drains the queue", k=1)
        assert hits[0]["document_id"] == job["files"][0]["document_id"]
    finally:
        await ingest.stop()
        await api.stop()


@pytest.mark.skipif(not os.environ.get("QDRANT_URL"), reason="QDRANT_URL is not set (no Qdrant server here)")
def test_two_server_processes_over_a_real_cluster(tmp_path, checkpoint_dir):
    """With a real Qdrant: two uvicorn processes, each its own data
    directory; a write through one is searchable through the other at once,
    and one killed with SIGKILL and started again loses nothing."""
    import httpx

    from tests.conftest import ServerProcess

    env = {
        "COLBERT_SERVER_INDEX_BACKEND": "qdrant",
        "COLBERT_SERVER_STATELESS": "true",
        "COLBERT_SERVER_QDRANT_URL": os.environ["QDRANT_URL"],
        "COLBERT_SERVER_QDRANT_API_KEY": os.environ.get("QDRANT_API_KEY", ""),
        "COLBERT_SERVER_QDRANT_PREFIX": f"p{uuid.uuid4().hex[:8]}",
        "COLBERT_SERVER_ANSWER_PRELOAD": "false",
    }
    servers = [ServerProcess(tmp_path / name, checkpoint_dir, env) for name in ("one", "two")]
    try:
        for server in servers:
            server.wait_ready()
        one, two = (httpx.Client(base_url=s.url, timeout=60) for s in servers)
        assert one.post("/v1/collections", json={"name": "procs"}).status_code == 201
        assert one.post("/v1/collections/procs/documents", json={"documents": docs(40)}).status_code == 200
        hits = two.post("/v1/collections/procs/search", json={"query": "Report 21 covers geology", "k": 3}).json()
        assert hits["results"][0]["document_id"] == "doc-21", servers[1].log_tail()
        servers[0].kill9()
        servers[0] = ServerProcess(tmp_path / "one", checkpoint_dir, env)
        servers[0].wait_ready()
        again = httpx.Client(base_url=servers[0].url, timeout=60)
        assert again.get("/v1/collections/procs").json()["documents"] == 40
        hits = again.post("/v1/collections/procs/search", json={"query": "Report 21 covers geology", "k": 3}).json()
        assert hits["results"][0]["document_id"] == "doc-21"
        again.delete("/v1/collections/procs")
    finally:
        for server in servers:
            server.stop()


async def test_an_upload_waits_out_a_cluster_outage_instead_of_failing(pair, monkeypatch):
    from qdrant_client.http.exceptions import ResponseHandlingException

    import app.stateless

    client = pair["a"].app.state.service.catalog.client  # (shared with b in local mode)
    write = client.upsert
    outage = {"calls": 0}

    def down_for_a_while(*args, **kwargs):
        outage["calls"] += 1
        if outage["calls"] <= 4:  # more failures than a file has attempts
            raise ResponseHandlingException(ConnectionRefusedError("qdrant is down"))
        return write(*args, **kwargs)

    assert (await pair["a"].client.post("/v1/collections", json={"name": "outage"})).status_code == 201
    monkeypatch.setattr(app.stateless, "QDRANT_RETRY_S", 0.05)
    monkeypatch.setattr(client, "upsert", down_for_a_while)
    files = {"outage.txt": b"The ferry crossed the strait in forty minutes."}
    job = await wait_job(pair["a"].client, (await upload(pair["a"].client, "outage", files))["id"])
    assert job["state"] == "done" and job["counts"]["added"] == 1, job
    assert outage["calls"] == 5
    hits = await search(pair["b"].client, "outage", query="how long did the ferry take", k=1)
    assert hits[0]["document_id"] == job["files"][0]["document_id"]


def test_kill_9_during_writes_loses_no_acknowledged_document(tmp_path, checkpoint_dir):
    """A stateless server process (local mode in a directory) killed with
    SIGKILL while it writes: every acknowledged document is there, whole,
    after a restart, and each one written half-way is whole or absent."""
    import httpx

    from tests.conftest import ServerProcess, kill_during_writes

    env = {
        "COLBERT_SERVER_INDEX_BACKEND": "qdrant",
        "COLBERT_SERVER_STATELESS": "true",
        "COLBERT_SERVER_QDRANT_PATH": str(tmp_path / "qdrant"),
        "COLBERT_SERVER_ANSWER_PRELOAD": "false",
    }
    server = ServerProcess(tmp_path / "data", checkpoint_dir, env)
    server.wait_ready()
    httpx.post(server.url + "/v1/collections", json={"name": "crash"}).raise_for_status()

    def make_doc(n: int) -> dict:  # several chunks each, so "half there" is observable
        return {"id": f"rec-{n}", "text": " ".join(f"Part {p} of record {n} names marker{n}x{p}." for p in range(40))}

    _, acknowledged = kill_during_writes(server, "crash", make_doc, batch=3, at_least=12)

    restarted = ServerProcess(tmp_path / "data", checkpoint_dir, env)
    try:
        restarted.wait_ready()
        with httpx.Client(base_url=restarted.url, timeout=60) as client:
            expected_chunks = None
            for doc_id in acknowledged:
                r = client.get(f"/v1/collections/crash/documents/{doc_id}")
                assert r.status_code == 200, (doc_id, r.text)
                chunks = r.json()["chunks"]
                expected_chunks = expected_chunks or len(chunks)
                assert len(chunks) == expected_chunks > 1, doc_id
            page = client.get("/v1/collections/crash/documents", params={"limit": 1000}).json()
            for doc in page["documents"]:  # anything listed (acknowledged or not) is whole
                assert doc["chunks"] == expected_chunks, doc
            hits = client.post("/v1/collections/crash/search", json={"query": "marker3x7", "k": 1}).json()
            assert hits["results"][0]["document_id"] == "rec-3"
    finally:
        restarted.stop()


async def test_an_upload_the_cluster_refuses_fails_with_the_reason(pair, monkeypatch):
    """A refusal that retrying cannot mend (a wrong API key, say) fails the
    file at once rather than holding the queue."""
    from qdrant_client.http.exceptions import UnexpectedResponse

    def refused(*args, **kwargs):
        raise UnexpectedResponse(403, "Forbidden", b"wrong api key", None)

    assert (await pair["a"].client.post("/v1/collections", json={"name": "refused"})).status_code == 201
    monkeypatch.setattr(pair["a"].app.state.service.catalog.client, "upsert", refused)
    files = {"refused.txt": b"The lock keeper opened the gates at dawn."}
    job = await wait_job(pair["a"].client, (await upload(pair["a"].client, "refused", files))["id"])
    assert job["state"] == "failed", job
    assert "403" in job["files"][0]["error"]
