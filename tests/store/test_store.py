"""The request path's store: collections, versioned documents, search support."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import CollectionExists, CollectionNotFound, DocumentNotFound
from app.ingest.chunking import Passage
from app.store.filters import FieldFilter
from app.store.index_state import Commit, IndexStateStore
from app.store.schema import connect, initialise
from app.store.store import NewDocument


def doc(external_id: str, *texts: str, metadata: dict | None = None, title: str | None = None) -> NewDocument:
    chunks, start = [], 0
    for t in texts:
        chunks.append(Passage(t, start, start + len(t)))
        start += len(t) + 1
    return NewDocument(external_id, title, metadata or {}, f"hash-{'|'.join(texts)}", chunks)


def make_live(store, collection_id: int) -> None:
    """Commit every pending document the way the index writer does (no index)."""
    conn = connect(store.path)
    state = IndexStateStore(conn)
    col = state.collection(collection_id)
    pending = state.pending_documents(collection_id)
    chunk_ids = [cid for d in pending for cid, _ in state.chunk_texts(d.id)]
    assert (
        state.commit_append(collection_id, col.generation, col.generation + 1, "m", col.next_pid, chunk_ids, pending)
        is Commit.LANDED
    )
    conn.close()


async def granite_in_two_collections(store) -> tuple[int, int]:
    """Collections "a" and "b", one live document each, both about granite."""
    a = (await store.create_collection("a", None)).id
    b = (await store.create_collection("b", None)).id
    await store.insert_pending(a, [doc("x", "granite quarry")])
    await store.insert_pending(b, [doc("y", "granite countertop")])
    make_live(store, a)
    make_live(store, b)
    return a, b


async def test_collections_are_unique_and_deletable(store):
    row = await store.create_collection("docs", "first")
    assert (row.name, row.description, row.generation, row.manifest) == ("docs", "first", 0, None)
    with pytest.raises(CollectionExists):
        await store.create_collection("docs", None)
    assert [c.name for c in await store.list_collections()] == ["docs"]
    assert await store.delete_collection("docs") == row.id
    with pytest.raises(CollectionNotFound):
        await store.get_collection("docs")


async def test_upserts_are_versioned_and_identical_content_is_unchanged(store):
    c = (await store.create_collection("docs", None)).id
    [(ext, first)] = await store.insert_pending(c, [doc("a", "one", "two")])
    assert ext == "a" and first is not None
    assert (await store.document_states([first]))[first] == ("pending", None)
    make_live(store, c)
    assert await store.insert_pending(c, [doc("a", "one", "two")]) == [("a", None)]  # same content: nothing to do
    [(_, second)] = await store.insert_pending(c, [doc("a", "one", "two", metadata={"v": 2})])
    assert second is not None and second != first
    got = await store.get_document(c, "a")  # the live version until the new one commits
    assert got["state"] == "live" and got["metadata"] == {}
    make_live(store, c)
    states = await store.document_states([first, second])
    assert states == {first: ("deleted", None), second: ("live", None)}
    got = await store.get_document(c, "a")
    assert got["metadata"] == {"v": 2}
    assert [(ch["text"], ch["char_start"], ch["char_end"]) for ch in got["chunks"]] == [("one", 0, 3), ("two", 4, 7)]
    docs, total = await store.list_documents(c, 10, 0)
    assert total == 1 and docs[0]["chunks"] == 2
    counts = await store.collection_counts(c)
    assert counts == {"documents": 1, "pending_documents": 0, "chunks": 2}


async def test_a_deleted_document_leaves_search_at_once(store):
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc("a", "the red fox"), doc("b", "the blue whale", metadata={"kind": "sea"})])
    make_live(store, c)
    version = (await store.index_state("docs"))[3]
    assert [pid for pid, _ in await store.keyword_search(c, "whale fox", 10, None)] != []
    assert await store.allowed_passage_ids(c, {"kind": "sea"}) == [1]
    await store.delete_document(c, "b")
    assert (await store.index_state("docs"))[3] == version + 1
    assert await store.dead_passage_ids(c) == [1]
    assert [pid for pid, _ in await store.keyword_search(c, "whale", 10, None)] == []
    assert set(await store.fetch_hits(c, [0, 1])) == {0}
    with pytest.raises(DocumentNotFound):
        await store.delete_document(c, "b")


async def test_keyword_search_ignores_other_collections_and_punctuation_only_queries(store):
    a, b = await granite_in_two_collections(store)
    hits = await store.fetch_hits(b, [pid for pid, _ in await store.keyword_search(b, "granite", 10, None)])
    assert [h.document_id for h in hits.values()] == ["y"]
    assert await store.keyword_search(a, "?!", 10, None) == []


async def test_a_failed_batch_rolls_back_whole(store):
    c = (await store.create_collection("docs", None)).id
    await store.delete_collection("docs")
    with pytest.raises(CollectionNotFound):
        await store.insert_pending(c, [doc("a", "text")])
    row = await store._one("SELECT COUNT(*) AS n FROM documents")
    assert row["n"] == 0


async def test_a_commit_holding_two_versions_of_one_id_makes_only_the_later_live(store):
    """The writer leaves earlier pending versions out of a batch; if a batch
    still holds two (inserted between its reads), the commit keeps the later
    one live and the earlier one dead, and replaces the live version."""
    c = (await store.create_collection("docs", None)).id
    [(_, v1)] = await store.insert_pending(c, [doc("a", "version one")])
    make_live(store, c)
    [(_, v2)] = await store.insert_pending(c, [doc("a", "version two")])
    [(_, v3)] = await store.insert_pending(c, [doc("a", "version three")])
    [(_, other)] = await store.insert_pending(c, [doc("b", "another document")])
    make_live(store, c)  # one batch: v2, v3 and b
    states = await store.document_states([v1, v2, v3, other])
    assert states == {v1: ("deleted", None), v2: ("deleted", None), v3: ("live", None), other: ("live", None)}
    assert (await store.get_document(c, "a"))["chunks"][0]["text"] == "version three"
    conn = connect(store.path)
    try:
        live = IndexStateStore(conn).live_passages(c)
    finally:
        conn.close()
    assert sorted(p.text for p in live) == ["another document", "version three"]


def _initialise_in_child(path: str) -> str:
    from app.store.schema import initialise

    try:
        initialise(Path(path))
        return "ok"
    except Exception as exc:  # reported to the parent, which asserts
        return repr(exc)


def test_initialisation_waits_for_another_process_initialising(tmp_path):
    """Workers starting together on a fresh data directory: the one that
    finds another initialising waits for it (switching a new database to
    WAL is not covered by SQLite's busy timeout)."""
    import fcntl
    import os
    import threading

    path = tmp_path / "server.sqlite3"
    fd = os.open(path.with_name(path.name + ".init-lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a process in the middle of initialise holds it
    done = threading.Event()
    worker = threading.Thread(target=lambda: (initialise(path), done.set()))
    worker.start()
    assert not done.wait(0.5)
    os.close(fd)
    worker.join(30)
    assert done.is_set()
    tables = {r["name"] for r in connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"collections", "documents"} <= tables


def test_processes_initialising_one_fresh_database_together_all_succeed(tmp_path):
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(6) as pool:
        for trial in range(8):
            path = str(tmp_path / f"{trial}.sqlite3")
            assert pool.map(_initialise_in_child, [path] * 6) == ["ok"] * 6


async def test_a_store_that_is_not_open_answers_not_ready(tmp_path):
    from app.errors import NotReady
    from app.store.store import Store

    with pytest.raises(NotReady):
        await Store(tmp_path / "never-opened.sqlite3").list_collections()


RECOUNT = """SELECT
    (SELECT COUNT(*) FROM documents d WHERE d.collection_id = :c AND d.state = 'live'),
    (SELECT COUNT(*) FROM chunks k JOIN documents d ON d.id = k.document_id WHERE d.collection_id = :c AND d.state = 'live'),
    (SELECT COUNT(*) FROM documents d WHERE d.collection_id = :c AND d.state = 'pending'),
    (SELECT COUNT(*) FROM chunks k JOIN documents d ON d.id = k.document_id WHERE d.collection_id = :c AND d.state = 'pending')"""
KEPT = "SELECT live_documents, live_chunks, pending_documents, pending_chunks FROM collection_counts WHERE collection_id = ?"


async def test_the_kept_counts_equal_a_recount_through_every_kind_of_change(store):
    c = (await store.create_collection("docs", None)).id
    other = (await store.create_collection("other", None)).id
    conn = connect(store.path)
    state = IndexStateStore(conn)

    def check() -> None:
        assert tuple(conn.execute(KEPT, (c,)).fetchone()) == tuple(conn.execute(RECOUNT, {"c": c}).fetchone())

    check()
    await store.insert_pending(c, [doc("a", "one", "two"), doc("b", "three"), doc("gone", "four", "five", "six")])
    await store.insert_pending(other, [doc("x", "elsewhere")])
    check()
    make_live(store, c)
    check()
    await store.insert_pending(c, [doc("a", "one again"), doc("c", "seven", "eight")])  # a replaced, c new
    check()
    make_live(store, c)
    check()
    await store.delete_document(c, "gone")
    await store.insert_pending(c, [doc("d", "nine"), doc("d", "ten", "eleven")])  # two versions while pending
    pending = state.pending_documents(c)
    state.supersede(sorted(state.later_pending_versions(c, pending)))
    check()
    state.fail([d.id for d in state.pending_documents(c)], "a document that breaks indexing")
    check()
    dead = state.dead_passage_ids(c)
    col = state.collection(c)
    state.commit_maintenance(c, col.generation, col.generation + 1, "m2", dead)  # deleted rows purged
    check()
    counts = await store.collection_counts(c)
    assert counts == {"documents": 3, "pending_documents": 0, "chunks": 4}  # a (1 chunk), b (1), c (2)
    assert (await store.collection_counts(other))["pending_documents"] == 1
    conn.close()


async def test_a_database_from_before_the_kept_counts_is_counted_once_at_start(tmp_path):
    from app.store.store import Store

    path = tmp_path / "old.sqlite3"
    store = Store(path)
    await store.open()
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc("a", "one", "two"), doc("b", "three")])
    make_live(store, c)
    await store.insert_pending(c, [doc("p", "four")])
    await store.close()
    conn = connect(path)
    for trigger in (
        "counts_of_a_new_collection",
        "counts_document_added",
        "counts_chunk_added",
        "counts_document_state",
    ):
        conn.execute(f"DROP TRIGGER {trigger}")
    conn.execute("DROP TABLE collection_counts")  # as a database written before the table existed
    conn.close()
    initialise(path)
    conn = connect(path)
    assert tuple(conn.execute(KEPT, (c,)).fetchone()) == (2, 3, 1, 1)
    conn.close()


async def test_reads_see_committed_state_only_and_do_not_wait_for_an_open_write(store):
    """A request's read never sees another request's write transaction half
    done (its own connection reads the last commit), nor waits for it."""
    import asyncio

    first = (await store.create_collection("first", None)).id
    await store.insert_pending(first, [doc("x", "granite quarry")])
    make_live(store, first)
    inside, release = asyncio.Event(), asyncio.Event()

    async def long_write():
        async with store.transaction() as db:
            await db.execute("UPDATE documents SET title = 'half written' WHERE collection_id = ?", (first,))
            await db.execute("UPDATE collections SET description = 'half written' WHERE id = ?", (first,))
            inside.set()
            await release.wait()

    writing = asyncio.create_task(long_write())
    await inside.wait()
    col = await asyncio.wait_for(store.get_collection("first"), timeout=5)
    got = await asyncio.wait_for(store.get_document(first, "x"), timeout=5)
    assert col.description is None and got["title"] is None  # not the open transaction's values
    release.set()
    await writing
    assert (await store.get_collection("first")).description == "half written"  # committed: seen at once
    assert (await store.get_document(first, "x"))["title"] == "half written"


async def test_a_read_after_a_committed_write_sees_it_while_other_reads_run(store):
    """Reads share one read connection: a read must never run inside the
    read transaction of another request's unfinished query (it would see
    the store as it was before writes this request just committed)."""
    import asyncio

    stop = asyncio.Event()

    async def other_requests_reading() -> None:
        while not stop.is_set():
            await store.list_collections()

    readers = [asyncio.create_task(other_requests_reading()) for _ in range(4)]
    try:
        for n in range(100):
            await store.create_collection(f"c{n}", None)
            assert (await store.get_collection(f"c{n}")).name == f"c{n}"
    finally:
        stop.set()
        await asyncio.gather(*readers)


def field_doc(external_id: str, text: str, fields: dict[str, str], title: str | None = None) -> NewDocument:
    chunks = [Passage(text, 0, len(text))] + [Passage(v, 0, len(v), field=k) for k, v in fields.items()]
    return NewDocument(external_id, title, {}, f"hash-{text}-{sorted(fields.items())}", chunks, fields)


async def test_each_chunk_keeps_its_field_and_a_field_choice_restricts_filters_and_keyword_search(store):
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(
        c,
        [
            field_doc("a", "granite quarry", {"title": "Stone", "summary": "granite cut in blocks"}, title="Stone"),
            field_doc("b", "marble statue", {"summary": "granite plinth"}),
        ],
    )
    make_live(store, c)
    got = await store.get_document(c, "a")
    assert got["fields"] == {"title": "Stone", "summary": "granite cut in blocks"}
    assert [(ch["ord"], ch["field"], ch["text"]) for ch in got["chunks"]] == [
        (0, "text", "granite quarry"),
        (1, "title", "Stone"),
        (2, "summary", "granite cut in blocks"),
    ]
    # Passage ids follow the chunks: a 0-2, b 3-4.
    assert (await store.fetch_hits(c, [2]))[2].field == "summary"
    summary = FieldFilter(("summary",))
    assert await store.allowed_passage_ids(c, None, summary) == [2, 4]
    assert await store.allowed_passage_ids(c, None, FieldFilter(None, ("text", "summary"))) == [1]
    assert await store.allowed_passage_ids(c, {"$document_id": "b"}, summary) == [4]
    granite = {pid for pid, _ in await store.keyword_search(c, "granite", 10, None)}
    assert granite == {0, 2, 4}
    assert {pid for pid, _ in await store.keyword_search(c, "granite", 10, None, summary)} == {2, 4}
    assert {pid for pid, _ in await store.keyword_search(c, "granite", 10, {"$document_id": "a"}, summary)} == {2}
    # Replaced: every field's chunks of the old version leave search at once.
    await store.insert_pending(c, [field_doc("a", "granite quarry", {})])
    make_live(store, c)
    assert await store.allowed_passage_ids(c, None, summary) == [4]
    assert (await store.get_document(c, "a"))["fields"] == {}
    await store.delete_document(c, "b")
    assert await store.allowed_passage_ids(c, None, summary) == []
    assert {pid for pid, _ in await store.keyword_search(c, "granite", 10, None)} == {5}


async def test_a_database_from_before_fields_is_migrated_and_its_chunks_are_of_the_text_field(tmp_path):
    from app.store.store import Store

    path = tmp_path / "old.sqlite3"
    store = Store(path)
    await store.open()
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc("a", "one", "two", title="Numbers")])
    make_live(store, c)
    await store.close()
    conn = connect(path)
    conn.execute("ALTER TABLE chunks DROP COLUMN field")  # as a database written before fields
    conn.execute("ALTER TABLE documents DROP COLUMN fields")
    conn.close()

    store = Store(path)
    await store.open()
    try:
        got = await store.get_document(c, "a")
        assert got["fields"] == {} and got["title"] == "Numbers"
        assert [(ch["text"], ch["field"]) for ch in got["chunks"]] == [("one", "text"), ("two", "text")]
        assert await store.allowed_passage_ids(c, None, FieldFilter(("text",))) == [0, 1]
        assert {h.field for h in (await store.fetch_hits(c, [0, 1])).values()} == {"text"}
        # New writes after the migration carry their fields.
        await store.insert_pending(c, [field_doc("b", "three", {"summary": "four"})])
        make_live(store, c)
        assert await store.allowed_passage_ids(c, None, FieldFilter(("summary",))) == [3]
    finally:
        await store.close()
    initialise(path)  # a second start finds nothing to migrate
