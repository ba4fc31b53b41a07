"""The SQLite schema and connection settings shared by every process.

Documents are versioned rows: an upsert inserts a ``pending`` row; the index
writer's commit turns it ``live`` and the previous live row of the same
external id ``deleted`` in one transaction. Passage ids are assigned at that
commit, per collection, from a counter that never goes back, so a passage id
always names the same chunk text.

Keyword search has one FTS5 index per collection, of live chunks only,
created and dropped with the collection and kept up to date by triggers on
``documents`` (``app/store/keyword_index.py``).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.store import keyword_index

# Bound parameters per "IN (...)" list: well under SQLite's limit on any build.
SQL_VARIABLES = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT NOT NULL UNIQUE,
    description  TEXT,
    created_at   REAL NOT NULL,
    generation   INTEGER NOT NULL DEFAULT 0,   -- index generation committed
    manifest     TEXT,                         -- manifest file of that generation
    version      INTEGER NOT NULL DEFAULT 0,   -- bumps on every visible change
    next_pid     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS documents (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    external_id   TEXT NOT NULL,
    title         TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}',
    content_hash  TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'live', 'deleted', 'failed')),
    error         TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    fields        TEXT,                          -- the named fields beside text, as JSON (NULL: none)
    priority      INTEGER NOT NULL DEFAULT 0     -- 1: a small upsert, indexed before bulk loads
);
CREATE UNIQUE INDEX IF NOT EXISTS documents_live
    ON documents(collection_id, external_id) WHERE state = 'live';
CREATE INDEX IF NOT EXISTS documents_by_state ON documents(collection_id, state, id);
CREATE INDEX IF NOT EXISTS documents_by_external ON documents(collection_id, external_id);
-- The idle writer's look for the oldest pending document: a search of the
-- pending rows alone, not a scan of every version ever stored.
CREATE INDEX IF NOT EXISTS documents_pending ON documents(state, id) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS chunks (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id   INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    collection_id INTEGER NOT NULL,
    ord           INTEGER NOT NULL,
    text          TEXT NOT NULL,
    char_start    INTEGER NOT NULL,
    char_end      INTEGER NOT NULL,
    page          INTEGER,                     -- 1-based PDF page where the chunk starts
    heading       TEXT,                        -- nearest Markdown/HTML heading above it
    passage_id    INTEGER,
    field         TEXT NOT NULL DEFAULT 'text' -- the document's field it was cut from (text: the main one)
);
CREATE UNIQUE INDEX IF NOT EXISTS chunks_by_pid ON chunks(collection_id, passage_id);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id, ord);
-- Background ingestion jobs: uploaded files are stored with the job, so an
-- acknowledged upload survives a crash and is processed after a restart.
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_files (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    filename      TEXT NOT NULL,
    document_id   TEXT NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',
    data          BLOB,                        -- dropped once the file is processed
    state         TEXT NOT NULL CHECK (state IN ('queued', 'added', 'unchanged', 'failed')),
    error         TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    doc_row       INTEGER,                     -- documents.id of the version it added
    chunks        INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS job_files_by_state ON job_files(state, id);
CREATE INDEX IF NOT EXISTS job_files_queued_by_job ON job_files(state, job_id, id);
CREATE INDEX IF NOT EXISTS job_files_by_job ON job_files(job_id, id);
-- Collections deleted whose rows the index writer has still to purge, in
-- batches (a delete request drops only the collection's row: a cascade over
-- a million chunks in one transaction would hold the write lock past the
-- other processes' busy timeout).
CREATE TABLE IF NOT EXISTS dropped_collections (
    id          INTEGER PRIMARY KEY,
    dropped_at  REAL NOT NULL
);
-- Tuning jobs (app/tuning_jobs.py): each runs as its own process, which
-- records its outcome here itself, so it ends the same whether or not the
-- server that started it is still there.
CREATE TABLE IF NOT EXISTS tuning_jobs (
    id            TEXT PRIMARY KEY,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    state         TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    config        TEXT NOT NULL,               -- the tuning's settings, as JSON
    reindex       INTEGER NOT NULL DEFAULT 0,  -- 1: re-index the collection with the result
    pid           INTEGER,                     -- the tuning process
    checkpoint    TEXT,                        -- the checkpoint written (a name under checkpoints/)
    result        TEXT,                        -- figures, as JSON
    error         TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
-- The writer lease's fencing token: each process that takes the lease
-- raises the epoch, and every index commit checks, inside its transaction,
-- that the epoch is still the one it took. A writer that lost the lease
-- without noticing (stopped for a while, its lease file replaced) cannot
-- commit over the new writer's work.
CREATE TABLE IF NOT EXISTS writer_epoch (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    epoch     INTEGER NOT NULL,
    pid       INTEGER NOT NULL,
    taken_at  REAL NOT NULL
);
-- Each collection's live and pending documents and chunks, kept by the
-- triggers below in the transactions that change them: reading them is one
-- row, not a count over every document (0.28 s per read at 1M passages).
-- Documents leave the table only once deleted (not counted), or with their
-- collection.
CREATE TABLE IF NOT EXISTS collection_counts (
    collection_id     INTEGER PRIMARY KEY REFERENCES collections(id) ON DELETE CASCADE,
    live_documents    INTEGER NOT NULL DEFAULT 0,
    live_chunks       INTEGER NOT NULL DEFAULT 0,
    pending_documents INTEGER NOT NULL DEFAULT 0,
    pending_chunks    INTEGER NOT NULL DEFAULT 0
);
CREATE TRIGGER IF NOT EXISTS counts_of_a_new_collection AFTER INSERT ON collections BEGIN
    INSERT OR IGNORE INTO collection_counts(collection_id) VALUES (new.id);
END;
CREATE TRIGGER IF NOT EXISTS counts_document_added AFTER INSERT ON documents
WHEN new.state IN ('live', 'pending') BEGIN
    UPDATE collection_counts SET
        live_documents = live_documents + (new.state = 'live'),
        pending_documents = pending_documents + (new.state = 'pending')
    WHERE collection_id = new.collection_id;
END;
CREATE TRIGGER IF NOT EXISTS counts_chunk_added AFTER INSERT ON chunks BEGIN
    UPDATE collection_counts SET
        live_chunks = live_chunks + ((SELECT state FROM documents WHERE id = new.document_id) = 'live'),
        pending_chunks = pending_chunks + ((SELECT state FROM documents WHERE id = new.document_id) = 'pending')
    WHERE collection_id = new.collection_id;
END;
CREATE TRIGGER IF NOT EXISTS counts_document_state AFTER UPDATE OF state ON documents
WHEN old.state != new.state BEGIN
    UPDATE collection_counts SET
        live_documents = live_documents + (new.state = 'live') - (old.state = 'live'),
        pending_documents = pending_documents + (new.state = 'pending') - (old.state = 'pending'),
        live_chunks = live_chunks
            + ((new.state = 'live') - (old.state = 'live')) * (SELECT COUNT(*) FROM chunks WHERE document_id = new.id),
        pending_chunks = pending_chunks
            + ((new.state = 'pending') - (old.state = 'pending')) * (SELECT COUNT(*) FROM chunks WHERE document_id = new.id)
    WHERE collection_id = new.collection_id;
END;
"""

