"""Collections, documents and chunks kept in Qdrant with their vectors
(``STATELESS=true``): all that a server reads and writes lives in the
cluster, so any number of servers, on any machines, serve the same data.

Two Qdrant collections under the prefix:

- ``<prefix>_collections``: one point (no vectors) per server collection:
  its name, description, creation time and a random id (a collection deleted
  and created again is a new id: writes still in flight for the old one land
  nowhere anyone reads);
- ``<prefix>_chunks``: every collection's points (Qdrant's advice for many
  tenants: one collection, a tenant key ``c`` with its own index). Per chunk
  one point, id ``uuid5(collection, document, chunk index)``, with the token
  vectors (MaxSim), the dense vector, BM25 words, and a payload of the chunk
  and its document's title, metadata and field; per document one point
  without vectors (``kind: doc``) holding its fields, hash and chunk count.

A write is idempotent (the same ids and payload again) and waits for the
configured replicas. A document's chunks and record go in one request when
they fit one (about 4,096 token vectors), which Qdrant applies whole: a
server dying mid-write leaves the document as it was or as written. A
replace writes the new chunks over the old ones' ids, then deletes the old
chunks past the new count: between the two, a search may see the new chunks
with those. Two servers replacing one document at the same moment may leave
a mix of the two until it is written again (Qdrant has no transactions
across points); deleting it removes every point of it either way.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from qdrant_client import models as qm

from app.engine.qdrant import COLBERT, DENSE, SPARSE, QdrantStorage, bm25_query, point_vectors
from app.errors import BackendUnavailable, CollectionExists, CollectionNotFound, DocumentNotFound, InvalidInput
from app.ingest.pipeline import passage_text
from app.store.filters import FieldFilter, compile_filter
from app.store.store import Hit, NewDocument

logger = logging.getLogger("app.engine")

NAMESPACE = uuid.UUID("9b4f6c52-8d1e-4b7a-9f57-3c2e1d0a6b18")
SCROLL = 256
MAX_METADATA_INDEXES = 64  # metadata keys a server indexes for filters (any caller can name a key)


def point_id(collection_id: str, document_id: str, chunk: int | None = None) -> str:
    """A chunk's (or, with no chunk, its document's) point id: the same for every retry."""
    key = f"{collection_id}\0{document_id}" + ("" if chunk is None else f"\0{chunk}")
    return str(uuid.uuid5(NAMESPACE, key))


def short_id(point: str | int) -> int:
    """A point's id as a JSON-safe integer (53 bits) for ``chunk_id``."""
    return uuid.UUID(str(point)).int >> 75


@dataclass(frozen=True)
class CatalogCollection:
    id: str
    name: str
    description: str | None
    created_at: float


def _match(key: str, value: Any) -> qm.Condition:
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # 3 matches 3.0, as in SQL
        return qm.FieldCondition(key=key, range=qm.Range(gte=value, lte=value))
    return qm.FieldCondition(key=key, match=qm.MatchValue(value=value))


def _any(key: str, values: list) -> list[qm.Condition]:
    """Conditions one of which matches any of ``values``: the strings in one."""
    strings = [v for v in values if isinstance(v, str)]
    out = [_match(key, v) for v in values if not isinstance(v, str)]
    if strings:
        out.append(qm.FieldCondition(key=key, match=qm.MatchAny(any=strings)))
    return out


def _key(name: str) -> str:
    if name == "$document_id":
        return "doc"
    if any(c in name for c in '.[]"'):  # Qdrant reads these as a path into nested objects
        raise InvalidInput(f"filter key {name!r}: keys with . [ ] or quotes cannot be filtered on with Qdrant")
    return f"metadata.{name}"


def _range(key: str, op: str, value: Any) -> qm.Condition:
    if isinstance(value, str) or isinstance(value, bool):
        raise InvalidInput(f"filter {key}.{op}: this server compares numbers only (Qdrant ranges are numeric)")
    bound = {"$gt": "gt", "$gte": "gte", "$lt": "lt", "$lte": "lte"}[op]
    return qm.FieldCondition(key=_key(key), range=qm.Range(**{bound: value}))


