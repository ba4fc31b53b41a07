"""Keyword search: one FTS5 index per collection, holding live chunks only."""

from __future__ import annotations

import sqlite3

import pytest

from app.errors import CollectionNotFound
from app.store import keyword_index
from app.store.index_state import IndexStateStore
from app.store.schema import connect, initialise
from app.store.store import Store
from tests.store.test_store import doc, granite_in_two_collections, make_live


def indexed_chunks(store, collection_id: int) -> set[int]:
    """Chunk ids in the collection's FTS index (one docsize row per indexed chunk)."""
    conn = connect(store.path)
    try:
        table = keyword_index.table_name(collection_id)
        return {r[0] for r in conn.execute(f"SELECT id FROM {table}_docsize")}
    finally:
        conn.close()


def live_chunks(store, collection_id: int) -> set[int]:
    conn = connect(store.path)
    try:
        rows = conn.execute(
            """SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id
               WHERE d.collection_id = ? AND d.state = 'live'""",
            (collection_id,),
        )
        return {r[0] for r in rows}
    finally:
        conn.close()


def schema_names(path) -> set[str]:
    conn = sqlite3.connect(str(path))
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()


async def texts(store, collection_id: int, query: str) -> list[str]:
    ranked = await store.keyword_search(collection_id, query, 10, None)
    hits = await store.fetch_hits(collection_id, [pid for pid, _ in ranked])
    return [hits[pid].text for pid, _ in ranked]


async def test_a_collection_matches_only_its_own_chunks_and_its_scores_ignore_other_collections(store):
    a = (await store.create_collection("a", None)).id
    b = (await store.create_collection("b", None)).id
    await store.insert_pending(a, [doc("x", "granite quarry", "marble quarry", "sandstone cliff")])
    make_live(store, a)
    before = await store.keyword_search(a, "granite quarry", 10, None)
    # Another collection full of the query's terms (and of other text) moves nothing in the first.
    await store.insert_pending(b, [doc(f"y{i}", "granite granite quarry", f"filler text {i}") for i in range(50)])
    make_live(store, b)
    assert await store.keyword_search(a, "granite quarry", 10, None) == before
    assert await store.keyword_search(a, "granite quarry", 10, {"$document_id": "x"}) == before
    assert await texts(store, a, "granite quarry") == ["granite quarry", "marble quarry"]
    hits = await store.fetch_hits(b, [pid for pid, _ in await store.keyword_search(b, "granite", 100, None)])
    assert {h.document_id for h in hits.values()} == {f"y{i}" for i in range(50)}
    assert await store.keyword_search(b, "sandstone", 10, None) == []


async def test_pending_replaced_failed_deleted_and_purged_versions_are_never_matched(store):
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc("a", "old walrus text"), doc("b", "blue whale")])
    assert indexed_chunks(store, c) == set()
    assert await texts(store, c, "walrus whale") == []  # pending
    make_live(store, c)
    assert await texts(store, c, "walrus") == ["old walrus text"]

    await store.insert_pending(c, [doc("a", "new narwhal text")])  # a pending replacement
    assert await texts(store, c, "narwhal") == []
    assert await texts(store, c, "walrus") == ["old walrus text"]
    make_live(store, c)
    assert await texts(store, c, "walrus") == []  # the replaced version
    assert await texts(store, c, "narwhal text") == ["new narwhal text"]

    [(_, failing)] = await store.insert_pending(c, [doc("f", "failing orca")])
    conn = connect(store.path)
    IndexStateStore(conn).fail([failing], "bad")
    conn.close()
    assert await texts(store, c, "orca") == []

    await store.delete_document(c, "b")
    assert await texts(store, c, "whale") == []
    assert indexed_chunks(store, c) == live_chunks(store, c)

    # A live document's row deleted outside the store: its chunks leave the index with it.
    conn = connect(store.path)
    conn.execute("DELETE FROM documents WHERE external_id = 'a' AND state = 'live'")
    conn.execute("DELETE FROM documents WHERE state = 'deleted'")  # a purge of tombstones
    conn.close()
    assert await texts(store, c, "narwhal walrus whale") == []
    assert indexed_chunks(store, c) == live_chunks(store, c) == set()


async def test_deleting_a_collection_drops_its_index_and_a_search_racing_it_is_not_found(store):
    a, b = await granite_in_two_collections(store)
    await store.delete_collection("a")
    names = schema_names(store.path)
    assert not {n for n in names if n.startswith(keyword_index.table_name(a))}
    assert keyword_index.table_name(b) in names
    with pytest.raises(CollectionNotFound):
        await store.keyword_search(a, "granite", 10, None)
    assert await texts(store, b, "granite") == ["granite countertop"]


