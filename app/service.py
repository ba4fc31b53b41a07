"""The service the HTTP routes and the CLI call: a thin facade over the data flow.

    request ─> SearchService ─┬─ ingest:  DocumentIngest / JobRunner (app.ingest)
                              │             └─> Store (pending rows) ─> IndexWriter ─> IndexBackend.write
                              └─ search:  Searcher (app.engine.search)
                                            └─> SnapshotCache ─> IndexBackend.load ─> IndexSnapshot.search

It owns the shared pieces (encoder, store, index backend, writer) and the one
search thread: every model call and index search runs there, since torch's
OpenMP pool is per calling thread and hopping between threads measured 40%
slower per search (see BENCHMARKS.md). The event loop only awaits it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from app import tuning_jobs

# colbert (through these imports) is imported here, at start-up on the main
# thread: transformers' lazy module can fail a first import made from a
# worker thread while another thread imports from it.
from app.engine.backend import IndexBackend
from app.engine.encoder import ColBERTEncoder
from app.engine.encoders import CHECKPOINT_NAME, Encoders, checkpoint_root
from app.engine.plaid import PlaidBackend, PlaidConfig
from app.engine.rerank import Reranker, load_reranker
from app.engine.retrieval import DEFAULT, Retrieval
from app.engine.search import Searcher, SearchHit
from app.engine.snapshots import SnapshotCache
from app.engine.writer import IndexWriter, WriterState
from app.errors import InvalidInput, NotReady
from app.ingest.documents import DocumentIngest
from app.ingest.jobs import JobRunner, UploadedFile, job_files
from app.ingest.pipeline import DocumentInput, DocumentPreparer
from app.observability import EngineMetrics
from app.settings import Settings
from app.store.jobs import summarise_job
from app.store.store import CollectionRow, Store
from app.tune import default_destination
from app.validation import COLLECTION_NAME_PATTERN, COLLECTION_NAME_RULE, check_metadata
from colbert_patches.model_loading import EncoderOptions
from colbert_patches.scorer import load_extensions

logger = logging.getLogger("app.engine")

# The document encoder on a CPU when ENCODER_RUNTIME=auto (on a CUDA GPU: torch).
# Dynamic int8 onnxruntime is 1.5-2.2x faster and within 0.001 nDCG@10 under
# exhaustive MaxSim, but through PLAID it measured 0.008-0.014 below torch on
# msmarco-mini (mean of 3 codec seeds, bench/codec_sizing.py): more than the
# 0.005 it may cost, so it is a setting, not the default.
AUTO_CPU_RUNTIME = "torch"

COLLECTION_NAME = re.compile(COLLECTION_NAME_PATTERN)

__all__ = ["DocumentInput", "SearchHit", "SearchService", "UploadedFile"]


def check_collection_name(name: str) -> str:
    if not COLLECTION_NAME.fullmatch(name or ""):
        raise InvalidInput(f"invalid collection name {name!r}: use {COLLECTION_NAME_RULE}")
    return name


def resolve_checkpoint(settings: Settings) -> str:
    if settings.checkpoint:
        path = Path(settings.checkpoint).expanduser()
        return str(path.resolve()) if path.exists() else settings.checkpoint
    from models.build_default_checkpoint import ensure_default_checkpoint

    return str(ensure_default_checkpoint(settings.default_checkpoint_dir))


def load_encoder(settings: Settings, checkpoint: str | None = None):
    """The configured ColBERT checkpoint (or the one at path ``checkpoint``),
    with colbert's kernels loaded first (ColBERT's constructor would
    otherwise JIT-build its own, which needs a compiler; the image has
    prebuilt ones)."""
    checkpoint = checkpoint or resolve_checkpoint(settings)
    options = EncoderOptions.for_checkpoint(
        checkpoint,
        query_augmentation=settings.query_augmentation,
        marker_tokens=settings.marker_tokens,
        doc_maxlen=settings.doc_maxlen,
        query_maxlen=settings.query_maxlen,
    )
    load_extensions()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runtime: str = settings.encoder_runtime
    if runtime == "auto":
        runtime = "torch" if device == "cuda" else AUTO_CPU_RUNTIME
    encoder = ColBERTEncoder(checkpoint, options, runtime=runtime, models_dir=settings.models_dir, device=device)
    encoder.encode_queries(["warm up"])
    return encoder


def node_id(data_dir: Path) -> str:
    """A data directory's own random id, made on first use."""
    path = data_dir / "node-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"node-id.{os.getpid()}.tmp")
        tmp.write_text(uuid.uuid4().hex[:12])
        try:
            os.link(tmp, path)  # whole, and only the first of several processes' ids
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        return path.read_text().strip()


