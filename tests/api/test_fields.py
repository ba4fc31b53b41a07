"""Multi-field documents through HTTP: the real app over the fake encoder and
the in-memory backend (tests/test_service.py's ``fake_app``)."""

from __future__ import annotations

import json

import pytest

from tests.test_service import fake_app

DOCS = [
    {
        "id": "harbour",
        "text": "The crane lifts steel containers onto ships at dawn.",
        "fields": {"title": "Harbour logistics", "summary": "Cranes and containers at the port."},
    },
    {
        "id": "bakery",
        "text": "Bread dough rises overnight in a cold kitchen.",
        "fields": {"summary": "Sourdough baking notes.", "title": "Bakery"},
    },
    {
        "id": "glacier",
        "title": "Ice",
        "text": "Glaciers carve valleys over many centuries.",
        "fields": {"summary": "Ice shaping the land."},
    },
    {"id": "ocean", "text": "Containers ship goods across the ocean."},
]


@pytest.fixture
async def client(tmp_path):
    async with fake_app(tmp_path, max_document_chars=2_000) as (_, _, c):
        assert (await c.post("/v1/collections", json={"name": "docs"})).status_code == 201
        r = await c.post("/v1/collections/docs/documents", json={"documents": DOCS})
        assert r.status_code == 200, r.text
        assert [x["status"] for x in r.json()["results"]] == ["indexed"] * len(DOCS)
        yield c


async def search(client, query: str, **body) -> list[dict]:
    r = await client.post("/v1/collections/docs/search", json={"query": query, "mode": "colbert", **body})
    assert r.status_code == 200, r.text
    return r.json()["results"]


def where(hits: list[dict]) -> list[tuple[str, str]]:
    return [(h["document_id"], h["field"]) for h in hits]


async def test_a_document_keeps_its_fields_and_each_chunk_its_field(client):
    doc = (await client.get("/v1/collections/docs/documents/harbour")).json()
    assert doc["fields"] == DOCS[0]["fields"]
    assert doc["title"] == "Harbour logistics"  # no title given: the title field's
    assert [(c["chunk_index"], c["field"], c["text"]) for c in doc["chunks"]] == [
        (0, "text", DOCS[0]["text"]),
        (1, "title", "Harbour logistics"),
        (2, "summary", "Cranes and containers at the port."),
    ]
    glacier = (await client.get("/v1/collections/docs/documents/glacier")).json()
    assert glacier["title"] == "Ice" and glacier["fields"] == {"summary": "Ice shaping the land."}
    ocean = (await client.get("/v1/collections/docs/documents/ocean")).json()
    assert ocean["fields"] == {} and [c["field"] for c in ocean["chunks"]] == ["text"]
    counts = (await client.get("/v1/collections/docs")).json()
    assert (counts["documents"], counts["chunks"]) == (4, 9)
    # The same text and fields again: unchanged; a changed field: indexed again.
    r = await client.post("/v1/collections/docs/documents", json={"documents": DOCS[:1]})
    assert r.json()["results"][0]["status"] == "unchanged"
    changed = {**DOCS[0], "fields": {**DOCS[0]["fields"], "summary": "Cranes at the port."}}
    r = await client.post("/v1/collections/docs/documents", json={"documents": [changed]})
    assert r.json()["results"][0]["status"] == "indexed"


async def test_a_chunk_of_a_named_field_is_found_and_reports_its_field(client):
    hits = await search(client, "sourdough baking notes", k=3)
    assert where(hits)[0] == ("bakery", "summary")
    assert hits[0]["text"] == "Sourdough baking notes." and hits[0]["title"] == "Bakery"
    for mode in ("keyword", "dense", "hybrid"):
        hits = await search(client, "sourdough baking notes", k=3, mode=mode)
        assert where(hits)[0] == ("bakery", "summary"), mode
        assert all(h["field"] in ("text", "title", "summary") for h in hits)


async def test_a_fields_choice_returns_k_hits_of_those_fields_only(client):
    # Unrestricted, text chunks lead for this query.
    assert where(await search(client, "containers ship goods", k=1)) == [("ocean", "text")]
    for mode in ("colbert", "dense", "keyword", "hybrid"):
        hits = await search(client, "containers ship goods", k=3, fields=["summary"], mode=mode)
        if mode == "keyword":  # only chunks holding a query word
            assert where(hits) == [("harbour", "summary")]
            continue
        assert len(hits) == 3, mode
        assert {h["field"] for h in hits} == {"summary"}, mode
        assert [h["rank"] for h in hits] == [1, 2, 3]
    titles = await search(client, "bakery", k=10, fields=["title"])
    assert sorted(where(titles)) == [("bakery", "title"), ("harbour", "title")]
    assert where(titles)[0] == ("bakery", "title")
    both = await search(client, "ice", k=10, fields=["title", "text"])
    assert {h["field"] for h in both} == {"title", "text"} and len(both) == 6
    assert await search(client, "ice", k=10, fields=["nothing_here"]) == []
    # With a metadata filter, both apply before ranking.
    assert where(await search(client, "ice", k=10, fields=["summary"], filter={"$document_id": "glacier"})) == [
        ("glacier", "summary")
    ]


