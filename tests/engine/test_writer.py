"""The index writer's commit, supersede, failure and maintenance logic, over a
real SQLite store, the fake encoder and the in-memory fake backend."""

from __future__ import annotations

import errno
import sqlite3

import pytest
import torch

from app.engine.writer import MAX_ATTEMPTS, IndexWriter, infrastructure_error
from app.errors import DocumentNotFound
from app.ingest.chunking import Passage
from app.settings import Settings
from app.store.index_state import IndexStateStore
from app.store.schema import connect
from app.store.store import NewDocument, Store
from tests.fakes import FakeEncoder, FakeInMemoryBackend


def doc(external_id: str, *texts: str, title: str | None = None) -> NewDocument:
    return NewDocument(external_id, title, {}, f"{external_id}:{texts}", [Passage(t, 0, len(t)) for t in texts])


class FailingBackend(FakeInMemoryBackend):
    """A fake backend whose writes fail (a full disk, say)."""

    def write(self, *args):
        raise OSError("no space left on device")


@pytest.fixture
async def env(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, commit_max_chunks=4)
    store = Store(settings.database_path)
    await store.open()
    conn = connect(settings.database_path)
    yield settings, store, IndexStateStore(conn)
    conn.close()
    await store.close()


def writer(settings, backend=None) -> IndexWriter:
    w = IndexWriter(settings, FakeEncoder(), backend or FakeInMemoryBackend())
    w._stop.set()  # no back-off sleeps: these tests drive step() by hand
    return w


def search(w: IndexWriter, state: IndexStateStore, collection_id: int, query: str, k: int = 5) -> list[int]:
    from app.engine.backend import SearchRequest

    col = state.collection(collection_id)
    snapshot = w.backend.load(collection_id, col.generation, col.manifest)
    return snapshot.search(w.encoder.encode_queries([query]), SearchRequest(k)).passage_ids