async def test_an_index_left_by_a_collection_deleted_in_sql_is_dropped_at_start(tmp_path):
    store = Store(tmp_path / "store.db")
    await store.open()
    c = (await store.create_collection("a", None)).id
    await store.close()
    conn = connect(store.path)
    conn.execute("DELETE FROM collections WHERE id = ?", (c,))
    conn.close()
    initialise(store.path)
    assert not {n for n in schema_names(store.path) if n.startswith("chunks_fts")}


# The schema before per-collection keyword indexes: one FTS table over every chunk.
OLD_SCHEMA = """
CREATE TABLE collections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE, description TEXT, created_at REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0, manifest TEXT, version INTEGER NOT NULL DEFAULT 0,
    next_pid INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE documents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    external_id TEXT NOT NULL, title TEXT, metadata TEXT NOT NULL DEFAULT '{}', content_hash TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'live', 'deleted', 'failed')), error TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    collection_id INTEGER NOT NULL, ord INTEGER NOT NULL, text TEXT NOT NULL,
    char_start INTEGER NOT NULL, char_end INTEGER NOT NULL, page INTEGER, heading TEXT, passage_id INTEGER
);
CREATE VIRTUAL TABLE chunks_fts USING fts5(text, content='chunks', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
"""


def old_database(path) -> None:
    """Two collections with live, deleted and pending versions, as the old schema stored them."""
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.executescript(OLD_SCHEMA)
    rows = [  # (collection, external id, state, chunk texts)
        (1, "a", "live", ["red granite quarry", "grey granite"]),
        (1, "b", "deleted", ["granite tombstone"]),
        (1, "b", "live", ["basalt quarry"]),
        (1, "c", "pending", ["granite pending"]),
        (2, "d", "live", ["granite granite granite"]),
    ]
    conn.execute("INSERT INTO collections(name, created_at, next_pid) VALUES ('one', 0, 4), ('two', 0, 1)")
    pids = {1: 0, 2: 0}
    for collection, external_id, state, chunk_texts in rows:
        doc_id = conn.execute(
            """INSERT INTO documents(collection_id, external_id, content_hash, state, created_at, updated_at)
               VALUES (?, ?, 'h', ?, 0, 0)""",
            (collection, external_id, state),
        ).lastrowid
        for i, text in enumerate(chunk_texts):
            pid = None
            if state != "pending":
                pid, pids[collection] = pids[collection], pids[collection] + 1
            conn.execute(
                """INSERT INTO chunks(document_id, collection_id, ord, text, char_start, char_end, passage_id)
                   VALUES (?, ?, ?, ?, 0, ?, ?)""",
                (doc_id, collection, i, text, len(text), pid),
            )
    conn.close()


async def test_an_old_database_migrates_at_start_keeping_keyword_results(tmp_path):
    path = tmp_path / "store.db"
    old_database(path)
    for _ in range(2):  # a second start finds nothing to do
        store = Store(path)
        await store.open()
        names = schema_names(path)
        assert not {"chunks_fts", "chunks_fts_insert", "chunks_fts_delete"} & names
        assert {keyword_index.table_name(1), keyword_index.table_name(2)} <= names
        assert await texts(store, 1, "granite") == ["grey granite", "red granite quarry"]
        assert await texts(store, 1, "quarry") == ["basalt quarry", "red granite quarry"]
        assert await texts(store, 2, "granite") == ["granite granite granite"]
        assert indexed_chunks(store, 1) == live_chunks(store, 1)
        await store.close()
        assert schema_names(path) == names
    # The triggers keep a migrated index current.
    store = Store(path)
    await store.open()
    make_live(store, 1)
    assert await texts(store, 1, "pending") == ["granite pending"]
    await store.close()


def test_a_failed_migration_leaves_the_old_database_whole(tmp_path, monkeypatch):
    path = tmp_path / "store.db"
    old_database(path)
    before = schema_names(path)

    def fail(conn, collection_id):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(keyword_index, "_build", fail)
    with pytest.raises(RuntimeError):
        initialise(path)
    assert schema_names(path) == before


@pytest.mark.parametrize("lookup", ["pending_collections"])
async def test_the_writers_pending_lookups_search_the_pending_index(store, lookup):
    """The idle writer asks several times a second: never a scan of every document version."""
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc("a", "one"), doc("b", "two")])
    make_live(store, c)
    await store.insert_pending(c, [doc("c", "three")])
    conn = connect(store.path)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    assert getattr(IndexStateStore(conn), lookup)() in (c, [(c, False)])
    conn.set_trace_callback(None)
    [sql] = statements
    plan = [r["detail"] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
    conn.close()
    assert any("USING INDEX documents_pending" in step for step in plan), plan
    assert not any(step.startswith("SCAN") for step in plan), plan