async def test_field_weights_multiply_scores_and_reorder(client):
    plain = await search(client, "containers ship goods", k=9)
    assert where(plain)[0] == ("ocean", "text")
    summary_top = (await search(client, "containers ship goods", k=1, fields=["summary"]))[0]
    # Weighted, a chunk below the top k climbs into it (retrieval went deeper than k).
    assert where(await search(client, "containers ship goods", k=1, field_weights={"summary": 100})) == [
        ("harbour", "summary")
    ]
    weighted = await search(client, "containers ship goods", k=3, field_weights={"summary": 100})
    assert where(weighted)[0] == ("harbour", "summary")
    assert weighted[0]["score"] == pytest.approx(summary_top["score"] * 100)
    assert [h["rank"] for h in weighted] == [1, 2, 3]
    assert weighted[0]["score"] >= weighted[1]["score"] >= weighted[2]["score"]
    # Every hit's score is its score times its field's weight, ranked by that.
    scores = {(h["document_id"], h["field"]): h["score"] for h in plain}
    down = await search(client, "containers ship goods", k=9, field_weights={"text": 0.001, "title": 2})
    assert len(down) == 9 and [h["score"] for h in down] == sorted((h["score"] for h in down), reverse=True)
    weight = {"text": 0.001, "title": 2, "summary": 1}
    for h in down:
        assert h["score"] == pytest.approx(scores[(h["document_id"], h["field"])] * weight[h["field"]])
    assert where(down)[0] != ("ocean", "text")
    # A weight of 0 excludes the field before ranking: k hits of the others.
    no_text = await search(client, "containers ship goods", k=5, field_weights={"text": 0})
    assert len(no_text) == 5 and "text" not in {h["field"] for h in no_text}
    for h in no_text:  # the other fields weigh 1: their scores are unchanged
        assert h["score"] == pytest.approx(scores[(h["document_id"], h["field"])])


async def test_replace_and_delete_remove_every_fields_chunks(client):
    r = await client.post("/v1/collections/docs/documents", json={"documents": [{"id": "harbour", "text": "Quay."}]})
    assert r.json()["results"][0]["status"] == "indexed"
    doc = (await client.get("/v1/collections/docs/documents/harbour")).json()
    assert doc["fields"] == {} and doc["title"] is None and [c["field"] for c in doc["chunks"]] == ["text"]
    for mode in ("colbert", "keyword"):
        hits = await search(client, "harbour logistics cranes containers port", k=20, mode=mode)
        assert ("harbour", "title") not in where(hits) and ("harbour", "summary") not in where(hits), mode
    assert (await client.delete("/v1/collections/docs/documents/bakery")).status_code == 204
    for mode in ("colbert", "keyword", "dense", "hybrid"):
        hits = await search(client, "bakery sourdough bread", k=20, mode=mode)
        assert "bakery" not in {h["document_id"] for h in hits}, mode
    assert len(await search(client, "anything", k=20, fields=["summary", "title"])) == 1  # glacier's summary
    counts = (await client.get("/v1/collections/docs")).json()
    assert (counts["documents"], counts["chunks"]) == (3, 4)


async def _stored(client) -> tuple:
    collection = (await client.get("/v1/collections/docs")).json()
    docs = [(await client.get(f"/v1/collections/docs/documents/{d['id']}")).json() for d in DOCS]
    return collection["documents"], collection["chunks"], collection["generation"], docs


def _error(r, status: int = 422) -> None:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]["code"] and r.json()["error"]["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"Title": "x"},
        {"has-dash": "x"},
        {"1st": "x"},
        {"x" * 65: "x"},
        {"text": "the main field by another way"},
        {f"f{i}": "x" for i in range(17)},
        {"summary": "   "},
        {"summary": 3},
        {"summary": ["a"]},
        {"summary": None},
        {"summary": "x" * 2_000},  # with the text, past MAX_DOCUMENT_CHARS
        [["summary", "x"]],
        "summary",
    ],
)
async def test_bad_fields_are_refused_and_nothing_changes(client, fields):
    before = await _stored(client)
    doc = {"id": "harbour", "text": "Replaced?", "fields": fields}
    r = await client.post("/v1/collections/docs/documents", json={"documents": [{"id": "new", "text": "New."}, doc]})
    _error(r)
    assert await _stored(client) == before


async def test_bad_field_choices_are_refused(client):
    for body in (
        {"fields": []},
        {"fields": ["Bad"]},
        {"fields": "summary"},
        {"fields": [f"f{i}" for i in range(65)]},
        {"field_weights": {"summary": -1}},
        {"field_weights": {"summary": 1e9}},
        {"field_weights": {"summary": "2"}},
        {"field_weights": {"Summary": 2}},
        {"field_weights": ["summary"]},
        {"fields": ["title"], "field_weights": {"title": 0}},
    ):
        _error(await client.post("/v1/collections/docs/search", json={"query": "x", **body}))
        _error(await client.post("/v1/collections/docs/answer", json={"question": "x", **body}))
    for raw in (
        '{"query": "x", "field_weights": {"summary": NaN}}',
        '{"query": "x", "field_weights": {"t": Infinity}}',
    ):
        r = await client.post("/v1/collections/docs/search", content=raw, headers={"Content-Type": "application/json"})
        _error(r)


async def test_the_openapi_document_describes_fields(client):
    spec = (await client.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    names = schemas["DocumentIn"]["properties"]["fields"]["anyOf"][0]
    assert names["maxProperties"] == 16 and names["additionalProperties"] is False
    assert list(names["patternProperties"]) == ["^[a-z][a-z0-9_]{0,63}$"]
    for model in ("SearchRequest", "AnswerRequest"):
        properties = schemas[model]["properties"]
        assert properties["fields"]["description"] and properties["field_weights"]["description"]
        weight = next(iter(properties["field_weights"]["anyOf"][0]["patternProperties"].values()))
        assert (weight["minimum"], weight["maximum"]) == (0, 1000)
    for model in ("SearchHitOut", "ChunkOut", "ContextOut"):
        assert "field" in schemas[model]["required"], model
    assert json.dumps(schemas["DocumentOut"]["properties"]["fields"])