async def test_a_commit_assigns_passage_ids_and_makes_documents_live(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    [(_, row)] = await store.insert_pending(c, [doc("a", "red fox", "blue whale", title="Animals")])
    w = writer(settings)
    assert w.step(state) is True
    assert w.step(state) is False  # nothing left
    assert (await store.document_states([row]))[row] == ("live", None)
    col = state.collection(c)
    assert (col.generation, col.next_pid) == (1, 2)
    assert w.backend.stats(c, col.manifest).passages == 2
    assert search(w, state, c, "blue whale")[0] == 1
    assert [p.text for p in state.live_passages(c)] == ["red fox", "blue whale"]


async def test_a_later_pending_version_supersedes_an_earlier_one_and_the_live_one(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    [(_, v1)] = await store.insert_pending(c, [doc("a", "version one")])
    w = writer(settings)
    w.step(state)
    [(_, v2)] = await store.insert_pending(c, [doc("a", "version two")])
    [(_, v3)] = await store.insert_pending(c, [doc("a", "version three")])
    w.step(state)
    states = await store.document_states([v1, v2, v3])
    assert states == {v1: ("deleted", None), v2: ("deleted", None), v3: ("live", None)}
    assert state.dead_passage_count(c) == 1  # v1's passage is indexed and now dead; v2 never was
    assert (await store.get_document(c, "a"))["chunks"][0]["text"] == "version three"


async def test_commits_are_bounded_by_commit_max_chunks_and_first_in_first_out(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    rows = [r for _, r in await store.insert_pending(c, [doc(f"d{i}", "one", "two", "three") for i in range(3)])]
    w = writer(settings)
    w.step(state)
    states = await store.document_states(rows)
    assert [states[r][0] for r in rows] == ["live", "pending", "pending"]  # 3 + 3 chunks > 4
    w.step(state)
    w.step(state)
    assert state.collection(c).generation == 3


async def test_a_full_disk_keeps_documents_pending_and_they_land_once_it_is_gone(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    [(_, row)] = await store.insert_pending(c, [doc("a", "text")])
    backend = FailingBackend()
    w = writer(settings, backend)
    for attempt in range(MAX_ATTEMPTS + 3):
        w.step(state)
        assert (await store.document_states([row]))[row] == ("pending", None), attempt
    assert state.collection(c).generation == 0  # nothing half-committed
    assert "no space left" in w.state().degraded and w.state().documents_failed == 0
    backend.write = FakeInMemoryBackend.write.__get__(backend)  # space freed
    w.step(state)
    assert (await store.document_states([row]))[row] == ("live", None)
    assert w.state().degraded is None


class PoisonEncoder(FakeEncoder):
    """A fake encoder that cannot encode any text holding "poison"."""

    def encode_documents(self, texts):
        if any("poison" in t for t in texts):
            raise ValueError("this text breaks the encoder")
        return super().encode_documents(texts)


async def test_a_document_that_breaks_indexing_is_isolated_and_only_it_fails(env):
    settings, store, state = env  # commit_max_chunks=4: batches of 4 one-chunk documents
    c = (await store.create_collection("docs", None)).id
    names = ["d0", "d1", "bad", "d3", "d4", "d5", "d6"]
    rows = dict(await store.insert_pending(c, [doc(n, "poison" if n == "bad" else f"note {n}") for n in names]))
    w = IndexWriter(settings, PoisonEncoder(), FakeInMemoryBackend())
    w._stop.set()  # no back-off sleeps
    steps = 0
    while w.step(state):
        steps += 1
        assert steps < 20, "the batch was never taken apart"
    states = await store.document_states(list(rows.values()))
    assert {n: states[rows[n]][0] for n in names} == {n: "failed" if n == "bad" else "live" for n in names}
    assert "ValueError: this text breaks the encoder" in states[rows["bad"]][1]
    assert w.state().documents_failed == 1 and w.state().degraded is None and w._isolating == {}
    # The failed version is what GET shows, with its reason; a delete removes it.
    got = await store.get_document(c, "bad")
    assert got["state"] == "failed" and "this text breaks the encoder" in got["error"]
    await store.delete_document(c, "bad")
    with pytest.raises(DocumentNotFound):
        await store.get_document(c, "bad")
    # A corrected version indexes as usual.
    await store.insert_pending(c, [doc("bad", "fixed now")])
    while w.step(state):
        pass
    assert (await store.get_document(c, "bad"))["state"] == "live"


@pytest.mark.parametrize(
    "exc, machine",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EFBIG, "File too large"), True),
        (sqlite3.OperationalError("database is locked"), True),
        (sqlite3.OperationalError("database or disk is full"), True),
        (MemoryError(), True),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
        (sqlite3.OperationalError("malformed JSON"), False),
        (ValueError("this text breaks the encoder"), False),
        (OSError(errno.ENOENT, "No such file or directory"), False),
    ],
)
def test_the_machines_faults_are_told_from_the_documents(exc, machine):
    assert infrastructure_error(exc) is machine
    try:
        try:
            raise exc
        except BaseException as cause:
            raise RuntimeError("a landing failed") from cause
    except RuntimeError as wrapped:
        assert infrastructure_error(wrapped) is machine


def maintain(w: IndexWriter, state: IndexStateStore, collection_id: int) -> bool:
    """One background step as the maintainer thread would prepare it, folded
    in by the writer (False: nothing was planned)."""
    submitted = w.maintainer.prepare_step(state, collection_id, state.collection(collection_id).manifest)
    if submitted is None:
        return False
    w.maintainer.changes.put(submitted)
    assert w.step(state) is True
    assert submitted.done.is_set() and submitted.outcome == "landed"
    return True


async def test_maintenance_drops_tombstones_and_purges_their_rows(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc(f"d{i}", f"note {i}") for i in range(4)])
    w = writer(settings)
    w.step(state)
    await store.delete_document(c, "d0")
    await store.delete_document(c, "d1")
    assert state.dead_passage_count(c) == 2
    assert maintain(w, state, c) is True
    col = state.collection(c)
    assert w.backend.stats(c, col.manifest).passages == 2
    assert state.dead_passage_count(c) == 0 and state.deleted_documents(c) == []
    assert sorted(search(w, state, c, "note", k=10)) == [2, 3]  # passage ids survive maintenance
    assert maintain(w, state, c) is False
    assert w.step(state) is False


