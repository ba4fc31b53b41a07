"""Filters, keyword and hybrid search through HTTP, on a PLAID-sized collection."""

from __future__ import annotations

import pytest

from tests.api.test_api import assert_error, create, settled, upsert

pytestmark = pytest.mark.slow

TOPICS = ["astronomy", "cooking", "football", "chemistry", "music", "geology", "sailing", "poetry", "weather", "trains"]


@pytest.fixture(scope="module")
async def filtered_collection(app_env):
    client = app_env.client
    await create(client, "filtered")
    docs = []
    for i in range(300):
        topic = TOPICS[i % 10]
        docs.append(
            {
                "id": f"doc-{i}",
                "text": f"Report {i} covers {topic}. The {topic} committee met in year {2000 + i % 30}.",
                "metadata": {
                    "team": "rare" if i % 100 == 7 else "common",  # 1% of the documents
                    "year": 2000 + i % 30,
                    "lang": ["en", "de", "fr"][i % 3],
                    "public": i % 2 == 0,
                },
            }
        )
    for i in range(0, 300, 100):
        await upsert(client, "filtered", docs[i : i + 100])
    await settled(app_env.app.state.service)  # its first codec is trained in the background
    return docs


async def run(client, **body):
    r = await client.post("/v1/collections/filtered/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"]


async def test_filter_with_one_percent_matching_returns_k(client, filtered_collection, app_env):
    hits = await run(client, query="football committee", k=3, filter={"team": "rare"})
    service = app_env.app.state.service
    row = await service.store.get_collection("filtered")
    assert service.snapshots.cached(row.id).snapshot.kind == "plaid"
    assert len(hits) == 3
    assert {h["document_id"] for h in hits} == {"doc-7", "doc-107", "doc-207"}
    assert all(h["metadata"]["team"] == "rare" for h in hits)
    # Asking for more than match: all matching, nothing else.
    assert len(await run(client, query="football", k=10, filter={"team": "rare"})) == 3


async def test_filter_operators(client, filtered_collection):
    by_id = {d["id"]: d["metadata"] for d in filtered_collection}
    cases = [
        ({"lang": {"$in": ["de", "fr"]}}, lambda m: m["lang"] in ("de", "fr")),
        ({"year": {"$gte": 2010, "$lt": 2012}}, lambda m: 2010 <= m["year"] < 2012),
        ({"$and": [{"lang": "en"}, {"public": True}]}, lambda m: m["lang"] == "en" and m["public"]),
        ({"$or": [{"year": 2001}, {"year": {"$gt": 2028}}]}, lambda m: m["year"] == 2001 or m["year"] > 2028),
        ({"lang": {"$nin": ["en"]}, "year": {"$lte": 2003}}, lambda m: m["lang"] != "en" and m["year"] <= 2003),
        ({"$document_id": ["doc-1", "doc-2", "doc-250"]}, None),
    ]
    for where, predicate in cases:
        hits = await run(client, query="committee report", k=20, filter=where)
        expected = {i for i, m in by_id.items() if predicate(m)} if predicate else {"doc-1", "doc-2", "doc-250"}
        assert len(hits) == min(20, len(expected)), where
        assert {h["document_id"] for h in hits} <= expected, where


async def test_bad_filters_are_refused(client, filtered_collection):
    for where in (
        {"year": {"$regex": "20.*"}},
        {"$not": {"team": "rare"}},
        {"$and": "team"},
        {"lang": {"$in": []}},
        {"team": {"nested": "object"}},
        {"team": ["list", "without", "operator"]},
        {},
    ):
        r = await client.post("/v1/collections/filtered/search", json={"query": "x", "filter": where})
        assert_error(r, 422)


async def test_keyword_and_hybrid_modes(client, filtered_collection):
    hits = await run(client, query="Report 123", k=5, mode="keyword")
    assert hits[0]["document_id"] == "doc-123"
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    for fusion in ("rrf", "normalized", "rescore"):
        hybrid = await run(client, query="Report 123 chemistry", k=5, mode="hybrid", fusion=fusion)
        assert len(hybrid) == 5 and "doc-123" in [h["document_id"] for h in hybrid[:2]]
        assert hybrid[0]["score"] >= hybrid[-1]["score"]
    filtered = await run(client, query="committee", k=10, mode="keyword", filter={"team": "rare"})
    assert {h["document_id"] for h in filtered} == {"doc-7", "doc-107", "doc-207"}
    hybrid_filtered = await run(client, query="committee", k=10, mode="hybrid", filter={"team": "rare"})
    assert {h["document_id"] for h in hybrid_filtered} == {"doc-7", "doc-107", "doc-207"}
    assert_error(await client.post("/v1/collections/filtered/search", json={"query": "x", "mode": "fuzzy"}), 422)


async def test_dense_mode_and_hybrid_weights(client, filtered_collection):
    dense = await run(client, query="football committee", k=5, mode="dense")
    assert len(dense) == 5 and dense[0]["score"] >= dense[-1]["score"]
    assert all(-1.0 <= h["score"] <= 1.0 for h in dense)  # a cosine
    rare = await run(client, query="football committee", k=10, mode="dense", filter={"team": "rare"})
    assert {h["document_id"] for h in rare} == {"doc-7", "doc-107", "doc-207"}

    r = await client.post("/v1/collections/filtered/search", json={"query": "Report 123 chemistry", "k": 5})
    assert r.status_code == 200 and r.json()["mode"] == "colbert"  # the default mode
    assert "doc-123" in [h["document_id"] for h in r.json()["results"][:2]]

    # One signal weighted: hybrid ranks as that signal does (the others only add candidates).
    for only in ("keyword", "dense", "colbert"):
        single = await run(client, query="Report 123 chemistry", k=5, mode=only)
        weighted = await run(client, query="Report 123 chemistry", k=5, mode="hybrid", weights={only: 1})
        assert [h["document_id"] for h in weighted][:3] == [h["document_id"] for h in single][:3], only
    for weights in ({}, {"colbert": 0}, {"dense": -1}, {"bm25": 1}, {"colbert": "1"}, {"keyword": 1e9}):
        r = await client.post(
            "/v1/collections/filtered/search", json={"query": "x", "mode": "hybrid", "weights": weights}
        )
        assert_error(r, 422)


async def test_deleted_documents_leave_keyword_results(client):
    await create(client, "kw-delete")
    await upsert(client, "kw-delete", [{"id": "a", "text": "quetzalcoatl feathers"}, {"id": "b", "text": "plain text"}])
    r = await client.post("/v1/collections/kw-delete/search", json={"query": "quetzalcoatl", "mode": "keyword"})
    assert [h["document_id"] for h in r.json()["results"]] == ["a"]
    await client.delete("/v1/collections/kw-delete/documents/a")
    r = await client.post("/v1/collections/kw-delete/search", json={"query": "quetzalcoatl", "mode": "keyword"})
    assert r.json()["results"] == []
