"""Async access to the SQLite store for the request path (aiosqlite)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from app import tuning_jobs
from app.errors import CollectionExists, CollectionNotFound, Conflict, DocumentNotFound, JobNotFound, NotReady
from app.store import keyword_index
from app.store.filters import FieldFilter, compile_field_filter, compile_filter
from app.store.jobs import Jobs
from app.store.schema import PRAGMAS, SQL_VARIABLES, START_REINDEX_SQL, connect, initialise, transaction
from app.validation import MAIN_FIELD

# A keyword query becomes one FTS5 phrase per distinct term: the first this
# many terms are searched (a 10,000-character query would make thousands).
MAX_KEYWORD_TERMS = 64


@dataclass(frozen=True)
class CollectionRow:
    id: int
    name: str
    description: str | None
    created_at: float
    generation: int
    manifest: str | None
    version: int
    checkpoint: str | None = None  # what its index is encoded with (None: the server's configured checkpoint)
    reindex_checkpoint: str | None = None  # while a re-index runs: its target
    reindex_cursor: int | None = None  # while a re-index runs: the first passage id still to re-encode
    reindex_error: str | None = None  # why the last re-index stopped, if it failed
    next_pid: int = 0  # passage ids given so far


COLLECTION_COLUMNS = (
    "id, name, description, created_at, generation, manifest, version, checkpoint, reindex_checkpoint, "
    "reindex_cursor, reindex_error, next_pid"
)


@dataclass
class NewDocument:
    external_id: str
    title: str | None
    metadata: dict
    content_hash: str  # of the text and the named fields
    chunks: list  # list[app.ingest.chunking.Passage], each with its field
    fields: dict[str, str] | None = None  # the named fields beside text, kept for reading back


@dataclass(frozen=True)
class Hit:
    passage_id: int
    chunk_id: int
    chunk_index: int
    text: str
    char_start: int
    char_end: int
    page: int | None
    heading: str | None
    document_id: str
    title: str | None
    metadata: dict
    field: str = MAIN_FIELD


class Store:
    def __init__(self, path: Path):
        self.path = path
        self._db: aiosqlite.Connection | None = None
        # Reads go to a connection of their own: each read sees the last
        # committed state (a WAL snapshot), never another request's open
        # write transaction, and waits for no writer.
        self._read: aiosqlite.Connection | None = None
        # One connection takes every request's writes: they (and their
        # explicit transactions) must not interleave on it.
        self._write_lock = asyncio.Lock()
        # Bulk writes run whole on a thread over their own connection (under
        # the same lock): a statement-by-statement await would hold SQLite's
        # write lock across thousands of event-loop turns, and the writer and
        # the other workers' requests would wait out the busy timeout.
        self._bulk: sqlite3.Connection | None = None
        self._bulk_lock = threading.Lock()  # a cancelled request's thread may still be in it
        self.jobs = Jobs(self)

    async def open(self) -> None:
        # Off the event loop: another worker may be initialising (an flock wait).
        await asyncio.to_thread(initialise, self.path)
        db = await self._connect()
        read = await self._connect()
        await read.execute("PRAGMA query_only=ON")
        self._bulk = connect(self.path)
        self._read = read
        self._db = db  # published once its pragmas (foreign keys) are set

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(str(self.path), timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        for pragma in PRAGMAS:
            await db.execute(pragma)
        return db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._read is not None:
            await self._read.close()
            self._read = None
        if self._bulk is not None:
            self._bulk.close()
            self._bulk = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:  # still starting, start-up failed (see /ready), or stopping
            raise NotReady("the database is not open")
        return self._db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction on the shared connection (the same rule as
        :func:`app.store.schema.transaction`): writes of concurrent requests
        take turns, each committed whole or rolled back."""
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back itself (a full disk)
                    await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    @property
    def reader(self) -> aiosqlite.Connection:
        if self._read is None:
            raise NotReady("the database is not open")
        return self._read

    async def _one(self, sql: str, params=()):
        """One row, read on the read connection (committed state only)."""
        rows = await self._all(sql, params)
        return rows[0] if rows else None

    async def _all(self, sql: str, params=()):
        """All rows, read on the read connection in one call on its thread:
        each read is its own read transaction, begun after every write this
        request committed. (A cursor stepped in one call and fetched in a
        later one would hold its read transaction open in between, and other
        requests' reads on the shared connection would run inside it, on the
        store as it was before their own writes.)"""
        return list(await self.reader.execute_fetchall(sql, params))

    # -- collections -------------------------------------------------------

    async def create_collection(self, name: str, description: str | None) -> CollectionRow:
        try:
            async with self.transaction():
                cur = await self.db.execute(
                    "INSERT INTO collections(name, description, created_at) VALUES (?, ?, ?)",
                    (name, description, time.time()),
                )
                assert cur.lastrowid is not None
                for sql in keyword_index.create_statements(cur.lastrowid):
                    await self.db.execute(sql)
        except sqlite3.IntegrityError:
            raise CollectionExists(f"collection {name!r} already exists") from None
        return await self.get_collection(name)

    async def local_collection(self, name: str) -> int:
        """The id of a row of this name, created when missing: what the
        stateless tier queues upload jobs under (its collections live in Qdrant)."""
        try:
            return (await self.create_collection(name, None)).id
        except CollectionExists:
            return (await self.get_collection(name)).id

    async def collection_name(self, collection_id: int) -> str | None:
        row = await self._one("SELECT name FROM collections WHERE id = ?", (collection_id,))
        return None if row is None else row["name"]

    async def get_collection(self, name: str) -> CollectionRow:
        row = await self._one(
            f"SELECT {COLLECTION_COLUMNS} FROM collections WHERE name = ?",
            (name,),
        )
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return CollectionRow(**dict(row))

    async def collection_counts(self, collection_id: int) -> dict:
        row = await self._one(
            """SELECT live_documents AS documents, pending_documents, live_chunks AS chunks
               FROM collection_counts WHERE collection_id = ?""",
            (collection_id,),
        )
        return dict(row) if row is not None else {"documents": 0, "pending_documents": 0, "chunks": 0}

    async def list_collections(self) -> list[CollectionRow]:
        rows = await self._all(f"SELECT {COLLECTION_COLUMNS} FROM collections ORDER BY name")
        return [CollectionRow(**dict(r)) for r in rows]

    async def delete_collection(self, name: str) -> int:
        """Gone at once for every reader: its row and its keyword index are
        dropped in one short transaction. Its documents, chunks and jobs are
        left to the index writer, which purges them in batches
        (``dropped_collections``): a cascade over a large collection would
        hold the write lock for many seconds. Ids are never reused, so
        nothing can mistake those rows for a new collection's."""
        row = await self.get_collection(name)
        async with self._write_lock:
            # On a thread, whole: a cancelled request cannot leave the
            # connection half-way (foreign keys off, a transaction open).
            await asyncio.to_thread(self._drop_collection, row.id, name)
        return row.id

    def _drop_collection(self, collection_id: int, name: str) -> None:
        if self._bulk is None:
            raise NotReady("the database is not open")
        with self._bulk_lock:
            conn = self._bulk
            conn.execute("PRAGMA foreign_keys=OFF")  # no cascade; only takes effect outside a transaction
            try:
                with transaction(conn):
                    for sql in keyword_index.drop_statements(collection_id):
                        conn.execute(sql)
                    if conn.execute("DELETE FROM collections WHERE id = ?", (collection_id,)).rowcount == 0:
                        raise CollectionNotFound(f"collection {name!r} does not exist")
                    conn.execute("DELETE FROM collection_counts WHERE collection_id = ?", (collection_id,))
                    conn.execute(
                        "INSERT OR IGNORE INTO dropped_collections(id, dropped_at) VALUES (?, ?)",
                        (collection_id, time.time()),
                    )
            finally:
                conn.execute("PRAGMA foreign_keys=ON")

    # -- documents ---------------------------------------------------------

    async def insert_pending(
        self, collection_id: int, docs: list[NewDocument], job_file: int | None = None, priority: int = 0
    ) -> list[tuple[str, int | None]]:
        """Insert the batch in one transaction.

        Returns (external_id, row id) per document; row id None means the
        live version already has this exact content (nothing to do). The
        writer indexes pending documents of higher ``priority`` first.
        """
        async with self._write_lock:
            return await asyncio.to_thread(self._insert_pending, collection_id, docs, job_file, priority)

    def _insert_pending(
        self, collection_id: int, docs: list[NewDocument], job_file: int | None, priority: int
    ) -> list[tuple[str, int | None]]:
        if self._bulk is None:  # closed while the request was on its way
            raise NotReady("the database is not open")
        now = time.time()
        out: list[tuple[str, int | None]] = []
        with self._bulk_lock, transaction(self._bulk) as conn:
            if conn.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone() is None:
                raise CollectionNotFound("the collection was deleted")
            for doc in docs:
                metadata = json.dumps(doc.metadata, sort_keys=True, ensure_ascii=False, allow_nan=False)
                fields = json.dumps(doc.fields, ensure_ascii=False) if doc.fields else None
                latest = conn.execute(
                    """SELECT id, state, content_hash, title, metadata FROM documents
                       WHERE collection_id = ? AND external_id = ? AND state IN ('live', 'pending')
                       ORDER BY id DESC LIMIT 1""",
                    (collection_id, doc.external_id),
                ).fetchone()
                if (
                    latest is not None
                    and latest["state"] == "live"
                    and latest["content_hash"] == doc.content_hash
                    and latest["title"] == doc.title
                    and latest["metadata"] == metadata
                ):
                    out.append((doc.external_id, None))
                    continue
                cur = conn.execute(
                    """INSERT INTO documents(collection_id, external_id, title, metadata, content_hash, state,
                                             created_at, updated_at, priority, fields)
                       VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)""",
                    (collection_id, doc.external_id, doc.title, metadata, doc.content_hash, now, now, priority, fields),
                )
                doc_id = cur.lastrowid
                conn.executemany(
                    """INSERT INTO chunks(document_id, collection_id, ord, text, char_start, char_end, page, heading,
                                          field)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    [
                        (doc_id, collection_id, i, p.text, p.char_start, p.char_end, p.page, p.heading, p.field)
                        for i, p in enumerate(doc.chunks)
                    ],
                )
                out.append((doc.external_id, doc_id))
            if job_file is not None:
                # Same transaction as the document: a file is added exactly once.
                row = out[0][1]
                conn.execute(
                    "UPDATE job_files SET state = ?, doc_row = ?, chunks = ?, data = NULL WHERE id = ?",
                    ("unchanged" if row is None else "added", row, len(docs[0].chunks), job_file),
                )
        return out

    async def document_states(self, doc_ids: list[int]) -> dict[int, tuple[str, str | None]]:
        states: dict[int, tuple[str, str | None]] = {}
        for i in range(0, len(doc_ids), SQL_VARIABLES):
            part = doc_ids[i : i + SQL_VARIABLES]
            # A document of a deleted collection awaiting the writer's purge
            # is as good as deleted (a waiting upsert stops waiting).
            rows = await self._all(
                f"""SELECT d.id, CASE WHEN c.id IS NULL THEN 'deleted' ELSE d.state END AS state, d.error
                    FROM documents d LEFT JOIN collections c ON c.id = d.collection_id
                    WHERE d.id IN ({",".join("?" * len(part))})""",
                part,
            )
            states.update({r["id"]: (r["state"], r["error"]) for r in rows})
        return states

    async def get_document(self, collection_id: int, external_id: str) -> dict:
        row = await self._one(
            # The live version if any, else the newest pending one, else the
            # newest that failed to index (with its reason in ``error``).
            """SELECT id, external_id, title, metadata, fields, content_hash, state, error, created_at, updated_at
               FROM documents WHERE collection_id = ? AND external_id = ? AND state IN ('live', 'pending', 'failed')
               ORDER BY (state = 'live') DESC, (state = 'pending') DESC, id DESC LIMIT 1""",
            (collection_id, external_id),
        )
        if row is None:
            raise DocumentNotFound(f"document {external_id!r} does not exist")
        chunks = await self._all(
            """SELECT id, ord, text, char_start, char_end, page, heading, field
               FROM chunks WHERE document_id = ? ORDER BY ord""",
            (row["id"],),
        )
        doc = dict(row)
        doc["metadata"] = json.loads(doc["metadata"])
        doc["fields"] = json.loads(doc["fields"]) if doc["fields"] else {}
        doc["chunks"] = [dict(c) for c in chunks]
        return doc

    async def list_documents(self, collection_id: int, limit: int, offset: int) -> tuple[list[dict], int]:
        rows = await self._all(
            """SELECT d.external_id, d.title, d.metadata, d.state, d.created_at, d.updated_at,
                      (SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id) AS chunks
               FROM documents d WHERE d.collection_id = ? AND d.state = 'live'
               ORDER BY d.external_id LIMIT ? OFFSET ?""",
            (collection_id, limit, offset),
        )
        total = await self._one(
            "SELECT COUNT(*) AS n FROM documents WHERE collection_id = ? AND state = 'live'", (collection_id,)
        )
        docs = []
        for r in rows:
            d = dict(r)
            d["metadata"] = json.loads(d["metadata"])
            docs.append(d)
        return docs, total["n"]

    async def delete_document(self, collection_id: int, external_id: str) -> None:
        """Tombstone every live, pending or failed version; visible to search at once."""
        async with self.transaction():
            cur = await self.db.execute(
                """UPDATE documents SET state = 'deleted', updated_at = ?
                   WHERE collection_id = ? AND external_id = ? AND state IN ('live', 'pending', 'failed')""",
                (time.time(), collection_id, external_id),
            )
            if cur.rowcount == 0:
                raise DocumentNotFound(f"document {external_id!r} does not exist")
            await self.db.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (collection_id,))

    # -- search support ----------------------------------------------------

    async def index_state(self, name: str) -> tuple[int, int, str | None, int, str | None]:
        """(collection id, generation, manifest, version, checkpoint) in one
        read: a generation and the checkpoint its index was encoded with
        always go together."""
        row = await self._one(
            "SELECT id, generation, manifest, version, checkpoint FROM collections WHERE name = ?", (name,)
        )
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return row["id"], row["generation"], row["manifest"], row["version"], row["checkpoint"]

    async def start_reindex(self, name: str, checkpoint: str | None) -> CollectionRow:
        """Ask the index writer to re-encode the collection with
        ``checkpoint`` (None: the server's configured one) into a new index
        beside the served one; a re-index already running starts over."""
        async with self.transaction():
            cur = await self.db.execute(START_REINDEX_SQL + " WHERE name = ?", (checkpoint, name))
            if cur.rowcount == 0:
                raise CollectionNotFound(f"collection {name!r} does not exist")
        return await self.get_collection(name)

    async def create_tuning_job(self, collection_id: int, config: dict, reindex: bool) -> str:
        """A tuning job of the collection (409 while another of it runs)."""
        async with self.transaction():
            rows = await self.db.execute_fetchall(
                f"SELECT {tuning_jobs.COLUMNS} FROM tuning_jobs WHERE collection_id = ? AND state = 'running'",
                (collection_id,),
            )
            running = [r for r in rows if tuning_jobs.describe(dict(r))["state"] == "running"]
            if running:
                raise Conflict(f"tuning job {running[0]['id']} of this collection is still running")
            job_id = uuid.uuid4().hex
            now = time.time()
            await self.db.execute(
                """INSERT INTO tuning_jobs(id, collection_id, state, config, reindex, created_at, updated_at)
                   VALUES (?, ?, 'running', ?, ?, ?, ?)""",
                (job_id, collection_id, json.dumps(config), int(reindex), now, now),
            )
        return job_id

    async def set_tuning_pid(self, job_id: str, pid: int) -> None:
        async with self.transaction():
            await self.db.execute(
                "UPDATE tuning_jobs SET pid = ?, updated_at = ? WHERE id = ?", (pid, time.time(), job_id)
            )

    async def tuning_job(self, collection_id: int, job_id: str) -> dict:
        row = await self._one(
            f"SELECT {tuning_jobs.COLUMNS} FROM tuning_jobs WHERE id = ? AND collection_id = ?", (job_id, collection_id)
        )
        if row is None:
            raise JobNotFound(f"tuning job {job_id!r} of this collection does not exist")
        return tuning_jobs.describe(dict(row))

    async def cancel_reindex(self, name: str) -> CollectionRow:
        """Stop a running re-index; the served index stays as it is."""
        async with self.transaction():
            cur = await self.db.execute(
                """UPDATE collections SET reindex_checkpoint = NULL, reindex_manifest = NULL, reindex_cursor = NULL
                   WHERE name = ?""",
                (name,),
            )
            if cur.rowcount == 0:
                raise CollectionNotFound(f"collection {name!r} does not exist")
        return await self.get_collection(name)

    async def dead_passage_ids(self, collection_id: int) -> list[int]:
        rows = await self._all(
            """SELECT c.passage_id FROM documents d JOIN chunks c ON c.document_id = d.id
               WHERE d.collection_id = ? AND d.state = 'deleted' AND c.passage_id IS NOT NULL""",
            (collection_id,),
        )
        return [r[0] for r in rows]

    async def fetch_hits(self, collection_id: int, passage_ids: list[int]) -> dict[int, Hit]:
        if not passage_ids:
            return {}
        rows = await self._all(
            f"""SELECT c.passage_id, c.id AS chunk_id, c.ord, c.text, c.char_start, c.char_end, c.page, c.heading,
                       c.field, d.external_id, d.title, d.metadata
                FROM chunks c JOIN documents d ON d.id = c.document_id
                WHERE c.collection_id = ? AND d.state = 'live'
                  AND c.passage_id IN ({",".join("?" * len(passage_ids))})""",
            (collection_id, *passage_ids),
        )
        return {
            r["passage_id"]: Hit(
                passage_id=r["passage_id"],
                chunk_id=r["chunk_id"],
                chunk_index=r["ord"],
                text=r["text"],
                char_start=r["char_start"],
                char_end=r["char_end"],
                page=r["page"],
                heading=r["heading"],
                document_id=r["external_id"],
                title=r["title"],
                metadata=json.loads(r["metadata"]),
                field=r["field"],
            )
            for r in rows
        }

    async def allowed_passage_ids(
        self, collection_id: int, where: dict | None, fields: FieldFilter | None = None
    ) -> list[int]:
        """Passage ids of live documents that match a metadata filter, of
        the chunks of the fields allowed."""
        condition, params = _conditions(where, fields)
        rows = await self._all(
            f"""SELECT c.passage_id FROM documents d JOIN chunks c ON c.document_id = d.id
                WHERE d.collection_id = ? AND d.state = 'live' AND c.passage_id IS NOT NULL AND ({condition})""",
            (collection_id, *params),
        )
        return [r[0] for r in rows]

    async def keyword_search(
        self, collection_id: int, query: str, k: int, where: dict | None, fields: FieldFilter | None = None
    ) -> list[tuple[int, float]]:
        """(passage id, BM25 score) of live chunks of the fields allowed,
        best first, from the collection's own FTS5 index (its cost and its
        IDF are the collection's alone, every field's chunks counted)."""
        terms = list(dict.fromkeys(t for t in re.findall(r"\w+", query.lower()) if t))[:MAX_KEYWORD_TERMS]
        if not terms:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        condition, params = _conditions(where, fields)
        try:
            rows = await self._all(keyword_index.search_sql(collection_id, condition), (match, *params, k))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # dropped with its collection meanwhile
                raise CollectionNotFound("the collection was deleted") from None
            raise
        return [(r[0], float(r[1])) for r in rows]


def _conditions(where: dict | None, fields: FieldFilter | None) -> tuple[str, list]:
    """A metadata filter (on ``d``) and a field choice (on ``c``) as one
    condition ("1" when neither restricts)."""
    condition, params = compile_filter(where)
    field_condition, field_params = compile_field_filter(fields)
    if field_condition == "1":
        return condition, params
    if condition == "1":
        return field_condition, field_params
    return f"({condition}) AND ({field_condition})", [*params, *field_params]