async def test_commits_made_while_a_step_is_prepared_are_kept(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc(f"d{i}", f"note {i}") for i in range(4)])
    w = writer(settings)
    w.step(state)
    for i in range(3):
        await store.delete_document(c, f"d{i}")
    submitted = w.maintainer.prepare_step(state, c, state.collection(c).manifest)
    assert submitted is not None
    await store.insert_pending(c, [doc("late", "a late note")])
    assert w.step(state) is True  # a commit lands before the step is folded in
    w.maintainer.changes.put(submitted)
    assert w.step(state) is True
    assert submitted.outcome == "landed"
    assert sorted(search(w, state, c, "note", k=10)) == [3, 4]
    assert state.dead_passage_count(c) == 0


async def test_a_failing_background_step_backs_off_and_commits_go_on(env):
    settings, store, state = env

    class FailingPrepare(FakeInMemoryBackend):
        def prepare(self, task, dead_pids):
            raise MemoryError("a background step ran out of memory")

    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc(f"d{i}", f"note {i}") for i in range(2)])
    w = writer(settings, FailingPrepare())
    w.step(state)
    await store.delete_document(c, "d0")
    assert w.maintainer.prepare_step(state, c, state.collection(c).manifest) is None
    assert w.maintainer.last_error == "MemoryError"
    assert (c, False) in w.maintainer._backoff  # not retried at once
    await store.insert_pending(c, [doc("e", "more notes")])
    assert w.step(state) is True
    assert state.collection(c).generation == 2
    assert 2 in search(w, state, c, "more notes", k=10)


async def test_collections_take_turns_so_a_small_update_skips_a_bulk_backlog(env):
    settings, store, state = env  # commit_max_chunks=4: the bulk load takes 5 commits
    bulk = (await store.create_collection("bulk", None)).id
    small = (await store.create_collection("small", None)).id
    await store.insert_pending(bulk, [doc(f"b{i}", f"bulk {i}") for i in range(20)])
    w = writer(settings)
    assert w.step(state) is True  # the bulk collection's first batch
    [(_, row)] = await store.insert_pending(small, [doc("one", "a small update")])
    assert w.step(state) is True
    assert (await store.document_states([row]))[row] == ("live", None)
    assert len(await store.list_documents(bulk, limit=100, offset=0)) < 20  # bulk still pending


async def test_a_small_upsert_skips_the_bulk_backlog_of_its_own_collection(env):
    settings, store, state = env  # commit_max_chunks=4: the bulk load takes 5 commits
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc(f"b{i}", f"bulk {i}") for i in range(20)])
    w = writer(settings)
    assert w.step(state) is True
    [(_, row)] = await store.insert_pending(c, [doc("one", "a small update")], priority=1)
    assert w.step(state) is True
    assert (await store.document_states([row]))[row] == ("live", None)
    assert len(state.pending_documents(c)) == 13  # the batch was filled up with bulk documents


