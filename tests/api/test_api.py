"""The HTTP API with the real app and the real default model."""

from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from tests.conftest import RunningApp, make_settings

pytestmark = pytest.mark.slow

DOCS = [
    {"id": "paris", "text": "Paris is the capital and largest city of France, on the Seine."},
    {"id": "bananas", "text": "Bananas are yellow tropical fruits rich in potassium.", "metadata": {"team": "fruit"}},
    {"id": "python", "text": "Python is a programming language created by Guido van Rossum."},
    {"id": "volcano", "text": "A volcano is a rupture in the crust of a planet where lava escapes."},
    {"id": "tea", "text": "Green tea is made from unoxidised leaves of Camellia sinensis.", "title": "Tea"},
]


async def create(client, name: str):
    r = await client.post("/v1/collections", json={"name": name})
    assert r.status_code == 201, r.text
    return r.json()


async def upsert(client, name: str, docs, **extra):
    r = await client.post(f"/v1/collections/{name}/documents", json={"documents": docs, **extra})
    assert r.status_code == 200, r.text
    return r.json()["results"]


async def settled(service, timeout_s: float = 300.0) -> None:
    """Wait until the writer and its maintainer have nothing due (a first
    codec, a retraining, a merge): what the index looks like once caught up."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while not service.writer.settled():
        assert time.monotonic() < deadline, "background maintenance never settled"
        await asyncio.sleep(0.1)


async def search(client, name: str, query: str, k: int = 10):
    r = await client.post(f"/v1/collections/{name}/search", json={"query": query, "k": k})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def assert_error(r, status: int):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_health_ready_and_docs(client):
    assert (await client.get("/health")).json()["status"] == "ok"
    assert (await client.get("/ready")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/collections/{collection}/search" in spec["paths"]
    assert (await client.get("/docs")).status_code == 200


async def test_collections_lifecycle(client):
    created = await create(client, "life")
    assert created["documents"] == 0
    assert_error(await client.post("/v1/collections", json={"name": "life"}), 409)
    names = [c["name"] for c in (await client.get("/v1/collections")).json()["collections"]]
    assert "life" in names
    await upsert(client, "life", DOCS[:2])
    got = (await client.get("/v1/collections/life")).json()
    assert got["documents"] == 2 and got["chunks"] == 2
    assert (await client.delete("/v1/collections/life")).status_code == 204
    assert_error(await client.get("/v1/collections/life"), 404)
    # A new collection of the same name starts empty.
    await create(client, "life")
    assert await search(client, "life", "bananas") == []


async def test_search_of_empty_collection_and_one_document(client):
    await create(client, "tiny")
    assert await search(client, "tiny", "anything at all") == []
    await upsert(client, "tiny", DOCS[:1])
    hits = await search(client, "tiny", "capital of France", k=5)
    assert [h["document_id"] for h in hits] == ["paris"]
    hit = hits[0]
    for field in ("document_id", "chunk_id", "chunk_index", "text", "score", "rank", "title", "metadata"):
        assert field in hit
    assert hit["rank"] == 1 and hit["text"].startswith("Paris")


async def test_upsert_search_delete_replace(client):
    await create(client, "flow")
    results = await upsert(client, "flow", DOCS)
    assert [r["status"] for r in results] == ["indexed"] * len(DOCS)
    top = {
        q: (await search(client, "flow", q, k=1))[0]["document_id"]
        for q in (
            "capital city of France",
            "yellow fruit potassium",
            "programming language Guido",
            "lava from the crust",
        )
    }
    assert top == {
        "capital city of France": "paris",
        "yellow fruit potassium": "bananas",
        "programming language Guido": "python",
        "lava from the crust": "volcano",
    }
    # Delete: gone from the very next search, at any k.
    assert (await client.delete("/v1/collections/flow/documents/bananas")).status_code == 204
    hits = await search(client, "flow", "yellow fruit potassium", k=10)
    assert "bananas" not in [h["document_id"] for h in hits]
    assert len(hits) == len(DOCS) - 1
    assert_error(await client.get("/v1/collections/flow/documents/bananas"), 404)
    assert_error(await client.delete("/v1/collections/flow/documents/bananas"), 404)
    # Replace: only the new text is found.
    await upsert(client, "flow", [{"id": "paris", "text": "Octopuses have three hearts and blue blood."}])
    hits = await search(client, "flow", "capital city of France", k=10)
    assert all("Paris is the capital" not in h["text"] for h in hits)
    top = (await search(client, "flow", "how many hearts does an octopus have", k=1))[0]
    assert top["document_id"] == "paris" and "Octopuses" in top["text"]
    doc = (await client.get("/v1/collections/flow/documents/paris")).json()
    assert [c["text"] for c in doc["chunks"]] == ["Octopuses have three hearts and blue blood."]
    # Same content again: nothing to do.
    again = await upsert(client, "flow", [{"id": "paris", "text": "Octopuses have three hearts and blue blood."}])
    assert again[0]["status"] == "unchanged"


async def test_fields_with_the_real_model(client):
    """A document's named fields are found by field, and weighed, with the default checkpoint."""
    await create(client, "fielded")
    docs = [
        {
            "id": "tea",
            "text": "Leaves are withered, rolled and dried; the cup is pale and grassy.",
            "fields": {"title": "Green tea", "summary": "How green tea is made from Camellia sinensis leaves."},
        },
        {"id": "volcano", "text": "A volcano is a rupture in the crust of a planet where lava escapes."},
        {"id": "coffee", "text": "Coffee beans are roasted.", "fields": {"summary": "Roasting coffee beans."}},
    ]
    await upsert(client, "fielded", docs)
    got = (await client.get("/v1/collections/fielded/documents/tea")).json()
    assert got["title"] == "Green tea" and got["fields"] == docs[0]["fields"]
    assert [c["field"] for c in got["chunks"]] == ["text", "title", "summary"]

    async def run(**body):
        r = await client.post("/v1/collections/fielded/search", json={"k": 10, **body})
        assert r.status_code == 200, r.text
        return [(h["document_id"], h["field"], h["score"]) for h in r.json()["results"]]

    for mode in ("colbert", "keyword", "hybrid"):
        hits = await run(query="how is green tea made", mode=mode)
        assert hits[0][:2] in (("tea", "summary"), ("tea", "title"), ("tea", "text")), mode
        assert ("tea", "summary") in [h[:2] for h in hits], mode
        only = await run(query="how is green tea made", mode=mode, fields=["summary"])
        assert {h[1] for h in only} == {"summary"} and only[0][0] == "tea", mode
    titles = await run(query="green tea", fields=["title"], mode="colbert")
    assert [h[:2] for h in titles] == [("tea", "title")]
    weighted = await run(query="green tea", mode="colbert", field_weights={"title": 10, "summary": 0})
    assert weighted[0][:2] == ("tea", "title") and "summary" not in {h[1] for h in weighted}
    assert weighted[0][2] == pytest.approx(titles[0][2] * 10)


