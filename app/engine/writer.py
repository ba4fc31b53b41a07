"""The index writer: the one thread, in one process, that changes indexes.

Pending work is durable in SQLite (documents in state ``pending``), so any
process can accept writes while the process that holds the writer lease turns
them into index commits; if it dies, another process takes the lease over and
carries on from SQLite. A commit is: encode -> the backend prepares a new
generation (segment files, manifest) -> one SQLite transaction that assigns
passage ids, flips the document states and bumps the generation.

With ``writer_overlap`` the last two steps (a batch's *landing*) run on a
second thread, the lander, while the writer encodes the next batch:
compression, files and the SQLite transaction overlap the encoder instead of
following it (stand-in engine run to 100k on 2 cores: 1,088-1,113
passages/s against 920-1,031 landing after encoding; BENCHMARKS.md). Landings run
one at a time in the order they were handed over (one waits while the next
batch is encoded, never more), each on the collection's state as the
previous one left it; documents handed over and not landed yet are left out
of the next batches. A landing that fails leaves its documents pending.

Batches are sized to take about ``commit_target_s`` (from the measured cost
per chunk) and collections with pending work take turns, so a small update
waits for at most one short batch of someone else's bulk load. Merges and
codec retraining run on the maintainer's thread
(:mod:`app.engine.maintenance`); their results are folded in (cheap) on the
lander, after the landings handed over before them, while the writer goes on
encoding.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from app.engine.backend import IndexBackend, PassageBatch
from app.engine.encoders import Encoders, checkpoint_root
from app.engine.lease import WriterLease
from app.engine.maintenance import Maintainer, Submitted
from app.engine.reindex import Reindexer
from app.errors import BackendUnavailable, error_chain
from app.ingest.pipeline import passage_text
from app.settings import Settings
from app.store.index_state import Commit, IndexStateStore, LeaseLost, PendingDocument, take_writer_epoch
from app.store.schema import connect

logger = logging.getLogger("app.engine")

MAX_ATTEMPTS = 3  # tries of a document alone before it is marked failed
INFRASTRUCTURE_BACKOFF_MAX_S = 60.0
MIN_BATCH_CHUNKS = 16
# A bulk commit (encoding, compression and files, the SQLite transaction) is
# sized to take about this many commit targets: commits stay seconds apart
# however large the index, and a priority upsert waits for at most the
# non-encoding part of one.
COMMIT_SLICES = 3
FIRST_BATCH_CHUNKS = 1024  # before any commit has been timed
IDLE_POLL_MAX_S = 0.5  # an idle writer polls less often, up to this (a notify wakes it at once)
HEARTBEAT_FILE_S = 2.0  # the lease file's mtime is refreshed at most this often


def _moving_average(previous: float | None, value: float) -> float:
    return value if previous is None else 0.7 * previous + 0.3 * value


@dataclass(frozen=True)
class WriterState:
    """What ``/ready`` and ``/metrics`` report about this process's writer."""

    role: str  # "writer": this process holds the lease; "reader": another does, or none
    alive: bool
    busy: bool
    last_error: str | None
    lease_holder_pid: int | None
    degraded: str | None = None  # a cause outside the documents (disk full, database locked) keeps them pending
    stalled_s: float | None = None  # the lease holder's writer showed no sign of life for this long (a hang, SIGSTOP)
    documents_failed: int = 0  # since start, each by its own fault, isolated from its batch


@dataclass(frozen=True)
class _Batch:
    documents: list[PendingDocument]
    chunk_ids: list[int]
    texts: list[str]


@dataclass(frozen=True)
class _Encoded:
    """A batch encoded by the writer, on its way to be landed."""

    collection_id: int
    checkpoint: str | None  # what it was encoded with: it lands only if the index is still on it
    batch: _Batch
    vectors: list[torch.Tensor]
    dense: torch.Tensor | None  # (texts, dense dim) float16, in the batch's order; None: no dense head
    encode_s: float  # the writer's wall time on it, priority commits in between included
    own_s: float  # its own encoding time
    priority_only: bool
    started: float

    @property
    def document_ids(self) -> frozenset[int]:
        return frozenset(d.id for d in self.batch.documents)