async def test_an_older_version_indexed_after_a_newer_one_never_replaces_it(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    [(_, old)] = await store.insert_pending(c, [doc("x", "first version")])
    await store.insert_pending(c, [doc(f"b{i}", f"bulk {i}") for i in range(8)])
    [(_, new)] = await store.insert_pending(c, [doc("x", "second version")], priority=1)
    w = writer(settings)
    while w.step(state):
        pass
    states = await store.document_states([old, new])
    assert states[new] == ("live", None)
    assert states[old][0] == "deleted"


def test_bulk_batches_are_encoded_in_slices_of_the_commit_target(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, commit_max_chunks=4096, commit_target_s=1.0)
    w = writer(settings)
    assert w._slice_chunks() == 64  # nothing measured yet
    w._seconds_per_chunk = 0.01
    assert w._slice_chunks() == 100
    w._seconds_per_chunk = 10.0
    assert w._slice_chunks() == 16  # never below the floor
    w._seconds_per_chunk = 1e-6
    assert w._slice_chunks() == 4096  # never above the cap


def test_bulk_commits_are_sized_from_the_measured_cost_of_a_whole_commit(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path, commit_max_chunks=4096, commit_target_s=1.0)
    w = writer(settings)
    assert w._batch_chunks() == 1024  # nothing measured yet
    w._commit_measured(3.0, 1000)  # 3 ms a chunk: COMMIT_SLICES seconds is 1,000 chunks
    assert w._batch_chunks() == 1000
    w._commit_measured(0.3, 1000)  # cheaper now: the moving average follows
    assert 1000 < w._batch_chunks() < 4096
    w._commit_seconds_per_chunk = 10.0
    assert w._batch_chunks() == 16
    w._commit_seconds_per_chunk = 1e-6
    assert w._batch_chunks() == 4096


async def test_a_priority_upsert_is_committed_between_slices_of_a_bulk_batch(tmp_path):
    import asyncio

    settings = Settings(_env_file=None, data_dir=tmp_path, commit_max_chunks=4096)
    store = Store(settings.database_path)
    await store.open()
    conn = connect(settings.database_path)
    state = IndexStateStore(conn)
    loop = asyncio.get_running_loop()
    try:
        bulk = (await store.create_collection("bulk", None)).id
        small = (await store.create_collection("small", None)).id
        await store.insert_pending(bulk, [doc(f"b{i}", f"bulk {i}") for i in range(200)])
        w = writer(settings)
        w._seconds_per_chunk = 1.0 / 50  # slices of 50 chunks
        rows: list[int] = []
        original = w.encoder.encode_documents
        order: list[str] = []

        def encode(texts):
            order.append(texts[0].split()[0])
            if not rows:  # a small upsert arrives while the bulk batch is being encoded
                insert = store.insert_pending(small, [doc("one", "small update")], priority=1)
                rows.append(asyncio.run_coroutine_threadsafe(insert, loop).result()[0][1])
            return original(texts)

        w.encoder.encode_documents = encode
        assert await asyncio.to_thread(w.step, state) is True
        assert order[:2] == ["bulk", "small"]  # encoded after the first slice, not after the whole batch
        assert state.collection(small).generation == 1 and state.collection(bulk).generation == 1
        assert (await store.document_states(rows))[rows[0]] == ("live", None)
        assert state.pending_documents(bulk) == []  # the whole bulk batch landed too
    finally:
        conn.close()
        await store.close()


async def test_slices_follow_the_batch_by_length_and_each_passage_keeps_its_own_vectors(env):
    settings, store, state = env
    settings = settings.model_copy(update={"commit_max_chunks": 4096})
    c = (await store.create_collection("docs", None)).id
    texts = [("word " * n).strip() + f" doc{i}" for i, n in enumerate([9, 1, 30, 4, 17, 2, 25, 12])]
    await store.insert_pending(c, [doc(f"d{i}", t) for i, t in enumerate(texts)])
    w = writer(settings)
    w._slice_chunks = lambda: 3  # below the floor a real writer keeps (MIN_BATCH_CHUNKS)
    original = w.encoder.encode_documents
    slices: list[list[str]] = []

    def encode(batch):
        slices.append(list(batch))
        return original(batch)

    w.encoder.encode_documents = encode
    assert w.step(state) is True
    assert [t for s in slices for t in s] == sorted(texts, key=len)  # every text once, shortest first
    assert all(len(s) <= 3 for s in slices) and len(slices) == 3
    [batch] = w.backend.generations[(c, state.collection(c).manifest)]
    # Passage ids follow the batch's order, and each holds its own text's vectors.
    assert batch.pids.tolist() == list(range(len(texts)))
    rows = torch.split(batch.embs, batch.doclens.tolist())
    for text, vectors in zip(texts, rows, strict=True):
        assert torch.equal(vectors, original([text])[0])


class GatedBackend(FakeInMemoryBackend):
    """A fake backend whose first (or ``gated_write``-th) write waits for ``gate`` (a landing held
    open while the writer goes on), recording which thread wrote."""

    def __init__(self, fail_first: bool = False, gated_write: int = 1):
        super().__init__()
        import threading

        self.gate = threading.Event()
        self.writing = threading.Event()
        self.threads: list[str] = []
        self.fail_first = fail_first
        self.gated_write = gated_write  # which write (1: the first) waits for the gate

    def write(self, *args):
        import threading

        self.threads.append(threading.current_thread().name)
        if len(self.threads) == self.gated_write:
            self.writing.set()
            assert self.gate.wait(10), "the writer never reached the next batch"
            if self.fail_first:
                raise OSError("no space left on device")
        return super().write(*args)


def overlapped(settings, backend: GatedBackend):
    """A writer that steps with ``overlap`` and opens the gate once it
    encodes while the first landing is held open; the texts it encoded, and
    those encoded while that landing was open."""
    w = writer(settings, backend)
    original = w.encoder.encode_documents
    encoded: list[str] = []
    during_landing: list[str] = []

    def encode(texts):
        encoded.extend(texts)
        if w._landing_ids and not backend.gate.is_set():  # a landing was handed over: let it reach its write
            assert backend.writing.wait(10)
        if backend.writing.is_set() and not backend.gate.is_set():
            during_landing.extend(texts)
            backend.gate.set()
        return original(texts)

    w.encoder.encode_documents = encode
    return w, encoded, during_landing


async def test_with_overlap_the_next_batch_is_encoded_while_the_previous_one_lands(env):
    import asyncio

    settings, store, state = env  # commit_max_chunks=4: 12 one-chunk documents take 3 batches
    c = (await store.create_collection("docs", None)).id
    rows = [r for _, r in await store.insert_pending(c, [doc(f"d{i}", f"note {i}") for i in range(12)])]
    backend = GatedBackend()
    w, encoded, during_landing = overlapped(settings, backend)
    try:
        while await asyncio.to_thread(w.step, state, True):
            pass
        assert during_landing == [f"note {i}" for i in range(4, 8)]  # the second batch, while the first landed
        assert sorted(encoded) == sorted(f"note {i}" for i in range(12))  # nothing encoded twice
        assert set(backend.threads) == {"index-lander"}
        states = await store.document_states(rows)
        assert all(states[r] == ("live", None) for r in rows)
        col = state.collection(c)
        assert (col.generation, col.next_pid) == (3, 12)
        # Passage ids follow the batches in order: each document keeps its own text.
        assert [p.text for p in sorted(state.live_passages(c), key=lambda p: p.passage_id)] == [
            f"note {i}" for i in range(12)
        ]
        assert search(w, state, c, "note 7")[0] == 7
        assert not w.busy and not w._landing_ids
    finally:
        w._lander.stop()


async def test_with_overlap_a_maintenance_change_waits_behind_the_landing_without_stopping_the_writer(env):
    import asyncio

    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc(f"d{i}", f"old {i}") for i in range(4)])
    backend = GatedBackend(gated_write=2)  # the first overlapped landing is held open
    w, encoded, during_landing = overlapped(settings, backend)
    try:
        assert w.step(state) is True  # d0-d3 land here
        await store.delete_document(c, "d0")
        await store.delete_document(c, "d1")
        submitted = w.maintainer.prepare_step(state, c, state.collection(c).manifest)
        assert submitted is not None
        await store.insert_pending(c, [doc(f"n{i}", f"note {i}") for i in range(8)])
        assert await asyncio.to_thread(w.step, state, True) is True  # n0-n3 handed over; their landing waits
        assert await asyncio.to_thread(backend.writing.wait, 10)
        w.maintainer.changes.put(submitted)
        assert await asyncio.to_thread(w.step, state, True) is True  # queued behind the landing, not waited for
        assert not submitted.done.is_set() and w.state().busy and not w.settled()
        while await asyncio.to_thread(w.step, state, True):  # n4-n7 are encoded while n0-n3 land
            pass
        assert during_landing == [f"note {i}" for i in range(4, 8)]
        assert submitted.done.is_set() and submitted.outcome == "landed"
        assert set(backend.threads[1:]) == {"index-lander"}
        col = state.collection(c)
        assert col.generation == 4  # d0-d3, n0-n3, the change, n4-n7: in the order handed over
        assert state.dead_passage_count(c) == 0
        assert sorted(search(w, state, c, "note", k=20)) == list(range(2, 12))
        assert not w.state().busy
    finally:
        w._lander.stop()


