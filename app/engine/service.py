"""The service API the HTTP routes call: collections, documents, search.

Holds the shared encoder, the async store, the index writer and the current
snapshot of each collection. Blocking work (encoding, index loading, scoring)
runs in a thread pool; the event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from app.engine.encoder import ColBERTEncoder
from app.engine.index import IndexFiles, Snapshot
from app.engine.writer import IndexWriter
from app.errors import CollectionNotFound, IndexingFailed, InvalidInput, NotReady
from app.ingest.chunking import SentenceChunker
from app.ingest.extract import ExtractionError, extract, safe_filename
from app.observability import EngineMetrics
from app.settings import Settings
from app.store.filters import compile_filter
from app.store.store import CollectionRow, Hit, NewDocument, Store
from colbert_patches.model_loading import EncoderOptions
from colbert_patches.scorer import load_extensions, search_params

logger = logging.getLogger("app.engine")

COLLECTION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


@dataclass
class DocumentInput:
    id: str | None
    text: str
    title: str | None = None
    metadata: dict | None = None
    sections: list | None = None  # app.ingest.extract.Section spans (pages, headings)


@dataclass
class UploadedFile:
    filename: str
    data: bytes | None  # None when refused before reading (too large)
    document_id: str | None = None
    error: str | None = None


@dataclass
class SearchHit:
    hit: Hit
    score: float
    rank: int


@dataclass
class _Cached:
    snapshot: Snapshot
    version: int = -1
    alive: torch.Tensor | None = None


def check_collection_name(name: str) -> str:
    if not COLLECTION_NAME.match(name or ""):
        raise InvalidInput(
            f"invalid collection name {name!r}: use 1-64 characters a-z, 0-9, '_' or '-', starting with a letter or digit"
        )
    return name


def resolve_checkpoint(settings: Settings) -> str:
    if settings.checkpoint:
        path = Path(settings.checkpoint).expanduser()
        return str(path.resolve()) if path.exists() else settings.checkpoint
    from models.build_default_checkpoint import ensure_default_checkpoint

    return str(ensure_default_checkpoint(settings.default_checkpoint_dir))


MAX_FILE_ATTEMPTS = 3
HYBRID_DEPTH = 50  # candidates taken from each ranking before fusing
RRF_K = 60


def fuse(dense: list[tuple[int, float]], sparse: list[tuple[int, float]], method: str) -> list[tuple[int, float]]:
    """Fuse two rankings of passage ids: reciprocal rank fusion, or the mean of
    min-max normalised scores (a passage missing from one ranking gets 0 there)."""
    fused: dict[int, float] = {}
    if method == "rrf":
        for ranking in (dense, sparse):
            for rank, (pid, _) in enumerate(ranking):
                fused[pid] = fused.get(pid, 0.0) + 1.0 / (RRF_K + rank + 1)
    elif method == "normalized":
        for ranking in (dense, sparse):
            if not ranking:
                continue
            scores = [s for _, s in ranking]
            low, high = min(scores), max(scores)
            span = (high - low) or 1.0
            for pid, s in ranking:
                fused[pid] = fused.get(pid, 0.0) + 0.5 * (s - low) / span
    else:
        raise InvalidInput(f"unknown fusion {method!r}; use rrf or normalized")
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))


class SearchService:
    def __init__(self, settings: Settings, metrics: EngineMetrics | None = None):
        self.settings = settings
        self.metrics = metrics or EngineMetrics()
        self.store = Store(settings.database_path)
        self.encoder: ColBERTEncoder | None = None
        self.writer: IndexWriter | None = None
        self.ready = False
        # One thread runs every model call and index search: torch's OpenMP
        # pool is per calling thread, and hopping between threads measured
        # 40% slower per search (see BENCHMARKS.md).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self._cache: dict[int, _Cached] = {}
        self._load_locks: dict[int, asyncio.Lock] = {}
        self._job_runner: asyncio.Task | None = None
        self._chunkers: dict[int, object] = {}

    # -- lifecycle ---------------------------------------------------------

    async def astart(self) -> None:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        checkpoint = await self._run(resolve_checkpoint, self.settings)
        options = EncoderOptions.for_checkpoint(
            checkpoint,
            query_augmentation=self.settings.query_augmentation,
            marker_tokens=self.settings.marker_tokens,
            doc_maxlen=self.settings.doc_maxlen,
            query_maxlen=self.settings.query_maxlen,
        )
        # Kernels before the model: ColBERT's constructor would otherwise JIT
        # load its own, which needs a compiler (the image has prebuilt ones).
        await self._run(load_extensions)
        self.encoder = await self._run(ColBERTEncoder, checkpoint, options)
        await self._run(self.encoder.encode_queries, ["warm up"])
        self.writer = IndexWriter(self.settings, self.encoder)
        self.writer.start()
        self._job_runner = asyncio.create_task(self._run_jobs())
        self.ready = True

    async def astop(self) -> None:
        self.ready = False
        if self._job_runner is not None:
            self._job_runner.cancel()
            await asyncio.gather(self._job_runner, return_exceptions=True)
        if self.writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.writer.stop)
        await self.store.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _require_ready(self) -> ColBERTEncoder:
        if not self.ready or self.encoder is None:
            raise NotReady("models are still loading")
        return self.encoder

    # -- collections -------------------------------------------------------

    async def create_collection(self, name: str, description: str | None) -> CollectionRow:
        return await self.store.create_collection(check_collection_name(name), description)

    async def get_collection(self, name: str) -> CollectionRow:
        return await self.store.get_collection(check_collection_name(name))

    async def describe_collection(self, row: CollectionRow) -> dict:
        counts = await self.store.collection_counts(row.id)
        return {
            "name": row.name,
            "description": row.description,
            "created_at": row.created_at,
            "generation": row.generation,
            **counts,
        }

    async def list_collections(self) -> list[dict]:
        return [await self.describe_collection(row) for row in await self.store.list_collections()]

    async def delete_collection(self, name: str) -> None:
        collection_id = await self.store.delete_collection(check_collection_name(name))
        self._cache.pop(collection_id, None)
        import shutil

        await asyncio.to_thread(shutil.rmtree, self.settings.index_root / str(collection_id), True)

    # -- documents ---------------------------------------------------------

    def _prepare(self, docs: list[DocumentInput]) -> list[NewDocument]:
        encoder = self._require_ready()
        with encoder.chunk_lock:
            return self._prepare_locked(encoder, docs)

    def _prepare_locked(self, encoder: ColBERTEncoder, docs: list[DocumentInput]) -> list[NewDocument]:
        prepared = []
        for doc in docs:
            title = doc.title.strip() if doc.title and doc.title.strip() else None
            budget = encoder.passage_token_budget
            if title:
                budget -= len(encoder.tokenizer(title, add_special_tokens=False)["input_ids"]) + 1
            chunker = self._chunker(encoder, max(budget, 32))
            if doc.sections:
                # Split each page / heading section on its own: every chunk
                # then has exactly one page and one heading.
                passages = [
                    dataclasses.replace(
                        p,
                        char_start=p.char_start + sec.char_start,
                        char_end=p.char_end + sec.char_start,
                        page=sec.page,
                        heading=sec.heading,
                    )
                    for sec in doc.sections
                    if doc.text[sec.char_start : sec.char_end].strip()
                    for p in chunker.split(doc.text[sec.char_start : sec.char_end])
                ]
            else:
                passages = chunker.split(doc.text)
            digest = hashlib.sha256(doc.text.encode("utf-8")).hexdigest()
            prepared.append(NewDocument(doc.id, title, doc.metadata or {}, digest, passages))
        return prepared

    def _chunker(self, encoder: ColBERTEncoder, budget: int):
        """One chunker per token budget (budgets differ only by title length);
        building llama-index's splitter for every document is wasted work.
        Called under ``encoder.chunk_lock``."""
        chunker = self._chunkers.get(budget)
        if chunker is None:
            if self.settings.chunker == "semantic":
                from app.ingest.semantic import SemanticChunker

                chunker = SemanticChunker(encoder.tokenizer, budget)
            else:
                chunker = SentenceChunker(encoder.tokenizer, budget)
            self._chunkers[budget] = chunker
        return chunker

    async def upsert_documents(self, name: str, docs: list[DocumentInput], wait: bool = True) -> list[dict]:
        self._require_ready()
        collection = await self.get_collection(name)
        if not docs:
            raise InvalidInput("documents must not be empty")
        if len(docs) > self.settings.max_batch_documents:
            raise InvalidInput(f"at most {self.settings.max_batch_documents} documents per request")
        seen: set[str] = set()
        for i, doc in enumerate(docs):
            if not doc.text or not doc.text.strip():
                raise InvalidInput(f"documents[{i}].text is empty")
            if len(doc.text) > self.settings.max_document_chars:
                raise InvalidInput(
                    f"documents[{i}].text has {len(doc.text)} characters; the limit is {self.settings.max_document_chars}"
                )
            if doc.id is None:
                doc.id = uuid.uuid4().hex
            if doc.id in seen:
                raise InvalidInput(f"duplicate document id {doc.id!r} in one batch")
            seen.add(doc.id)
        prepared = await asyncio.to_thread(self._prepare, docs)  # tokenizer only: not the model thread
        inserted = await self.store.insert_pending(collection.id, prepared)
        if self.writer is not None:
            self.writer.notify()
        results = [
            {"id": ext, "status": "unchanged" if row is None else "pending", "row": row} for ext, row in inserted
        ]
        if wait:
            await self._wait_indexed(results)
        for r in results:
            r.pop("row")
        return results

    async def _wait_indexed(self, results: list[dict]) -> None:
        waiting = {r["row"]: r for r in results if r["row"] is not None}
        deadline = time.monotonic() + self.settings.upsert_wait_timeout_s
        delay = 0.01
        while waiting and time.monotonic() < deadline:
            states = await self.store.document_states(list(waiting))
            for row_id in list(waiting):
                state, error = states.get(row_id, ("deleted", None))  # purged: superseded or deleted
                if state == "pending":
                    continue
                result = waiting.pop(row_id)
                result["status"] = {"live": "indexed", "deleted": "superseded"}.get(state, state)
                if error:
                    result["error"] = error
            if waiting:
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, 0.1)
        if any(r.get("status") == "failed" for r in results):
            failed = [r["id"] for r in results if r.get("status") == "failed"]
            raise IndexingFailed(f"indexing failed for {len(failed)} document(s)", details={"ids": failed[:20]})

    async def get_document(self, name: str, document_id: str) -> dict:
        collection = await self.get_collection(name)
        return await self.store.get_document(collection.id, document_id)

    async def list_documents(self, name: str, limit: int, offset: int) -> tuple[list[dict], int]:
        collection = await self.get_collection(name)
        return await self.store.list_documents(collection.id, limit, offset)

    async def delete_document(self, name: str, document_id: str) -> None:
        collection = await self.get_collection(name)
        await self.store.delete_document(collection.id, document_id)

    # -- search ------------------------------------------------------------

    async def _snapshot(self, name: str) -> tuple[int, _Cached]:
        for attempt in range(5):
            try:
                return await self._current_snapshot(name)
            except FileNotFoundError:
                # The writer moved on two generations while this process was
                # loading an older one, and removed its files: read again.
                if attempt == 4:
                    collection_id = (await self.store.index_state(name))[0]
                    if collection_id in self._cache:  # serve the last good snapshot
                        logger.warning(
                            "serving generation %d of %s", self._cache[collection_id].snapshot.generation, name
                        )
                        return collection_id, self._cache[collection_id]
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _current_snapshot(self, name: str) -> tuple[int, _Cached]:
        collection_id, generation, manifest, version = await self.store.index_state(check_collection_name(name))
        cached = self._cache.get(collection_id)
        if cached is None or cached.snapshot.generation != generation:
            lock = self._load_locks.setdefault(collection_id, asyncio.Lock())
            async with lock:
                cached = self._cache.get(collection_id)
                if cached is None or cached.snapshot.generation != generation:
                    files = IndexFiles(self.settings.index_root / str(collection_id))
                    previous = cached.snapshot if cached is not None else None
                    snapshot = await self._run(Snapshot.load, files, generation, manifest, previous)
                    cached = _Cached(snapshot)
                    self._cache[collection_id] = cached
        if cached.version != version:
            dead = await self.store.dead_passage_ids(collection_id)
            alive = cached.snapshot.alive_mask(torch.tensor(dead, dtype=torch.int64))
            cached.alive, cached.version = alive, version
        return collection_id, cached

    def _score(self, query: str, k: int, cached: _Cached, allowed: torch.Tensor | None):
        encoder = self._require_ready()
        started = time.perf_counter()
        Q = encoder.encode_queries([query])
        self.metrics.query_encode_seconds.observe(time.perf_counter() - started)
        params = search_params(
            k,
            encoder.query_maxlen,
            ncells=self.settings.ncells,
            centroid_score_threshold=self.settings.centroid_score_threshold,
            ndocs=self.settings.ndocs,
        )
        return cached.snapshot.search(Q, k, params, cached.alive, allowed)

    async def search(
        self, name: str, query: str, k: int, mode: str = "colbert", where: dict | None = None, fusion: str | None = None
    ) -> list[SearchHit]:
        """Ranked chunks. ``mode``: colbert | keyword | hybrid; ``where``: a
        metadata filter applied before ranking; ``fusion`` (hybrid): rrf,
        normalized, or rescore (ColBERT ranks the union of both candidate
        lists)."""
        self._require_ready()
        if not query or not query.strip():
            raise InvalidInput("query is empty")
        started = time.perf_counter()
        fusion = fusion or self.settings.hybrid_fusion
        collection_id, cached = await self._snapshot(name)
        if where is not None:
            compile_filter(where)  # refuse a bad filter before any work
        depth = k if mode != "hybrid" else max(2 * k, HYBRID_DEPTH)
        dense: list[tuple[int, float]] = []
        sparse: list[tuple[int, float]] = []
        if mode in ("colbert", "hybrid"):
            allowed = None
            if where is not None:
                allowed = torch.tensor(await self.store.allowed_passage_ids(collection_id, where), dtype=torch.int64)
            result = await self._run(self._score, query, depth, cached, allowed)
            dense = list(zip(result.passage_ids, result.scores))
        if mode in ("keyword", "hybrid"):
            sparse = await self.store.keyword_search(collection_id, query, depth, where)
        if mode == "colbert":
            ranked = dense
        elif mode == "keyword":
            ranked = sparse
        elif mode == "hybrid" and fusion == "rescore":
            # Keyword candidates join ColBERT's, and ColBERT's exact MaxSim
            # ranks the union: keyword recall, late-interaction precision.
            union = torch.tensor(sorted({pid for pid, _ in dense} | {pid for pid, _ in sparse}), dtype=torch.int64)
            result = await self._run(self._score, query, k, cached, union) if union.numel() else None
            ranked = list(zip(result.passage_ids, result.scores)) if result else []
        elif mode == "hybrid":
            ranked = fuse(dense, sparse, fusion)[:k]
        else:
            raise InvalidInput(f"unknown search mode {mode!r}")
        hits = await self.store.fetch_hits(collection_id, [pid for pid, _ in ranked])
        out: list[SearchHit] = []
        for pid, score in ranked:
            hit = hits.get(pid)
            if hit is not None:  # deleted between scoring and the join
                out.append(SearchHit(hit, float(score), len(out) + 1))
        self.metrics.search_seconds.labels(mode).observe(time.perf_counter() - started)
        return out

    async def rerank(self, query: str, texts: list[str]) -> list[float]:
        encoder = self._require_ready()
        return await self._run(encoder.maxsim, query, texts)

    def rerank_blocking(self, query: str, texts: list[str]) -> list[float]:
        """:meth:`rerank` for a caller on another thread (the answer program):
        it waits for the search thread directly, not through the event loop."""
        encoder = self._require_ready()
        return self._executor.submit(encoder.maxsim, query, texts).result()

    # -- files and jobs ----------------------------------------------------

    async def submit_files(self, name: str, files: list[UploadedFile], metadata: dict | None) -> str:
        """Store an upload as a durable job; files refused up front are
        recorded as failed with their reason, the rest are queued."""
        collection = await self.get_collection(name)
        if not files:
            raise InvalidInput("no files in the upload")
        rows, seen = [], set()
        for f in files:
            error = f.error
            filename = f.filename
            try:
                filename = safe_filename(f.filename or "")
            except ExtractionError as exc:
                error = error or exc.reason
            document_id = f.document_id or filename
            if not error and document_id in seen:
                error = f"another file of this upload has the document id {document_id!r}"
            if not error and not f.data:
                error = "the file is empty"
            seen.add(document_id)
            rows.append(
                {
                    "filename": filename or "(no name)",
                    "document_id": document_id or "(no name)",
                    "metadata": metadata or {},
                    "data": f.data,
                    "error": error,
                }
            )
        job_id = await self.store.create_job(collection.id, rows)
        return job_id

    async def job_status(self, job_id: str) -> dict:
        job = await self.store.get_job(job_id)
        files = job["files"]
        counts = {
            state: sum(f["state"] == state for f in files) for state in ("queued", "added", "unchanged", "failed")
        }
        indexing = [f for f in files if f["state"] == "added" and f["doc_state"] == "pending"]
        if counts["queued"] == len(files) and not any(f["attempts"] for f in files):
            state = "queued"
        elif counts["queued"] or indexing:
            state = "running"
        elif counts["failed"] == len(files):
            state = "failed"
        else:
            state = "done"
        chunks_total = sum(f["chunks"] for f in files if f["state"] in ("added", "unchanged"))
        chunks_done = sum(
            f["chunks"]
            for f in files
            if f["state"] == "unchanged" or (f["state"] == "added" and f["doc_state"] != "pending")
        )
        return {
            "id": job["id"],
            "collection": job["collection"],
            "state": state,
            "files_total": len(files),
            "files_done": len(files) - counts["queued"] - len(indexing),
            "chunks_total": chunks_total,
            "chunks_done": chunks_done,
            "counts": counts,
            "created_at": job["created_at"],
            "files": [
                {
                    "filename": f["filename"],
                    "document_id": f["document_id"],
                    "state": f["state"],
                    "chunks": f["chunks"],
                    "error": f["error"],
                }
                for f in files
            ],
        }

    async def _run_jobs(self) -> None:
        """Process queued upload files, one at a time, in the writer process
        only (so two processes never add the same file)."""
        while True:
            try:
                if self.writer is None or not self.writer.lease.held:
                    await asyncio.sleep(0.5)
                    continue
                item = await self.store.next_queued_file()
                if item is None:
                    await asyncio.sleep(0.1)
                    continue
                await self._process_file(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("job runner step failed")
                await asyncio.sleep(1.0)

    async def _process_file(self, item: dict) -> None:
        try:
            extracted = await asyncio.to_thread(extract, item["filename"], item["data"], self.settings.max_file_bytes)
            if len(extracted.text) > self.settings.max_document_chars:
                raise ExtractionError(
                    f"the extracted text has {len(extracted.text):,} characters; the limit is {self.settings.max_document_chars:,}"
                )
        except ExtractionError as exc:
            await self.store.fail_job_file(item["id"], exc.reason, final=True)
            return
        except Exception as exc:  # an unexpected parser failure: retry a bounded number of times
            final = item["attempts"] + 1 >= MAX_FILE_ATTEMPTS
            logger.exception("processing %s failed (attempt %d)", item["filename"], item["attempts"] + 1)
            await self.store.fail_job_file(item["id"], f"processing failed: {type(exc).__name__}", final=final)
            await asyncio.sleep(min(2 ** item["attempts"], 10))
            return
        metadata = {**json.loads(item["metadata"]), "filename": item["filename"], "media_type": extracted.media_type}
        doc = DocumentInput(item["document_id"], extracted.text, None, metadata, extracted.sections)
        prepared = await asyncio.to_thread(self._prepare, [doc])
        try:
            await self.store.insert_pending(item["collection_id"], prepared, job_file=item["id"])
        except CollectionNotFound:
            await self.store.fail_job_file(item["id"], "the collection was deleted", final=True)
            return
        self.writer.notify()

    def writer_state(self) -> dict:
        w = self.writer
        return {
            "role": "writer" if w and w.lease.held else "reader",
            "alive": bool(w and w.alive),
            "busy": bool(w and w.busy),
            "last_error": w.last_error if w else None,
        }
