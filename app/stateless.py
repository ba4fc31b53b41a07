"""The stateless server tier (``STATELESS=true``, ``INDEX_BACKEND=qdrant``):
collections, documents, chunks and vectors all live in Qdrant
(:mod:`app.engine.qdrant_catalog`), so any number of server processes on any
number of machines, behind a load balancer, serve the same data.

    request ─> StatelessService ─┬─ ingest: chunk, encode ─> QdrantCatalog.write_documents (waits for the replicas)
                                 └─ search: encode query ─> Qdrant Query API (filters, first stages, MaxSim)

What replaces the single-writer lease: nothing needs one. Each write is
idempotent points (ids from collection, document and chunk index) that
Qdrant applies on every active replica and acknowledges once the configured
number did (``QDRANT_WRITE_CONSISTENCY``). A document upsert answers after
Qdrant acknowledged it: then a search through any server sees it.

What stays on an instance's own data directory: uploaded files, queued as
durable jobs in its SQLite until their documents are acknowledged by Qdrant
(then the file's data is dropped), and the models. One process per data
directory drains them (a lease, as the single-node writer's). ``SERVER_ROLE``
splits the work: ``api`` serves requests and takes no jobs; ``ingest``
drains the upload jobs of the data directory it shares with ``api``
processes on its machine; ``all`` does both.

Not offered in this mode (refused with 409): re-indexing with another
checkpoint and tuning jobs, which build a second index beside the served one
through the single writer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from qdrant_client import models as qm

from app.engine.backend import IndexStats
from app.engine.lease import WriterLease
from app.engine.qdrant import COLBERT, DENSE, SCAN_MAX_PASSAGES, SPARSE, QdrantConfig, bm25_query, query_vectors
from app.engine.qdrant_catalog import CatalogCollection, QdrantCatalog, chunk_filter
from app.engine.retrieval import DEFAULT, Retrieval
from app.engine.search import Ranking, Searcher, SearchHit, maxsim_scale
from app.errors import BackendUnavailable, CollectionNotFound, Conflict, InvalidInput
from app.ingest.documents import DocumentIngest
from app.ingest.jobs import JobRunner, UploadedFile, job_files
from app.ingest.pipeline import DocumentInput, DocumentPreparer, passage_text
from app.service import SearchService, check_collection_name
from app.store.jobs import QueuedFile
from app.store.store import Hit, NewDocument
from app.validation import check_metadata

logger = logging.getLogger("app.engine")

QDRANT_RETRY_S = 2.0
UPLOAD_OUTAGE_S = 3600.0  # an upload waits this long for an unreachable cluster, then fails
NOT_STATELESS = "re-indexing and tuning need the single-node catalog (STATELESS=false)"


class StatelessSearcher(Searcher):
    """:class:`Searcher`'s modes, fusions, field weights and rerank stage,
    each signal a Qdrant query under the collection's filter."""

    def __init__(self, *args, catalog: QdrantCatalog, **kwargs):
        super().__init__(*args, **kwargs)
        self.catalog = catalog

    def _signals(self, query: str, plan, condition: qm.Filter, k: int):
        """On the search thread: each weighted signal's candidates among the
        chunks ``condition`` allows; for a hybrid, every candidate then scored
        exactly by each vector signal."""
        cat, c = self.catalog, self.catalog.config
        Q, q = self._encode(query, None) if plan.mode != "keyword" else (None, None)
        depth = k if plan.mode != "hybrid" else plan.depth
        found: dict[str, list[tuple[Hit, float, str]]] = {}
        if plan.uses("keyword"):
            terms = bm25_query(query)
            found["keyword"] = cat.search(SPARSE, terms, depth, condition) if terms.indices else []
        if plan.uses("dense") and q is not None:
            found["dense"] = cat.search(DENSE, q.reshape(-1).float().numpy().tolist(), depth, condition)
        if plan.uses("colbert") or (plan.mode == "hybrid" and plan.fusion == "rescore"):
            assert Q is not None
            stages = cat.first_stages(q, query, condition, max(c.prefetch, depth)) if c.prefetch else None
            found["colbert"] = cat.search(COLBERT, query_vectors(Q), depth, condition, stages)
            if stages and len(found["colbert"]) < depth:  # the first stages may have missed allowed chunks
                matching = cat.count(condition)
                if len(found["colbert"]) < matching <= SCAN_MAX_PASSAGES:  # few enough to scan them all
                    found["colbert"] = cat.search(COLBERT, query_vectors(Q), depth, condition)
        hits = {h.chunk_id: h for ranked in found.values() for h, _, _ in ranked}
        signals: dict[str, Ranking] = {
            name: [(h.chunk_id, score) for h, score, _ in ranked] for name, ranked in found.items()
        }
        if plan.mode == "hybrid" and hits:
            # Each vector signal scores every candidate: MaxSim and the cosine over the union.
            ids = sorted({point for ranked in found.values() for _, _, point in ranked})
            union = qm.Filter(must=[condition, qm.HasIdCondition(has_id=ids)])
            if plan.uses("colbert") or plan.fusion == "rescore":
                assert Q is not None
                exact = cat.search(COLBERT, query_vectors(Q), len(ids), union)
                per_vector = maxsim_scale(Q, plan.fusion)
                signals["colbert"] = [(h.chunk_id, s * per_vector) for h, s, _ in exact]
            if plan.uses("dense") and q is not None:
                scored = cat.search(DENSE, q.reshape(-1).float().numpy().tolist(), len(ids), union)
                signals["dense"] = [(h.chunk_id, s) for h, s, _ in scored]
        return signals, hits

    async def search(self, name: str, query: str, k: int, retrieval: Retrieval = DEFAULT) -> list[SearchHit]:
        started, wanted = time.perf_counter(), k
        choice, reranking, k, plan = self.prepare(query, k, retrieval)
        collection = await asyncio.to_thread(self.catalog.get_collection, name)
        condition = chunk_filter(collection.id, retrieval.where, choice.filter)  # (a bad filter: 422 here)
        if retrieval.where is not None:
            await asyncio.to_thread(self.catalog.ensure_indexes, retrieval.where)
        signals, hits = await self._run(self._signals, query, plan, condition, k)
        ranked = self.rank(plan, signals, k)
        out = [SearchHit(hits[pid], float(score), rank) for rank, (pid, score) in enumerate(ranked, 1)]
        return await self.finish(query, out, choice, reranking, wanted, plan, started)