@pytest.mark.parametrize(
    "doc_id", ["with space", "a/b/c", "what?", "<tag>", "ünïcødé 文字", "100%", "/leading", "trailing/", "a#b&c=d"]
)
async def test_arbitrary_document_ids(client, doc_id):
    name = "ids"
    if (await client.get(f"/v1/collections/{name}")).status_code == 404:
        await create(client, name)
    text = f"A note about the identifier {doc_id} and mountain goats."
    await upsert(client, name, [{"id": doc_id, "text": text}])
    url = f"/v1/collections/{name}/documents/{quote(doc_id, safe='')}"
    r = await client.get(url)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == doc_id and r.json()["chunks"][0]["text"] == text
    hits = await search(client, name, f"identifier {doc_id}", k=50)
    assert doc_id in [h["document_id"] for h in hits]
    assert (await client.delete(url)).status_code == 204
    assert (await client.get(url)).status_code == 404


async def test_long_text_split_into_passages(client, app_env):
    await create(client, "long")
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(200)]
    sentences[150] = "The hidden treasure is buried under the old lighthouse."
    text = " ".join(sentences)
    await upsert(client, "long", [{"id": "book", "text": text}])
    doc = (await client.get("/v1/collections/long/documents/book")).json()
    assert len(doc["chunks"]) > 3
    service = app_env.app.state.service
    budget = service.encoder.passage_token_budget
    for chunk in doc["chunks"]:
        assert text[chunk["char_start"] : chunk["char_end"]] == chunk["text"]
        assert len(service.encoder.tokenizer(chunk["text"], add_special_tokens=False)["input_ids"]) <= budget
    top = (await search(client, "long", "where is the treasure buried", k=1))[0]
    assert "lighthouse" in top["text"]


