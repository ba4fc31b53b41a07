"""The service facade through the real app and HTTP routes, with the fake
encoder and the in-memory fake backend: the whole request -> store -> writer
-> backend -> search path, in seconds and without a model."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.factory import create_app
from app.service import SearchService
from app.settings import Settings
from tests.fakes import FakeEncoder, FakeInMemoryBackend


@contextlib.asynccontextmanager
async def fake_app(tmp_path, ready: bool = True, **overrides):
    """(app, service, client) of the real app over the fake encoder and
    backend; with ``ready``, once ``/ready`` says 200."""
    settings = Settings(
        _env_file=None,
        environment="test",
        data_dir=tmp_path,
        log_level="WARNING",
        answer_preload=False,
        **overrides,
    )
    service = SearchService(settings, encoder=FakeEncoder(), backend_factory=lambda s, e: FakeInMemoryBackend())
    app = create_app(settings, service=service)
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://localhost") as c:
            deadline = time.monotonic() + 30
            while ready and (await c.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, (await c.get("/ready")).text
                await asyncio.sleep(0.05)
            yield app, service, c


@pytest.fixture
async def client(tmp_path):
    async with fake_app(tmp_path) as (_, _, c):
        yield c


async def search(client, query: str, **body) -> list[str]:
    r = await client.post("/v1/collections/docs/search", json={"query": query, "k": 3, **body})
    assert r.status_code == 200, r.text
    return [h["document_id"] for h in r.json()["results"]]


async def test_upsert_search_filter_delete(client):
    assert (await client.post("/v1/collections", json={"name": "docs"})).status_code in (200, 201)
    docs = [
        {"id": "fox", "text": "The quick red fox jumps.", "metadata": {"kind": "land"}},
        {"id": "whale", "text": "The blue whale sings in the ocean.", "metadata": {"kind": "sea"}},
        {"id": "crab", "text": "A crab walks sideways on the ocean floor.", "metadata": {"kind": "sea"}},
    ]
    r = await client.post("/v1/collections/docs/documents", json={"documents": docs, "wait": True})
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == ["indexed"] * 3
    assert (await search(client, "blue whale"))[0] == "whale"
    assert (await search(client, "red fox", filter={"kind": "sea"}))[0] != "fox"
    assert (await search(client, "ocean floor crab", mode="keyword"))[0] == "crab"
    assert (await search(client, "ocean crab", mode="hybrid"))[0] == "crab"
    assert (await client.delete("/v1/collections/docs/documents/whale")).status_code in (200, 204)
    assert "whale" not in await search(client, "blue whale")
    ready = (await client.get("/ready")).json()
    assert ready["writer"]["role"] == "writer" and ready["writer"]["alive"] is True
    metrics = (await client.get("/metrics")).text
    assert 'colbert_index_writer{state="lease_held"} 1.0' in metrics
    assert 'colbert_collection_documents{collection="docs"} 2.0' in metrics


async def test_an_uploaded_file_becomes_searchable(client):
    await client.post("/v1/collections", json={"name": "docs"})
    files = [("files", ("notes.txt", b"Otters hold hands while they sleep.", "text/plain"))]
    job = (await client.post("/v1/collections/docs/files", files=files)).json()
    deadline = time.monotonic() + 30
    while job["state"] != "done":
        assert time.monotonic() < deadline and job["state"] != "failed", job
        await asyncio.sleep(0.05)
        job = (await client.get(f"/v1/jobs/{job['id']}")).json()
    assert job["chunks_done"] == job["chunks_total"] == 1
    assert await search(client, "otters sleep") == ["notes.txt"]


async def test_a_worker_whose_start_up_failed_answers_503_not_500(tmp_path, monkeypatch):
    """A worker that could not open its database stays up (``/ready`` says
    why); every route that needs the store answers 503 in the error shape."""

    def locked(path):
        import sqlite3

        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr("app.store.store.initialise", locked)
    async with fake_app(tmp_path, ready=False) as (app, _, c):
        deadline = time.monotonic() + 30
        while not app.state.startup.done():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        ready = await c.get("/ready")
        assert ready.status_code == 503 and "start-up failed" in ready.json()["error"]["message"]
        for method, url, body in (
            ("POST", "/v1/collections", {"name": "docs"}),
            ("GET", "/v1/collections", None),
            ("GET", "/v1/collections/docs", None),
        ):
            r = await c.request(method, url, json=body)
            assert r.status_code == 503, (url, r.text)
            assert r.json()["error"]["code"] == "not_ready"


async def test_a_new_generation_is_loaded_in_the_background_while_the_search_thread_is_busy(tmp_path):
    """Each worker loads its collections' new generations off the search
    thread, whether searched or not (``SNAPSHOT_REFRESH_S``)."""
    import threading

    async with fake_app(tmp_path, snapshot_refresh_s=0.05) as (_, service, c):
        deadline = time.monotonic() + 30
        assert (await c.post("/v1/collections", json={"name": "docs"})).status_code == 201
        body = {"documents": [{"id": "a", "text": "granite quarry"}], "wait": True}
        assert (await c.post("/v1/collections/docs/documents", json=body)).status_code == 200
        assert await search(c, "granite") == ["a"]
        collection_id = (await service.store.get_collection("docs")).id
        release = threading.Event()
        service._executor.submit(release.wait, 30)  # the search thread is busy from now on
        try:
            body = {"documents": [{"id": "b", "text": "basalt columns"}], "wait": True}
            assert (await c.post("/v1/collections/docs/documents", json=body)).status_code == 200
            generation = (await service.store.index_state("docs"))[1]
            while (cached := service.snapshots.cached(collection_id)).snapshot.generation != generation:
                assert time.monotonic() < deadline + 30, cached.snapshot.generation
                await asyncio.sleep(0.05)
            assert cached.snapshot.num_passages == 2
        finally:
            release.set()
        assert (await search(c, "basalt"))[0] == "b"
