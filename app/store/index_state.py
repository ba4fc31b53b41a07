"""The index writer's SQL: what is pending, and the commits that make it live.

Synchronous (the writer runs on its own thread with its own connection). A
commit is one transaction that assigns passage ids, flips document states and
bumps the collection's generation, so a searcher sees all of a commit or none.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from app.store.schema import SQL_VARIABLES, transaction


@dataclass(frozen=True)
class IndexedCollection:
    id: int
    generation: int
    manifest: str | None  # the committed manifest's name, None before the first commit
    next_pid: int
    checkpoint: str | None = None  # what its index was encoded with (None: the server's configured checkpoint)
    # While a re-index runs (``reindex_cursor`` not None): its target
    # checkpoint, the new index built so far, and the first passage id it
    # has still to re-encode.
    reindex_checkpoint: str | None = None
    reindex_manifest: str | None = None
    reindex_cursor: int | None = None

    @property
    def reindexing(self) -> bool:
        return self.reindex_cursor is not None

    def manifests(self) -> list[str | None]:
        """Every manifest whose files must stay: the served index's and the one a re-index builds."""
        return [self.manifest, self.reindex_manifest]


@dataclass(frozen=True)
class PendingDocument:
    id: int
    external_id: str
    title: str | None


@dataclass(frozen=True)
class LivePassage:
    passage_id: int
    text: str
    title: str | None
    field: str


@dataclass(frozen=True)
class LiveChunk:
    """A live document's chunk with what tuning needs of its document."""

    document_id: int
    title: str | None
    text: str
    field: str


@dataclass(frozen=True)
class PendingChunk:
    id: int
    text: str
    field: str  # the document's field it was cut from


class Commit(enum.Enum):
    """How a commit ended."""

    LANDED = "landed"
    COLLECTION_DELETED = "collection deleted"  # meanwhile: its index files can go
    STALE = "stale"  # another commit moved the generation first


# Rows of a deleted collection purged per transaction (milliseconds each).
PURGE_BATCH_ROWS = 5000


class LeaseLost(RuntimeError):
    """Another process took the writer lease since this one did: its
    commits are refused (rolled back) and it must stop writing."""


def take_writer_epoch(conn: sqlite3.Connection, pid: int) -> int:
    """Raise the writer epoch for a process that just took the lease; its
    commits then carry the new epoch as their fencing token."""
    with transaction(conn):
        row = conn.execute(
            """INSERT INTO writer_epoch(id, epoch, pid, taken_at) VALUES (1, 1, ?, ?)
               ON CONFLICT(id) DO UPDATE SET epoch = epoch + 1, pid = excluded.pid, taken_at = excluded.taken_at
               RETURNING epoch""",
            (pid, time.time()),
        ).fetchone()
    return int(row[0])