async def test_with_overlap_a_failed_landing_leaves_its_documents_pending_and_the_next_batch_lands(env):
    import asyncio

    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    rows = [r for _, r in await store.insert_pending(c, [doc(f"d{i}", f"note {i}") for i in range(8)])]
    backend = GatedBackend(fail_first=True)
    w, encoded, during_landing = overlapped(settings, backend)
    try:
        assert await asyncio.to_thread(w.step, state, True) is True  # the first batch, handed over
        assert await asyncio.to_thread(w.step, state, True) is True  # the second, while the first fails
        w.drain()
        states = await store.document_states(rows)
        assert [states[r][0] for r in rows] == ["pending"] * 4 + ["live"] * 4
        while await asyncio.to_thread(w.step, state, True):
            pass
        states = await store.document_states(rows)
        assert all(states[r] == ("live", None) for r in rows)  # the retry landed the first batch
        assert state.collection(c).next_pid == 8
        assert sorted(encoded) == sorted([f"note {i}" for i in range(8)] + [f"note {i}" for i in range(4)])
    finally:
        w._lander.stop()


async def test_with_overlap_a_version_upserted_while_the_earlier_one_lands_replaces_it(env):
    import asyncio

    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    [(_, v1)] = await store.insert_pending(c, [doc("x", "first version")])
    backend = GatedBackend()
    w, encoded, during_landing = overlapped(settings, backend)
    try:
        assert await asyncio.to_thread(w.step, state, True) is True  # v1 handed over; its landing waits
        assert await asyncio.to_thread(backend.writing.wait, 10)
        [(_, v2)] = await store.insert_pending(c, [doc("x", "second version")])
        while await asyncio.to_thread(w.step, state, True):  # v2 is encoded while v1 lands
            pass
        assert during_landing == ["second version"]
        states = await store.document_states([v1, v2])
        assert states == {v1: ("deleted", None), v2: ("live", None)}
        assert (await store.get_document(c, "x"))["chunks"][0]["text"] == "second version"
        assert state.dead_passage_count(c) == 1  # v1's passage, tombstoned by v2's landing
        assert [p.passage_id for p in state.live_passages(c)] == [1]
    finally:
        w._lander.stop()


