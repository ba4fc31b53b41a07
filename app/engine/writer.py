"""The index writer: the one thread, in one process, that changes indexes.

Pending work is durable in SQLite (documents in state ``pending``), so any
process can accept writes while the process that holds the writer lease turns
them into index commits; if it dies, another process takes the lease over and
carries on from SQLite. A commit is: encode -> the backend prepares a new
generation (segment files, manifest) -> one SQLite transaction that assigns
passage ids, flips the document states and bumps the generation.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from app.engine.backend import IndexBackend, PassageBatch
from app.engine.lease import WriterLease
from app.ingest.pipeline import passage_text
from app.settings import Settings
from app.store.index_state import Commit, IndexStateStore, PendingDocument
from app.store.schema import connect

logger = logging.getLogger("app.engine")

MAX_ATTEMPTS = 3  # tries of one batch before its documents are marked failed


@dataclass(frozen=True)
class WriterState:
    """What ``/ready`` and ``/metrics`` report about this process's writer."""

    role: str  # "writer": this process holds the lease; "reader": another does, or none
    alive: bool
    busy: bool
    last_error: str | None
    lease_holder_pid: int | None


@dataclass(frozen=True)
class _Batch:
    documents: list[PendingDocument]
    chunk_ids: list[int]
    texts: list[str]