def _condition(name: str, spec: Any) -> qm.Filter:
    key = _key(name)
    if name == "$document_id" and isinstance(spec, list):
        spec = {"$in": spec}
    if not isinstance(spec, dict):
        return qm.Filter(must=[_match(key, spec)])
    must: list[qm.Condition] = []
    for op, value in spec.items():
        if op == "$eq":
            must.append(_match(key, value))
        elif op == "$ne":  # as SQL's != does: a document without the key does not match
            must.append(
                qm.Filter(must_not=[_match(key, value), qm.IsEmptyCondition(is_empty=qm.PayloadField(key=key))])
            )
        elif op == "$in":
            must.append(qm.Filter(should=_any(key, value)))
        elif op == "$nin":  # a document without the key matches, as in SQL's IS NULL OR NOT IN
            must.append(qm.Filter(must_not=_any(key, value)))
        else:
            must.append(_range(name, op, value))
    return qm.Filter(must=must)


def _translate(node: dict) -> qm.Filter:
    must: list[qm.Condition] = []
    for key, value in node.items():
        if key == "$and":
            must.extend(_translate(v) for v in value)
        elif key == "$or":
            must.append(qm.Filter(should=[_translate(v) for v in value]))
        else:
            must.append(_condition(key, value))
    return qm.Filter(must=must)


def metadata_filter(where: dict | None) -> qm.Filter | None:
    """A Chroma-style filter (:mod:`app.store.filters`, checked there first) as a Qdrant filter."""
    if where is None:
        return None
    compile_filter(where)  # the same grammar and limits as the SQLite catalog: refused with the same errors
    return _translate(where)


def chunk_filter(collection_id: str, where: dict | None = None, fields: FieldFilter | None = None) -> qm.Filter:
    """A collection's chunks, under a metadata filter and a choice of fields."""
    must: list[qm.Condition] = [
        qm.FieldCondition(key="c", match=qm.MatchValue(value=collection_id)),
        qm.FieldCondition(key="kind", match=qm.MatchValue(value="chunk")),
    ]
    translated = metadata_filter(where)
    if translated is not None:
        must.append(translated)
    must_not: list[qm.Condition] = []
    if fields is not None and fields.include is not None:
        must.append(qm.FieldCondition(key="field", match=qm.MatchAny(any=list(fields.include))))
    if fields is not None and fields.exclude:
        must_not.append(qm.FieldCondition(key="field", match=qm.MatchAny(any=list(fields.exclude))))
    return qm.Filter(must=must, must_not=must_not or None)


def _document_filter(collection_id: str, document_id: str | None = None, kind: str | None = None) -> qm.Filter:
    must: list[qm.Condition] = [qm.FieldCondition(key="c", match=qm.MatchValue(value=collection_id))]
    if document_id is not None:
        must.append(qm.FieldCondition(key="doc", match=qm.MatchValue(value=document_id)))
    if kind is not None:
        must.append(qm.FieldCondition(key="kind", match=qm.MatchValue(value=kind)))
    return qm.Filter(must=must)


def hit_of(point) -> Hit:
    p = point.payload or {}
    return Hit(
        passage_id=short_id(point.id),
        chunk_id=short_id(point.id),
        chunk_index=int(p["i"]),
        text=p["text"],
        char_start=int(p["char_start"]),
        char_end=int(p["char_end"]),
        page=p.get("page"),
        heading=p.get("heading"),
        document_id=p["doc"],
        title=p.get("title"),
        metadata=p.get("metadata") or {},
        field=p["field"],
    )