def test_a_lander_that_cannot_open_its_database_fails_what_waits_instead_of_hanging(tmp_path):
    from app.engine.writer import _Lander

    lander = _Lander(tmp_path / "no such directory" / "index.sqlite", lambda: None)
    first, second = lander.submit(lambda store: "landed"), lander.submit(lambda store: "landed")
    assert first.exception(timeout=10) is not None and second.exception(timeout=10) is not None
    lander.stop()


async def test_with_overlap_a_failing_cleanup_after_a_landed_commit_is_not_a_failed_landing(env):
    import asyncio

    class FailingReleaseBackend(FakeInMemoryBackend):
        def release(self, *args):
            raise OSError("cannot remove an old file")

    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    [(_, row)] = await store.insert_pending(c, [doc("a", "text")])
    w = writer(settings, FailingReleaseBackend())
    try:
        assert await asyncio.to_thread(w.step, state, True) is True
        w.drain()
        assert (await store.document_states([row]))[row] == ("live", None)
        assert w._failures == {} and not w._landing_ids
    finally:
        w._lander.stop()


async def test_a_hung_writer_shows_as_stalled_here_and_to_other_processes_then_recovers(env, monkeypatch):
    import asyncio
    import threading

    import app.engine.writer as writer_module

    monkeypatch.setattr(writer_module, "HEARTBEAT_FILE_S", 0.0)  # every sign of life reaches the lease file
    settings, store, state = env
    settings = settings.model_copy(update={"writer_stall_s": 0.5})
    released = threading.Event()

    class HangingBackend(FakeInMemoryBackend):
        def write(self, *args):
            assert released.wait(30)  # a landing that hangs (a stuck disk, a stopped process)
            return super().write(*args)

    c = (await store.create_collection("docs", None)).id
    w = IndexWriter(settings, FakeEncoder(), HangingBackend())
    other = IndexWriter(settings, FakeEncoder(), FakeInMemoryBackend())  # another process's view: no lease
    w.start()
    try:
        await store.insert_pending(c, [doc("a", "text")])
        w.notify()
        await asyncio.sleep(1.5)
        assert w.state().stalled_s is not None and w.state().stalled_s >= 0.5
        assert not other.lease.held and other.state().stalled_s is not None
        released.set()
        for _ in range(100):
            if w.state().stalled_s is None and other.state().stalled_s is None:
                break
            await asyncio.sleep(0.05)
        assert w.state().stalled_s is None and other.state().stalled_s is None
        for _ in range(100):
            if state.live_passages(c):
                break
            await asyncio.sleep(0.05)
        assert [p.text for p in state.live_passages(c)] == ["text"]  # the hung landing went through
    finally:
        released.set()
        w.stop()


