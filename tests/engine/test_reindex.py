"""Re-indexing a collection with another checkpoint while it is searched and
written (app/engine/reindex.py).

The real app, writer, maintainer, PLAID backend and SQLite store, over the
fake encoder: checkpoint ``alt`` is the fake encoder with a salt, so each
word has another vector there. A query encoded with one checkpoint finds
nothing in particular in an index encoded with the other, so every search
that finds its document shows that the index and its queries came from the
same checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import zlib
from pathlib import Path

import httpx
import pytest
import torch
from asgi_lifespan import LifespanManager

from app.engine.writer import IndexWriter, _Batch, _Encoded
from app.factory import create_app
from app.service import SearchService
from app.settings import Settings
from app.store.index_state import IndexStateStore
from app.store.schema import connect
from app.tuning_jobs import start_reindex
from tests.engine.crash_worker import WORDS
from tests.fakes import FakeEncoder, FakeInMemoryBackend


class SlowFakeEncoder(FakeEncoder):
    """The ``alt`` checkpoint: salted vectors, encoded slowly enough that a
    re-index spans many searches and writes."""

    delay_s = 0.1

    def encode_passages(self, texts):
        time.sleep(self.delay_s)
        return super().encode_passages(texts)


class BrokenFakeEncoder(FakeEncoder):
    def encode_passages(self, texts):
        raise ValueError("this checkpoint cannot encode passages")


def loader(loaded: dict):
    def load(path: str):
        name = Path(path).name
        if name == "broken":  # loads, then fails on every batch
            return BrokenFakeEncoder(salt=2)
        if name == "narrow":  # vectors of another dimension
            encoder = FakeEncoder(salt=1)
            encoder.dim = 8
            return encoder
        loaded[name] = loaded.get(name) or SlowFakeEncoder(salt=zlib.crc32(name.encode()))
        return loaded[name]

    return load


def settings_for(data_dir: Path) -> Settings:
    return Settings(
        _env_file=None,
        environment="test",
        data_dir=data_dir,
        log_level="WARNING",
        answer_preload=False,
        # Small batches and an early first codec: the new index is built in
        # many batches, with codecs trained and segments merged as it grows.
        exact_search_max_passages=20,
        rebuild_growth_factor=2.0,
        commit_max_chunks=16,
        snapshot_refresh_s=0.2,
        # Every centroid probed: PLAID's candidates are exhaustive, so a
        # search misses its document only if it is scored with the wrong
        # checkpoint's query (the fake's random 16-dim vectors cluster too
        # poorly for PLAID's default probes).
        ncells=4096,
        ndocs=4096,
        centroid_score_threshold=-1.0,
    )


@contextlib.asynccontextmanager
async def app_on(data_dir: Path, loaded: dict | None = None):
    loaded = {} if loaded is None else loaded
    service = SearchService(settings_for(data_dir), encoder=FakeEncoder(), encoder_loader=loader(loaded))
    app = create_app(service.settings, service=service)
    async with LifespanManager(app) as manager:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://localhost") as c:
            deadline = time.monotonic() + 60
            while (await c.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            yield service, c


def text(i: int) -> str:
    return f"note {i} about {WORDS[i % 8]} and {WORDS[(i * 3) % 8]} tag{i}"


async def upsert(c: httpx.AsyncClient, ids: list[int]) -> None:
    docs = [{"id": f"d{i}", "text": text(i)} for i in ids]
    r = await c.post("/v1/collections/docs/documents", json={"documents": docs})
    assert r.status_code in (200, 202), r.text


async def found(c: httpx.AsyncClient, i: int) -> bool:
    """Whether a search for document i's own word finds it among the first
    ten of 100+ (a query of the other checkpoint ranks it anywhere: 8% by
    chance; not first, since 2-bit residuals of random 16-dim vectors under
    a codec trained on the first few batches can put near words first).
    :func:`encoded_with` is the exact check."""
    r = await c.post("/v1/collections/docs/search", json={"query": f"tag{i}", "k": 10})
    assert r.status_code == 200, r.text
    return f"d{i}" in [h["document_id"] for h in r.json()["results"]]


async def encoded_with(service: SearchService, encoder: FakeEncoder) -> int:
    """Every live passage of the served index holds ``encoder``'s vectors:
    its stored dense vector is that encoder's vector of its text (another
    checkpoint's points elsewhere). Returns how many were checked."""
    collection_id = (await service.store.get_collection("docs")).id
    _, cached = await service.snapshots.get("docs")
    rows = await service.store._all(
        """SELECT c.passage_id, c.text FROM chunks c JOIN documents d ON d.id = c.document_id
           WHERE d.collection_id = ? AND d.state = 'live'""",
        (collection_id,),
    )
    for pid, text in rows:
        own = FakeEncoder(salt=encoder.salt).encode_passages([text]).dense.float()
        score = float(cached.snapshot.dense_scores(own, torch.tensor([pid]))[0])
        assert score > 0.99, (pid, text, score)
    return len(rows)