class StatelessService(SearchService):
    """:class:`SearchService`'s API over :class:`QdrantCatalog`: no index
    writer, no snapshots, no lease; the local store keeps upload jobs only."""

    async def astart(self) -> None:
        s = self.settings
        self.has_writer = False
        # Encoding and Qdrant writes of ingest run here, beside the search thread.
        self._ingester = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        await self._open()
        self.catalog = QdrantCatalog(QdrantConfig.from_settings(s, self.encoder))
        while True:  # a cluster still starting (or unreachable) is waited for; /ready says 503 meanwhile
            try:
                await asyncio.to_thread(self.catalog.open)
                break
            except BackendUnavailable as exc:
                self.waiting_for = str(exc)
                logger.warning("waiting for the Qdrant cluster: %s", exc)
                await asyncio.sleep(QDRANT_RETRY_S)
        self.waiting_for = None
        self.preparer = DocumentPreparer(self.encoder, s.chunker)
        self.documents = DocumentIngest(s, self.store, self.preparer, lambda: None)
        self.searcher = StatelessSearcher(
            s, self.store, None, self.encoders, self._run, self.metrics, self.reranker, catalog=self.catalog
        )
        if s.server_role != "api":
            # One process per data directory drains its uploads (several uvicorn
            # workers share one): whichever holds the jobs lease.
            self._jobs_lease = lease = WriterLease(s.data_dir / "jobs.lock")
            self._jobs = jobs = JobRunner(
                s, self.store, self.preparer, lambda: None, lease.try_acquire, index=self._index_file
            )
            self._job_runner = asyncio.create_task(jobs.run())
        self.ready = True

    async def astop(self) -> None:
        await super().astop()
        lease = getattr(self, "_jobs_lease", None)
        if lease is not None:
            lease.release()
        ingester = getattr(self, "_ingester", None)
        if ingester is not None:
            ingester.shutdown(wait=True, cancel_futures=True)
        catalog = getattr(self, "catalog", None)
        if catalog is not None:
            catalog.close()

    def writer_state(self):
        return None

    async def _catalog(self, fn, *args):
        """A catalog call off the event loop, once the catalog is open (503 before)."""
        self._require_ready()
        return await asyncio.to_thread(fn, *args)

    # -- collections -----------------------------------------------------------------

    # (The routes pass a collection row back to describe_collection only: here, a Qdrant one.)
    async def create_collection(self, name: str, description: str | None) -> CatalogCollection:  # type: ignore[override]
        return await self._catalog(self.catalog.create_collection, check_collection_name(name), description)

    async def get_collection(self, name: str) -> CatalogCollection:  # type: ignore[override]
        return await self._catalog(self.catalog.get_collection, check_collection_name(name))

    async def describe_collection(self, row: CatalogCollection) -> dict:  # type: ignore[override]
        counts = await self._catalog(self.catalog.counts, row.id)
        return {
            "name": row.name,
            "description": row.description,
            "created_at": row.created_at,
            "generation": 0,
            **counts,
            "index": dataclasses.asdict(IndexStats("qdrant", counts["chunks"], self.catalog.config.shards)),
            "checkpoint": None,
            "reindex": None,
        }

    async def list_collections(self) -> list[dict]:
        rows = await self._catalog(self.catalog.list_collections)
        return [await self.describe_collection(row) for row in rows]

    async def delete_collection(self, name: str) -> None:
        await self._catalog(self.catalog.delete_collection, check_collection_name(name))

    async def _not_here(self, name: str):
        await self.get_collection(name)  # a missing collection is 404 first
        raise Conflict(NOT_STATELESS)

    async def start_reindex(self, name: str, checkpoint: str | None):
        await self._not_here(name)

    async def cancel_reindex(self, name: str):
        await self._not_here(name)

    async def start_tuning(self, name: str, options: dict, reindex: bool) -> dict:
        return await self._not_here(name)

    async def tuning_job(self, name: str, job_id: str) -> dict:
        return await self._not_here(name)

    # -- documents -------------------------------------------------------------------

    def _write(self, collection: CatalogCollection, prepared: list[NewDocument]) -> list[dict]:
        """On the ingest thread: unchanged documents skipped, the others
        encoded in one batch and written, each acknowledged by Qdrant."""
        records = self.catalog.records(collection.id, [d.external_id for d in prepared])
        changed = [d for d in prepared if records.get(d.external_id, {}).get("content_hash") != d.content_hash]
        texts = [passage_text(d.title, c.text, c.field) for d in changed for c in d.chunks]
        if texts:
            encoded = self.encoder.encode_passages(texts)
            vectors = list(torch.split(encoded.embs, encoded.doclens))
            batch, start = [], 0
            for doc in changed:
                n = len(doc.chunks)
                dense = encoded.dense[start : start + n] if encoded.dense is not None else None
                batch.append((doc, vectors[start : start + n], dense))
                start += n
            self.catalog.write_documents(collection.id, batch, records)
            self.catalog.check_alive(collection)
        written = {d.external_id for d in changed}
        unchanged = {d.external_id: len(d.chunks) for d in prepared if d.external_id not in written}
        self.catalog.trim(collection.id, unchanged)  # what a write cut short after its chunks left
        return [
            {"id": d.external_id, "status": "indexed" if d.external_id in written else "unchanged"} for d in prepared
        ]

    async def _ingest(self, collection: CatalogCollection, prepared: list[NewDocument]) -> list[dict]:
        return await asyncio.get_running_loop().run_in_executor(self._ingester, self._write, collection, prepared)

    async def upsert_documents(self, name: str, docs: list[DocumentInput], wait: bool = True) -> list[dict]:
        """Acknowledged once Qdrant holds them (``wait`` has nothing to wait for)."""
        self._require_ready()
        collection = await self.get_collection(name)
        self.documents.validate(docs)
        prepared = await asyncio.to_thread(self.preparer.prepare, docs)
        return await self._ingest(collection, prepared)

    async def get_document(self, name: str, document_id: str) -> dict:
        collection = await self.get_collection(name)
        return await self._catalog(self.catalog.get_document, collection.id, document_id)

    async def list_documents(self, name: str, limit: int, offset: int) -> tuple[list[dict], int]:
        collection = await self.get_collection(name)
        return await self._catalog(self.catalog.list_documents, collection.id, limit, offset)

    async def delete_document(self, name: str, document_id: str) -> None:
        collection = await self.get_collection(name)
        await self._catalog(self.catalog.delete_document, collection.id, document_id)

    # -- files -----------------------------------------------------------------------

    async def submit_files(self, name: str, files: list[UploadedFile], metadata: dict | None) -> str:
        """Queued on this instance's own store (under a local row of the
        collection's name) until their documents are written to Qdrant."""
        try:
            check_metadata(metadata)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        await self.get_collection(name)
        local = await self.store.local_collection(name)
        return await self.store.jobs.create(local, job_files(files, metadata))

    async def _index_file(self, item: QueuedFile, prepared: list[NewDocument]) -> None:
        """The file's document written to Qdrant, then the file finished. While
        the cluster does not answer, the file waits (queued, within the one
        attempt already counted) rather than failing: an outage fails nothing."""
        name = await self.store.collection_name(item.collection_id)
        delay, deadline = QDRANT_RETRY_S, time.monotonic() + UPLOAD_OUTAGE_S
        while True:
            try:
                collection = await self._catalog(self.catalog.get_collection, name or "")
                results = await self._ingest(collection, prepared)
                break
            except CollectionNotFound:
                await self.store.jobs.fail_file(item.id, "the collection was deleted")
                return
            except BackendUnavailable as exc:
                if not exc.transient or time.monotonic() > deadline:  # a refusal, or an outage past the limit
                    await self.store.jobs.fail_file(item.id, f"the Qdrant cluster did not take it: {exc}")
                    return
                logger.warning("upload %s waits for the Qdrant cluster: %s", item.filename, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        state = "unchanged" if results[0]["status"] == "unchanged" else "added"
        await self.store.jobs.finish_file(item.id, state, sum(len(d.chunks) for d in prepared))