class IndexStateStore:
    def __init__(self, conn: sqlite3.Connection, epoch: Callable[[], int | None] | None = None):
        """``epoch``: gives the fencing token of the lease this writer holds,
        checked in every write; it gives None for a writer that never took a
        lease (tools, tests driving the writer by hand): unfenced."""
        self.conn = conn
        self.epoch = epoch

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """A write transaction that first checks the fencing token."""
        with transaction(self.conn):
            mine = self.epoch() if self.epoch is not None else None
            if mine is not None:
                row = self.conn.execute("SELECT epoch FROM writer_epoch WHERE id = 1").fetchone()
                if row is None or row[0] != mine:
                    raise LeaseLost(
                        f"the writer lease moved on (epoch {None if row is None else row[0]}, this writer's {mine})"
                    )
            yield

    # -- reads -------------------------------------------------------------

    _COLUMNS = "id, generation, manifest, next_pid, checkpoint, reindex_checkpoint, reindex_manifest, reindex_cursor"

    def collections(self) -> list[IndexedCollection]:
        rows = self.conn.execute(f"SELECT {self._COLUMNS} FROM collections ORDER BY id").fetchall()
        return [IndexedCollection(**dict(r)) for r in rows]

    def collection(self, collection_id: int) -> IndexedCollection | None:
        row = self.conn.execute(f"SELECT {self._COLUMNS} FROM collections WHERE id = ?", (collection_id,)).fetchone()
        return IndexedCollection(**dict(row)) if row is not None else None

    def passages_from(self, collection_id: int, first_pid: int, limit: int) -> list[LivePassage]:
        """Live passages from ``first_pid`` on, in passage-id order, at most
        ``limit`` (-1: all); what a re-index encodes next."""
        rows = self.conn.execute(
            """SELECT c.passage_id, c.text, d.title, c.field FROM chunks c JOIN documents d ON d.id = c.document_id
               WHERE c.collection_id = ? AND c.passage_id >= ? AND d.state = 'live'
               ORDER BY c.passage_id LIMIT ?""",
            (collection_id, first_pid, limit),
        ).fetchall()
        return [LivePassage(**dict(r)) for r in rows]

    def pending_collections(self) -> list[tuple[int, bool]]:
        """(collection, has priority documents) for collections with pending
        documents, the one waiting longest first."""
        rows = self.conn.execute(
            """SELECT collection_id, MIN(id) AS oldest, MAX(priority) AS urgent FROM documents
               WHERE state = 'pending' AND collection_id NOT IN (SELECT id FROM dropped_collections)
               GROUP BY collection_id ORDER BY oldest"""
        ).fetchall()
        return [(r["collection_id"], bool(r["urgent"])) for r in rows]

    def pending_documents(
        self, collection_id: int, limit: int | None = None, priority_only: bool = False
    ) -> list[PendingDocument]:
        """Pending documents, priority ones first, then in order of arrival."""
        rows = self.conn.execute(
            """SELECT id, external_id, title FROM documents
               WHERE collection_id = ? AND state = 'pending' AND priority >= ?
               ORDER BY priority DESC, id LIMIT ?""",
            (collection_id, 1 if priority_only else 0, -1 if limit is None else limit),
        ).fetchall()
        return [PendingDocument(**dict(r)) for r in rows]

    def later_pending_versions(self, collection_id: int, documents: list[PendingDocument]) -> set[int]:
        """Which of ``documents`` a later pending version of the same id overtakes.

        One lookup per slice of ids through ``documents_by_external`` (a
        pending row's later versions are few): per-document probes of the
        pending rows made a bulk batch cost O(pending x batch)."""
        newest: dict[str, int] = {}
        ids = sorted({d.external_id for d in documents})
        for start in range(0, len(ids), SQL_VARIABLES):
            part = ids[start : start + SQL_VARIABLES]
            rows = self.conn.execute(
                f"""SELECT external_id, MAX(id) FROM documents INDEXED BY documents_by_external
                    WHERE collection_id = ? AND external_id IN ({",".join("?" * len(part))})
                    AND state = 'pending' GROUP BY external_id""",
                (collection_id, *part),
            ).fetchall()
            newest.update((r[0], r[1]) for r in rows)
        return {d.id for d in documents if newest.get(d.external_id, d.id) > d.id}

    def chunk_texts(self, document_id: int) -> list[tuple[int, str]]:
        """(chunk id, text) of one document, in order."""
        return [(c.id, c.text) for c in self.chunks_of([document_id]).get(document_id, [])]

    def chunks_of(self, document_ids: list[int]) -> dict[int, list[PendingChunk]]:
        """The chunks of each document, every field's, in order, in one query per slice of ids."""
        out: dict[int, list[PendingChunk]] = {d: [] for d in document_ids}
        for start in range(0, len(document_ids), SQL_VARIABLES):
            part = document_ids[start : start + SQL_VARIABLES]
            rows = self.conn.execute(
                f"""SELECT document_id, id, text, field FROM chunks INDEXED BY chunks_by_document
                    WHERE document_id IN ({",".join("?" * len(part))}) ORDER BY document_id, ord""",
                part,
            ).fetchall()
            for r in rows:
                out[r[0]].append(PendingChunk(r[1], r[2], r[3]))
        return out

    def dead_passage_count(self, collection_id: int) -> int:
        """Indexed passages of deleted documents (tombstones a rebuild would drop)."""
        return self.conn.execute(
            """SELECT COUNT(*) FROM documents d JOIN chunks c ON c.document_id = d.id
               WHERE d.collection_id = ? AND d.state = 'deleted' AND c.passage_id IS NOT NULL""",
            (collection_id,),
        ).fetchone()[0]

    def dead_passage_ids(self, collection_id: int) -> list[int]:
        """Passage ids of deleted documents still in the index (tombstones)."""
        rows = self.conn.execute(
            """SELECT c.passage_id FROM documents d JOIN chunks c ON c.document_id = d.id
               WHERE d.collection_id = ? AND d.state = 'deleted' AND c.passage_id IS NOT NULL""",
            (collection_id,),
        ).fetchall()
        return [r[0] for r in rows]

    def deleted_documents(self, collection_id: int) -> list[int]:
        rows = self.conn.execute(
            "SELECT id FROM documents WHERE collection_id = ? AND state = 'deleted'", (collection_id,)
        ).fetchall()
        return [r[0] for r in rows]

    def live_passages(self, collection_id: int) -> list[LivePassage]:
        return self.passages_from(collection_id, 0, -1)

    def collection_id(self, name: str) -> int | None:
        row = self.conn.execute("SELECT id FROM collections WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row is not None else None

    def live_chunk_ids(self, collection_id: int) -> list[int]:
        """The chunk ids of the collection's live documents, in order."""
        rows = self.conn.execute(
            """SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id
               WHERE d.collection_id = ? AND d.state = 'live' ORDER BY c.id""",
            (collection_id,),
        ).fetchall()
        return [r[0] for r in rows]

    def live_chunks(self, chunk_ids: list[int]) -> list[LiveChunk]:
        """Those chunks with their documents' ids and titles, in the order of ``chunk_ids``."""
        found: dict[int, LiveChunk] = {}
        for start in range(0, len(chunk_ids), SQL_VARIABLES):
            part = chunk_ids[start : start + SQL_VARIABLES]
            rows = self.conn.execute(
                f"""SELECT c.id, c.document_id, d.title, c.text, c.field FROM chunks c
                    JOIN documents d ON d.id = c.document_id WHERE c.id IN ({",".join("?" * len(part))})""",
                part,
            ).fetchall()
            found.update((r[0], LiveChunk(r[1], r[2], r[3], r[4])) for r in rows)
        return [found[i] for i in chunk_ids if i in found]

    # -- writes ------------------------------------------------------------

    def purge_dropped(self, batch: int = PURGE_BATCH_ROWS) -> bool:
        """Delete up to ``batch`` rows of a deleted collection (chunks, then
        documents, then job files and jobs), in one short transaction.
        False when no deleted collection has rows left."""
        row = self.conn.execute("SELECT id FROM dropped_collections ORDER BY id LIMIT 1").fetchone()
        if row is None:
            return False
        cid = row[0]
        with self._writing():
            for sql in (
                "DELETE FROM chunks WHERE id IN (SELECT id FROM chunks WHERE collection_id = ? LIMIT ?)",
                "DELETE FROM documents WHERE id IN (SELECT id FROM documents WHERE collection_id = ? LIMIT ?)",
                """DELETE FROM job_files WHERE id IN (SELECT f.id FROM jobs j JOIN job_files f ON f.job_id = j.id
                   WHERE j.collection_id = ? LIMIT ?)""",
            ):
                if self.conn.execute(sql, (cid, batch)).rowcount > 0:
                    return True
            self.conn.execute("DELETE FROM jobs WHERE collection_id = ?", (cid,))
            self.conn.execute("DELETE FROM tuning_jobs WHERE collection_id = ?", (cid,))
            self.conn.execute("DELETE FROM dropped_collections WHERE id = ?", (cid,))
        return True

    def supersede(self, document_ids: list[int]) -> None:
        """Pending versions overtaken by a later pending version of the same id."""
        now = time.time()
        with self._writing():
            self.conn.executemany(
                "UPDATE documents SET state = 'deleted', updated_at = ? WHERE id = ? AND state = 'pending'",
                [(now, i) for i in document_ids],
            )

    def fail(self, document_ids: list[int], error: str) -> None:
        now = time.time()
        with self._writing():
            self.conn.executemany(
                "UPDATE documents SET state = 'failed', error = ?, updated_at = ? WHERE id = ? AND state = 'pending'",
                [(error, now, i) for i in document_ids],
            )

    def commit_append(
        self,
        collection_id: int,
        old_generation: int,
        generation: int,
        manifest: str,
        first_pid: int,
        chunk_ids: list[int],
        documents: list[PendingDocument],
    ) -> Commit:
        """Make ``documents`` live at ``generation``: their chunks get passage
        ids from ``first_pid`` on, the previous live version of each is
        tombstoned. Only the writer appends, so a moved generation is an error."""
        now = time.time()
        with self._writing():
            col = self.collection(collection_id)
            if col is None:
                return Commit.COLLECTION_DELETED
            if col.generation != old_generation:
                raise RuntimeError("index generation moved under the writer")
            self.conn.executemany(
                "UPDATE chunks SET passage_id = ? WHERE id = ?",
                [(first_pid + i, chunk_id) for i, chunk_id in enumerate(chunk_ids)],
            )
            # Set-based, a handful of statements per commit whatever its size.
            # Documents deleted while they were indexed are no longer pending:
            # their passages stay dead.
            batch = json.dumps([d.id for d in documents])
            # A later version (a priority upsert) went live first: superseded.
            self.conn.execute(
                """UPDATE documents SET state = 'deleted', updated_at = ?
                   WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending' AND EXISTS
                     (SELECT 1 FROM documents n WHERE n.collection_id = documents.collection_id
                        AND n.external_id = documents.external_id AND n.state = 'live' AND n.id > documents.id)""",
                (now, batch),
            )
            # Two pending versions of one id in the batch: the later one wins.
            pending = {
                row[0]
                for row in self.conn.execute(
                    "SELECT id FROM documents WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending'",
                    (batch,),
                )
            }
            latest: dict[str, int] = {}
            for d in documents:
                if d.id in pending:
                    latest[d.external_id] = max(d.id, latest.get(d.external_id, d.id))
            overtaken = [d.id for d in documents if d.id in pending and d.id != latest[d.external_id]]
            if overtaken:
                self.conn.execute(
                    """UPDATE documents SET state = 'deleted', updated_at = ?
                       WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending'""",
                    (now, json.dumps(overtaken)),
                )
            # The live versions the batch replaces.
            self.conn.execute(
                """UPDATE documents SET state = 'deleted', updated_at = ?
                   WHERE id IN (SELECT old.id FROM documents d JOIN documents old
                     ON old.collection_id = d.collection_id AND old.external_id = d.external_id AND old.state = 'live'
                     WHERE d.id IN (SELECT value FROM json_each(?)) AND d.state = 'pending')""",
                (now, batch),
            )
            self.conn.execute(
                """UPDATE documents SET state = 'live', updated_at = ?
                   WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending'""",
                (now, batch),
            )
            self.conn.execute(
                """UPDATE collections SET generation = ?, manifest = ?, next_pid = ?, version = version + 1
                   WHERE id = ?""",
                (generation, manifest, first_pid + len(chunk_ids), collection_id),
            )
        return Commit.LANDED

    def commit_maintenance(
        self, collection_id: int, old_generation: int, generation: int, manifest: str, dropped_pids: list[int]
    ) -> Commit:
        """Swap in a generation from background maintenance and purge the
        deleted documents whose passages it dropped (a document's passages
        always sit in one segment, so they go together). While a re-index
        runs nothing is purged: the index it builds may still hold those
        passages, and their rows are what marks them deleted there."""
        with self._writing():
            col = self.collection(collection_id)
            if col is None:
                return Commit.COLLECTION_DELETED
            if col.generation != old_generation:
                return Commit.STALE
            self.conn.execute(
                "UPDATE collections SET generation = ?, manifest = ?, version = version + 1 WHERE id = ?",
                (generation, manifest, collection_id),
            )
            if col.reindexing:
                return Commit.LANDED
            self.conn.executemany(
                """DELETE FROM documents WHERE state = 'deleted' AND id =
                   (SELECT document_id FROM chunks WHERE collection_id = ? AND passage_id = ?)""",
                [(collection_id, pid) for pid in dropped_pids],
            )
            # Pending versions overtaken before they were indexed: nothing to drop.
            self.conn.execute(
                """DELETE FROM documents WHERE collection_id = ? AND state = 'deleted' AND NOT EXISTS
                   (SELECT 1 FROM chunks c WHERE c.document_id = documents.id AND c.passage_id IS NOT NULL)""",
                (collection_id,),
            )
        return Commit.LANDED

    # -- re-indexing with another checkpoint (app/engine/reindex.py) --------

    def _reindex_target(self, collection_id: int, checkpoint: str | None, manifest: str | None):
        """The collection if the re-index to ``checkpoint`` whose index is
        ``manifest`` so far is still the one running, else the commit's outcome."""
        col = self.collection(collection_id)
        if col is None:
            return Commit.COLLECTION_DELETED
        if not col.reindexing or col.reindex_checkpoint != checkpoint or col.reindex_manifest != manifest:
            return Commit.STALE  # cancelled, restarted or moved on meanwhile
        return col

    def commit_reindex_batch(
        self, collection_id: int, checkpoint: str | None, old_manifest: str | None, manifest: str, cursor: int
    ) -> Commit:
        """Record a batch re-encoded into the new index: its manifest, and
        where the next batch starts. The served index does not change."""
        with self._writing():
            col = self._reindex_target(collection_id, checkpoint, old_manifest)
            if not isinstance(col, IndexedCollection):
                return col
            self.conn.execute(
                "UPDATE collections SET reindex_manifest = ?, reindex_cursor = ? WHERE id = ?",
                (manifest, cursor, collection_id),
            )
        return Commit.LANDED

    def commit_reindex_maintenance(
        self, collection_id: int, checkpoint: str | None, old_manifest: str | None, manifest: str
    ) -> Commit:
        """A merge or codec of the index a re-index builds (nothing purged)."""
        with self._writing():
            col = self._reindex_target(collection_id, checkpoint, old_manifest)
            if not isinstance(col, IndexedCollection):
                return col
            self.conn.execute("UPDATE collections SET reindex_manifest = ? WHERE id = ?", (manifest, collection_id))
        return Commit.LANDED

    def finish_reindex(
        self, collection_id: int, checkpoint: str | None, manifest: str | None, old_generation: int, generation: int
    ) -> Commit:
        """Serve the new index, with its checkpoint, from ``generation`` on,
        if it holds every live passage (STALE: some landed since it was
        read; the next batch encodes them). One transaction: a search sees
        the old index with the old checkpoint or the new with the new."""
        with self._writing():
            col = self._reindex_target(collection_id, checkpoint, manifest)
            if not isinstance(col, IndexedCollection):
                return col
            if col.generation != old_generation:
                raise RuntimeError("index generation moved under the writer")
            assert col.reindex_cursor is not None
            if self.passages_from(collection_id, col.reindex_cursor, 1):
                return Commit.STALE
            self.conn.execute(
                """UPDATE collections SET generation = ?, manifest = ?, checkpoint = ?, version = version + 1,
                   reindex_checkpoint = NULL, reindex_manifest = NULL, reindex_cursor = NULL, reindex_error = NULL
                   WHERE id = ?""",
                (generation, manifest, checkpoint, collection_id),
            )
        return Commit.LANDED

    def fail_reindex(self, collection_id: int, checkpoint: str | None, error: str) -> None:
        """Give up a re-index that cannot go on (its checkpoint unreadable,
        of another dimension): the served index stays, the reason is kept."""
        with self._writing():
            self.conn.execute(
                """UPDATE collections SET reindex_checkpoint = NULL, reindex_manifest = NULL, reindex_cursor = NULL,
                   reindex_error = ? WHERE id = ? AND reindex_cursor IS NOT NULL AND reindex_checkpoint IS ?""",
                (error[:1000], collection_id, checkpoint),
            )