async def collection(c: httpx.AsyncClient) -> dict:
    r = await c.get("/v1/collections/docs")
    assert r.status_code == 200, r.text
    return r.json()


async def until(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def settled(c: httpx.AsyncClient) -> bool:
    return (await collection(c))["pending_documents"] == 0


async def filled(c: httpx.AsyncClient, n: int) -> None:
    assert (await c.post("/v1/collections", json={"name": "docs"})).status_code == 201
    for start in range(0, n, 40):
        await upsert(c, list(range(start, min(n, start + 40))))
    await until(lambda: settled(c))


async def test_a_collection_is_reindexed_while_searches_and_writes_go_on(tmp_path):
    (tmp_path / "checkpoints" / "alt").mkdir(parents=True)
    loaded: dict = {}
    async with app_on(tmp_path, loaded) as (service, c):
        await filled(c, 120)
        before = await collection(c)
        assert before["checkpoint"] is None and before["reindex"] is None

        r = await c.post("/v1/collections/docs/reindex", json={"checkpoint": "alt"})
        assert r.status_code == 202, r.text
        assert r.json()["reindex"] == {"state": "running", "checkpoint": "alt", "progress": 0.0, "error": None}

        live, deleted, added = set(range(120)), set(), []
        rng = random.Random(0)
        searched_during, progress_seen = 0, set()
        next_id = 1000
        while (state := await collection(c))["checkpoint"] != "alt":
            if state["reindex"] is not None:
                assert state["reindex"]["state"] == "running", state
                progress_seen.add(state["reindex"]["progress"])
            # Every search finds its document, whichever index serves it.
            i = rng.choice(sorted(live))
            assert await found(c, i)
            searched_during += 1
            if searched_during % 5 == 0:  # writes go on: new documents, and deletes
                await upsert(c, [next_id])
                live.add(next_id)
                added.append(next_id)
                next_id += 1
                gone = rng.choice(sorted(live - set(added)))
                assert (await c.delete(f"/v1/collections/docs/documents/d{gone}")).status_code == 204
                live.discard(gone)
                deleted.add(gone)
            assert searched_during < 5000, "the re-index did not finish"
        assert searched_during >= 10 and len(progress_seen) >= 3, (searched_during, progress_seen)

        after = await collection(c)
        assert after["reindex"] is None and after["generation"] > before["generation"]
        await until(lambda: settled(c))
        for i in sorted(live):
            assert await found(c, i), i
        for i in deleted:
            r = await c.post("/v1/collections/docs/search", json={"query": f"tag{i}", "k": 3})
            assert f"d{i}" not in [h["document_id"] for h in r.json()["results"]]
        # The index and its queries are alt's now: every passage was encoded with it.
        collection_id = (await service.store.get_collection("docs")).id
        assert service.snapshots.cached(collection_id).checkpoint == "alt"
        assert loaded["alt"].documents_encoded >= 120
        assert await encoded_with(service, loaded["alt"]) == len(live)
        # Documents written after the switch are encoded with alt too.
        encoded = loaded["alt"].documents_encoded
        await upsert(c, [5000])
        await until(lambda: settled(c))
        assert await found(c, 5000) and loaded["alt"].documents_encoded == encoded + 1

        # Back to the configured checkpoint, the same way.
        r = await c.post("/v1/collections/docs/reindex", json={"checkpoint": None})
        assert r.status_code == 202
        await until(lambda: _switched(c, None))
        await until(lambda: settled(c))
        # Exact, unlike a search of this toy codec (2-bit residuals of random
        # 16-dim vectors can rank a near word above the document's own).
        assert await encoded_with(service, FakeEncoder()) == len(live) + 1  # d5000 too


async def _switched(c: httpx.AsyncClient, checkpoint: str | None) -> bool:
    state = await collection(c)
    return state["checkpoint"] == checkpoint and state["reindex"] is None


async def test_a_reindex_goes_on_after_a_restart_and_can_be_cancelled(tmp_path):
    (tmp_path / "checkpoints" / "alt").mkdir(parents=True)
    async with app_on(tmp_path) as (_, c):
        await filled(c, 100)
        assert (await c.post("/v1/collections/docs/reindex", json={"checkpoint": "alt"})).status_code == 202

        async def under_way() -> bool:
            return 0 < ((await collection(c))["reindex"] or {}).get("progress", 0) < 1

        await until(under_way)
    # A new server on the same data directory carries on from where it was.
    async with app_on(tmp_path) as (_, c):
        state = await collection(c)
        assert state["reindex"]["state"] == "running" and state["reindex"]["progress"] > 0, state
        await until(lambda: _switched(c, "alt"))
        for i in random.Random(1).sample(range(100), 25):
            assert await found(c, i)
        # A cancelled re-index leaves the served index and its checkpoint as they are.
        (tmp_path / "checkpoints" / "other").mkdir()
        assert (await c.post("/v1/collections/docs/reindex", json={"checkpoint": "other"})).status_code == 202
        await until(under_way)
        r = await c.delete("/v1/collections/docs/reindex")
        assert r.status_code == 200 and r.json()["reindex"] is None and r.json()["checkpoint"] == "alt"
        await asyncio.sleep(1.0)
        assert (await collection(c))["checkpoint"] == "alt"
        for i in random.Random(2).sample(range(100), 10):
            assert await found(c, i)


async def test_reindex_requests_that_cannot_be_served_are_refused_and_change_nothing(tmp_path):
    (tmp_path / "checkpoints" / "narrow").mkdir(parents=True)
    async with app_on(tmp_path) as (service, c):
        await filled(c, 10)
        cases = [
            ({"checkpoint": "missing"}, 404, "checkpoint_not_found"),
            ({"checkpoint": "../escape"}, 422, None),
            ({"checkpoint": "narrow"}, 422, "invalid_input"),  # 8-dimensional vectors for a 16-dimensional index
            ({"checkpoint": "alt", "extra": 1}, 422, None),
        ]
        for body, status, code in cases:
            r = await c.post("/v1/collections/docs/reindex", json=body)
            assert r.status_code == status, (body, r.text)
            if code:
                assert r.json()["error"]["code"] == code, r.text
        assert (await c.post("/v1/collections/nope/reindex", json={})).status_code == 404
        state = await collection(c)
        assert state["reindex"] is None and state["checkpoint"] is None
        assert await found(c, 3)

        # A checkpoint that cannot be loaded by the writer (named through the
        # store, as the tune command does) stops the re-index with its reason.
        conn = connect(service.settings.database_path)
        try:
            start_reindex(conn, (await service.store.get_collection("docs")).id, "vanished")
        finally:
            conn.close()

        async def failed() -> bool:
            return ((await collection(c))["reindex"] or {}).get("state") == "failed"

        await until(failed)
        state = await collection(c)
        assert "vanished" in state["reindex"]["error"] and state["checkpoint"] is None
        assert await found(c, 3)

        # One whose batches fail again and again stops too, the served index untouched.
        (tmp_path / "checkpoints" / "broken").mkdir()
        assert (await c.post("/v1/collections/docs/reindex", json={"checkpoint": "broken"})).status_code == 202
        await until(failed)
        state = await collection(c)
        assert "cannot encode passages" in state["reindex"]["error"] and state["checkpoint"] is None
        assert await found(c, 3)

        r = await c.get("/v1/checkpoints")
        assert r.status_code == 200 and [k["name"] for k in r.json()["checkpoints"]] == ["broken", "narrow"]


async def test_a_batch_encoded_before_a_reindex_went_live_is_encoded_again(tmp_path):
    """A batch encoded with the old checkpoint and landed after the switch
    would put old vectors in the new index: it is refused, and its documents
    stay pending for the next batch."""
    from app.store.store import NewDocument, Store

    settings = Settings(_env_file=None, data_dir=tmp_path)
    store = Store(settings.database_path)
    await store.open()
    conn = connect(settings.database_path)
    try:
        state = IndexStateStore(conn)
        c = (await store.create_collection("docs", None)).id
        from app.ingest.chunking import Passage

        await store.insert_pending(c, [NewDocument("a", None, {}, "h", [Passage("alpha beta", 0, 10)])])
        w = IndexWriter(settings, FakeEncoder(), FakeInMemoryBackend())
        w._stop.set()
        [pending] = state.pending_documents(c)
        batch = _Batch([pending], [ch.id for ch in state.chunks_of([pending.id])[pending.id]], ["alpha beta"])
        vectors = [FakeEncoder().encode_passages(["alpha beta"]).embs]
        conn.execute("UPDATE collections SET checkpoint = 'alt' WHERE id = ?", (c,))  # a re-index went live
        w._land(state, _Encoded(c, None, batch, vectors, None, 0.0, 0.0, False, time.perf_counter()))
        assert [d.id for d in state.pending_documents(c)] == [pending.id]
        assert state.collection(c).generation == 0
    finally:
        conn.close()
        await store.close()


@pytest.mark.parametrize("checkpoint", ["a/b", "", ".hidden", "x" * 129])
def test_checkpoint_names_are_plain_directory_names(checkpoint, tmp_path):
    from app.engine.encoders import Encoders
    from app.errors import InvalidInput

    with pytest.raises(InvalidInput):
        Encoders(FakeEncoder(), tmp_path).path(checkpoint)