async def test_reference_server_format(client):
    await create(client, "default")
    await upsert(client, "default", DOCS)
    r = await client.get("/api/search", params={"query": "capital of France", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == "capital of France"
    assert [t["rank"] for t in body["topk"]] == [1, 2, 3]
    assert body["topk"][0]["text"].startswith("Paris")
    assert abs(sum(t["prob"] for t in body["topk"]) - 1) < 1e-6
    assert {"text", "pid", "rank", "score", "prob"} <= set(body["topk"][0])


async def test_rerank(client):
    texts = ["Bananas are yellow.", "Paris is the capital of France.", "Tea is a drink."]
    r = await client.post("/v1/rerank", json={"query": "capital of France", "documents": texts})
    assert r.status_code == 200
    results = r.json()["results"]
    assert results[0]["index"] == 1
    assert sorted(x["index"] for x in results) == [0, 1, 2]
    assert results[0]["score"] >= results[1]["score"] >= results[2]["score"]


async def test_bad_input_changes_nothing(client):
    await create(client, "guard")
    await upsert(client, "guard", DOCS[:2])
    before = await search(client, "guard", "yellow fruit", k=10)
    coll = "/v1/collections/guard"
    bad_upserts = [
        {"documents": [{"id": "x", "text": ""}]},
        {"documents": [{"id": "x", "text": "   \n\t "}]},
        {"documents": [{"id": "x", "text": "a" * 1_000_001}]},
        {"documents": [{"id": "d", "text": "one"}, {"id": "d", "text": "two"}]},
        {"documents": [{"id": 5, "text": "numeric id"}]},
        {"documents": [{"id": "x", "text": ["not", "a", "string"]}]},
        {"documents": [{"id": "x", "text": "ok", "metadata": "not an object"}]},
        {"documents": []},
        {"documents": "nope"},
        {"docs": [{"text": "typo in field"}]},
        {"documents": [{"id": "", "text": "empty id"}]},
        {"documents": [{"id": "x", "text": "ok", "fields": {"Bad Name": "field"}}]},
        {"documents": [{"id": "x", "text": "ok", "fields": {"text": "the main field twice"}}]},
        {"documents": [{"id": "x", "text": "ok", "fields": {f"f{i}": "many" for i in range(17)}}]},
        {"documents": [{"id": "x", "text": "ok", "fields": {"summary": " "}}]},
    ]
    for body in bad_upserts:
        r = await client.post(f"{coll}/documents", json=body)
        assert r.status_code in (400, 413, 422), (body if len(str(body)) < 200 else "big", r.text)
        assert_error(r, r.status_code)
    r = await client.post(f"{coll}/documents", content=b'{"documents": [', headers={"content-type": "application/json"})
    assert_error(r, 400)
    # JSON allows lone surrogates; neither the tokenizer nor SQLite takes them.
    json_headers = {"content-type": "application/json"}
    for raw in (
        b'{"documents": [{"id": "s", "text": "bad \\ud800 text"}]}',
        b'{"documents": [{"id": "\\udfff", "text": "ok"}]}',
        b'{"documents": [{"id": "s", "text": "ok", "metadata": {"k": ["\\ud800"]}}]}',
        b'{"documents": [{"id": "s", "text": "ok", "fields": {"summary": "bad \\ud800"}}]}',
    ):
        assert_error(await client.post(f"{coll}/documents", content=raw, headers=json_headers), 422)
    assert_error(await client.post(f"{coll}/search", content=b'{"query": "\\ud800"}', headers=json_headers), 422)
    for k in (0, -1, 1001, "10", 2.5):
        assert_error(await client.post(f"{coll}/search", json={"query": "x", "k": k}), 422)
    assert_error(await client.post(f"{coll}/search", json={"query": ""}), 422)
    for choice in ({"fields": ["Bad"]}, {"fields": []}, {"field_weights": {"text": -1}}):
        assert_error(await client.post(f"{coll}/search", json={"query": "x", **choice}), 422)
    raw = b'{"query": "x", "field_weights": {"text": NaN}}'
    assert_error(await client.post(f"{coll}/search", content=raw, headers=json_headers), 422)
    assert_error(await client.post(f"{coll}/search", json={"query": 7}), 422)
    assert_error(
        await client.post(f"{coll}/search", content=b"{oops", headers={"content-type": "application/json"}), 400
    )
    for name in ("Upper", "-dash", "a" * 65, "sp ace", "dot.name", ""):
        assert_error(await client.post("/v1/collections", json={"name": name}), 422)
    assert_error(await client.post("/v1/collections/nope/search", json={"query": "x"}), 404)
    assert_error(await client.post("/v1/collections/nope/documents", json={"documents": [{"text": "x"}]}), 404)
    assert_error(await client.post("/v1/collections/BAD!/search", json={"query": "x"}), 422)
    assert_error(await client.get("/v1/no/such/route"), 404)
    # Nothing stored changed.
    info = (await client.get(coll)).json()
    assert info["documents"] == 2 and info["pending_documents"] == 0
    assert await search(client, "guard", "yellow fruit", k=10) == before
    ids = {d["id"] for d in (await client.get(f"{coll}/documents")).json()["documents"]}
    assert ids == {"paris", "bananas"}


async def test_values_that_broke_the_store_answer_4xx_and_change_nothing(client):
    """Each finding of the reliability review that answered 500 (or stored a
    value that made later searches answer 500), sent raw as a client could."""
    await create(client, "limits")
    await upsert(client, "limits", [{**DOCS[1], "metadata": {"team": "fruit", "n": 3}}, DOCS[0]])
    coll = "/v1/collections/limits"
    before = await search(client, "limits", "yellow fruit", k=10)
    json_headers = {"content-type": "application/json"}

    def doc_with(metadata: str) -> bytes:
        return b'{"documents": [{"id": "m", "text": "poison", "metadata": ' + metadata.encode() + b"}]}"

    for metadata in (
        '{"x": NaN}',
        '{"x": Infinity}',
        '{"x": [-Infinity]}',
        '{"x": 9223372036854775808}',
        '{"x": ' + "[" * 40 + "1" + "]" * 40 + "}",
        json.dumps({"x": "y" * 70_000}),
    ):
        assert_error(await client.post(f"{coll}/documents", content=doc_with(metadata), headers=json_headers), 422)
    # Nesting past the parser's own recursion limit: refused, not a 500.
    r = await client.post(f"{coll}/documents", content=doc_with("[" * 100_000 + "]" * 100_000), headers=json_headers)
    assert r.status_code in (400, 422), r.text
    assert_error(r, r.status_code)

    for raw in (
        b'{"query": "fruit", "filter": {"n": NaN}}',
        b'{"query": "fruit", "filter": {"n": 9223372036854775808}}',
        b'{"query": "fruit", "filter": {"n": {"$gt": -9223372036854775809}}}',
    ):
        assert_error(await client.post(f"{coll}/search", content=raw, headers=json_headers), 422)
    for where in ({"$or": [{"n": i} for i in range(998)]}, {f"k{i}": 1 for i in range(1000)}, {"team\n": "fruit"}):
        for mode in ("colbert", "keyword", "hybrid"):
            assert_error(
                await client.post(f"{coll}/search", json={"query": "fruit", "mode": mode, "filter": where}), 422
            )
    assert_error(await client.get(f"{coll}/documents", params={"offset": 2**63}), 422)
    assert_error(await client.post("/v1/collections", json={"name": "limits\n"}), 422)
    assert_error(await client.post("/v1/collections/limits%0A/search", json={"query": "x"}), 422)

    # The multipart upload applies the same limits to its JSON form fields.
    files = [("files", ("a.txt", b"Kiwis are small brown fruits.", "text/plain"))]
    for form in (
        {"ids": '["\\ud800"]'},
        {"ids": json.dumps(["x" * 1025])},
        {"metadata": '{"x": NaN}'},
        {"metadata": '{"x": 9223372036854775808}'},
    ):
        assert_error(await client.post(f"{coll}/files", files=files, data=form), 422)

    # Rerank runs on the shared search thread: its texts are bounded.
    assert_error(await client.post("/v1/rerank", json={"query": "q", "documents": ["x" * 10_001]}), 422)
    assert_error(await client.post("/v1/rerank", json={"query": "q", "documents": ["x" * 10_000] * 101}), 422)
    # A keyword query of thousands of distinct words searches its first terms.
    words = " ".join(f"w{i}" for i in range(1_500))  # about 8,400 characters
    r = await client.post(f"{coll}/search", json={"query": f"yellow {words}", "mode": "keyword"})
    assert r.status_code == 200, r.text
    assert [h["document_id"] for h in r.json()["results"]] == ["bananas"]

    # Nothing stored changed, and filtered searches of the collection still work.
    info = (await client.get(coll)).json()
    assert info["documents"] == 2 and info["pending_documents"] == 0
    assert await search(client, "limits", "yellow fruit", k=10) == before
    r = await client.post(f"{coll}/search", json={"query": "fruit", "filter": {"n": {"$gte": 3}}})
    assert r.status_code == 200 and [h["document_id"] for h in r.json()["results"]] == ["bananas"]
    assert (await client.get("/v1/jobs/none")).status_code == 404


async def test_generated_ids_and_listing(client):
    await create(client, "gen")
    results = await upsert(client, "gen", [{"text": "no id given here"}, {"text": "nor here"}])
    assert len({r["id"] for r in results}) == 2 and all(r["id"] for r in results)
    page = (await client.get("/v1/collections/gen/documents", params={"limit": 1})).json()
    assert page["total"] == 2 and len(page["documents"]) == 1


async def test_no_wait_upsert_is_acknowledged_then_indexed(client):
    await create(client, "nowait")
    r = await client.post(
        "/v1/collections/nowait/documents",
        json={"documents": [{"id": "n", "text": "Zebras have stripes."}], "wait": False},
    )
    assert r.status_code in (200, 202)
    import asyncio

    for _ in range(200):
        if await search(client, "nowait", "striped animal", k=1):
            break
        await asyncio.sleep(0.05)
    assert (await search(client, "nowait", "striped animal", k=1))[0]["document_id"] == "n"


async def test_plaid_tier_and_restart_keeps_results(tmp_path, checkpoint_dir):
    """Past exact_search_max_passages the index is PLAID; a restart changes no result."""
    settings = make_settings(tmp_path / "data", checkpoint_dir, exact_search_max_passages=20, rebuild_growth_factor=1.0)
    topics = ["astronomy", "cooking", "football", "chemistry", "music", "geology", "sailing", "poetry"]
    docs = [
        {
            "id": f"doc-{i}",
            "text": f"Document {i} is about {topics[i % 8]}; it mentions item {i} and the {topics[(i * 3) % 8]} club.",
        }
        for i in range(60)
    ]
    queries = [f"{t} club" for t in topics] + ["item 17", "document about sailing"]
    running = RunningApp(settings)
    client = await running.start()
    try:
        await create(client, "plaid")
        for i in range(0, 60, 15):
            await upsert(client, "plaid", docs[i : i + 15])
        await client.delete("/v1/collections/plaid/documents/doc-3")
        service = running.app.state.service
        await settled(service)  # the first codec, a retraining or a merge may be due
        before = {
            q: [(h["document_id"], h["chunk_index"]) for h in await search(client, "plaid", q, k=10)] for q in queries
        }
        collection_id = (await service.store.get_collection("plaid")).id
        assert service.snapshots.cached(collection_id).snapshot.kind == "plaid"
        assert all(len(v) == 10 for v in before.values())
        assert all("doc-3" not in [d for d, _ in v] for v in before.values())
    finally:
        await running.stop()
    running = RunningApp(settings)
    client = await running.start()
    try:
        after = {
            q: [(h["document_id"], h["chunk_index"]) for h in await search(client, "plaid", q, k=10)] for q in queries
        }
        assert after == before
    finally:
        await running.stop()


async def test_many_small_commits_keep_segment_count_bounded(client, app_env):
    from app.engine.index import IndexFiles
    from app.engine.plaid import MAX_SEGMENTS

    await create(client, "small-commits")
    animals = ["aardvark", "bison", "camel", "dingo", "eland", "ferret", "gecko", "heron", "ibis", "jackal"]
    for i in range(40):
        await upsert(client, "small-commits", [{"id": f"n{i}", "text": f"Note {i}: the {animals[i % 10]} number {i}."}])
    service = app_env.app.state.service
    row = await service.store.get_collection("small-commits")
    manifest = IndexFiles(service.settings.index_root / str(row.id)).read_manifest(row.manifest)
    assert row.generation >= 40
    assert len(manifest.segments) <= MAX_SEGMENTS
    for i in (0, 13, 39):
        hits = await search(client, "small-commits", f"the {animals[i % 10]} number {i}", k=5)
        assert f"n{i}" in [h["document_id"] for h in hits]
    assert len(await search(client, "small-commits", "note", k=40)) == 40


async def test_a_store_locked_past_its_busy_timeout_answers_503_and_changes_nothing(client, app_env, monkeypatch):
    import sqlite3

    await create(client, "busy")
    await upsert(client, "busy", [{"id": "kept", "text": "Basalt columns form as lava cools."}])
    store = app_env.app.state.service.documents.store

    async def locked(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store, "insert_pending", locked)
    r = await client.post("/v1/collections/busy/documents", json={"documents": [{"id": "new", "text": "Obsidian."}]})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "store_busy"
    monkeypatch.undo()
    hits = await search(client, "busy", "basalt lava", k=10)
    assert [h["document_id"] for h in hits] == ["kept"]


async def test_a_full_disk_answers_507_says_degraded_and_changes_nothing(client, app_env, monkeypatch):
    import sqlite3

    await create(client, "full")
    await upsert(client, "full", [{"id": "kept", "text": "Granite cools slowly underground."}])
    store = app_env.app.state.service.documents.store

    async def full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    async def full_then_no_rollback(*args, **kwargs):
        # SQLite rolled the full transaction back itself; a ROLLBACK after it fails.
        try:
            await full()
        except sqlite3.OperationalError:
            raise sqlite3.OperationalError("cannot rollback - no transaction is active") from None

    for failing in (full, full_then_no_rollback):
        monkeypatch.setattr(store, "insert_pending", failing)
        body = {"documents": [{"id": "new", "text": "Basalt."}]}
        r = await client.post("/v1/collections/full/documents", json=body)
        assert r.status_code == 507 and r.headers["retry-after"] == "30", failing.__name__
        assert r.json()["error"]["code"] == "storage_full"
    ready = (await client.get("/ready")).json()
    assert ready["status"] == "degraded" and ready["storage_full_s_ago"] >= 0
    monkeypatch.undo()
    app_env.app.state.storage_full_at = None  # the other tests of this app expect "ready"
    assert (await client.get("/ready")).json()["status"] == "ready"
    hits = await search(client, "full", "granite underground", k=10)
    assert [h["document_id"] for h in hits] == ["kept"]


async def test_the_openapi_document_states_the_limits_the_server_enforces(client):
    import re

    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    pattern = schemas["CollectionCreate"]["properties"]["name"]["pattern"]
    assert re.fullmatch(pattern, "notes") and not re.fullmatch(pattern, "Notes")  # "$": JSON Schema's end of text
    for path, item in spec["paths"].items():
        for operation in item.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "collection" and parameter["in"] == "path":
                    assert parameter["schema"]["pattern"] == pattern, path
                if parameter["name"] == "document_id":
                    assert parameter["schema"]["maxLength"] == 1024, path
    assert (
        spec["paths"]["/v1/collections/{collection}/documents"]["get"]["parameters"][-1]["schema"]["maximum"] == 2**53
    )
    rerank = schemas["RerankRequest"]["properties"]["documents"]
    assert rerank["maxItems"] == 1000 and rerank["items"]["maxLength"] == 10_000
    # What the schema declares is what a request meets.
    assert_error(await client.post("/v1/collections", json={"name": "Notes"}), 422)
    assert_error(await client.get("/v1/collections/Notes"), 422)
    assert_error(await client.get("/v1/collections/notes/documents/" + "x" * 1025), 422)