async def test_once_the_bad_document_is_found_the_rest_lands_in_full_batches(env):
    settings, store, state = env  # commit_max_chunks=4
    c = (await store.create_collection("docs", None)).id
    names = ["bad", "d1", "d2", "d3", "d4", "d5", "d6"]
    rows = dict(await store.insert_pending(c, [doc(n, "poison" if n == "bad" else f"note {n}") for n in names]))
    w = IndexWriter(settings, PoisonEncoder(), FakeInMemoryBackend())
    w._stop.set()
    while w.step(state):
        pass
    states = await store.document_states(list(rows.values()))
    assert [states[rows[n]][0] for n in names] == ["failed"] + ["live"] * 6
    assert state.collection(c).generation == 2  # d1-d4 and d5-d6, not six one-document commits
    assert w._isolating == {}


async def test_a_batch_taken_apart_is_forgotten_when_its_documents_are_deleted(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc(f"p{i}", "poison") for i in range(4)])
    w = IndexWriter(settings, PoisonEncoder(), FakeInMemoryBackend())
    w._stop.set()
    w.step(state)  # the batch of four fails: taken apart
    assert w._isolating[c][0] == 2
    for i in range(4):
        await store.delete_document(c, f"p{i}")
    await store.insert_pending(c, [doc(f"n{i}", f"note {i}") for i in range(4)])
    w.step(state)
    assert w._isolating == {} and state.collection(c).generation == 1  # one full batch


async def test_a_commit_with_an_old_fencing_token_is_refused_and_changes_nothing(env):
    from app.store.index_state import LeaseLost, take_writer_epoch

    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    [(_, row)] = await store.insert_pending(c, [doc("a", "text")])
    mine = take_writer_epoch(state.conn, 1)
    fenced = IndexStateStore(state.conn, lambda: mine)
    take_writer_epoch(state.conn, 2)  # another process took the lease meanwhile
    col = state.collection(c)
    with pytest.raises(LeaseLost):
        fenced.commit_append(c, col.generation, col.generation + 1, "m", col.next_pid, [1], state.pending_documents(c))
    with pytest.raises(LeaseLost):
        fenced.fail([row], "a reason")
    assert state.collection(c) == col and (await store.document_states([row]))[row] == ("pending", None)


async def test_a_writer_whose_lease_moved_on_stops_committing_then_competes_for_it_again(env):
    """Two writers at once (a lease file replaced under a running writer, a
    filesystem whose locks failed): the one with the old epoch commits
    nothing, gives the lease up, and the documents land once a writer holds
    the newest epoch."""
    import asyncio

    from app.store.index_state import take_writer_epoch

    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    w = IndexWriter(settings, FakeEncoder(), FakeInMemoryBackend())
    w.start()
    try:
        await store.insert_pending(c, [doc("a", "first")])
        w.notify()
        for _ in range(200):
            if state.live_passages(c):
                break
            await asyncio.sleep(0.05)
        first_epoch = w.epoch
        assert first_epoch is not None and [p.text for p in state.live_passages(c)] == ["first"]
        generation = state.collection(c).generation
        stolen = take_writer_epoch(state.conn, 999_999)  # another process (pid 999999) took the lease
        await store.insert_pending(c, [doc("b", "second")])
        w.notify()
        for _ in range(300):
            if len(state.live_passages(c)) == 2:
                break
            await asyncio.sleep(0.05)
        # Its first try was refused (no commit at the old epoch); it let the
        # lease go, took it again with a newer epoch, and landed the document.
        assert stolen == first_epoch + 1 and w.epoch is not None and w.epoch > stolen
        assert [p.text for p in state.live_passages(c)] == ["first", "second"]
        assert state.collection(c).generation == generation + 1
    finally:
        w.stop()


