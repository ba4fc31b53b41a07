"""The stateless tier's catalog (app/engine/qdrant_catalog.py) over
qdrant-client's local mode in memory, with the fake encoder: documents
written, replaced and deleted by id, filters as the SQLite catalog reads
them, and two catalogs over one store. No model."""

from __future__ import annotations

import pytest
import torch
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from app.engine.qdrant import COLBERT, QdrantConfig, query_vectors
from app.engine.qdrant_catalog import QdrantCatalog, chunk_filter, point_id
from app.errors import CollectionExists, CollectionNotFound, DocumentNotFound, InvalidInput
from app.ingest.chunking import Passage
from app.store.filters import FieldFilter
from app.store.store import NewDocument
from tests.fakes import FakeEncoder

ENCODER = FakeEncoder()
ANIMALS = ["aardvark", "bison", "camel", "dingo", "eland", "ferret", "gecko", "heron"]


def catalog(client: QdrantClient) -> QdrantCatalog:
    c = QdrantCatalog(QdrantConfig(dim=ENCODER.dim, dense_dim=ENCODER.dense_dim, prefix="t"), client)
    c.open()
    return c


@pytest.fixture
def pair():
    client = QdrantClient(":memory:")
    return catalog(client), catalog(client)


def document(doc_id: str, texts: list[str], **metadata) -> tuple[NewDocument, list[torch.Tensor], torch.Tensor]:
    chunks = [Passage(t, 0, len(t)) for t in texts]
    encoded = ENCODER.encode_passages(texts)
    doc = NewDocument(doc_id, None, metadata, f"hash-{doc_id}-{len(texts)}-{texts[0]}", chunks)
    return doc, list(torch.split(encoded.embs, encoded.doclens)), encoded.dense


def put(cat: QdrantCatalog, collection_id: str, doc: NewDocument, embs, dense) -> None:
    """One document written as the stateless service writes it (its stored record read first)."""
    cat.write_documents(collection_id, [(doc, embs, dense)], cat.records(collection_id, [doc.external_id]))


def write(cat: QdrantCatalog, collection_id: str, doc_id: str, texts: list[str], **metadata) -> None:
    put(cat, collection_id, *document(doc_id, texts, **metadata))


def colbert(cat: QdrantCatalog, collection_id: str, query: str, k: int = 5, where=None, fields=None) -> list[str]:
    Q = ENCODER.encode_queries([query])
    hits = cat.search(COLBERT, query_vectors(Q), k, chunk_filter(collection_id, where, fields))
    assert [s for _, s, _ in hits] == sorted((s for _, s, _ in hits), reverse=True)
    return [h.document_id for h, _, _ in hits]


def test_collections_are_shared_and_names_unique(pair):
    a, b = pair
    row = a.create_collection("zoo", "animals")
    assert b.get_collection("zoo") == row
    with pytest.raises(CollectionExists):
        b.create_collection("zoo", None)
    assert [r.name for r in b.list_collections()] == ["zoo"]
    write(a, row.id, "d", ["the camel is red"])
    b.delete_collection("zoo")
    with pytest.raises(CollectionNotFound):
        a.get_collection("zoo")
    again = a.create_collection("zoo", None)
    assert again.id != row.id and a.counts(again.id)["chunks"] == 0  # nothing of the old one


def test_writes_replaces_and_deletes_by_document_id(pair):
    a, b = pair
    cid = a.create_collection("zoo", None).id
    for i, animal in enumerate(ANIMALS):
        write(a, cid, f"d{i}", [f"the {animal} is red", f"the {animal} sleeps at noon", f"number {i}"], n=i)
    assert b.counts(cid) == {"documents": 8, "pending_documents": 0, "chunks": 24}
    assert colbert(b, cid, "the heron sleeps at noon")[0] == "d7"
    write(a, cid, "d7", ["the heron moved to the lake"])  # replaced: one chunk where there were three
    assert b.counts(cid)["chunks"] == 22
    doc = b.get_document(cid, "d7")
    assert [c["text"] for c in doc["chunks"]] == ["the heron moved to the lake"]
    assert doc["metadata"] == {}
    write(a, cid, "d7", ["the heron moved to the lake"])  # a retry: the same points again
    assert b.counts(cid)["chunks"] == 22
    b.delete_document(cid, "d3")
    assert "d3" not in colbert(a, cid, "the dingo is red", k=30)
    with pytest.raises(DocumentNotFound):
        a.get_document(cid, "d3")
    with pytest.raises(DocumentNotFound):
        a.delete_document(cid, "d3")
    page, total = b.list_documents(cid, limit=5, offset=5)
    assert total == 7 and len(page) == 2
    assert {d: r["content_hash"] for d, r in b.records(cid, ["d0", "d3"]).items()} == {
        "d0": "hash-d0-3-the aardvark is red"
    }