class _Lander:
    """The thread that lands encoded batches, in the order handed over, with
    its own SQLite connection."""

    def __init__(self, database_path: Path, epoch: Callable[[], int | None]):
        self._database_path = database_path
        self._epoch = epoch  # the writer's fencing token, checked in each commit
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, land) -> Future:
        """Run ``land(store)`` after everything handed over before it."""
        future: Future = Future()
        self._jobs.put((land, future))
        if self._thread is None or not self._thread.is_alive():  # first use, or it stopped on an error
            self._thread = threading.Thread(target=self._run, name="index-lander", daemon=True)
            self._thread.start()
        return future

    def stop(self) -> None:
        """Finish what was handed over, then end the thread (a landing is
        seconds; the writer keeps its lease until this returns)."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        conn = None
        try:
            conn = connect(self._database_path)
            store = IndexStateStore(conn, self._epoch)
            while (job := self._jobs.get()) is not None:
                land, future = job
                future.set_running_or_notify_cancel()
                try:
                    future.set_result(land(store))
                except BaseException as exc:  # landings handle their own failures; this is a bug's way out
                    logger.exception("landing an index commit failed")
                    future.set_exception(exc)
        except BaseException as exc:  # no connection: fail what waits, so nobody waits for good
            logger.exception("the index lander stopped")
            self._fail_queued(exc)
        finally:
            if conn is not None:
                conn.close()

    def _fail_queued(self, exc: BaseException) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and job[1].set_running_or_notify_cancel():
                job[1].set_exception(exc)


class IndexWriter:
    def __init__(self, settings: Settings, encoder, backend: IndexBackend, encoders: Encoders | None = None):
        self.settings = settings
        self.encoder = encoder
        self.backend = backend
        # Each collection's documents are encoded with its index's checkpoint.
        self.encoders = encoders or Encoders(encoder, checkpoint_root(settings.data_dir))
        self.reindexer = Reindexer(self)
        self._reindex_turn = False  # pending documents and re-index batches take turns
        self.lease = WriterLease(settings.data_dir / "writer.lock")
        # The fencing token of the lease held (app/store/index_state.py); None
        # before any lease (unfenced: tests drive step() by hand), 0 once
        # given up (no epoch is 0: every commit is refused).
        self.epoch: int | None = None
        self._lease_lost = False  # a commit found another writer's epoch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy = False
        self.last_error: str | None = None
        self._failures: dict[int, int] = {}  # tries of a document isolated in a batch of its own
        # collection -> (documents per batch, documents of the failed batches not landed yet)
        self._isolating: dict[int, tuple[int, frozenset[int]]] = {}
        self._isolating_lock = threading.Lock()
        self._infrastructure_failures = 0  # in a row
        self.degraded: str | None = None  # the machine's fault that keeps documents pending now
        self.documents_failed = 0  # since start, by the documents' own fault
        self._last_beat = time.monotonic()
        self._last_file_beat = 0.0
        self._seconds_per_chunk: float | None = None  # moving average of encoding cost
        self._commit_seconds_per_chunk: float | None = None  # moving average of a whole commit's cost
        self._served: dict[int, float] = {}  # collection -> when its last batch was committed
        self._lander = _Lander(settings.database_path, lambda: self.epoch)
        self._landing: Future | None = None  # the last landing handed to the lander
        self._landing_ids: frozenset[int] = frozenset()  # documents handed over and not landed yet
        self._landing_lock = threading.Lock()
        self._applying: Submitted | None = None  # a maintenance change handed to the lander
        self.maintainer = Maintainer(
            settings.database_path, backend, is_writer=lambda: self.lease.held, on_submit=self.notify
        )

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()
        self.maintainer.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the writer to stop after its current step. The lease is given
        up by the thread itself when it exits (never while a commit may still
        be running); at process exit the OS drops it anyway."""
        self._stop.set()
        self._wake.set()
        self.maintainer.stop(timeout)
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
            busy=self.busy or bool(self._landing_ids) or self.maintainer.busy or self._change_in_flight(),
            last_error=self.last_error,
            lease_holder_pid=self.lease.holder_pid(),
            degraded=self.degraded,
            documents_failed=self.documents_failed,
            stalled_s=self._stalled_s(),
        )

    def _beat(self) -> None:
        """A sign of life, at each step of the writer's loop and between
        slices of a long batch; written to the lease file every few seconds
        for the other processes."""
        now = time.monotonic()
        self._last_beat = now
        if now - self._last_file_beat >= HEARTBEAT_FILE_S:
            self._last_file_beat = now
            try:
                self.lease.beat()
            except OSError:
                logger.warning("could not mark the writer lease as alive", exc_info=True)

    def _stalled_s(self) -> float | None:
        """How long the writer holding the lease (this process's or
        another's) has shown no sign of life, once that passes
        ``writer_stall_s``."""
        if self.lease.held:
            age: float | None = time.monotonic() - self._last_beat
        elif self.lease.holder_pid() is not None:
            age = self.lease.heartbeat_age()
        else:
            age = None
        return round(age, 1) if age is not None and age > self.settings.writer_stall_s else None

    def settled(self) -> bool:
        """Nothing pending, no background step running or planned (tests and
        benchmarks wait for this before comparing results)."""
        if (
            self.busy
            or self._landing_ids
            or self.maintainer.busy
            or not self.maintainer.changes.empty()
            or self._change_in_flight()
        ):
            return False
        conn = connect(self.settings.database_path)
        try:
            store = IndexStateStore(conn)
            if store.pending_collections():
                return False
            collections = store.collections()
            if any(c.reindexing for c in collections):
                return False
            return all(
                self.backend.plan(c.id, c.manifest, torch.tensor(store.dead_passage_ids(c.id), dtype=torch.int64))
                is None
                for c in collections
            )
        finally:
            conn.close()

    def _change_in_flight(self) -> bool:
        applying = self._applying
        return applying is not None and not applying.done.is_set()

    def _run(self) -> None:
        conn = connect(self.settings.database_path)
        store = IndexStateStore(conn, lambda: self.epoch)
        recovered = False
        idle_wait = self.settings.writer_poll_interval_s
        try:
            while not self._stop.is_set():
                self._beat()
                if self._lease_lost:
                    self._give_up_lease()
                if not self.lease.held:
                    if not self._acquire(conn):
                        self._stop.wait(1.0)
                        continue
                    recovered = False
                try:
                    if not recovered:
                        self.backend.recover({c.id: c.manifests() for c in store.collections()})
                        recovered = True
                    did_work = self.step(store, overlap=self.settings.writer_overlap)
                    self.last_error = None
                except LeaseLost:
                    logger.error("another process took the writer lease: this one stops writing", exc_info=True)
                    self._lease_lost = True
                    did_work = True  # give the lease up at once
                except Exception as exc:  # keep the writer alive; the work stays pending
                    logger.exception("index writer step failed")
                    self.last_error = type(exc).__name__
                    did_work = False
                    self._stop.wait(1.0)
                if did_work:
                    idle_wait = self.settings.writer_poll_interval_s
                else:
                    self._wake.wait(idle_wait)
                    self._wake.clear()
                    idle_wait = min(idle_wait * 2, max(IDLE_POLL_MAX_S, self.settings.writer_poll_interval_s))
        finally:
            # Land what was handed over while the lease is still ours.
            self._lander.stop()
            conn.close()
            self.lease.release()

    def _acquire(self, conn) -> bool:
        """Take the lease if it is free, and a new fencing token with it. An
        error other than "held by another" (a filesystem without locks, a
        lease file this process may not open) leaves no writer at all: it is
        logged and shown as ``degraded`` in /ready, and tried again."""
        try:
            if not self.lease.try_acquire():
                return False
            self.epoch = take_writer_epoch(conn, os.getpid())
        except Exception as exc:
            self.lease.release()
            self.epoch = 0 if self.epoch is not None else None
            self.degraded = f"writer lease: {type(exc).__name__}: {exc}"[:500]
            logger.exception("could not take the writer lease")
            return False
        if self.degraded is not None and self.degraded.startswith("writer lease:"):
            self.degraded = None
        logger.info("this process (pid %d) is the index writer (epoch %d)", os.getpid(), self.epoch)
        return True

    def _give_up_lease(self) -> None:
        """After a commit was refused for an old epoch: land nothing more,
        let go of the lease, and compete for it again as any process would."""
        self._lander.stop()  # what it still holds is refused the same way; the documents stay pending
        self.lease.release()
        self.epoch = 0
        self._lease_lost = False

    # -- work --------------------------------------------------------------

    def step(self, store: IndexStateStore, overlap: bool = False) -> bool:
        """One unit of work: fold in a finished maintenance step, else commit
        a batch of the collection that waited longest. False when idle.

        With ``overlap`` (the writer thread) the batch is handed to the
        lander and the step returns while it lands; otherwise (tests, tools)
        it returns once everything it handed over has landed."""
        try:
            submitted = self.maintainer.changes.get_nowait()
        except queue.Empty:
            submitted = None
        if submitted is not None:
            self._hand_over_change(store, submitted, overlap)
            return True
        purged = store.purge_dropped()  # one short batch of a deleted collection's rows
        pending = store.pending_collections()
        reindexing = self.reindexer.due(store)
        if reindexing is not None and (not pending or self._reindex_turn):
            self._reindex_turn = False
            self.busy = True
            try:
                return self.reindexer.step(store, reindexing.id, overlap)
            finally:
                self.busy = False
        self._reindex_turn = True
        if not pending:
            self.degraded = None  # what it held back was deleted meanwhile
            return self.drain() or purged
        # Priority documents (small upserts) first; otherwise collections take turns.
        collection_id, _ = min(pending, key=lambda c: (not c[1], self._served.get(c[0], 0.0)))
        self.busy = True
        try:
            handed = self.commit_pending(store, collection_id, overlap=overlap)
        finally:
            self.busy = False
            self._served[collection_id] = time.monotonic()
        if not handed or not overlap:  # nothing to encode (all pending is landing), or landing here
            self.drain()
        return True

    def drain(self) -> bool:
        """Wait for every landing handed over; True if one was still running."""
        landing, self._landing = self._landing, None
        if landing is None:
            return False
        running = not landing.done()
        landing.exception()  # waits; a landing handles its own failures (the lander logs any other)
        return running

    def _hand_over_change(self, store: IndexStateStore, submitted: Submitted, overlap: bool) -> None:
        """Fold a prepared change in after the landings handed over before it:
        on the lander (``overlap``), so the writer goes on encoding meanwhile
        instead of waiting for the landing in flight (that wait, then a
        landing slowed by a merge, made the longest commit pauses at 1M:
        BENCHMARKS.md); else here."""
        if not overlap:
            self.drain()  # a change applies to the generation the landings leave
            self.apply_change(store, submitted)
            return
        self._applying = submitted
        try:
            self._landing = self._lander.submit(lambda lander_store: self.apply_change(lander_store, submitted))
        except BaseException:
            self._applying = None
            raise
        # Should the lander stop before it runs the change, the maintainer
        # must not wait for it for good (the change's files are then orphans,
        # removed at the next start).
        self._landing.add_done_callback(lambda _: submitted.done.set())

    def apply_change(self, store: IndexStateStore, submitted: Submitted) -> None:
        """Swap in a prepared merge or codec (cheap: a manifest and one transaction)."""
        change = submitted.change
        collection_id = change.task.collection_id
        try:
            col = store.collection(collection_id)
            manifest = None
            # A step of the served index, or of the one a re-index builds,
            # if that index is still of the checkpoint it was prepared for.
            base = None if col is None else col.reindex_manifest if submitted.reindex else col.manifest
            if col is not None and (not submitted.reindex or col.reindexing):
                checkpoint = col.reindex_checkpoint if submitted.reindex else col.checkpoint
                if checkpoint == submitted.checkpoint:
                    manifest = self.backend.apply(collection_id, base, col.generation + 1, change)
            if col is None or manifest is None:
                self.backend.abandon(change)
                submitted.outcome = "no longer applicable"
                return
            if submitted.reindex:
                outcome = store.commit_reindex_maintenance(collection_id, col.reindex_checkpoint, base, manifest)
            else:
                outcome = store.commit_maintenance(
                    collection_id, col.generation, col.generation + 1, manifest, change.dropped_pids.tolist()
                )
            submitted.outcome = outcome.value
            if outcome is Commit.COLLECTION_DELETED:
                self.backend.drop(collection_id)
            elif outcome is Commit.LANDED:
                self.backend.release(collection_id, [manifest, *col.manifests()])
        except Exception as exc:
            if isinstance(exc, LeaseLost):
                self._lease_lost = True
            logger.exception("applying index maintenance of collection %d failed", collection_id)
            submitted.outcome = f"failed: {type(exc).__name__}"
            self.backend.abandon(change)
        finally:
            submitted.done.set()

    def _slice_chunks(self) -> int:
        """Chunks encoded between two looks for priority documents: about
        ``commit_target_s`` of encoding at the measured rate."""
        limit = self.settings.commit_max_chunks
        if self._seconds_per_chunk is None:
            return min(limit, 64)
        wanted = int(self.settings.commit_target_s / max(self._seconds_per_chunk, 1e-6))
        return max(min(MIN_BATCH_CHUNKS, limit), min(limit, wanted))

    def _batch_chunks(self) -> int:
        """Chunks per bulk commit: about ``COMMIT_SLICES x commit_target_s``
        at the measured cost of a whole commit, within [MIN_BATCH_CHUNKS,
        commit_max_chunks]."""
        limit = self.settings.commit_max_chunks
        if self._commit_seconds_per_chunk is None:
            return min(limit, FIRST_BATCH_CHUNKS)
        wanted = int(COMMIT_SLICES * self.settings.commit_target_s / max(self._commit_seconds_per_chunk, 1e-6))
        return max(min(MIN_BATCH_CHUNKS, limit), min(limit, wanted))

    def _next_batch(
        self, store: IndexStateStore, collection_id: int, priority_only: bool = False, exclude: frozenset = frozenset()
    ) -> _Batch:
        """Pending documents, priority ones first, then the oldest, up to
        :meth:`_batch_chunks` chunks; a later pending version of the same id
        supersedes an earlier one."""
        budget = self._batch_chunks()
        exclude = exclude | self._landing_ids  # handed to the lander, still pending in SQLite
        pending = [
            d
            for d in store.pending_documents(collection_id, limit=budget + len(exclude), priority_only=priority_only)
            if d.id not in exclude
        ]
        # While a failed batch is taken apart, at most this many documents (its suspects come first: oldest).
        most = self._batch_cap(collection_id, {d.id for d in pending}) or len(pending) + 1
        superseded = store.later_pending_versions(collection_id, pending)
        if superseded:
            store.supersede(sorted(superseded))
        batch = _Batch([], [], [])
        kept = [d for d in pending if d.id not in superseded]
        chunks_of = store.chunks_of([d.id for d in kept])
        for d in kept:
            chunks = chunks_of[d.id]  # every field's
            if batch.documents and (len(batch.chunk_ids) + len(chunks) > budget or len(batch.documents) >= most):
                break
            batch.documents.append(d)
            batch.chunk_ids.extend(c.id for c in chunks)
            batch.texts.extend(passage_text(d.title, c.text, c.field) for c in chunks)
        return batch

    def commit_pending(
        self,
        store: IndexStateStore,
        collection_id: int,
        priority_only: bool = False,
        exclude: frozenset = frozenset(),
        overlap: bool = False,
    ) -> bool:
        """Encode one batch and hand it to the lander (False: nothing to
        encode). A long batch (a bulk load) is encoded in slices of about
        ``commit_target_s``; between slices, priority documents of any
        collection are committed on their own, so a small upsert never waits
        for a whole bulk batch."""
        started = time.perf_counter()
        interleave = not priority_only
        col = store.collection(collection_id)
        if col is None:
            return False
        try:
            encoder = self.encoders.get(col.checkpoint)
        except Exception as exc:  # its checkpoint removed from the data directory, say: nothing fails
            self._unavailable(collection_id, exc)
            return False
        batch = self._next_batch(store, collection_id, priority_only, exclude)
        if not batch.documents:
            return False
        in_flight = exclude | frozenset(d.id for d in batch.documents)
        try:
            # Slices follow the batch's texts by length, so each is encoded
            # with little padding however few texts it holds (slices of 100
            # in arrival order ran 7% slower: bench.encoder_batches).
            order = sorted(range(len(batch.texts)), key=lambda i: len(batch.texts[i]))
            vectors: list[torch.Tensor] = [torch.empty(0)] * len(order)
            dense_dim = getattr(encoder, "dense_dim", None)
            dense = torch.empty(len(order), dense_dim, dtype=torch.float16) if dense_dim else None
            done = 0
            own_s = 0.0  # this batch's own work, not the priority commits in between
            while done < len(order):
                n = self._slice_chunks()
                part = order[done : done + n]
                sliced = time.perf_counter()
                encoded_part = encoder.encode_passages([batch.texts[i] for i in part])
                for i, rows in zip(part, torch.split(encoded_part.embs, encoded_part.doclens), strict=True):
                    vectors[i] = rows
                if dense is not None and encoded_part.dense is not None:
                    dense[torch.tensor(part, dtype=torch.int64)] = encoded_part.dense
                own_s += time.perf_counter() - sliced
                self._measured(time.perf_counter() - sliced, len(part))
                self._beat()
                done += n
                if interleave and done < len(order):
                    self._commit_priority(store, in_flight, overlap)
        except Exception as exc:
            self._failed(store, collection_id, batch.documents, exc)
            return True
        encoded = _Encoded(
            collection_id,
            col.checkpoint,
            batch,
            vectors,
            dense,
            time.perf_counter() - started,
            own_s,
            priority_only,
            started,
        )
        self._hand_over(store, encoded, overlap)
        return True

    def _hand_over(self, store: IndexStateStore, encoded: _Encoded, overlap: bool) -> None:
        """Land ``encoded`` after the landing before it: on the lander
        (``overlap``: while the writer goes on), else here."""
        self.drain()  # at most one landing waits while a batch is encoded
        ids = encoded.document_ids
        with self._landing_lock:
            self._landing_ids = self._landing_ids | ids
        if not overlap:
            self._land(store, encoded)
            return
        try:
            self._landing = self._lander.submit(lambda lander_store: self._land(lander_store, encoded))
        except BaseException:  # not handed over after all: the documents stay pending for the next batch
            with self._landing_lock:
                self._landing_ids = self._landing_ids - ids
            raise

    def _land(self, store: IndexStateStore, encoded: _Encoded) -> None:
        """Index files, then the SQLite transaction, on the collection as it is now."""
        collection_id, batch, vectors = encoded.collection_id, encoded.batch, encoded.vectors
        landed = time.perf_counter()
        try:
            col = store.collection(collection_id)
            if col is None:
                return
            if col.checkpoint != encoded.checkpoint:
                # A re-index went live since it was encoded: it is encoded
                # again with the new checkpoint (its documents stay pending).
                logger.info(
                    "collection %d: a batch encoded before a re-index went live is encoded again", collection_id
                )
                return
            generation = col.generation + 1
            pids = torch.arange(col.next_pid, col.next_pid + len(batch.texts), dtype=torch.int64)
            doclens = torch.tensor([v.size(0) for v in vectors], dtype=torch.int64)
            embs = torch.cat(vectors) if vectors else torch.empty(0, self.encoder.dim)
            passages = PassageBatch(pids, embs, doclens, encoded.dense, tuple(batch.texts))
            manifest = self.backend.write(collection_id, col.manifest, generation, passages)
            write_s = time.perf_counter() - landed
            outcome = store.commit_append(
                collection_id, col.generation, generation, manifest, col.next_pid, batch.chunk_ids, batch.documents
            )
            if not encoded.priority_only:
                self._commit_measured(encoded.own_s + time.perf_counter() - landed, len(batch.texts))
            self._landed(collection_id, batch.documents)
        except Exception as exc:
            self._failed(store, collection_id, batch.documents, exc)
            return
        finally:
            with self._landing_lock:
                self._landing_ids = self._landing_ids - encoded.document_ids
        try:  # the commit landed: cleaning up after it is not a failed landing
            if outcome is Commit.COLLECTION_DELETED:
                self.backend.drop(collection_id)
                return
            # Keep the previous generation: other processes may be loading it.
            self.backend.release(collection_id, [manifest, *col.manifests()])
        except Exception:
            logger.exception("cleaning up after generation %d of collection %d failed", generation, collection_id)
        self.maintainer.notify()
        logger.info(
            "collection %d generation %d: %d documents, %d passages (encode %.2fs, index files %.2fs, "
            "landing %.2fs, handed over to landed %.2fs)",
            collection_id,
            generation,
            len(batch.documents),
            len(batch.texts),
            encoded.encode_s,
            write_s,
            time.perf_counter() - landed,
            time.perf_counter() - encoded.started - encoded.encode_s,
        )

    def _commit_priority(self, store: IndexStateStore, in_flight: frozenset, overlap: bool) -> None:
        """Commit the priority documents of every collection (not those of the batch in flight)."""
        for collection_id, urgent in store.pending_collections():
            if urgent:
                self.commit_pending(store, collection_id, priority_only=True, exclude=in_flight, overlap=overlap)

    def _measured(self, seconds: float, chunks: int) -> None:
        self._seconds_per_chunk = _moving_average(self._seconds_per_chunk, seconds / max(chunks, 1))

    def _commit_measured(self, seconds: float, chunks: int) -> None:
        self._commit_seconds_per_chunk = _moving_average(self._commit_seconds_per_chunk, seconds / max(chunks, 1))

    def _failed(self, store: IndexStateStore, collection_id: int, documents: list[PendingDocument], exc: Exception):
        """A batch did not land. The machine's fault (disk full, database
        locked, out of memory): nothing fails, the writer backs off and says
        so until the cause is gone. Otherwise something in the batch breaks
        indexing: the batch is halved until that document is alone, and only
        it is marked failed, after MAX_ATTEMPTS tries, with the reason."""
        if isinstance(exc, LeaseLost):  # rolled back; another process writes now
            logger.error("collection %d: %s; %d documents stay pending", collection_id, exc, len(documents))
            self._lease_lost = True
            return
        if infrastructure_error(exc):
            self._infrastructure_failures += 1
            delay = min(2.0**self._infrastructure_failures, INFRASTRUCTURE_BACKOFF_MAX_S)
            self.degraded = f"{type(exc).__name__}: {exc}"[:500]
            logger.exception(
                "indexing %d documents of collection %d failed for a cause outside them; they stay pending, "
                "next try in %.0fs",
                len(documents),
                collection_id,
                delay,
            )
            self._back_off(delay)
            return
        logger.exception("indexing %d documents of collection %d failed", len(documents), collection_id)
        if len(documents) > 1:
            with self._isolating_lock:  # the writer (encoding) and the lander (landing) both report failures
                _, suspects = self._isolating.get(collection_id, (0, frozenset()))
                self._isolating[collection_id] = ((len(documents) + 1) // 2, suspects | {d.id for d in documents})
            return
        [document] = documents
        attempts = self._failures[document.id] = self._failures.get(document.id, 0) + 1
        if attempts < MAX_ATTEMPTS:
            self._back_off(min(2**attempts, 30))  # it may still be transient: back off and retry it alone
            return
        self._failures.pop(document.id, None)
        reason = f"indexing failed {MAX_ATTEMPTS} times: {type(exc).__name__}: {exc}"[:1000]
        try:
            store.fail([document.id], reason)
        except LeaseLost:  # another process writes now; it will try the document itself
            self._lease_lost = True
            return
        self.documents_failed += 1
        # Found: full batches again (another bad document among the rest is
        # taken apart the same way when its batch fails).
        with self._isolating_lock:
            self._isolating.pop(collection_id, None)

    def _unavailable(self, collection_id: int, exc: Exception) -> None:
        """A collection's checkpoint cannot be loaded: its documents stay
        pending, the writer says so and tries again later."""
        self.degraded = f"collection {collection_id}: its checkpoint cannot be loaded: {exc}"[:500]
        logger.error("%s", self.degraded)
        self._back_off(10.0)

    def _back_off(self, seconds: float) -> None:
        """Wait (or stop), with signs of life: backing off is not a stall."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
            self._stop.wait(min(left, 1.0))
            self._beat()

    def _landed(self, collection_id: int, documents: list[PendingDocument]) -> None:
        self._infrastructure_failures = 0
        self.degraded = None
        with self._isolating_lock:
            if collection_id in self._isolating:
                cap, suspects = self._isolating[collection_id]
                suspects = suspects - {d.id for d in documents}
                if suspects:
                    self._isolating[collection_id] = (cap, suspects)
                else:  # every document of the failed batches landed: it was transient after all
                    del self._isolating[collection_id]

    def _batch_cap(self, collection_id: int, pending_ids: set[int]) -> int | None:
        """Documents per batch while a failed batch of this collection is
        taken apart (None: no limit); forgotten once none of its documents
        is pending any more (deleted or replaced meanwhile)."""
        with self._isolating_lock:
            if collection_id not in self._isolating:
                return None
            cap, suspects = self._isolating[collection_id]
            if not suspects & pending_ids:
                del self._isolating[collection_id]
                return None
            return cap


# Causes outside the documents: retrying later succeeds once they are gone.
_INFRASTRUCTURE_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EFBIG,  # a file-size limit (ulimit -f, a quota)
        errno.EIO,
        errno.EROFS,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.EAGAIN,
        errno.EACCES,  # files owned by another user after a restore, say
        errno.EPERM,
    }
)
_INFRASTRUCTURE_MESSAGES = (
    "no space left",
    "disk is full",
    "database is locked",
    "database table is locked",
    "disk i/o error",
    "database disk image is malformed",
    "unable to open database",
    "readonly database",
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
)


def infrastructure_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the machine's fault (disk full,
    a locked database, memory), not the document's."""
    for current in error_chain(exc):
        if isinstance(current, (MemoryError, BackendUnavailable)):  # (the index backend's cluster: not the document)
            return True
        if isinstance(current, OSError) and current.errno in _INFRASTRUCTURE_ERRNOS:
            return True
        text = str(current).lower()
        if any(marker in text for marker in _INFRASTRUCTURE_MESSAGES):
            return True
    return False