def index_backend(settings: Settings, encoder) -> IndexBackend:
    """The configured index backend (``index_backend``: plaid or qdrant)."""
    if settings.index_backend == "qdrant":
        from app.engine.qdrant import QdrantBackend, QdrantConfig

        config = QdrantConfig.from_settings(settings, encoder)
        # This node's collections under a name of its own: the Qdrant collections
        # of another server's data directory (on the same cluster, with the same
        # prefix) are never taken for leftovers of this one's and dropped.
        return QdrantBackend(dataclasses.replace(config, prefix=f"{config.prefix}_{node_id(settings.data_dir)}"))
    return PlaidBackend(PlaidConfig.from_settings(settings, encoder.dim, encoder.nbits))


class SearchService:
    """``encoder`` (anything with :class:`ColBERTEncoder`'s methods),
    ``backend_factory`` (settings, encoder -> an :class:`IndexBackend`) and
    ``reranker`` choose the models and the index engine; by default, the
    configured checkpoint, the configured backend and reranker
    (none unless ``reranker`` is set). ``encoder_loader`` (a checkpoint
    directory -> its encoder) loads the checkpoints collections are
    re-indexed with; by default the way the configured one is loaded, and
    none when ``encoder`` is given without it."""

    def __init__(
        self,
        settings: Settings,
        metrics: EngineMetrics | None = None,
        encoder=None,
        backend_factory=None,
        reranker: Reranker | None = None,
        encoder_loader=None,
    ):
        self.settings = settings
        self.metrics = metrics or EngineMetrics()
        self.store = Store(settings.database_path)
        self.encoder = encoder
        if encoder_loader is None and encoder is None:
            encoder_loader = functools.partial(load_encoder, settings)
        self._encoder_loader = encoder_loader
        self.reranker = reranker
        self._backend_factory = backend_factory or index_backend
        self.backend: IndexBackend | None = None
        self.writer: IndexWriter | None = None
        self.ready = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        # Snapshot loads (a new generation's segments opened, the previous
        # snapshot's reused) run here, never on the search thread.
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-load")
        self._job_runner: asyncio.Task | None = None
        self._jobs: JobRunner | None = None
        self.has_writer = True  # runs an index writer (readiness waits for it)
        self.waiting_for: str | None = None  # what start-up waits for (the stateless tier: its cluster)
        self._refresher: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------

    async def _open(self) -> None:
        """The store and the models: what every kind of service starts with."""
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await self.store.open()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if self.encoder is None:
            self.encoder = await self._run(load_encoder, self.settings)
        if self.reranker is None:
            self.reranker = await self._run(load_reranker, self.settings)
        self.encoders = Encoders(self.encoder, checkpoint_root(self.settings.data_dir), self._encoder_loader)

    async def astart(self) -> None:
        await self._open()
        self.backend = self._backend_factory(self.settings, self.encoder)
        self.writer = writer = IndexWriter(self.settings, self.encoder, self.backend, self.encoders)
        preparer = DocumentPreparer(self.encoder, self.settings.chunker)
        self.snapshots = SnapshotCache(
            self.store, self.backend, self._load, self.settings.snapshot_cache_bytes, warm=self.encoders.get
        )
        self.searcher = Searcher(
            self.settings, self.store, self.snapshots, self.encoders, self._run, self.metrics, self.reranker
        )
        self.documents = DocumentIngest(self.settings, self.store, preparer, self.writer.notify)
        self._jobs = jobs = JobRunner(
            self.settings, self.store, preparer, self.writer.notify, lambda: writer.lease.held
        )
        if self.settings.server_role == "api":  # serves only: a process of another role indexes
            self.has_writer = False
        else:
            self.writer.start()
            self._job_runner = asyncio.create_task(jobs.run())
        if self.settings.snapshot_refresh_s:
            self._refresher = asyncio.create_task(self._refresh_snapshots(self.settings.snapshot_refresh_s))
        self.ready = True

    async def astop(self) -> None:
        self.ready = False
        for task in (self._job_runner, self._refresher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._jobs is not None:
            await asyncio.to_thread(self._jobs.close)  # the extractor process
        if self.writer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.writer.stop)
        await self.store.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._loader.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.backend, "close", None)  # a client's connections (Qdrant)
        if close is not None:
            close()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _load(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    async def _refresh_snapshots(self, interval_s: float) -> None:
        """Every ``interval_s``: the cached collections' new generations
        loaded in the background (:meth:`SnapshotCache.refresh`)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.snapshots.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round, or the next search, tries again
                logger.exception("refreshing snapshots failed")

    def _require_ready(self) -> None:
        if not self.ready:
            raise NotReady("models are still loading")

    def writer_state(self) -> WriterState | None:
        """This process's writer, as ``/ready`` and ``/metrics`` report it."""
        return self.writer.state() if self.writer is not None else None

    # -- collections -------------------------------------------------------

    async def create_collection(self, name: str, description: str | None) -> CollectionRow:
        return await self.store.create_collection(check_collection_name(name), description)

    async def get_collection(self, name: str) -> CollectionRow:
        return await self.store.get_collection(check_collection_name(name))

    async def describe_collection(self, row: CollectionRow) -> dict:
        counts = await self.store.collection_counts(row.id)
        stats = None
        if self.backend is not None:
            try:
                stats = self.backend.stats(row.id, row.manifest)
            except FileNotFoundError:  # a newer generation replaced it meanwhile
                stats = None
        reindex = None
        if row.reindex_cursor is not None:
            progress = min(row.reindex_cursor / row.next_pid, 1.0) if row.next_pid else 1.0
            reindex = {"state": "running", "checkpoint": row.reindex_checkpoint, "progress": round(progress, 4)}
        elif row.reindex_error is not None:
            reindex = {"state": "failed", "checkpoint": None, "progress": 0.0, "error": row.reindex_error}
        return {
            "name": row.name,
            "description": row.description,
            "created_at": row.created_at,
            "generation": row.generation,
            **counts,
            "index": dataclasses.asdict(stats) if stats is not None else None,
            "checkpoint": row.checkpoint,
            "reindex": reindex,
        }

    async def start_reindex(self, name: str, checkpoint: str | None) -> CollectionRow:
        """Re-encode the collection with ``checkpoint`` (a directory name
        under the data directory's checkpoints/; None: the configured one)
        into a new index, served once complete (app/engine/reindex.py). The
        checkpoint is loaded here first, so one that cannot serve this index
        is refused at once."""
        self._require_ready()
        check_collection_name(name)
        await self.store.get_collection(name)  # 404 before any model is loaded
        if checkpoint is not None:
            await self._load(self.encoders.get, checkpoint)
        row = await self.store.start_reindex(name, checkpoint)
        if self.writer is not None:
            self.writer.notify()
        return row

    async def start_tuning(self, name: str, options: dict, reindex: bool) -> dict:
        """A tuning job of the collection (app/tuning_jobs.py): its own
        process, from the checkpoint the collection is indexed with, writing
        a new checkpoint under the data directory's checkpoints/."""
        self._require_ready()
        row = await self.get_collection(name)
        base = str(self.encoders.path(row.checkpoint)) if row.checkpoint else resolve_checkpoint(self.settings)
        job_id = await self.store.create_tuning_job(row.id, options, reindex)
        out = default_destination(checkpoint_root(self.settings.data_dir), name)
        try:
            process = await asyncio.to_thread(
                tuning_jobs.start_process,
                self.settings.data_dir,
                name,
                job_id,
                base,
                out,
                {**options, "reindex": reindex},
            )
        except OSError as exc:
            await asyncio.to_thread(
                tuning_jobs.record_failure, self.settings.database_path, job_id, f"could not start: {exc}"
            )
            raise
        await self.store.set_tuning_pid(job_id, process.pid)
        return await self.store.tuning_job(row.id, job_id)

    async def tuning_job(self, name: str, job_id: str) -> dict:
        row = await self.get_collection(name)
        return await self.store.tuning_job(row.id, job_id)

    async def cancel_reindex(self, name: str) -> CollectionRow:
        return await self.store.cancel_reindex(check_collection_name(name))

    def list_checkpoints(self) -> list[dict]:
        """The checkpoints collections may be re-indexed with: directories
        under the data directory's checkpoints/, with their tuning provenance."""
        root = checkpoint_root(self.settings.data_dir)
        out = []
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            if not path.is_dir() or not CHECKPOINT_NAME.fullmatch(path.name) or path.name.startswith("."):
                continue
            tuning = None
            options = path / "colbert_server.json"
            if options.is_file():
                try:
                    tuning = json.loads(options.read_text()).get("tuning")
                except (OSError, ValueError):
                    tuning = None
            out.append({"name": path.name, "tuning": tuning, "created_at": path.stat().st_mtime})
        return out

    async def list_collections(self) -> list[dict]:
        return [await self.describe_collection(row) for row in await self.store.list_collections()]

    async def delete_collection(self, name: str) -> None:
        collection_id = await self.store.delete_collection(check_collection_name(name))
        if self.backend is not None:
            self.snapshots.forget(collection_id)
            await asyncio.to_thread(self.backend.drop, collection_id)

    # -- documents ---------------------------------------------------------

    async def upsert_documents(self, name: str, docs: list[DocumentInput], wait: bool = True) -> list[dict]:
        self._require_ready()
        collection = await self.get_collection(name)
        return await self.documents.upsert(collection.id, docs, wait)

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

    async def search(self, name: str, query: str, k: int, retrieval: Retrieval = DEFAULT) -> list[SearchHit]:
        self._require_ready()
        return await self.searcher.search(check_collection_name(name), query, k, retrieval)

    def reranks(self, rerank: bool | None = None) -> bool:
        """Whether a search with this ``rerank`` choice goes through the rerank stage."""
        return self.reranker is not None and rerank is not False

    async def rerank(self, query: str, texts: list[str]) -> list[float]:
        self._require_ready()
        return await self._run(self.encoder.maxsim, query, texts)

    def rerank_blocking(self, query: str, texts: list[str]) -> list[float]:
        """:meth:`rerank` for a caller on another thread (the answer program):
        it waits for the search thread directly, not through the event loop."""
        self._require_ready()
        return self._executor.submit(self.encoder.maxsim, query, texts).result()

    # -- files and jobs ----------------------------------------------------

    async def submit_files(self, name: str, files: list[UploadedFile], metadata: dict | None) -> str:
        """Store an upload as a durable job; files refused up front are
        recorded as failed with their reason, the rest are queued."""
        try:
            check_metadata(metadata)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        collection = await self.get_collection(name)
        return await self.store.jobs.create(collection.id, job_files(files, metadata))

    async def job_status(self, job_id: str) -> dict:
        return summarise_job(await self.store.jobs.get(job_id))