async def test_a_deleted_collection_is_gone_at_once_and_its_rows_are_purged_in_batches_by_the_writer(env):
    from app.store.jobs import NewJobFile

    settings, store, state = env
    old = (await store.create_collection("docs", None)).id
    await store.insert_pending(old, [doc(f"d{i}", *(f"text {i} {j}" for j in range(3))) for i in range(20)])
    w = writer(settings)
    while w.step(state):
        pass
    [(_, late)] = await store.insert_pending(old, [doc("late", "pending when its collection goes")])
    job = await store.jobs.create(old, [NewJobFile("a.txt", "a.txt", {}, b"queued when its collection goes", None)])
    assert await store.jobs.next_queued({}) is not None

    await store.delete_collection("docs")
    new = (await store.create_collection("docs", None)).id  # the name is free at once
    assert new != old and await store.collection_counts(new) == {"documents": 0, "pending_documents": 0, "chunks": 0}
    assert await store.jobs.next_queued({}) is None  # its queued file is never served
    assert state.pending_collections() == []  # nor its pending document indexed
    assert (await store.document_states([late]))[late][0] == "deleted"  # an upsert waiting on it stops waiting

    def count(table: str) -> int:
        return state.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE collection_id = ?", (old,)).fetchone()[0]

    assert count("chunks") == 61 and count("documents") == 21  # left to the writer

    batches = 0
    while state.purge_dropped(batch=25):
        batches += 1
    assert batches == 3 + 1 + 1 + 1  # 61 chunks, 21 documents, 1 job file, then the jobs and the mark
    assert count("chunks") == 0 and count("documents") == 0 and count("jobs") == 0
    assert state.conn.execute("SELECT COUNT(*) FROM dropped_collections").fetchone()[0] == 0
    with pytest.raises(Exception, match="does not exist"):
        await store.jobs.get(job)
    assert w.step(state) is False  # nothing left to purge or index


async def test_a_lease_that_cannot_be_taken_for_another_reason_than_busy_shows_as_degraded(env, monkeypatch):
    """A filesystem without locks (ENOLCK) used to leave every process a
    silent reader: nothing indexed, /ready green."""
    import asyncio
    import fcntl

    import app.engine.lease as lease_module

    settings, store, state = env
    real_flock = fcntl.flock
    broken = True

    def flock(fd, op):
        if broken and op & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")
        return real_flock(fd, op)

    monkeypatch.setattr(lease_module.fcntl, "flock", flock)
    c = (await store.create_collection("docs", None)).id
    await store.insert_pending(c, [doc("a", "text")])
    w = IndexWriter(settings, FakeEncoder(), FakeInMemoryBackend())
    w.start()
    try:
        for _ in range(100):
            if w.state().degraded:
                break
            await asyncio.sleep(0.05)
        assert w.state().degraded.startswith("writer lease: OSError") and not w.lease.held
        broken = False  # the cause is gone: it takes the lease and indexes
        for _ in range(200):
            if state.live_passages(c):
                break
            await asyncio.sleep(0.05)
        assert [p.text for p in state.live_passages(c)] == ["text"] and w.state().degraded is None
    finally:
        w.stop()


async def test_every_field_is_encoded_with_the_title_but_the_title_field_alone(env):
    settings, store, state = env
    c = (await store.create_collection("docs", None)).id
    chunks = [
        Passage("red fox", 0, 7),
        Passage("Animals", 0, 7, field="title"),
        Passage("a fox", 0, 5, field="summary"),
    ]
    new = NewDocument("a", "Animals", {}, "hash", chunks, {"title": "Animals", "summary": "a fox"})
    await store.insert_pending(c, [new])
    w = writer(settings)
    encoded: list[str] = []
    original = w.encoder.encode_passages
    w.encoder.encode_passages = lambda texts: encoded.extend(texts) or original(texts)
    assert w.step(state) is True
    assert sorted(encoded) == sorted(["Animals\nred fox", "Animals", "Animals\na fox"])
    assert [(p.field, p.text) for p in state.live_passages(c)] == [
        ("text", "red fox"),
        ("title", "Animals"),
        ("summary", "a fox"),
    ]