def test_filters_read_as_the_sqlite_catalog_reads_them(pair):
    a, _ = pair
    cid = a.create_collection("zoo", None).id
    for i, animal in enumerate(ANIMALS):
        meta = {"n": i, "even": i % 2 == 0, "kind": ["bird", "mammal"][i % 2]}
        if i != 5:
            meta["size"] = 1.5 * i
        write(a, cid, f"d{i}", [f"the {animal} is red"], **meta)
    cases = {
        "n >= 6": ({"n": {"$gte": 6}}, {"d6", "d7"}),
        "in": ({"kind": {"$in": ["bird"]}, "even": True}, {"d0", "d2", "d4", "d6"}),
        "ne excludes a missing key": ({"size": {"$ne": 3.0}}, {"d0", "d1", "d3", "d4", "d6", "d7"}),
        "nin keeps a missing key": ({"size": {"$nin": [0.0, 1.5]}}, {"d2", "d3", "d4", "d5", "d6", "d7"}),
        "or": ({"$or": [{"n": 1}, {"n": {"$lt": 1}}]}, {"d0", "d1"}),
        "and": ({"$and": [{"n": {"$gt": 2}}, {"n": {"$lte": 4}}]}, {"d3", "d4"}),
        "document ids": ({"$document_id": ["d2", "d9"]}, {"d2"}),
        "float equality": ({"size": 4.5}, {"d3"}),
    }
    for name, (where, expected) in cases.items():
        assert set(colbert(a, cid, "the red animal", k=20, where=where)) == expected, name
    for bad in ({"n": {"$gte": "six"}}, {"a.b": 1}, {"$not": {"n": 1}}):
        with pytest.raises(InvalidInput):
            colbert(a, cid, "x", where=bad)


def test_fields_restrict_chunks(pair):
    a, _ = pair
    cid = a.create_collection("zoo", None).id
    doc, embs, dense = document("f", ["the body text", "the summary of it"])
    doc.chunks[1] = Passage("the summary of it", 0, 17, field="summary")
    put(a, cid, doc, embs, dense)
    hits = colbert(a, cid, "the summary", fields=FieldFilter(include=("summary",)))
    assert hits == ["f"]
    Q = ENCODER.encode_queries(["the body"])
    found = a.search(COLBERT, query_vectors(Q), 5, chunk_filter(cid, None, FieldFilter(exclude=("summary",))))
    assert [h.field for h, _, _ in found] == ["text"]
    assert point_id(cid, "f", 0) != point_id(cid, "f", 1) != point_id(cid, "f")


def test_a_write_racing_the_collections_deletion_leaves_nothing_behind(pair):
    a, b = pair
    row = a.create_collection("zoo", None)
    write(a, row.id, "d", ["the camel is red"])
    a.check_alive(row)  # still there: nothing happens
    b.delete_collection("zoo")
    write(a, row.id, "late", ["the gecko is green"])  # its collection resolved before the delete
    with pytest.raises(CollectionNotFound):
        a.check_alive(row)
    assert a.counts(row.id)["chunks"] == 0
    b.create_collection("zoo", None)
    with pytest.raises(CollectionNotFound):  # made again: another id
        a.check_alive(row)


def test_what_a_write_cut_short_left_is_trimmed_or_deleted(pair):
    """A crash between a document's requests: chunks without a record are
    still deleted by id; chunks past the count are trimmed."""
    a, _ = pair
    cid = a.create_collection("zoo", None).id
    doc, embs, dense = document("cut", ["the tapir naps", "the tapir swims", "the tapir eats"])
    put(a, cid, doc, embs, dense)
    stray, stray_embs, stray_dense = document("cut", ["an old fourth chunk"])
    put(a, cid, stray, stray_embs, stray_dense)  # rewrites chunk 0 and trims 1 and 2
    assert a.counts(cid) == {"documents": 1, "pending_documents": 0, "chunks": 1}
    put(a, cid, doc, embs, dense)
    assert a.counts(cid)["chunks"] == 3
    a.trim(cid, {"cut": 2})
    assert [c["ord"] for c in a.get_document(cid, "cut")["chunks"]] == [0, 1]
    orphan, orphan_embs, orphan_dense = document("orphan", ["the okapi hides", "the okapi runs"])
    put(a, cid, orphan, orphan_embs, orphan_dense)
    a._delete(a.chunks, qm.PointIdsList(points=[point_id(cid, "orphan")]))  # its record never landed
    assert "orphan" in colbert(a, cid, "the okapi hides")
    a.delete_document(cid, "orphan")
    assert "orphan" not in colbert(a, cid, "the okapi hides", k=10)
    with pytest.raises(DocumentNotFound):
        a.delete_document(cid, "orphan")
