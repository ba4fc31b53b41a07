"""Re-indexing a collection with another checkpoint while it is searched.

A tuned checkpoint (``python -m app.cli tune``, ``POST .../tune``) or any
other one of the same dimension gives other token vectors: a collection's
index must be encoded again as a whole before its queries can use it, since
the served index and its queries must always come from the same checkpoint.

``POST /v1/collections/{name}/reindex`` records the target in the
collection's row (``reindex_checkpoint``, ``reindex_cursor`` = 0). The index
writer then builds a second index beside the served one, through the normal
write path:

- each re-index batch reads the live passages from ``reindex_cursor`` on, in
  passage-id order, encodes them with the target checkpoint *keeping their
  passage ids*, writes them as a segment of the new index and records the new
  manifest and cursor in one transaction; searches go on over the served
  index meanwhile;
- writes go on too: new documents land in the served index, encoded with its
  checkpoint, with new passage ids, so the cursor reaches them later;
  deletes mark passage ids, which both indexes share (while a re-index runs,
  no deleted document's rows are purged, so that mark stays);
- the background maintainer trains codecs and merges segments of the new
  index as it grows, as it does for any growing collection;
- once no live passage is left past the cursor, one transaction serves the
  new index with its checkpoint (a new generation); the old index's files go
  when that generation is released. A batch encoded with the old checkpoint
  and not landed by then is refused at landing and encoded again.

Batches take turns with pending documents, so updates stay visible within
seconds during a re-index. A re-index survives restarts (its state is in
SQLite, its files are protected as committed), can be cancelled
(``DELETE .../reindex``), and a checkpoint that cannot be loaded stops it
with the reason in the collection's ``reindex.error``.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from app.engine.backend import PassageBatch
from app.errors import ServerError
from app.ingest.pipeline import passage_text
from app.store.index_state import Commit, IndexedCollection, IndexStateStore, LeaseLost

if TYPE_CHECKING:
    from app.engine.writer import IndexWriter

logger = logging.getLogger("app.engine")

MAX_FAILURES = 3  # re-index batches of a collection failing in a row before it stops


class Reindexer:
    """The index writer's re-index steps (on the writer thread)."""

    def __init__(self, writer: IndexWriter):
        self.writer = writer
        self.batches = 0  # landed since start
        self.passages = 0  # re-encoded since start
        self.finished = 0  # re-indexes that went live since start
        self._failures: dict[int, int] = {}  # collection -> batches failed in a row

    def due(self, store: IndexStateStore) -> IndexedCollection | None:
        """A collection with a re-index running, if any (the lowest id first)."""
        return next((c for c in store.collections() if c.reindexing), None)

    def step(self, store: IndexStateStore, collection_id: int, overlap: bool) -> bool:
        """Re-encode one batch of a collection's passages into its new index,
        or serve the new index once it holds them all. Landings in flight
        land first: they may add passages or move the cursor."""
        w = self.writer
        w.drain()
        col = store.collection(collection_id)
        if col is None or not col.reindexing:
            return False
        assert col.reindex_cursor is not None
        try:
            encoder = w.encoders.get(col.reindex_checkpoint)
        except Exception as exc:  # gone, unreadable, of another dimension: nothing to retry
            reason = exc.message if isinstance(exc, ServerError) else f"{type(exc).__name__}: {exc}"
            logger.error("re-index of collection %d stopped: %s", collection_id, reason)
            store.fail_reindex(collection_id, col.reindex_checkpoint, reason)
            return True
        try:
            done = self._step(store, col, encoder, overlap)
        except LeaseLost:
            raise
        except Exception as exc:
            from app.engine.writer import infrastructure_error

            if infrastructure_error(exc):  # a full disk, a locked database: wait it out, as commits do
                logger.exception("a re-index batch of collection %d failed for a cause outside it", collection_id)
                w._back_off(10.0)
                return True
            # The served index is not touched; a batch that fails again and
            # again (a passage the new checkpoint cannot encode) stops it.
            failures = self._failures[collection_id] = self._failures.get(collection_id, 0) + 1
            logger.exception("a re-index batch of collection %d failed (%d in a row)", collection_id, failures)
            if failures >= MAX_FAILURES:
                self._failures.pop(collection_id, None)
                reason = f"a batch failed {failures} times: {type(exc).__name__}: {exc}"
                store.fail_reindex(collection_id, col.reindex_checkpoint, reason)
            else:
                w._back_off(2.0**failures)
            return True
        self._failures.pop(collection_id, None)
        return done

    def _step(self, store: IndexStateStore, col: IndexedCollection, encoder, overlap: bool) -> bool:
        w = self.writer
        assert col.reindex_cursor is not None
        passages = store.passages_from(col.id, col.reindex_cursor, w._batch_chunks())
        if not passages:
            return self._finish(store, col)
        started = time.perf_counter()
        texts = [passage_text(p.title, p.text, p.field) for p in passages]
        vectors: list[torch.Tensor] = []
        dense_parts: list[torch.Tensor] = []
        done = 0
        while done < len(texts):
            n = w._slice_chunks()
            sliced = time.perf_counter()
            encoded = encoder.encode_passages(texts[done : done + n])
            vectors.extend(torch.split(encoded.embs, encoded.doclens))
            if encoded.dense is not None:
                dense_parts.append(encoded.dense)
            w._measured(time.perf_counter() - sliced, len(texts[done : done + n]))
            w._beat()
            done += n
            if done < len(texts):  # small upserts of any collection do not wait for a whole batch
                w._commit_priority(store, frozenset(), overlap)
        w.drain()
        pids = torch.tensor([p.passage_id for p in passages], dtype=torch.int64)
        doclens = torch.tensor([v.size(0) for v in vectors], dtype=torch.int64)
        dense = torch.cat(dense_parts).to(torch.float16) if len(dense_parts) else None
        batch = PassageBatch(
            pids, torch.cat(vectors), doclens, dense if dense is not None and len(dense) else None, tuple(texts)
        )
        return self._land(store, col, batch, int(pids[-1]) + 1, time.perf_counter() - started)

    def _land(
        self, store: IndexStateStore, read: IndexedCollection, batch: PassageBatch, cursor: int, encode_s: float
    ) -> bool:
        w = self.writer
        col = store.collection(read.id)  # as the landings in between left it
        if (
            col is None
            or col.reindex_cursor != read.reindex_cursor
            or col.reindex_checkpoint != read.reindex_checkpoint
        ):
            return True  # cancelled or started over meanwhile
        manifest = None
        try:
            manifest = w.backend.write(col.id, col.reindex_manifest, col.generation + 1, batch)
            outcome = store.commit_reindex_batch(col.id, col.reindex_checkpoint, col.reindex_manifest, manifest, cursor)
        except LeaseLost:
            w._lease_lost = True
            return True
        finally:
            # The served index, the new index as committed, and whatever it was before.
            try:
                w.backend.release(col.id, [*col.manifests(), manifest] if manifest else col.manifests())
            except Exception:
                logger.exception("cleaning up after a re-index batch of collection %d failed", col.id)
        if outcome is Commit.LANDED:
            self.batches += 1
            self.passages += int(batch.pids.numel())
            w.maintainer.notify()
            logger.info(
                "collection %d re-index: %d passages up to passage id %d (encode %.2fs)",
                col.id,
                batch.pids.numel(),
                cursor - 1,
                encode_s,
            )
        return True

    def _finish(self, store: IndexStateStore, col: IndexedCollection) -> bool:
        """Serve the new index and its checkpoint, in one commit."""
        w = self.writer
        generation = col.generation + 1
        outcome = store.finish_reindex(col.id, col.reindex_checkpoint, col.reindex_manifest, col.generation, generation)
        if outcome is Commit.LANDED:
            self.finished += 1
            logger.info(
                "collection %d is served from its re-index with checkpoint %s from generation %d",
                col.id,
                col.reindex_checkpoint or "(the configured one)",
                generation,
            )
            # Keep the previous generation: other processes may be loading it.
            w.backend.release(col.id, [col.reindex_manifest, col.manifest])
            w.maintainer.notify()
        elif outcome is Commit.COLLECTION_DELETED:
            w.backend.drop(col.id)
        return True