class IndexWriter:
    def __init__(self, settings: Settings, encoder, backend: IndexBackend):
        self.settings = settings
        self.encoder = encoder
        self.backend = backend
        self.lease = WriterLease(settings.data_dir / "writer.lock")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy = False
        self.last_error: str | None = None
        self._failures: dict[int, int] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the writer to stop after its current step. The lease is given
        up by the thread itself when it exits (never while a commit may still
        be running); at process exit the OS drops it anyway."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("index writer still busy after %.0fs; its work stays pending", timeout)

    def notify(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def state(self) -> WriterState:
        return WriterState(
            role="writer" if self.lease.held else "reader",
            alive=self.alive,
            busy=self.busy,
            last_error=self.last_error,
            lease_holder_pid=self.lease.holder_pid(),
        )

    def _run(self) -> None:
        conn = connect(self.settings.database_path)
        store = IndexStateStore(conn)
        recovered = False
        try:
            while not self._stop.is_set():
                if not self.lease.held:
                    if not self.lease.try_acquire():
                        self._stop.wait(1.0)
                        continue
                    logger.info("this process (pid %d) is the index writer", os.getpid())
                    recovered = False
                try:
                    if not recovered:
                        self.backend.recover({c.id: c.manifest for c in store.collections()})
                        recovered = True
                    did_work = self.step(store)
                    self.last_error = None
                except Exception as exc:  # keep the writer alive; the work stays pending
                    logger.exception("index writer step failed")
                    self.last_error = type(exc).__name__
                    did_work = False
                    self._stop.wait(1.0)
                if not did_work:
                    self._wake.wait(self.settings.writer_poll_interval_s)
                    self._wake.clear()
        finally:
            conn.close()
            self.lease.release()

    # -- work --------------------------------------------------------------

    def step(self, store: IndexStateStore) -> bool:
        """One unit of work: commit the oldest pending batch, else rebuild
        one collection that needs it. False when there was nothing to do."""
        collection_id = store.oldest_pending_collection()
        if collection_id is None:
            collection_id = next(
                (
                    c.id
                    for c in store.collections()
                    if self.backend.needs_rebuild(c.id, c.manifest, store.dead_passage_count(c.id))
                ),
                None,
            )
            if collection_id is None:
                return False
            work = self.rebuild
        else:
            work = self.commit_pending
        self.busy = True
        try:
            work(store, collection_id)
        finally:
            self.busy = False
        return True

    def _encode(self, pids: torch.Tensor, texts: list[str]) -> PassageBatch:
        if not texts:
            return PassageBatch.empty(self.encoder.dim)
        embs, doclens = self.encoder.encode_documents(texts)
        return PassageBatch(pids, embs, torch.tensor(doclens, dtype=torch.int64))

    def _next_batch(self, store: IndexStateStore, collection_id: int) -> _Batch:
        """The oldest pending documents, up to ``commit_max_chunks`` chunks;
        a later pending version of the same id supersedes an earlier one."""
        pending = store.pending_documents(collection_id)
        last_of = {d.external_id: d.id for d in pending}
        superseded = [d.id for d in pending if last_of[d.external_id] != d.id]
        if superseded:
            store.supersede(superseded)
        batch = _Batch([], [], [])
        for d in (d for d in pending if last_of[d.external_id] == d.id):
            chunks = store.chunk_texts(d.id)
            if batch.documents and len(batch.chunk_ids) + len(chunks) > self.settings.commit_max_chunks:
                break
            batch.documents.append(d)
            batch.chunk_ids.extend(chunk_id for chunk_id, _ in chunks)
            batch.texts.extend(passage_text(d.title, text) for _, text in chunks)
        return batch

    def commit_pending(self, store: IndexStateStore, collection_id: int) -> None:
        started = time.perf_counter()
        col = store.collection(collection_id)
        if col is None:
            return
        batch = self._next_batch(store, collection_id)
        if not batch.documents:
            return
        generation = col.generation + 1
        try:
            pids = torch.arange(col.next_pid, col.next_pid + len(batch.texts), dtype=torch.int64)
            encoded = self._encode(pids, batch.texts)
            encode_s = time.perf_counter() - started
            manifest = self.backend.write(collection_id, col.manifest, generation, encoded)
            outcome = store.commit_append(
                collection_id, col.generation, generation, manifest, col.next_pid, batch.chunk_ids, batch.documents
            )
        except Exception as exc:
            self._failed(store, collection_id, batch.documents, exc)
            return
        if outcome is Commit.COLLECTION_DELETED:
            self.backend.drop(collection_id)
            return
        # Keep the previous generation: other processes may be loading it.
        self.backend.release(collection_id, [manifest, col.manifest])
        logger.info(
            "collection %d generation %d: %d documents, %d passages (encode %.2fs, total %.2fs)",
            collection_id,
            generation,
            len(batch.documents),
            len(batch.texts),
            encode_s,
            time.perf_counter() - started,
        )

    def _failed(self, store: IndexStateStore, collection_id: int, documents: list[PendingDocument], exc: Exception):
        """Back off and retry; after MAX_ATTEMPTS mark the batch failed."""
        logger.exception("indexing %d documents of collection %d failed", len(documents), collection_id)
        key = documents[0].id  # the oldest pending document heads every retry
        self._failures[key] = self._failures.get(key, 0) + 1
        if self._failures[key] < MAX_ATTEMPTS:
            self._stop.wait(min(2 ** self._failures[key], 30))  # back off; the work stays pending
            return
        self._failures.pop(key, None)
        store.fail([d.id for d in documents], f"indexing failed {MAX_ATTEMPTS} times: {type(exc).__name__}")

    # -- rebuild -----------------------------------------------------------

    def rebuild(self, store: IndexStateStore, collection_id: int) -> None:
        """Fresh index structure from re-encoded live passages, swapped in at commit."""
        started = time.time()
        col = store.collection(collection_id)
        if col is None:
            return
        purge = store.deleted_documents(collection_id)  # tombstones now: in no index after this
        live = store.live_passages(collection_id)
        pids = torch.tensor([p.passage_id for p in live], dtype=torch.int64)
        batch = self._encode(pids, [passage_text(p.title, p.text) for p in live])
        generation = col.generation + 1
        manifest = self.backend.rebuild(collection_id, generation, batch)
        outcome = store.commit_rebuild(collection_id, col.generation, generation, manifest, purge)
        if outcome is Commit.COLLECTION_DELETED:
            self.backend.drop(collection_id)
            return
        if outcome is Commit.STALE:  # a commit landed meanwhile; this rebuild's files go at the next commit
            return
        self.backend.release(collection_id, [manifest, col.manifest])
        logger.info(
            "collection %d rebuilt at generation %d: %d passages in %.1fs",
            collection_id,
            generation,
            len(live),
            time.time() - started,
        )