class QdrantCatalog(QdrantStorage):
    """What the SQLite store and the PLAID index hold between them, in Qdrant."""

    def open(self) -> None:
        """Create the two collections when missing (any server may be the
        first), and check the chunks' vectors fit this server's encoder."""
        c = self.config
        self.registry, self.chunks = f"{c.prefix}_collections", f"{c.prefix}_chunks"
        with self._calls():
            registry_exists = self.client.collection_exists(self.registry)
            chunks_exists = self.client.collection_exists(self.chunks)
        if not registry_exists:
            self._create_if_missing(self.registry, self._create_registry)
        if not chunks_exists:
            self._create_if_missing(
                self.chunks, lambda: self._create_collection(self.chunks, c.dense_dim, {"format": 1})
            )
        for key, schema in (  # (again at every start: a server that made the collection may have died first)
            ("c", qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True)),
            ("doc", qm.PayloadSchemaType.KEYWORD),
            ("kind", qm.PayloadSchemaType.KEYWORD),
            ("field", qm.PayloadSchemaType.KEYWORD),
            ("i", qm.PayloadSchemaType.INTEGER),
        ):
            self._payload_index(self.chunks, key, schema)
        with self._calls():
            vectors = self.client.get_collection(self.chunks).config.params.vectors
        if not isinstance(vectors, dict) or COLBERT not in vectors or vectors[COLBERT].size != c.dim:
            raise RuntimeError(f"Qdrant collection {self.chunks} holds token vectors of another size than {c.dim}")
        stored_dense = vectors[DENSE].size if DENSE in vectors else None
        if stored_dense != c.dense_dim:
            raise RuntimeError(
                f"Qdrant collection {self.chunks} holds dense vectors of size {stored_dense}, "
                f"this encoder makes {c.dense_dim}"
            )
        self._indexed: set[str] = set()

    def _create_registry(self) -> None:
        with self._calls():
            self.client.create_collection(
                self.registry,
                vectors_config={},
                replication_factor=self.config.replication_factor,
                write_consistency_factor=self.config.write_factor,
            )

    def _create_if_missing(self, name: str, create) -> None:
        try:
            create()
        except Exception:
            with self._calls():
                if not self.client.collection_exists(name):
                    raise  # not another server's creation racing ours

    # -- collections -----------------------------------------------------------------

    def _row(self, point) -> CatalogCollection:
        p = point.payload
        return CatalogCollection(p["id"], p["name"], p.get("description"), p["created_at"])

    def create_collection(self, name: str, description: str | None) -> CatalogCollection:
        key = str(uuid.uuid5(NAMESPACE, name))
        if self._retrieve(self.registry, [key], True):
            raise CollectionExists(f"collection {name!r} already exists")
        payload = {"id": uuid.uuid4().hex, "name": name, "description": description, "created_at": time.time()}
        self._upsert_points(self.registry, [[qm.PointStruct(id=key, vector={}, payload=payload)]])
        row = self.get_collection(name)
        if row.id != payload["id"]:  # another server created it at the same moment, and its write came last
            raise CollectionExists(f"collection {name!r} already exists")
        return row

    def get_collection(self, name: str) -> CatalogCollection:
        found = self._retrieve(self.registry, [str(uuid.uuid5(NAMESPACE, name))], True)
        if not found:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return self._row(found[0])

    def list_collections(self) -> list[CatalogCollection]:
        rows: list[CatalogCollection] = []
        offset = None
        while True:
            with self._calls():
                points, offset = self.client.scroll(self.registry, limit=SCROLL, offset=offset, with_payload=True)
            rows.extend(self._row(p) for p in points)
            if offset is None:
                return sorted(rows, key=lambda r: r.name)

    def delete_collection(self, name: str) -> None:
        """Its points, then its name, then any point a write landed meanwhile
        (a delete cut short leaves the name, so it can be asked again)."""
        row = self.get_collection(name)
        self.drop_points(row.id)
        self._delete(self.registry, qm.PointIdsList(points=[str(uuid.uuid5(NAMESPACE, name))]))
        self.drop_points(row.id)

    def drop_points(self, collection_id: str) -> None:
        self._delete(self.chunks, qm.FilterSelector(filter=_document_filter(collection_id)))

    def check_alive(self, collection: CatalogCollection) -> None:
        """After a write: when the collection was deleted (or deleted and
        made again) meanwhile, what was written under its old id is dropped
        and the write refused, rather than left where nobody reads it."""
        try:
            current = self.get_collection(collection.name)
        except CollectionNotFound:
            current = None
        if current is None or current.id != collection.id:
            self.drop_points(collection.id)
            raise CollectionNotFound(f"collection {collection.name!r} was deleted during the write")

    def counts(self, collection_id: str) -> dict:
        return {
            "documents": self._count(self.chunks, _document_filter(collection_id, kind="doc")),
            "pending_documents": 0,
            "chunks": self._count(self.chunks, _document_filter(collection_id, kind="chunk")),
        }

    # -- documents -------------------------------------------------------------------

    def records(self, collection_id: str, document_ids: list[str]) -> dict[str, dict]:
        """The stored records (hash, times, fields) of those of the documents that exist."""
        ids = [point_id(collection_id, d) for d in document_ids]
        found = self._retrieve(self.chunks, ids, True) if ids else []
        return {p.payload["doc"]: p.payload for p in found}

    def write_documents(
        self,
        collection_id: str,
        docs: list[tuple[NewDocument, list[torch.Tensor], torch.Tensor | None]],
        records: dict[str, dict],
    ) -> None:
        """Each document's chunks and its record (last) in one request where
        they fit one, written over its earlier version's points (``records``:
        the stored ones, :meth:`records`), then the earlier version's chunks
        past the new count deleted."""
        now = time.time()
        groups = []
        for doc, embs, dense in docs:
            common = {"c": collection_id, "doc": doc.external_id, "title": doc.title, "metadata": doc.metadata}
            group = []
            for i, (chunk, vectors) in enumerate(zip(doc.chunks, embs, strict=True)):
                payload = {
                    **common,
                    "kind": "chunk",
                    "i": i,
                    "text": chunk.text,
                    "char_start": chunk.char_start,
                    "char_end": chunk.char_end,
                    "page": chunk.page,
                    "heading": chunk.heading,
                    "field": chunk.field,
                }
                text = passage_text(doc.title, chunk.text, chunk.field)
                vector = point_vectors(vectors, dense[i] if dense is not None else None, text)
                group.append(
                    qm.PointStruct(id=point_id(collection_id, doc.external_id, i), vector=vector, payload=payload)
                )
            record = {
                **common,
                "kind": "doc",
                "fields": doc.fields or {},
                "content_hash": doc.content_hash,
                "chunks": len(group),
                "created_at": records.get(doc.external_id, {}).get("created_at", now),
                "updated_at": now,
            }
            group.append(qm.PointStruct(id=point_id(collection_id, doc.external_id), vector={}, payload=record))
            groups.append(group)
        self._upsert_points(self.chunks, groups)
        self.trim(collection_id, {doc.external_id: len(doc.chunks) for doc, _, _ in docs})

    def trim(self, collection_id: str, chunks: dict[str, int]) -> None:
        """Delete each document's chunks at or past its chunk count: what a
        longer earlier version left (by position, so no clock is involved)."""
        if not chunks:
            return
        past = [
            qm.Filter(
                must=[
                    qm.FieldCondition(key="doc", match=qm.MatchValue(value=doc_id)),
                    qm.FieldCondition(key="i", range=qm.Range(gte=n)),
                ]
            )
            for doc_id, n in chunks.items()
        ]
        where = qm.Filter(must=[_document_filter(collection_id, kind="chunk"), qm.Filter(should=past)])
        self._delete(self.chunks, qm.FilterSelector(filter=where))

    def delete_document(self, collection_id: str, document_id: str) -> None:
        """Every point of the document, its record or not (a write cut short
        may have left chunks without one)."""
        where = _document_filter(collection_id, document_id)
        if not self._count(self.chunks, where):
            raise DocumentNotFound(f"document {document_id!r} does not exist")
        self._delete(self.chunks, qm.FilterSelector(filter=where))

    def _scroll(self, where: qm.Filter) -> list:
        out, offset = [], None
        while True:
            with self._calls():
                points, offset = self.client.scroll(
                    self.chunks, scroll_filter=where, limit=SCROLL, offset=offset, with_payload=True
                )
            out.extend(points)
            if offset is None:
                return out

    def get_document(self, collection_id: str, document_id: str) -> dict:
        record = self.records(collection_id, [document_id]).get(document_id)
        if record is None:
            raise DocumentNotFound(f"document {document_id!r} does not exist")
        chunks = sorted(
            self._scroll(_document_filter(collection_id, document_id, "chunk")), key=lambda p: p.payload["i"]
        )
        return {
            "external_id": document_id,
            "title": record.get("title"),
            "metadata": record.get("metadata") or {},
            "fields": record.get("fields") or {},
            "content_hash": record["content_hash"],
            "state": "live",
            "error": None,
            "created_at": record["created_at"],
            "updated_at": record["updated_at"],
            "chunks": [
                {
                    "id": short_id(p.id),
                    "ord": p.payload["i"],
                    **{k: p.payload.get(k) for k in ("text", "char_start", "char_end", "page", "heading", "field")},
                }
                for p in chunks
            ],
        }

    def list_documents(self, collection_id: str, limit: int, offset: int) -> tuple[list[dict], int]:
        """A page of documents in the order of their point ids (stable, not by name)."""
        where = _document_filter(collection_id, kind="doc")
        points = self._query(
            self.chunks, query=None, using=None, where=where, k=limit, offset=offset, with_payload=True
        )
        docs = []
        for point in points:
            p = point.payload or {}
            docs.append(
                {
                    "external_id": p["doc"],
                    "title": p.get("title"),
                    "metadata": p.get("metadata") or {},
                    "state": "live",
                    "created_at": p["created_at"],
                    "updated_at": p["updated_at"],
                    "chunks": p["chunks"],
                }
            )
        return docs, self._count(self.chunks, where)

    # -- search ----------------------------------------------------------------------

    def ensure_indexes(self, where: dict | None) -> None:
        """Payload indexes for the metadata keys a (checked) filter uses, up to
        ``MAX_METADATA_INDEXES`` of them: asked for without waiting (a server
        builds them in the background; filters work before, only slower). A
        key whose index could not be made (another type under it, say) is
        tried again by a later search."""
        if self.config.local or where is None:
            return
        for key, value in _keys(where):
            if key in self._indexed or len(self._indexed) >= MAX_METADATA_INDEXES:
                continue
            schema = (
                qm.PayloadSchemaType.BOOL
                if isinstance(value, bool)
                else qm.PayloadSchemaType.FLOAT
                if isinstance(value, (int, float))
                else qm.PayloadSchemaType.KEYWORD
            )
            try:
                self._payload_index(self.chunks, f"metadata.{key}", schema, wait=False)
            except (BackendUnavailable, InvalidInput):
                logger.warning("no payload index on metadata.%s", key, exc_info=True)
                continue
            self._indexed.add(key)

    def search(
        self,
        using: str,
        query,
        k: int,
        where: qm.Filter,
        prefetch: list[qm.Prefetch] | None = None,
    ) -> list[tuple[Hit, float, str]]:
        """(hit, score, point id), best first."""
        points = self._query(
            self.chunks, query=query, using=using, where=where, k=k, prefetch=prefetch, with_payload=True
        )
        return [(hit_of(p), float(p.score), str(p.id)) for p in points]

    def count(self, where: qm.Filter) -> int:
        return self._count(self.chunks, where)

    def first_stages(self, q: torch.Tensor | None, text: str, where: qm.Filter, depth: int) -> list[qm.Prefetch]:
        """The dense and the BM25 stages whose union MaxSim rescores."""
        stages = []
        if q is not None:
            stages.append(
                qm.Prefetch(query=q.reshape(-1).float().numpy().tolist(), using=DENSE, filter=where, limit=depth)
            )
        terms = bm25_query(text)
        if terms.indices:
            stages.append(qm.Prefetch(query=terms, using=SPARSE, filter=where, limit=depth))
        return stages


def _keys(node: Any):
    """(metadata key, an example value) of each condition in a filter."""
    if isinstance(node, list):
        for v in node:
            yield from _keys(v)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("$and", "$or"):
            yield from _keys(value)
        elif not key.startswith("$"):
            example = value
            if isinstance(value, dict):
                example = next(iter(value.values()), None)
            if isinstance(example, list):
                example = example[0] if example else None
            yield key, example