# The counts of collections that have none yet (a database from before
# collection_counts), counted once.
COUNT_BACKFILL = """
INSERT INTO collection_counts(collection_id, live_documents, live_chunks, pending_documents, pending_chunks)
SELECT c.id,
    (SELECT COUNT(*) FROM documents d WHERE d.collection_id = c.id AND d.state = 'live'),
    (SELECT COUNT(*) FROM chunks k JOIN documents d ON d.id = k.document_id
      WHERE d.collection_id = c.id AND d.state = 'live'),
    (SELECT COUNT(*) FROM documents d WHERE d.collection_id = c.id AND d.state = 'pending'),
    (SELECT COUNT(*) FROM chunks k JOIN documents d ON d.id = k.document_id
      WHERE d.collection_id = c.id AND d.state = 'pending')
FROM collections c WHERE c.id NOT IN (SELECT collection_id FROM collection_counts)
"""

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",  # an acknowledged commit survives power loss
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=30000",
)


def connect(path: Path) -> sqlite3.Connection:
    """A synchronous connection (the writer thread's)."""
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write (tools that read a running server's
    data, such as ``python -m app.cli tune``); FileNotFoundError when there
    is no database at ``path``. WAL lets it read beside the server's writes."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no database at {path}")
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA query_only=ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on a synchronous connection: committed when the
    block ends, rolled back on any exception. ``BEGIN IMMEDIATE`` takes the
    write lock up front, so a transaction never fails half-way on a lock
    another process took after its first read. (``Store.transaction`` is the
    same rule for the async request path.)"""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back itself (a full disk)
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# A collection's re-index (app/engine/reindex.py) started, or started over,
# with checkpoint ``?``: the caller adds which collection.
START_REINDEX_SQL = """UPDATE collections SET reindex_checkpoint = ?, reindex_manifest = NULL, reindex_cursor = 0,
    reindex_error = NULL"""

# Columns added after a table's first release: (table, column, definition),
# then what depends on them.
ADDED_COLUMNS = [
    ("documents", "priority", "INTEGER NOT NULL DEFAULT 0"),
    # Multi-field documents: every chunk of an older database is of the main field.
    ("documents", "fields", "TEXT"),
    ("chunks", "field", "TEXT NOT NULL DEFAULT 'text'"),
    # Re-indexing with another checkpoint (app/engine/reindex.py): the
    # checkpoint a collection's index was encoded with (NULL: the server's
    # configured one) and, while a re-index runs, its target, the new index
    # built so far beside the served one, and the first passage id it has
    # still to re-encode.
    ("collections", "checkpoint", "TEXT"),
    ("collections", "reindex_checkpoint", "TEXT"),
    ("collections", "reindex_manifest", "TEXT"),
    ("collections", "reindex_cursor", "INTEGER"),
    ("collections", "reindex_error", "TEXT"),
]
AFTER_COLUMNS = """
CREATE INDEX IF NOT EXISTS documents_pending_first
    ON documents(collection_id, priority DESC, id) WHERE state = 'pending';
"""


def _migrate_columns(conn: sqlite3.Connection) -> None:
    for table, column, definition in ADDED_COLUMNS:
        if column not in {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    for statement in filter(str.strip, AFTER_COLUMNS.split(";")):
        conn.execute(statement)


@contextmanager
def _initialising(path: Path) -> Iterator[None]:
    """One process at a time initialises the database (an flock'd file
    beside it). Switching a new database to WAL takes an exclusive lock for
    which SQLite does not wait out the busy timeout: workers starting
    together on a fresh data directory otherwise fail one in twenty
    starts with "database is locked"."""
    fd = os.open(path.with_name(path.name + ".init-lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def initialise(path: Path) -> None:
    """Create or migrate the database, in one transaction (every process
    runs this at start, one at a time; the first one migrates, the others
    find nothing to do)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _initialising(path):
        _initialise(path)


def _initialise(path: Path) -> None:
    conn = connect(path)
    try:
        # executescript commits an open transaction first, so the script opens its own.
        conn.executescript("BEGIN IMMEDIATE;" + SCHEMA)
        try:
            _migrate_columns(conn)
            conn.execute(COUNT_BACKFILL)
            keyword_index.reconcile(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()
