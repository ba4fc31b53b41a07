"""The server on the Qdrant backend (qdrant-client's local mode in a
directory), through HTTP with the real model: every search mode and filters,
replaces and deletes, and a restart that loses nothing."""

from __future__ import annotations

import pytest

from app.engine.qdrant import QdrantSnapshot
from tests.api.test_api import create, settled, upsert
from tests.conftest import RunningApp, make_settings

pytestmark = pytest.mark.slow

TOPICS = ["astronomy", "cooking", "football", "chemistry", "music", "geology", "sailing", "poetry"]


def docs(n: int) -> list[dict]:
    return [
        {
            "id": f"doc-{i}",
            "text": f"Report {i} covers {TOPICS[i % 8]}. The {TOPICS[i % 8]} committee met in year {2000 + i % 20}.",
            "metadata": {"year": 2000 + i % 20, "lang": ["en", "de"][i % 2], "public": i % 3 == 0},
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
async def qdrant_app(tmp_path_factory, checkpoint_dir):
    data = tmp_path_factory.mktemp("qdrant-data")
    settings = make_settings(data, checkpoint_dir, index_backend="qdrant", qdrant_path=data / "qdrant")
    running = RunningApp(settings)
    await running.start()
    await create(running.client, "reports")
    await upsert(running.client, "reports", docs(120))
    yield running
    await running.stop()


async def search(client, **body) -> list[dict]:
    r = await client.post("/v1/collections/reports/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


async def test_every_mode_finds_the_document_and_filters_hold(qdrant_app):
    client = qdrant_app.client
    service = qdrant_app.app.state.service
    row = await service.store.get_collection("reports")
    await search(client, query="warm up")
    assert isinstance(service.snapshots.cached(row.id).snapshot, QdrantSnapshot)
    for mode in ("colbert", "dense", "keyword", "hybrid"):
        hits = await search(client, query="Report 37 covers geology", k=5, mode=mode)
        assert len(hits) == 5, mode
        assert hits[0]["document_id"] == "doc-37", (mode, hits[0])
    hits = await search(client, query="the geology committee", k=10, filter={"lang": "de", "year": {"$gte": 2010}})
    assert len(hits) == 10
    assert all(h["metadata"]["lang"] == "de" and h["metadata"]["year"] >= 2010 for h in hits)
    stats = (await client.get("/v1/collections/reports")).json()
    assert stats["index"]["kind"] == "qdrant" and stats["index"]["passages"] == 120, stats


async def test_replaces_and_deletes_show_at_once_and_are_purged(qdrant_app):
    client = qdrant_app.client
    await upsert(client, "reports", [{"id": "doc-5", "text": "Zeppelins are airships held up by lifting gas."}])
    hits = await search(client, query="airships and lifting gas", k=3)
    assert hits[0]["document_id"] == "doc-5" and "Zeppelins" in hits[0]["text"]
    assert (await client.delete("/v1/collections/reports/documents/doc-6")).status_code in (200, 204)
    hits = await search(client, query="Report 6 covers sailing", k=10, mode="colbert")
    assert "doc-6" not in {h["document_id"] for h in hits}
    service = qdrant_app.app.state.service
    await settled(service)  # the maintainer deleted the replaced and deleted passages' points
    row = await service.store.get_collection("reports")
    assert await service.store.dead_passage_ids(row.id) == []
    assert (await client.get("/v1/collections/reports")).json()["index"]["passages"] == 119


async def test_a_restart_loses_nothing(qdrant_app):
    client = qdrant_app.client
    before = await search(client, query="the chemistry committee in 2003", k=10)
    await qdrant_app.stop()
    await qdrant_app.start()
    after = await search(qdrant_app.client, query="the chemistry committee in 2003", k=10)
    assert [h["document_id"] for h in after] == [h["document_id"] for h in before]
    assert [h["score"] for h in after] == pytest.approx([h["score"] for h in before], abs=1e-3)
    hits = await search(qdrant_app.client, query="airships and lifting gas", k=1)
    assert hits[0]["document_id"] == "doc-5"


async def test_another_node_on_the_same_qdrant_leaves_this_ones_collections_alone(qdrant_app, tmp_path, checkpoint_dir):
    """Two single-node servers (each its own data directory) over one Qdrant:
    the second's start-up recovery does not take the first's collections
    for leftovers of its own."""
    other = RunningApp(
        make_settings(tmp_path, checkpoint_dir, index_backend="qdrant", qdrant_path=qdrant_app.settings.qdrant_path)
    )
    await other.start()
    try:
        await create(other.client, "reports")  # the same name, another node's collection
        await upsert(other.client, "reports", [{"id": "elsewhere", "text": "Only the other node has this."}])
        hits = await search(other.client, query="which node has this", k=5)
        assert [h["document_id"] for h in hits] == ["elsewhere"]
    finally:
        await other.stop()
    hits = await search(qdrant_app.client, query="the chemistry committee in 2003", k=10)
    assert len(hits) == 10 and "elsewhere" not in {h["document_id"] for h in hits}
